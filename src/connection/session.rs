//! One connection's life, as a state machine that does no I/O and reads no
//! clock, in the sans-I/O style of quinn-proto: both drivers feed it what
//! their sockets said, with the time it happened, and it tells them what to
//! do next ([`Step`]).
//!
//! ```text
//!   open ──► ReadHeader ──header──► Connect ──connected──► relaying ──end──► close
//!     │          │                   ▲  │                   (moved, fin)
//!     │          └─late/bad─► Close  └──┘ connect_failed
//!     └──────────────────────► Connect / Close
//! ```
//!
//! The session owns what the connection holds from the moment it is
//! admitted to its log line: its places (the process's capacity, its
//! listener's and its backend's `max_connections`), the dialing plan, the
//! backend it was given, the bytes it moved and the time it last moved
//! any, its FINs, and how it ended. The drivers own the sockets and how
//! bytes move.
//!
//! Its methods, by who calls and why:
//!
//! - **The driver reports** what happened: [`Session::open`] (a client was
//!   accepted), [`Session::header`] and [`Session::header_late`],
//!   [`Session::connect_failed`] and [`Session::connected`],
//!   [`Session::moved`] and [`Session::undelivered`], [`Session::fin`], and
//!   [`Session::end`] (how the connection ended: the one place an ending
//!   is judged, see [`crate::connection::ending`]).
//! - **The driver asks** what to do: the [`Step`]s those return, what
//!   [`Connected`] says, [`Session::idle_deadline`] and
//!   [`Session::header_deadline`] (when to wake it), and finally
//!   [`Session::close`] (its sockets are closed: free, judge, log).
//! - **The driver may query**: [`Session::awaits_header`],
//!   [`Session::relaying`], [`Session::passed`], [`Session::ending`].

use std::fmt::Display;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::Counter;

use super::admit::{self, Admitted};
use super::dial::{Attempt, Dialed, Dialer, Next};
use super::ending::{classify, Classified, Ending, Side};
use super::relaying::{Halves, PassFin};
use super::{judge, log_closed};
use crate::balancer::load::Lease;
use crate::capacity::Slot;
use crate::config::Engine;
use crate::metrics::RouteStats;
use crate::proxy_protocol::Carried;
use crate::shared::Shared;
use crate::snapshot::Route;

/// What the driver is to do next for a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Read the client's PROXY header until `deadline`; report it with
    /// [`Session::header`] or [`Session::header_late`].
    ReadHeader { deadline: Instant },
    /// Connect to `addr` within `timeout` (zero: no limit); report with
    /// [`Session::connected`] or [`Session::connect_failed`].
    Connect { addr: SocketAddr, timeout: Duration },
    /// Close the client: it was turned away, or no backend could be
    /// reached (counted and logged already), or it is gone (its address
    /// could not be read).
    Close,
}

/// How a connection that reached its backend relays.
#[derive(Debug)]
pub struct Connected {
    /// How its directions move bytes.
    pub engine: Engine,
    /// What to send the backend before any of the client's bytes: the
    /// PROXY header of `send_proxy`. Not counted as bytes relayed; failing
    /// to send it fails the connection like any send to the backend.
    pub proxy_header: Option<Box<[u8]>>,
}

/// A connection from the moment it is admitted until it is logged.
pub struct Session {
    listener: Arc<str>,
    /// The connection's own peer.
    peer: SocketAddr,
    /// The client: the peer, or the address its PROXY header named.
    client: SocketAddr,
    accepted: Instant,
    phase: Phase,
    halves: Halves,
    /// Indexed by the sending side: to the backend, to the client.
    bytes: [Bytes; 2],
    idle: Option<Idle>,
    /// How it ended, once it has: the first ending reported.
    ending: Option<Classified>,
    /// Counts the connection against its listener's `max_connections`.
    _lease: Lease,
    /// Its place in the process's descriptor capacity.
    _slot: Slot,
}

enum Phase {
    /// Waiting for a PROXY header.
    Header {
        route: Arc<Route>,
        within: Duration,
    },
    Dialing(Box<Dialing>),
    Relaying(Box<Relaying>),
    /// Turned away, or no backend reachable: logged already.
    Over,
}

struct Dialing {
    route: Arc<Route>,
    dialer: Dialer,
    /// The connect the driver is making.
    attempt: Option<Attempt>,
}

