//! One direction of a connection on the ring ([`Flow`](super::state::Flow)):
//! it moves bytes from its source to its destination with one of two
//! engines:
//!
//! - **copy**: a multishot receive takes provided buffers as bytes come
//!   in, and each is sent on as it came, by a send that does not wait for
//!   room, so the buffer goes back to the ring as soon as that send
//!   completes, whatever the destination does. When the destination is
//!   behind (a send found no room, or is still in flight, or the backend
//!   is still being dialled), bytes are copied into the direction's
//!   [`Backlog`](super::backlog::Backlog) instead, and the buffer given
//!   back. A direction holds at most [`HOLD`] bytes: each receive is
//!   limited to what may still be held, and armed again once the
//!   destination has taken half. So a slow peer never keeps ring buffers
//!   from other connections, and what it costs in memory is bounded. The
//!   limit on a multishot receive's total needs Linux 6.17; before, a
//!   multishot receive could take a whole burst, and the receives are
//!   single-shot instead, one buffer each. A receive that finds the ring
//!   empty (ENOBUFS) waits for buffers; the connection lives on.
//! - **splice**: readiness from the ring, then `splice(2)` through a pipe
//!   from the worker's pool (io_uring's own splice always runs on kernel
//!   worker threads).
//!
//! When a direction switches engines and how its FIN is passed on are
//! the rules of [`crate::connection::relaying`]. Bytes keep their order
//! across a switch: the splice engine starts only once what the copy
//! engine holds is sent.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types};

use super::state::{error_of, source_side};
use super::{FlowOp, Op, Token, Worker, BUFFER_SIZE};
use crate::connection::relaying::{shutdown_write, PassFin};
use crate::pipe::{splice, splice_in, Pipe, Spliced};

/// Bytes a direction may hold for a slow destination before it stops
/// receiving.
const HOLD: usize = 4 * BUFFER_SIZE as usize;

impl Worker {
    /// Arms the receive (or readiness poll) of direction `f` on its source.
    pub(super) fn arm(&mut self, index: u32, f: usize) {
        let Some(conn) = self.conns[index as usize].as_mut() else {
            // Finished already, by an earlier step of this turn.
            return;
        };
        if conn.ending.is_some() {
            return;
        }
        let generation = conn.generation;
        let Some(from) = conn.source(f) else {
            return;
        };
        let flow = &mut conn.flows[f];
        flow.armed = true;
        let entry = if flow.engine.splicing() {
            opcode::PollAdd::new(types::Fd(from), libc::POLLIN as u32)
                .build()
                .user_data(Token::flow(FlowOp::Readable, f, index, generation).0)
        } else if self.bounded_multishot {
            // It ends once it has taken what may still be held. The limit
            // ends it only after the receive that reaches it, which can
            // take a whole buffer: hence one buffer less. (Armed with at
            // most half of `HOLD` held, so there is room for two.)
            let held = flow.backlog.len() + flow.lent.map_or(0, |(_, len)| len as usize);
            let room = HOLD.saturating_sub(held + BUFFER_SIZE as usize - 1).max(1);
            let entry = opcode::RecvMulti::new(types::Fd(from), super::buffers::GROUP).build();
            limit_total(entry, room as u32)
                .user_data(Token::flow(FlowOp::Recv, f, index, generation).0)
        } else {
            // A multishot receive could take a whole burst: one buffer at
            // a time instead.
            opcode::Recv::new(types::Fd(from), std::ptr::null_mut(), BUFFER_SIZE)
                .buf_group(super::buffers::GROUP)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
                .user_data(Token::flow(FlowOp::Recv, f, index, generation).0)
        };
        self.push_for(index, entry);
    }

    /// Stops the receive of direction `f`; its last completion says when
    /// it has stopped.
    pub(super) fn cancel_receive(&mut self, index: u32, f: usize) {
        let Some(conn) = self.conns[index as usize].as_mut() else {
            // Finished already, by an earlier step of this turn.
            return;
        };
        let flow = &mut conn.flows[f];
        if !flow.armed || flow.cancelling {
            return;
        }
        flow.cancelling = true;
        let generation = conn.generation;
        let target = Token::flow(FlowOp::Recv, f, index, generation);
        let entry = opcode::AsyncCancel::new(target.0)
            .build()
            .user_data(Token::new(Op::Cleanup, index, generation).0);
        self.push_for(index, entry);
    }

