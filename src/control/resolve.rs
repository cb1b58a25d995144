//! Re-resolution of backend addresses. Host names every `resolve_interval`:
//! one task per pool that has host names and an interval; getaddrinfo
//! blocks for as long as the resolver takes, so each lookup runs on a
//! thread of its own. A pool with `discovery: { sentinel }`: one task that
//! asks the Sentinels for the master at once and every `resolve_interval`
//! ([`SENTINEL_INTERVAL`] when 0), and follows a `+switch-master` any of
//! them announces at once. Either way the answers come back to the control
//! plane as an event.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc::{self, UnboundedSender};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::schema::Sentinel;
use crate::config::{self, Config, Resolver};
use crate::discovery;
use crate::shared::Event;

use super::Controller;

/// How often the Sentinels are asked for the master when the pool's
/// `resolve_interval` is 0.
pub const SENTINEL_INTERVAL: Duration = Duration::from_secs(5);

use super::off_thread;

/// The resolver tasks of the configuration in use.
#[derive(Default)]
pub struct Resolvers(Vec<JoinHandle<()>>);

impl Resolvers {
    /// Stops the tasks of the previous configuration and starts those of
    /// `config`. A lookup under way is left to finish on its thread; its
    /// answer is dropped.
    pub fn restart(&mut self, config: &Config, events: &UnboundedSender<Event>) {
        for task in self.0.drain(..) {
            task.abort();
        }
        for (name, pool) in &config.pools {
            if let Some(discovery) = &pool.discovery {
                let every = match pool.resolve_interval {
                    Duration::ZERO => SENTINEL_INTERVAL,
                    every => every,
                };
                let watch = follow_sentinels(
                    name.clone(),
                    discovery.sentinel.clone(),
                    every,
                    events.clone(),
                );
                self.0.push(tokio::task::spawn_local(watch));
                continue;
            }
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
            let (pool, every, events) = (name.clone(), pool.resolve_interval, events.clone());
            self.0.push(tokio::task::spawn_local(async move {
                let start = tokio::time::Instant::now() + every;
                let mut ticker = tokio::time::interval_at(start, every);
                loop {
                    ticker.tick().await;
                    let entries = entries.clone();
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
}

/// Tells the control plane which master the Sentinels of `pool` name: at
/// once, every `every`, and as soon as one announces a failover.
async fn follow_sentinels(
    pool: String,
    sentinel: Sentinel,
    every: Duration,
    events: UnboundedSender<Event>,
) {
    let (switched, mut switches) = mpsc::unbounded_channel();
    let _listening = AbortOnDrop(
        sentinel
            .resolved
            .iter()
            .map(|&addr| {
                let listen = discovery::listen(
                    addr,
                    sentinel.master.clone(),
                    sentinel.auth.clone(),
                    switched.clone(),
                );
                tokio::task::spawn_local(listen)
            })
            .collect(),
    );
    let address = format!("sentinel:{}", sentinel.master);
    let report = |master: SocketAddr| {
        let answers = vec![(0, address.clone(), Ok(vec![master]))];
        events
            .send(Event::Resolved {
                pool: pool.clone(),
                answers,
            })
            .is_ok()
    };
    let mut failing: Option<String> = None;
    let mut next = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next) => {
                match discovery::majority(&sentinel).await {
                    Ok(master) => {
                        failing = None;
                        if !report(master) {
                            return;
                        }
                    }
                    // Said once per reason; the master known stays.
                    Err(e) if failing.as_ref() != Some(&e) => {
                        warn!(pool, master = %sentinel.master, "cannot learn the master from the Sentinels: {e}");
                        failing = Some(e);
                    }
                    Err(_) => {}
                }
                next = tokio::time::Instant::now() + every;
            }
            Some(master) = switches.recv() => {
                info!(pool, master = %sentinel.master, "a Sentinel announced a failover to {master}");
                if !report(master) {
                    return;
                }
                // The other Sentinels may not have heard yet: the next
                // vote waits a whole interval.
                next = tokio::time::Instant::now() + every;
            }
        }
    }
}

/// Tasks that end with their owner.
struct AbortOnDrop(Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

impl Controller {
    /// Applies fresh answers (of DNS, or of the Sentinels) for one pool;
    /// keeps the old addresses of an entry whose lookup failed.
    pub(super) fn on_resolved(
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
        self.publish_all();
        for (name, address, addrs) in changes {
            match address.strip_prefix("sentinel:") {
                Some(master) => {
                    info!(pool = pool_name, backend = %name, "the Sentinels name {addrs} as master {master}")
                }
                None => {
                    info!(pool = pool_name, backend = %name, "{address} now resolves to {addrs}")
                }
            }
        }
    }
}

/// A reload keeps the master the Sentinels named, for pools whose
/// discovery did not change: the new file has no address for it until
/// they are asked again, and the pool must not lose its backend (and, with
/// `on_down: close`, its sessions) meanwhile.
pub fn keep_discovered(running: &Config, config: &mut Config) {
    for (name, pool) in &mut config.pools {
        let Some(before) = running.pools.get(name) else {
            continue;
        };
        if pool.discovery.is_none() || pool.discovery != before.discovery {
            continue;
        }
        if let (Some(new), Some(old)) = (pool.backends.first_mut(), before.backends.first()) {
            new.resolved = old.resolved.clone();
        }
    }
}
