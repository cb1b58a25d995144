//! How a connection attempt or a connection ended, and what follows from
//! it: the `close` of its log line, whether both sides are reset, what it
//! says about the backend's health, and what it counts. One pure function,
//! [`classify`], that every data path applies, so that they all keep the
//! same rules.
//!
//! The rule for health: only a connect proves anything about a backend. A
//! connect refused, unreachable or timed out counts against it; a
//! successful connect ends a failure streak at once; running out of local
//! resources counts for nothing. What happens after the connect (a reset,
//! an error, an early close) never counts: a client decides what it sends,
//! and a healthy backend resets a connection whose bytes it rejects (a
//! malformed startup packet makes PostgreSQL close with unread data). Were
//! that counted, any client could eject every backend in turn. Probes, with
//! `send`/`expect` or a preset, judge a backend that accepts but misbehaves.

use std::borrow::Cow;
use std::io;

use crate::health::is_local_error;
use crate::metrics::ErrorReason;

/// Which peer something came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Backend => "backend",
        })
    }
}

/// How a connection attempt or a connection ended.
#[derive(Debug)]
pub enum Ending<'a> {
    /// The backend accepted the connection.
    Connected,
    /// The connect to the backend failed.
    ConnectFailed(&'a io::Error),
    /// Both directions finished cleanly; `first_fin` sent its FIN first.
    Finished { first_fin: Side },
    /// `side` failed with `error` (a reset, most often).
    Failed { side: Side, error: &'a io::Error },
    /// `shutdown_timeout` ran out.
    Shutdown,
    /// Nothing moved for `idle_timeout`; `stalled`: bytes were waiting for
    /// a destination that stopped reading.
    Idle { stalled: bool },
    /// The kernel dropped completions of the io_uring driver, which cannot
    /// know what became of the connection's operations.
    Lost,
    /// Its backend was marked down or removed, and its pool has
    /// `on_down: close`: a client mid-transaction must see an error, not
    /// write on to a demoted primary.
    BackendDown,
}

/// What a connection's ending says about its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passive {
    /// It answered: a failure streak ends.
    Healthy,
    /// It proves unhealthy: a step towards `fall`.
    Failing,
    /// Nothing either way.
    Silent,
}

/// What follows from an [`Ending`].
#[derive(Debug, PartialEq, Eq)]
pub struct Classified {
    /// Why it closed, as the connection log says (`close=`).
    pub close: Cow<'static, str>,
    /// Both sides are reset: an error on one side must reach the other as
    /// an error, never as a clean end of stream that would pass a
    /// truncated reply off as whole.
    pub reset: bool,
    /// Before the reset, every byte sluice took from this side still goes
    /// to the other (the bytes first, then the reset, as a direct
    /// connection would have it): what the driver holds, and what the
    /// other side's socket has not sent yet. That takes as long as the
    /// other side takes to read them, bounded like any relaying by
    /// `idle_timeout` and the drain's `shutdown_timeout`.
    pub flush_from: Option<Side>,
    pub passive: Passive,
    /// What it counts in `sluice_connection_errors_total`.
    pub counted: Option<ErrorReason>,
}

