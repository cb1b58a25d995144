//! One proxied connection, from the accepted client socket to the end:
//! choose the backend, connect (with timeout and retries), then move bytes
//! both ways until both directions are finished.
//!
//! Half-close is honoured: when one side sends FIN, the other side gets
//! `shutdown(Write)` and the opposite direction keeps flowing until its own
//! FIN. An error or reset on either side ends both directions at once and is
//! passed on as a reset.
//!
//! How each attempt and each connection ended decides its log line, whether
//! its sides are reset, and what its backend's [`PassiveHealth`] hears:
//! [`ending::classify`] holds those rules, for every data path.
//!
//! How the bytes move (splice or copy) is [`pump`]'s business.

pub mod ending;
mod pump;

pub use pump::keep_pipes;

use std::future::{poll_fn, Future};
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use metrics::Counter;
use tokio::io::Interest;
use tokio::sync::Notify;
use tokio::time::Sleep;
use tracing::{debug, info, warn};

use crate::balancer::load::Lease;
use crate::capacity::Slot;
use crate::config::schema::SendProxy;
use crate::config::Engine;
use crate::health::PassiveHealth;
use crate::logging::{self, Throttle};
use crate::metrics::{BackendStats, ErrorReason, ListenerStats};
use crate::net::{self, Socket};
use crate::proxy_protocol;

use crate::shared::{Event, Shared};
use crate::snapshot::{Pool, Route};
use ending::{Ending, Passive, Side};

/// "No backend reachable" is logged at most once per interval, with a count.
static NO_BACKEND: Throttle = Throttle::new();

/// So are connections turned away by a limit or for their PROXY header.
static TURNED_AWAY: Throttle = Throttle::new();

/// And clients closed because sluice lacked a local resource to connect.
static OUT_OF_RESOURCES: Throttle = Throttle::new();

thread_local! {
    /// Wakes every connection of this worker when a drain runs out of time.
    static CLOSING: Rc<Notify> = Rc::new(Notify::new());
}

/// Closes every connection of the calling worker (each logs `shutdown`).
pub fn close_all() {
    CLOSING.with(|closing| closing.notify_waiters());
}

/// The backend a connection was given: what it needs once the snapshot it
/// came from is released.
struct Dialed {
    socket: Socket,
    name: Arc<str>,
    passive: Arc<PassiveHealth>,
    stats: Arc<BackendStats>,
    eject_after: Option<u32>,
    /// Counts the connection in its backend's load until it ends.
    _lease: Lease,
}

impl Dialed {
    /// Closes the backend socket and ends the backend's count of the
    /// connection; the backend's name is what remains.
    fn close(self) -> Arc<str> {
        self.name
    }
}

/// A connection let in and given its backend.
struct Opened {
    backend: Dialed,
    /// The client's address: the one a PROXY header carried, if any.
    client_addr: SocketAddr,
    /// The connection's own peer, when a PROXY header carried another
    /// address: logged beside it.
    peer: Option<SocketAddr>,
    engine: Engine,
    idle_timeout: Option<Duration>,
    /// Counts the connection against its listener's `max_connections`.
    lease: Lease,
}

/// Why a relay ended.
enum Ended {
    Relayed(Result<(), Failure>),
    /// `shutdown_timeout` ran out.
    Shutdown,
    /// Nothing moved either way for `idle_timeout`.
    Idle,
}

