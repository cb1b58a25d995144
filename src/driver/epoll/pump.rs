//! Moving bytes one way, from the socket that sends them to the socket that
//! takes them, with one of two engines:
//!
//! - **splice**: `splice(2)` from the source socket into a pipe and from the
//!   pipe into the destination. The bytes never enter userspace; the pages
//!   the kernel received are handed on as they are.
//! - **copy**: `read(2)` into the worker's scratch buffer, `write(2)` out.
//!
//! Which one a direction uses, and when `auto` switches, is
//! [`EngineChoice`]'s rule, shared with the io_uring driver.
//!
//! Both engines wait for readiness (epoll, through tokio's `AsyncFd`) and
//! then move what is there with plain non-blocking calls. Nothing is held
//! while a connection is idle: the scratch buffer belongs to the worker and
//! is only used between a read and its write, and pipes are taken from a
//! per-worker pool for as long as they hold bytes. A worker has at most its
//! share of the descriptor budget in pipes ([`keep_pipes`]); beyond, a
//! connection copies. Only a destination that cannot take everything at
//! once makes a connection keep bytes (the rest of a read, or the pipe with
//! them) until it can.
//!
//! This is the fallback's way; where io_uring can be used, its driver
//! receives into a ring of provided buffers instead
//! ([`crate::driver::uring`]), with about one system call per loop turn
//! for all connections.

use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;
use std::task::{ready, Context, Poll};

use tokio::io::Ready;

use crate::config::Engine;
use crate::connection::relaying::EngineChoice;
use crate::net::{self, Socket};
use crate::pipe::{splice, splice_in, Pipe, Spliced};

use crate::connection::ending::Side;

/// What the copy engine reads at once. A read that fills it is what makes
/// `auto` switch to splice.
const SCRATCH_SIZE: usize = 64 * 1024;

thread_local! {
    /// Where the copy engine puts bytes between a read and its write.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_SIZE].into_boxed_slice());
}

/// What ended a relay early, and which peer it came from.
pub struct Failure {
    pub side: Side,
    pub error: io::Error,
}

impl Failure {
    pub fn new(side: Side, error: io::Error) -> Failure {
        Failure { side, error }
    }
}

/// Bytes that the destination has not taken yet.
enum Pending {
    /// The end of a read the destination could not take.
    Bytes { bytes: Vec<u8>, written: usize },
    /// A pipe with `len` bytes still in it.
    Pipe { pipe: Pipe, len: usize },
}

/// What one attempt to read from the source came to.
enum Step {
    /// Nothing to read after all.
    WouldBlock,
    /// The source sent FIN.
    End,
    /// Splicing is stuck at an urgent byte's mark: copy the next read.
    /// `then`: the source failed after the bytes that wait.
    UrgentMark { then: Option<io::Error> },
    /// `n` bytes came in; `pending` is what the destination did not take
    /// yet; `drained`: the source has nothing more to read now.
    Moved {
        n: usize,
        pending: Option<Pending>,
        drained: bool,
    },
}

/// One direction of a connection, `from` → `to`: how it relays and what it
/// holds. Driven by [`Direction::poll`]; a connection polls its two from
/// one task, so an idle connection is two of these (a few words each) and
/// nothing else.
pub struct Direction {
    from_side: Side,
    engine: EngineChoice,
    /// Bytes the destination has not taken yet, and how many were read.
    /// Boxed: rarely there, and this way it costs an idle connection one
    /// word instead of six.
    pending: Option<Box<(Pending, usize)>>,
    /// The source failed with this after the bytes its socket still holds:
    /// its end of stream is this failure (see
    /// [`Spliced::UrgentMark`](crate::pipe::Spliced)).
    failed: Option<io::Error>,
}

impl Direction {
    /// The direction whose bytes come from `from_side`.
    pub fn new(from_side: Side, engine: Engine) -> Direction {
        Direction {
            from_side,
            engine: EngineChoice::new(engine),
            pending: None,
            failed: None,
        }
    }

    /// The peer whose bytes this direction carries.
    pub fn sender(&self) -> Side {
        self.from_side
    }

    /// Whether bytes are waiting for the destination to take them.
    pub fn holding(&self) -> bool {
        self.pending.is_some()
    }

    /// Relays what there is to relay now, until `from` sends FIN and `to`
    /// has taken every byte before it: then it is ready (and not polled
    /// again), and the FIN is the caller's to pass on. `moved` is told of
    /// the bytes `to` took.
    pub fn poll(
        &mut self,
        cx: &mut Context,
        from: &Socket,
        to: &Socket,
        mut moved: impl FnMut(usize),
    ) -> Poll<Result<(), Failure>> {
        let ends = Ends {
            from,
            to,
            from_side: self.from_side,
        };
        loop {
            if self.pending.is_some() {
                ready!(self.poll_flush(cx, to, &mut moved)).map_err(|e| ends.destination(e))?;
            }
            let mut ready = ready!(from.poll_read_ready(cx)).map_err(|e| ends.source(e))?;
            let pipe = if self.engine.splicing() {
                Pipe::take().or_else(|| {
                    self.engine.copy_for_now();
                    None
                })
            } else {
                None
            };
            let splicing = pipe.is_some();
            let step = match pipe {
                Some(pipe) => ends.splice_in(pipe)?,
                None => ends.copy_in()?,
            };
            match step {
                Step::WouldBlock => ready.clear_ready_matching(Ready::READABLE),
                // Readiness is kept: the copy that follows reads at once.
                Step::UrgentMark { then } => {
                    self.engine.copy_for_now();
                    if then.is_some() {
                        self.failed = then;
                    }
                }
                // Nothing is pending here: all before the FIN (or the
                // failure) was taken.
                Step::End => {
                    return Poll::Ready(match self.failed.take() {
                        Some(error) => Err(ends.source(error)),
                        None => Ok(()),
                    })
                }
                Step::Moved {
                    n,
                    pending,
                    drained,
                } => {
                    // The socket is empty: wait for the next edge rather
                    // than pay for a call that would say EAGAIN.
                    if drained {
                        ready.clear_ready_matching(Ready::READABLE);
                    }
                    if splicing {
                        self.engine.spliced(n);
                    } else {
                        self.engine.copied(n, SCRATCH_SIZE);
                    }
                    match pending {
                        Some(unsent) => self.pending = Some(Box::new((unsent, n))),
                        None => moved(n),
                    }
                }
            }
        }
    }
}

