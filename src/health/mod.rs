//! Backend health: active probes and the passive (data-path) failure count.
//!
//! Active probes run on the control plane's runtime, one task per backend:
//! connect (to `port`, if set) within `timeout`, then one of
//! - nothing more, or `send` and a reply that starts with `expect`, or a
//!   preset that needs no login ([`reply`]);
//! - an HTTP/1.1 request answered with an expected status ([`http`]);
//! - a conversation that logs in with `auth` and asks the server its role:
//!   Redis `INFO replication` ([`redis`]), PostgreSQL `pg_is_in_recovery()`
//!   ([`postgres`]), MySQL `@@read_only` and Galera's `wsrep_local_state`
//!   ([`mysql`]).
//!
//! The whole probe, connect included, must end within `timeout`. Outcomes go
//! to the control plane, which applies `rise`/`fall` ([`Verdict`]) and
//! publishes a new snapshot when a backend flips; a backend of a pool that
//! fails closed is *unknown*, and takes no client, until its first probe.
//!
//! Passive ejection: workers count consecutive failed connections to a
//! backend in its [`PassiveHealth`]; the one that reaches the pool's `fall`
//! tells the control plane, which takes the backend out at once. Only probes
//! bring it back.
//!
//! A failure for want of a local resource (descriptors, memory, buffers,
//! ports: [`is_local_error`]) says nothing about the backend: it is counted
//! against neither a probe nor a connection.

mod http;
mod mysql;
mod postgres;
mod redis;
mod reply;
mod wire;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub(crate) use redis::next_reply;
pub use reply::judge_reply;
pub(crate) use wire::Wire;

use crate::config::schema::{Preset, Role, SendProxy};
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
    /// replica, a MySQL error packet, a failed login, an HTTP status.
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

fn unexpected(reply: &[u8]) -> ProbeFailure {
    ProbeFailure::UnexpectedReply(reply[..reply.len().min(SHOWN_REPLY_BYTES)].to_vec())
}

/// One probe of the backend at `addr`.
pub async fn probe(addr: SocketAddr, settings: &HealthProbe) -> Result<(), ProbeFailure> {
    let addr = SocketAddr::new(addr.ip(), settings.port.unwrap_or(addr.port()));
    let conversation = async {
        let stream = connect(addr, settings).await?;
        let (role, login) = (settings.role, settings.auth.as_ref());
        match (settings.preset, &settings.http, login) {
            (_, Some(http), _) => http::check(Wire::new(stream)?, http, addr).await,
            (Some(Preset::Redis), _, _) if login.is_some() || role != Role::Any => {
                redis::check(Wire::new(stream)?, role, login).await
            }
            (Some(Preset::Postgres), _, Some(login)) => {
                postgres::check(Wire::new(stream)?, role, login).await
            }
            (Some(Preset::Mysql), _, Some(login)) => {
                mysql::check(Wire::new(stream)?, role, login).await
            }
            // Connecting, `send`/`expect`, or a preset that needs no login.
            _ => reply::converse(stream, settings).await,
        }
    };
    // The readiness-based streams close at once when the timeout drops them.
    tokio::time::timeout(settings.timeout, conversation)
        .await
        .unwrap_or(Err(ProbeFailure::Timeout(settings.timeout)))
}

/// Connects to `addr` and sends the PROXY header, if probes send one.
async fn connect(addr: SocketAddr, settings: &HealthProbe) -> Result<net::Socket, ProbeFailure> {
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
    Ok(stream)
}

/// The `rise`/`fall` state of one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub up: bool,
    /// No probe has judged it yet, and it gets no client: see
    /// [`Verdict::unknown`].
    pub unknown: bool,
    /// Consecutive outcomes that disagree with `up`.
    streak: u32,
}

impl Verdict {
    /// A backend of a pool that fails open starts up, so a new process or
    /// a new backend serves at once; probes take it out within `fall`
    /// intervals if it is not.
    pub fn up() -> Verdict {
        Verdict {
            up: true,
            unknown: false,
            streak: 0,
        }
    }

    /// A backend of a pool that fails closed starts unknown: it gets no
    /// client until its first probe passes (a replica must not take writes
    /// for the `fall` intervals probes would need to find it out).
    pub fn unknown() -> Verdict {
        Verdict {
            up: false,
            unknown: true,
            streak: 0,
        }
    }

    /// How a new backend starts: unknown if a probe must judge it first
    /// (its pool fails closed and probes), up otherwise.
    pub fn first(wait_for_probe: bool) -> Verdict {
        match wait_for_probe {
            true => Verdict::unknown(),
            false => Verdict::up(),
        }
    }

    /// Applies one probe outcome; true if the backend flipped, or was
    /// judged for the first time.
    pub fn observe(&mut self, success: bool, rise: u32, fall: u32) -> bool {
        if self.unknown {
            *self = Verdict {
                up: success,
                unknown: false,
                streak: 0,
            };
            return true;
        }
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
            unknown: false,
            streak: 0,
        };
        was_up
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_first_probe_judges_an_unknown_backend_alone() {
        let mut v = Verdict::unknown();
        assert!(!v.up);
        assert!(v.observe(true, 3, 3), "one success is enough");
        assert!(v.up && !v.unknown);
        let mut v = Verdict::unknown();
        assert!(v.observe(false, 3, 3), "known down now");
        assert!(!v.up && !v.unknown);
        assert!(!v.observe(true, 2, 3), "then rise applies");
        assert!(v.observe(true, 2, 3));
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
}
