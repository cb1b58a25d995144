//! One proxied connection, from the accepted client socket to the end:
//! choose the backend, connect (with timeout and retries), then move bytes
//! both ways until both directions are finished.
//!
//! Half-close is honoured: when one side sends FIN, the other side gets
//! `shutdown(Write)` and the opposite direction keeps flowing until its own
//! FIN. An error or reset on either side ends both directions at once and is
//! passed on as a reset.
//!
//! Each connection also tells its backend's [`PassiveHealth`] how it went: a
//! refused or timed-out connect, or a reset before the backend sent a byte,
//! is a failure; anything else ends a failure streak.
//!
//! How the bytes move (splice or copy) is [`pump`]'s business.

mod pump;

use std::borrow::Cow;
use std::cell::Cell;
use std::future::poll_fn;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use metrics::Counter;
use tokio::io::Interest;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::control::{Event, Shared};
use crate::health::PassiveHealth;
use crate::logging::{self, Throttle};
use crate::metrics::{BackendStats, ErrorReason, ListenerStats};
use crate::net;
use crate::snapshot::Pool;

/// "No backend reachable" is logged at most once per interval, with a count.
static NO_BACKEND: Throttle = Throttle::new();

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
    socket: pump::Socket,
    name: Arc<str>,
    passive: Arc<PassiveHealth>,
    stats: Arc<BackendStats>,
    eject_after: Option<u32>,
}

