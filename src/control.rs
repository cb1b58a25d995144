//! The control plane: everything that changes routing, on one thread.
//!
//! The [`Controller`] owns the configuration in use, the health verdict of
//! every backend, the listening sockets and the probes. It runs on the main
//! thread, in its own io_uring runtime, and reacts to four kinds of input:
//! signals (SIGHUP reloads, SIGTERM/SIGINT drain and stop), probe outcomes,
//! passive-ejection reports from the workers, and the periodic re-resolution
//! of host names. Each change ends in a new [`Snapshot`] published to the
//! workers with one atomic swap; the workers never wait for the control
//! plane, and it never touches a connection.
//!
//! Nothing here waits without a bound. Work that may block (reading and
//! resolving the file on reload, DNS lookups) runs on a thread of its own
//! and comes back as a message, so that a signal is handled while it runs:
//! SIGTERM during a slow reload abandons the reload. Notify messages are
//! queued, never sent with a blocking call (see [`systemd`]).

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use metrics_exporter_prometheus::PrometheusHandle;
use socket2::SockRef;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::balancer::load::Load;
use crate::capacity::{Budget, Connections};
use crate::config::{self, Config, ConfigError, HealthProbe, Resolver};
use crate::health::{self, PassiveHealth, ProbeFailure, Verdict};
use crate::logging::Throttle;
use crate::metrics::{self, BackendStats};
use crate::shared::{Event, Shared};
use crate::signals::{Request, Signals};
use crate::snapshot::{self, Backend, Pool, Snapshot};
use crate::systemd::Notifier;
use crate::worker::{BoundListener, Command, Stop};
use crate::{admin, net};

/// A backend is known by its pool, name and address: a backend whose
/// address changes under the same name is a new server with a fresh verdict.
type BackendKey = (String, String, SocketAddr);

struct Tracked {
    passive: Arc<PassiveHealth>,
    /// Its open connections, across workers and reloads.
    load: Arc<Load>,
    /// Its metric handles; made again on reload, since the listeners that
    /// feed its pool may change.
    stats: Arc<BackendStats>,
    verdict: Verdict,
    /// The running probe task and the settings it runs with.
    prober: Option<(HealthProbe, JoinHandle<()>)>,
}

/// The sockets of one listener: a duplicate of each worker's socket, kept to
/// change the backlog or stop the listener.
struct ActiveListener {
    addr: SocketAddr,
    backlog: u32,
    sockets: Vec<TcpListener>,
    stop: Arc<Stop>,
}

impl ActiveListener {
    /// Stops accepting: each worker's accept fails, or its wait for room
    /// ends, and its loop ends, closing the socket.
    fn stop(&self) {
        for socket in &self.sockets {
            let _ = SockRef::from(socket).shutdown(Shutdown::Both);
        }
        self.stop.stop();
    }
}

