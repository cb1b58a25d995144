//! A pool's queue: clients that no backend can take now (none up in a pool
//! that fails closed, every one at its `max_connections`, or every connect
//! failed in a pool that fails closed) wait for one, up to `queue.size` of
//! them at once over every worker, each up to `queue.timeout`.
//!
//! A waiting client holds its own socket and nothing else: no backend
//! socket, no buffer, no place at a backend. Its [`Ticket`] is its place in
//! the queue; the count it holds is shared by every worker and outlives
//! snapshots (a health change rebuilds the pool, not its queue), and is
//! exported as `sluice_queue_length`. Each worker keeps its own waiting
//! clients in arrival order and tries them again whenever a backend may
//! have become free: the control plane's word that a pool changed, a
//! connection of its own closing, and every [`RECHECK`] while any wait (a
//! place freed on another worker).

use std::sync::Arc;
use std::time::Duration;

use metrics::Gauge;

use crate::balancer::load::{Lease, Load};

/// How often a worker with waiting clients tries them again unasked.
pub const RECHECK: Duration = Duration::from_millis(50);

/// The clients waiting in one pool's queue, over every worker: counted as
/// a backend counts its connections.
pub struct Waiting {
    clients: Arc<Load>,
    length: Gauge,
}

impl Default for Waiting {
    /// Counted, not exported.
    fn default() -> Waiting {
        Waiting::new(Gauge::noop())
    }
}

impl Waiting {
    pub fn new(length: Gauge) -> Waiting {
        Waiting {
            clients: Arc::default(),
            length,
        }
    }

    /// A place in the queue, unless `size` clients wait already (size 0:
    /// nobody waits).
    pub fn join(self: &Arc<Waiting>, size: u32) -> Option<Ticket> {
        if size == 0 {
            return None;
        }
        let lease = self.clients.lease(size)?;
        self.length.increment(1.0);
        Some(Ticket {
            _lease: lease,
            queue: self.clone(),
        })
    }

    /// Clients waiting now.
    pub fn len(&self) -> u32 {
        self.clients.open()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A client's place in its pool's queue, given back when dropped.
pub struct Ticket {
    _lease: Lease,
    queue: Arc<Waiting>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.queue.length.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_holds_size_clients_and_frees_their_places() {
        let waiting = Arc::new(Waiting::default());
        let first = waiting.join(2).unwrap();
        let second = waiting.join(2).unwrap();
        assert!(waiting.join(2).is_none(), "full");
        assert_eq!(waiting.len(), 2);
        drop(first);
        let third = waiting.join(2).unwrap();
        drop((second, third));
        assert!(waiting.is_empty());
        assert!(waiting.join(0).is_none(), "size 0: nobody waits");
    }
}
