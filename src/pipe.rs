//! Pipes for `splice(2)`: the zero-copy engine moves a connection's bytes
//! from one socket into a pipe and from the pipe into the other, so they
//! never enter userspace.
//!
//! Each worker keeps a pool of empty pipes and lends one to a direction
//! only while it holds bytes, so an idle connection holds none. A worker
//! has at most its share of the descriptor budget in pipes
//! ([`keep_pipes`]); beyond it, connections copy instead.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr;

use tracing::warn;

use crate::logging::Throttle;
use crate::net;

/// What one splice into a pipe asks for: the pipe's default capacity
/// (16 pages).
pub const PIPE_CAPACITY: usize = 64 * 1024;

thread_local! {
    /// Empty pipes ready for the next splice.
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    /// Pipes this worker may have, pooled or lent to a connection: its
    /// share of the descriptor budget. Beyond it, connections copy.
    static PIPE_BUDGET: Cell<usize> = const { Cell::new(0) };
    /// Pipes this worker has now.
    static PIPES_OPEN: Cell<usize> = const { Cell::new(0) };
}

/// Pipes could not be made (out of descriptors); logged at most once a
/// second, while the copy engine stands in.
static NO_PIPE: Throttle = Throttle::new();

/// Sets how many pipes the calling worker may have; called once, as it
/// starts.
pub fn keep_pipes(budget: usize) {
    PIPE_BUDGET.with(|b| b.set(budget));
}

/// A pipe for splicing, both ends non-blocking.
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

impl Pipe {
    /// An empty pipe from the worker's pool, or a new one if the worker's
    /// budget allows; `None` means copy instead.
    pub fn take() -> Option<Pipe> {
        if let Some(pipe) = PIPES.with(|pipes| pipes.borrow_mut().pop()) {
            return Some(pipe);
        }
        if PIPES_OPEN.with(Cell::get) >= PIPE_BUDGET.with(Cell::get) {
            return None;
        }
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        let made = net::syscall(unsafe {
            libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC)
        } as isize);
        if let Err(e) = made {
            if let Some(suppressed) = NO_PIPE.allow() {
                warn!(
                    suppressed,
                    "cannot make a pipe to splice, copying instead: {e}"
                );
            }
            return None;
        }
        PIPES_OPEN.with(|open| open.set(open.get() + 1));
        // SAFETY: pipe2 succeeded, so both descriptors are open and ours.
        Some(unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        })
    }

    /// Returns an empty pipe to the pool. A pipe that still holds bytes is
    /// never returned (they would reach another connection): it is dropped
    /// with its connection. The pool never outgrows the budget, since every
    /// pipe in it counts in the budget.
    pub fn give_back(self) {
        PIPES.with(|pipes| pipes.borrow_mut().push(self));
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        PIPES_OPEN.with(|open| open.set(open.get() - 1));
    }
}

/// Moves up to `len` bytes from `from` to `to`, one of which is a pipe,
/// without blocking. A socket whose peer is gone answers EPIPE; SIGPIPE is
/// ignored by every Rust program.
pub fn splice(from: &impl AsRawFd, to: &impl AsRawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain descriptors and null offsets (neither end is a file).
    net::syscall(unsafe {
        libc::splice(
            from.as_raw_fd(),
            ptr::null_mut(),
            to.as_raw_fd(),
            ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    })
}
