//! Open connections per backend and per listener, counted across workers.
//!
//! A [`Load`] lives as long as its backend or listener does, through
//! snapshot rebuilds and reloads, so connections opened under an old
//! snapshot still count. A connection holds a [`Lease`] from before it
//! connects until it closes: `least_connections`, `power_of_two`, bounded
//! load and `max_connections` all read the same counter.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Default)]
pub struct Load {
    open: AtomicU32,
    /// Leases ever given: what the admin API shows as a backend's total.
    total: AtomicU64,
}

impl Load {
    /// Connections open now.
    pub fn open(&self) -> u32 {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections counted since this load was made.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Counts one more connection, unless `limit` (0: none) are open
    /// already. Exact across workers: two cannot both take the last place.
    pub fn lease(self: &Arc<Load>, limit: u32) -> Option<Lease> {
        self.open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |open| {
                (limit == 0 || open < limit).then_some(open + 1)
            })
            .ok()?;
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(Lease(self.clone()))
    }
}

/// One counted connection; the count goes down when it is dropped.
pub struct Lease(Arc<Load>);

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_is_never_exceeded_and_places_come_back() {
        let load = Arc::new(Load::default());
        let first = load.lease(2).unwrap();
        let _second = load.lease(2).unwrap();
        assert!(load.lease(2).is_none());
        assert_eq!(load.open(), 2);
        drop(first);
        let _third = load.lease(2).expect("the place given back");
        assert_eq!(load.open(), 2);
        assert!(load.lease(0).is_some(), "0 is no limit");
        assert_eq!(load.total(), 4);
    }
}
