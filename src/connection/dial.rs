//! Which backend a connection gets: the first reachable one in the
//! client's preference order, trying at most `retries` more after the
//! first. A backend at its `max_connections` is passed over without
//! counting as a try.
//!
//! [`Dialer`] is the plan and its progress; the connection's
//! [`Session`](super::session::Session) asks it for each connect and tells
//! it how the driver's connect went. Each outcome is judged by
//! [`classify`](super::ending::classify): a failed connect counts against
//! its backend (and may eject it), a successful one ends its failure
//! streak, and running out of local resources stops the retries at once
//! (no other backend would fare better, and this one is not to blame).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::balancer::load::Lease;
use crate::config::schema::{Queue, SendProxy};
use crate::config::Engine;
use crate::health::PassiveHealth;
use crate::logging::Throttle;
use crate::metrics::{BackendStats, ErrorReason};
use crate::proxy_protocol::{self, Carried};
use crate::shared::Shared;
use crate::snapshot::{Backend, Pool, Route};

use super::admit::turn_away;
use super::ending::{self, Classified, Ending};
use super::queue::Waiting;
use super::{judge, log_closed};

/// "No backend reachable" is logged at most once per interval, with a count.
static NO_BACKEND: Throttle = Throttle::new();

/// And clients closed because sluice lacked a local resource to connect.
static OUT_OF_RESOURCES: Throttle = Throttle::new();

/// The backends to try for one connection, and how far it got.
pub struct Dialer {
    /// Held only while dialing: a long connection does not keep its pool
    /// (or the snapshot it came from) alive.
    pool: Arc<Pool>,
    client: SocketAddr,
    /// The client's preference order, as indices into the pool's backends.
    /// Taken once: some algorithms move on with every call.
    order: Vec<usize>,
    next: usize,
    tries: u32,
    last_error: Option<io::Error>,
    /// The last connect failed for want of a local resource.
    local_failure: bool,
    proxy_header: Option<Box<[u8]>>,
}

/// One connect the driver is to make.
pub struct Attempt {
    pub addr: SocketAddr,
    backend: usize,
    lease: Lease,
    started: Instant,
}

/// The backend a connection was given: what it needs once the pool it
/// came from is released.
pub struct Dialed {
    pub name: Arc<str>,
    pub passive: Arc<PassiveHealth>,
    pub stats: Arc<BackendStats>,
    pub eject_after: Option<u32>,
    pub engine: Engine,
    /// Close the connection when nothing moved either way this long.
    pub idle_timeout: Option<Duration>,
    /// Counts the connection in its backend's load until it ends.
    pub lease: Lease,
}

/// What a failed connect leaves to do.
pub enum Next {
    /// Ask [`Dialer::next_attempt`] for the next backend.
    Retry,
    /// Stop: sluice itself lacks a resource (descriptors, memory, ports).
    GiveUp,
}

impl Dialer {
    /// The plan for a connection from `client` (over `peer`) on `route`,
    /// from the snapshot of this moment. `carried` is what its PROXY
    /// header said, and `local` tells the address it was accepted on, for
    /// the header sent to backends; `lasted`: since it was accepted. `None`
    /// if it was turned away: its pool is gone, or it is gone itself.
    pub fn new(
        route: &Route,
        (client, peer): (SocketAddr, SocketAddr),
        carried: Carried,
        local: impl FnOnce() -> io::Result<SocketAddr>,
        shared: &Shared,
        lasted: Duration,
    ) -> Option<Dialer> {
        // Loaded only now: a client slow to send its header must not keep
        // an old snapshot alive.
        let pool = shared
            .snapshot
            .load()
            .pools()
            .iter()
            .find(|pool| pool.name == route.pool)
            .cloned();
        let Some(pool) = pool else {
            // A reload removed the pool since the connection was accepted.
            let why = "its pool was removed";
            turn_away(route, ErrorReason::NoBackend, &why, (client, peer), lasted);
            return None;
        };
        let proxy_header = match pool.send_proxy {
            SendProxy::Off => None,
            version => {
                let local = match carried {
                    Some((_, destination)) => destination,
                    None => match local() {
                        Ok(local) => local,
                        Err(e) => {
                            // The client is already gone.
                            debug!(client = %client, "no local address: {e}");
                            return None;
                        }
                    },
                };
                Some(proxy_protocol::header(version, client, local).into_boxed_slice())
            }
        };
        let order = pool.candidate_indices(client).collect();
        Some(Dialer {
            pool,
            client,
            order,
            next: 0,
            tries: 0,
            last_error: None,
            local_failure: false,
            proxy_header,
        })
    }

    /// Whether a client this plan could not place may wait in its pool's
    /// queue: no backend could take it (none may be chosen, or every one
    /// is full), or every connect failed in a pool that does not fail open
    /// (its primary died a moment before probes noticed). Not when sluice
    /// itself ran out of a resource.
    pub fn may_wait(&self) -> bool {
        !self.local_failure && (self.tries == 0 || !self.pool.fail_open)
    }

