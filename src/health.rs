//! Backend health: active probes and the passive (data-path) failure count.
//!
//! Active probes run on the control plane's runtime, one task per backend:
//! connect within `timeout`, then optionally send bytes and judge the reply:
//! it must start with `expect`, or pass a preset's check (a Redis PONG or
//! master role, a memcached version, PostgreSQL's answer to an SSLRequest, a
//! MySQL server greeting). Their outcomes go to the control plane, which
//! applies `rise`/`fall` ([`Verdict`]) and publishes a new snapshot when a
//! backend flips.
//!
//! Passive ejection: workers count consecutive failed connections to a
//! backend in its [`PassiveHealth`]; the one that reaches the pool's `fall`
//! tells the control plane, which takes the backend out at once. Only probes
//! bring it back.
//!
//! A failure for want of a local resource (descriptors, memory, buffers,
//! ports: [`is_local_error`]) says nothing about the backend: it is counted
//! against neither a probe nor a connection.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::schema::{Preset, SendProxy};
use crate::config::HealthProbe;
use crate::{net, proxy_protocol};

/// Data-path failure count of one backend, shared by every worker.
#[derive(Debug)]
pub struct PassiveHealth {
    /// The control plane's identifier of the backend.
    pub id: u64,
    consecutive_failures: AtomicU32,
}

impl PassiveHealth {
    pub fn new(id: u64) -> PassiveHealth {
        PassiveHealth {
            id,
            consecutive_failures: AtomicU32::new(0),
        }
    }

    /// Counts a failed connection; true for exactly the one that makes the
    /// streak reach `threshold`, so only one report is sent per streak.
    pub fn record_failure(&self, threshold: u32) -> bool {
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1 == threshold
    }

    /// A connection worked: the streak is over. Reads before writing so that
    /// a healthy backend's counter stays a shared, unmodified cache line.
    pub fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }
}

/// Whether `error` comes from this host running out of something (the
/// process's or the system's descriptors, memory, socket buffers, local
/// ports) rather than from the peer. Such a failure never counts against a
/// backend: blaming the backend for it would eject healthy backends exactly
/// when sluice is overloaded.
pub fn is_local_error(error: &io::Error) -> bool {
    error
        .raw_os_error()
        .is_some_and(|errno| LOCAL_ERRORS.contains(&errno))
}

/// The errors of [`is_local_error`]: out of the process's or the system's
/// descriptors, socket buffers, memory, local ports.
pub const LOCAL_ERRORS: [i32; 5] = [
    libc::EMFILE,
    libc::ENFILE,
    libc::ENOBUFS,
    libc::ENOMEM,
    libc::EADDRNOTAVAIL,
];

/// Why a probe failed, as logged on a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeFailure {
    Connect(String),
    /// The probe could not run for want of a local resource
    /// ([`is_local_error`]): it says nothing about the backend.
    Local(String),
    Timeout(Duration),
    /// The reply is not what the probe expects; holds the first bytes seen.
    UnexpectedReply(Vec<u8>),
    /// The server answered in its protocol that it cannot serve: a Redis
    /// replica, a MySQL error packet.
    Refused(String),
    Io(String),
}

impl fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            ProbeFailure::Connect(e) => write!(f, "connect failed: {e}"),
            ProbeFailure::Local(e) => write!(f, "the probe could not run: {e}"),
            ProbeFailure::Timeout(t) => {
                write!(f, "no answer within {}", humantime::format_duration(*t))
            }
            ProbeFailure::UnexpectedReply(bytes) if bytes.is_empty() => {
                f.write_str("closed without replying")
            }
            ProbeFailure::UnexpectedReply(bytes) => {
                write!(f, "unexpected reply \"{}\"", bytes.escape_ascii())
            }
            ProbeFailure::Refused(reason) | ProbeFailure::Io(reason) => f.write_str(reason),
        }
    }
}

/// How many reply bytes a failure message shows.
const SHOWN_REPLY_BYTES: usize = 32;

/// Longest reply a probe reads before giving up on it.
const MAX_REPLY_BYTES: usize = 64 * 1024;