    pub(super) fn received(
        &mut self,
        index: u32,
        f: usize,
        result: i32,
        last: bool,
        buffer: Option<u16>,
    ) {
        let Some(conn) = self.conns[index as usize].as_mut() else {
            // Finished already, by an earlier step of this turn.
            return;
        };
        let flow = &mut conn.flows[f];
        if last {
            flow.armed = false;
            flow.cancelling = false;
        }
        if result > 0 {
            let id = buffer.expect("a receive into a provided buffer");
            let len = result as u32;
            if conn.session.awaits_header() {
                conn.header
                    .extend_from_slice(self.buffers.bytes(id, len as usize));
                self.buffers.give_back(id);
                return self.header_came(index);
            }
            // Before the backend is connected (a receive that ended just
            // after a PROXY header) the bytes wait too.
            let relaying = conn.session.relaying();
            let flow = &mut conn.flows[f];
            if flow.sending || flow.holding() || !relaying {
                // Behind: the buffer goes back to the ring at once.
                let busy = flow.sending_backlog();
                flow.backlog
                    .push(self.buffers.bytes(id, len as usize), busy);
                self.buffers.give_back(id);
            } else {
                flow.lent = Some((id, len));
            }
            if flow.engine.copied(len as usize, BUFFER_SIZE as usize) {
                // Bulk: the receive gives way to readiness polls.
                self.cancel_receive(index, f);
            }
            return self.pump(index, f);
        }
        match -result {
            0 => {
                if let Some(errno) = flow.failed.take() {
                    return self.fail(index, source_side(f), error_of(-errno));
                }
                flow.eof = true;
                if conn.session.awaits_header() {
                    return self
                        .header_failed(index, &"the connection closed before a PROXY header");
                }
                self.pump(index, f)
            }
            libc::ENOBUFS => {
                flow.starved = true;
                let generation = conn.generation;
                self.starved.push((index, generation, f));
            }
            libc::ECANCELED => self.pump(index, f),
            _ => {
                let error = error_of(result);
                if conn.session.awaits_header() {
                    return self.header_failed(index, &error);
                }
                self.fail(index, source_side(f), error)
            }
        }
    }

    /// Sends what direction `f` holds, passes its FIN on, and receives more
    /// when there is room: whatever its state calls for next.
    pub(super) fn pump(&mut self, index: u32, f: usize) {
        let Some(conn) = self.conns[index as usize].as_mut() else {
            // Finished already, by an earlier step of this turn.
            return;
        };
        if conn.ending.is_some() {
            return;
        }
        if !conn.session.relaying() {
            return;
        }
        if conn
            .flushing
            .as_ref()
            .is_some_and(|flushing| flushing.flow != f)
        {
            // The direction towards a failed side is dropped.
            return;
        }
        let generation = conn.generation;
        let to = conn.destination(f).expect("relaying");
        let flow = &mut conn.flows[f];
        if !flow.sending && flow.pipe.is_none() {
            // A ring buffer is sent without waiting for room; the backlog
            // (behind it) may wait.
            let next = match flow.lent {
                Some((id, len)) => Some((
                    self.buffers.bytes(id, len as usize),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )),
                None => flow.backlog.next().map(|bytes| (bytes, libc::MSG_NOSIGNAL)),
            };
            if let Some((bytes, flags)) = next {
                flow.sending = true;
                let entry = opcode::Send::new(types::Fd(to), bytes.as_ptr(), bytes.len() as u32)
                    .flags(flags)
                    .build()
                    .user_data(Token::flow(FlowOp::Send, f, index, generation).0);
                self.push_for(index, entry);
            }
        }
        let Some(conn) = self.conns[index as usize].as_mut() else {
            // Finished already, by an earlier step of this turn.
            return;
        };
        let flushing = conn.flushing.is_some();
        let flow = &mut conn.flows[f];
        let from = source_side(f);
        if flushing {
            // Only the failed side's bytes go on (the other direction is
            // dropped), to the end of its socket.
            if flow.eof && !flow.sending && !flow.holding() {
                return self.flushed(index);
            }
        } else if flow.eof && !conn.session.passed(from) && !flow.sending && !flow.holding() {
            match conn.session.fin(from) {
                PassFin::Shutdown => {
                    if let Err(e) = shutdown_write(&borrowed(to)) {
                        self.fail(index, from.other(), e);
                    }
                }
                PassFin::Close(finished) => self.end(index, Some(finished)),
            }
            return;
        }
        let ready = !flow.armed && !flow.eof && !flow.starved;
        let room = if flow.engine.splicing() {
            !flow.sending && !flow.holding()
        } else {
            flow.backlog.len() <= HOLD / 2 && flow.pipe.is_none()
        };
        if ready && room {
            self.arm(index, f);
        }
    }

    pub(super) fn sent(&mut self, index: u32, f: usize, result: i32) {
        let Some(conn) = self.conns[index as usize].as_mut() else {
            // Finished already, by an earlier step of this turn.
            return;
        };
        let flow = &mut conn.flows[f];
        flow.sending = false;
        let n = if let Some((id, len)) = flow.lent.take() {
            // The buffer goes back to the ring whatever the outcome; what
            // the destination had no room for joins the front of the
            // backlog.
            let n = match result {
                n if n >= 0 => n as usize,
                n if -n == libc::EAGAIN => 0,
                _ => {
                    self.buffers.give_back(id);
                    return self.fail(index, source_side(f).other(), error_of(result));
                }
            };
            let rest = &self.buffers.bytes(id, len as usize)[n..];
            flow.backlog.push_front(rest.to_vec(), false);
            self.buffers.give_back(id);
            n
        } else if result < 0 {
            return self.fail(index, source_side(f).other(), error_of(result));
        } else {
            flow.backlog.sent(result as usize)
        };
        conn.session.moved(source_side(f), n);
        self.pump(index, f);
    }

