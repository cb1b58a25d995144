//! The rules of a connection once its backend is connected, whichever
//! driver moves the bytes:
//!
//! - **Half-close** ([`Halves`]): when one side sends FIN, and everything
//!   it sent before has reached the other side, the other side's socket
//!   gets `shutdown(Write)` and the opposite direction keeps flowing until
//!   its own FIN. The second FIN needs no shutdown: both sockets were read
//!   to their end, so closing them sends FIN, and the connection is over.
//!   (Errors and resets end both directions at once; [`classify`](super::ending::classify)
//!   says so.)
//! - **The engine of a direction** ([`EngineChoice`]): under `auto`, a read
//!   that fills the whole buffer means the sender is ahead of us (bulk),
//!   and from then on splicing saves a copy of every byte; a splice that
//!   moves less than [`SMALL`] goes back to copying, which costs less per
//!   message than a trip through a pipe. When the worker has no pipe to
//!   spare, or splice(2) is stuck at a TCP urgent byte's mark, a direction
//!   copies instead, for the time being.

use std::io;
use std::os::fd::AsRawFd;

use super::ending::Side;
use crate::config::Engine;
use crate::net;

/// Under `auto`, a splice that moves less than this goes back to copying.
pub const SMALL: usize = 16 * 1024;

/// Which of a connection's two directions have passed their FIN on, and
/// which did first (the log's `close=client FIN`).
#[derive(Debug, Default)]
pub struct Halves {
    /// Indexed by the side that sent the FIN.
    passed: [bool; 2],
    first_fin: Option<Side>,
}

/// What a driver does with a FIN once every byte before it has reached
/// the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassFin {
    /// Shut down the destination's writing side ([`shutdown_write`]); the
    /// other direction goes on.
    Shutdown,
    /// It was the second: the connection is over (`first_fin` sent its FIN
    /// first). Closing both sockets passes this FIN on.
    Close { first_fin: Side },
}

impl Halves {
    /// Whether the FIN of `from` was passed on already.
    pub fn passed(&self, from: Side) -> bool {
        self.passed[from as usize]
    }

    /// `from` sent FIN and every byte before it reached the other side.
    pub fn fin(&mut self, from: Side) -> PassFin {
        debug_assert!(!self.passed(from), "one FIN per side");
        self.passed[from as usize] = true;
        let first_fin = *self.first_fin.get_or_insert(from);
        if self.passed.iter().all(|&passed| passed) {
            PassFin::Close { first_fin }
        } else {
            PassFin::Shutdown
        }
    }
}

/// Passes a FIN on to `to`. A peer that is gone already (ENOTCONN) is not
/// an error here: the other direction will notice it.
pub fn shutdown_write(to: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: a plain call on a descriptor the caller holds.
    match net::syscall(unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) } as isize) {
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
        _ => Ok(()),
    }
}

/// How one direction moves its bytes now: copying through userspace or
/// splicing through a pipe.
#[derive(Debug, Clone, Copy)]
pub struct EngineChoice {
    engine: Engine,
    splicing: bool,
}

impl Default for EngineChoice {
    /// Copying: what a connection does before it relays (a PROXY header
    /// is read, never spliced).
    fn default() -> EngineChoice {
        EngineChoice::new(Engine::Copy)
    }
}

impl EngineChoice {
    pub fn new(engine: Engine) -> EngineChoice {
        EngineChoice {
            engine,
            splicing: engine == Engine::Splice,
        }
    }

    pub fn splicing(&self) -> bool {
        self.splicing
    }

    /// A copy took `n` bytes into a buffer of `size`: a full buffer turns
    /// `auto` to splicing, and `splice` goes back to splicing after the
    /// one copy [`EngineChoice::copy_for_now`] made. Returns whether it
    /// switched.
    pub fn copied(&mut self, n: usize, size: usize) -> bool {
        let switch = !self.splicing
            && match self.engine {
                Engine::Copy => false,
                Engine::Splice => true,
                Engine::Auto => n >= size,
            };
        self.splicing |= switch;
        switch
    }

    /// A splice moved `n` bytes: a small one turns `auto` back to copying.
    pub fn spliced(&mut self, n: usize) {
        if self.engine == Engine::Auto && n < SMALL {
            self.splicing = false;
        }
    }

    /// The direction cannot splice now: the worker has no pipe to spare,
    /// or the source's next byte is urgent data, at whose mark splice(2)
    /// stops. Copy, until the next full read under `auto`, for one read
    /// under `splice`.
    pub fn copy_for_now(&mut self) {
        self.splicing = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_fin_is_passed_on_and_the_second_closes() {
        for first in [Side::Client, Side::Backend] {
            let mut halves = Halves::default();
            assert_eq!(halves.fin(first), PassFin::Shutdown);
            assert!(halves.passed(first) && !halves.passed(first.other()));
            assert_eq!(
                halves.fin(first.other()),
                PassFin::Close { first_fin: first },
                "the second FIN ends the connection"
            );
        }
    }

    #[test]
    fn auto_splices_bulk_and_copies_small_messages() {
        let mut choice = EngineChoice::new(Engine::Auto);
        assert!(!choice.splicing());
        assert!(!choice.copied(100, 16384));
        assert!(choice.copied(16384, 16384) && choice.splicing());
        choice.spliced(65536);
        assert!(choice.splicing());
        choice.spliced(SMALL - 1);
        assert!(!choice.splicing());
    }

    #[test]
    fn copy_never_splices_and_splice_tries_again_after_a_pipe_shortage() {
        let mut copy = EngineChoice::new(Engine::Copy);
        assert!(!copy.copied(16384, 16384) && !copy.splicing());

        let mut splice = EngineChoice::new(Engine::Splice);
        assert!(splice.splicing());
        splice.spliced(1);
        assert!(splice.splicing(), "splice stays on small messages");
        splice.copy_for_now();
        assert!(!splice.splicing());
        assert!(splice.copied(10, 16384) && splice.splicing());
        let mut auto = EngineChoice::new(Engine::Auto);
        auto.copied(16384, 16384);
        auto.copy_for_now();
        assert!(!auto.copied(10, 16384), "auto copies small messages");
    }
}