impl Direction {
    /// Writes what the destination has not taken yet, until nothing is
    /// left (ready) or it takes no more for now (pending); `moved` is told
    /// of the bytes it took.
    pub fn poll_flush(
        &mut self,
        cx: &mut Context,
        to: &Socket,
        mut moved: impl FnMut(usize),
    ) -> Poll<io::Result<()>> {
        while let Some(held) = &mut self.pending {
            let (unsent, n) = &mut **held;
            let mut ready = ready!(to.poll_write_ready(cx))?;
            match ready.try_io(|_| unsent.write_to(to)) {
                Ok(Ok(())) => {
                    moved(*n);
                    if let Some(held) = self.pending.take() {
                        held.0.done();
                    }
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The two sockets of one direction, and which peer sends.
struct Ends<'a> {
    from: &'a Socket,
    to: &'a Socket,
    from_side: Side,
}

impl Ends<'_> {
    fn source(&self, error: io::Error) -> Failure {
        Failure::new(self.from_side, error)
    }

    fn destination(&self, error: io::Error) -> Failure {
        Failure::new(self.from_side.other(), error)
    }

    /// Reads into the scratch buffer and writes what came in straight on.
    fn copy_in(&self) -> Result<Step, Failure> {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let (n, left) = match net::recv_and_left(self.from, &mut scratch[..]) {
                Ok((0, _)) => return Ok(Step::End),
                Ok(read) => read,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::WouldBlock),
                Err(e) => return Err(self.source(e)),
            };
            // What the kernel says waits, or else: a short read emptied
            // the socket. (Not always: TCP stops a read at an urgent byte's
            // mark, with bytes after it; hence TCP_INQ.)
            let drained = left.map_or(n < SCRATCH_SIZE, |left| left == 0);
            let mut written = 0;
            while written < n {
                match send(self.to, &scratch[written..n]) {
                    Ok(w) => written += w,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        let bytes = scratch[written..n].to_vec();
                        let pending = Some(Pending::Bytes { bytes, written: 0 });
                        return Ok(Step::Moved {
                            n,
                            pending,
                            drained,
                        });
                    }
                    Err(e) => return Err(self.destination(e)),
                }
            }
            Ok(Step::Moved {
                n,
                pending: None,
                drained,
            })
        })
    }

    /// Splices what the source has into `pipe`, and on from the pipe as far
    /// as the destination takes it; a pipe still holding bytes is pending.
    fn splice_in(&self, pipe: Pipe) -> Result<Step, Failure> {
        let stuck = match splice_in(self.from, &pipe) {
            Ok(Spliced::Moved(n)) => {
                return self.splice_out(Pending::Pipe { pipe, len: n }, n);
            }
            Ok(Spliced::Drained) => Step::WouldBlock,
            Ok(Spliced::End) => Step::End,
            Ok(Spliced::UrgentMark { then }) => Step::UrgentMark { then },
            Err(e) => {
                pipe.give_back();
                return Err(self.source(e));
            }
        };
        pipe.give_back();
        Ok(stuck)
    }

    /// Moves the `n` bytes a splice put in a pipe on to the destination,
    /// as far as it takes them; a pipe still holding bytes is pending.
    fn splice_out(&self, mut pending: Pending, n: usize) -> Result<Step, Failure> {
        match pending.write_to(self.to) {
            Ok(()) => {
                pending.done();
                // (A short splice stops at the pipe's slots, one per
                // packet, with more in the socket.)
                Ok(Step::Moved {
                    n,
                    pending: None,
                    drained: false,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Step::Moved {
                n,
                pending: Some(pending),
                drained: false,
            }),
            Err(e) => Err(self.destination(e)),
        }
    }
}

impl Pending {
    /// Writes to `to` all it takes now: `Ok` once nothing is left,
    /// `WouldBlock` while something is.
    fn write_to(&mut self, to: &Socket) -> io::Result<()> {
        match self {
            Pending::Bytes { bytes, written } => {
                while *written < bytes.len() {
                    *written += send(to, &bytes[*written..])?;
                }
            }
            Pending::Pipe { pipe, len } => {
                while *len > 0 {
                    match splice(&pipe.read, to, *len)? {
                        // Cannot happen with bytes in the pipe; never spin.
                        0 => return Err(io::ErrorKind::WriteZero.into()),
                        out => *len -= out,
                    }
                }
            }
        }
        Ok(())
    }

    /// Puts what a finished write held back where it is reused.
    fn done(self) {
        if let Pending::Pipe { pipe, .. } = self {
            pipe.give_back();
        }
    }
}

fn send(to: &impl AsRawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of its length.
    net::syscall(unsafe {
        libc::send(
            to.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    })
}
