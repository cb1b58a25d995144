//! Signal handling: the main thread waits for signals synchronously while
//! the workers run; no async signal handler runs anywhere.
//!
//! [`Signals::block`] blocks the handled signals in the calling thread before
//! any worker is spawned, so every thread inherits the mask and the signals
//! stay pending until [`Signals::wait`] takes them.

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

pub struct Signals(SigSet);

/// What a received signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// SIGHUP: read the configuration again.
    Reload,
    /// SIGTERM or SIGINT: stop.
    Stop(Signal),
}

impl Signals {
    pub fn block() -> nix::Result<Signals> {
        let mut set = SigSet::empty();
        for signal in [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT] {
            set.add(signal);
        }
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
        Ok(Signals(set))
    }

    /// Blocks until one of the handled signals arrives.
    pub fn wait(&self) -> nix::Result<Request> {
        loop {
            match self.0.wait()? {
                Signal::SIGHUP => return Ok(Request::Reload),
                signal @ (Signal::SIGTERM | Signal::SIGINT) => return Ok(Request::Stop(signal)),
                _ => continue,
            }
        }
    }
}
