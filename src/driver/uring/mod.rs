//! The io_uring driver: a worker that drives its own ring, completion by
//! completion, with no task, waker or heap allocation per I/O.
//!
//! Every operation's user data names what it was for ([`Token`]): an
//! accept on listener `i`, or an operation of connection `i`, whose state
//! lives in a slab. One `io_uring_enter` per loop turn submits what the
//! last turn queued and waits for the next completions (or the earliest
//! deadline).
//!
//! - Listeners ([`accept`]): a multishot accept each, single-shot near
//!   the descriptor capacity; at the capacity, new clients wait in the
//!   kernel's backlog.
//! - Connections ([`conn`]): each does what its
//!   [`Session`](crate::connection::session::Session) asks (admission,
//!   dialing, the rules of its ending); this driver only does the I/O.
//! - Timers: PROXY-header deadlines and idle timeouts sit in a heap; the
//!   loop's wait ends at the earliest. Connect timeouts are linked
//!   timeouts in the ring.
//! - Commands from the control plane wake the ring through an eventfd read.
//!
//! A connection's slot is freed only once every operation on it has
//! posted its last completion: closing a socket does not cancel what is
//! armed on it, and user data must never point at a reused slot.

mod accept;
mod backlog;
mod buffers;
mod conn;
mod flow;
mod flush;
mod state;
mod timers;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use tracing::{debug, error};

use crate::connection::accepting::Pause;
use crate::mailbox::{BoundListener, Command, Inbox};
use crate::shared::Shared;
use accept::Listening;
use buffers::Buffers;
use state::Conn;
use timers::Timers;

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

/// What an operation was for: the low byte of its user data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Accept = 1,
    Wake,
    /// A close or a cancel: only its connection's count of pending
    /// operations cares.
    Cleanup,
    /// A backend socket made in the ring.
    Socket,
    Connect,
    ConnectTimeout,
    /// One of the [`relay_options`](crate::net::relay_options) on a new
    /// backend socket (`SOCKET_URING_OP_SETSOCKOPT`).
    SocketOption,
    /// Flow operations: `Flow + 2 * kind + flow`, see [`FlowOp`].
    Flow,
}

/// Every [`Op`] but the flow operations.
const PLAIN_OPS: [Op; 7] = [
    Op::Accept,
    Op::Wake,
    Op::Cleanup,
    Op::Socket,
    Op::Connect,
    Op::ConnectTimeout,
    Op::SocketOption,
];

/// The operations of one direction of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FlowOp {
    /// A receive from the source: multishot, or one buffer at a time
    /// where the kernel cannot bound a multishot one.
    Recv,
    /// A send to the destination.
    Send,
    /// Readiness of the source to read (the splice engine).
    Readable,
    /// Readiness of the destination to write (the splice engine).
    Writable,
}

/// User data: the operation, the slot of its listener or connection, and
/// the slot's generation (a guard against a completion for a freed slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Token(u64);

impl Token {
    fn new(op: Op, index: u32, generation: u32) -> Token {
        Token(u64::from(generation & 0xff_ffff) << 40 | u64::from(index) << 8 | op as u64)
    }

    fn flow(op: FlowOp, flow: usize, index: u32, generation: u32) -> Token {
        let code = Op::Flow as u64 + 2 * op as u64 + flow as u64;
        Token(u64::from(generation & 0xff_ffff) << 40 | u64::from(index) << 8 | code)
    }

    fn index(self) -> u32 {
        (self.0 >> 8) as u32
    }

    fn generation(self) -> u32 {
        (self.0 >> 40) as u32
    }

    /// The operation, and for a flow operation its kind and direction.
    fn op(self) -> (Op, Option<(FlowOp, usize)>) {
        let code = (self.0 & 0xff) as u8;
        if let Some(&op) = PLAIN_OPS.iter().find(|&&op| op as u8 == code) {
            return (op, None);
        }
        let rest = code - Op::Flow as u8;
        let kind = [
            FlowOp::Recv,
            FlowOp::Send,
            FlowOp::Readable,
            FlowOp::Writable,
        ][usize::from(rest / 2)];
        (Op::Flow, Some((kind, usize::from(rest % 2))))
    }
}

