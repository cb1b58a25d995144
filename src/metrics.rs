//! Prometheus metrics (SPEC "Metrics"): the series sluice exports, served as
//! text by the [admin endpoint](crate::admin).
//!
//! Series follow the configuration. [`Metrics`] is the registry of every
//! series, owned by the control plane: a series exists while something of
//! the running configuration (a listener, a backend, a route between them)
//! names it, and is removed when a reload or a DNS answer takes that away,
//! so that a retired backend's `sluice_backend_up 0` does not fire an alert
//! forever. Each full rebuild of the routing state opens a generation
//! ([`Metrics::renew`]), registers every live series again, and then
//! [`Metrics::sweep`] removes the series it did not register; process-wide
//! series are permanent. Counters with known labels are created at 0.
//!
//! The data path never formats a label nor looks a series up: every handle
//! it touches ([`ListenerStats`], [`BackendStats`]) is made by the control
//! plane and reaches the workers inside the snapshot. A handle is one shared
//! atomic, behind the `metrics` crate's `Counter`, `Gauge` and `Histogram`;
//! a handle of a removed series still counts, into nothing. Without
//! `admin.listen` the registry is off and every handle does nothing.
//!
//! metrics-exporter-prometheus's recorder cannot remove a series, so the
//! registry is this module's; the exporter's formatting writes the text.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Histogram, HistogramFn, Key, Label};
use metrics_exporter_prometheus::formatting::{
    write_help_line, write_metric_line, write_type_line,
};
use metrics_exporter_prometheus::LabelSet;

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
    /// The connection came from an address `accept_proxy.from` does not
    /// list: its PROXY header, true or forged, is not believed.
    ProxyUntrusted,
    /// The client was turned away: no backend could take it and its pool's
    /// queue was full.
    QueueFull,
    /// The client was turned away: it waited in its pool's queue for
    /// `queue.timeout` and no backend could take it.
    QueueTimeout,
}

const REASONS: [(ErrorReason, &str); 9] = [
    (ErrorReason::NoBackend, "no_backend"),
    (ErrorReason::ConnectTimeout, "connect_timeout"),
    (ErrorReason::ConnectRefused, "connect_refused"),
    (ErrorReason::OutOfResources, "out_of_resources"),
    (ErrorReason::OverLimit, "over_limit"),
    (ErrorReason::ProxyHeader, "proxy_header"),
    (ErrorReason::ProxyUntrusted, "proxy_untrusted"),
    (ErrorReason::QueueFull, "queue_full"),
    (ErrorReason::QueueTimeout, "queue_timeout"),
];

/// The results of a probe, as the `result` label of
/// `sluice_health_checks_total`.
pub const PROBE_RESULTS: [&str; 3] = ["ok", "fail", "timeout"];

/// Connect latency buckets, in seconds: loopback to cross-region.
const CONNECT_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Every metric family, in the order they are rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    ConnectionsTotal,
    ConnectionsActive,
    ConnectionErrors,
    Bytes,
    BackendConnectSeconds,
    BackendUp,
    HealthChecks,
    ConfigReloads,
    BuildInfo,
    ConnectionsCapacity,
    AcceptPaused,
    ConnectionsUnrouted,
    ListenerMaxConnections,
    ClosedOnDown,
    QueueLength,
    BackendState,
}

impl Family {
    const ALL: [Family; 16] = [
        Family::ConnectionsTotal,
        Family::ConnectionsActive,
        Family::ConnectionErrors,
        Family::Bytes,
        Family::BackendConnectSeconds,
        Family::BackendUp,
        Family::HealthChecks,
        Family::ConfigReloads,
        Family::BuildInfo,
        Family::ConnectionsCapacity,
        Family::AcceptPaused,
        Family::ConnectionsUnrouted,
        Family::ListenerMaxConnections,
        Family::ClosedOnDown,
        Family::QueueLength,
        Family::BackendState,
    ];