/// Serves one accepted connection from `client_addr` on `listener`, which
/// holds `slot` of the process's connection capacity until it ends, by
/// the `route` of the listener that accepted it. `client` must be
/// non-blocking.
pub async fn serve(
    client: TcpStream,
    mut client_addr: SocketAddr,
    route: Arc<Route>,
    slot: Slot,
    shared: &'static Shared,
) {
    let accepted = Instant::now();
    let listener = route.listener.clone();
    let listener = &*listener;
    let client = match net::watch(client, Interest::READABLE | Interest::WRITABLE) {
        Ok(client) => client,
        Err(e) => {
            warn!(listener, client = %client_addr, "cannot watch a new connection: {e}");
            return;
        }
    };
    // Boxed: what admission and dialing need is large and short-lived;
    // inline, it would make every connection's task that much bigger for
    // its whole life.
    let Some(opened) = Box::pin(open(&client, client_addr, &route, shared, accepted)).await else {
        return;
    };
    // A long connection need not keep its listener's route alive.
    drop(route);
    let Opened {
        backend,
        client_addr: carried,
        peer,
        engine,
        idle_timeout,
        lease,
    } = opened;
    client_addr = carried;
    let route = backend.stats.route(listener);
    if let Some(route) = route {
        route.connections.increment(1);
        route.active.increment(1.0);
    }
    let closing = CLOSING.with(Rc::clone);
    let shutdown = closing.notified();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut relay = Relay {
        upstream: pump::Direction::new(Side::Client, engine),
        downstream: pump::Direction::new(Side::Backend, engine),
        to_backend: Bytes::new(route.map(|r| &r.to_backend)),
        to_client: Bytes::new(route.map(|r| &r.to_client)),
        first_fin: None,
        idle: idle_timeout.map(|limit| {
            Box::new(Idle {
                limit,
                timer: Box::pin(tokio::time::sleep(limit)),
                // Waiting for a PROXY header or a backend is not idleness.
                last_moved: Instant::now(),
            })
        }),
    };
    let outcome = {
        // The future holds one pointer to the relay, not one per field:
        // this is most of what an idle connection costs.
        let relay = &mut relay;
        let (client, backend) = (&client, &backend.socket);
        poll_fn(move |cx| {
            if shutdown.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ended::Shutdown);
            }
            relay.poll(cx, client, backend)
        })
        .await
    };
    // Bytes read but not yet taken by their destination.
    let stalled = relay.upstream.holding() || relay.downstream.holding();
    let Relay {
        to_backend,
        to_client,
        first_fin,
        ..
    } = relay;
    if let Some(route) = route {
        route.active.decrement(1.0);
    }
    let (to_backend, to_client) = (to_backend.total, to_client.total);
    let ending = match &outcome {
        Ended::Shutdown => Ending::Shutdown,
        Ended::Idle => Ending::Idle { stalled },
        Ended::Relayed(Ok(())) => Ending::Finished {
            first_fin: first_fin.unwrap_or(Side::Client),
        },
        Ended::Relayed(Err(failure)) => Ending::Failed {
            side: failure.side,
            error: &failure.error,
        },
    };
    let classified = ending::classify(&ending);
    if classified.reset {
        net::abort(&client);
        net::abort(&backend.socket);
    }
    judge(
        classified.passive,
        &backend.passive,
        backend.eject_after,
        shared,
    );
    // Close both sockets and free the connection's places (the listener's
    // and the backend's limits, the capacity) before saying it closed:
    // whoever reads that line may open the next connection at once.
    let backend_name = backend.close();
    drop(client);
    drop(lease);
    drop(slot);
    log_closed(
        listener,
        (client_addr, peer),
        &backend_name,
        (to_backend, to_client),
        accepted,
        &classified.close,
    );
}

/// Lets a new connection in through its listener's gate (and PROXY
/// header), then dials its backend. `None` if it was turned away; the
/// reason is counted and logged.
async fn open(
    client: &Socket,
    accepted_from: SocketAddr,
    route: &Route,
    shared: &'static Shared,
    accepted: Instant,
) -> Option<Opened> {
    let listener = &*route.listener;
    let turn_away = |reason: ErrorReason, why: &dyn std::fmt::Display, client: SocketAddr| {
        route.stats.error(reason);
        let peer = (client != accepted_from).then_some(accepted_from);
        if let Some(suppressed) = TURNED_AWAY.allow() {
            warn!(
                listener, %client, peer = peer.map(display), suppressed,
                "closing a new connection: {why}"
            );
        }
        log_closed(
            listener,
            (client, peer),
            "-",
            (0, 0),
            accepted,
            &why.to_string(),
        );
    };
    let lease = match route.gate.enter() {
        Ok(lease) => lease,
        Err(refusal) => {
            turn_away(ErrorReason::OverLimit, &refusal, accepted_from);
            return None;
        }
    };
    let (client_addr, carried) = match &route.accept_proxy {
        None => {
            if let Err(refusal) = route.gate.pace(accepted_from.ip()) {
                turn_away(ErrorReason::OverLimit, &refusal, accepted_from);
                return None;
            }
            (accepted_from, None)
        }
        Some(sources) => {
            // A header from anyone else, true or forged, is not believed:
            // it would let a client choose its backend and its rate.
            if !sources.trusts(accepted_from.ip()) {
                let why = format!(
                    "{} may not send PROXY headers: accept_proxy.from does not list it",
                    accepted_from.ip()
                );
                turn_away(ErrorReason::ProxyUntrusted, &why, accepted_from);
                return None;
            }
            // Before the header is awaited: clients that send none are held
            // to the listener's rate, not only to its max_connections.
            if let Err(refusal) = route.gate.pace_listener() {
                turn_away(ErrorReason::OverLimit, &refusal, accepted_from);
                return None;
            }
            let carried =
                match tokio::time::timeout(sources.timeout, proxy_protocol::read_header(client))
                    .await
                {
                    Ok(Ok(carried)) => carried,
                    Ok(Err(e)) => {
                        turn_away(ErrorReason::ProxyHeader, &e, accepted_from);
                        return None;
                    }
                    Err(_) => {
                        let why = format!(
                            "no PROXY header within {}",
                            humantime::format_duration(sources.timeout)
                        );
                        turn_away(ErrorReason::ProxyHeader, &why, accepted_from);
                        return None;
                    }
                };
            let client_addr = carried.map_or(accepted_from, |(source, _)| source);
            if let Err(refusal) = route.gate.pace_client(client_addr.ip()) {
                turn_away(ErrorReason::OverLimit, &refusal, client_addr);
                return None;
            }
            (client_addr, carried)
        }
    };
    let peer = (client_addr != accepted_from).then_some(accepted_from);
    // Loaded only now, and held only until the backend is dialed: a
    // client slow to send its header, or a long connection, must not keep
    // an old snapshot alive.
    let snapshot = shared.snapshot.load();
    let Some(pool) = snapshot.pool(&route.pool) else {
        // A reload removed the pool since the connection was accepted.
        turn_away(ErrorReason::NoBackend, &"its pool was removed", client_addr);
        return None;
    };
    let proxy_header = match pool.send_proxy {
        SendProxy::Off => None,
        version => {
            let local = match carried {
                Some((_, destination)) => destination,
                None => match client.get_ref().local_addr() {
                    Ok(local) => local,
                    // The client is already gone.
                    Err(e) => {
                        debug!(listener, client = %client_addr, "no local address: {e}");
                        return None;
                    }
                },
            };
            Some(proxy_protocol::header(version, client_addr, local))
        }
    };
    match dial(
        pool,
        client_addr,
        proxy_header.as_deref(),
        &route.stats,
        shared,
    )
    .await
    {
        Ok(backend) => Some(Opened {
            backend,
            client_addr,
            peer,
            engine: pool.engine,
            idle_timeout: (!pool.idle_timeout.is_zero()).then_some(pool.idle_timeout),
            lease,
        }),
        Err((reason, error)) => {
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
            if let Some(suppressed) = throttle.allow() {
                warn!(
                    listener, pool = %pool.name, client = %client_addr,
                    peer = peer.map(display), suppressed, "{why}"
                );
            }
            log_closed(listener, (client_addr, peer), "-", (0, 0), accepted, close);
            None
        }
    }
}

