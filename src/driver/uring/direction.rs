//! The state of one direction of a connection on the ring ([`Flow`]): what
//! it has armed on its source ([`Receive`]), what it has out towards its
//! destination ([`Out`]), what it holds meanwhile, and the arithmetic of
//! how much it may hold. The data and its rules only; `flow.rs` does the
//! I/O.
//!
//! A direction holds at most [`HOLD`] bytes for a slow destination: each
//! multishot receive is limited to what may still be held
//! ([`Flow::receive_limit`]) and is armed again once the destination has
//! taken half ([`Flow::has_room`]). So a slow peer never keeps ring buffers
//! from other connections, and what it costs in memory is bounded.

use super::backlog::Backlog;
use super::BUFFER_SIZE;
use crate::connection::relaying::EngineChoice;
use crate::pipe::Pipe;

/// Bytes a direction may hold for a slow destination before it stops
/// receiving.
pub const HOLD: usize = 4 * BUFFER_SIZE as usize;

/// One direction of a connection: the bytes of one side, on their way to
/// the other.
#[derive(Default)]
pub struct Flow {
    pub engine: EngineChoice,
    pub receive: Receive,
    pub out: Out,
    /// What the destination has not taken yet, copied out of the ring,
    /// behind what [`Out`] has on its way: the PROXY header and what came
    /// after the client's, the rest of a send that found no room, what
    /// came meanwhile.
    pub backlog: Backlog,
    /// The source failed with this (negated errno) after the bytes its
    /// socket still holds: its end of stream is this failure (see
    /// [`Spliced::UrgentMark`](crate::pipe::Spliced)).
    pub failed: Option<i32>,
    /// A splice stopped at a TCP urgent byte's mark: once nothing is
    /// armed, a read from the worker steps past it (`Worker::past_mark`).
    pub at_mark: bool,
}

/// What a direction has armed on its source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Receive {
    /// Nothing: armed again once there is room.
    #[default]
    Idle,
    Armed(Arm),
    /// Armed, and a cancel is on its way: its last completion says when it
    /// has stopped.
    Cancelling(Arm),
    /// The last receive found the buffer ring empty: waiting in the
    /// worker's list for buffers to come back.
    Starved,
    /// The source sent FIN (every byte before it received).
    Ended,
}

/// What is armed on a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arm {
    /// A receive into provided buffers (the copy engine).
    Recv,
    /// A readiness poll, before a splice (the splice engine).
    Readable,
}

/// What a direction has on its way to its destination.
#[derive(Default)]
pub enum Out {
    /// Nothing.
    #[default]
    Idle,
    /// A ring buffer (id, length), sent as it came by a send that does not
    /// wait for room, so the buffer goes back to the ring as soon as that
    /// send completes, whatever the destination does.
    Lent { id: u16, len: u32 },
    /// A send of the backlog's front chunk.
    Sending,
    /// A pipe with `len` bytes the destination has not taken yet;
    /// `polling`: a writability poll waits for room.
    Pipe {
        pipe: Pipe,
        len: usize,
        polling: bool,
    },
    /// A flush waits for the destination's socket to have sent everything:
    /// `polling`, a writability poll under `TCP_NOTSENT_LOWAT` is armed;
    /// otherwise (its writing side is shut down, so it polls writable all
    /// the time) the connection's timer asks again.
    Unsent { polling: bool },
}

impl Flow {
    /// A send or a poll towards the destination is in flight.
    pub fn busy(&self) -> bool {
        match &self.out {
            Out::Idle => false,
            Out::Pipe { polling, .. } => *polling,
            Out::Lent { .. } | Out::Sending | Out::Unsent { .. } => true,
        }
    }

    /// Bytes wait for the destination, in the ring, a pipe or the backlog.
    pub fn holding(&self) -> bool {
        matches!(self.out, Out::Lent { .. } | Out::Pipe { .. }) || !self.backlog.is_empty()
    }

    /// Every byte received has been handed to the destination's socket.
    pub fn drained(&self) -> bool {
        !self.busy() && !self.holding()
    }

    /// Bytes held for the destination.
    pub fn held(&self) -> usize {
        self.backlog.len()
            + match &self.out {
                Out::Lent { len, .. } => *len as usize,
                Out::Pipe { len, .. } => *len,
                _ => 0,
            }
    }

    /// Whether the direction may take more from its source now: splicing,
    /// once everything is handed on (a splice moves a pipe's worth at
    /// once); copying, while it holds at most half of [`HOLD`] and no pipe.
    pub fn has_room(&self) -> bool {
        if self.engine.splicing() {
            self.drained()
        } else {
            self.backlog.len() <= HOLD / 2 && !matches!(self.out, Out::Pipe { .. })
        }
    }

    /// Whether a receive (or readiness poll) is to be armed now.
    pub fn may_arm(&self) -> bool {
        self.receive == Receive::Idle && !self.at_mark && self.has_room()
    }

    /// What a bounded multishot receive may take: what may still be held.
    /// The kernel ends it only after the receive that reaches the limit,
    /// which can take a whole buffer: hence one buffer less (armed with at
    /// most half of [`HOLD`] held, there is room for two).
    pub fn receive_limit(&self) -> u32 {
        HOLD.saturating_sub(self.held() + BUFFER_SIZE as usize - 1)
            .max(1) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Engine;

    fn copying_with(backlog: usize) -> Flow {
        let mut flow = Flow::default();
        flow.backlog.push(&vec![0u8; backlog], false);
        flow
    }

    #[test]
    fn a_copying_direction_receives_until_it_holds_half_of_hold() {
        assert!(Flow::default().may_arm());
        assert!(copying_with(HOLD / 2).has_room());
        assert!(!copying_with(HOLD / 2 + 1).has_room());
        let armed = Flow {
            receive: Receive::Armed(Arm::Recv),
            ..Flow::default()
        };
        assert!(
            armed.has_room() && !armed.may_arm(),
            "one receive at a time"
        );
    }

    #[test]
    fn a_receive_takes_no_more_than_may_still_be_held() {
        let buffer = BUFFER_SIZE as usize;
        assert_eq!(Flow::default().receive_limit() as usize, HOLD - buffer + 1);
        // The most a direction holds when it arms: half.
        let half = copying_with(HOLD / 2);
        let limit = half.receive_limit() as usize;
        assert_eq!(limit, HOLD / 2 - buffer + 1);
        // Whatever the last receive takes, the total stays within HOLD.
        assert!(HOLD / 2 + limit - 1 + buffer <= HOLD);
        // Never zero, which the kernel would take for no limit.
        assert_eq!(copying_with(HOLD).receive_limit(), 1);
        let lent = Flow {
            out: Out::Lent {
                id: 0,
                len: BUFFER_SIZE,
            },
            ..Flow::default()
        };
        assert_eq!(lent.held(), buffer);
    }

    #[test]
    fn a_splicing_direction_splices_again_only_once_drained() {
        let mut flow = Flow {
            engine: EngineChoice::new(Engine::Splice),
            ..Flow::default()
        };
        assert!(flow.may_arm());
        flow.out = Out::Sending;
        assert!(flow.busy() && !flow.has_room());
        flow.out = Out::Idle;
        flow.backlog.push(b"x", false);
        assert!(flow.holding() && !flow.has_room());
    }
}
