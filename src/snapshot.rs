//! The routing state every worker reads: an immutable [`Snapshot`] behind an
//! `ArcSwap`.
//!
//! A snapshot holds everything needed to route a new connection: which pool
//! each listener feeds, the pools' backends and their Maglev tables. It is
//! built off the data path from a validated configuration and published with
//! one atomic swap; a worker loads the current one per connection without a
//! lock. A connection that has picked its backend keeps it, whatever is
//! published afterwards.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::balancer::key_hash;
use crate::balancer::maglev::{Maglev, Member, Preference};
use crate::config::{Config, HashKey};

/// The snapshot shared by all workers. It lives as long as the process, so
/// it is leaked once at start-up and handed out as a plain reference.
pub type SharedSnapshot = &'static ArcSwap<Snapshot>;

pub struct Snapshot {
    /// Listener name → index into `pools`.
    routes: HashMap<String, usize>,
    pools: Vec<Pool>,
}

pub struct Pool {
    pub name: String,
    pub hash_key: HashKey,
    pub connect_timeout: Duration,
    pub retries: u32,
    pub backends: Vec<Backend>,
    maglev: Maglev,
}

pub struct Backend {
    pub name: Arc<str>,
    pub addr: SocketAddr,
}

impl Snapshot {
    pub fn build(config: &Config) -> Snapshot {
        let pools: Vec<Pool> = config
            .pools
            .iter()
            .map(|(name, pool)| {
                let members: Vec<Member> = pool
                    .backends
                    .iter()
                    .map(|b| Member {
                        name: b.name(),
                        weight: b.weight,
                    })
                    .collect();
                Pool {
                    name: name.clone(),
                    hash_key: pool.hash_key,
                    connect_timeout: pool.connect_timeout,
                    retries: pool.retries,
                    maglev: Maglev::build(&members, pool.table_size),
                    backends: pool
                        .backends
                        .iter()
                        .map(|b| Backend {
                            name: b.name().into(),
                            addr: b.socket_addr,
                        })
                        .collect(),
                }
            })
            .collect();
        let routes = config
            .listeners
            .iter()
            .map(|(name, listener)| {
                let pool = pools
                    .iter()
                    .position(|p| p.name == listener.pool)
                    .expect("validation checked that every listener's pool exists");
                (name.clone(), pool)
            })
            .collect();
        Snapshot { routes, pools }
    }

    /// The pool that connections accepted by `listener` go to.
    pub fn pool_for(&self, listener: &str) -> Option<&Pool> {
        self.routes.get(listener).map(|&i| &self.pools[i])
    }

    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name)
    }
}

impl Pool {
    /// The backends to try for `client`, best first: the first choice and up
    /// to `retries` more, each at most once.
    pub fn candidates(&self, client: SocketAddr) -> impl Iterator<Item = &Backend> {
        let order: Preference<'_> = self.maglev.preference(key_hash(self.hash_key, client));
        order
            .take(self.retries as usize + 1)
            .map(|i| &self.backends[i])
    }

    pub fn table_size(&self) -> usize {
        self.maglev.slots()
    }
}
