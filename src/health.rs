//! Backend health: active probes and the passive (data-path) failure count.
//!
//! Active probes run on the control plane's runtime, one task per backend:
//! connect within `timeout`, optionally send bytes and require a reply that
//! starts with the expected prefix. Their outcomes go to the control plane,
//! which applies `rise`/`fall` ([`Verdict`]) and publishes a new snapshot
//! when a backend flips.
//!
//! Passive ejection: workers count consecutive failed connections to a
//! backend in its [`PassiveHealth`]; the one that reaches the pool's `fall`
//! tells the control plane, which takes the backend out at once. Only probes
//! bring it back.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::HealthProbe;
use crate::net;

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

/// Why a probe failed, as logged on a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeFailure {
    Connect(String),
    Timeout(Duration),
    /// The reply did not start with `expect`; holds the first bytes seen.
    UnexpectedReply(Vec<u8>),
    Io(String),
}

impl fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            ProbeFailure::Connect(e) => write!(f, "connect failed: {e}"),
            ProbeFailure::Timeout(t) => {
                write!(f, "no answer within {}", humantime::format_duration(*t))
            }
            ProbeFailure::UnexpectedReply(bytes) if bytes.is_empty() => {
                f.write_str("closed without replying")
            }
            ProbeFailure::UnexpectedReply(bytes) => {
                write!(f, "unexpected reply \"{}\"", bytes.escape_ascii())
            }
            ProbeFailure::Io(e) => write!(f, "{e}"),
        }
    }
}

/// How many reply bytes a failure message shows.
const SHOWN_REPLY_BYTES: usize = 32;

/// One probe of `addr`.
pub async fn probe(addr: SocketAddr, settings: &HealthProbe) -> Result<(), ProbeFailure> {
    let exchange = async {
        let stream = net::connect(addr, Duration::ZERO)
            .await
            .map_err(|e| ProbeFailure::Connect(e.to_string()))?;
        if settings.send.is_none() && settings.expect.is_none() {
            return Ok(());
        }
        let mut stream = tokio::net::TcpStream::from_std(stream.into_inner())
            .map_err(|e| ProbeFailure::Io(e.to_string()))?;
        if let Some(send) = &settings.send {
            stream
                .write_all(send.as_bytes())
                .await
                .map_err(|e| ProbeFailure::Io(format!("sending the probe: {e}")))?;
        }
        if let Some(expect) = &settings.expect {
            let expect = expect.as_bytes();
            let mut reply = Vec::with_capacity(expect.len());
            let mut buf = [0u8; 256];
            while reply.len() < expect.len() {
                let n = stream
                    .read(&mut buf)
                    .await
                    .map_err(|e| ProbeFailure::Io(format!("reading the reply: {e}")))?;
                if n == 0 {
                    break;
                }
                reply.extend_from_slice(&buf[..n]);
            }
            if !reply.starts_with(expect) {
                reply.truncate(SHOWN_REPLY_BYTES);
                return Err(ProbeFailure::UnexpectedReply(reply));
            }
        }
        Ok(())
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
