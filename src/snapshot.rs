//! The routing state every worker reads: an immutable [`Snapshot`] behind an
//! `ArcSwap`.
//!
//! A snapshot holds everything needed to route a new connection: which pool
//! each listener feeds, the pools' backends with their health, and the Maglev
//! tables built from the backends that are up. The control plane builds a new
//! snapshot off the data path (on reload, re-resolution or a health change)
//! and publishes it with one atomic swap; a worker loads the current one per
//! connection without a lock. Pools are shared between snapshots, so a health
//! change rebuilds only its own pool's table. A connection that has picked its
//! backend keeps it, whatever is published afterwards.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::balancer::algorithms::{Balancer, Choice};
use crate::balancer::load::{Lease, Load};
use crate::config::schema::SendProxy;
use crate::config::{self, Balance, Config, Engine, HashKey};
use crate::health::PassiveHealth;
use crate::limits::Gate;
use crate::metrics::{BackendStats, ListenerStats};

#[derive(Clone)]
pub struct Snapshot {
    routes: HashMap<String, Route>,
    pools: Vec<Arc<Pool>>,
}

/// Where a listener's connections go, what it lets in, and its metric
/// handles.
#[derive(Clone)]
pub struct Route {
    /// Index into `Snapshot::pools`.
    pool: usize,
    pub gate: Arc<Gate>,
    /// Connections start with a PROXY protocol header.
    pub accept_proxy: bool,
    pub stats: Arc<ListenerStats>,
}

pub struct Pool {
    pub name: String,
    pub balance: Balance,
    /// What Maglev hashes.
    pub hash_key: HashKey,
    pub connect_timeout: Duration,
    /// How connections relay their bytes.
    pub engine: Engine,
    /// Close connections idle both ways this long; zero: never.
    pub idle_timeout: Duration,
    /// The PROXY header to put before each connection's bytes.
    pub send_proxy: SendProxy,
    pub retries: u32,
    /// Every endpoint of the pool, up or down, in file order.
    pub backends: Vec<Backend>,
    /// Backends with a weight exist but none is up, so the table routes
    /// over all of them rather than refuse every client (Envoy's panic
    /// threshold at 0%). A pool whose backends all have weight 0 is drained,
    /// not in panic: it routes nowhere.
    pub panic: bool,
    /// Consecutive failed connections on the data path that take a backend
    /// out before the next probe; `None` when probes are off, since nothing
    /// would bring it back.
    pub eject_after: Option<u32>,
    balancer: Balancer,
}

#[derive(Clone)]
pub struct Backend {
    pub name: Arc<str>,
    pub addr: SocketAddr,
    pub weight: u32,
    pub up: bool,
    /// 0: no limit; a full backend is passed over like a down one.
    pub max_connections: u32,
    /// Shared with the control plane; survive rebuilds and reloads.
    pub passive: Arc<PassiveHealth>,
    pub load: Arc<Load>,
    pub stats: Arc<BackendStats>,
}

impl Snapshot {
    pub fn new(routes: HashMap<String, Route>, pools: Vec<Arc<Pool>>) -> Snapshot {
        Snapshot { routes, pools }
    }

    /// The snapshot of `config` with every backend up: what a fresh process
    /// routes by, and what `sluice explain` shows.
    pub fn from_config(config: &Config) -> Snapshot {
        let pools = config
            .pools
            .iter()
            .map(|(name, pool)| {
                let listeners = listeners_of(config, name);
                let backends = pool
                    .endpoints()
                    .into_iter()
                    .map(|e| {
                        let stats = Arc::new(BackendStats::new(&e.name, &listeners));
                        Backend::new(
                            &e,
                            true,
                            Arc::new(PassiveHealth::new(0)),
                            Arc::default(),
                            stats,
                        )
                    })
                    .collect();
                Arc::new(Pool::build(name, pool, backends))
            })
            .collect();
        Snapshot::new(routes(config, None), pools)
    }

    /// This snapshot with the pool at `index` replaced.
    pub fn with_pool(&self, index: usize, pool: Arc<Pool>) -> Snapshot {
        let mut next = self.clone();
        next.pools[index] = pool;
        next
    }

