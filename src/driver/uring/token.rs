//! What each operation in the ring is for. Its user data, a [`Token`],
//! names the operation ([`Op`], and [`FlowOp`] with its direction for the
//! operations of one direction of a connection), the slot of its listener
//! or connection, and the slot's generation: a completion that comes for a
//! slot since freed and taken again is told apart and dropped.

use crate::connection::ending::Side;

/// What an operation was for: the low byte of its user data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Accept = 1,
    /// The read of the eventfd the control plane writes to.
    Wake,
    /// A close or a cancel: only its connection's count of pending
    /// operations cares.
    Cleanup,
    /// A cancel of everything on a socket, after the kernel dropped
    /// completions: what it found tells whether anything is still in
    /// flight.
    Sweep,
    /// A backend socket made in the ring.
    Socket,
    Connect,
    ConnectTimeout,
    /// One of the [`relay_options`](crate::net::relay_options) on a new
    /// backend socket (`SOCKET_URING_OP_SETSOCKOPT`).
    SocketOption,
    /// Flow operations: `Flow + 2 * kind + direction`, see [`FlowOp`].
    Flow,
}

/// Every [`Op`] but the flow operations.
const PLAIN_OPS: [Op; 8] = [
    Op::Accept,
    Op::Wake,
    Op::Cleanup,
    Op::Sweep,
    Op::Socket,
    Op::Connect,
    Op::ConnectTimeout,
    Op::SocketOption,
];

/// The operations of one direction of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowOp {
    /// A receive from the source: multishot, or one buffer at a time
    /// where the kernel cannot bound a multishot one.
    Recv,
    /// A send to the destination.
    Send,
    /// Readiness of the source to read (the splice engine).
    Readable,
    /// Readiness of the destination to write (the splice engine, and a
    /// flush waiting for the destination to send everything).
    Writable,
}

const FLOW_OPS: [FlowOp; 4] = [
    FlowOp::Recv,
    FlowOp::Send,
    FlowOp::Readable,
    FlowOp::Writable,
];

/// User data: the operation, the slot of its listener or connection, and
/// the slot's generation (24 bits of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token(pub u64);

impl Token {
    pub fn new(op: Op, index: u32, generation: u32) -> Token {
        Token::with_code(op as u8, index, generation)
    }

    /// An operation of the direction whose bytes come from `from`.
    pub fn flow(op: FlowOp, from: Side, index: u32, generation: u32) -> Token {
        Token::with_code(
            Op::Flow as u8 + 2 * op as u8 + from as u8,
            index,
            generation,
        )
    }

    fn with_code(code: u8, index: u32, generation: u32) -> Token {
        Token(u64::from(generation & 0xff_ffff) << 40 | u64::from(index) << 8 | u64::from(code))
    }

    pub fn index(self) -> u32 {
        (self.0 >> 8) as u32
    }

    pub fn generation(self) -> u32 {
        (self.0 >> 40) as u32
    }

    /// The operation, and for a flow operation its kind and direction.
    pub fn op(self) -> (Op, Option<(FlowOp, Side)>) {
        let code = (self.0 & 0xff) as u8;
        if let Some(&op) = PLAIN_OPS.iter().find(|&&op| op as u8 == code) {
            return (op, None);
        }
        let rest = code - Op::Flow as u8;
        let from = if rest % 2 == 0 {
            Side::Client
        } else {
            Side::Backend
        };
        (Op::Flow, Some((FLOW_OPS[usize::from(rest / 2)], from)))
    }
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
        for kind in FLOW_OPS {
            for from in [Side::Client, Side::Backend] {
                let token = Token::flow(kind, from, u32::MAX >> 8, 7);
                assert_eq!(token.op(), (Op::Flow, Some((kind, from))));
                assert_eq!((token.index(), token.generation()), (u32::MAX >> 8, 7));
            }
        }
    }
}