/// Counts a connection in [`Shared::active`] while it lives; taken by the
/// accept loop before the connection's task is spawned.
pub struct Active(&'static Shared);

impl Active {
    pub fn new(shared: &'static Shared) -> Active {
        shared.active.fetch_add(1, Ordering::Relaxed);
        Active(shared)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one accepted connection from `client_addr` on `listener`.
/// `client` must be non-blocking.
pub async fn serve(client: TcpStream, client_addr: SocketAddr, listener: &str, active: Active) {
    let shared = active.0;
    let accepted = Instant::now();
    let client = match net::watch(client, Interest::READABLE | Interest::WRITABLE) {
        Ok(client) => client,
        Err(e) => {
            warn!(listener, client = %client_addr, "cannot watch a new connection: {e}");
            return;
        }
    };
    let backend = {
        // Held only while dialing: a long connection must not keep an old
        // snapshot alive.
        let snapshot = shared.snapshot.load();
        let Some((pool, listener_stats)) = snapshot.pool_for(listener) else {
            // The listener was removed from the configuration since accept.
            return;
        };
        // Boxed: what dialing needs is large and short-lived; inline, it would
        // make every connection's task that much bigger for its whole life.
        match Box::pin(dial(pool, client_addr, listener_stats, shared)).await {
            Ok(dialed) => (dialed, pool.engine),
            Err(error) => {
                listener_stats.error(ErrorReason::NoBackend);
                if let Some(suppressed) = NO_BACKEND.allow() {
                    warn!(
                        listener,
                        pool = %pool.name,
                        client = %client_addr,
                        suppressed,
                        "no backend reachable, closing the client: {error}"
                    );
                }
                log_closed(listener, client_addr, "-", (0, 0), accepted, "no backend");
                return;
            }
        }
    };

    let (backend, engine) = backend;
    let route = backend.stats.route(listener);
    if let Some(route) = route {
        route.connections.increment(1);
        route.active.increment(1.0);
    }
    let to_backend = Bytes::new(route.map(|r| &r.to_backend));
    let to_client = Bytes::new(route.map(|r| &r.to_client));
    let first_fin = Cell::new(None);
    let closing = CLOSING.with(Rc::clone);
    let mut upstream = pump::Direction::new(Side::Client, engine);
    let mut downstream = pump::Direction::new(Side::Backend, engine);
    let relayed = poll_fn(|cx| {
        let mut drive = |direction: &mut pump::Direction, from, to, bytes: &Bytes| {
            if direction.finished() {
                return Ok(());
            }
            if let Poll::Ready(done) = direction.poll(cx, from, to, |n| bytes.add(n as u64)) {
                done?;
                if first_fin.get().is_none() {
                    first_fin.set(Some(direction.sender()));
                }
            }
            Ok(())
        };
        drive(&mut upstream, &client, &backend.socket, &to_backend)?;
        drive(&mut downstream, &backend.socket, &client, &to_client)?;
        if upstream.finished() && downstream.finished() {
            Poll::Ready(Ok::<(), Failure>(()))
        } else {
            Poll::Pending
        }
    });
    let outcome = tokio::select! {
        outcome = relayed => Some(outcome),
        () = closing.notified() => None,
    };
    if let Some(route) = route {
        route.active.decrement(1.0);
    }
    let (to_backend, to_client) = (to_backend.total.get(), to_client.total.get());
    let abort_both = || {
        net::abort(&client);
        net::abort(&backend.socket);
    };
    let close: Cow<'static, str> = match outcome {
        None => {
            abort_both();
            "shutdown".into()
        }
        Some(Ok(_)) => {
            backend.passive.record_success();
            match first_fin.get() {
                Some(Side::Backend) => "backend FIN".into(),
                _ => "client FIN".into(),
            }
        }
        Some(Err(failure)) => {
            // A backend that resets before saying anything is failing, the
            // same as one that refuses the connection; one that answered
            // worked. A client that leaves early says nothing either way.
            let reset = matches!(
                failure.error.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            );
            if to_client > 0 {
                backend.passive.record_success();
            } else if failure.side == Side::Backend && reset {
                report_failure(&backend.passive, backend.eject_after, shared);
            }
            abort_both();
            if reset {
                format!("{} reset", failure.side).into()
            } else {
                format!("{} error: {}", failure.side, failure.error).into()
            }
        }
    };
    let bytes = (to_backend, to_client);
    log_closed(
        listener,
        client_addr,
        &backend.name,
        bytes,
        accepted,
        &close,
    );
}

/// With `log.connections`, one line per closed connection.
fn log_closed(
    listener: &str,
    client: SocketAddr,
    backend: &str,
    (to_backend, to_client): (u64, u64),
    accepted: Instant,
    close: &str,
) {
    if logging::log_connections() {
        info!(
            listener,
            %client,
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
/// order, trying at most `retries` more after the first.
async fn dial(
    pool: &Pool,
    client_addr: SocketAddr,
    listener_stats: &ListenerStats,
    shared: &'static Shared,
) -> io::Result<Dialed> {
    let mut last_error = None;
    for backend in pool.candidates(client_addr) {
        let started = Instant::now();
        match net::connect(backend.addr, pool.connect_timeout).await {
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
                });
            }
            Err(error) => {
                debug!(backend = %backend.name, client = %client_addr, "connect failed: {error}");
                listener_stats.error(if error.kind() == io::ErrorKind::TimedOut {
                    ErrorReason::ConnectTimeout
                } else {
                    ErrorReason::ConnectRefused
                });
                report_failure(&backend.passive, pool.eject_after, shared);
                last_error = Some(io::Error::new(
                    error.kind(),
                    format!("{} ({}): {error}", backend.name, backend.addr),
                ));
            }
        }
    }
    Err(last_error.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "the pool has no backend with a weight above 0",
        )
    }))
}

/// Counts a failed connection; the one that completes a streak of
/// `eject_after` asks the control plane to take the backend out.
fn report_failure(passive: &PassiveHealth, eject_after: Option<u32>, shared: &'static Shared) {
    if let Some(threshold) = eject_after {
        if passive.record_failure(threshold) {
            let _ = shared.events.send(Event::Ejected { id: passive.id });
        }
    }
}

/// Which peer a relay error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Backend,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Backend => "backend",
        })
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

/// Bytes moved in one direction: a local total for the end of the
/// connection, and the Prometheus counter, which moves as they go.
struct Bytes<'a> {
    total: Cell<u64>,
    counter: Option<&'a Counter>,
}

impl<'a> Bytes<'a> {
    fn new(counter: Option<&'a Counter>) -> Bytes<'a> {
        Bytes {
            total: Cell::new(0),
            counter,
        }
    }

    fn add(&self, n: u64) {
        self.total.set(self.total.get() + n);
        if let Some(counter) = self.counter {
            counter.increment(n);
        }
    }
}
