//! What the control plane tells the workers when routing changes beyond a
//! new snapshot: reset the connections of backends that went down in
//! pools with `on_down: close`, and try the clients waiting in queues
//! again once a backend may take them.

use std::sync::Arc;

use tracing::info;

use super::Controller;
use crate::config::schema::OnDown;
use crate::mailbox::Command;

impl Controller {
    /// Backend `id` of pool `pool` was marked down by its probes: its
    /// connections are reset if the pool says so, unless the pool now
    /// routes over all its backends (failing open), which keeps every
    /// connection where it is.
    pub(super) fn backend_down(&self, pool: &str, id: u64, name: &str) {
        let snapshot = self.shared.snapshot.load();
        let Some(pool) = snapshot.pool(pool) else {
            return;
        };
        if pool.on_down == OnDown::Close && !pool.panic() {
            self.close_sessions(vec![(id, name.to_owned())]);
        }
    }

    /// The workers reset both sides of every connection relaying to one of
    /// `backends` (identifier, name).
    pub(super) fn close_sessions(&self, backends: Vec<(u64, String)>) {
        if backends.is_empty() {
            return;
        }
        let (ids, names): (Vec<u64>, Vec<String>) = backends.into_iter().unzip();
        info!(
            backends = %names.join(", "),
            "on_down: close: resetting the connections of backends that went down or left"
        );
        let backends: Arc<[u64]> = ids.into();
        for worker in &self.workers {
            worker.send(Command::CloseBackends(backends.clone()));
        }
    }

    /// Clients waiting in a queue may find a backend now.
    pub(super) fn dispatch(&self) {
        for worker in &self.workers {
            worker.send(Command::Dispatch);
        }
    }
}
