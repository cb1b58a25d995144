//! Prometheus metrics (SPEC "Metrics"), served by the [admin
//! endpoint](crate::admin).
//!
//! The data path never formats a label nor looks a metric up: every handle
//! it touches ([`ListenerStats`], [`BackendStats`]) is registered when a
//! snapshot is built, by the control plane, and reaches the workers inside
//! the snapshot. Each handle is one shared atomic. Without `admin.listen` no
//! recorder is installed and the handles do nothing.

use std::sync::Arc;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics::{Counter, Gauge, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Why a connection failed, as the `reason` label of
/// `sluice_connection_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorReason {
    /// The client was turned away: no backend could be reached.
    NoBackend,
    /// One connect attempt timed out.
    ConnectTimeout,
    /// One connect attempt was refused (or failed otherwise).
    ConnectRefused,
    /// The client was turned away: a connect failed for want of a local
    /// resource (sluice was out of descriptors, memory, socket buffers or
    /// local ports). Never counted against the backend, and no other
    /// backend is tried.
    OutOfResources,
    /// The client was turned away by a limit: the listener's
    /// `max_connections` or `rate_limit`, or every backend full.
    OverLimit,
    /// The client's PROXY protocol header was missing or malformed.
    ProxyHeader,
}

const REASONS: [(ErrorReason, &str); 6] = [
    (ErrorReason::NoBackend, "no_backend"),
    (ErrorReason::ConnectTimeout, "connect_timeout"),
    (ErrorReason::ConnectRefused, "connect_refused"),
    (ErrorReason::OutOfResources, "out_of_resources"),
    (ErrorReason::OverLimit, "over_limit"),
    (ErrorReason::ProxyHeader, "proxy_header"),
];

/// Handles of one listener.
pub struct ListenerStats {
    errors: [Counter; REASONS.len()],
}

impl ListenerStats {
    pub fn new(listener: &str) -> ListenerStats {
        ListenerStats {
            errors: REASONS.map(|(_, reason)| {
                counter!("sluice_connection_errors_total", "listener" => listener.to_owned(), "reason" => reason)
            }),
        }
    }

    pub fn error(&self, reason: ErrorReason) {
        let index = REASONS
            .iter()
            .position(|(r, _)| *r == reason)
            .expect("every reason is listed");
        self.errors[index].increment(1);
    }
}

/// Handles of one backend: its connect latency, and per listener that
/// feeds its pool, its connections and bytes.
pub struct BackendStats {
    pub connect_seconds: Histogram,
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
    pub fn new(backend: &str, listeners: &[&str]) -> BackendStats {
        let routes = listeners
            .iter()
            .map(|&listener| {
                let labels = [
                    ("listener", listener.to_owned()),
                    ("backend", backend.to_owned()),
                ];
                let bytes = |direction: &'static str| {
                    let mut labels = labels.to_vec();
                    labels.push(("direction", direction.to_owned()));
                    counter!("sluice_bytes_total", &labels)
                };
                let stats = RouteStats {
                    connections: counter!("sluice_connections_total", &labels),
                    active: gauge!("sluice_connections_active", &labels),
                    to_backend: bytes("to_backend"),
                    to_client: bytes("to_client"),
                };
                (Arc::from(listener), stats)
            })
            .collect();
        BackendStats {
            connect_seconds: histogram!("sluice_backend_connect_seconds", "backend" => backend.to_owned()),
            routes,
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
}

/// Control-plane metrics: set where they happen, off the data path.
pub fn backend_up(pool: &str, backend: &str, up: bool) {
    gauge!("sluice_backend_up", "pool" => pool.to_owned(), "backend" => backend.to_owned())
        .set(if up { 1.0 } else { 0.0 });
}

pub fn health_check(pool: &str, backend: &str, result: &'static str) {
    counter!("sluice_health_checks_total", "pool" => pool.to_owned(), "backend" => backend.to_owned(), "result" => result)
        .increment(1);
}

/// Connections the descriptor limit allows.
pub fn capacity(connections: usize) {
    gauge!("sluice_connections_capacity").set(connections as f64);
}

/// A worker stopped accepting on a listener: the descriptor capacity is
/// reached.
pub fn accept_paused() {
    counter!("sluice_accept_paused_total").increment(1);
}

pub fn reload(ok: bool) {
    counter!("sluice_config_reloads_total", "result" => if ok { "ok" } else { "fail" })
        .increment(1);
}

/// Connect latency buckets, in seconds: loopback to cross-region.
const CONNECT_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Installs the process-wide Prometheus recorder; call once, before any
/// snapshot is built.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("sluice_backend_connect_seconds".into()),
            &CONNECT_BUCKETS,
        )
        .map_err(|e| format!("metrics: {e}"))?
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    describe_counter!(
        "sluice_connections_total",
        "Connections relayed to a backend."
    );
    describe_gauge!("sluice_connections_active", "Connections open now.");
    describe_counter!(
        "sluice_connection_errors_total",
        "Failed connect attempts (connect_*) and clients turned away (no_backend, out_of_resources, over_limit, proxy_header)."
    );
    describe_counter!(
        "sluice_bytes_total",
        Unit::Bytes,
        "Bytes relayed, counted as they move."
    );
    describe_histogram!(
        "sluice_backend_connect_seconds",
        Unit::Seconds,
        "Time to establish a backend connection."
    );
    describe_gauge!(
        "sluice_backend_up",
        "1 if the backend is in rotation, 0 if not."
    );
    describe_counter!("sluice_health_checks_total", "Active probes by result.");
    describe_counter!(
        "sluice_config_reloads_total",
        "Configuration reloads by result."
    );
    describe_gauge!("sluice_build_info", "Always 1; the version is a label.");
    describe_gauge!(
        "sluice_connections_capacity",
        "Connections the descriptor limit allows; at it, new clients wait in the listen backlog."
    );
    describe_counter!(
        "sluice_accept_paused_total",
        "Times a worker stopped accepting on a listener because the descriptor capacity was reached."
    );
    counter!("sluice_accept_paused_total").absolute(0);
    gauge!("sluice_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}
