//! The io_uring driver: a worker that drives its own ring, completion by
//! completion, with no task, waker or heap allocation per I/O.
//!
//! Every operation's user data names what it was for ([`token`]): an
//! accept on listener `i`, or an operation of connection `i`, whose state
//! lives in a slab ([`slab`]). One `io_uring_enter` per loop turn submits
//! what the last turn queued and waits for the next completions (or the
//! earliest deadline); the clock is read once per turn, and that time is
//! what the connections' sessions are told.
//!
//! - Listeners ([`accept`]): a multishot accept each, single-shot near
//!   the descriptor capacity; at the capacity, new clients wait in the
//!   kernel's backlog.
//! - Connections ([`conn`]): each does what its
//!   [`Session`](crate::connection::session::Session) asks (admission,
//!   dialing, the rules of its ending); this driver only does the I/O. Its
//!   two directions ([`direction`], [`flow`]) move the bytes; a failed
//!   side's last bytes are delivered before the reset ([`flush`]).
//! - Timers ([`timers`]): PROXY-header deadlines and idle timeouts, one per
//!   connection; the loop's wait ends at the earliest. Connect timeouts are
//!   linked timeouts in the ring.
//! - Commands from the control plane wake the ring through an eventfd read.
//! - Should the kernel drop completions, [`lost`] recovers.

mod accept;
mod backlog;
mod buffers;
mod conn;
mod direction;
mod flow;
mod flush;
mod lost;
mod queue;
mod slab;
mod timers;
mod token;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use tracing::{debug, error};

use crate::connection::accepting::Pause;
use crate::connection::ending::Side;
use crate::mailbox::{BoundListener, Command, Inbox};
use crate::shared::Shared;
use accept::Listening;
use buffers::Buffers;
use conn::Conn;
use slab::Slab;
use timers::Timers;
use token::{Op, Token};

/// Submission queue entries; the completion queue has four times as many,
/// room for the bursts of multishot operations.
const RING_ENTRIES: u32 = 1024;

/// The provided buffers: how many, and how large. A multishot receive
/// takes one per completion; pages are resident only once used.
const BUFFER_COUNT: u16 = 256;
const BUFFER_SIZE: u32 = 16 * 1024;

/// While paused at the descriptor capacity, or backing off after an
/// accept error, the loop looks again this often.
const TICK: Duration = Duration::from_millis(50);

/// Whether io_uring can run a worker here: a ring can be set up with the
/// features the driver needs. The reason if not.
pub fn probe() -> Result<(), String> {
    let ring = new_ring().map_err(|e| format!("cannot set up a ring: {e}"))?;
    // Without it, a full completion queue drops completions silently.
    if !ring.params().is_feature_nodrop() {
        return Err("the kernel's io_uring may drop completions (no IORING_FEAT_NODROP)".into());
    }
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("cannot probe the ring's operations: {e}"))?;
    for (code, name) in [
        (opcode::AcceptMulti::CODE, "accept"),
        (opcode::RecvMulti::CODE, "recv"),
        (opcode::Send::CODE, "send"),
        (opcode::Connect::CODE, "connect"),
        (opcode::LinkTimeout::CODE, "link timeout"),
        (opcode::AsyncCancel2::CODE, "cancel"),
        (opcode::Close::CODE, "close"),
        (opcode::PollAdd::CODE, "poll"),
        (opcode::Socket::CODE, "socket"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("the kernel's io_uring lacks {name}"));
        }
    }
    // Dropped before the ring, which still has it registered: harmless
    // (the kernel holds the pages of a registered buffer ring).
    Buffers::new(&ring.submitter(), 1, 4096)
        .map_err(|e| format!("the kernel lacks provided-buffer rings: {e}"))?;
    Ok(())
}