    /// The pool that connections accepted by `listener` go to, and the
    /// listener's route.
    pub fn pool_for(&self, listener: &str) -> Option<(&Pool, &Route)> {
        self.routes
            .get(listener)
            .map(|route| (&*self.pools[route.pool], route))
    }

    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name).map(|p| &**p)
    }

    pub fn pools(&self) -> &[Arc<Pool>] {
        &self.pools
    }
}

/// Every listener's route: its pool's index in `config.pools` (a
/// `BTreeMap`, so pools are indexed in name order wherever snapshots are
/// built), its gate and its metric handles.
pub fn routes(config: &Config, previous: Option<&Snapshot>) -> HashMap<String, Route> {
    config
        .listeners
        .iter()
        .map(|(name, listener)| {
            let pool = config
                .pools
                .keys()
                .position(|p| *p == listener.pool)
                .expect("validation checked that every listener's pool exists");
            // A listener that stays keeps counting its open connections,
            // and keeps its rate buckets if its limits did not change.
            let before = previous.and_then(|snapshot| snapshot.routes.get(name));
            let gate = match before {
                Some(route) if route.gate.enforces(listener) => route.gate.clone(),
                Some(route) => Arc::new(Gate::new(listener, route.gate.open().clone())),
                None => Arc::new(Gate::new(listener, Arc::default())),
            };
            let route = Route {
                pool,
                gate,
                accept_proxy: listener.accept_proxy,
                stats: Arc::new(ListenerStats::new(name)),
            };
            (name.clone(), route)
        })
        .collect()
}

/// The listeners whose connections go to `pool`.
pub fn listeners_of<'a>(config: &'a Config, pool: &str) -> Vec<&'a str> {
    config
        .listeners
        .iter()
        .filter(|(_, l)| l.pool == pool)
        .map(|(name, _)| name.as_str())
        .collect()
}

impl Pool {
    /// Builds the pool's table from the backends that are up and have a
    /// weight, or from all of them if none is.
    pub fn build(name: &str, config: &config::Pool, backends: Vec<Backend>) -> Pool {
        let weighted = backends.iter().filter(|b| b.weight > 0);
        let panic = weighted.clone().next().is_some() && !weighted.clone().any(|b| b.up);
        let choices: Vec<Choice> = backends
            .iter()
            .map(|b| Choice {
                name: &b.name,
                weight: if b.up || panic { b.weight } else { 0 },
                load: &b.load,
            })
            .collect();
        let balancer = Balancer::build(config, &choices);
        Pool {
            name: name.to_owned(),
            balance: config.balance,
            hash_key: config.hash_key,
            connect_timeout: config.connect_timeout,
            engine: config.engine,
            idle_timeout: config.idle_timeout,
            send_proxy: config.send_proxy,
            retries: config.retries,
            panic,
            eject_after: config.health.probe().map(|probe| probe.fall),
            backends,
            balancer,
        }
    }

    /// The backends to try for a new connection from `client`, best first,
    /// each at most once. Callers try at most `retries` + 1 of them.
    pub fn candidates(&self, client: SocketAddr) -> impl Iterator<Item = &Backend> {
        self.balancer.candidates(client).map(|i| &self.backends[i])
    }

    /// The Maglev table's size; 0 for other algorithms.
    pub fn table_size(&self) -> usize {
        self.balancer.table_size()
    }

    /// This pool rebuilt with the backends named in `down` out of rotation,
    /// as probes would leave them: what `sluice explain --without` shows.
    pub fn without(&self, config: &config::Pool, down: &[&str]) -> Pool {
        let backends = self
            .backends
            .iter()
            .map(|b| Backend {
                up: b.up && !down.contains(&&*b.name),
                ..b.clone()
            })
            .collect();
        Pool::build(&self.name, config, backends)
    }
}

impl Backend {
    pub fn new(
        endpoint: &config::Endpoint,
        up: bool,
        passive: Arc<PassiveHealth>,
        load: Arc<Load>,
        stats: Arc<BackendStats>,
    ) -> Backend {
        Backend {
            name: endpoint.name.as_str().into(),
            addr: endpoint.addr,
            weight: endpoint.weight,
            max_connections: endpoint.max_connections,
            up,
            passive,
            load,
            stats,
        }
    }

    /// Counts a new connection to this backend, unless it is full.
    pub fn lease(&self) -> Option<Lease> {
        self.load.lease(self.max_connections)
    }
}