struct Relaying {
    dialed: Dialed,
    stats: Option<RouteStats>,
}

/// Bytes moved in one direction: a total for the end of the connection,
/// and the Prometheus counter, which moves as they go.
struct Bytes {
    total: u64,
    counter: Option<Counter>,
}

impl Bytes {
    fn new(counter: Option<&Counter>) -> Bytes {
        Bytes {
            total: 0,
            counter: counter.cloned(),
        }
    }

    fn add(&mut self, n: usize) {
        self.total += n as u64;
        if let Some(counter) = &self.counter {
            counter.increment(n as u64);
        }
    }
}

/// An idle timeout, counted from the last time bytes moved.
struct Idle {
    limit: Duration,
    last_moved: Instant,
}

impl Session {
    /// Lets a connection accepted from `peer` on `route` at `now` in,
    /// holding `slot` of the process's capacity: its first step. `local`
    /// tells the address it was accepted on, for a PROXY header sent to the
    /// backend.
    ///
    /// If it was turned away (counted and logged), the slot comes back, to
    /// be freed once the client's socket is closed.
    pub fn open(
        route: Arc<Route>,
        peer: SocketAddr,
        slot: Slot,
        local: impl FnOnce() -> io::Result<SocketAddr>,
        shared: &Shared,
        now: Instant,
    ) -> Result<(Session, Step), Slot> {
        let accepted = now;
        let Some(Admitted {
            lease,
            header_within,
        }) = admit::admit(&route, peer, accepted)
        else {
            return Err(slot);
        };
        let mut session = Session {
            listener: route.listener.clone(),
            peer,
            client: peer,
            accepted,
            phase: Phase::Over,
            halves: Halves::default(),
            bytes: [Bytes::new(None), Bytes::new(None)],
            idle: None,
            ending: None,
            _lease: lease,
            _slot: slot,
        };
        let step = match header_within {
            Some(within) => {
                session.phase = Phase::Header { route, within };
                Step::ReadHeader {
                    deadline: accepted + within,
                }
            }
            None => session.dial(route, None, local, shared, now),
        };
        Ok((session, step))
    }

    /// The client's PROXY header came (what it carried), or could not be
    /// read (why), at `now`.
    pub fn header(
        &mut self,
        header: Result<Carried, &dyn Display>,
        local: impl FnOnce() -> io::Result<SocketAddr>,
        shared: &Shared,
        now: Instant,
    ) -> Step {
        let Phase::Header { route, .. } = std::mem::replace(&mut self.phase, Phase::Over) else {
            return Step::Close;
        };
        let at = (now, self.lasted(now));
        let Some(client) = admit::admit_header(&route, self.peer, header, at) else {
            return Step::Close;
        };
        self.client = client;
        self.dial(route, header.ok().flatten(), local, shared, now)
    }

    /// The deadline of [`Step::ReadHeader`] passed, at `now`, without a
    /// header.
    pub fn header_late(&mut self, now: Instant) -> Step {
        if let Phase::Header { route, within } = std::mem::replace(&mut self.phase, Phase::Over) {
            let why = admit::header_too_late(within);
            // Turns it away.
            let at = (now, self.lasted(now));
            admit::admit_header(&route, self.peer, Err(&why), at);
        }
        Step::Close
    }

    /// Whether a PROXY header is awaited.
    pub fn awaits_header(&self) -> bool {
        matches!(self.phase, Phase::Header { .. })
    }

