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

use super::admit::turn_away;
use super::admit::{self, Admitted};
use super::dial::{Attempt, Dialed, Dialer, Next};
use super::ending::{classify, Classified, Ending, Side};
use super::queue::Ticket;
use super::relaying::{Halves, PassFin};
use super::{judge, log_closed};
use crate::balancer::load::Lease;
use crate::capacity::Slot;
use crate::config::Engine;
use crate::metrics::{ErrorReason, RouteStats};
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
    /// No backend can take the client now: it waits in its pool's queue,
    /// holding nothing but its socket (read nothing from it). Ask
    /// [`Session::retry`] whenever a backend may have become free (see
    /// [`queue`](super::queue)), and call [`Session::wait_over`] at
    /// `deadline`.
    Wait { deadline: Instant },
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
    /// In its pool's queue.
    Waiting(Box<Queued>),
    Relaying(Box<Relaying>),
    /// Turned away, or no backend reachable: logged already.
    Over,
}

struct Dialing {
    route: Arc<Route>,
    dialer: Dialer,
    /// The connect the driver is making.
    attempt: Option<Attempt>,
    /// What its PROXY header carried: a dial from the queue needs it again.
    carried: Carried,
    /// Its place in the queue, while it dials from there.
    queued: Option<Place>,
}

/// A client in its pool's queue.
struct Queued {
    route: Arc<Route>,
    carried: Carried,
    place: Place,
}

/// A place in a pool's queue, and until when it may be held.
struct Place {
    _ticket: Ticket,
    deadline: Instant,
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

    /// The backend it relays to, by the control plane's identifier (what
    /// [`Command::CloseBackends`] names).
    ///
    /// [`Command::CloseBackends`]: crate::mailbox::Command::CloseBackends
    pub fn backend_id(&self) -> Option<u64> {
        match &self.phase {
            Phase::Relaying(relaying) => Some(relaying.dialed.passive.id),
            _ => None,
        }
    }

    /// The closing of a connection relaying to a backend that went down
    /// (`on_down: close`) is counted against that backend.
    fn count_closed_on_down(&self) {
        if let Phase::Relaying(relaying) = &self.phase {
            relaying.dialed.stats.closed_on_down.increment(1);
        }
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
        if self.ending.is_none() && matches!(ending, Ending::BackendDown) {
            self.count_closed_on_down();
        }
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

    /// No backend took the client: it waits in its pool's queue if the pool
    /// has one and the plan allows (see [`Dialer::may_wait`]), else it is
    /// turned away (counted and logged).
    fn queue_or_give_up(&mut self, dialing: Dialing, now: Instant) -> Step {
        let Dialing {
            route,
            dialer,
            carried,
            queued,
            ..
        } = dialing;
        let lasted = self.lasted(now);
        let (settings, waiting) = dialer.queue();
        if settings.size == 0 || !dialer.may_wait() {
            dialer.give_up(&route, self.peer, lasted);
            return Step::Close;
        }
        let place = match queued {
            Some(place) if now >= place.deadline => {
                self.phase = Phase::Waiting(Box::new(Queued {
                    route,
                    carried,
                    place,
                }));
                return self.wait_over(now);
            }
            Some(place) => place,
            None => match waiting.join(settings.size) {
                Some(ticket) => Place {
                    _ticket: ticket,
                    deadline: now + settings.timeout,
                },
                None => {
                    let why = format!(
                        "queue full: {} clients wait for a backend of pool {} already",
                        settings.size, route.pool
                    );
                    let at = (self.client, self.peer);
                    turn_away(&route, ErrorReason::QueueFull, &why, at, lasted);
                    return Step::Close;
                }
            },
        };
        let deadline = place.deadline;
        self.phase = Phase::Waiting(Box::new(Queued {
            route,
            carried,
            place,
        }));
        Step::Wait { deadline }
    }

    /// How long since it was accepted, at `now`.
    fn lasted(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.accepted)
    }

    /// Loads the pool of `route` and picks the first backend to try;
    /// `queued`: the place of a client that dials from the queue.
    fn dial(
        &mut self,
        route: Arc<Route>,
        carried: Carried,
        local: impl FnOnce() -> io::Result<SocketAddr>,
        shared: &Shared,
        now: Instant,
    ) -> Step {
        self.dial_from(route, carried, None, local, shared, now)
    }

    fn dial_from(
        &mut self,
        route: Arc<Route>,
        carried: Carried,
        queued: Option<Place>,
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
            carried,
            queued,
        }));
        self.next_connect(now)
    }

    /// A backend may have become free, at `now`: a client in the queue
    /// dials again (keeping its place until it connects), or waits on.
    pub fn retry(
        &mut self,
        local: impl FnOnce() -> io::Result<SocketAddr>,
        shared: &Shared,
        now: Instant,
    ) -> Step {
        let Phase::Waiting(queued) = std::mem::replace(&mut self.phase, Phase::Over) else {
            return Step::Close;
        };
        let Queued {
            route,
            carried,
            place,
        } = *queued;
        self.dial_from(route, carried, Some(place), local, shared, now)
    }

    /// The deadline of [`Step::Wait`] came, at `now`: no backend took the
    /// client in time, which is turned away (`queue_timeout`).
    pub fn wait_over(&mut self, now: Instant) -> Step {
        if let Phase::Waiting(queued) = std::mem::replace(&mut self.phase, Phase::Over) {
            let why = format!(
                "queue timeout: no backend of pool {} took it in time",
                queued.route.pool
            );
            let at = (self.client, self.peer);
            turn_away(
                &queued.route,
                ErrorReason::QueueTimeout,
                &why,
                at,
                self.lasted(now),
            );
        }
        Step::Close
    }

    /// Until when the client may wait in the queue, while it does.
    pub fn wait_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Waiting(queued) => Some(queued.place.deadline),
            _ => None,
        }
    }

    /// The next backend of the plan, from `now`, or giving up (counted and
    /// logged).
    fn next_connect(&mut self, now: Instant) -> Step {
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
                self.queue_or_give_up(*dialing, now)
            }
        }
    }
}

#[cfg(test)]
mod tests;
