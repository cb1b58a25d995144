//! A failed connection's last bytes: when one side fails (a reset, most
//! often), what sluice already took from it still goes to the other side
//! before that side is reset ([`Classified::flush_from`]), as it would on
//! a direct connection: what the driver holds, what the failed side's
//! socket still holds (a failure seen by a send comes before the bytes the
//! receive has yet to take), and what the destination's socket has not
//! sent. Meanwhile the direction from the failed side reads its socket to
//! the end and sends on; the direction towards it is dropped. Once the
//! source has ended and the destination's socket has sent everything (a
//! writability poll under `TCP_NOTSENT_LOWAT`), the connection ends as it
//! would have at once.
//!
//! A flush ends early if the destination fails too, or on an idle timeout
//! or the drain's close-all: [`Worker::end`] of a flushing connection ends
//! it at once, with the reason the flush began with.

use io_uring::{opcode, types};
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use tracing::debug;

use super::state::{source_side, DOWN, UP};
use super::{FlowOp, Op, Token, Worker};
use crate::connection::ending::{Classified, Side};
use crate::net;

/// What a connection that is flushing waits for.
pub(super) struct Flushing {
    /// The direction whose bytes go on: the one from the failed side.
    pub(super) flow: usize,
    /// How the connection ends once they have.
    pub(super) how: Classified,
    /// The destination polls writable only once it has sent everything.
    writable_once_sent: bool,
}

impl Worker {
    /// Starts the flush `how` asks for, if there is anything to deliver:
    /// `None` then. Otherwise `how` comes back, for an end at once.
    pub(super) fn flush(&mut self, index: u32, how: Classified) -> Option<Classified> {
        let Some(from) = how.flush_from else {
            return Some(how);
        };
        let conn = self.conns[index as usize]
            .as_mut()
            .expect("a live connection");
        if !conn.session.relaying() {
            return Some(how);
        }
        let flow = if from == Side::Client { UP } else { DOWN };
        let to = conn.destination(flow).expect("relaying");
        let failed = conn.source(flow).expect("relaying");
        let held = conn.flows[flow].sending || conn.flows[flow].holding();
        let waiting = |fd, ask: fn(&Raw) -> io::Result<usize>| ask(&Raw(fd)).unwrap_or(0) > 0;
        if !held && !waiting(failed, net::queued) && !waiting(to, net::unsent) {
            return Some(how);
        }
        let generation = conn.generation;
        conn.flushing = Some(Box::new(Flushing {
            flow,
            how,
            writable_once_sent: false,
        }));
        // The direction towards the failed side: whatever it has armed.
        let other = 1 - flow;
        for kind in [FlowOp::Recv, FlowOp::Readable, FlowOp::Writable] {
            let target = Token::flow(kind, other, index, generation).0;
            let entry = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(target))
                .build()
                .user_data(Token::new(Op::Cleanup, index, generation).0);
            self.push_for(index, entry);
        }
        self.pump(index, flow);
        None
    }

    /// The flushing direction of connection `index` has handed every byte
    /// to its destination's socket: end once that socket has sent them.
    pub(super) fn flushed(&mut self, index: u32) {
        let conn = self.conns[index as usize]
            .as_mut()
            .expect("a live connection");
        let generation = conn.generation;
        let f = conn.flushing.as_ref().expect("flushing").flow;
        let to = conn.destination(f).expect("relaying");
        let flushing = conn.flushing.as_mut().expect("flushing");
        let socket = super::flow::borrowed(to);
        let unsent = net::unsent(&socket).unwrap_or(0);
        if unsent > 0 && !flushing.writable_once_sent {
            match net::writable_once_sent(&socket) {
                Ok(()) => flushing.writable_once_sent = true,
                Err(e) => debug!("cannot wait for a socket to send what it holds: {e}"),
            }
        }
        if unsent == 0 || !flushing.writable_once_sent {
            return self.end(index, None);
        }
        conn.flows[f].sending = true;
        let entry = opcode::PollAdd::new(types::Fd(to), libc::POLLOUT as u32)
            .build()
            .user_data(Token::flow(FlowOp::Writable, f, index, generation).0);
        self.push_for(index, entry);
    }

    /// `side` of connection `index` failed while it was flushing: the
    /// failed side's socket has come to its end (the direction towards it
    /// is dropped, so only its receive reports), the destination failing
    /// ends the connection now. `false` if it is not flushing.
    pub(super) fn failed_while_flushing(&mut self, index: u32, side: Side) -> bool {
        let conn = self.conns[index as usize]
            .as_mut()
            .expect("a live connection");
        let Some(flushing) = &conn.flushing else {
            return false;
        };
        let flow = flushing.flow;
        if source_side(flow) == side {
            conn.flows[flow].eof = true;
            self.pump(index, flow);
        } else {
            self.end(index, None);
        }
        true
    }

    /// A completion of direction `f` of connection `index`, if that is the
    /// direction a flush dropped: its flags and buffer are put right, and
    /// nothing else is done. `false` if it is not.
    pub(super) fn dropped(
        &mut self,
        index: u32,
        f: usize,
        kind: FlowOp,
        last: bool,
        buffer: Option<u16>,
    ) -> bool {
        let conn = self.conns[index as usize]
            .as_mut()
            .expect("a live connection");
        if conn
            .flushing
            .as_ref()
            .is_none_or(|flushing| flushing.flow == f)
        {
            return false;
        }
        let flow = &mut conn.flows[f];
        match kind {
            FlowOp::Recv if last => flow.armed = false,
            FlowOp::Readable => flow.armed = false,
            FlowOp::Send | FlowOp::Writable => flow.sending = false,
            FlowOp::Recv => {}
        }
        let lent = if kind == FlowOp::Send {
            flow.lent.take()
        } else {
            None
        };
        for id in buffer.into_iter().chain(lent.map(|(id, _)| id)) {
            self.buffers.give_back(id);
        }
        true
    }
}

/// A descriptor of a live connection, for one question about it.
struct Raw(RawFd);

impl AsRawFd for Raw {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}