/// PostgreSQL's SSLRequest: length 8, then the code 80877103, big-endian.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// How a probe judges the reply, once it has sent its bytes.
#[derive(Debug, Clone, Copy)]
enum Check<'a> {
    /// Nothing is read: connecting (and sending) is the whole probe.
    NoReply,
    /// The reply starts with these bytes.
    Prefix(&'a [u8]),
    /// A RESP bulk string, the answer to `INFO replication`, that says
    /// `role:master`.
    RedisMaster,
    /// PostgreSQL's one-byte answer to an SSLRequest: `S` or `N`.
    PostgresSsl,
    /// A MySQL (or MariaDB) server greeting, protocol version 10.
    MysqlGreeting,
}

/// What the reply read so far says.
#[derive(Debug, PartialEq, Eq)]
enum Judgement {
    /// Not enough bytes to tell yet.
    Incomplete,
    Healthy,
    Failed(ProbeFailure),
}

/// What to send after connecting, and how to judge the reply: a preset's
/// exchange, or `send` and `expect` as written.
fn exchange(settings: &HealthProbe) -> (&[u8], Check<'_>) {
    match settings.preset {
        Some(Preset::Redis) if settings.require_master => {
            (b"INFO replication\r\n", Check::RedisMaster)
        }
        Some(Preset::Redis) => (b"PING\r\n", Check::Prefix(b"+PONG")),
        Some(Preset::Memcached) => (b"version\r\n", Check::Prefix(b"VERSION ")),
        Some(Preset::Postgres) => (&SSL_REQUEST, Check::PostgresSsl),
        // The server speaks first.
        Some(Preset::Mysql) => (b"", Check::MysqlGreeting),
        None => (
            settings.send.as_deref().unwrap_or_default().as_bytes(),
            settings
                .expect
                .as_deref()
                .map_or(Check::NoReply, |expect| Check::Prefix(expect.as_bytes())),
        ),
    }
}

/// Judges `reply`, all a backend has answered so far, as a probe with
/// `settings` does: `None` while more bytes could still change the
/// verdict.
pub fn judge_reply(settings: &HealthProbe, reply: &[u8]) -> Option<Result<(), ProbeFailure>> {
    match exchange(settings).1.judge(reply) {
        Judgement::Incomplete => None,
        Judgement::Healthy => Some(Ok(())),
        Judgement::Failed(failure) => Some(Err(failure)),
    }
}

impl Check<'_> {
    fn judge(self, reply: &[u8]) -> Judgement {
        match self {
            Check::NoReply => Judgement::Healthy,
            Check::Prefix(expect) if reply.len() < expect.len() => Judgement::Incomplete,
            Check::Prefix(expect) if reply.starts_with(expect) => Judgement::Healthy,
            Check::Prefix(_) => Judgement::Failed(unexpected(reply)),
            Check::RedisMaster => redis_role(reply),
            Check::PostgresSsl => match reply.first() {
                None => Judgement::Incomplete,
                Some(b'S' | b'N') => Judgement::Healthy,
                Some(_) => Judgement::Failed(unexpected(reply)),
            },
            Check::MysqlGreeting => mysql_greeting(reply),
        }
    }
}

fn unexpected(reply: &[u8]) -> ProbeFailure {
    ProbeFailure::UnexpectedReply(reply[..reply.len().min(SHOWN_REPLY_BYTES)].to_vec())
}

/// Judges `$LEN\r\n` and LEN bytes of `INFO replication` by its `role:` line.
fn redis_role(reply: &[u8]) -> Judgement {
    let Some(header_end) = reply.windows(2).position(|w| w == b"\r\n") else {
        return Judgement::Incomplete;
    };
    // Anything but a bulk string: an error such as `-NOAUTH` or `-LOADING`.
    let Some(len) = reply[..header_end]
        .strip_prefix(b"$")
        .and_then(|digits| std::str::from_utf8(digits).ok()?.parse::<usize>().ok())
    else {
        return Judgement::Failed(unexpected(reply));
    };
    let Some(info) = reply.get(header_end + 2..).and_then(|rest| rest.get(..len)) else {
        return Judgement::Incomplete;
    };
    let role = info
        .split(|&b| b == b'\n')
        .find_map(|line| line.strip_prefix(b"role:"))
        .map(<[u8]>::trim_ascii_end);
    match role {
        Some(b"master") => Judgement::Healthy,
        Some(role) => Judgement::Failed(ProbeFailure::Refused(format!(
            "role:{}, not master",
            role.escape_ascii()
        ))),
        None => Judgement::Failed(unexpected(reply)),
    }
}

