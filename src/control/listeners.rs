//! The listening sockets: one per listener per worker, keyed by address.
//!
//! A listener is its address. A reload that renames a listener, or changes
//! its pool or its limits, keeps its sockets, and with them the connections
//! waiting in their backlog: closing a socket resets those. Only a new
//! address binds new sockets, and only an address that no listener has any
//! more stops its sockets. Each listener also owns its metric series.

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::sync::Arc;

use socket2::SockRef;
use tracing::info;

use super::error::ControlError;
use crate::config::{self, Config};
use crate::mailbox::{BoundListener, Stop};
use crate::metrics::{ListenerStats, Metrics};
use crate::net;

/// The listeners in use.
pub struct Listeners {
    workers: usize,
    by_addr: HashMap<SocketAddr, Active>,
}

/// One listener's sockets.
struct Active {
    name: String,
    backlog: u32,
    /// A duplicate of each worker's socket, kept to change the backlog or
    /// to stop the listener.
    sockets: Vec<TcpListener>,
    stop: Arc<Stop>,
    stats: Arc<ListenerStats>,
}

impl Active {
    /// Stops accepting: each worker's accept fails, or its wait for room
    /// ends, and its loop ends, closing the socket. Connections waiting in
    /// the backlog are reset.
    fn stop(&self) {
        for socket in &self.sockets {
            let _ = SockRef::from(socket).shutdown(Shutdown::Both);
        }
        self.stop.stop();
    }
}

/// Addresses a new configuration adds, bound but not yet in use: a reload
/// binds them before it changes anything, since binding can fail.
pub struct Bound(Vec<(SocketAddr, Active, Vec<BoundListener>)>);

impl Listeners {
    /// Binds every listener of `config` once per worker; returns the
    /// sockets of each worker.
    pub fn bind(
        config: &Config,
        workers: usize,
        metrics: &Metrics,
    ) -> Result<(Listeners, Vec<Vec<BoundListener>>), ControlError> {
        let mut listeners = Listeners {
            workers,
            by_addr: HashMap::new(),
        };
        let bound = listeners.bind_new(config, metrics)?;
        let mut per_worker: Vec<Vec<BoundListener>> = (0..workers).map(|_| Vec::new()).collect();
        for (addr, active, sockets) in bound.0 {
            for (worker, socket) in per_worker.iter_mut().zip(sockets) {
                worker.push(socket);
            }
            listeners.by_addr.insert(addr, active);
        }
        Ok((listeners, per_worker))
    }

    /// Binds the addresses of `config` that no listener has yet; changes
    /// nothing in use.
    pub fn bind_new(&self, config: &Config, metrics: &Metrics) -> Result<Bound, ControlError> {
        let mut bound = Vec::new();
        for (name, listener) in &config.listeners {
            let addr = listener.listen.0;
            if !self.by_addr.contains_key(&addr) {
                let (active, sockets) = bind(name, listener, self.workers, metrics)?;
                bound.push((addr, active, sockets));
            }
        }
        Ok(Bound(bound))
    }

    /// Makes the listeners those of `config`, with the addresses `bound`
    /// for it: stops the addresses it no longer has, renames, changes
    /// backlogs. Returns the new sockets, for the workers to accept on.
    pub fn apply(&mut self, config: &Config, bound: Bound) -> Vec<Vec<BoundListener>> {
        let kept: HashMap<SocketAddr, &str> = config
            .listeners
            .iter()
            .map(|(name, l)| (l.listen.0, name.as_str()))
            .collect();
        self.by_addr.retain(|addr, active| {
            let stays = kept.contains_key(addr);
            if !stays {
                active.stop();
                info!(listener = %active.name, address = %addr, "listener stopped");
            }
            stays
        });
        for (name, listener) in &config.listeners {
            let Some(active) = self.by_addr.get_mut(&listener.listen.0) else {
                continue;
            };
            if active.name != *name {
                info!(listener = %name, address = %listener.listen.0, "listener {} renamed {name}, its sockets kept", active.name);
                active.name = name.clone();
            }
            if active.backlog != listener.backlog {
                // listen() on a listening socket only changes its backlog.
                for socket in &active.sockets {
                    let _ = SockRef::from(socket).listen(listener.backlog as i32);
                }
                active.backlog = listener.backlog;
            }
        }
        let mut per_worker: Vec<Vec<BoundListener>> =
            (0..self.workers).map(|_| Vec::new()).collect();
        for (addr, active, sockets) in bound.0 {
            info!(listener = %active.name, address = %addr, pool = %config.listeners[&active.name].pool, "listening");
            for (worker, socket) in per_worker.iter_mut().zip(sockets) {
                worker.push(socket);
            }
            self.by_addr.insert(addr, active);
        }
        per_worker
    }

    /// Registers every listener's metric series anew (see
    /// [`Metrics::sweep`]), under its current name.
    pub fn renew_stats(&mut self, metrics: &Metrics) {
        for active in self.by_addr.values_mut() {
            active.stats = Arc::new(ListenerStats::new(metrics, &active.name));
        }
    }

    /// The metric handles of listener `name`.
    pub fn stats(&self, name: &str) -> Arc<ListenerStats> {
        self.by_addr
            .values()
            .find(|active| active.name == name)
            .map(|active| active.stats.clone())
            .expect("every listener of the configuration in use is bound")
    }

    /// Stops every listener: sluice is stopping.
    pub fn stop_all(&self) {
        for active in self.by_addr.values() {
            active.stop();
        }
    }

    pub fn len(&self) -> usize {
        self.by_addr.len()
    }
}

/// Binds `listener` once per worker.
fn bind(
    name: &str,
    listener: &config::schema::Listener,
    workers: usize,
    metrics: &Metrics,
) -> Result<(Active, Vec<BoundListener>), ControlError> {
    let addr = listener.listen.0;
    let mut sockets = Vec::with_capacity(workers);
    let mut kept = Vec::with_capacity(workers);
    let stop = Arc::new(Stop::default());
    for _ in 0..workers {
        let socket = net::reuseport_listener(addr, listener.backlog).map_err(|source| {
            ControlError::Listen {
                listener: name.to_owned(),
                addr,
                source,
            }
        })?;
        kept.push(
            socket
                .try_clone()
                .map_err(|source| ControlError::ListenerSocket {
                    listener: name.to_owned(),
                    source,
                })?,
        );
        sockets.push(BoundListener {
            addr,
            socket,
            stop: stop.clone(),
        });
    }
    let active = Active {
        name: name.to_owned(),
        backlog: listener.backlog,
        sockets: kept,
        stop,
        stats: Arc::new(ListenerStats::new(metrics, name)),
    };
    Ok((active, sockets))
}
