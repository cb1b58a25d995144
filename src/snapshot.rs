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

use crate::balancer::key_hash;
use crate::balancer::maglev::{Maglev, Member};
use crate::config::{self, Config, Engine, HashKey};
use crate::health::PassiveHealth;
use crate::metrics::{BackendStats, ListenerStats};

#[derive(Clone)]
pub struct Snapshot {
    routes: HashMap<String, Route>,
    pools: Vec<Arc<Pool>>,
}

/// Where a listener's connections go, and its metric handles.
#[derive(Clone)]
pub struct Route {
    /// Index into `Snapshot::pools`.
    pool: usize,
    pub stats: Arc<ListenerStats>,
}

pub struct Pool {
    pub name: String,
    pub hash_key: HashKey,
    pub connect_timeout: Duration,
    /// How connections relay their bytes.
    pub engine: Engine,
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
    maglev: Maglev,
}

pub struct Backend {
    pub name: Arc<str>,
    pub addr: SocketAddr,
    pub weight: u32,
    pub up: bool,
    /// Shared with the control plane; survives rebuilds and reloads.
    pub passive: Arc<PassiveHealth>,
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
                        Backend::new(&e, true, Arc::new(PassiveHealth::new(0)), stats)
                    })
                    .collect();
                Arc::new(Pool::build(name, pool, backends))
            })
            .collect();
        Snapshot::new(routes(config), pools)
    }

    /// This snapshot with the pool at `index` replaced.
    pub fn with_pool(&self, index: usize, pool: Arc<Pool>) -> Snapshot {
        let mut next = self.clone();
        next.pools[index] = pool;
        next
    }

    /// The pool that connections accepted by `listener` go to, and the
    /// listener's metric handles.
    pub fn pool_for(&self, listener: &str) -> Option<(&Pool, &ListenerStats)> {
        self.routes
            .get(listener)
            .map(|route| (&*self.pools[route.pool], &*route.stats))
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
/// built) and its metric handles.
pub fn routes(config: &Config) -> HashMap<String, Route> {
    config
        .listeners
        .iter()
        .map(|(name, listener)| {
            let pool = config
                .pools
                .keys()
                .position(|p| *p == listener.pool)
                .expect("validation checked that every listener's pool exists");
            let stats = Arc::new(ListenerStats::new(name));
            (name.clone(), Route { pool, stats })
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
        let members: Vec<Member> = backends
            .iter()
            .map(|b| Member {
                name: &b.name,
                weight: if b.up || panic { b.weight } else { 0 },
            })
            .collect();
        let maglev = Maglev::build(&members, config.table_size);
        Pool {
            name: name.to_owned(),
            hash_key: config.hash_key,
            connect_timeout: config.connect_timeout,
            engine: config.engine,
            retries: config.retries,
            panic,
            eject_after: config.health.probe().map(|probe| probe.fall),
            backends,
            maglev,
        }
    }

    /// The backends to try for `client`, best first: the first choice and up
    /// to `retries` more, each at most once.
    pub fn candidates(&self, client: SocketAddr) -> impl Iterator<Item = &Backend> {
        self.maglev
            .preference(key_hash(self.hash_key, client))
            .take(self.retries as usize + 1)
            .map(|i| &self.backends[i])
    }

    pub fn table_size(&self) -> usize {
        self.maglev.slots()
    }
}

impl Backend {
    pub fn new(
        endpoint: &config::Endpoint,
        up: bool,
        passive: Arc<PassiveHealth>,
        stats: Arc<BackendStats>,
    ) -> Backend {
        Backend {
            name: endpoint.name.as_str().into(),
            addr: endpoint.addr,
            weight: endpoint.weight,
            up,
            passive,
            stats,
        }
    }
}
