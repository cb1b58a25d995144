//! When a worker accepts, whichever driver it runs: what an accept error
//! means, and the pause at the descriptor capacity. No I/O: the drivers
//! accept, and ask here what to do next.
//!
//! - **Accept errors** ([`AcceptError::of`]): a client that went away
//!   before it was taken, and the network errors Linux passes on from a
//!   pending connection (accept(2) says to treat them like `EAGAIN`), are
//!   no news: accept again. A listening socket the control plane shut down
//!   (`EINVAL` once it no longer listens) stops its accepts. Anything else
//!   (out of descriptors or memory after all, an unknown error) is logged,
//!   at most once a second, and accepting backs off for [`BACKOFF`], never
//!   in a hot loop: clients wait in the listen backlog meanwhile.
//! - **The capacity** ([`Pause`]): a worker that finds no room for one more
//!   connection stops accepting until connections close; each pause is
//!   counted (`sluice_accept_paused_total`) and logged, as is its end, at
//!   most once a second.

use std::net::SocketAddr;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::logging::Throttle;
use crate::shared::Shared;

/// How long accepting waits after an error it cannot shrug off.
pub const BACKOFF: Duration = Duration::from_millis(100);

static ACCEPT_ERROR: Throttle = Throttle::new();
static AT_CAPACITY: Throttle = Throttle::new();
static RESUMED: Throttle = Throttle::new();

/// What an accept error means for the listener's accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptError {
    /// Nothing to see: accept again at once.
    Ignore,
    /// The listener was stopped: accept no more on it.
    Stop,
    /// Logged; accept again after [`BACKOFF`].
    BackOff,
}

impl AcceptError {
    /// What `errno` from an accept on the listener at `address` means
    /// (logged if it must be); `listening` tells whether the socket still
    /// listens.
    pub fn of(errno: i32, address: SocketAddr, listening: impl FnOnce() -> bool) -> AcceptError {
        let class = match errno {
            // Gone before it was taken, cancelled (io_uring), interrupted,
            // or nothing left to take.
            libc::ECONNABORTED | libc::ECANCELED | libc::EINTR | libc::EAGAIN => {
                AcceptError::Ignore
            }
            // A network error of the pending connection, or a firewall
            // rule against it: that client only.
            libc::ENETDOWN
            | libc::EPROTO
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH
            | libc::EPERM => AcceptError::Ignore,
            libc::EINVAL if !listening() => AcceptError::Stop,
            _ => AcceptError::BackOff,
        };
        if class == AcceptError::BackOff {
            if let Some(suppressed) = ACCEPT_ERROR.allow() {
                let e = std::io::Error::from_raw_os_error(errno);
                error!(%address, suppressed, "cannot accept connections: {e}");
            }
        }
        class
    }
}

/// Whether a worker's accepts (or one accept loop's) are paused at the
/// descriptor capacity, and on which listener it found no room.
#[derive(Debug, Default)]
pub struct Pause {
    paused: Option<SocketAddr>,
}

impl Pause {
    pub fn paused(&self) -> bool {
        self.paused.is_some()
    }

    /// No room for one more connection from the listener at `address`:
    /// pause, if not paused already (counted and logged then). Returns
    /// whether it just paused.
    pub fn at_capacity(&mut self, address: SocketAddr, shared: &Shared) -> bool {
        if self.paused.is_some() {
            return false;
        }
        self.paused = Some(address);
        shared.accept_paused.increment(1);
        if let Some(suppressed) = AT_CAPACITY.allow() {
            warn!(
                %address, suppressed,
                "{} connections are open, all the descriptor limit allows: \
                 new clients wait in the listen backlog until some close",
                shared.connections.capacity()
            );
        }
        true
    }

    /// There is room again: resume (logged), if paused.
    pub fn room(&mut self) {
        if let Some(address) = self.paused.take() {
            if let Some(suppressed) = RESUMED.allow() {
                info!(%address, suppressed, "accepting again: connections have closed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::fixtures::shared;

    fn address() -> SocketAddr {
        "127.0.0.1:7000".parse().unwrap()
    }

    #[test]
    fn each_accept_error_has_its_class() {
        let listening = || true;
        for errno in [
            libc::ECONNABORTED,
            libc::ECANCELED,
            libc::EPROTO,
            libc::EPERM,
        ] {
            assert_eq!(
                AcceptError::of(errno, address(), listening),
                AcceptError::Ignore
            );
        }
        // Running out is never a hot loop; nor is an error nobody foresaw.
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EIO,
        ] {
            assert_eq!(
                AcceptError::of(errno, address(), listening),
                AcceptError::BackOff
            );
        }
        // EINVAL means stopped only on a socket that no longer listens.
        assert_eq!(
            AcceptError::of(libc::EINVAL, address(), || false),
            AcceptError::Stop
        );
        assert_eq!(
            AcceptError::of(libc::EINVAL, address(), listening),
            AcceptError::BackOff
        );
    }

    #[test]
    fn a_pause_is_counted_once_until_there_is_room() {
        let (shared, _events) = shared(
            "listeners:\n  l: { listen: 127.0.0.1:7000, pool: p }\npools:\n  p:\n    backends: [{ address: 10.0.0.1:1 }]\n",
        );
        let mut pause = Pause::default();
        assert!(pause.at_capacity(address(), shared));
        assert!(!pause.at_capacity(address(), shared), "paused already");
        assert!(pause.paused());
        pause.room();
        assert!(!pause.paused());
        assert!(pause.at_capacity(address(), shared));
    }
}