pub struct Controller {
    path: PathBuf,
    config: Config,
    shared: &'static Shared,
    events: UnboundedReceiver<Event>,
    /// Where to send each worker new listening sockets.
    workers: Vec<UnboundedSender<Command>>,
    listeners: HashMap<String, ActiveListener>,
    backends: HashMap<BackendKey, Tracked>,
    ids: HashMap<u64, BackendKey>,
    next_id: u64,
    resolvers: Vec<JoinHandle<()>>,
    /// Pools routing over all backends because none is up.
    panicking: HashSet<String>,
    /// The admin endpoint's socket and the metrics it serves, until `run`.
    admin: Option<(TcpListener, PrometheusHandle)>,
    reloads: (u64, u64),
    notifier: Notifier,
    /// The descriptor limit, shared out again when a reload changes the
    /// number of listeners or backends.
    descriptor_limit: u64,
    /// Workers, as started: how many sockets each listener is bound to, and
    /// what the descriptor budget counts.
    worker_count: usize,
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
    /// Binds every listener once per worker and builds the first snapshot;
    /// shares `descriptor_limit` out between connections and the rest.
    /// Nothing runs yet: the workers are started and [`Controller::run`]
    /// follows.
    pub fn new(
        path: PathBuf,
        config: Config,
        workers: usize,
        descriptor_limit: u64,
    ) -> Result<(Controller, Vec<Vec<BoundListener>>), String> {
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
        // Before any snapshot: metric handles register with the recorder.
        let admin = match config.admin.as_ref().and_then(|a| a.listen) {
            Some(addr) => {
                let handle = metrics::install()?;
                let socket = TcpListener::bind(addr.0)
                    .and_then(|s| s.set_nonblocking(true).map(|()| s))
                    .map_err(|e| format!("admin: cannot listen on {}: {e}", addr.0))?;
                Some((socket, handle))
            }
            None => None,
        };
        let mut bound: Vec<Vec<BoundListener>> = (0..workers).map(|_| Vec::new()).collect();
        let mut listeners = HashMap::new();
        for (name, listener) in &config.listeners {
            let (active, sockets) = bind(name, listener, workers)?;
            for (worker, socket) in bound.iter_mut().zip(sockets) {
                worker.push(socket);
            }
            listeners.insert(name.clone(), active);
        }
        let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::from_config(&config)),
            events: events_tx,
            connections: Connections::new(budget.connections),
            accepting: AtomicUsize::new(0),
            pipes_per_worker: budget.pipes_per_worker,
        }));
        metrics::capacity(budget.connections);
        let mut controller = Controller {
            path,
            config,
            shared,
            events,
            workers: Vec::new(),
            listeners,
            backends: HashMap::new(),
            ids: HashMap::new(),
            next_id: 1,
            resolvers: Vec::new(),
            panicking: HashSet::new(),
            admin,
            reloads: (0, 0),
            notifier: Notifier::from_env(),
            descriptor_limit,
            worker_count: workers,
        };
        controller.track_backends(false);
        controller.publish_all();
        Ok((controller, bound))
    }

    pub fn shared(&self) -> &'static Shared {
        self.shared
    }

    /// Registers the channel over which worker `i` receives listeners added
    /// by a reload.
    pub fn add_worker(&mut self, commands: UnboundedSender<Command>) {
        self.workers.push(commands);
    }

    /// Runs until the process should exit, on an io_uring runtime of the
    /// calling thread.
    pub fn run(mut self) -> Result<(), String> {
        tokio_uring::start(async move {
            let signals = Signals::open().map_err(|e| format!("cannot read signals: {e}"))?;
            self.notifier.start();
            if let Some((socket, handle)) = self.admin.take() {
                let address = socket.local_addr().map_err(|e| format!("admin: {e}"))?;
                let socket =
                    tokio::net::TcpListener::from_std(socket).map_err(|e| format!("admin: {e}"))?;
                tokio::task::spawn_local(admin::serve(socket, handle));
                info!(%address, "metrics at http://{address}/metrics");
            }
            self.track_backends(true);
            self.start_resolvers();
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
            let mut reloading: Option<Reloading> = None;
            loop {
                tokio::select! {
                    request = signals.next() => {
                        match request.map_err(|e| format!("reading signals: {e}"))? {
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
                                self.notifier.flush(Duration::from_secs(1)).await;
                                return Ok(());
                            }
                        }
                    }
                    Some(event) = self.events.recv() => self.handle(event),
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
        let Some(key) = self.ids.get(&id).cloned() else {
            return;
        };
        let Some(probe) = self.config.pools[&key.0].health.probe() else {
            return;
        };
        if let Err(failure @ ProbeFailure::Local(_)) = &outcome {
            static LOCAL: Throttle = Throttle::new();
            if let Some(suppressed) = LOCAL.allow() {
                let (pool, name, addr) = &key;
                warn!(pool, backend = %name, address = %addr, suppressed, "{failure}; not counted against the backend");
            }
            return;
        }
        let result = match &outcome {
            Ok(()) => "ok",
            Err(ProbeFailure::Timeout(_)) => "timeout",
            Err(_) => "fail",
        };
        metrics::health_check(&key.0, &key.1, result);
        let tracked = self.backends.get_mut(&key).expect("ids and backends agree");
        if !tracked
            .verdict
            .observe(outcome.is_ok(), probe.rise, probe.fall)
        {
            return;
        }
        if outcome.is_ok() {
            tracked.passive.record_success();
        }
        // Publish first: once the line is logged, routing already agrees.
        self.publish_pool(&key.0);
        let (pool, name, addr) = &key;
        match &outcome {
            Ok(()) => info!(
                pool, backend = %name, address = %addr,
                "backend is up: {} probes in a row succeeded", probe.rise
            ),
            Err(failure) => info!(
                pool, backend = %name, address = %addr,
                "backend is down: {failure} ({} probes in a row failed)", probe.fall
            ),
        }
    }

    fn on_ejected(&mut self, id: u64) {
        let Some(key) = self.ids.get(&id).cloned() else {
            return;
        };
        // Probes may have been turned off since the report was sent: then
        // nothing would bring the backend back.
        let Some(probe) = self.config.pools[&key.0].health.probe() else {
            return;
        };
        let Some(tracked) = self.backends.get_mut(&key) else {
            return;
        };
        // The next streak starts from zero.
        tracked.passive.record_success();
        if !tracked.verdict.eject() {
            return;
        }
        self.publish_pool(&key.0);
        let (pool, name, addr) = &key;
        info!(
            pool, backend = %name, address = %addr,
            "backend is down: {} connections in a row failed; probes will bring it back", probe.fall
        );
    }

    /// Applies fresh DNS answers for one pool; keeps the old addresses of an
    /// entry whose lookup failed.
    fn on_resolved(
        &mut self,
        pool_name: &str,
        answers: Vec<(usize, String, Result<Vec<SocketAddr>, String>)>,
    ) {
        let Some(pool) = self.config.pools.get_mut(pool_name) else {
            return;
        };
        let mut changes = Vec::new();
        for (index, address, answer) in answers {
            let Some(backend) = pool
                .backends
                .get_mut(index)
                .filter(|b| b.address == address)
            else {
                continue;
            };
            match answer {
                Ok(addrs) if addrs != backend.resolved => {
                    let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                    changes.push((
                        backend.name().to_owned(),
                        backend.address.clone(),
                        list.join(", "),
                    ));
                    backend.resolved = addrs;
                }
                Ok(_) => {}
                Err(e) => warn!(
                    pool = pool_name,
                    backend = %backend.name(),
                    "cannot re-resolve {}, keeping its addresses: {e}",
                    backend.address
                ),
            }
        }
        if changes.is_empty() {
            return;
        }
        self.track_backends(true);
        self.publish_all();
        for (name, address, addrs) in changes {
            info!(pool = pool_name, backend = %name, "{address} now resolves to {addrs}");
        }
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
    fn finish_reload(&mut self, loaded: Result<Result<Config, ConfigError>, String>) {
        let outcome = loaded
            .and_then(|loaded| loaded.map_err(|e| e.to_string()))
            .and_then(|config| self.apply(config));
        match outcome {
            Ok(()) => {
                metrics::reload(true);
                self.reloads.0 += 1;
                let (up, backends) = self.backends_up();
                info!(config = %self.path.display(), up, backends, "configuration reloaded");
            }
            Err(e) => {
                metrics::reload(false);
                self.reloads.1 += 1;
                error!("reload failed, the configuration in use is unchanged: {e}");
            }
        }
        self.notifier.ready(&self.status());
    }

    /// Switches to `config`. Everything that can fail (binding new
    /// listeners) happens before anything changes.
    fn apply(&mut self, config: Config) -> Result<(), String> {
        let workers = self.worker_count;
        let budget = budget(&config, workers, self.descriptor_limit)?;
        let mut added = Vec::new();
        for (name, listener) in &config.listeners {
            let unchanged = self
                .listeners
                .get(name)
                .is_some_and(|active| active.addr == listener.listen.0);
            if !unchanged {
                added.push((name.clone(), bind(name, listener, workers)?));
            }
        }
        let restart_only = [
            ("workers", config.workers != self.config.workers),
            ("pin_workers", config.pin_workers != self.config.pin_workers),
            ("log.level", config.log.level != self.config.log.level),
            ("log.format", config.log.format != self.config.log.format),
            (
                "log.connections",
                config.log.connections != self.config.log.connections,
            ),
            (
                "admin.listen",
                config.admin.as_ref().map(|a| a.listen)
                    != self.config.admin.as_ref().map(|a| a.listen),
            ),
        ];
        for (key, changed) in restart_only {
            if changed {
                warn!("{key} changed: it takes effect when sluice restarts");
            }
        }

        // Stop the listeners that go away or move, before the new routes
        // are published: a connection they still accept finds no route and
        // is closed.
        let removed: Vec<String> = self
            .listeners
            .keys()
            .filter(|name| {
                config
                    .listeners
                    .get(*name)
                    .is_none_or(|l| l.listen.0 != self.listeners[*name].addr)
            })
            .cloned()
            .collect();
        for name in removed {
            let active = self.listeners.remove(&name).expect("listed above");
            active.stop();
            info!(listener = %name, address = %active.addr, "listener stopped");
        }
        for (name, listener) in &config.listeners {
            if let Some(active) = self.listeners.get_mut(name) {
                if active.backlog != listener.backlog {
                    // listen() on a listening socket only changes its backlog.
                    for socket in &active.sockets {
                        let _ = SockRef::from(socket).listen(listener.backlog as i32);
                    }
                    active.backlog = listener.backlog;
                }
            }
        }

        self.config = config;
        self.track_backends(true);
        self.start_resolvers();
        self.publish_all();
        let capacity = &self.shared.connections;
        if capacity.capacity() != budget.connections {
            info!(
                "room for {} connections now (was {}): the reload changed what the descriptor limit must also hold",
                budget.connections,
                capacity.capacity()
            );
            capacity.set_capacity(budget.connections);
            metrics::capacity(budget.connections);
        }

        for (name, (active, sockets)) in added {
            for (worker, socket) in self.workers.iter().zip(sockets) {
                // A worker that is gone has taken the process with it.
                let _ = worker.send(Command::Listen(socket));
            }
            info!(listener = %name, address = %active.addr, pool = %self.config.listeners[&name].pool, "listening");
            self.listeners.insert(name, active);
        }
        Ok(())
    }

    /// Makes the tracked backends match the configuration: new ones start
    /// up, removed ones are forgotten, and (with `probes`) each gets a probe
    /// task running its pool's current settings.
    fn track_backends(&mut self, probes: bool) {
        let mut present = HashSet::new();
        for (pool_name, pool) in &self.config.pools {
            let settings = pool.health.probe();
            let listeners = snapshot::listeners_of(&self.config, pool_name);
            for endpoint in pool.endpoints() {
                let stats = Arc::new(BackendStats::new(&endpoint.name, &listeners));
                let key = (pool_name.clone(), endpoint.name.clone(), endpoint.addr);
                present.insert(key.clone());
                let tracked = self.backends.entry(key.clone()).or_insert_with(|| {
                    let id = self.next_id;
                    self.next_id += 1;
                    self.ids.insert(id, key.clone());
                    Tracked {
                        passive: Arc::new(PassiveHealth::new(id)),
                        load: Arc::default(),
                        stats: stats.clone(),
                        verdict: Verdict::up(),
                        prober: None,
                    }
                });
                tracked.stats = stats;
                if !probes {
                    continue;
                }
                let current = tracked.prober.as_ref().map(|(settings, _)| settings);
                if current != settings.as_ref() {
                    if let Some((_, task)) = tracked.prober.take() {
                        task.abort();
                    }
                    // A streak counted against other settings (another
                    // `fall`) starts again.
                    tracked.passive.record_success();
                    tracked.prober = settings.clone().map(|settings| {
                        let task = start_prober(
                            tracked.passive.id,
                            endpoint.addr,
                            settings.clone(),
                            self.shared.events.clone(),
                        );
                        (settings, task)
                    });
                    if tracked.prober.is_none() && !tracked.verdict.up {
                        // Probes were turned off: nothing would bring it back.
                        tracked.verdict = Verdict::up();
                    }
                }
            }
        }
        let gone: Vec<BackendKey> = self
            .backends
            .keys()
            .filter(|key| !present.contains(*key))
            .cloned()
            .collect();
        for key in gone {
            let tracked = self.backends.remove(&key).expect("listed above");
            if let Some((_, task)) = tracked.prober {
                task.abort();
            }
            self.ids.remove(&tracked.passive.id);
        }
    }

    /// One task per pool that has host names and a `resolve_interval`.
    fn start_resolvers(&mut self) {
        for task in self.resolvers.drain(..) {
            task.abort();
        }
        for (name, pool) in &self.config.pools {
            let entries: Vec<(usize, String)> = pool
                .backends
                .iter()
                .enumerate()
                .filter(|(_, b)| b.has_host_name())
                .map(|(i, b)| (i, b.address.clone()))
                .collect();
            if pool.resolve_interval.is_zero() || entries.is_empty() {
                continue;
            }
            let (pool, every, events) = (
                name.clone(),
                pool.resolve_interval,
                self.shared.events.clone(),
            );
            self.resolvers.push(tokio::task::spawn_local(async move {
                let start = tokio::time::Instant::now() + every;
                let mut ticker = tokio::time::interval_at(start, every);
                loop {
                    ticker.tick().await;
                    let entries = entries.clone();
                    // getaddrinfo blocks, for as long as the resolver takes:
                    // keep it off the control loop.
                    let Ok(answers) = off_thread("sluice-resolve", move || {
                        entries
                            .into_iter()
                            .map(|(i, address)| {
                                let answer = config::resolve(&address, Resolver::Dns);
                                (i, address, answer)
                            })
                            .collect()
                    })
                    .await
                    else {
                        // No thread could start: try again next time.
                        continue;
                    };
                    let event = Event::Resolved {
                        pool: pool.clone(),
                        answers,
                    };
                    if events.send(event).is_err() {
                        return;
                    }
                }
            }));
        }
    }

    fn build_pool(&mut self, name: &str) -> Arc<Pool> {
        let config = &self.config.pools[name];
        let backends = config
            .endpoints()
            .iter()
            .map(|endpoint| {
                let tracked =
                    &self.backends[&(name.to_owned(), endpoint.name.clone(), endpoint.addr)];
                metrics::backend_up(name, &endpoint.name, tracked.verdict.up);
                Backend::new(
                    endpoint,
                    tracked.verdict.up,
                    tracked.passive.clone(),
                    tracked.load.clone(),
                    tracked.stats.clone(),
                )
            })
            .collect();
        let pool = Pool::build(name, config, backends);
        if pool.panic && self.panicking.insert(name.to_owned()) {
            warn!(
                pool = name,
                "every backend is down: routing over all of them until one is back"
            );
        } else if !pool.panic && self.panicking.remove(name) {
            info!(
                pool = name,
                "a backend is up again: no longer routing over down backends"
            );
        }
        Arc::new(pool)
    }

    /// Rebuilds every pool (after a reload or re-resolution).
    fn publish_all(&mut self) {
        let names: Vec<String> = self.config.pools.keys().cloned().collect();
        let pools = names.iter().map(|name| self.build_pool(name)).collect();
        self.panicking
            .retain(|name| self.config.pools.contains_key(name));
        let routes = snapshot::routes(&self.config, Some(&self.shared.snapshot.load()));
        let snapshot = Snapshot::new(routes, pools);
        self.shared.snapshot.store(Arc::new(snapshot));
        self.notifier.status(&self.status());
    }

    /// Rebuilds one pool's table (after a health change), sharing the rest.
    fn publish_pool(&mut self, name: &str) {
        let index = self
            .config
            .pools
            .keys()
            .position(|p| p == name)
            .expect("the pool is configured");
        let pool = self.build_pool(name);
        let snapshot = self.shared.snapshot.load().with_pool(index, pool);
        self.shared.snapshot.store(Arc::new(snapshot));
        self.notifier.status(&self.status());
    }

    /// SIGTERM/SIGINT: stop accepting, let open connections finish for up
    /// to `shutdown_timeout` (0: no limit); a second signal ends it at once.
    async fn drain(&mut self, signal: nix::sys::signal::Signal, signals: &Signals) {
        for active in self.listeners.values() {
            active.stop();
        }
        let open = self.shared.connections.open();
        let timeout = self.config.shutdown_timeout;
        info!(%signal, open, "stopping: no new connections; waiting for open ones to finish");
        if std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
            .is_ok_and(|v| v.trim() == "0")
        {
            info!(
                "net.ipv4.tcp_migrate_req is 0: connections waiting to be accepted at this moment are reset; \
                 set it to 1 so that another process on the same ports takes them over"
            );
        }
        self.notifier
            .stopping(&format!("draining {open} connections"));
        let deadline = async {
            if timeout.is_zero() {
                std::future::pending::<()>().await
            } else {
                tokio::time::sleep(timeout).await
            }
        };
        tokio::pin!(deadline);
        let mut poll = tokio::time::interval(Duration::from_millis(20));
        loop {
            tokio::select! {
                _ = poll.tick() => {
                    // Accept loops count a connection before they accept
                    // it, so once none runs, the count misses none.
                    let accepting = self.shared.accepting.load(Ordering::Acquire);
                    if accepting == 0 && self.shared.connections.open() == 0 {
                        info!("all connections finished; exiting");
                        return;
                    }
                }
                _ = &mut deadline => {
                    warn!(
                        open = self.shared.connections.open(),
                        "shutdown_timeout of {} reached; closing the remaining connections",
                        humantime::format_duration(timeout)
                    );
                    self.close_all().await;
                    return;
                }
                request = signals.next() => match request {
                    Ok(Request::Reload) => info!("SIGHUP while stopping: ignored"),
                    Ok(Request::Stop(_)) | Err(_) => {
                        warn!(
                            open = self.shared.connections.open(),
                            "second signal: exiting now"
                        );
                        return;
                    }
                },
            }
        }
    }

    /// (backends up, all backends), over every pool.
    fn backends_up(&self) -> (usize, usize) {
        let up = self.backends.values().filter(|t| t.verdict.up).count();
        (up, self.backends.len())
    }

    /// Has every worker reset its open connections (each logs its own end),
    /// and waits a moment for them to finish doing so.
    async fn close_all(&self) {
        for worker in &self.workers {
            let _ = worker.send(Command::CloseAll);
        }
        let give_up = tokio::time::Instant::now() + Duration::from_secs(1);
        while self.shared.connections.open() > 0 && tokio::time::Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// One line for systemd's STATUS.
    fn status(&self) -> String {
        let (up, backends) = self.backends_up();
        let mut status = format!(
            "{} listeners, {up}/{backends} backends up, {} connections, reloads {} ok {} failed",
            self.listeners.len(),
            self.shared.connections.open(),
            self.reloads.0,
            self.reloads.1
        );
        if !self.panicking.is_empty() {
            let mut pools: Vec<&str> = self.panicking.iter().map(String::as_str).collect();
            pools.sort();
            status.push_str(&format!(", all backends down in: {}", pools.join(", ")));
        }
        status
    }
}

/// How `descriptor_limit` is shared out under `config`; an error if it
/// leaves no room for a single connection.
fn budget(config: &Config, workers: usize, descriptor_limit: u64) -> Result<Budget, String> {
    let backends = config.pools.values().map(|p| p.endpoints().len()).sum();
    let budget = Budget::new(descriptor_limit, workers, config.listeners.len(), backends);
    if budget.connections == 0 {
        return Err(format!(
            "the descriptor limit of {descriptor_limit} leaves no room for connections: \
             {workers} workers, {} listeners and {backends} backends need {} descriptors; \
             raise LimitNOFILE (ulimit -n)",
            config.listeners.len(),
            budget.reserved + budget.pipe_descriptors(workers)
        ));
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
async fn loaded(reloading: &mut Option<Reloading>) -> Result<Result<Config, ConfigError>, String> {
    match reloading {
        Some(under_way) => (&mut under_way.loaded)
            .await
            .map_err(|_| "the configuration could not be read: no thread to read it".into()),
        None => std::future::pending().await,
    }
}

/// Binds `listener` once per worker.
fn bind(
    name: &str,
    listener: &config::schema::Listener,
    workers: usize,
) -> Result<(ActiveListener, Vec<BoundListener>), String> {
    let addr = listener.listen.0;
    let mut sockets = Vec::with_capacity(workers);
    let mut kept = Vec::with_capacity(workers);
    let stop = Arc::new(Stop::default());
    for _ in 0..workers {
        let socket = net::reuseport_listener(addr, listener.backlog)
            .map_err(|e| format!("listener {name}: cannot listen on {addr}: {e}"))?;
        kept.push(
            socket
                .try_clone()
                .map_err(|e| format!("listener {name}: {e}"))?,
        );
        sockets.push(BoundListener {
            name: name.to_owned(),
            socket,
            stop: stop.clone(),
        });
    }
    let active = ActiveListener {
        addr,
        backlog: listener.backlog,
        sockets: kept,
        stop,
    };
    Ok((active, sockets))
}

/// Probes `addr` every `settings.interval`, starting at a random point of
/// the first interval so that the probes of many backends do not fire
/// together. The interval itself is not jittered, which keeps the detection
/// time within `fall` x `interval` + `timeout`.
fn start_prober(
    id: u64,
    addr: SocketAddr,
    settings: HealthProbe,
    events: UnboundedSender<Event>,
) -> JoinHandle<()> {
    tokio::task::spawn_local(async move {
        let interval = settings.interval;
        let phase = RandomState::new().hash_one(id) % (interval.as_millis() as u64).max(1);
        let start = tokio::time::Instant::now() + Duration::from_millis(phase);
        let mut ticker = tokio::time::interval_at(start, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let outcome = health::probe(addr, &settings).await;
            if events.send(Event::Probe { id, outcome }).is_err() {
                return;
            }
        }
    })
}
