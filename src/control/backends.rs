//! The backend registry: what the control plane knows of each backend
//! beyond any one snapshot.
//!
//! A backend's identity is its [`BackendKey`]: its pool, its name (for an
//! address of a host-name entry, `NAME/IP`: see
//! [`Endpoint`](crate::config::Endpoint)) and its address. Everything that
//! must outlive a snapshot hangs off that key and nothing else: the health
//! verdict, the passive failure count, the count of open connections, the
//! probe task and the metric series. A backend that stays through a reload
//! or a DNS answer keeps all of it; one that goes takes all of it away (its
//! series with it, at the next sweep); one whose address changes under the
//! same name is a new server, with a fresh verdict.
//!
//! The registry also holds the operator states ([`States`]), which belong
//! to a backend's pool and name: a backend in `maint` runs no probe, and
//! leaves maintenance as a new backend would start, judged afresh.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;

use crate::admin::api::{BackendView, Health, PoolView, PoolsView};
use crate::balancer::load::Load;
use crate::config::schema::{OnDown, Role};
use crate::config::{Config, Endpoint, HealthProbe};
use crate::connection::queue::Waiting;
use crate::health::{self, PassiveHealth, ProbeFailure, Verdict};
use crate::metrics::{BackendStats, Metrics, PoolStats};
use crate::shared::Event;
use crate::snapshot::{self, Backend};
use crate::state::{OperatorState, Place, States};

/// A backend's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub pool: String,
    pub name: String,
    pub addr: SocketAddr,
}

/// Every backend of the running configuration.
#[derive(Default)]
pub struct Backends {
    entries: HashMap<BackendKey, Entry>,
    /// The key of each backend by the number its probes and passive reports
    /// carry.
    ids: HashMap<u64, BackendKey>,
    /// Each pool's queue: it outlives snapshots, and reloads that keep the
    /// pool.
    waiting: HashMap<String, Arc<Waiting>>,
    /// Operator states, by pool and backend name.
    states: States,
    next_id: u64,
}

struct Entry {
    id: u64,
    passive: Arc<PassiveHealth>,
    /// Its open connections, across workers and reloads.
    load: Arc<Load>,
    /// Made again at every sync: the listeners that feed its pool may
    /// change.
    stats: Arc<BackendStats>,
    verdict: Verdict,
    /// What its pool does with its connections when it goes down.
    on_down: OnDown,
    /// Why its last probe failed, if it did: a new reason is logged once.
    failing: Option<String>,
    /// What the operator said of it.
    state: OperatorState,
    /// The running probe task and the settings it runs with.
    prober: Option<(HealthProbe, JoinHandle<()>)>,
}

/// What a probe outcome or a passive report did to a backend.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing visible: the verdict holds.
    None,
    /// The backend is up again, or down now.
    Flipped { up: bool },
    /// The first probe of a backend that was unknown judged it.
    Judged { up: bool },
    /// It stays down, for a reason other than the one last logged.
    FailsOtherwise,
}

