//! A failed connection's last bytes: when one side fails (a reset, most
//! often), what sluice already took from it still goes to the other side
//! before that side is reset ([`Classified::flush_from`]), as it would on
//! a direct connection. Meanwhile nothing is received on either side, and
//! the direction towards the failed side is dropped; the direction from
//! it keeps sending what it holds, then waits until the destination's
//! socket has sent it all (a writability poll under `TCP_NOTSENT_LOWAT`),
//! and the connection ends as it would have at once.
//!
//! A flush ends early if the destination fails too, or on an idle timeout
//! or the drain's close-all: [`Worker::end`] of a flushing connection ends
//! it at once, with the reason the flush began with.

use io_uring::{opcode, types};
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
        let held = conn.flows[flow].sending || conn.flows[flow].holding();
        if !held && net::unsent(&super::flow::borrowed(to)).unwrap_or(0) == 0 {
            return Some(how);
        }
        let generation = conn.generation;
        let failed = conn.source(flow).expect("relaying");
        conn.flushing = Some(Box::new(Flushing {
            flow,
            how,
            writable_once_sent: false,
        }));
        // Everything on the failed side's socket, and the receive from the
        // other side (a receive or a readiness poll, whichever is armed).
        let other = 1 - flow;
        let mut cancels =
            vec![
                opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(failed)).all())
                    .build(),
            ];
        for kind in [FlowOp::Recv, FlowOp::Readable] {
            let target = Token::flow(kind, other, index, generation).0;
            cancels
                .push(opcode::AsyncCancel2::new(types::CancelBuilder::user_data(target)).build());
        }
        for cancel in cancels {
            let entry = cancel.user_data(Token::new(Op::Cleanup, index, generation).0);
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
    /// failed side again is no news, the destination failing ends it now.
    /// `false` if it is not flushing.
    pub(super) fn failed_while_flushing(&mut self, index: u32, side: Side) -> bool {
        let conn = self.conns[index as usize]
            .as_mut()
            .expect("a live connection");
        let Some(flushing) = &conn.flushing else {
            return false;
        };
        if source_side(flushing.flow) != side {
            self.end(index, None);
        }
        true
    }
}
