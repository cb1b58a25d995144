//! Pipes for `splice(2)`: the zero-copy engine moves a connection's bytes
//! from one socket into a pipe and from the pipe into the other, so they
//! never enter userspace.
//!
//! Each worker keeps a pool of empty pipes and lends one to a direction
//! only while it holds bytes, so an idle connection holds none. A worker
//! has at most its share of the descriptor budget in pipes
//! ([`keep_pipes`]); beyond it, connections copy instead.
//!
//! A new pipe is grown from 64 KiB to [`LARGE_CAPACITY`]: a quarter of
//! the splice calls per byte of bulk (about 20% less CPU per GB through
//! sluice, `benches/RESULTS.md`). The kernel counts pipe pages per user and
//! gives an unprivileged user who has more than `fs.pipe-user-pages-soft`
//! (64 MiB by default) only tiny new pipes, so a pipe is grown only while
//! sluice's pipes, grown or not, take at most half of that allowance, and
//! none is made beyond it (connections copy instead). A pipe says what it
//! holds ([`Pipe::capacity`], asked of the kernel).

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use tracing::warn;

use crate::logging::Throttle;
use crate::net;

/// What a pipe holds unless grown: the kernel's default (16 pages), and
/// what is assumed if the kernel will not say.
const DEFAULT_CAPACITY: usize = 64 * 1024;

/// What a pipe is grown to, while the allowance lasts.
const LARGE_CAPACITY: usize = 256 * 1024;

/// Pages of every pipe sluice has open, all workers together: what the
/// kernel counts against the user's allowance (other processes of the
/// same user count too, and are not seen here).
static PIPE_PAGES: AtomicUsize = AtomicUsize::new(0);

const PAGE: usize = 4096;

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
    /// What it holds: what one splice into it asks for.
    pub capacity: usize,
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
        // Beyond the allowance the kernel would make a tiny pipe, which
        // splices worse than copying.
        if PIPE_PAGES.load(Ordering::Relaxed) + DEFAULT_CAPACITY / PAGE > allowance() {
            if let Some(suppressed) = NO_PIPE.allow() {
                warn!(
                    suppressed,
                    "the pipes of sluice's user fill fs.pipe-user-pages-soft: copying instead of splicing"
                );
            }
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
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let capacity = grow(&write);
        Some(Pipe {
            read,
            write,
            capacity,
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
        PIPE_PAGES.fetch_sub(self.capacity / PAGE, Ordering::Relaxed);
    }
}

/// Grows a new pipe to [`LARGE_CAPACITY`] if sluice's pipes leave room for
/// it in half the allowance: what it holds now, as the kernel says.
fn grow(write: &OwnedFd) -> usize {
    let limit = pages_allowed();
    let large = LARGE_CAPACITY / PAGE;
    let grown = PIPE_PAGES
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |pages| {
            (pages + large <= limit).then_some(pages + large)
        })
        .is_ok();
    // SAFETY: F_SETPIPE_SZ and F_GETPIPE_SZ on a pipe we own; growing fails
    // cleanly (EPERM) when the kernel's allowance is used up after all.
    let capacity = unsafe {
        if grown {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                LARGE_CAPACITY as libc::c_int,
            );
        }
        libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ)
    };
    let capacity = usize::try_from(capacity).unwrap_or(DEFAULT_CAPACITY);
    // Count what it holds instead of what was asked for.
    if grown {
        PIPE_PAGES.fetch_sub(large, Ordering::Relaxed);
    }
    PIPE_PAGES.fetch_add(capacity / PAGE, Ordering::Relaxed);
    capacity
}

static ALLOWANCE: OnceLock<usize> = OnceLock::new();

/// The pages of pipes the kernel lets sluice's user have before it makes
/// new pipes tiny (2 pages): `fs.pipe-user-pages-soft`; no limit where that
/// is 0 or sluice holds CAP_SYS_RESOURCE or CAP_SYS_ADMIN, which the kernel
/// exempts.
fn allowance() -> usize {
    *ALLOWANCE.get_or_init(|| {
        let soft_pages: usize = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(16384);
        if soft_pages == 0 || exempt() {
            usize::MAX
        } else {
            soft_pages
        }
    })
}

/// Whether sluice holds a capability that exempts it from the pipe
/// allowance.
fn exempt() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_SYS_RESOURCE: u32 = 24;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    effective & (1 << CAP_SYS_ADMIN | 1 << CAP_SYS_RESOURCE) != 0
}

/// Pages sluice's pipes may take before it stops growing them: half the
/// allowance.
fn pages_allowed() -> usize {
    allowance() / 2
}

/// What a splice from a socket into a pipe came to.
#[derive(Debug)]
pub enum Spliced {
    /// This many bytes are in the pipe now.
    Moved(usize),
    /// The socket has nothing to read now.
    Drained,
    /// The peer sent FIN and every byte before it was read.
    End,
    /// The next byte is TCP urgent data (`MSG_OOB`, read inline): splice
    /// stops at its mark and moves nothing, though the socket polls
    /// readable (and, after a FIN, returns 0 as if at the end). One read
    /// with `recv(2)` steps past the mark; splicing works again after it.
    ///
    /// `then`: splice reported that the socket failed (a reset, most
    /// often) while bytes before the failure still wait behind the mark.
    /// It reports a failure once, so the reads that take those bytes end
    /// with what looks like a clean end of stream: that end is this error.
    UrgentMark { then: Option<io::Error> },
}

/// Splices what the socket `from` has into `pipe`. Only when it moves
/// nothing is the socket asked whether bytes wait (`FIONREAD`): that tells
/// an urgent byte's mark from an empty socket, its end, or its failure.
pub fn splice_in(from: &impl AsRawFd, pipe: &Pipe) -> io::Result<Spliced> {
    let (stuck, failed) = match splice(from, &pipe.write, pipe.capacity) {
        Ok(0) => (Spliced::End, None),
        Ok(n) => return Ok(Spliced::Moved(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => (Spliced::Drained, None),
        Err(e) => (Spliced::End, Some(e)),
    };
    match (net::queued(from), failed) {
        (Ok(waiting), then) if waiting > 0 => Ok(Spliced::UrgentMark { then }),
        (_, Some(e)) => Err(e),
        (Err(e), None) => Err(e),
        (Ok(_), None) => Ok(stuck),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipe_says_what_it_holds_and_its_pages_are_counted() {
        keep_pipes(4);
        let before = PIPE_PAGES.load(Ordering::Relaxed);
        let pipe = Pipe::take().expect("a pipe within the budget");
        // SAFETY: F_GETPIPE_SZ on a pipe we own.
        let size = unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        assert_eq!(size as usize, pipe.capacity);
        assert!(
            pipe.capacity == LARGE_CAPACITY || before + LARGE_CAPACITY / PAGE > pages_allowed()
        );
        assert_eq!(
            PIPE_PAGES.load(Ordering::Relaxed),
            before + pipe.capacity / PAGE
        );
        drop(pipe);
        assert_eq!(PIPE_PAGES.load(Ordering::Relaxed), before);
    }
}
