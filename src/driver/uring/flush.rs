//! A failed connection's last bytes: when one side fails (a reset, most
//! often), what sluice already took from it still goes to the other side
//! before that side is reset
//! ([`Classified::flush_from`](crate::connection::ending::Classified::flush_from)), as it would on
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
//! it at once, with the reason the flush began with (a session keeps the
//! first ending reported).

use std::time::Duration;

use io_uring::{opcode, types};
use tracing::debug;

use super::conn::Flushing;
use super::direction::{Out, Receive};
use super::token::{FlowOp, Op, Token};
use super::Raw;
use super::Worker;
use crate::connection::ending::Side;
use crate::net::{self, Sending};

/// How often a flush asks again whether a destination whose writing side
/// is shut down has sent everything.
const ASK_AGAIN: Duration = Duration::from_millis(20);

impl Worker {
    /// Starts delivering what was taken from the failed side `from` of
    /// connection `index`, if there is anything to deliver: `true` then.
    pub(super) fn flush(&mut self, index: u32, from: Side) -> bool {
        let Some(conn) = self.slab.live(index) else {
            return false;
        };
        if !conn.session.relaying() {
            return false;
        }
        let failed = conn.socket(from).expect("relaying");
        let to = conn.socket(from.other()).expect("relaying");
        let flow = conn.flow(from);
        // A receive still armed on the failed side may have taken bytes
        // whose completion this turn has not reached yet (the failure was
        // seen by a send): its last completion is waited for.
        let reading = !matches!(flow.receive, Receive::Idle | Receive::Ended);
        let waiting = |fd, ask: fn(&Raw) -> std::io::Result<usize>| ask(&Raw(fd)).unwrap_or(0) > 0;
        if !reading && flow.drained() && !waiting(failed, net::queued) && !waiting(to, net::unsent)
        {
            return false;
        }
        let generation = conn.generation;
        conn.flushing = Some(Box::new(Flushing {
            from,
            writable_once_sent: false,
        }));
        // The direction towards the failed side: whatever it has armed.
        let other = from.other();
        for kind in [FlowOp::Recv, FlowOp::Readable, FlowOp::Writable] {
            let target = Token::flow(kind, other, index, generation).0;
            let entry = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(target))
                .build()
                .user_data(Token::new(Op::Cleanup, index, generation).0);
            self.push_for(index, entry);
        }
        self.pump(index, from);
        true
    }

    /// The failed side's socket of connection `index` has come to its end
    /// and every byte of it has been handed on: end once the destination's
    /// socket has sent them.
    pub(super) fn flushed(&mut self, index: u32) {
        let now = self.now;
        let Some(conn) = self.slab.live(index) else {
            return;
        };
        let generation = conn.generation;
        let idle = conn.session.idle_deadline();
        let from = conn.flushing.as_ref().expect("flushing").from;
        let to = Raw(conn.socket(from.other()).expect("relaying"));
        let flushing = conn.flushing.as_mut().expect("flushing");
        if !flushing.writable_once_sent {
            if net::unsent(&to).unwrap_or(0) == 0 {
                return self.end(index);
            }
            match net::writable_once_sent(&to) {
                Ok(()) => flushing.writable_once_sent = true,
                Err(e) => debug!("cannot wait for a socket to send what it holds: {e}"),
            }
        }
        let lowat = flushing.writable_once_sent;
        match net::sending(&to) {
            Ok(Sending::Waiting { shut: false }) if lowat => {
                conn.flow_mut(from).out = Out::Unsent { polling: true };
                let entry = opcode::PollAdd::new(types::Fd(to.0), libc::POLLOUT as u32)
                    .build()
                    .user_data(Token::flow(FlowOp::Writable, from, index, generation).0);
                self.push_for(index, entry);
            }
            // Writability says nothing here: ask again in a while (an idle
            // timeout still ends the wait).
            Ok(Sending::Waiting { .. }) => {
                conn.flow_mut(from).out = Out::Unsent { polling: false };
                let next = now + ASK_AGAIN;
                self.set_timer(index, Some(idle.map_or(next, |idle| idle.min(next))));
            }
            // Sent, or never will be: the flush is over.
            Ok(Sending::Done | Sending::Gone) | Err(_) => self.end(index),
        }
    }

    /// `side` of connection `index` failed while it was flushing: the
    /// failed side's socket has come to its end (the direction towards it
    /// is dropped, so only its receive reports), the destination failing
    /// ends the connection now. `false` if it is not flushing.
    pub(super) fn failed_while_flushing(&mut self, index: u32, side: Side) -> bool {
        let Some(conn) = self.slab.live(index) else {
            return false;
        };
        let Some(flushing) = &conn.flushing else {
            return false;
        };
        let from = flushing.from;
        if side == from {
            conn.flow_mut(from).receive = Receive::Ended;
            self.pump(index, from);
        } else {
            self.end(index);
        }
        true
    }
}