    /// The source of direction `f` is readable: splice what it has.
    pub(super) fn splice_from(&mut self, index: u32, f: usize) {
        loop {
            let Some(conn) = self.conns[index as usize].as_mut() else {
                // Finished already, by an earlier step of this turn.
                return;
            };
            let from = conn.source(f).expect("relaying");
            let flow = &mut conn.flows[f];
            let Some(pipe) = Pipe::take() else {
                flow.engine.copy_for_now();
                break;
            };
            let capacity = pipe.capacity;
            let spliced = splice_in(&borrowed(from), &pipe);
            let n = match spliced {
                Ok(Spliced::Moved(n)) => n,
                Ok(stuck) => {
                    pipe.give_back();
                    match stuck {
                        Spliced::End => match flow.failed.take() {
                            Some(errno) => {
                                return self.fail(index, source_side(f), error_of(-errno))
                            }
                            None => flow.eof = true,
                        },
                        // One copy steps past the mark.
                        Spliced::UrgentMark { then } => {
                            flow.engine.copy_for_now();
                            if let Some(error) = then {
                                flow.failed = Some(-error.raw_os_error().unwrap_or(libc::EIO));
                            }
                        }
                        _ => {}
                    }
                    break;
                }
                Err(e) => {
                    pipe.give_back();
                    return self.fail(index, source_side(f), e);
                }
            };
            flow.pipe = Some((pipe, n));
            flow.engine.spliced(n);
            // A full pipe: the source may well have more.
            let again = n == capacity && flow.engine.splicing();
            if !self.drain_pipe(index, f) || !again {
                break;
            }
        }
        self.pump(index, f)
    }

    /// Moves what the pipe of direction `f` holds on to its destination:
    /// `true` once it is empty, `false` while the destination is full (a
    /// writability poll is armed) or after a failure.
    pub(super) fn drain_pipe(&mut self, index: u32, f: usize) -> bool {
        let Some(conn) = self.conns[index as usize].as_mut() else {
            // Finished already, by an earlier step of this turn.
            return false;
        };
        let generation = conn.generation;
        let to = conn.destination(f).expect("relaying");
        let flow = &mut conn.flows[f];
        let Some((pipe, mut len)) = flow.pipe.take() else {
            return true;
        };
        let total = len;
        while len > 0 {
            match splice(&pipe.read, &borrowed(to), len) {
                Ok(0) => {
                    let error = io::Error::from(io::ErrorKind::WriteZero);
                    self.fail(index, source_side(f).other(), error);
                    return false;
                }
                Ok(out) => len -= out,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.fail(index, source_side(f).other(), e);
                    return false;
                }
            }
        }
        if len > 0 {
            flow.pipe = Some((pipe, len));
            flow.sending = true;
        } else {
            pipe.give_back();
        }
        conn.session.moved(source_side(f), total - len);
        if len == 0 {
            return true;
        }
        let entry = opcode::PollAdd::new(types::Fd(to), libc::POLLOUT as u32)
            .build()
            .user_data(Token::flow(FlowOp::Writable, f, index, generation).0);
        self.push_for(index, entry);
        false
    }

    /// Directions that found no buffer: armed again once there are some,
    /// oldest first, one for every [`HOLD`] bytes of free buffers (what a
    /// multishot receive may take in a burst), so that few find the ring
    /// empty again. Buffers come back within a loop turn or two (see the
    /// module's comment), so the wait is short.
    pub(super) fn feed_starved(&mut self) {
        let available = usize::from(self.buffers.available());
        if self.starved.is_empty() || available < usize::from(super::BUFFER_COUNT / 8) {
            return;
        }
        let fed = (available / (HOLD / BUFFER_SIZE as usize))
            .max(1)
            .min(self.starved.len());
        for (index, generation, f) in self.starved.drain(..fed).collect::<Vec<_>>() {
            if let Some(conn) = self.conn(index, generation) {
                conn.flows[f].starved = false;
                // An ending connection must not get a new operation: its
                // cancels have gone out, and it would never finish.
                if conn.ending.is_some() {
                    continue;
                }
                if conn.session.awaits_header() {
                    self.arm(index, f);
                } else {
                    self.pump(index, f);
                }
            }
        }
    }
}

/// `entry`, a multishot receive, limited to `total` bytes: it ends (its
/// last completion has no `IORING_CQE_F_MORE`) once it has received at
/// least that many (the last receive is not cut short: measured on 6.18).
/// Linux 6.17 reads the limit from the entry's `optlen` field, which the
/// `io-uring` crate has no setter for; older kernels refuse the entry
/// (EINVAL), see [`bounded_multishot_works`].
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

/// A descriptor seen as a socket for one call, without owning it.
pub(super) fn borrowed(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: only used while the connection that owns `fd` is alive.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}
