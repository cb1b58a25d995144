//! The routing state every worker reads: an immutable [`Snapshot`] behind an
//! `ArcSwap`.
//!
//! A snapshot holds everything needed to route a new connection: each
//! listening address's [`Route`] (its listener, the pool it feeds, what it
//! lets in), the pools' backends with their health, and the Maglev tables
//! built from the backends that are up. The control plane builds a new
//! snapshot off the data path (on reload, re-resolution or a health change)
//! and publishes it with one atomic swap; a worker loads the current one per
//! connection without a lock. Pools are shared between snapshots, so a
//! health change rebuilds only its own pool's table.
//!
//! Routes are keyed by the listening address, the one thing of a listener
//! that a reload keeps while the socket lives (a rename keeps the socket).
//! A connection takes its route when it is accepted and the pool when it is
//! ready to dial; it keeps the backend it was given, whatever is published
//! afterwards.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::balancer::algorithms::{Balancer, Choice};
use crate::balancer::load::{Lease, Load};
use crate::config::schema::{AcceptProxy, OnDown, ProxySources, Queue, SendProxy};
use crate::config::{self, Balance, Config, Engine, HashKey};
use crate::connection::queue::Waiting;
use crate::health::PassiveHealth;
use crate::limits::Gate;
use crate::metrics::{BackendStats, ListenerStats, Metrics};
use crate::state::OperatorState;

#[derive(Clone, Default)]
pub struct Snapshot {
    routes: HashMap<SocketAddr, Arc<Route>>,
    pools: Vec<Arc<Pool>>,
}

/// Where a listener's connections go, what it lets in, and its metric
/// handles.
pub struct Route {
    /// The listener's name, for logs and metric labels.
    pub listener: Arc<str>,
    /// The pool its connections go to.
    pub pool: String,
    pub gate: Arc<Gate>,
    /// Connections start with a PROXY protocol header, believed from these
    /// sources only.
    pub accept_proxy: Option<ProxySources>,
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
    /// Backends with a weight exist but none may take clients: none is up
    /// (or known yet). In [`panic`](Pool::panic) the pool routes over all
    /// of them; if not, it routes nowhere and clients wait in its queue.
    pub all_down: bool,
    /// A backend with a weight is up but drained by its operator: when none
    /// may take clients, that is the operator's doing, not the backends'
    /// health, and `/ready` stays 200. (One in `maint` is not probed: its
    /// health is unknown, and does not count.)
    pub drained_up: bool,
    /// With every backend down, route over all of them (`panic`); if not,
    /// a client whose connects all failed waits in the queue too.
    pub fail_open: bool,
    /// What a backend marked down does to its open connections.
    pub on_down: OnDown,
    /// Clients no backend can take wait here: how many, how long.
    pub queue: Queue,
    /// Those waiting now, over every worker; outlives the snapshot.
    pub waiting: Arc<Waiting>,
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
    /// Its probes passed (or it starts up, in a pool that fails open).
    pub up: bool,
    /// Gets clients only while no other backend of the pool is up.
    pub backup: bool,
    /// What the operator said: only a `ready` backend takes new clients.
    pub state: OperatorState,
    /// 0: no limit; a full backend is passed over like a down one.
    pub max_connections: u32,
    /// Shared with the control plane; survive rebuilds and reloads.
    pub passive: Arc<PassiveHealth>,
    pub load: Arc<Load>,
    pub stats: Arc<BackendStats>,
}

impl Backend {
    /// Whether it may take new clients at all, health aside: a weight
    /// above 0, and `ready`.
    pub fn in_rotation(&self) -> bool {
        self.weight > 0 && self.state == OperatorState::Ready
    }
}

impl Snapshot {
    pub fn new(routes: HashMap<SocketAddr, Arc<Route>>, pools: Vec<Arc<Pool>>) -> Snapshot {
        Snapshot { routes, pools }
    }

    /// The snapshot of `config` with every backend up and no metrics: what
    /// `sluice explain` shows.
    pub fn from_config(config: &Config) -> Snapshot {
        let metrics = Metrics::new(false);
        let pools = config
            .pools
            .iter()
            .map(|(name, pool)| {
                let backends = pool
                    .endpoints()
                    .into_iter()
                    .map(|e| {
                        let stats = Arc::new(BackendStats::new(&metrics, name, &e.name, &[]));
                        Backend::new(
                            &e,
                            true,
                            OperatorState::Ready,
                            Arc::new(PassiveHealth::new(0)),
                            Arc::default(),
                            stats,
                        )
                    })
                    .collect();
                Arc::new(Pool::build(name, pool, backends, Arc::default()))
            })
            .collect();
        let stats = |name: &str| Arc::new(ListenerStats::new(&metrics, name));
        Snapshot::new(routes(config, None, stats), pools)
    }

