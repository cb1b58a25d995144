//! One proxied connection, from the accepted client socket to the end:
//! choose the backend, connect (with timeout and retries), then move bytes
//! both ways until both directions are finished.
//!
//! Half-close is honoured, by the rules of [`Halves`]: when one side sends
//! FIN, the other side gets `shutdown(Write)` and the opposite direction
//! keeps flowing until its own FIN. An error or reset on either side ends
//! both directions at once and is passed on as a reset.
//!
//! How each attempt and each connection ended decides its log line, whether
//! its sides are reset, and what its backend's passive health hears:
//! [`ending::classify`] holds those rules, for every data path.
//!
//! How the bytes move (splice or copy) is [`pump`]'s business.

mod pump;

use std::fmt::Display;
use std::future::{poll_fn, Future};
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::sync::Notify;
use tokio::time::Sleep;
use tracing::warn;

use crate::balancer::load::Lease;
use crate::capacity::Slot;
use crate::connection::admit::{self, Admitted};
use crate::connection::dial::{Dialed, Dialer, Next};
use crate::connection::ending::{self, Classified, Ending, Side};
use crate::connection::relaying::{shutdown_write, Halves, PassFin};
use crate::connection::{judge, log_closed, Bytes};
use crate::net::{self, Socket};
use crate::proxy_protocol::{self, Carried};
use crate::shared::Shared;
use crate::snapshot::Route;

thread_local! {
    /// Wakes every connection of this worker when a drain runs out of time.
    static CLOSING: Rc<Notify> = Rc::new(Notify::new());
}

/// Closes every connection of the calling worker (each logs `shutdown`).
pub fn close_all() {
    CLOSING.with(|closing| closing.notify_waiters());
}

/// A connection let in and given its backend.
struct Opened {
    backend: Dialed,
    socket: Socket,
    /// The client's address: the one a PROXY header carried, if any.
    client_addr: SocketAddr,
    /// Counts the connection against its listener's `max_connections`.
    lease: Lease,
}

/// Why a relay ended.
enum Ended {
    /// Both sides sent FIN, and each was passed on.
    Finished(Classified),
    Failed(Failure),
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
    accepted_from: SocketAddr,
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
            warn!(listener, client = %accepted_from, "cannot watch a new connection: {e}");
            return;
        }
    };
    // Boxed: what admission and dialing need is large and short-lived;
    // inline, it would make every connection's task that much bigger for
    // its whole life.
    let Some(opened) = Box::pin(open(&client, accepted_from, &route, shared, accepted)).await
    else {
        return;
    };
    // A long connection need not keep its listener's route alive.
    drop(route);
    let Opened {
        backend,
        socket: backend_socket,
        client_addr,
        lease,
    } = opened;
    let peer = (client_addr != accepted_from).then_some(accepted_from);
    let (engine, idle_timeout) = (backend.engine, backend.idle_timeout);
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
        halves: Halves::default(),
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
        let (client, backend) = (&client, &backend_socket);
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
        ..
    } = relay;
    if let Some(route) = route {
        route.active.decrement(1.0);
    }
    let (to_backend, to_client) = (to_backend.total, to_client.total);
    let classified = match outcome {
        Ended::Finished(classified) => classified,
        Ended::Shutdown => ending::classify(&Ending::Shutdown),
        Ended::Idle => ending::classify(&Ending::Idle { stalled }),
        Ended::Failed(failure) => ending::classify(&Ending::Failed {
            side: failure.side,
            error: &failure.error,
        }),
    };
    if classified.reset {
        net::abort(&client);
        net::abort(&backend_socket);
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
    let Dialed {
        name,
        lease: backend_lease,
        ..
    } = backend;
    drop((client, backend_socket, backend_lease));
    drop(lease);
    drop(slot);
    log_closed(
        listener,
        (client_addr, peer),
        &name,
        (to_backend, to_client),
        accepted,
        &classified.close,
    );
}