/// With `log.connections`, one line per closed connection: the client's
/// address, and its connection's own peer when a PROXY header carried
/// another.
fn log_closed(
    listener: &str,
    (client, peer): (SocketAddr, Option<SocketAddr>),
    backend: &str,
    (to_backend, to_client): (u64, u64),
    accepted: Instant,
    close: &str,
) {
    if logging::log_connections() {
        info!(
            listener,
            %client,
            peer = peer.map(display),
            backend,
            to_backend,
            to_client,
            duration_ms = accepted.elapsed().as_millis() as u64,
            close,
            "connection closed"
        );
    }
}

/// Connects to the first reachable backend in the client's preference
/// order, trying at most `retries` more after the first. A backend at its
/// `max_connections` is passed over without counting as a try. On failure,
/// the reason to count (`no_backend`, or `over_limit` when every backend
/// was full) and what to log.
async fn dial(
    pool: &Pool,
    client_addr: SocketAddr,
    proxy_header: Option<&[u8]>,
    listener_stats: &ListenerStats,
    shared: &'static Shared,
) -> Result<Dialed, (ErrorReason, io::Error)> {
    let mut last_error = None;
    let mut tries = 0;
    for backend in pool.candidates(client_addr) {
        if tries > pool.retries {
            break;
        }
        let Some(lease) = backend.lease() else {
            continue;
        };
        tries += 1;
        let started = Instant::now();
        let connected = net::connect(backend.addr, pool.connect_timeout)
            .await
            .and_then(|socket| {
                if let Some(header) = proxy_header {
                    proxy_protocol::send(socket.get_ref(), header)?;
                }
                Ok(socket)
            });
        let classified = ending::classify(&match &connected {
            Ok(_) => Ending::Connected,
            Err(error) => Ending::ConnectFailed(error),
        });
        judge(
            classified.passive,
            &backend.passive,
            pool.eject_after,
            shared,
        );
        match connected {
            Ok(socket) => {
                backend
                    .stats
                    .connect_seconds
                    .record(started.elapsed().as_secs_f64());
                return Ok(Dialed {
                    socket,
                    name: backend.name.clone(),
                    passive: backend.passive.clone(),
                    stats: backend.stats.clone(),
                    eject_after: pool.eject_after,
                    _lease: lease,
                });
            }
            Err(error) => {
                let error = io::Error::new(
                    error.kind(),
                    format!("{} ({}): {error}", backend.name, backend.addr),
                );
                // Out of descriptors, memory or local ports: no other
                // backend would fare better, and this one is not to blame.
                if classified.counted == Some(ErrorReason::OutOfResources) {
                    return Err((ErrorReason::OutOfResources, error));
                }
                debug!(client = %client_addr, "connect failed: {error}");
                if let Some(reason) = classified.counted {
                    listener_stats.error(reason);
                }
                last_error = Some(error);
            }
        }
    }
    Err(match last_error {
        Some(error) => (ErrorReason::NoBackend, error),
        None if pool.backends.iter().any(|b| b.weight > 0) => (
            ErrorReason::OverLimit,
            io::Error::other("every backend is at its max_connections"),
        ),
        None => (
            ErrorReason::NoBackend,
            io::Error::other("the pool has no backend with a weight above 0"),
        ),
    })
}