/// Whether the kernel ends a multishot receive once it has received a
/// given total ([`flow::limit_total`], Linux 6.17): three bytes wait on a
/// socket, and a receive limited to two must end. Run before the worker
/// serves anything; the ring is left as it was found.
fn bounded_multishot_works(ring: &mut IoUring, buffers: &mut Buffers) -> bool {
    let Ok((mut writer, reader)) = std::os::unix::net::UnixStream::pair() else {
        return false;
    };
    if std::io::Write::write_all(&mut writer, b"abc").is_err() {
        return false;
    }
    let probe = Token::new(Op::Cleanup, u32::MAX, 0).0;
    let entry = opcode::RecvMulti::new(types::Fd(reader.as_raw_fd()), buffers::GROUP).build();
    let entry = flow::limit_total(entry, 2).user_data(probe);
    // SAFETY: the entry points at no memory of ours but the buffer ring.
    if unsafe { ring.submission().push(&entry) }.is_err() || ring.submit_and_wait(1).is_err() {
        return false;
    }
    let mut works = false;
    let mut armed = true;
    let mut cancelled = false;
    while armed {
        for cqe in ring.completion() {
            if let Some(id) = cqueue::buffer_select(cqe.flags()) {
                buffers.lend();
                buffers.give_back(id);
            }
            if cqe.user_data() != probe {
                continue;
            }
            if !cqueue::more(cqe.flags()) {
                armed = false;
                works = works || (cqe.result() > 0 && !cancelled);
            }
        }
        if armed && !cancelled {
            // Still armed after what waited: the limit is not honoured.
            cancelled = true;
            let cancel = opcode::AsyncCancel::new(probe).build().user_data(probe + 1);
            // SAFETY: no memory referred to.
            let _ = unsafe { ring.submission().push(&cancel) };
        }
        if armed && ring.submit_and_wait(1).is_err() {
            break;
        }
    }
    works
}

/// A ring for the calling thread alone. Its completions' work is deferred
/// until the thread waits on the ring (`DEFER_TASKRUN`), rather than
/// flagged as a pending signal (`COOP_TASKRUN`): TCP refuses to read at an
/// urgent byte's mark while a signal is pending, and a receive retried in
/// the ring's work then waits, with the bytes already there, for a wake-up
/// that never comes (seen by `tests/differential.rs`: about one connection
/// in a hundred with two urgent bytes in a row).
fn new_ring() -> io::Result<IoUring> {
    IoUring::builder()
        .setup_defer_taskrun()
        .setup_single_issuer()
        .setup_cqsize(4 * RING_ENTRIES)
        .build(RING_ENTRIES)
}

/// One worker thread's ring and everything it drives.
pub struct Worker {
    // `ring` before `buffers`: fields drop in order, and the ring, which
    // has the buffer ring registered, must go before its memory does.
    ring: IoUring,
    buffers: Buffers,
    listeners: Vec<Option<Listening>>,
    /// Tells a listener's accepts from those of an earlier one in its slot.
    listener_generation: u32,
    slab: Slab<Conn>,
    /// Deadlines of header waits and idle timeouts, one per connection at
    /// most.
    timers: Timers,
    /// Directions whose receive ran out of buffers: re-armed once some
    /// are back, oldest first. (Slot, generation, the side the bytes come
    /// from.)
    starved: VecDeque<(u32, u32, Side)>,
    /// Directions whose read past an urgent byte's mark was kept from it:
    /// tried again after a tick.
    marks: Vec<(u32, u32, Side)>,
    /// Accepted while at capacity: served once there is room.
    held: VecDeque<(OwnedFd, SocketAddr)>,
    /// Clients waiting in a pool's queue.
    waiting: queue::Waiters,
    /// Paused at the descriptor capacity.
    pause: Pause,
    inbox: Inbox,
    /// Where the eventfd read lands.
    wake: Box<u64>,
    /// Of the eventfd read armed: an earlier one, given up after lost
    /// completions, is told apart.
    wake_generation: u32,
    shared: &'static Shared,
    /// Completions reaped while a full submission queue waited for room,
    /// handled with those of the turn.
    reaped: Vec<(u64, i32, u32)>,
    /// The kernel said it dropped completions: recover once this turn's
    /// are handled.
    lost: bool,
    /// When this loop turn began: the time every step of the turn is told.
    now: Instant,
    /// The longest a listener's accept queue can be: the kernel's
    /// `somaxconn`, which caps every backlog.
    accept_queue: usize,
    /// The kernel can limit a multishot receive's total (Linux 6.17).
    bounded_multishot: bool,
    /// The kernel sets socket options in the ring (Linux 6.7); until one
    /// fails, backend sockets get theirs there.
    ring_socket_options: bool,
}

