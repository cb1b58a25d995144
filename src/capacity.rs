//! How many connections sluice can hold at once, and the count of those it
//! holds.
//!
//! Every proxied connection takes two descriptors (client and backend), and
//! sluice needs more for itself: listening sockets, probes, pipes kept for
//! splicing, its runtimes. A balancer that accepts a client it has no
//! descriptor left to serve can only fail it, and worse, the failure looks
//! like the backend's ("Too many open files" on connect). So, as HAProxy
//! derives its `maxconn` from the descriptor limit, sluice raises its soft
//! `RLIMIT_NOFILE` to the hard limit at start ([`raise_descriptor_limit`]),
//! divides it ([`Budget`]) and stops accepting at that capacity: new
//! clients wait in the kernel's listen backlog until a connection ends
//! ([`Connections::wait_for_room`]).

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;
use tracing::warn;

/// Descriptors kept for sluice itself, whatever the configuration: standard
/// streams, the control plane's runtime and signalfd, the notify and admin
/// sockets, host-name lookups, reading the file on reload, and a margin.
const RESERVED: usize = 64;

/// Admin endpoint connections open at once: a 64th of the descriptor
/// limit, within these bounds.
const ADMIN_CONNECTIONS: (usize, usize) = (16, 256);

/// Descriptors each worker's runtime holds (io_uring ring, epoll, eventfds).
const PER_WORKER: usize = 8;

/// Most pipes a worker keeps for splicing, two descriptors each.
const MAX_PIPES_PER_WORKER: usize = 256;

/// Raises the soft descriptor limit to the hard limit (capped by the
/// kernel's `fs.nr_open`); returns the limit now in force. If it cannot (a
/// system call filter that forbids it), says so and keeps the soft limit.
pub fn raise_descriptor_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            warn!("cannot read the descriptor limit, assuming 1024: {e}");
            return 1024;
        }
    };
    let ceiling = if hard == RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(soft)
    } else {
        hard
    };
    if ceiling <= soft {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, ceiling, hard) {
        Ok(()) => ceiling,
        Err(e) => {
            warn!(
                "cannot raise the descriptor limit from {soft} to {ceiling}, keeping {soft}: {e}"
            );
            soft
        }
    }
}

/// How a descriptor limit is shared out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The descriptor limit.
    pub limit: u64,
    /// Pipes each worker may have, pooled or in use; beyond, a connection
    /// copies instead of splicing.
    pub pipes_per_worker: usize,
    /// Admin endpoint connections open at once (see [`crate::admin`]).
    pub admin_connections: usize,
    /// Descriptors for everything but connections and pipes.
    pub reserved: usize,
    /// Connections that fit in what is left, two descriptors each.
    pub connections: usize,
}

impl Budget {
    /// The budget of `limit` descriptors for `workers` workers, each with a
    /// socket per listener (`listeners`; the control plane keeps a
    /// duplicate of each, to stop it or change its backlog, and the
    /// io_uring driver may accept one client per socket before it can
    /// count it), and one probe socket per backend (`backends`).
    pub fn new(limit: u64, workers: usize, listeners: usize, backends: usize) -> Budget {
        let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
        // A small limit keeps a small share for pipes: splicing is an
        // optimisation, connections are the point.
        let pipes_per_worker = (limit_usize / 64 / workers.max(1)).min(MAX_PIPES_PER_WORKER);
        let admin_connections = (limit_usize / 64).clamp(ADMIN_CONNECTIONS.0, ADMIN_CONNECTIONS.1);
        let reserved =
            RESERVED + admin_connections + workers * (PER_WORKER + 3 * listeners) + backends;
        let pipes = 2 * pipes_per_worker * workers;
        Budget {
            limit,
            pipes_per_worker,
            admin_connections,
            reserved,
            connections: limit_usize.saturating_sub(reserved + pipes) / 2,
        }
    }

    /// Descriptors set aside for pipes, all workers together.
    pub fn pipe_descriptors(&self, workers: usize) -> usize {
        2 * self.pipes_per_worker * workers
    }
}