impl Backends {
    /// Makes the registry match `config`: new backends start up (unknown,
    /// in a pool that fails closed), backends that are gone are forgotten
    /// (returned: those whose connections `on_down: close` resets), and every backend's metric series are
    /// registered anew. With `events` (once the control plane's runtime
    /// runs), each backend gets a probe task with its pool's settings, and
    /// a backend whose settings changed starts counting afresh.
    pub fn sync(
        &mut self,
        config: &Config,
        metrics: &Metrics,
        events: Option<&UnboundedSender<Event>>,
    ) -> Vec<(u64, String)> {
        let mut present = HashSet::new();
        self.waiting
            .retain(|pool, _| config.pools.contains_key(pool));
        for (pool_name, pool) in &config.pools {
            // Registered again in this generation, the series stays.
            let stats = PoolStats::new(metrics, pool_name);
            self.waiting
                .entry(pool_name.clone())
                .or_insert_with(|| Arc::new(Waiting::new(stats.queue_length)));
            let settings = pool.health.probe();
            // Without probes nothing would ever judge an unknown backend.
            let wait_for_probe = settings.is_some() && !pool.fail_open();
            let listeners = snapshot::listeners_of(config, pool_name);
            for endpoint in pool.endpoints() {
                let key = BackendKey {
                    pool: pool_name.clone(),
                    name: endpoint.name.clone(),
                    addr: endpoint.addr,
                };
                present.insert(key.clone());
                let stats = Arc::new(BackendStats::new(
                    metrics,
                    pool_name,
                    &endpoint.name,
                    &listeners,
                ));
                if !self.entries.contains_key(&key) {
                    self.next_id += 1;
                    let id = self.next_id;
                    self.ids.insert(id, key.clone());
                    let entry = Entry {
                        id,
                        passive: Arc::new(PassiveHealth::new(id)),
                        load: Arc::default(),
                        stats: stats.clone(),
                        verdict: Verdict::first(wait_for_probe),
                        on_down: pool.on_down(),
                        failing: None,
                        state: OperatorState::Ready,
                        prober: None,
                    };
                    self.entries.insert(key.clone(), entry);
                }
                let entry = self.entries.get_mut(&key).expect("inserted above");
                entry.on_down = pool.on_down();
                let state = self.states.get(pool_name, &endpoint.name);
                if entry.state == OperatorState::Maint && state != OperatorState::Maint {
                    // Out of maintenance: judged afresh, like a new backend.
                    entry.verdict = Verdict::first(wait_for_probe);
                    entry.failing = None;
                }
                entry.state = state;
                stats.up.set(if entry.verdict.up { 1.0 } else { 0.0 });
                stats.operator_state(state);
                entry.stats = stats;
                if state == OperatorState::Maint {
                    entry.stop_prober();
                } else if let Some(events) = events {
                    entry.run_prober(settings.as_ref(), endpoint.addr, events);
                }
            }
        }
        let gone: Vec<BackendKey> = self
            .entries
            .keys()
            .filter(|key| !present.contains(*key))
            .cloned()
            .collect();
        let mut closing = Vec::new();
        for key in gone {
            let mut entry = self.entries.remove(&key).expect("listed above");
            entry.stop_prober();
            self.ids.remove(&entry.id);
            if entry.on_down == OnDown::Close {
                closing.push((entry.id, key.name));
            }
        }
        closing
    }

    /// Sets backend `name` of `pool`'s operator state, to take effect at
    /// the next [`sync`](Backends::sync): the state it had, and the
    /// identifier of each of its addresses; `None` if there is no such
    /// backend.
    pub fn set_state(
        &mut self,
        pool: &str,
        name: &str,
        state: OperatorState,
    ) -> Option<(OperatorState, Vec<u64>)> {
        let ids: Vec<u64> = self
            .entries
            .iter()
            .filter(|(key, _)| key.pool == pool && key.name == name)
            .map(|(_, entry)| entry.id)
            .collect();
        if ids.is_empty() {
            return None;
        }
        Some((self.states.set(pool, name, state), ids))
    }

    /// The backends of `pool` made of its host-name entry `name`: `NAME/IP`
    /// for each address, sorted.
    pub fn addresses_of(&self, pool: &str, name: &str) -> Vec<String> {
        let prefix = format!("{name}/");
        let mut names: Vec<String> = self
            .entries
            .keys()
            .filter(|key| key.pool == pool && key.name.starts_with(&prefix))
            .map(|key| key.name.clone())
            .collect();
        names.sort();
        names
    }

    /// Every operator state, to be written to the state file.
    pub fn states(&self) -> &States {
        &self.states
    }

    /// Takes the operator states read from the state file, before the
    /// first sync.
    pub fn restore(&mut self, states: States) {
        self.states = states;
    }