/// A worker's ring and its buffer ring, set up: what can fail before a
/// worker runs on io_uring.
pub struct Ring {
    // The ring first: see [`Worker`].
    ring: IoUring,
    buffers: Buffers,
    bounded_multishot: bool,
}

impl Ring {
    /// A ring with its buffers, or why io_uring cannot serve here.
    pub fn new() -> io::Result<Ring> {
        let mut ring = new_ring()?;
        let mut buffers = Buffers::new(&ring.submitter(), BUFFER_COUNT, BUFFER_SIZE)?;
        let bounded_multishot = bounded_multishot_works(&mut ring, &mut buffers);
        debug!(bounded_multishot, "io_uring worker ready");
        Ok(Ring {
            ring,
            buffers,
            bounded_multishot,
        })
    }
}

impl Worker {
    /// A worker on `ring`, commanded through `inbox`.
    pub fn new(ring: Ring, inbox: Inbox, shared: &'static Shared) -> Worker {
        let Ring {
            ring,
            buffers,
            bounded_multishot,
        } = ring;
        Worker {
            ring,
            buffers,
            listeners: Vec::new(),
            listener_generation: 0,
            slab: Slab::default(),
            timers: Timers::default(),
            starved: VecDeque::new(),
            marks: Vec::new(),
            held: VecDeque::new(),
            waiting: queue::Waiters::default(),
            pause: Pause::default(),
            inbox,
            wake: Box::new(0),
            wake_generation: 0,
            shared,
            reaped: Vec::new(),
            lost: false,
            now: Instant::now(),
            // The kernel queues one more than the backlog it allows.
            accept_queue: accept::somaxconn() + 1,
            bounded_multishot,
            ring_socket_options: true,
        }
    }

    /// Serves `listeners` and what the control plane sends; never returns.
    pub fn run(mut self, listeners: Vec<BoundListener>) -> ! {
        for listener in listeners {
            self.listen(listener);
        }
        self.arm_wake();
        let mut batch = Vec::with_capacity(4 * RING_ENTRIES as usize);
        loop {
            self.turn(&mut batch);
        }
    }

    /// One loop turn: submit and wait, handle what completed (in `batch`,
    /// reused), then what is due.
    fn turn(&mut self, batch: &mut Vec<(u64, i32, u32)>) {
        if let Err(e) = self.wait() {
            error!("io_uring wait failed: {e}");
            std::thread::sleep(TICK);
        }
        self.now = Instant::now();
        loop {
            batch.append(&mut self.reaped);
            batch.extend(
                self.ring
                    .completion()
                    .map(|cqe| (cqe.user_data(), cqe.result(), cqe.flags())),
            );
            if batch.is_empty() {
                break;
            }
            for (user_data, result, flags) in batch.drain(..) {
                self.complete(Token(user_data), result, flags);
            }
        }
        if std::mem::take(&mut self.lost) {
            self.completions_lost();
        }
        self.expire();
        if self.needs_tick() {
            self.tick(self.now);
        }
        self.bound_accepts();
        self.feed_starved();
        self.retry_marks();
        self.dispatch();
    }