    /// This snapshot with the pool at `index` replaced.
    pub fn with_pool(&self, index: usize, pool: Arc<Pool>) -> Snapshot {
        let mut next = self.clone();
        next.pools[index] = pool;
        next
    }

    /// The route of connections accepted on the listening address `addr`,
    /// if a listener of the configuration in use is bound there.
    pub fn route(&self, addr: SocketAddr) -> Option<&Arc<Route>> {
        self.routes.get(&addr)
    }

    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name).map(|p| &**p)
    }

    pub fn pools(&self) -> &[Arc<Pool>] {
        &self.pools
    }
}

/// Every listener's route, keyed by its listening address, with its gate
/// and its metric handles (`stats`). A listener that stays keeps counting
/// its open connections, and keeps its rate buckets if its limits did not
/// change (`previous`: the snapshot in use).
pub fn routes(
    config: &Config,
    previous: Option<&Snapshot>,
    stats: impl Fn(&str) -> Arc<ListenerStats>,
) -> HashMap<SocketAddr, Arc<Route>> {
    config
        .listeners
        .iter()
        .map(|(name, listener)| {
            let addr = listener.listen.0;
            let before = previous.and_then(|snapshot| snapshot.routes.get(&addr));
            let gate = match before {
                Some(route) if route.gate.enforces(listener) => route.gate.clone(),
                Some(route) => Arc::new(Gate::new(listener, route.gate.open().clone())),
                None => Arc::new(Gate::new(listener, Arc::default())),
            };
            let route = Route {
                listener: name.as_str().into(),
                pool: listener.pool.clone(),
                gate,
                accept_proxy: match &listener.accept_proxy {
                    AcceptProxy::Off => None,
                    AcceptProxy::On(sources) => Some(sources.clone()),
                },
                stats: stats(name),
            };
            (addr, Arc::new(route))
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
    /// Builds the pool's table from the backends that may take clients: in
    /// rotation (with a weight, and `ready`), up, and not a backup while
    /// another backend is up. If none may and the pool fails open, from all
    /// of those in rotation.
    pub fn build(
        name: &str,
        config: &config::Pool,
        backends: Vec<Backend>,
        waiting: Arc<Waiting>,
    ) -> Pool {
        let rotation = backends.iter().filter(|b| b.in_rotation());
        let regular_up = rotation.clone().any(|b| b.up && !b.backup);
        let usable = |b: &Backend| b.up && !(b.backup && regular_up);
        let all_down = rotation.clone().next().is_some() && !rotation.clone().any(usable);
        let drained_up = backends
            .iter()
            .any(|b| b.weight > 0 && b.up && b.state == OperatorState::Drain);
        let panic = all_down && config.fail_open();
        let choices: Vec<Choice> = backends
            .iter()
            .map(|b| Choice {
                name: &b.name,
                weight: match b.in_rotation() && (usable(b) || panic) {
                    true => b.weight,
                    false => 0,
                },
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
            all_down,
            drained_up,
            fail_open: config.fail_open(),
            on_down: config.on_down(),
            queue: config.queue.clone(),
            waiting,
            eject_after: config.health.probe().map(|probe| probe.fall),
            backends,
            balancer,
        }
    }

    /// The backends to try for a new connection from `client`, best first,
    /// each at most once. Callers try at most `retries` + 1 of them.
    pub fn candidates(&self, client: SocketAddr) -> impl Iterator<Item = &Backend> {
        self.candidate_indices(client).map(|i| &self.backends[i])
    }

    /// [`candidates`](Pool::candidates) as indices into `backends`.
    pub fn candidate_indices(&self, client: SocketAddr) -> impl Iterator<Item = usize> + '_ {
        self.balancer.candidates(client)
    }

    /// Every backend in rotation is down and the pool is `fail_open`, so
    /// the table routes over all of them rather than refuse every client
    /// (Envoy's panic threshold at 0%). A pool whose backends all have
    /// weight 0, or are in drain or maint, is drained, not in panic: it
    /// routes nowhere.
    pub fn panic(&self) -> bool {
        self.all_down && self.fail_open
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
        Pool::build(&self.name, config, backends, self.waiting.clone())
    }
}

impl Backend {
    pub fn new(
        endpoint: &config::Endpoint,
        up: bool,
        state: OperatorState,
        passive: Arc<PassiveHealth>,
        load: Arc<Load>,
        stats: Arc<BackendStats>,
    ) -> Backend {
        Backend {
            name: endpoint.name.as_str().into(),
            addr: endpoint.addr,
            weight: endpoint.weight,
            max_connections: endpoint.max_connections,
            backup: endpoint.backup,
            state,
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