/// Judges the first packet a MySQL server sends: a 3-byte little-endian
/// payload length, sequence id 0, then either the greeting (protocol
/// version 10) or an ERR packet: 0xff, a 2-byte error code, `#` and a
/// 5-character SQL state (protocol 4.1 only), the message.
fn mysql_greeting(reply: &[u8]) -> Judgement {
    let &[l0, l1, l2, sequence, first, ..] = reply else {
        return Judgement::Incomplete;
    };
    let len = u32::from_le_bytes([l0, l1, l2, 0]) as usize;
    match (sequence, first) {
        (0, 10) => Judgement::Healthy,
        (0, 0xff) if len >= 3 => {
            let Some(payload) = reply.get(4..4 + len) else {
                return Judgement::Incomplete;
            };
            let code = u16::from_le_bytes([payload[1], payload[2]]);
            // Protocol 4.1 puts `#` and the SQL state first.
            let message = match &payload[3..] {
                [b'#', _, _, _, _, _, message @ ..] => message,
                message => message,
            };
            Judgement::Failed(ProbeFailure::Refused(format!(
                "server error {code}: {}",
                String::from_utf8_lossy(message)
            )))
        }
        _ => Judgement::Failed(unexpected(reply)),
    }
}

/// One probe of `addr`.
pub async fn probe(addr: SocketAddr, settings: &HealthProbe) -> Result<(), ProbeFailure> {
    let (send, check) = exchange(settings);
    let exchange = async {
        let connected = net::connect(addr, Duration::ZERO)
            .await
            .and_then(|(stream, reset)| {
                // A backend that resets a connection as it accepts it fails.
                reset.map_or(Ok(stream), Err)
            });
        let stream = connected.map_err(|e| match is_local_error(&e) {
            true => ProbeFailure::Local(e.to_string()),
            false => ProbeFailure::Connect(e.to_string()),
        })?;
        if settings.proxy_version != SendProxy::Off {
            // From the probe's own address to the backend's.
            let socket = stream.get_ref();
            socket
                .local_addr()
                .and_then(|local| {
                    let header = proxy_protocol::header(settings.proxy_version, local, addr);
                    proxy_protocol::send(socket, &header)
                })
                .map_err(|e| ProbeFailure::Io(format!("sending the PROXY header: {e}")))?;
        }
        if send.is_empty() && matches!(check, Check::NoReply) {
            return Ok(());
        }
        let mut stream = tokio::net::TcpStream::from_std(stream.into_inner())
            .map_err(|e| ProbeFailure::Io(e.to_string()))?;
        if !send.is_empty() {
            stream
                .write_all(send)
                .await
                .map_err(|e| ProbeFailure::Io(format!("sending the probe: {e}")))?;
        }
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match judge_reply(settings, &reply) {
                Some(verdict) => return verdict,
                None if reply.len() >= MAX_REPLY_BYTES => return Err(unexpected(&reply)),
                None => {}
            }
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| ProbeFailure::Io(format!("reading the reply: {e}")))?;
            if n == 0 {
                // Closed before the reply could be judged.
                return Err(unexpected(&reply));
            }
            reply.extend_from_slice(&buf[..n]);
        }
    };
    // The readiness-based streams close at once when the timeout drops them.
    tokio::time::timeout(settings.timeout, exchange)
        .await
        .unwrap_or(Err(ProbeFailure::Timeout(settings.timeout)))
}

/// The `rise`/`fall` state of one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub up: bool,
    /// Consecutive outcomes that disagree with `up`.
    streak: u32,
}

impl Verdict {
    /// Backends start up, so a new process or a new backend serves at once;
    /// probes take it out within `fall` intervals if it is not.
    pub fn up() -> Verdict {
        Verdict {
            up: true,
            streak: 0,
        }
    }

    /// Applies one probe outcome; true if the backend flipped.
    pub fn observe(&mut self, success: bool, rise: u32, fall: u32) -> bool {
        if success == self.up {
            self.streak = 0;
            return false;
        }
        self.streak += 1;
        let needed = if self.up { fall } else { rise };
        if self.streak >= needed {
            self.up = !self.up;
            self.streak = 0;
            return true;
        }
        false
    }

    /// Forgets the outcomes counted towards a flip: they were counted
    /// against other `rise`/`fall` settings.
    pub fn restart_streak(&mut self) {
        self.streak = 0;
    }

