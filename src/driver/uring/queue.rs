//! What the io_uring worker does for the pools' queues and for `on_down:
//! close`: it keeps its waiting clients in arrival order and tries them
//! again when a backend may have become free (see
//! [`crate::connection::queue`]), and resets the connections that relay to
//! a backend gone down.

use std::collections::VecDeque;
use std::time::Instant;

use super::Worker;
use crate::connection::ending::Ending;
use crate::connection::queue::RECHECK;
use crate::net;

/// This worker's clients in a queue, in arrival order, and when they were
/// last tried.
pub(super) struct Waiters {
    /// (Slot, generation) of each.
    clients: VecDeque<(u32, u32)>,
    /// Something may have freed a backend: try them at the next turn's end.
    due: bool,
    tried: Instant,
}

impl Default for Waiters {
    fn default() -> Waiters {
        Waiters {
            clients: VecDeque::new(),
            due: false,
            tried: Instant::now(),
        }
    }
}

impl Waiters {
    /// When the loop must wake to try them again unasked, if any wait.
    pub(super) fn next_try(&self) -> Option<Instant> {
        (!self.clients.is_empty()).then(|| self.tried + RECHECK)
    }

    /// A backend may have become free.
    pub(super) fn wake(&mut self) {
        self.due = !self.clients.is_empty();
    }
}

impl Worker {
    /// Connection `index` waits in its pool's queue (its deadline is set).
    pub(super) fn enqueue(&mut self, index: u32, generation: u32) {
        self.waiting.clients.push_back((index, generation));
    }

    /// At the end of a turn: the waiting clients are tried again, oldest
    /// first, if something may have freed a backend or [`RECHECK`] passed.
    pub(super) fn dispatch(&mut self) {
        let recheck = self.waiting.next_try().is_some_and(|at| self.now >= at);
        if !(self.waiting.due || recheck) {
            return;
        }
        let (now, shared) = (self.now, self.shared);
        self.waiting.due = false;
        self.waiting.tried = now;
        // Those that wait on are queued again, in the same order.
        for (index, generation) in std::mem::take(&mut self.waiting.clients) {
            let Some(conn) = self.slab.of(index, generation) else {
                continue;
            };
            if conn.closing || conn.session.wait_deadline().is_none() {
                continue;
            }
            let local = || net::local_addr(&conn.client);
            let step = conn.session.retry(local, shared, now);
            self.step(index, step);
        }
    }

    /// Resets both sides of every connection relaying to one of `backends`.
    pub(super) fn close_backends(&mut self, backends: &[u64]) {
        for index in 0..self.slab.end() {
            let Some(conn) = self.slab.live(index).filter(|conn| !conn.closing) else {
                continue;
            };
            if conn
                .session
                .backend_id()
                .is_some_and(|id| backends.contains(&id))
            {
                conn.session.end(Ending::BackendDown);
                self.end(index);
            }
        }
    }
}
