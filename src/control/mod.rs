//! The control plane: everything that changes routing, on one thread.
//!
//! The [`Controller`] runs on the main thread, in its own io_uring runtime,
//! and reacts to four kinds of input: signals (SIGHUP reloads, SIGTERM and
//! SIGINT drain and stop), probe outcomes, passive-ejection reports from the
//! workers, and the periodic re-resolution of host names. Each change ends in
//! a new [`Snapshot`] published to the workers with one atomic swap; the
//! workers never wait for the control plane, and it never touches a
//! connection. Its parts, each in a file of its own:
//!
//! - [`listeners`]: the listening sockets, keyed by address;
//! - [`backends`]: the backend registry, one identity per backend, with its
//!   health, load, probe and metric series;
//! - [`publish`]: the next snapshot, a pure function of the configuration,
//!   the registries and the snapshot in use;
//! - `drain`: stopping; `resolve`: re-resolving host names;
//! - `operator`: the admin API's asks, operator states and the state file.
//!
//! A reload reads as: load (on a thread of its own), bind the new
//! listeners (which can fail, so first), apply listeners, publish.
//!
//! Nothing here waits without a bound. Work that may block (reading and
//! resolving the file, DNS lookups) runs on a thread of its own and comes
//! back as a message, so that a signal is handled while it runs: SIGTERM
//! during a slow reload abandons the reload. Notify messages are queued,
//! never sent with a blocking call (see [`systemd`](crate::systemd)).

mod backends;
mod drain;
mod error;
mod listeners;
mod operator;
mod publish;
mod resolve;
mod workers;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::mpsc::{self, UnboundedReceiver};
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use crate::admin::api::Ask;
use crate::admin::{self, Endpoint, Readiness};
use crate::capacity::{Budget, Connections};
use crate::config::{self, Config, ConfigError};
use crate::health::ProbeFailure;
use crate::logging::Throttle;
use crate::mailbox::{BoundListener, Command, Mailbox};
use crate::metrics::{ListenerStats, Metrics, ProcessStats};
use crate::shared::{Event, Shared};
use crate::signals::{Request, Signals};
use crate::snapshot::{Backend, Pool, Snapshot};
use crate::state;
use crate::systemd::Notifier;
use crate::worker::{self, Driver};

use backends::{Backends, Change};
use listeners::Listeners;
use resolve::Resolvers;

pub use error::ControlError;

pub struct Controller {
    path: PathBuf,
    /// The configuration in effect: the file's, but for the keys that
    /// apply only when sluice restarts, which keep their values from the
    /// start.
    config: Config,
    shared: &'static Shared,
    events: UnboundedReceiver<Event>,
    /// Where to send each worker new listening sockets.
    workers: Vec<Mailbox>,
    /// Workers, as started: how many sockets each listener is bound to, and
    /// what the descriptor budget counts.
    worker_count: usize,
    listeners: Listeners,
    backends: Backends,
    resolvers: Resolvers,
    /// Whether probes run: from [`Controller::run`] on, when the runtime
    /// they run on exists.
    probing: bool,
    metrics: Metrics,
    process: ProcessStats,
    /// Pools where no backend may take clients: routing over all of them
    /// (fail open) or none (fail closed). True where a backend up is
    /// drained by its operator: that pool is not down for `/ready`.
    pools_down: HashMap<String, bool>,
    /// What `/ready` answers.
    readiness: Readiness,
    /// The admin endpoint's socket, until `run` serves it, and how many
    /// connections it may have open at once.
    admin: Option<(TcpListener, usize)>,
    /// What the admin endpoint asks (`asks.0` goes to it).
    asks: (mpsc::Sender<Ask>, mpsc::Receiver<Ask>),
    /// Writes `state_file`.
    state_writer: state::Writer,
    reloads: (u64, u64),
    notifier: Notifier,
    /// The descriptor limit, shared out again when a reload changes the
    /// number of listeners or backends.
    descriptor_limit: u64,
}

/// A reload under way: the file is read and resolved on a thread of its
/// own.
struct Reloading {
    loaded: oneshot::Receiver<Result<Config, ConfigError>>,
    /// Another SIGHUP came meanwhile: read the file again once this is done,
    /// as it may have changed after it was read.
    again: bool,
}