/// Whether io_uring can run a worker here: a ring can be set up with the
/// features the driver needs. The reason if not.
pub fn probe() -> Result<(), String> {
    let ring = new_ring().map_err(|e| format!("cannot set up a ring: {e}"))?;
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

fn new_ring() -> io::Result<IoUring> {
    IoUring::builder()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .setup_cqsize(4 * RING_ENTRIES)
        .build(RING_ENTRIES)
}

/// One worker thread's ring and everything it drives.
pub struct Worker {
    ring: IoUring,
    buffers: Buffers,
    listeners: Vec<Option<Listening>>,
    conns: Vec<Option<Conn>>,
    free: Vec<u32>,
    /// Bumped each time a slot is taken.
    generation: u32,
    /// Deadlines of header waits and idle timeouts, one per connection at
    /// most.
    timers: Timers,
    /// Directions whose receive ran out of buffers: re-armed once some
    /// are back.
    starved: Vec<(u32, u32, usize)>,
    /// Accepted while at capacity: served once there is room.
    held: VecDeque<(OwnedFd, SocketAddr)>,
    /// Paused at the descriptor capacity.
    pause: Pause,
    inbox: Inbox,
    /// Where the eventfd read lands.
    wake: Box<u64>,
    shared: &'static Shared,
    /// Completions of one turn, copied out of the ring.
    completed: Vec<(u64, i32, u32)>,
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
            conns: Vec::new(),
            free: Vec::new(),
            generation: 0,
            timers: Timers::default(),
            starved: Vec::new(),
            held: VecDeque::new(),
            pause: Pause::default(),
            inbox,
            wake: Box::new(0),
            shared,
            completed: Vec::with_capacity(4 * RING_ENTRIES as usize),
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
        loop {
            if let Err(e) = self.wait() {
                error!("io_uring wait failed: {e}");
                std::thread::sleep(TICK);
            }
            let mut completed = std::mem::take(&mut self.completed);
            completed.extend(
                self.ring
                    .completion()
                    .map(|cqe| (cqe.user_data(), cqe.result(), cqe.flags())),
            );
            for &(user_data, result, flags) in &completed {
                self.complete(Token(user_data), result, flags);
            }
            completed.clear();
            self.completed = completed;
            let now = Instant::now();
            self.expire(now);
            if self.needs_tick() {
                self.tick(now);
            }
            self.bound_accepts();
            self.feed_starved();
        }
    }

    /// Submits what is queued and waits for a completion, or until the
    /// earliest deadline.
    fn wait(&mut self) -> io::Result<()> {
        let mut deadline = self.timers.next();
        if self.needs_tick() {
            let tick = Instant::now() + TICK;
            deadline = Some(deadline.map_or(tick, |d| d.min(tick)));
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
                _ => Err(e),
            },
        }
    }

    /// Queues `entry`, submitting what is queued first if the queue is
    /// full.
    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every buffer, address and timespec an entry points to
            // lives in this worker (a connection's slot, the buffer ring,
            // the wake word) until the entry's last completion.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                if !matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) {
                    error!("cannot submit to io_uring: {e}");
                }
            }
        }
    }

    /// Makes room for `entries` in the submission queue, submitting what
    /// is queued if need be: a linked pair must go in one submission, or
    /// the kernel ends the link between them.
    fn reserve(&mut self, entries: usize) {
        let free = {
            let queue = self.ring.submission();
            queue.capacity() - queue.len()
        };
        if free < entries {
            if let Err(e) = self.ring.submit() {
                if !matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) {
                    error!("cannot submit to io_uring: {e}");
                }
            }
        }
    }

    fn complete(&mut self, token: Token, result: i32, flags: u32) {
        match token.op() {
            (Op::Accept, _) => self.accepted(token, result, flags),
            (Op::Wake, _) => self.woken(),
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
        .user_data(Token::new(Op::Wake, 0, 0).0);
        self.push(entry);
    }

    /// The control plane wrote to the eventfd: carry out its commands.
    fn woken(&mut self) {
        while let Some(command) = self.inbox.take() {
            match command {
                Command::Listen(listener) => self.listen(listener),
                Command::CloseAll => self.close_all(),
            }
        }
        self.arm_wake();
    }

    /// Deadlines that have come: a header that never came, an idle
    /// connection.
    fn expire(&mut self, now: Instant) {
        while let Some(index) = self.timers.pop_due(now) {
            if let Some(conn) = self.conns[index as usize].as_mut() {
                conn.timer = None;
            }
            self.deadline(index, now);
        }
    }

    /// Sets (or with `None` removes) the deadline of connection `index`.
    fn set_timer(&mut self, index: u32, when: Option<Instant>) {
        if let Some(conn) = self.conns[index as usize].as_mut() {
            self.timers.set(index, conn.timer, when);
            conn.timer = when;
        }
    }

    /// Takes a free slot for a new connection: its index and generation.
    fn take_slot(&mut self) -> (u32, u32) {
        self.generation = self.generation.wrapping_add(1) & 0xff_ffff;
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.conns.push(None);
                (self.conns.len() - 1) as u32
            }
        };
        (index, self.generation)
    }

    fn conn(&mut self, index: u32, generation: u32) -> Option<&mut Conn> {
        live(&mut self.conns, index, generation)
    }
}

/// Connection `index` if it is still the one of `generation`.
fn live(conns: &mut [Option<Conn>], index: u32, generation: u32) -> Option<&mut Conn> {
    conns
        .get_mut(index as usize)?
        .as_mut()
        .filter(|conn| conn.generation == generation)
}

/// Closes `fd` through the ring (one system call fewer per connection).
fn close_entry(fd: RawFd) -> squeue::Entry {
    opcode::Close::new(types::Fd(fd))
        .build()
        .user_data(Token::new(Op::Cleanup, u32::MAX, 0).0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_its_operation_slot_and_generation() {
        for op in PLAIN_OPS {
            let token = Token::new(op, 123_456, 0xab_cdef);
            assert_eq!(token.op(), (op, None));
            assert_eq!((token.index(), token.generation()), (123_456, 0xab_cdef));
        }
        for kind in [
            FlowOp::Recv,
            FlowOp::Send,
            FlowOp::Readable,
            FlowOp::Writable,
        ] {
            for flow in [0, 1] {
                let token = Token::flow(kind, flow, u32::MAX >> 8, 7);
                assert_eq!(token.op(), (Op::Flow, Some((kind, flow))));
                assert_eq!((token.index(), token.generation()), (u32::MAX >> 8, 7));
            }
        }
    }
}