    /// Until when a PROXY header is awaited, while it is.
    pub fn header_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Header { within, .. } => Some(self.accepted + *within),
            _ => None,
        }
    }

    /// The connect of [`Step::Connect`] failed with `error`, at `now`: the
    /// next try, or giving up.
    pub fn connect_failed(&mut self, error: io::Error, shared: &Shared, now: Instant) -> Step {
        let Phase::Dialing(dialing) = &mut self.phase else {
            return Step::Close;
        };
        let attempt = dialing.attempt.take().expect("a connect in flight");
        // Both outcomes go on: a retry, or giving up when the plan is
        // empty.
        let _: Next = dialing
            .dialer
            .failed(attempt, error, &dialing.route, shared);
        self.next_connect(now)
    }

    /// The connect of [`Step::Connect`] succeeded, at `now`: the connection
    /// relays from now on, as [`Connected`] says.
    pub fn connected(&mut self, shared: &Shared, now: Instant) -> Connected {
        let Phase::Dialing(mut dialing) = std::mem::replace(&mut self.phase, Phase::Over) else {
            unreachable!("connected while not dialing")
        };
        let attempt = dialing.attempt.take().expect("a connect in flight");
        let dialed = dialing.dialer.connected(attempt, shared, now);
        let stats = dialed.stats.route(&self.listener).cloned();
        if let Some(stats) = &stats {
            stats.connections.increment(1);
            stats.active.increment(1.0);
        }
        self.bytes = [
            Bytes::new(stats.as_ref().map(|s| &s.to_backend)),
            Bytes::new(stats.as_ref().map(|s| &s.to_client)),
        ];
        // Waiting for a PROXY header or a backend is not idleness.
        self.idle = dialed.idle_timeout.map(|limit| Idle {
            limit,
            last_moved: now,
        });
        let connected = Connected {
            engine: dialed.engine,
            proxy_header: dialing.dialer.take_proxy_header(),
        };
        self.phase = Phase::Relaying(Box::new(Relaying { dialed, stats }));
        connected
    }

    /// Whether the connection is relaying: connected, and not yet ended.
    pub fn relaying(&self) -> bool {
        matches!(self.phase, Phase::Relaying(_))
    }

    /// `n` bytes from `from` reached the other side's socket at `now`.
    pub fn moved(&mut self, from: Side, n: usize, now: Instant) {
        if n == 0 {
            return;
        }
        self.bytes[from as usize].add(n);
        if let Some(idle) = &mut self.idle {
            idle.last_moved = now;
        }
    }

    /// `n` of the bytes from `from` reported [`moved`](Self::moved) never
    /// left the destination's socket: the reset that ends the connection
    /// discards them. The connection's log line counts what was delivered;
    /// the metric, which moves as bytes go, keeps them.
    pub fn undelivered(&mut self, from: Side, n: usize) {
        let bytes = &mut self.bytes[from as usize];
        bytes.total = bytes.total.saturating_sub(n as u64);
    }

    /// When the connection is idle for `idle_timeout`, if it has one: the
    /// driver ends it then ([`Ending::Idle`](super::ending::Ending::Idle)).
    pub fn idle_deadline(&self) -> Option<Instant> {
        self.idle.as_ref().map(|idle| idle.last_moved + idle.limit)
    }

    /// Whether the FIN of `from` was passed on already.
    pub fn passed(&self, from: Side) -> bool {
        self.halves.passed(from)
    }

    /// `from` sent FIN and every byte before it reached the other side:
    /// see [`Halves::fin`]. [`PassFin::Close`]: the connection ended (its
    /// ending is recorded).
    pub fn fin(&mut self, from: Side) -> PassFin {
        let pass = self.halves.fin(from);
        if let PassFin::Close { first_fin } = pass {
            self.end(Ending::Finished { first_fin });
        }
        pass
    }

    /// The connection ended as `ending` says, unless it had ended already:
    /// what follows from the first ending reported (see
    /// [`classify`]): whether both sides are reset, and what is delivered
    /// first. A connection turned away (after [`Step::Close`]) needs none.
    pub fn end(&mut self, ending: Ending) -> &Classified {
        self.ending.get_or_insert_with(|| classify(&ending))
    }

    /// How it ended, once it has.
    pub fn ending(&self) -> Option<&Classified> {
        self.ending.as_ref()
    }

    /// The connection is over and its sockets are closed (on io_uring,
    /// their closes queued), at `now`: its backend hears how it ended, its
    /// places are freed, and then it is logged (unless it was turned away:
    /// logged then), since whoever reads that line may open the next
    /// connection at once.
    pub fn close(self, shared: &Shared, now: Instant) {
        let lasted = self.lasted(now);
        let Session {
            listener,
            peer,
            client,
            phase,
            bytes: [to_backend, to_client],
            ending,
            _lease,
            _slot,
            ..
        } = self;
        let name = match phase {
            Phase::Relaying(relaying) => {
                let Relaying { dialed, stats } = *relaying;
                if let Some(stats) = stats {
                    stats.active.decrement(1.0);
                }
                if let Some(how) = &ending {
                    judge(how.passive, &dialed.passive, dialed.eject_after, shared);
                }
                Some(dialed.name)
            }
            // A dialing plan holds the attempt's place at its backend.
            other => {
                drop(other);
                None
            }
        };
        drop((_lease, _slot));
        let Some(how) = ending else {
            return;
        };
        log_closed(
            &listener,
            (client, (client != peer).then_some(peer)),
            name.as_deref().unwrap_or("-"),
            (to_backend.total, to_client.total),
            lasted,
            &how.close,
        );
    }

    /// How long since it was accepted, at `now`.
    fn lasted(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.accepted)
    }

    /// Loads the pool of `route` and picks the first backend to try.
    fn dial(
        &mut self,
        route: Arc<Route>,
        carried: Carried,
        local: impl FnOnce() -> io::Result<SocketAddr>,
        shared: &Shared,
        now: Instant,
    ) -> Step {
        let Some(dialer) = Dialer::new(
            &route,
            (self.client, self.peer),
            carried,
            local,
            shared,
            self.lasted(now),
        ) else {
            return Step::Close;
        };
        self.phase = Phase::Dialing(Box::new(Dialing {
            route,
            dialer,
            attempt: None,
        }));
        self.next_connect(now)
    }

    /// The next backend of the plan, from `now`, or giving up (counted and
    /// logged).
    fn next_connect(&mut self, now: Instant) -> Step {
        let lasted = self.lasted(now);
        let Phase::Dialing(dialing) = &mut self.phase else {
            return Step::Close;
        };
        match dialing.dialer.next_attempt(now) {
            Some(attempt) => {
                let step = Step::Connect {
                    addr: attempt.addr,
                    timeout: dialing.dialer.connect_timeout(),
                };
                dialing.attempt = Some(attempt);
                step
            }
            None => {
                let Phase::Dialing(dialing) = std::mem::replace(&mut self.phase, Phase::Over)
                else {
                    unreachable!("dialing above")
                };
                dialing.dialer.give_up(&dialing.route, self.peer, lasted);
                Step::Close
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::connection::ending::{classify, Ending};
    use crate::connection::fixtures::{preference, refused, route, shared};

    /// Two backends, one retry; listener `p` wants PROXY headers from
    /// 127.0.0.1.
    const CONFIG: &str = "listeners:\n  l: { listen: 127.0.0.1:7000, pool: p }\n  h: { listen: 127.0.0.1:7001, pool: p, accept_proxy: { from: [127.0.0.1], timeout: 2s } }\npools:\n  p:\n    retries: 1\n    connect_timeout: 500ms\n    idle_timeout: 30s\n    backends:\n      - { address: 10.0.0.1:1, name: a }\n      - { address: 10.0.0.2:1, name: b }\n";

    /// `None` if turned away.
    fn open(shared: &'static Shared, listen: &str, peer: &str) -> Option<(Session, Step)> {
        let route = route(shared, listen);
        let slot = shared.connections.take().unwrap();
        let local = || unreachable!("no send_proxy");
        Session::open(route, peer.parse().unwrap(), slot, local, shared, start()).ok()
    }

    /// When the tests' connections are accepted; later times are told as
    /// offsets from it.
    fn start() -> Instant {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *START.get_or_init(Instant::now)
    }

    fn at(millis: u64) -> Instant {
        start() + Duration::from_millis(millis)
    }

    fn connect_to(step: &Step) -> SocketAddr {
        match step {
            Step::Connect { addr, timeout } => {
                assert_eq!(
                    *timeout,
                    Duration::from_millis(500),
                    "the pool's connect_timeout"
                );
                *addr
            }
            other => panic!("expected a connect, got {other:?}"),
        }
    }

    #[test]
    fn a_connection_dials_in_its_clients_order_and_gives_up_after_the_retries() {
        let (shared, _events) = shared(CONFIG);
        let client = "192.0.2.1:5000";
        let (mut session, step) = open(shared, "127.0.0.1:7000", client).unwrap();
        let order = preference(shared, "p", client);
        assert_eq!(connect_to(&step), order[0]);
        let step = session.connect_failed(refused(), shared, at(500));
        assert_eq!(connect_to(&step), order[1]);
        assert_eq!(
            session.connect_failed(refused(), shared, at(1000)),
            Step::Close
        );
        assert!(!session.relaying());
        assert!(session.ending().is_none(), "turned away: logged already");
        assert_eq!(shared.connections.open(), 1);
        // Its places are freed.
        session.close(shared, at(1000));
        assert_eq!(shared.connections.open(), 0);
    }

    #[test]
    fn a_proxy_header_names_the_client_whose_backend_is_dialled() {
        let (shared, _events) = shared(CONFIG);
        let (mut session, step) = open(shared, "127.0.0.1:7001", "127.0.0.1:6000").unwrap();
        let Step::ReadHeader { deadline } = step else {
            panic!("expected a header read, got {step:?}");
        };
        assert_eq!(deadline, at(2000), "accept_proxy's timeout");
        assert!(session.awaits_header());
        assert_eq!(session.header_deadline(), Some(deadline));
        let client = "198.51.100.9:4000";
        let carried = Some((client.parse().unwrap(), "127.0.0.1:7001".parse().unwrap()));
        let step = session.header(Ok(carried), || unreachable!("no send_proxy"), shared, at(5));
        assert_eq!(connect_to(&step), preference(shared, "p", client)[0]);
        assert!(!session.awaits_header());
        assert_eq!(session.header_deadline(), None);
    }

    #[test]
    fn a_header_that_comes_late_or_broken_closes_the_connection() {
        let (shared, _events) = shared(CONFIG);
        let (mut late, _) = open(shared, "127.0.0.1:7001", "127.0.0.1:6001").unwrap();
        assert_eq!(late.header_late(at(2000)), Step::Close);
        assert!(!late.awaits_header());
        let (mut broken, _) = open(shared, "127.0.0.1:7001", "127.0.0.1:6002").unwrap();
        let step = broken.header(Err(&"garbage"), || unreachable!(), shared, at(5));
        assert_eq!(step, Step::Close);
        // Only the upstream named in `from` may send one.
        assert!(open(shared, "127.0.0.1:7001", "127.0.0.2:6003").is_none());
    }

    #[test]
    fn a_relayed_connection_counts_its_bytes_and_restarts_its_idle_clock() {
        let (shared, _events) = shared(CONFIG);
        let (mut session, _) = open(shared, "127.0.0.1:7000", "192.0.2.2:5000").unwrap();
        assert_eq!(session.idle_deadline(), None, "not idle while dialing");
        let connected = session.connected(shared, at(10));
        assert_eq!(connected.engine, Engine::Auto);
        assert_eq!(connected.proxy_header, None, "no send_proxy");
        assert!(session.relaying());
        assert_eq!(
            session.idle_deadline(),
            Some(at(30_010)),
            "idle_timeout: 30s"
        );
        session.moved(Side::Client, 10, at(20));
        session.moved(Side::Backend, 32, at(25));
        assert_eq!(session.idle_deadline(), Some(at(30_025)));
        assert_eq!([session.bytes[0].total, session.bytes[1].total], [10, 32]);
        assert_eq!(session.fin(Side::Backend), PassFin::Shutdown);
        assert!(session.passed(Side::Backend));
        assert_eq!(
            session.fin(Side::Client),
            PassFin::Close {
                first_fin: Side::Backend
            },
            "the second FIN ends the connection"
        );
        let finished = classify(&Ending::Finished {
            first_fin: Side::Backend,
        });
        assert_eq!(session.ending(), Some(&finished));
        session.close(shared, at(30));
        assert_eq!(shared.connections.open(), 0);
    }

    #[test]
    fn the_first_ending_reported_is_the_one() {
        let (shared, _events) = shared(CONFIG);
        let (mut session, _) = open(shared, "127.0.0.1:7000", "192.0.2.3:5000").unwrap();
        session.connected(shared, at(10));
        let reset = std::io::Error::from_raw_os_error(libc::ECONNRESET);
        let how = session.end(Ending::Failed {
            side: Side::Backend,
            error: &reset,
        });
        assert_eq!(how.flush_from, Some(Side::Backend));
        // An idle timeout while its last bytes are delivered: still a
        // backend reset.
        let how = session.end(Ending::Idle { stalled: true });
        assert_eq!(how.close, "backend reset");
        session.close(shared, at(40_000));
    }
}