/// Lets a new connection in through its listener's gate (and PROXY
/// header), then dials its backend. `None` if it was turned away: the
/// reason is counted and logged.
async fn open(
    client: &Socket,
    peer: SocketAddr,
    route: &Route,
    shared: &'static Shared,
    accepted: Instant,
) -> Option<Opened> {
    let Admitted {
        lease,
        header_within,
    } = admit::admit(route, peer, accepted)?;
    let (client_addr, carried) = match header_within {
        None => (peer, None),
        Some(within) => {
            let read = tokio::time::timeout(within, proxy_protocol::read_header(client)).await;
            let too_late;
            let header: Result<Carried, &dyn Display> = match &read {
                Ok(Ok(carried)) => Ok(*carried),
                Ok(Err(e)) => Err(e),
                Err(_) => {
                    too_late = admit::header_too_late(within);
                    Err(&too_late)
                }
            };
            let client_addr = admit::admit_header(route, peer, header, accepted)?;
            (client_addr, header.ok().flatten())
        }
    };
    let local = || client.get_ref().local_addr();
    let mut dialer = Dialer::new(route, (client_addr, peer), carried, local, shared, accepted)?;
    while let Some(attempt) = dialer.next_attempt() {
        let connected = net::connect(attempt.addr, dialer.connect_timeout())
            .await
            .and_then(|socket| {
                if let Some(header) = dialer.proxy_header() {
                    proxy_protocol::send(socket.get_ref(), header)?;
                }
                Ok(socket)
            });
        match connected {
            Ok(socket) => {
                return Some(Opened {
                    backend: dialer.connected(attempt, shared),
                    socket,
                    client_addr,
                    lease,
                })
            }
            Err(error) => {
                if let Next::GiveUp = dialer.failed(attempt, error, route, shared) {
                    break;
                }
            }
        }
    }
    dialer.give_up(route, peer, accepted);
    None
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

/// The state of a connection's relay, both ways.
struct Relay {
    upstream: pump::Direction,
    downstream: pump::Direction,
    to_backend: Bytes,
    to_client: Bytes,
    halves: Halves,
    /// Boxed: most connections have none, and an idle one pays for a word.
    idle: Option<Box<Idle>>,
}

/// An idle timeout: a timer re-armed from the last time bytes moved.
struct Idle {
    limit: Duration,
    timer: Pin<Box<Sleep>>,
    last_moved: Instant,
}

impl Relay {
    /// Relays both ways until both are finished, one fails, or the idle
    /// timeout passes.
    fn poll(&mut self, cx: &mut Context, client: &Socket, backend: &Socket) -> Poll<Ended> {
        let before = self.to_backend.total + self.to_client.total;
        let relayed = drive(
            &mut self.upstream,
            cx,
            (client, backend),
            &mut self.to_backend,
            &mut self.halves,
        )
        .and_then(|up| match up {
            Some(finished) => Ok(Some(finished)),
            None => drive(
                &mut self.downstream,
                cx,
                (backend, client),
                &mut self.to_client,
                &mut self.halves,
            ),
        });
        match relayed {
            Err(failure) => return Poll::Ready(Ended::Failed(failure)),
            Ok(Some(finished)) => return Poll::Ready(Ended::Finished(finished)),
            Ok(None) => {}
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

/// Moves what one direction has to move now, and passes its FIN on once
/// it is finished: `Some` once the connection is over.
fn drive(
    direction: &mut pump::Direction,
    cx: &mut Context,
    (from, to): (&Socket, &Socket),
    bytes: &mut Bytes,
    halves: &mut Halves,
) -> Result<Option<Classified>, Failure> {
    let sender = direction.sender();
    if halves.passed(sender) {
        return Ok(None);
    }
    let mut moved = 0;
    let done = direction.poll(cx, from, to, |n| moved += n);
    bytes.add(moved);
    if let Poll::Ready(done) = done {
        done?;
        match halves.fin(sender) {
            PassFin::Shutdown => {
                shutdown_write(to).map_err(|e| Failure::new(sender.other(), e))?;
            }
            PassFin::Close(finished) => return Ok(Some(finished)),
        }
    }
    Ok(None)
}
