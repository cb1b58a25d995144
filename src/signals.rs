//! Signals, taken synchronously: no async signal handler runs anywhere.
//!
//! [`block`] blocks the handled signals in the calling thread before any
//! other thread is spawned, so every thread inherits the mask and the signals
//! stay pending until the control plane reads them from a signalfd
//! ([`Signals`]), in the same event loop as probes and reloads.

use std::io;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// What a received signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// SIGHUP: read the configuration again.
    Reload,
    /// SIGTERM or SIGINT: stop.
    Stop(Signal),
}

fn handled() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT] {
        set.add(signal);
    }
    set
}

/// Blocks SIGHUP, SIGTERM and SIGINT in the calling thread; call it before
/// spawning any thread.
pub fn block() -> nix::Result<()> {
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&handled()), None)
}

/// The blocked signals as an async stream; needs a tokio runtime.
pub struct Signals(AsyncFd<SignalFd>);

impl Signals {
    pub fn open() -> io::Result<Signals> {
        let fd = SignalFd::with_flags(&handled(), SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        // SAFETY: the AsyncFd owns the SignalFd, whose descriptor stays open
        // and unchanged for the AsyncFd's whole life.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
        Ok(Signals(fd))
    }

    /// Waits for the next handled signal.
    pub async fn next(&self) -> io::Result<Request> {
        loop {
            let mut ready = self.0.readable().await?;
            match ready.get_inner().read_signal()? {
                Some(info) => match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGHUP) => return Ok(Request::Reload),
                    Ok(signal @ (Signal::SIGTERM | Signal::SIGINT)) => {
                        return Ok(Request::Stop(signal))
                    }
                    _ => continue,
                },
                None => ready.clear_ready(),
            }
        }
    }
}
