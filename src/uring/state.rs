//! What a connection on the ring is made of: its stages ([`Stage`]) and
//! its two directions ([`Flow`]). The data only: `conn.rs` drives the
//! stages, `flow.rs` the directions, both as methods of the worker.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::types;
use socket2::SockAddr;

use super::backlog::Backlog;
use crate::balancer::load::Lease;
use crate::capacity::Slot;
use crate::connection::dial::{Attempt, Dialed, Dialer};
use crate::connection::ending::{Classified, Side};
use crate::connection::relaying::{EngineChoice, Halves};
use crate::connection::Bytes;
use crate::metrics::RouteStats;
use crate::pipe::Pipe;
use crate::snapshot::Route;

pub struct Conn {
    pub generation: u32,
    /// Operations whose last completion has not come yet.
    pub(super) pending: u32,
    pub(super) client: OwnedFd,
    pub(super) backend: Option<OwnedFd>,
    pub(super) stage: Stage,
    pub(super) flows: [Flow; 2],
    /// The connection's own peer, and the client a PROXY header named.
    pub(super) peer: SocketAddr,
    pub(super) client_addr: SocketAddr,
    pub(super) accepted: Instant,
    pub(super) listener: Arc<str>,
    /// Counts the connection against its listener's `max_connections`.
    pub(super) _lease: Lease,
    /// Its place in the process's descriptor capacity.
    pub(super) _slot: Slot,
    pub(super) idle_timeout: Option<Duration>,
    pub(super) last_moved: Instant,
    pub(super) halves: Halves,
    /// Set once it is ending: how (nothing to log if `None` inside).
    pub(super) ending: Option<Option<Classified>>,
}

pub(super) enum Stage {
    /// Admitted, and about to dial; or done dialing without a backend.
    Bare,
    /// Waiting for a PROXY header.
    Header(Box<HeaderWait>),
    Dialing(Box<Dialing>),
    Relaying(Box<Relaying>),
}

pub(super) struct HeaderWait {
    pub(super) route: Arc<Route>,
    pub(super) within: Duration,
    pub(super) deadline: Instant,
    /// What came so far (a header split over segments is rare).
    pub(super) bytes: Vec<u8>,
}

pub(super) struct Dialing {
    pub(super) route: Arc<Route>,
    pub(super) dialer: Dialer,
    pub(super) attempt: Option<Attempt>,
    /// Where the connect in flight goes, and its time limit: the ring reads
    /// both after the entry is queued.
    pub(super) addr: SockAddr,
    pub(super) timeout: types::Timespec,
}

pub(super) struct Relaying {
    pub(super) dialed: Dialed,
    pub(super) stats: Option<RouteStats>,
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

    /// Bytes moved: the idle timeout starts again (the clock is read only
    /// when there is one).
    pub(super) fn moved_now(&mut self) {
        if self.idle_timeout.is_some() {
            self.last_moved = Instant::now();
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
    pub(super) bytes: Option<Bytes>,
}

impl Flow {
    pub(super) fn holding(&self) -> bool {
        self.lent.is_some() || !self.backlog.is_empty() || self.pipe.is_some()
    }

    /// A send from the backlog's front chunk is in flight.
    pub(super) fn sending_backlog(&self) -> bool {
        self.sending && self.lent.is_none() && self.pipe.is_none()
    }

    pub(super) fn moved(&mut self, n: usize) {
        if let Some(bytes) = &mut self.bytes {
            bytes.add(n);
        }
    }

    pub(super) fn total(&self) -> u64 {
        self.bytes.as_ref().map_or(0, |b| b.total)
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
