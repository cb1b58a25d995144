//! Probes that judge one reply: `send`/`expect` as written, and the presets
//! that need no login (a Redis PONG, a memcached version, PostgreSQL's
//! answer to an SSLRequest, a MySQL server greeting).
//!
//! A verdict is a pure function of the bytes read so far ([`judge_reply`]),
//! so that the fuzz target and the property test can drive it without a
//! socket.

use super::wire::Wire;
use super::{unexpected, ProbeFailure};
use crate::config::schema::Preset;
use crate::config::HealthProbe;
use crate::net;

/// PostgreSQL's SSLRequest: length 8, then the code 80877103, big-endian.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// How a probe judges the reply, once it has sent its bytes.
#[derive(Debug, Clone, Copy)]
pub(super) enum Check<'a> {
    /// Nothing is read: connecting (and sending) is the whole probe.
    NoReply,
    /// The reply starts with these bytes.
    Prefix(&'a [u8]),
    /// PostgreSQL's one-byte answer to an SSLRequest: `S` or `N`.
    PostgresSsl,
    /// A MySQL (or MariaDB) server greeting, protocol version 10.
    MysqlGreeting,
}

/// What the reply read so far says.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Judgement {
    /// Not enough bytes to tell yet.
    Incomplete,
    Healthy,
    Failed(ProbeFailure),
}

/// What to send after connecting, and how to judge the reply: a preset's
/// exchange, or `send` and `expect` as written.
pub(super) fn exchange(settings: &HealthProbe) -> (&[u8], Check<'_>) {
    match settings.preset {
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

/// Sends what `settings` say and reads until the reply can be judged.
pub(super) async fn converse(
    socket: net::Socket,
    settings: &HealthProbe,
) -> Result<(), ProbeFailure> {
    let (send, check) = exchange(settings);
    if send.is_empty() && matches!(check, Check::NoReply) {
        return Ok(());
    }
    let mut wire = Wire::new(socket)?;
    if !send.is_empty() {
        wire.send(send).await?;
    }
    loop {
        if let Some(verdict) = judge_reply(settings, &wire.read) {
            return verdict;
        }
        wire.fill().await?;
    }
}

impl Check<'_> {
    pub(super) fn judge(self, reply: &[u8]) -> Judgement {
        match self {
            Check::NoReply => Judgement::Healthy,
            Check::Prefix(expect) if reply.len() < expect.len() => Judgement::Incomplete,
            Check::Prefix(expect) if reply.starts_with(expect) => Judgement::Healthy,
            Check::Prefix(_) => Judgement::Failed(unexpected(reply)),
            Check::PostgresSsl => match reply.first() {
                None => Judgement::Incomplete,
                Some(b'S' | b'N') => Judgement::Healthy,
                Some(_) => Judgement::Failed(unexpected(reply)),
            },
            Check::MysqlGreeting => mysql_greeting(reply),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every way a probe can judge a reply.
    fn settings() -> impl Strategy<Value = HealthProbe> {
        prop_oneof![
            Just(preset(Preset::Redis)),
            Just(preset(Preset::Memcached)),
            Just(preset(Preset::Postgres)),
            Just(preset(Preset::Mysql)),
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

    fn preset(preset: Preset) -> HealthProbe {
        HealthProbe {
            preset: Some(preset),
            ..HealthProbe::default()
        }
    }

    /// Judges `reply` as a probe with `preset` does.
    fn judge(preset: Preset, reply: &[u8]) -> Judgement {
        exchange(&self::preset(preset)).1.judge(reply)
    }

    fn refused(reason: &str) -> Judgement {
        Judgement::Failed(ProbeFailure::Refused(reason.to_owned()))
    }

    #[test]
    fn presets_send_what_their_servers_answer() {
        let sent = |p| exchange(&preset(p)).0.to_vec();
        assert_eq!(sent(Preset::Redis), b"PING\r\n");
        assert_eq!(sent(Preset::Memcached), b"version\r\n");
        // Length 8, code 1234 << 16 | 5679.
        assert_eq!(
            sent(Preset::Postgres),
            [8u32.to_be_bytes(), 80_877_103u32.to_be_bytes()].concat()
        );
        assert!(sent(Preset::Mysql).is_empty());
    }

    #[test]
    fn postgres_answers_s_or_n() {
        let check = |reply: &[u8]| judge(Preset::Postgres, reply);
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
        let check = |reply: &[u8]| judge(Preset::Mysql, reply);
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
