//! What a connection on the ring is made of: its sockets, its
//! [`Session`], what the ring needs while it reads a PROXY header or
//! connects, and its two directions ([`Flow`]). The data only: `conn.rs`
//! drives the session's steps, `flow.rs` the directions, both as methods
//! of the worker.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Instant;

use io_uring::types;
use socket2::SockAddr;

use super::backlog::Backlog;
use super::flush::Flushing;
use crate::connection::ending::{Classified, Side};
use crate::connection::relaying::EngineChoice;
use crate::connection::session::Session;
use crate::pipe::Pipe;

pub struct Conn {
    pub generation: u32,
    /// Operations whose last completion has not come yet.
    pub(super) pending: u32,
    pub(super) client: OwnedFd,
    pub(super) backend: Option<OwnedFd>,
    pub(super) session: Session,
    /// What came of a PROXY header so far, while one is awaited (a header
    /// split over segments is rare).
    pub(super) header: Vec<u8>,
    /// The connect being made, while dialing.
    pub(super) connecting: Option<Box<Connecting>>,
    pub(super) flows: [Flow; 2],
    /// Its deadline among the worker's timers: when its PROXY header is
    /// due, or its idle timeout (as last set; bytes may have moved since).
    pub(super) timer: Option<Instant>,
    /// A failed side's last bytes on their way, before the reset.
    pub(super) flushing: Option<Box<Flushing>>,
    /// Set once it is ending: how (nothing to log if `None` inside).
    pub(super) ending: Option<Option<Classified>>,
}

/// Where the connect in flight goes, and its time limit: the ring reads
/// both after the entry is queued.
pub(super) struct Connecting {
    pub(super) addr: SockAddr,
    /// `connect_timeout` is not zero: `timeout` applies.
    pub(super) limited: bool,
    pub(super) timeout: types::Timespec,
}

impl Conn {
    /// The socket direction `f` reads from, once it exists (the backend's
    /// only once dialed).
    pub(super) fn source(&self, f: usize) -> Option<RawFd> {
        self.side(source_side(f))
    }

    /// The socket direction `f` writes to, once it exists.
    pub(super) fn destination(&self, f: usize) -> Option<RawFd> {
        self.side(source_side(f).other())
    }

    fn side(&self, side: Side) -> Option<RawFd> {
        match side {
            Side::Client => Some(self.client.as_raw_fd()),
            Side::Backend => self.backend.as_ref().map(AsRawFd::as_raw_fd),
        }
    }
}

/// The two directions: index 0 carries the client's bytes.
pub const UP: usize = 0;
pub const DOWN: usize = 1;

/// One direction of a connection.
#[derive(Default)]
pub struct Flow {
    pub(super) engine: EngineChoice,
    /// A receive (copy) or a readiness poll (splice) is armed on the source.
    pub(super) armed: bool,
    pub(super) cancelling: bool,
    /// The last receive found no buffer: waiting for some to come back.
    pub(super) starved: bool,
    /// The source sent FIN.
    pub(super) eof: bool,
    /// The source failed with this (negated errno) after the bytes its
    /// socket still holds: its end of stream is this failure (see
    /// [`Spliced::UrgentMark`](crate::pipe::Spliced)).
    pub(super) failed: Option<i32>,
    /// A send (copy) or a writability poll (splice) is in flight.
    pub(super) sending: bool,
    /// A ring buffer being sent as it came (buffer id, length): the send
    /// does not wait for room, so the buffer goes back to the ring when
    /// that send completes, whatever the destination does. Only while
    /// relaying and nothing else is waiting for the destination.
    pub(super) lent: Option<(u16, u32)>,
    /// What the destination has not taken yet, copied out of the ring:
    /// the PROXY header and what came after the client's, the rest of a
    /// send that found no room, and what came meanwhile.
    pub(super) backlog: Backlog,
    /// A pipe holding bytes the destination has not taken yet.
    pub(super) pipe: Option<(Pipe, usize)>,
}

impl Flow {
    pub(super) fn holding(&self) -> bool {
        self.lent.is_some() || !self.backlog.is_empty() || self.pipe.is_some()
    }

    /// A send from the backlog's front chunk is in flight.
    pub(super) fn sending_backlog(&self) -> bool {
        self.sending && self.lent.is_none() && self.pipe.is_none()
    }
}

pub(super) fn source_side(flow: usize) -> Side {
    if flow == UP {
        Side::Client
    } else {
        Side::Backend
    }
}

pub(super) fn error_of(result: i32) -> io::Error {
    io::Error::from_raw_os_error(-result)
}