    /// The pool's queue: its settings, and who waits in it.
    pub fn queue(&self) -> (&Queue, &Arc<Waiting>) {
        (&self.pool.queue, &self.pool.waiting)
    }

    pub fn connect_timeout(&self) -> Duration {
        self.pool.connect_timeout
    }

    /// What to send the backend first: the PROXY header of `send_proxy`.
    pub fn take_proxy_header(&mut self) -> Option<Box<[u8]>> {
        self.proxy_header.take()
    }

    /// The next backend to connect to, from `now` on; `None` when there is
    /// none left to try.
    pub fn next_attempt(&mut self, now: Instant) -> Option<Attempt> {
        if self.local_failure {
            return None;
        }
        while self.tries <= self.pool.retries {
            let &backend = self.order.get(self.next)?;
            self.next += 1;
            let Some(lease) = self.pool.backends[backend].lease() else {
                continue;
            };
            self.tries += 1;
            return Some(Attempt {
                addr: self.pool.backends[backend].addr,
                backend,
                lease,
                started: now,
            });
        }
        None
    }

    /// What `ending` of `attempt` says, and what its backend's passive
    /// health hears of it.
    fn judge(&self, attempt: &Attempt, ending: &Ending, shared: &Shared) -> Classified {
        let classified = ending::classify(ending);
        let backend = &self.pool.backends[attempt.backend];
        judge(
            classified.passive,
            &backend.passive,
            self.pool.eject_after,
            shared,
        );
        classified
    }

    /// `attempt` connected, at `now`: the connection's backend.
    pub fn connected(&self, attempt: Attempt, shared: &Shared, now: Instant) -> Dialed {
        self.judge(&attempt, &Ending::Connected, shared);
        let backend = &self.pool.backends[attempt.backend];
        backend
            .stats
            .connect_seconds
            .record(now.saturating_duration_since(attempt.started).as_secs_f64());
        Dialed {
            name: backend.name.clone(),
            passive: backend.passive.clone(),
            stats: backend.stats.clone(),
            eject_after: self.pool.eject_after,
            engine: self.pool.engine,
            idle_timeout: (!self.pool.idle_timeout.is_zero()).then_some(self.pool.idle_timeout),
            lease: attempt.lease,
        }
    }

    /// `attempt` failed with `error`: counted against its backend unless
    /// sluice is to blame, in which case the tries stop.
    pub fn failed(
        &mut self,
        attempt: Attempt,
        error: io::Error,
        route: &Route,
        shared: &Shared,
    ) -> Next {
        let classified = self.judge(&attempt, &Ending::ConnectFailed(&error), shared);
        let backend = &self.pool.backends[attempt.backend];
        let error = io::Error::new(
            error.kind(),
            format!("{} ({}): {error}", backend.name, backend.addr),
        );
        self.local_failure = classified.counted == Some(ErrorReason::OutOfResources);
        let next = if self.local_failure {
            Next::GiveUp
        } else {
            debug!(client = %self.client, "connect failed: {error}");
            if let Some(reason) = classified.counted {
                route.stats.error(reason);
            }
            Next::Retry
        };
        self.last_error = Some(error);
        next
    }