    /// Forgets the operator states of backends that neither the registry
    /// has nor `config` names (a reload took them away, or the state file
    /// named them): those backends, with their states. An address of a
    /// host-name entry keeps its state while the entry stays, also when a
    /// DNS answer leaves it out for a while (Consul drops an instance that
    /// is down for its maintenance, and lists it again once it is back).
    pub fn forget_absent_states(&mut self, config: &Config) -> Vec<(Place, OperatorState)> {
        let entries = &self.entries;
        self.states.forget_absent(|(pool, name)| {
            let registered = entries
                .keys()
                .any(|key| &key.pool == pool && &key.name == name);
            let of_host_name = || {
                let Some((entry, _)) = name.split_once('/') else {
                    return false;
                };
                config.pools.get(pool).is_some_and(|pool| {
                    pool.backends
                        .iter()
                        .any(|b| b.has_host_name() && b.name() == entry)
                })
            };
            registered || of_host_name()
        })
    }

    /// What `GET /api/pools` shows, in the file's order.
    pub fn view(&self, config: &Config) -> PoolsView {
        let pools = config
            .pools
            .iter()
            .map(|(pool_name, pool)| {
                let role = pool.health.probe().map(|probe| probe.role);
                let backends = pool
                    .endpoints()
                    .iter()
                    .filter_map(|endpoint| {
                        let key = BackendKey {
                            pool: pool_name.clone(),
                            name: endpoint.name.clone(),
                            addr: endpoint.addr,
                        };
                        let entry = self.entries.get(&key)?;
                        Some(entry.view(endpoint, role))
                    })
                    .collect();
                PoolView {
                    name: pool_name.clone(),
                    balance: pool.balance.name().to_owned(),
                    queued: self.waiting.get(pool_name).map_or(0, |w| w.len()),
                    backends,
                }
            })
            .collect();
        PoolsView { pools }
    }

    /// The queue of pool `pool`, of the configuration last synced.
    pub fn waiting(&self, pool: &str) -> Arc<Waiting> {
        self.waiting[pool].clone()
    }

    /// The backend that probes and reports call `id`, if it is still there.
    pub fn key(&self, id: u64) -> Option<&BackendKey> {
        self.ids.get(&id)
    }

    /// Applies one probe outcome of backend `id`, whose pool probes with
    /// `probe`. A probe that could not run for want of a local resource is
    /// not counted at all.
    pub fn probed(
        &mut self,
        id: u64,
        outcome: &Result<(), ProbeFailure>,
        probe: &HealthProbe,
    ) -> Change {
        let Some(entry) = self.ids.get(&id).and_then(|key| self.entries.get_mut(key)) else {
            return Change::None;
        };
        // A probe that was under way when the backend entered maintenance.
        let in_maint = entry.state == OperatorState::Maint;
        if in_maint || matches!(outcome, Err(ProbeFailure::Local(_))) {
            return Change::None;
        }
        entry.stats.probed(match outcome {
            Ok(()) => "ok",
            Err(ProbeFailure::Timeout(_)) => "timeout",
            Err(_) => "fail",
        });
        let was_unknown = entry.verdict.unknown;
        let flipped = entry
            .verdict
            .observe(outcome.is_ok(), probe.rise, probe.fall);
        let reason = outcome.as_ref().err().map(ToString::to_string);
        let new_reason = reason.is_some() && reason != entry.failing;
        entry.failing = reason;
        if !flipped {
            return match new_reason && !entry.verdict.up {
                true => Change::FailsOtherwise,
                false => Change::None,
            };
        }
        if outcome.is_ok() {
            entry.passive.record_success();
        }
        match entry.flipped() {
            Change::Flipped { up } if was_unknown => Change::Judged { up },
            change => change,
        }
    }