    /// Name, Prometheus type and help text.
    fn describe(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Family::ConnectionsTotal => (
                "sluice_connections_total",
                "counter",
                "Connections relayed to a backend.",
            ),
            Family::ConnectionsActive => (
                "sluice_connections_active",
                "gauge",
                "Connections open now.",
            ),
            Family::ConnectionErrors => (
                "sluice_connection_errors_total",
                "counter",
                "Failed connect attempts (connect_*) and clients turned away (no_backend, out_of_resources, over_limit, proxy_header, proxy_untrusted, queue_full, queue_timeout).",
            ),
            Family::Bytes => (
                "sluice_bytes_total",
                "counter",
                "Bytes relayed, counted as they move.",
            ),
            Family::BackendConnectSeconds => (
                "sluice_backend_connect_seconds",
                "histogram",
                "Time to establish a backend connection.",
            ),
            Family::BackendUp => (
                "sluice_backend_up",
                "gauge",
                "1 if the backend is in rotation, 0 if not.",
            ),
            Family::HealthChecks => (
                "sluice_health_checks_total",
                "counter",
                "Active probes by result.",
            ),
            Family::ConfigReloads => (
                "sluice_config_reloads_total",
                "counter",
                "Configuration reloads by result.",
            ),
            Family::BuildInfo => (
                "sluice_build_info",
                "gauge",
                "Always 1; the version and the data path's driver (io_uring or epoll) are labels.",
            ),
            Family::ConnectionsCapacity => (
                "sluice_connections_capacity",
                "gauge",
                "Connections the descriptor limit allows; at it, new clients wait in the listen backlog.",
            ),
            Family::AcceptPaused => (
                "sluice_accept_paused_total",
                "counter",
                "Times a worker stopped accepting on a listener because the descriptor capacity was reached.",
            ),
            Family::ConnectionsUnrouted => (
                "sluice_connections_unrouted_total",
                "counter",
                "Connections accepted just as a reload removed their listener, closed unserved.",
            ),
            Family::ListenerMaxConnections => (
                "sluice_listener_max_connections",
                "gauge",
                "The listener's max_connections; 0: no limit.",
            ),
            Family::ClosedOnDown => (
                "sluice_connections_closed_on_down_total",
                "counter",
                "Connections reset because their backend was marked down or removed (on_down: close).",
            ),
            Family::QueueLength => (
                "sluice_queue_length",
                "gauge",
                "Clients waiting in the pool's queue for a backend.",
            ),
            Family::BackendState => (
                "sluice_backend_state",
                "gauge",
                "1 for the backend's operator state (ready, drain, maint), 0 for the others.",
            ),
        }
    }
}

