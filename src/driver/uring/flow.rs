//! One direction of a connection on the ring ([`Flow`]): it moves bytes
//! from its source to its destination with one of two engines:
//!
//! - **copy**: a multishot receive takes provided buffers as bytes come
//!   in, and each is sent on as it came ([`Out::Lent`]), by a send that
//!   does not wait for room, so the buffer goes back to the ring as soon as
//!   that send completes, whatever the destination does. When the
//!   destination is behind (a send found no room, or is still in flight,
//!   or the backend is still being dialled), bytes are copied into the
//!   direction's [`Backlog`](super::backlog::Backlog) instead, and the
//!   buffer given back. What a direction may hold is bounded (see
//!   [`super::direction`]); the bound on a multishot receive needs Linux
//!   6.17, and before it the receives are single-shot, one buffer each. A
//!   receive that finds the ring empty (ENOBUFS) waits for buffers
//!   ([`Worker::feed_starved`]); the connection lives on.
//! - **splice**: readiness from the ring, then `splice(2)` through a pipe
//!   from the worker's pool (io_uring's own splice always runs on kernel
//!   worker threads).
//!
//! When a direction switches engines and how its FIN is passed on are
//! the rules of [`crate::connection::relaying`]. Bytes keep their order
//! across a switch: the splice engine starts only once what the copy
//! engine holds is sent.

use std::io;

use io_uring::{opcode, squeue, types};

use super::direction::{Arm, Out, Receive};
use super::token::{FlowOp, Op, Token};
use super::{error_of, Raw};
use super::{Worker, BUFFER_SIZE};
use crate::connection::ending::Side;
use crate::connection::relaying::{shutdown_write, PassFin};
use crate::net;
use crate::pipe::{splice, splice_in, Pipe, Spliced};

impl Worker {
    /// Arms the receive (or readiness poll) of the direction from `from`
    /// on its source.
    pub(super) fn arm(&mut self, index: u32, from: Side) {
        let bounded = self.bounded_multishot;
        let Some(conn) = self.slab.live(index) else {
            return;
        };
        if conn.closing {
            return;
        }
        let generation = conn.generation;
        let Some(source) = conn.socket(from) else {
            return;
        };
        let flow = conn.flow_mut(from);
        let (arm, entry) = if flow.engine.splicing() {
            let entry = opcode::PollAdd::new(types::Fd(source), libc::POLLIN as u32).build();
            (Arm::Readable, entry)
        } else if bounded {
            // It ends once it has taken what may still be held.
            let entry = opcode::RecvMulti::new(types::Fd(source), super::buffers::GROUP).build();
            (
                Arm::Recv,
                super::flow::limit_total(entry, flow.receive_limit()),
            )
        } else {
            // A multishot receive could take a whole burst: one buffer at
            // a time instead.
            let entry =
                opcode::Recv::new(types::Fd(source), std::ptr::null_mut(), super::BUFFER_SIZE)
                    .buf_group(super::buffers::GROUP)
                    .build()
                    .flags(squeue::Flags::BUFFER_SELECT);
            (Arm::Recv, entry)
        };
        flow.receive = Receive::Armed(arm);
        let token = Token::flow(arm.op(), from, index, generation);
        self.push_for(index, entry.user_data(token.0));
    }

    /// Stops what the direction from `from` has armed on its source; its
    /// last completion says when it has stopped.
    pub(super) fn cancel_receive(&mut self, index: u32, from: Side) {
        let Some(conn) = self.slab.live(index) else {
            return;
        };
        let generation = conn.generation;
        let flow = conn.flow_mut(from);
        let Receive::Armed(arm) = flow.receive else {
            return;
        };
        flow.receive = Receive::Cancelling(arm);
        let target = Token::flow(arm.op(), from, index, generation);
        let entry = opcode::AsyncCancel::new(target.0)
            .build()
            .user_data(Token::new(Op::Cleanup, index, generation).0);
        self.push_for(index, entry);
    }

