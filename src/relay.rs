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

use std::cell::Cell;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::TcpStream;
use tracing::{debug, warn};

use crate::control::{Event, Shared};
use crate::health::PassiveHealth;
use crate::logging::Throttle;
use crate::net;
use crate::snapshot::Pool;

/// Bytes read at once in each direction. Each direction holds one buffer
/// while its connection is open.
const BUFFER_SIZE: usize = 16 * 1024;

/// "No backend reachable" is logged at most once per interval, with a count.
static NO_BACKEND: Throttle = Throttle::new();

/// The backend a connection was given: what it needs once the snapshot it
/// came from is released.
struct Dialed {
    stream: TcpStream,
    name: Arc<str>,
    passive: Arc<PassiveHealth>,
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
pub async fn serve(client: TcpStream, client_addr: SocketAddr, listener: &str, active: Active) {
    let shared = active.0;
    let backend = {
        // Held only while dialing: a long connection must not keep an old
        // snapshot alive.
        let snapshot = shared.snapshot.load();
        let Some(pool) = snapshot.pool_for(listener) else {
            // The listener was removed from the configuration since accept.
            return;
        };
        match dial(pool, client_addr, shared).await {
            Ok(dialed) => dialed,
            Err(error) => {
                if let Some(suppressed) = NO_BACKEND.allow() {
                    warn!(
                        listener,
                        pool = %pool.name,
                        client = %client_addr,
                        suppressed,
                        "no backend reachable, closing the client: {error}"
                    );
                }
                return;
            }
        }
    };

    let to_backend = Cell::new(0u64);
    let to_client = Cell::new(0u64);
    let outcome = tokio::try_join!(
        copy(&client, &backend.stream, &to_backend, Side::Client),
        copy(&backend.stream, &client, &to_client, Side::Backend),
    );
    let (to_backend, to_client) = (to_backend.get(), to_client.get());
    match outcome {
        Ok(_) => {
            backend.passive.record_success();
            debug!(listener, client = %client_addr, backend = %backend.name, to_backend, to_client, "connection closed");
        }
        Err(failure) => {
            debug!(
                listener, client = %client_addr, backend = %backend.name, to_backend, to_client,
                "connection aborted by the {}: {}", failure.side, failure.error
            );
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
            net::abort(&client);
            net::abort(&backend.stream);
        }
    }
}

/// Connects to the first reachable backend in the client's preference
/// order, trying at most `retries` more after the first.
async fn dial(pool: &Pool, client_addr: SocketAddr, shared: &'static Shared) -> io::Result<Dialed> {
    let mut last_error = None;
    for backend in pool.candidates(client_addr) {
        match net::connect(backend.addr, pool.connect_timeout).await {
            Ok(stream) => {
                return Ok(Dialed {
                    stream: TcpStream::from_std(stream),
                    name: backend.name.clone(),
                    passive: backend.passive.clone(),
                    eject_after: pool.eject_after,
                })
            }
            Err(error) => {
                debug!(backend = %backend.name, client = %client_addr, "connect failed: {error}");
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

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Backend => "backend",
        })
    }
}

struct Failure {
    side: Side,
    error: io::Error,
}

/// Copies `from` → `to` until `from` sends FIN, then passes the FIN on.
/// `from_side` names `from`; `copied` counts the bytes as they go.
async fn copy(
    from: &TcpStream,
    to: &TcpStream,
    copied: &Cell<u64>,
    from_side: Side,
) -> Result<(), Failure> {
    let to_side = match from_side {
        Side::Client => Side::Backend,
        Side::Backend => Side::Client,
    };
    let fail = |side, error| Failure { side, error };
    let mut buf = Vec::with_capacity(BUFFER_SIZE);
    loop {
        let (read, returned) = from.read(buf).await;
        buf = returned;
        let n = read.map_err(|e| fail(from_side, e))?;
        if n == 0 {
            // The peer may already be gone; the other direction will see it.
            return match to.shutdown(Shutdown::Write) {
                Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(fail(to_side, e)),
                _ => Ok(()),
            };
        }
        let (written, slice) = to.write_all(buf.slice(..n)).await;
        buf = slice.into_inner();
        written.map_err(|e| fail(to_side, e))?;
        copied.set(copied.get() + n as u64);
    }
}