    /// Takes the backend out now (passive ejection); it needs `rise`
    /// successful probes to come back.
    pub fn eject(&mut self) -> bool {
        let was_up = self.up;
        *self = Verdict {
            up: false,
            streak: 0,
        };
        was_up
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every way a probe can judge a reply.
    fn settings() -> impl Strategy<Value = HealthProbe> {
        prop_oneof![
            Just(preset(Preset::Redis, false)),
            Just(preset(Preset::Redis, true)),
            Just(preset(Preset::Memcached, false)),
            Just(preset(Preset::Postgres, false)),
            Just(preset(Preset::Mysql, false)),
            "[ -~]{1,8}".prop_map(|expect| HealthProbe {
                expect: Some(expect),
                ..HealthProbe::default()
            }),
        ]
    }

    /// Replies of every shape the checks look for, and noise.
    fn reply() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            "\\$[0-9]{1,3}\r\n(# Replication\r\n)?(role:[a-z]{0,8}\r\n)?[ -~\r\n]{0,40}"
                .prop_map(String::into_bytes),
            (
                any::<[u8; 3]>(),
                0u8..3,
                prop_oneof![Just(10u8), Just(0xffu8), any::<u8>()],
                proptest::collection::vec(any::<u8>(), 0..80)
            )
                .prop_map(|(len, seq, first, rest)| {
                    let mut r = vec![len[0], len[1] % 2, 0, seq, first];
                    r.extend(rest);
                    r
                }),
            "[+\\-VSN][ -~]{0,20}(\r\n)?".prop_map(String::into_bytes),
        ]
    }

    proptest! {
        /// Probes read a reply piece by piece: once a prefix is judged,
        /// the bytes after it never change the verdict.
        #[test]
        fn a_verdict_never_changes_with_more_bytes(settings in settings(), reply in reply()) {
            // What a verdict says; a failure quotes the bytes read, which
            // may be more.
            let kind = |verdict: Option<Result<(), ProbeFailure>>| {
                verdict.map(|v| v.map_err(|failure| std::mem::discriminant(&failure)))
            };
            let whole = kind(judge_reply(&settings, &reply));
            for end in 0..=reply.len() {
                let verdict = kind(judge_reply(&settings, &reply[..end]));
                if verdict.is_some() {
                    prop_assert_eq!(verdict, whole, "decided at {} of {}", end, reply.len());
                    break;
                }
            }
        }
    }

    #[test]
    fn rise_and_fall_need_consecutive_outcomes() {
        let mut v = Verdict::up();
        assert!(!v.observe(false, 2, 3));
        assert!(!v.observe(false, 2, 3));
        assert!(!v.observe(true, 2, 3), "a success breaks the streak");
        assert!(!v.observe(false, 2, 3));
        assert!(!v.observe(false, 2, 3));
        assert!(v.observe(false, 2, 3), "third failure in a row");
        assert!(!v.up);
        assert!(!v.observe(true, 2, 3));
        assert!(v.observe(true, 2, 3), "second success in a row");
        assert!(v.up);
    }

    #[test]
    fn ejection_needs_rise_to_return() {
        let mut v = Verdict::up();
        assert!(v.eject());
        assert!(!v.eject(), "already out");
        assert!(!v.observe(true, 3, 1));
        assert!(!v.observe(true, 3, 1));
        assert!(v.observe(true, 3, 1));
    }

    #[test]
    fn passive_reports_once_per_streak() {
        let p = PassiveHealth::new(7);
        assert!(!p.record_failure(3));
        assert!(!p.record_failure(3));
        assert!(p.record_failure(3));
        assert!(!p.record_failure(3), "reported already");
        p.record_success();
        assert!(!p.record_failure(3));
        assert!(!p.record_failure(3));
        assert!(p.record_failure(3));
    }

    #[test]
    fn running_out_of_local_resources_is_never_the_backends_fault() {
        for errno in LOCAL_ERRORS {
            assert!(is_local_error(&io::Error::from_raw_os_error(errno)));
        }
        for errno in [libc::ECONNREFUSED, libc::ETIMEDOUT, libc::EHOSTUNREACH] {
            assert!(!is_local_error(&io::Error::from_raw_os_error(errno)));
        }
        assert!(!is_local_error(&io::ErrorKind::TimedOut.into()));
    }

    #[test]
    fn failure_messages() {
        assert_eq!(
            ProbeFailure::UnexpectedReply(b"-ERR x\r\n".to_vec()).to_string(),
            "unexpected reply \"-ERR x\\r\\n\""
        );
        assert_eq!(
            ProbeFailure::UnexpectedReply(Vec::new()).to_string(),
            "closed without replying"
        );
        assert_eq!(
            ProbeFailure::Timeout(Duration::from_millis(1500)).to_string(),
            "no answer within 1s 500ms"
        );
    }

    fn preset(preset: Preset, require_master: bool) -> HealthProbe {
        HealthProbe {
            preset: Some(preset),
            require_master,
            ..HealthProbe::default()
        }
    }

    /// Judges `reply` as a probe with `preset` does.
    fn judge(preset: Preset, require_master: bool, reply: &[u8]) -> Judgement {
        exchange(&self::preset(preset, require_master))
            .1
            .judge(reply)
    }

    fn refused(reason: &str) -> Judgement {
        Judgement::Failed(ProbeFailure::Refused(reason.to_owned()))
    }

    #[test]
    fn presets_send_what_their_servers_answer() {
        let sent = |p, master| exchange(&preset(p, master)).0.to_vec();
        assert_eq!(sent(Preset::Redis, false), b"PING\r\n");
        assert_eq!(sent(Preset::Redis, true), b"INFO replication\r\n");
        assert_eq!(sent(Preset::Memcached, false), b"version\r\n");
        // Length 8, code 1234 << 16 | 5679.
        assert_eq!(
            sent(Preset::Postgres, false),
            [8u32.to_be_bytes(), 80_877_103u32.to_be_bytes()].concat()
        );
        assert!(sent(Preset::Mysql, false).is_empty());
    }

    #[test]
    fn redis_role_waits_for_the_whole_bulk_string() {
        let check = |reply: &[u8]| judge(Preset::Redis, true, reply);
        let bulk = |info: &str| format!("${}\r\n{info}\r\n", info.len()).into_bytes();
        let master = bulk("# Replication\r\nrole:master\r\nconnected_slaves:0\r\n");
        // Complete without the final CRLF.
        for end in 0..master.len() - 2 {
            assert_eq!(check(&master[..end]), Judgement::Incomplete, "{end}");
        }
        assert_eq!(check(&master), Judgement::Healthy);
        let replica = bulk("# Replication\r\nrole:slave\r\nmaster_host:10.0.0.1\r\n");
        assert_eq!(check(&replica), refused("role:slave, not master"));
        assert_eq!(
            check(b"-NOAUTH Authentication required.\r\n"),
            Judgement::Failed(ProbeFailure::UnexpectedReply(
                b"-NOAUTH Authentication required.".to_vec()
            ))
        );
    }

    #[test]
    fn postgres_answers_s_or_n() {
        let check = |reply: &[u8]| judge(Preset::Postgres, false, reply);
        assert_eq!(check(b""), Judgement::Incomplete);
        assert_eq!(check(b"N"), Judgement::Healthy);
        assert_eq!(check(b"S"), Judgement::Healthy);
        assert!(matches!(
            check(b"E\0\0\0\x10SFATAL"),
            Judgement::Failed(ProbeFailure::UnexpectedReply(_))
        ));
    }

    #[test]
    fn mysql_greeting_or_error_packet() {
        let check = |reply: &[u8]| judge(Preset::Mysql, false, reply);
        // The start of MariaDB 10.11's greeting.
        let greeting = b"d\0\0\0\x0a5.5.5-10.11.19-MariaDB\0";
        assert_eq!(check(&greeting[..4]), Judgement::Incomplete);
        assert_eq!(check(greeting), Judgement::Healthy);
        // Before the handshake the server does not know the client speaks
        // 4.1, so its error has no SQL state.
        let host =
            b"D\0\0\0\xffj\x04Host '127.0.0.1' is not allowed to connect to this MariaDB server";
        assert_eq!(check(&host[..20]), Judgement::Incomplete);
        assert_eq!(
            check(host),
            refused("server error 1130: Host '127.0.0.1' is not allowed to connect to this MariaDB server")
        );
        let full = b"\x1d\0\0\0\xff\x10\x04#08004Too many connections";
        assert_eq!(
            check(full),
            refused("server error 1040: Too many connections")
        );
        assert!(matches!(
            check(b"SSH-2.0-OpenSSH_9.2\r\n"),
            Judgement::Failed(ProbeFailure::UnexpectedReply(_))
        ));
    }
}