    /// A receive of the direction from `from` completed: `result` bytes
    /// in `buffer`, its end, or an error; `last`: it is no longer armed.
    pub(super) fn received(
        &mut self,
        index: u32,
        from: Side,
        result: i32,
        last: bool,
        buffer: Option<u16>,
    ) {
        let Some(conn) = self.slab.live(index) else {
            if let Some(id) = buffer {
                self.buffers.give_back(id);
            }
            return;
        };
        let flow = conn.flow_mut(from);
        if last {
            flow.receive = Receive::Idle;
        }
        if result > 0 {
            let id = buffer.expect("a receive into a provided buffer");
            let bytes = self.buffers.bytes(id, result as usize);
            if conn.session.awaits_header() {
                conn.header.extend_from_slice(bytes);
                self.buffers.give_back(id);
                return self.header_came(index);
            }
            // Before the backend is connected (a receive that ended just
            // after a PROXY header) the bytes wait too.
            let relaying = conn.session.relaying();
            let generation = conn.generation;
            let to = conn.socket(from.other());
            let flow = conn.flow_mut(from);
            let lend = relaying && matches!(flow.out, Out::Idle) && flow.backlog.is_empty();
            let switched = flow.engine.copied(bytes.len(), BUFFER_SIZE as usize);
            if lend {
                flow.out = Out::Lent {
                    id,
                    len: result as u32,
                };
                let to = to.expect("relaying");
                let send = opcode::Send::new(types::Fd(to), bytes.as_ptr(), bytes.len() as u32)
                    .flags(libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
                    .build()
                    .user_data(Token::flow(FlowOp::Send, from, index, generation).0);
                self.push_for(index, send);
            } else {
                // Behind: the buffer goes back to the ring at once.
                let front_busy = matches!(flow.out, Out::Sending);
                flow.backlog.push(bytes, front_busy);
                self.buffers.give_back(id);
            }
            if switched {
                // Bulk: the receive gives way to readiness polls.
                self.cancel_receive(index, from);
            }
            return self.pump(index, from);
        }
        match -result {
            0 => {
                if let Some(errno) = flow.failed.take() {
                    return self.fail(index, from, error_of(errno));
                }
                flow.receive = Receive::Ended;
                if conn.session.awaits_header() {
                    return self
                        .header_failed(index, &"the connection closed before a PROXY header");
                }
                self.pump(index, from)
            }
            libc::ENOBUFS => {
                flow.receive = Receive::Starved;
                let generation = conn.generation;
                self.starved.push_back((index, generation, from));
            }
            libc::ECANCELED => self.pump(index, from),
            _ => {
                let error = error_of(result);
                if conn.session.awaits_header() {
                    return self.header_failed(index, &error);
                }
                if !conn.session.relaying() {
                    // A client that resets while its backend is dialled:
                    // what it sent still goes to the backend, once there
                    // is one, and the failure is its end of stream.
                    conn.flow_mut(from).failed = Some(result);
                    return;
                }
                self.fail(index, from, error)
            }
        }
    }

    /// A splice of the direction from `from` stopped at a TCP urgent
    /// byte's mark (`SIOCATMARK` says whether it still is): one read from
    /// here takes the urgent byte and what follows into the backlog, in
    /// order, and splicing goes on after it. (A receive in the ring reads
    /// past a mark itself: its retries run as deferred task work, which
    /// the kernel's check for pending signals at the mark does not see.)
    /// A read kept from the mark all the same (EAGAIN) is tried again
    /// after a tick.
    pub(super) fn past_mark(&mut self, index: u32, from: Side) {
        let Some(conn) = self.slab.live(index) else {
            return;
        };
        let generation = conn.generation;
        let source = conn.socket(from).expect("reading");
        // A direction a flush dropped reads nothing more.
        if conn.dropped(from) || !net::at_urgent_mark(&Raw(source)).unwrap_or(false) {
            conn.flow_mut(from).at_mark = false;
            return self.pump(index, from);
        }
        let mut bytes = vec![0u8; BUFFER_SIZE as usize];
        match net::recv(&Raw(source), &mut bytes, 0) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.marks.push((index, generation, from));
            }
            Err(e) => self.fail(index, from, e),
            Ok(0) => {
                let flow = conn.flow_mut(from);
                flow.at_mark = false;
                if let Some(errno) = flow.failed.take() {
                    return self.fail(index, from, error_of(errno));
                }
                flow.receive = Receive::Ended;
                self.pump(index, from)
            }
            Ok(n) => {
                conn.flow_mut(from).at_mark = false;
                if conn.session.awaits_header() {
                    conn.header.extend_from_slice(&bytes[..n]);
                    return self.header_came(index);
                }
                let flow = conn.flow_mut(from);
                let front_busy = matches!(flow.out, Out::Sending);
                flow.backlog.push(&bytes[..n], front_busy);
                self.pump(index, from)
            }
        }
    }

    /// Reads kept from an urgent byte's mark: tried again.
    pub(super) fn retry_marks(&mut self) {
        for (index, generation, from) in std::mem::take(&mut self.marks) {
            if self
                .slab
                .of(index, generation)
                .is_some_and(|conn| !conn.closing && conn.flow(from).at_mark)
            {
                self.past_mark(index, from);
            }
        }
    }

    /// Sends what the direction from `from` holds, passes its FIN on, and
    /// receives more when there is room: whatever its state calls for
    /// next.
    pub(super) fn pump(&mut self, index: u32, from: Side) {
        let Some(conn) = self.slab.live(index) else {
            return;
        };
        if conn.closing || !conn.session.relaying() || conn.dropped(from) {
            return;
        }
        let generation = conn.generation;
        let to = conn.socket(from.other()).expect("relaying");
        let flushing = conn.flushing.is_some();
        let flow = conn.flow_mut(from);
        if let (Out::Idle, Some(bytes)) = (&flow.out, flow.backlog.next()) {
            let send = opcode::Send::new(types::Fd(to), bytes.as_ptr(), bytes.len() as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data(Token::flow(FlowOp::Send, from, index, generation).0);
            flow.out = Out::Sending;
            self.push_for(index, send);
        }
        let conn = self.slab.live(index).expect("live above");
        let flow = conn.flow(from);
        let ended = flow.receive == Receive::Ended;
        if flushing {
            // The failed side's bytes go on, to the end of its socket.
            if ended && flow.drained() {
                return self.flushed(index);
            }
        } else if ended && flow.drained() {
            if !conn.session.passed(from) {
                match conn.session.fin(from) {
                    PassFin::Shutdown => {
                        if let Err(e) = shutdown_write(&Raw(to)) {
                            self.fail(index, from.other(), e);
                        }
                    }
                    PassFin::Close { .. } => self.end(index),
                }
            }
            return;
        }
        if flow.at_mark && flow.receive == Receive::Idle {
            return self.past_mark(index, from);
        }
        if flow.may_arm() {
            self.arm(index, from);
        }
    }

    /// A send of the direction from `from` completed with `result`.
    pub(super) fn sent(&mut self, index: u32, from: Side, result: i32) {
        let now = self.now;
        let Some(conn) = self.slab.live(index) else {
            return;
        };
        let flow = conn.flow_mut(from);
        let n = match std::mem::take(&mut flow.out) {
            // The buffer goes back to the ring whatever the outcome; what
            // the destination had no room for joins the front of the
            // backlog.
            Out::Lent { id, len } => {
                let n = match result {
                    n if n >= 0 => n as usize,
                    n if -n == libc::EAGAIN => 0,
                    _ => {
                        self.buffers.give_back(id);
                        return self.fail(index, from.other(), error_of(result));
                    }
                };
                let rest = &self.buffers.bytes(id, len as usize)[n..];
                flow.backlog.push_front(rest.to_vec(), false);
                self.buffers.give_back(id);
                n
            }
            Out::Sending if result < 0 => {
                return self.fail(index, from.other(), error_of(result));
            }
            Out::Sending => flow.backlog.sent(result as usize),
            other => {
                flow.out = other;
                return;
            }
        };
        conn.session.moved(from, n, now);
        self.pump(index, from);
    }

    /// The source of the direction from `from` is readable: splice what
    /// it has.
    pub(super) fn splice_from(&mut self, index: u32, from: Side) {
        loop {
            let Some(conn) = self.slab.live(index) else {
                return;
            };
            let source = conn.socket(from).expect("relaying");
            let flow = conn.flow_mut(from);
            let Some(pipe) = Pipe::take() else {
                flow.engine.copy_for_now();
                break;
            };
            let capacity = pipe.capacity;
            let n = match splice_in(&Raw(source), &pipe) {
                Ok(Spliced::Moved(n)) => n,
                Ok(stuck) => {
                    pipe.give_back();
                    match stuck {
                        Spliced::End => match flow.failed.take() {
                            Some(errno) => return self.fail(index, from, error_of(errno)),
                            None => flow.receive = Receive::Ended,
                        },
                        // One read from here steps past the mark.
                        Spliced::UrgentMark { then } => {
                            flow.at_mark = true;
                            if let Some(error) = then {
                                flow.failed = Some(-error.raw_os_error().unwrap_or(libc::EIO));
                            }
                            return self.past_mark(index, from);
                        }
                        _ => {}
                    }
                    break;
                }
                Err(e) => {
                    pipe.give_back();
                    return self.fail(index, from, e);
                }
            };
            flow.out = Out::Pipe {
                pipe,
                len: n,
                polling: false,
            };
            flow.engine.spliced(n);
            // A full pipe: the source may well have more.
            let again = n == capacity && flow.engine.splicing();
            if !self.drain_pipe(index, from) || !again {
                break;
            }
        }
        self.pump(index, from)
    }

    /// Moves what the pipe of the direction from `from` holds on to its
    /// destination: `true` once it is empty (or there is none), `false`
    /// while the destination is full (a writability poll is armed) or
    /// after a failure.
    pub(super) fn drain_pipe(&mut self, index: u32, from: Side) -> bool {
        let now = self.now;
        let Some(conn) = self.slab.live(index) else {
            return false;
        };
        let generation = conn.generation;
        let to = conn.socket(from.other()).expect("relaying");
        let flow = conn.flow_mut(from);
        let Out::Pipe { pipe, len, .. } = &mut flow.out else {
            return true;
        };
        let total = *len;
        let mut failed = None;
        while *len > 0 {
            match splice(&pipe.read, &Raw(to), *len) {
                // Cannot happen with bytes in the pipe; never spin.
                Ok(0) => failed = Some(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(out) => *len -= out,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => failed = Some(e),
            }
            if failed.is_some() {
                break;
            }
        }
        let left = *len;
        conn.session.moved(from, total - left, now);
        if let Some(error) = failed {
            self.fail(index, from.other(), error);
            return false;
        }
        let flow = conn.flow_mut(from);
        if left == 0 {
            if let Out::Pipe { pipe, .. } = std::mem::take(&mut flow.out) {
                pipe.give_back();
            }
            return true;
        }
        if let Out::Pipe { polling, .. } = &mut flow.out {
            *polling = true;
        }
        let entry = opcode::PollAdd::new(types::Fd(to), libc::POLLOUT as u32)
            .build()
            .user_data(Token::flow(FlowOp::Writable, from, index, generation).0);
        self.push_for(index, entry);
        false
    }

    /// The readiness poll of the direction from `from` ended.
    pub(super) fn readable(&mut self, index: u32, from: Side, result: i32) {
        let Some(conn) = self.slab.live(index) else {
            return;
        };
        conn.flow_mut(from).receive = Receive::Idle;
        match result {
            r if r >= 0 => self.splice_from(index, from),
            r if -r == libc::ECANCELED => self.pump(index, from),
            r => self.fail(index, from, error_of(r)),
        }
    }

    /// The writability poll of the direction from `from` ended: a pipe
    /// may drain, or a flush see everything sent.
    pub(super) fn writable(&mut self, index: u32, from: Side, result: i32) {
        let Some(conn) = self.slab.live(index) else {
            return;
        };
        let flow = conn.flow_mut(from);
        match &mut flow.out {
            Out::Pipe { polling, .. } => *polling = false,
            Out::Unsent { .. } => flow.out = Out::Idle,
            _ => {}
        }
        if result < 0 {
            return self.fail(index, from.other(), error_of(result));
        }
        if self.drain_pipe(index, from) {
            self.pump(index, from);
        }
    }

    /// A completion of the direction from `from`, which a flush dropped:
    /// its state and buffer are put right, and nothing else is done.
    pub(super) fn dropped_completed(
        &mut self,
        index: u32,
        from: Side,
        kind: FlowOp,
        last: bool,
        buffer: Option<u16>,
    ) {
        let Some(conn) = self.slab.live(index) else {
            return;
        };
        let flow = conn.flow_mut(from);
        let mut lent = None;
        match kind {
            FlowOp::Recv | FlowOp::Readable if last => flow.receive = Receive::Idle,
            FlowOp::Send => match std::mem::take(&mut flow.out) {
                Out::Lent { id, .. } => lent = Some(id),
                Out::Sending => {}
                other => flow.out = other,
            },
            FlowOp::Writable => match &mut flow.out {
                Out::Pipe { polling, .. } => *polling = false,
                Out::Unsent { .. } => flow.out = Out::Idle,
                _ => {}
            },
            _ => {}
        }
        for id in buffer.into_iter().chain(lent) {
            self.buffers.give_back(id);
        }
    }

    /// Directions that found no buffer: armed again once there are some,
    /// oldest first, one for every [`HOLD`](super::direction::HOLD) bytes
    /// of free buffers (what a multishot receive may take in a burst), so
    /// that few find the ring empty again. Directions of connections that
    /// ended meanwhile take no share. Buffers come back within a loop turn
    /// or two, so the wait is short.
    pub(super) fn feed_starved(&mut self) {
        let available = usize::from(self.buffers.available());
        if self.starved.is_empty() || available < usize::from(super::BUFFER_COUNT / 8) {
            return;
        }
        let per_burst = super::direction::HOLD / BUFFER_SIZE as usize;
        let mut quota = (available / per_burst).max(1);
        while quota > 0 {
            let Some((index, generation, from)) = self.starved.pop_front() else {
                break;
            };
            let Some(conn) = self.slab.of(index, generation) else {
                continue;
            };
            let flow = conn.flow_mut(from);
            if flow.receive != Receive::Starved {
                continue;
            }
            flow.receive = Receive::Idle;
            // An ending connection must not get a new operation: its
            // cancels have gone out, and it would never finish.
            if conn.closing {
                continue;
            }
            quota -= 1;
            if conn.session.awaits_header() {
                self.arm(index, from);
            } else {
                self.pump(index, from);
            }
        }
    }
}

/// `entry`, a multishot receive, limited to `total` bytes: it ends (its
/// last completion has no `IORING_CQE_F_MORE`) once it has received at
/// least that many (the last receive is not cut short: measured on 6.18).
/// Linux 6.17 reads the limit from the entry's `optlen` field, which the
/// `io-uring` crate has no setter for; older kernels refuse the entry
/// (EINVAL), see [`bounded_multishot_works`](super::bounded_multishot_works).
pub(super) fn limit_total(entry: squeue::Entry, total: u32) -> squeue::Entry {
    /// Where `optlen` lies in `struct io_uring_sqe` (a union with
    /// `file_index` and `splice_fd_in`).
    const OPTLEN: usize = 44;
    // SAFETY: `squeue::Entry` is `repr(C)` around the kernel's 64-byte
    // submission entry, which has no invalid bit patterns; the size is
    // checked by `transmute`.
    let mut raw: [u8; 64] = unsafe { std::mem::transmute(entry) };
    raw[OPTLEN..OPTLEN + 4].copy_from_slice(&total.to_ne_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute(raw) }
}

impl Arm {
    /// The operation that is armed.
    pub fn op(self) -> FlowOp {
        match self {
            Arm::Recv => FlowOp::Recv,
            Arm::Readable => FlowOp::Readable,
        }
    }
}