/// The rules, in one place.
pub fn classify(ending: &Ending) -> Classified {
    let flush_from = match ending {
        Ending::Failed { side, .. } => Some(*side),
        _ => None,
    };
    let (close, reset, passive, counted): (Cow<'static, str>, _, _, _) = match ending {
        Ending::Connected => ("".into(), false, Passive::Healthy, None),
        Ending::ConnectFailed(error) if is_local_error(error) => (
            "out of resources".into(),
            false,
            Passive::Silent,
            Some(ErrorReason::OutOfResources),
        ),
        Ending::ConnectFailed(error) => {
            let reason = match error.kind() {
                io::ErrorKind::TimedOut => ErrorReason::ConnectTimeout,
                _ => ErrorReason::ConnectRefused,
            };
            (
                format!("connect failed: {error}").into(),
                false,
                Passive::Failing,
                Some(reason),
            )
        }
        Ending::Finished { first_fin } => (
            format!("{first_fin} FIN").into(),
            false,
            Passive::Silent,
            None,
        ),
        Ending::Failed { side, error } => {
            let close = match error.kind() {
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                    format!("{side} reset")
                }
                _ => format!("{side} error: {error}"),
            };
            (close.into(), true, Passive::Silent, None)
        }
        Ending::Shutdown => ("shutdown".into(), true, Passive::Silent, None),
        Ending::Lost => (
            "completions lost by io_uring".into(),
            true,
            Passive::Silent,
            None,
        ),
        Ending::BackendDown => ("backend down".into(), true, Passive::Silent, None),
        // Nothing in flight: both sides get a plain FIN. A destination that
        // stopped reading would lose bytes: both sides get a reset.
        Ending::Idle { stalled: true } => {
            ("idle timeout (stalled)".into(), true, Passive::Silent, None)
        }
        Ending::Idle { stalled: false } => ("idle timeout".into(), false, Passive::Silent, None),
    };
    Classified {
        close,
        reset,
        flush_from,
        passive,
        counted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(errno: i32) -> io::Error {
        io::Error::from_raw_os_error(errno)
    }

    #[test]
    fn only_a_connect_says_anything_about_the_backend() {
        assert_eq!(classify(&Ending::Connected).passive, Passive::Healthy);
        for errno in [libc::ECONNREFUSED, libc::EHOSTUNREACH, libc::ETIMEDOUT] {
            let failed = classify(&Ending::ConnectFailed(&error(errno)));
            assert_eq!(failed.passive, Passive::Failing, "{errno}");
        }
        let timed_out = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
        assert_eq!(
            classify(&Ending::ConnectFailed(&timed_out)).counted,
            Some(ErrorReason::ConnectTimeout)
        );
        // Whatever happens once connected, the backend is not blamed: a
        // client can make a healthy backend reset.
        for side in [Side::Client, Side::Backend] {
            for errno in [libc::ECONNRESET, libc::EPIPE, libc::ETIMEDOUT] {
                let failed = classify(&Ending::Failed {
                    side,
                    error: &error(errno),
                });
                assert_eq!(failed.passive, Passive::Silent, "{side} {errno}");
                assert!(failed.reset);
            }
            let finished = classify(&Ending::Finished { first_fin: side });
            assert_eq!(finished.passive, Passive::Silent);
            assert!(!finished.reset);
        }
    }

    #[test]
    fn running_out_of_resources_blames_nobody() {
        for errno in crate::health::LOCAL_ERRORS {
            let failed = classify(&Ending::ConnectFailed(&error(errno)));
            assert_eq!(failed.passive, Passive::Silent, "{errno}");
            assert_eq!(failed.counted, Some(ErrorReason::OutOfResources));
        }
    }

    #[test]
    fn how_each_ending_is_logged_and_closed() {
        let cases = [
            (
                Ending::Finished {
                    first_fin: Side::Client,
                },
                "client FIN",
                false,
            ),
            (
                Ending::Finished {
                    first_fin: Side::Backend,
                },
                "backend FIN",
                false,
            ),
            (
                Ending::Failed {
                    side: Side::Backend,
                    error: &error(libc::ECONNRESET),
                },
                "backend reset",
                true,
            ),
            (
                Ending::Failed {
                    side: Side::Client,
                    error: &error(libc::EPIPE),
                },
                "client reset",
                true,
            ),
            (Ending::Shutdown, "shutdown", true),
            (Ending::Idle { stalled: false }, "idle timeout", false),
            (
                Ending::Idle { stalled: true },
                "idle timeout (stalled)",
                true,
            ),
        ];
        for (ending, close, reset) in cases {
            let classified = classify(&ending);
            assert_eq!(
                (&*classified.close, classified.reset),
                (close, reset),
                "{ending:?}"
            );
        }
        let other = classify(&Ending::Failed {
            side: Side::Client,
            error: &error(libc::EHOSTUNREACH),
        });
        assert!(
            other.close.starts_with("client error: No route to host"),
            "{}",
            other.close
        );
    }
}
