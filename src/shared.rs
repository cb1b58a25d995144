//! What the control plane and the workers share, for the life of the
//! process: the routing snapshot, the count of open connections against
//! the descriptor capacity, and the channel on which workers report to the
//! control plane. A leaf of the module graph: the workers and the relay
//! depend on it, not on the control plane.

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;

use arc_swap::ArcSwap;
use metrics::Counter;
use tokio::sync::mpsc::UnboundedSender;

use crate::capacity::Connections;
use crate::health::ProbeFailure;
use crate::snapshot::Snapshot;

/// What the control plane shares with the workers. Lives as long as the
/// process, so it is leaked once and handed out as `&'static`.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    /// Reports from the workers to the control plane.
    pub events: UnboundedSender<Event>,
    /// Connections being served, all workers together, against the
    /// descriptor capacity; a worker counts one just before it accepts it.
    pub connections: Connections,
    /// Accept loops running, all workers together: a drain waits for them
    /// to end, so that no connection accepted at the last moment is missed.
    pub accepting: AtomicUsize,
    /// Pipes each worker may keep for splicing (see [`Budget`](crate::capacity::Budget)).
    pub pipes_per_worker: usize,
    /// Counts a worker's pauses at the descriptor capacity.
    pub accept_paused: Counter,
    /// Counts connections accepted just as a reload removed their listener.
    pub unrouted: Counter,
}

/// An input of the control plane other than a signal.
#[derive(Debug)]
pub enum Event {
    /// A probe of backend `id` ended.
    Probe {
        id: u64,
        outcome: Result<(), ProbeFailure>,
    },
    /// Backend `id` failed its pool's `fall` connections in a row.
    Ejected { id: u64 },
    /// Fresh DNS answers for the host-name entries of `pool`: (index of the
    /// backend entry, the address looked up, its addresses or the
    /// resolver's error). The address guards against an answer that was
    /// under way while a reload changed the entries.
    Resolved {
        pool: String,
        answers: Vec<(usize, String, Result<Vec<SocketAddr>, String>)>,
    },
}