impl Controller {
    /// Binds every listener once per worker and publishes the first
    /// snapshot; shares `descriptor_limit` out between connections and the
    /// rest. Nothing runs yet: the workers are started with the sockets
    /// returned, and [`Controller::run`] follows.
    pub fn new(
        path: PathBuf,
        config: Config,
        workers: usize,
        descriptor_limit: u64,
        driver: Driver,
    ) -> Result<(Controller, Vec<Vec<BoundListener>>), ControlError> {
        let budget = budget(&config, workers, descriptor_limit)?;
        info!(
            limit = descriptor_limit,
            capacity = budget.connections,
            "descriptor limit {descriptor_limit}: room for {} connections (2 descriptors each; \
             {} kept for pipes, {} for listeners, probes and sluice itself)",
            budget.connections,
            budget.pipe_descriptors(workers),
            budget.reserved
        );
        let admin_addr = config.admin.as_ref().and_then(|a| a.listen);
        let metrics = Metrics::new(admin_addr.is_some());
        metrics.build_info(driver.name());
        let admin = match admin_addr {
            Some(addr) => Some((
                TcpListener::bind(addr.0)
                    .and_then(|s| s.set_nonblocking(true).map(|()| s))
                    .map_err(|source| ControlError::Admin {
                        addr: addr.0,
                        source,
                    })?,
                budget.admin_connections,
            )),
            None => None,
        };
        let (listeners, bound) = Listeners::bind(&config, workers, &metrics)?;
        let process = ProcessStats::new(&metrics);
        process.capacity.set(budget.connections as f64);
        let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            events: events_tx,
            connections: Connections::new(budget.connections),
            accepting: AtomicUsize::new(0),
            pipes_per_worker: budget.pipes_per_worker,
            accept_paused: process.accept_paused.clone(),
            unrouted: process.unrouted.clone(),
        }));
        let mut controller = Controller {
            path,
            config,
            shared,
            events,
            workers: Vec::new(),
            worker_count: workers,
            listeners,
            backends: Backends::default(),
            resolvers: Resolvers::default(),
            probing: false,
            metrics,
            process,
            pools_down: HashMap::new(),
            readiness: Readiness::default(),
            admin,
            asks: mpsc::channel(64),
            state_writer: state::Writer::default(),
            reloads: (0, 0),
            notifier: Notifier::from_env(),
            descriptor_limit,
        };
        controller.restore_states();
        controller.publish_all();
        Ok((controller, bound))
    }

    pub fn shared(&self) -> &'static Shared {
        self.shared
    }

    /// Registers the channel over which worker `i` receives listeners added
    /// by a reload.
    pub fn add_worker(&mut self, mailbox: Mailbox) {
        self.workers.push(mailbox);
    }

    /// Runs until the process should exit, on an io_uring runtime of the
    /// calling thread (a plain one where io_uring cannot be used).
    pub fn run(mut self) -> Result<(), ControlError> {
        worker::block_on_local(async move {
            let signals = Signals::open().map_err(ControlError::Signals)?;
            self.notifier.start();
            if let Some((socket, room)) = self.admin.take() {
                let address = socket.local_addr().map_err(ControlError::AdminSocket)?;
                let socket =
                    tokio::net::TcpListener::from_std(socket).map_err(ControlError::AdminSocket)?;
                let endpoint = Endpoint {
                    metrics: self.metrics.clone(),
                    readiness: self.readiness.clone(),
                    asks: self.asks.0.clone(),
                };
                tokio::task::spawn_local(admin::serve(socket, endpoint, room));
                info!(%address, "status page at http://{address}/, metrics at /metrics, readiness at /ready, API at /api/pools");
            }
            self.probing = true;
            self.backends
                .sync(&self.config, &self.metrics, Some(&self.shared.events));
            self.resolvers.restart(&self.config, &self.shared.events);
            for (name, listener) in &self.config.listeners {
                info!(listener = %name, address = %listener.listen.0, pool = %listener.pool, "listening");
            }
            info!(
                version = env!("CARGO_PKG_VERSION"),
                workers = self.workers.len(),
                config = %self.path.display(),
                "sluice is ready"
            );
            self.notifier.ready(&self.status());
            self.readiness.serving();
            let mut reloading: Option<Reloading> = None;
            loop {
                tokio::select! {
                    request = signals.next() => {
                        match request.map_err(ControlError::Signals)? {
                            Request::Reload => match &mut reloading {
                                Some(under_way) => {
                                    debug!("SIGHUP during a reload: reading the file again after it");
                                    under_way.again = true;
                                }
                                None => reloading = Some(self.start_reload()),
                            },
                            Request::Stop(signal) => {
                                if reloading.is_some() {
                                    info!("the reload under way is abandoned");
                                }
                                self.drain(signal, &signals).await;
                                self.state_writer.finish(Duration::from_secs(2));
                                self.notifier.flush(Duration::from_secs(1)).await;
                                return Ok(());
                            }
                        }
                    }
                    Some(event) = self.events.recv() => self.handle(event),
                    Some(ask) = self.asks.1.recv() => self.answer(ask),
                    loaded = loaded(&mut reloading) => {
                        let again = reloading.take().is_some_and(|r| r.again);
                        self.finish_reload(loaded);
                        if again {
                            reloading = Some(self.start_reload());
                        }
                    }
                }
            }
        })
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Probe { id, outcome } => self.on_probe(id, outcome),
            Event::Ejected { id } => self.on_ejected(id),
            Event::Resolved { pool, answers } => self.on_resolved(&pool, answers),
        }
    }

    fn on_probe(&mut self, id: u64, outcome: Result<(), ProbeFailure>) {
        // A probe of a backend that a reload just removed.
        let Some(key) = self.backends.key(id).cloned() else {
            return;
        };
        let Some(probe) = self.config.pools[&key.pool].health.probe() else {
            return;
        };
        if let Err(failure @ ProbeFailure::Local(_)) = &outcome {
            static LOCAL: Throttle = Throttle::new();
            if let Some(suppressed) = LOCAL.allow() {
                warn!(pool = %key.pool, backend = %key.name, address = %key.addr, suppressed, "{failure}; not counted against the backend");
            }
        }
        let change = self.backends.probed(id, &outcome, &probe);
        if matches!(change, Change::Flipped { .. } | Change::Judged { .. }) {
            // Publish first: once the line is logged, routing already agrees.
            self.publish_pool(&key.pool);
        }
        match change {
            Change::Flipped { up: false } => self.backend_down(&key.pool, id, &key.name),
            Change::Flipped { up: true } | Change::Judged { up: true } => self.dispatch(),
            _ => {}
        }
        let (pool, backend, address) = (&key.pool, &key.name, key.addr);
        match (change, &outcome) {
            (Change::Flipped { up: true }, _) => info!(
                %pool, %backend, %address,
                "backend is up: {} probes in a row succeeded", probe.rise
            ),
            (Change::Flipped { up: false }, Err(failure)) => info!(
                %pool, %backend, %address,
                "backend is down: {failure} ({} probes in a row failed)", probe.fall
            ),
            (Change::Judged { up: true }, _) => info!(
                %pool, %backend, %address, "backend is up: its first probe succeeded"
            ),
            (Change::Judged { up: false }, Err(failure)) => warn!(
                %pool, %backend, %address, "backend is down: {failure} (its first probe)"
            ),
            (Change::FailsOtherwise, Err(failure)) => warn!(
                %pool, %backend, %address, "backend is still down: {failure}"
            ),
            _ => {}
        }
    }

    fn on_ejected(&mut self, id: u64) {
        let Some(key) = self.backends.key(id).cloned() else {
            return;
        };
        // Probes may have been turned off since the report was sent: then
        // nothing would bring the backend back.
        let Some(probe) = self.config.pools[&key.pool].health.probe() else {
            return;
        };
        if self.backends.eject(id) == Change::None {
            return;
        }
        self.publish_pool(&key.pool);
        info!(
            pool = %key.pool, backend = %key.name, address = %key.addr,
            "backend is down: {} connections in a row failed; probes will bring it back", probe.fall
        );
    }

    /// SIGHUP: starts reading the file again. Reading and resolving host
    /// names may take seconds (a slow DNS server, a file on a stalled
    /// mount): it runs on a thread of its own, and [`Controller::run`]
    /// goes on handling signals and probes meanwhile.
    fn start_reload(&mut self) -> Reloading {
        self.notifier.reloading();
        let path = self.path.clone();
        Reloading {
            loaded: off_thread("sluice-reload", move || config::load(&path)),
            again: false,
        }
    }

    /// The file of a reload is read: if it is valid, apply it, otherwise
    /// keep everything as it is.
    fn finish_reload(&mut self, loaded: Result<Config, ControlError>) {
        let outcome = loaded.and_then(|config| self.apply(config));
        match outcome {
            Ok(()) => {
                self.process.reload(true);
                self.reloads.0 += 1;
                let (up, backends) = self.backends.up();
                info!(config = %self.path.display(), up, backends, "configuration reloaded");
            }
            Err(e) => {
                self.process.reload(false);
                self.reloads.1 += 1;
                error!("reload failed, the configuration in use is unchanged: {e}");
            }
        }
        self.notifier.ready(&self.status());
    }

    /// Switches to `config`. Everything that can fail (the descriptor
    /// budget, binding new listeners) happens before anything changes.
    fn apply(&mut self, mut config: Config) -> Result<(), ControlError> {
        let budget = budget(&config, self.worker_count, self.descriptor_limit)?;
        let bound = self.listeners.bind_new(&config, &self.metrics)?;
        self.keep_restart_only(&mut config);
        resolve::keep_discovered(&self.config, &mut config);
        // Listeners that go away stop before the new routes are published,
        // and new ones are handed to the workers after: an accepted
        // connection finds the route of its address.
        let sockets = self.listeners.apply(&config, bound);
        self.config = config;
        self.publish_all();
        self.resolvers.restart(&self.config, &self.shared.events);
        for (worker, sockets) in self.workers.iter().zip(sockets) {
            for socket in sockets {
                // A worker that is gone has taken the process with it.
                worker.send(Command::Listen(socket));
            }
        }
        let capacity = &self.shared.connections;
        if capacity.capacity() != budget.connections {
            info!(
                "room for {} connections now (was {}): the reload changed what the descriptor limit must also hold",
                budget.connections,
                capacity.capacity()
            );
            capacity.set_capacity(budget.connections);
            self.process.capacity.set(budget.connections as f64);
        }
        Ok(())
    }

    /// Keys that apply only when sluice restarts keep the values in effect
    /// in `config`; a reload that changes them says so, each time, until
    /// the restart.
    fn keep_restart_only(&self, config: &mut Config) {
        let running = &self.config;
        let changed = [
            ("workers", config.workers != running.workers),
            ("io", config.io != running.io),
            ("pin_workers", config.pin_workers != running.pin_workers),
            ("log.level", config.log.level != running.log.level),
            ("log.format", config.log.format != running.log.format),
            (
                "log.connections",
                config.log.connections != running.log.connections,
            ),
            (
                "admin.listen",
                config.admin.as_ref().map(|a| a.listen) != running.admin.as_ref().map(|a| a.listen),
            ),
        ];
        for (key, changed) in changed {
            if changed {
                warn!("{key} changed: it takes effect when sluice restarts");
            }
        }
        config.workers = running.workers;
        config.io = running.io;
        config.pin_workers = running.pin_workers;
        config.log = running.log.clone();
        // The token may change with a reload; the address may not.
        let token = config.admin.take().and_then(|admin| admin.token);
        config.admin = running
            .admin
            .clone()
            .map(|admin| config::schema::Admin { token, ..admin });
    }

    /// Rebuilds the whole routing state from the configuration: the backend
    /// registry follows it, every live metric series is registered anew
    /// and the others are removed, and the new snapshot is published.
    fn publish_all(&mut self) {
        self.metrics.renew();
        let events = self.probing.then_some(&self.shared.events);
        let removed = self.backends.sync(&self.config, &self.metrics, events);
        self.forget_absent_states();
        self.listeners.renew_stats(&self.metrics);
        for (name, listener) in &self.config.listeners {
            ListenerStats::limit(&self.metrics, name, listener.max_connections);
        }
        let previous = self.shared.snapshot.load();
        let listeners = &self.listeners;
        let snapshot = publish::snapshot(
            &self.config,
            &self.backends,
            |name| listeners.stats(name),
            Some(&previous),
        );
        self.metrics.sweep();
        self.pools_down
            .retain(|name, _| self.config.pools.contains_key(name));
        for pool in snapshot.pools() {
            self.note_all_down(pool);
        }
        self.shared.snapshot.store(Arc::new(snapshot));
        self.notifier.status(&self.status());
        self.close_sessions(removed);
        self.dispatch();
    }

    /// Rebuilds one pool's table (after a health change), sharing the rest.
    fn publish_pool(&mut self, name: &str) {
        let index = self
            .config
            .pools
            .keys()
            .position(|p| p == name)
            .expect("the pool is configured");
        let pool = publish::pool(&self.config, name, &self.backends);
        self.note_all_down(&pool);
        let snapshot = self.shared.snapshot.load().with_pool(index, Arc::new(pool));
        self.shared.snapshot.store(Arc::new(snapshot));
        self.notifier.status(&self.status());
    }

    /// Logs a pool losing its last backend that may take clients, or
    /// getting one back; `/ready` follows, unless it is the operator who
    /// drained the backends up.
    fn note_all_down(&mut self, pool: &Pool) {
        let now = pool.all_down.then_some(pool.drained_up);
        let before = match now {
            Some(drained) => self.pools_down.insert(pool.name.clone(), drained),
            None => self.pools_down.remove(&pool.name),
        };
        if now != before {
            match now {
                Some(drained) => {
                    let (cause, over) = match drained {
                        true => (
                            "no backend in rotation is up (those up are drained)",
                            "those in rotation",
                        ),
                        false if pool.panic() => ("every backend is down", "all of them"),
                        false => ("no backend is up", "all of them"),
                    };
                    match pool.panic() {
                        true => warn!(
                            pool = %pool.name,
                            "{cause}: routing over {over} until one is back"
                        ),
                        false if pool.queue.size > 0 => warn!(
                            pool = %pool.name,
                            "{cause}: new clients wait in the queue (up to {}) until one is",
                            humantime::format_duration(pool.queue.timeout)
                        ),
                        false => warn!(
                            pool = %pool.name,
                            "{cause}: new clients are turned away until one is"
                        ),
                    }
                }
                None if pool.backends.iter().any(Backend::in_rotation) => {
                    info!(pool = %pool.name, "a backend is up again")
                }
                None => info!(
                    pool = %pool.name,
                    "no backend is in rotation (each is drained, in maint or at weight 0): new clients get none"
                ),
            }
        }
        self.readiness.pools_down(self.pools_without_backend_up());
    }

    /// The pools down for `/ready`: no backend may take clients, and none
    /// up is drained by its operator.
    fn pools_without_backend_up(&self) -> impl Iterator<Item = &String> {
        self.pools_down
            .iter()
            .filter(|(_, drained)| !**drained)
            .map(|(name, _)| name)
    }

    /// One line for systemd's STATUS.
    fn status(&self) -> String {
        let (up, backends) = self.backends.up();
        let mut status = format!(
            "{} listeners, {up}/{backends} backends up, {} connections, reloads {} ok {} failed",
            self.listeners.len(),
            self.shared.connections.open(),
            self.reloads.0,
            self.reloads.1
        );
        let mut pools: Vec<&str> = self
            .pools_without_backend_up()
            .map(String::as_str)
            .collect();
        if !pools.is_empty() {
            pools.sort();
            status.push_str(&format!(", all backends down in: {}", pools.join(", ")));
        }
        status
    }
}