    /// No backend could be reached: counts why (`no_backend`,
    /// `out_of_resources`, or `over_limit` when every backend was full) and
    /// logs it, with a connection log line (`lasted`: since it was
    /// accepted).
    pub fn give_up(self, route: &Route, peer: SocketAddr, lasted: Duration) {
        let (reason, error) = match self.last_error {
            Some(error) if self.local_failure => (ErrorReason::OutOfResources, error),
            Some(error) => (ErrorReason::NoBackend, error),
            None if self.pool.all_down => (
                ErrorReason::NoBackend,
                io::Error::other(match self.pool.drained_up {
                    true => "no backend in rotation is up (those up are drained)",
                    false => "no backend of the pool is up",
                }),
            ),
            None if self.pool.backends.iter().any(Backend::in_rotation) => (
                ErrorReason::OverLimit,
                io::Error::other("every backend is at its max_connections"),
            ),
            None if self.pool.backends.iter().any(|b| b.weight > 0) => (
                ErrorReason::NoBackend,
                io::Error::other("every backend is drained or in maint"),
            ),
            None => (
                ErrorReason::NoBackend,
                io::Error::other("the pool has no backend with a weight above 0"),
            ),
        };
        route.stats.error(reason);
        let (throttle, why, close) = match reason {
            ErrorReason::OutOfResources => (
                &OUT_OF_RESOURCES,
                format!("cannot connect to a backend, closing the client; not counted against it: {error}"),
                "out of resources",
            ),
            _ => (
                &NO_BACKEND,
                format!("no backend reachable, closing the client: {error}"),
                "no backend",
            ),
        };
        let client = self.client;
        let peer = (client != peer).then_some(peer);
        let listener = &*route.listener;
        if let Some(suppressed) = throttle.allow() {
            warn!(
                listener, pool = %self.pool.name, %client,
                peer = peer.map(tracing::field::display), suppressed, "{why}"
            );
        }
        log_closed(listener, (client, peer), "-", (0, 0), lasted, close);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::fixtures::{preference, refused, route, shared};
    use crate::shared::Event;

    /// Three backends; `fall: 2` ejects after two failed connects in a row.
    const POOL: &str = "listeners:\n  l: { listen: 127.0.0.1:7000, pool: p }\npools:\n  p:\n    retries: 1\n    health: { fall: 2 }\n    backends:\n      - { address: 10.0.0.1:1, name: a }\n      - { address: 10.0.0.2:1, name: b, max_connections: 1 }\n      - { address: 10.0.0.3:1, name: c }\n";

    fn dialer(shared: &Shared, client: &str) -> (Dialer, Arc<Route>) {
        let route = route(shared, "127.0.0.1:7000");
        let client: SocketAddr = client.parse().unwrap();
        let local = || unreachable!("no send_proxy");
        let dialer = Dialer::new(
            &route,
            (client, client),
            None,
            local,
            shared,
            Duration::ZERO,
        );
        (dialer.unwrap(), route)
    }

    #[test]
    fn retries_follow_the_preference_order_and_stop_at_retries() {
        let (shared, _events) = shared(POOL);
        let client = "192.0.2.10:5000";
        let expected = preference(shared, "p", client);
        let (mut dialer, route) = dialer(shared, client);
        let first = dialer.next_attempt(Instant::now()).unwrap();
        assert_eq!(first.addr, expected[0]);
        assert!(matches!(
            dialer.failed(first, refused(), &route, shared),
            Next::Retry
        ));
        let second = dialer.next_attempt(Instant::now()).unwrap();
        assert_eq!(second.addr, expected[1]);
        assert!(matches!(
            dialer.failed(second, refused(), &route, shared),
            Next::Retry
        ));
        // retries: 1 — two tries in all.
        assert!(dialer.next_attempt(Instant::now()).is_none());
    }

    #[test]
    fn a_full_backend_is_passed_over_without_counting_a_try() {
        let (shared, _events) = shared(POOL);
        let full = {
            let snapshot = shared.snapshot.load();
            let b = &snapshot.pool("p").unwrap().backends[1];
            b.lease().unwrap()
        };
        // Whatever the order, b is never offered while full, and a try
        // on each of a and c is still allowed.
        let (mut dialer, route) = dialer(shared, "192.0.2.11:5000");
        let mut tried = Vec::new();
        while let Some(attempt) = dialer.next_attempt(Instant::now()) {
            tried.push(attempt.addr);
            let _ = dialer.failed(attempt, refused(), &route, shared);
        }
        tried.sort();
        let a_and_c: Vec<SocketAddr> =
            vec!["10.0.0.1:1".parse().unwrap(), "10.0.0.3:1".parse().unwrap()];
        assert_eq!(tried, a_and_c);
        drop(full);
    }

    #[test]
    fn running_out_of_descriptors_stops_the_tries_and_blames_nobody() {
        let (shared, mut events) = shared(POOL);
        for _ in 0..3 {
            let (mut dialer, route) = dialer(shared, "192.0.2.12:5000");
            let attempt = dialer.next_attempt(Instant::now()).unwrap();
            let error = io::Error::from_raw_os_error(libc::EMFILE);
            assert!(matches!(
                dialer.failed(attempt, error, &route, shared),
                Next::GiveUp
            ));
            assert!(dialer.next_attempt(Instant::now()).is_none());
        }
        assert!(events.try_recv().is_err(), "no backend ejected");
    }

    #[test]
    fn failed_connects_eject_after_fall_and_a_success_ends_the_streak() {
        let (shared, mut events) = shared(POOL);
        let client = "192.0.2.13:5000";
        // One failure, then a success: the streak is over.
        let (mut dialer, route) = dialer(shared, client);
        let attempt = dialer.next_attempt(Instant::now()).unwrap();
        let _ = dialer.failed(attempt, refused(), &route, shared);
        let (mut dialer, _) = self::dialer(shared, client);
        let attempt = dialer.next_attempt(Instant::now()).unwrap();
        drop(dialer.connected(attempt, shared, Instant::now()));
        assert!(events.try_recv().is_err());
        // Two failures in a row on the client's first choice: ejected.
        for _ in 0..2 {
            let (mut dialer, route) = self::dialer(shared, client);
            let attempt = dialer.next_attempt(Instant::now()).unwrap();
            let _ = dialer.failed(attempt, refused(), &route, shared);
        }
        assert!(matches!(events.try_recv(), Ok(Event::Ejected { .. })));
    }
}