    /// Takes backend `id` out at once: its pool's `fall` connections in a
    /// row failed. Probes bring it back.
    pub fn eject(&mut self, id: u64) -> Change {
        let Some(entry) = self.ids.get(&id).and_then(|key| self.entries.get_mut(key)) else {
            return Change::None;
        };
        // The next streak starts from zero.
        entry.passive.record_success();
        if !entry.verdict.eject() {
            return Change::None;
        }
        entry.flipped()
    }

    /// Backend `endpoint` of `pool` as a snapshot routes to it.
    pub fn backend(&self, pool: &str, endpoint: &Endpoint) -> Backend {
        let key = BackendKey {
            pool: pool.to_owned(),
            name: endpoint.name.clone(),
            addr: endpoint.addr,
        };
        let entry = &self.entries[&key];
        Backend::new(
            endpoint,
            entry.verdict.up,
            entry.state,
            entry.passive.clone(),
            entry.load.clone(),
            entry.stats.clone(),
        )
    }

    /// (backends up, all backends).
    pub fn up(&self) -> (usize, usize) {
        let up = self.entries.values().filter(|e| e.verdict.up).count();
        (up, self.entries.len())
    }
}

impl Entry {
    /// The backend as `GET /api/pools` shows it; `role`: what its pool's
    /// probes check, if they run.
    fn view(&self, endpoint: &Endpoint, role: Option<Role>) -> BackendView {
        let maint = self.state == OperatorState::Maint;
        let health = match self.verdict {
            _ if maint => Health::Unknown,
            Verdict { unknown: true, .. } => Health::Unknown,
            Verdict { up: true, .. } => Health::Up,
            Verdict { up: false, .. } => Health::Down,
        };
        let reason = match maint {
            true => Some("in maintenance: not probed".to_owned()),
            false => self.failing.clone(),
        };
        let role = match (health, role) {
            (Health::Up, Some(Role::Primary)) => Some("primary".to_owned()),
            (Health::Up, Some(Role::Replica)) => Some("replica".to_owned()),
            _ => None,
        };
        BackendView {
            name: endpoint.name.clone(),
            address: endpoint.addr.to_string(),
            weight: endpoint.weight,
            backup: endpoint.backup,
            state: self.state,
            health,
            reason,
            role,
            active: self.load.open(),
            total: self.load.total(),
        }
    }

    fn stop_prober(&mut self) {
        if let Some((_, task)) = self.prober.take() {
            task.abort();
        }
    }

    fn flipped(&self) -> Change {
        let up = self.verdict.up;
        self.stats.up.set(if up { 1.0 } else { 0.0 });
        Change::Flipped { up }
    }

    /// Runs a probe task with `settings` (none: probes are off), unless one
    /// with the same settings runs already.
    fn run_prober(
        &mut self,
        settings: Option<&HealthProbe>,
        addr: SocketAddr,
        events: &UnboundedSender<Event>,
    ) {
        let current = self.prober.as_ref().map(|(settings, _)| settings);
        if current == settings {
            return;
        }
        if let Some((_, task)) = self.prober.take() {
            task.abort();
        }
        // Streaks counted against other settings (another `rise` or
        // `fall`) start again, the passive one and the probes' alike.
        self.passive.record_success();
        self.verdict.restart_streak();
        self.prober = settings.map(|settings| {
            let task = start_prober(
                self.id,
                addr,
                settings.clone(),
                self.verdict.unknown,
                events.clone(),
            );
            (settings.clone(), task)
        });
        if self.prober.is_none() && !self.verdict.up {
            // Probes were turned off: nothing would bring it back.
            self.verdict = Verdict::up();
            self.stats.up.set(1.0);
        }
    }
}