/// How `descriptor_limit` is shared out under `config`; an error if it
/// leaves no room for a single connection.
fn budget(config: &Config, workers: usize, descriptor_limit: u64) -> Result<Budget, ControlError> {
    let backends = config.pools.values().map(|p| p.endpoints().len()).sum();
    let budget = Budget::new(descriptor_limit, workers, config.listeners.len(), backends);
    if budget.connections == 0 {
        return Err(ControlError::NoRoom {
            limit: descriptor_limit,
            workers,
            listeners: config.listeners.len(),
            backends,
            needed: budget.reserved + budget.pipe_descriptors(workers),
        });
    }
    Ok(budget)
}

/// Runs `work` on a thread of its own; its result arrives on the receiver,
/// which errs if the thread could not start (logged). Nothing waits for the
/// thread: a stop that comes meanwhile leaves it behind, and the process
/// exits without it.
fn off_thread<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> oneshot::Receiver<T> {
    let (result, received) = oneshot::channel();
    let started = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let _ = result.send(work());
        });
    if let Err(e) = started {
        error!("cannot start the {name} thread: {e}");
    }
    received
}

/// The outcome of the reload under way, once there is one; never, while
/// none is under way.
async fn loaded(reloading: &mut Option<Reloading>) -> Result<Config, ControlError> {
    match reloading {
        Some(under_way) => match (&mut under_way.loaded).await {
            Ok(loaded) => loaded.map_err(ControlError::Config),
            Err(_) => Err(ControlError::NoReader),
        },
        None => std::future::pending().await,
    }
}