    /// Submits what is queued and waits for a completion, or until the
    /// earliest deadline.
    fn wait(&mut self) -> io::Result<()> {
        let mut deadline = self.timers.next();
        if self.needs_tick() || !self.marks.is_empty() {
            let tick = Instant::now() + TICK;
            deadline = Some(deadline.map_or(tick, |d| d.min(tick)));
        }
        if let Some(at) = self.waiting.next_try() {
            deadline = Some(deadline.map_or(at, |d| d.min(at)));
        }
        let submitter = self.ring.submitter();
        let waited = match deadline {
            None => submitter.submit_and_wait(1),
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                let timespec = types::Timespec::from(left);
                let args = types::SubmitArgs::new().timespec(&timespec);
                submitter.submit_with_args(1, &args)
            }
        };
        match waited {
            Ok(_) => Ok(()),
            Err(e) => match e.raw_os_error() {
                // The deadline came, a signal, or completions to reap
                // first.
                Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN) => Ok(()),
                Some(libc::EBADR) => {
                    self.lost = true;
                    Ok(())
                }
                _ => Err(e),
            },
        }
    }

    /// Queues `entry`, submitting what is queued first if the queue is
    /// full.
    fn push(&mut self, entry: squeue::Entry) {
        // SAFETY: what an entry points to outlives its use by the kernel:
        // a connection's connect address and buffers to send stay in its
        // slot (on the heap) until the last completion of its operations,
        // the provided buffers and the wake word live as long as the
        // worker, and a timespec is read when the entry is submitted.
        while unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.submit_for_room();
        }
    }

    /// Queues `first` and `then`, linked: in one submission, or the kernel
    /// would end the link between them.
    fn push_linked(&mut self, first: squeue::Entry, then: squeue::Entry) {
        let pair = [first.flags(squeue::Flags::IO_LINK), then];
        // SAFETY: as in `push`.
        while unsafe { self.ring.submission().push_multiple(&pair) }.is_err() {
            self.submit_for_room();
        }
    }

    /// Submits what is queued, to make room in the submission queue; the
    /// completions the kernel needs reaped first are kept for this turn.
    fn submit_for_room(&mut self) {
        let Err(e) = self.ring.submit() else {
            return;
        };
        match e.raw_os_error() {
            Some(libc::EBUSY) => {
                let reaped = self
                    .ring
                    .completion()
                    .map(|cqe| (cqe.user_data(), cqe.result(), cqe.flags()));
                self.reaped.extend(reaped);
            }
            Some(libc::EAGAIN | libc::EINTR) => {}
            Some(libc::EBADR) => self.lost = true,
            _ => error!("cannot submit to io_uring: {e}"),
        }
    }

    fn complete(&mut self, token: Token, result: i32, flags: u32) {
        match token.op() {
            (Op::Accept, _) => self.accepted(token, result, flags),
            (Op::Wake, _) => self.woken(token.generation()),
            _ => self.conn_completed(token, result, flags),
        }
    }

    fn arm_wake(&mut self) {
        let entry = opcode::Read::new(
            types::Fd(self.inbox.fd()),
            (&mut *self.wake as *mut u64).cast(),
            8,
        )
        .build()
        .user_data(Token::new(Op::Wake, 0, self.wake_generation).0);
        self.push(entry);
    }

    /// The control plane wrote to the eventfd: carry out its commands,
    /// and read again, unless this read was given up (after lost
    /// completions: another is armed).
    fn woken(&mut self, generation: u32) {
        while let Some(command) = self.inbox.take() {
            match command {
                Command::Listen(listener) => self.listen(listener),
                Command::CloseAll => self.close_all(|| crate::connection::ending::Ending::Shutdown),
                Command::CloseBackends(backends) => self.close_backends(&backends),
                Command::Dispatch => self.waiting.wake(),
            }
        }
        if generation == self.wake_generation {
            self.arm_wake();
        }
    }

    /// Deadlines that have come: a header that never came, an idle
    /// connection, a sweep due.
    fn expire(&mut self) {
        while let Some(index) = self.timers.pop_due(self.now) {
            if let Some(conn) = self.slab.live(index) {
                conn.timer = None;
            }
            self.deadline(index);
        }
    }

    /// Sets (or with `None` removes) the deadline of connection `index`.
    fn set_timer(&mut self, index: u32, when: Option<Instant>) {
        if let Some(conn) = self.slab.live(index) {
            self.timers.set(index, conn.timer, when);
            conn.timer = when;
        }
    }
}

/// Closes `fd` through the ring (one system call fewer per connection).
fn close_entry(fd: RawFd) -> squeue::Entry {
    opcode::Close::new(types::Fd(fd))
        .build()
        .user_data(Token::new(Op::Cleanup, u32::MAX, 0).0)
}

/// A live connection's descriptor, for one question about it (no
/// ownership, no lifetime claimed).
pub struct Raw(pub RawFd);

impl AsRawFd for Raw {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

pub fn error_of(result: i32) -> io::Error {
    io::Error::from_raw_os_error(-result)
}