/// The connections open now, all workers together, against the capacity.
/// Lives as long as the process.
pub struct Connections {
    open: AtomicUsize,
    capacity: AtomicUsize,
    /// Accept loops waiting for a connection to end.
    waiting: AtomicUsize,
    room: Notify,
}

/// One connection counted in [`Connections`] until dropped.
pub struct Slot(&'static Connections);

impl Connections {
    pub fn new(capacity: usize) -> Connections {
        Connections {
            open: AtomicUsize::new(0),
            capacity: AtomicUsize::new(capacity),
            waiting: AtomicUsize::new(0),
            room: Notify::new(),
        }
    }

    /// Connections open now (accepted and not yet closed).
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    pub fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed)
    }

    /// A new capacity (after a reload changed what is reserved).
    pub fn set_capacity(&self, capacity: usize) {
        self.capacity.store(capacity, Ordering::SeqCst);
        self.room.notify_waiters();
    }

    /// Counts one more connection, unless that would go over capacity.
    pub fn take(&'static self) -> Option<Slot> {
        let capacity = self.capacity();
        self.open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |open| {
                (open < capacity).then_some(open + 1)
            })
            .ok()
            .map(|_| Slot(self))
    }

    /// Waits until fewer connections than the capacity are open. Safe to
    /// drop while waiting (a stopped listener's loop does).
    pub async fn wait_for_room(&self) {
        loop {
            let notified = self.room.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the count is read again, so that a
            // connection ending in between is not missed.
            notified.as_mut().enable();
            let _waiting = Waiting::new(&self.waiting);
            if self.open.load(Ordering::SeqCst) < self.capacity() {
                return;
            }
            notified.await;
        }
    }
}

/// Counts one waiting accept loop for as long as it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(waiting: &'a AtomicUsize) -> Waiting<'a> {
        waiting.fetch_add(1, Ordering::SeqCst);
        Waiting(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let connections = self.0;
        connections.open.fetch_sub(1, Ordering::SeqCst);
        // Read after the count went down: a loop that starts waiting after
        // this reads the new count itself.
        if connections.waiting.load(Ordering::SeqCst) > 0 {
            connections.room.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_keeps_room_for_sluice_and_halves_the_rest() {
        let budget = Budget::new(1_048_576, 4, 2, 10);
        assert_eq!(budget.pipes_per_worker, 256);
        assert_eq!(budget.admin_connections, 256);
        assert_eq!(budget.reserved, 64 + 256 + 4 * (8 + 3 * 2) + 10);
        assert_eq!(
            budget.connections,
            (1_048_576 - budget.reserved - 2 * 256 * 4) / 2
        );
    }

    #[test]
    fn a_small_limit_keeps_few_pipes_and_may_leave_no_connection() {
        let budget = Budget::new(256, 2, 1, 2);
        assert_eq!(budget.pipes_per_worker, 2);
        assert_eq!(budget.admin_connections, 16);
        assert_eq!(budget.connections, (256 - (64 + 16 + 2 * 11 + 2) - 8) / 2);
        assert_eq!(Budget::new(64, 2, 1, 2).connections, 0);
    }

    #[test]
    fn slots_stop_at_capacity_and_free_room_when_dropped() {
        let connections: &'static Connections = Box::leak(Box::new(Connections::new(2)));
        let first = connections.take().expect("room for one");
        let _second = connections.take().expect("room for two");
        assert!(connections.take().is_none(), "full");
        assert_eq!(connections.open(), 2);
        drop(first);
        assert_eq!(connections.open(), 1);
        assert!(connections.take().is_some());
        connections.set_capacity(1);
        assert!(connections.take().is_none(), "a lower capacity applies");
    }

    #[test]
    fn a_waiting_loop_wakes_when_a_connection_ends() {
        let connections: &'static Connections = Box::leak(Box::new(Connections::new(1)));
        let slot = connections.take().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let waiter = tokio::spawn(connections.wait_for_room());
            tokio::task::yield_now().await;
            assert!(!waiter.is_finished());
            std::thread::spawn(move || drop(slot)).join().unwrap();
            tokio::time::timeout(std::time::Duration::from_secs(20), waiter)
                .await
                .expect("woken when the connection ended")
                .unwrap();
        });
    }
}
