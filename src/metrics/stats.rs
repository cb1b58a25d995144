//! The handles the data path counts with, one struct per thing counted: a
//! listener, a backend (and each listener's route to it), a pool, the
//! process. Made by the control plane, which labels them; carried to the
//! workers in the snapshot.

use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram};

use super::{ErrorReason, Family, Metrics, PROBE_RESULTS, REASONS};
use crate::state::OperatorState;

/// Handles of one listener.
pub struct ListenerStats {
    errors: [Counter; REASONS.len()],
}

impl ListenerStats {
    /// The listener's series, every error reason at 0 if new.
    pub fn new(metrics: &Metrics, listener: &str) -> ListenerStats {
        ListenerStats {
            errors: REASONS.map(|(_, reason)| {
                metrics.counter(
                    Family::ConnectionErrors,
                    vec![
                        ("listener", listener.to_owned()),
                        ("reason", reason.to_owned()),
                    ],
                )
            }),
        }
    }

    /// Exports listener `listener`'s `max_connections`, so that an alert
    /// can compare its open connections with it.
    pub fn limit(metrics: &Metrics, listener: &str, max_connections: u32) {
        metrics
            .gauge(
                Family::ListenerMaxConnections,
                vec![("listener", listener.to_owned())],
            )
            .set(f64::from(max_connections));
    }

    pub fn error(&self, reason: ErrorReason) {
        let index = REASONS
            .iter()
            .position(|(r, _)| *r == reason)
            .expect("every reason is listed");
        self.errors[index].increment(1);
    }
}

/// Handles of one backend: its connect latency, up/down and probe results,
/// and per listener that feeds its pool, its connections and bytes.
pub struct BackendStats {
    pub connect_seconds: Histogram,
    pub up: Gauge,
    /// Connections reset by `on_down: close`.
    pub closed_on_down: Counter,
    probes: [Counter; PROBE_RESULTS.len()],
    /// One series per operator state, in [`OperatorState::ALL`]'s order.
    states: [Gauge; OperatorState::ALL.len()],
    routes: Vec<(Arc<str>, RouteStats)>,
}

/// Handles of one (listener, backend) pair.
#[derive(Clone)]
pub struct RouteStats {
    pub connections: Counter,
    pub active: Gauge,
    pub to_backend: Counter,
    pub to_client: Counter,
}

impl BackendStats {
    /// The series of backend `backend` of `pool`, fed by `listeners`.
    pub fn new(metrics: &Metrics, pool: &str, backend: &str, listeners: &[&str]) -> BackendStats {
        let of_backend = || vec![("pool", pool.to_owned()), ("backend", backend.to_owned())];
        let routes = listeners
            .iter()
            .map(|&listener| {
                let labels = vec![
                    ("listener", listener.to_owned()),
                    ("backend", backend.to_owned()),
                ];
                let bytes = |direction: &str| {
                    let mut labels = labels.clone();
                    labels.push(("direction", direction.to_owned()));
                    metrics.counter(Family::Bytes, labels)
                };
                let stats = RouteStats {
                    connections: metrics.counter(Family::ConnectionsTotal, labels.clone()),
                    active: metrics.gauge(Family::ConnectionsActive, labels.clone()),
                    to_backend: bytes("to_backend"),
                    to_client: bytes("to_client"),
                };
                (Arc::from(listener), stats)
            })
            .collect();
        BackendStats {
            connect_seconds: metrics.histogram(Family::BackendConnectSeconds, of_backend()),
            up: metrics.gauge(Family::BackendUp, of_backend()),
            closed_on_down: metrics.counter(Family::ClosedOnDown, of_backend()),
            probes: PROBE_RESULTS.map(|result| {
                let mut labels = of_backend();
                labels.push(("result", result.to_owned()));
                metrics.counter(Family::HealthChecks, labels)
            }),
            states: OperatorState::ALL.map(|state| {
                let mut labels = of_backend();
                labels.push(("state", state.name().to_owned()));
                metrics.gauge(Family::BackendState, labels)
            }),
            routes,
        }
    }

    /// Shows `state` as the backend's operator state.
    pub fn operator_state(&self, state: OperatorState) {
        for (gauge, each) in self.states.iter().zip(OperatorState::ALL) {
            gauge.set(if each == state { 1.0 } else { 0.0 });
        }
    }

    /// The handles for connections from `listener` (one of the few that
    /// feed this pool: a short scan, once per connection).
    pub fn route(&self, listener: &str) -> Option<&RouteStats> {
        self.routes
            .iter()
            .find(|(name, _)| &**name == listener)
            .map(|(_, stats)| stats)
    }

    /// Counts a probe by its result, one of [`PROBE_RESULTS`].
    pub fn probed(&self, result: &str) {
        if let Some(i) = PROBE_RESULTS.iter().position(|r| *r == result) {
            self.probes[i].increment(1);
        }
    }
}

/// Handles of one pool.
pub struct PoolStats {
    /// Clients in its queue, over every worker.
    pub queue_length: Gauge,
}

impl PoolStats {
    pub fn new(metrics: &Metrics, pool: &str) -> PoolStats {
        PoolStats {
            queue_length: metrics.gauge(Family::QueueLength, vec![("pool", pool.to_owned())]),
        }
    }
}

/// Process-wide handles, made once.
pub struct ProcessStats {
    reloads_ok: Counter,
    reloads_failed: Counter,
    pub capacity: Gauge,
    pub accept_paused: Counter,
    pub unrouted: Counter,
}

impl ProcessStats {
    pub fn new(metrics: &Metrics) -> ProcessStats {
        let reloads = |result: &str| {
            metrics.permanent_counter(Family::ConfigReloads, vec![("result", result.to_owned())])
        };
        ProcessStats {
            reloads_ok: reloads("ok"),
            reloads_failed: reloads("fail"),
            capacity: metrics.permanent_gauge(Family::ConnectionsCapacity, Vec::new()),
            accept_paused: metrics.permanent_counter(Family::AcceptPaused, Vec::new()),
            unrouted: metrics.permanent_counter(Family::ConnectionsUnrouted, Vec::new()),
        }
    }

    pub fn reload(&self, ok: bool) {
        match ok {
            true => self.reloads_ok.increment(1),
            false => self.reloads_failed.increment(1),
        }
    }
}