/// Label pairs in the order they are written.
type Labels = Vec<(&'static str, String)>;

/// The registry of every series. Cheap to share: clones are one registry.
#[derive(Clone, Default)]
pub struct Metrics(Option<Arc<Mutex<Registry>>>);

#[derive(Default)]
struct Registry {
    series: BTreeMap<(Family, Labels), Entry>,
    /// Opened by every full rebuild: a series registered since carries it.
    generation: u64,
}

struct Entry {
    value: Value,
    /// The generation it was last registered in; `None`: permanent.
    registered: Option<u64>,
}

enum Value {
    Counter(Arc<AtomicU64>),
    /// An `f64`, as its bits.
    Gauge(Arc<AtomicU64>),
    Histogram(Arc<Buckets>),
}

impl Metrics {
    /// The registry, or (`enabled` false) one that keeps nothing and hands
    /// out handles that do nothing.
    pub fn new(enabled: bool) -> Metrics {
        if !enabled {
            return Metrics(None);
        }
        Metrics(Some(Arc::default()))
    }

    /// `sluice_build_info`: the version, and the driver the workers run.
    pub fn build_info(&self, io: &str) {
        self.permanent_gauge(
            Family::BuildInfo,
            vec![
                ("version", env!("CARGO_PKG_VERSION").to_owned()),
                ("io", io.to_owned()),
            ],
        )
        .set(1.0);
    }

    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// A counter of the running configuration, made at 0 if new.
    pub fn counter(&self, family: Family, labels: Labels) -> Counter {
        self.counter_kept(family, labels, false)
    }

    pub fn gauge(&self, family: Family, labels: Labels) -> Gauge {
        self.gauge_kept(family, labels, false)
    }

    pub fn histogram(&self, family: Family, labels: Labels) -> Histogram {
        match self.register(family, labels, false, || Value::Histogram(Arc::default())) {
            Some(Value::Histogram(buckets)) => Histogram::from_arc(buckets),
            _ => Histogram::noop(),
        }
    }

    /// A counter that lives as long as the process.
    pub fn permanent_counter(&self, family: Family, labels: Labels) -> Counter {
        self.counter_kept(family, labels, true)
    }

    pub fn permanent_gauge(&self, family: Family, labels: Labels) -> Gauge {
        self.gauge_kept(family, labels, true)
    }

    /// A counter, `permanent` or of the running configuration.
    fn counter_kept(&self, family: Family, labels: Labels, permanent: bool) -> Counter {
        match self.register(family, labels, permanent, || Value::Counter(Arc::default())) {
            Some(Value::Counter(atomic)) => Counter::from_arc(atomic),
            _ => Counter::noop(),
        }
    }

    /// A gauge, `permanent` or of the running configuration.
    fn gauge_kept(&self, family: Family, labels: Labels, permanent: bool) -> Gauge {
        match self.register(family, labels, permanent, || Value::Gauge(Arc::default())) {
            Some(Value::Gauge(atomic)) => Gauge::from_arc(atomic),
            _ => Gauge::noop(),
        }
    }

    /// The series, new or already there, marked as part of the running
    /// configuration.
    fn register(
        &self,
        family: Family,
        labels: Labels,
        permanent: bool,
        new: impl FnOnce() -> Value,
    ) -> Option<Value> {
        let mut registry = self.0.as_ref()?.lock().unwrap_or_else(|e| e.into_inner());
        let generation = registry.generation;
        let entry = registry
            .series
            .entry((family, labels))
            .or_insert_with(|| Entry {
                value: new(),
                registered: None,
            });
        entry.registered = (!permanent).then_some(generation);
        Some(match &entry.value {
            Value::Counter(atomic) => Value::Counter(atomic.clone()),
            Value::Gauge(atomic) => Value::Gauge(atomic.clone()),
            Value::Histogram(buckets) => Value::Histogram(buckets.clone()),
        })
    }

    /// Starts a full rebuild: the series registered from now on are those
    /// of the configuration being built.
    pub fn renew(&self) {
        if let Some(registry) = &self.0 {
            registry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .generation += 1;
        }
    }

    /// Ends a full rebuild: removes every series not registered since
    /// [`Metrics::renew`], what the configuration no longer names.
    pub fn sweep(&self) {
        let Some(registry) = &self.0 else {
            return;
        };
        let mut registry = registry.lock().unwrap_or_else(|e| e.into_inner());
        let generation = registry.generation;
        registry
            .series
            .retain(|_, entry| entry.registered.is_none_or(|g| g == generation));
    }

    /// Every series, in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let Some(registry) = &self.0 else {
            return out;
        };
        let registry = registry.lock().unwrap_or_else(|e| e.into_inner());
        for family in Family::ALL {
            let (name, kind, help) = family.describe();
            let mut series = registry
                .series
                .range((family, Vec::new())..)
                .take_while(|((f, _), _)| *f == family)
                .peekable();
            if series.peek().is_none() {
                continue;
            }
            write_help_line(&mut out, name, None, None, help);
            write_type_line(&mut out, name, None, None, kind);
            for ((_, labels), entry) in series {
                let labels = label_set(name, labels);
                match &entry.value {
                    Value::Counter(atomic) => {
                        let value = atomic.load(Ordering::Relaxed);
                        write_metric_line(
                            &mut out,
                            name,
                            None,
                            &labels,
                            None::<(&str, &str)>,
                            value,
                            None,
                        );
                    }
                    Value::Gauge(atomic) => {
                        let value = f64::from_bits(atomic.load(Ordering::Relaxed));
                        write_metric_line(
                            &mut out,
                            name,
                            None,
                            &labels,
                            None::<(&str, &str)>,
                            value,
                            None,
                        );
                    }
                    Value::Histogram(buckets) => buckets.render(&mut out, name, &labels),
                }
            }
        }
        out
    }
}

fn label_set(name: &str, labels: &Labels) -> LabelSet {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(key, value)| Label::new(*key, value.clone()))
        .collect();
    LabelSet::from_key_and_global(
        &Key::from_parts(name.to_owned(), labels),
        &Default::default(),
    )
}

/// A histogram over [`CONNECT_BUCKETS`]: a count per bucket, the sum (in
/// nanoseconds) and the count of all observations.
#[derive(Default)]
pub struct Buckets {
    counts: [AtomicU64; CONNECT_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl HistogramFn for Buckets {
    fn record(&self, seconds: f64) {
        let bucket = CONNECT_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(CONNECT_BUCKETS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add((seconds * 1e9) as u64, Ordering::Relaxed);
    }
}

impl Buckets {
    fn render(&self, out: &mut String, name: &str, labels: &LabelSet) {
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = CONNECT_BUCKETS
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), f64::to_string);
            write_metric_line(
                out,
                name,
                Some("bucket"),
                labels,
                Some(("le", le)),
                cumulative,
                None,
            );
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        write_metric_line(
            out,
            name,
            Some("sum"),
            labels,
            None::<(&str, &str)>,
            sum,
            None,
        );
        write_metric_line(
            out,
            name,
            Some("count"),
            labels,
            None::<(&str, &str)>,
            cumulative,
            None,
        );
    }
}

mod stats;

pub use stats::{BackendStats, ListenerStats, PoolStats, ProcessStats, RouteStats};

#[cfg(test)]
mod tests;