/// Probes `addr` every `settings.interval`, starting at a random point of
/// the first interval so that the probes of many backends do not fire
/// together; at once for a backend whose state is unknown, since it takes
/// no client until a probe passes. The interval itself is not jittered,
/// which keeps the detection time within `fall` x `interval` + `timeout`.
fn start_prober(
    id: u64,
    addr: SocketAddr,
    settings: HealthProbe,
    unknown: bool,
    events: UnboundedSender<Event>,
) -> JoinHandle<()> {
    tokio::task::spawn_local(async move {
        let interval = settings.interval;
        let phase = match unknown {
            true => 0,
            false => RandomState::new().hash_one(id) % (interval.as_millis() as u64).max(1),
        };
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{self, Resolver};

    fn config(text: &str) -> Config {
        config::parse(Path::new("t.yaml"), text, Resolver::Offline).unwrap()
    }

    const TWO: &str = "listeners:\n  l: { listen: 127.0.0.1:7000, pool: p }\npools:\n  p:\n    health: { fall: 3, rise: 2 }\n    backends:\n      - { address: 10.0.0.1:1, name: a }\n      - { address: 10.0.0.2:1, name: b }\n";

    #[test]
    fn a_backend_that_stays_keeps_its_verdict_and_one_that_goes_is_forgotten() {
        let metrics = Metrics::new(true);
        let mut backends = Backends::default();
        backends.sync(&config(TWO), &metrics, None);
        let probe = HealthProbe::default();
        let a = backends
            .ids
            .iter()
            .find(|(_, k)| k.name == "a")
            .map(|(id, _)| *id)
            .unwrap();
        assert_eq!(backends.eject(a), Change::Flipped { up: false });
        // `b` leaves the file; `a` stays, down.
        backends.sync(
            &config(&TWO.replace("      - { address: 10.0.0.2:1, name: b }\n", "")),
            &metrics,
            None,
        );
        assert_eq!(backends.up(), (0, 1));
        let fail = Err(ProbeFailure::Connect("refused".into()));
        assert_eq!(
            backends.probed(a, &fail, &probe),
            Change::FailsOtherwise,
            "a reason to log"
        );
        assert_eq!(backends.probed(a, &fail, &probe), Change::None, "once");
        assert_eq!(backends.probed(a, &Ok(()), &probe), Change::None);
        assert_eq!(
            backends.probed(a, &Ok(()), &probe),
            Change::Flipped { up: true }
        );
        // A new address under the same name is a new server, up.
        backends.eject(a);
        backends.sync(
            &config(&TWO.replace("10.0.0.1:1", "10.0.0.9:1")),
            &metrics,
            None,
        );
        assert_eq!(backends.up(), (2, 2));
        assert_eq!(
            backends.key(a),
            None,
            "reports about the old one are ignored"
        );
    }

    #[test]
    fn without_probes_a_pool_that_fails_closed_starts_up() {
        let metrics = Metrics::new(true);
        let mut backends = Backends::default();
        let closed = TWO.replace(
            "health: { fall: 3, rise: 2 }",
            "health: off\n    fail_open: false",
        );
        backends.sync(&config(&closed), &metrics, None);
        assert_eq!(backends.up(), (2, 2));
        // Nor does leaving maintenance wait for a probe that never runs.
        backends.set_state("p", "a", OperatorState::Maint).unwrap();
        backends.sync(&config(&closed), &metrics, None);
        backends.set_state("p", "a", OperatorState::Ready).unwrap();
        backends.sync(&config(&closed), &metrics, None);
        assert_eq!(backends.up(), (2, 2));
    }

    #[test]
    fn a_probe_that_could_not_run_counts_for_nothing() {
        let metrics = Metrics::new(true);
        let mut backends = Backends::default();
        backends.sync(&config(TWO), &metrics, None);
        let probe = HealthProbe {
            fall: 1,
            ..HealthProbe::default()
        };
        let local = Err(ProbeFailure::Local("Too many open files".into()));
        for id in [1, 2] {
            assert_eq!(backends.probed(id, &local, &probe), Change::None);
        }
        assert_eq!(backends.up(), (2, 2));
        assert!(!metrics.render().contains("result=\"fail\"} 1"));
    }
}