/// Applies what an ending says about the backend (see [`ending`]): a
/// failure that completes a streak of `eject_after` asks the control plane
/// to take the backend out.
fn judge(
    passive: Passive,
    health: &PassiveHealth,
    eject_after: Option<u32>,
    shared: &'static Shared,
) {
    match passive {
        Passive::Healthy => health.record_success(),
        Passive::Failing => {
            if let Some(threshold) = eject_after {
                if health.record_failure(threshold) {
                    let _ = shared.events.send(Event::Ejected { id: health.id });
                }
            }
        }
        Passive::Silent => {}
    }
}

/// What ended a relay early, and which peer it came from.
struct Failure {
    side: Side,
    error: io::Error,
}

impl Failure {
    fn new(side: Side, error: io::Error) -> Failure {
        Failure { side, error }
    }
}

/// Bytes moved in one direction: a total for the end of the connection,
/// and the Prometheus counter, which moves as they go.
struct Bytes<'a> {
    total: u64,
    counter: Option<&'a Counter>,
}

impl<'a> Bytes<'a> {
    fn new(counter: Option<&'a Counter>) -> Bytes<'a> {
        Bytes { total: 0, counter }
    }

    fn add(&mut self, n: usize) {
        self.total += n as u64;
        if let Some(counter) = self.counter {
            counter.increment(n as u64);
        }
    }
}

/// The state of a connection's relay, both ways.
struct Relay<'a> {
    upstream: pump::Direction,
    downstream: pump::Direction,
    to_backend: Bytes<'a>,
    to_client: Bytes<'a>,
    /// Which side sent FIN first.
    first_fin: Option<Side>,
    /// Boxed: most connections have none, and an idle one pays for a word.
    idle: Option<Box<Idle>>,
}

/// An idle timeout: a timer re-armed from the last time bytes moved.
struct Idle {
    limit: Duration,
    timer: Pin<Box<Sleep>>,
    last_moved: Instant,
}

impl Relay<'_> {
    /// Relays both ways until both are finished, one fails, or the idle
    /// timeout passes.
    fn poll(&mut self, cx: &mut Context, client: &Socket, backend: &Socket) -> Poll<Ended> {
        let before = self.to_backend.total + self.to_client.total;
        let relayed = drive(
            &mut self.upstream,
            cx,
            (client, backend),
            &mut self.to_backend,
            &mut self.first_fin,
        )
        .and_then(|()| {
            drive(
                &mut self.downstream,
                cx,
                (backend, client),
                &mut self.to_client,
                &mut self.first_fin,
            )
        });
        match relayed {
            Err(failure) => return Poll::Ready(Ended::Relayed(Err(failure))),
            Ok(()) if self.upstream.finished() && self.downstream.finished() => {
                return Poll::Ready(Ended::Relayed(Ok(())))
            }
            Ok(()) => {}
        }
        if let Some(idle) = &mut self.idle {
            let now = Instant::now();
            if self.to_backend.total + self.to_client.total != before {
                idle.last_moved = now;
            }
            let deadline = idle.last_moved + idle.limit;
            if now >= deadline {
                return Poll::Ready(Ended::Idle);
            }
            if idle.timer.deadline() != deadline.into() {
                idle.timer.as_mut().reset(deadline.into());
            }
            if idle.timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ended::Idle);
            }
        }
        Poll::Pending
    }
}

/// Moves what one direction has to move now; notes the first FIN.
fn drive(
    direction: &mut pump::Direction,
    cx: &mut Context,
    (from, to): (&Socket, &Socket),
    bytes: &mut Bytes,
    first_fin: &mut Option<Side>,
) -> Result<(), Failure> {
    if direction.finished() {
        return Ok(());
    }
    let mut moved = 0;
    let done = direction.poll(cx, from, to, |n| moved += n);
    bytes.add(moved);
    if let Poll::Ready(done) = done {
        done?;
        first_fin.get_or_insert(direction.sender());
    }
    Ok(())
}
