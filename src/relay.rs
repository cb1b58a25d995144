//! One proxied connection, from the accepted client socket to the end:
//! choose the backend, connect (with timeout and retries), then move bytes
//! both ways until both directions are finished.
//!
//! Half-close is honoured: when one side sends FIN, the other side gets
//! `shutdown(Write)` and the opposite direction keeps flowing until its own
//! FIN. An error or reset on either side ends both directions at once and is
//! passed on as a reset.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;

use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::TcpStream;
use tracing::debug;

use crate::logging::Throttle;
use crate::net;
use crate::snapshot::{Pool, SharedSnapshot};

/// Bytes read at once in each direction. Each direction holds one buffer
/// while its connection is open.
const BUFFER_SIZE: usize = 16 * 1024;

/// "No backend reachable" is logged at most once per interval, with a count.
static NO_BACKEND: Throttle = Throttle::new();

/// Serves one accepted connection from `client_addr` on `listener`.
pub async fn serve(
    client: TcpStream,
    client_addr: SocketAddr,
    listener: &str,
    snapshots: SharedSnapshot,
) {
    let (backend, backend_name) = {
        let snapshot = snapshots.load();
        let Some(pool) = snapshot.pool_for(listener) else {
            // The listener was removed from the configuration since accept.
            return;
        };
        match dial(pool, client_addr).await {
            Ok(dialed) => dialed,
            Err(error) => {
                if let Some(suppressed) = NO_BACKEND.allow() {
                    tracing::warn!(
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
    match pump(&client, &backend).await {
        Ok((to_backend, to_client)) => debug!(
            listener,
            client = %client_addr,
            backend = %backend_name,
            to_backend,
            to_client,
            "connection closed"
        ),
        Err(error) => {
            debug!(listener, client = %client_addr, backend = %backend_name, "connection aborted: {error}");
            net::abort(&client);
            net::abort(&backend);
        }
    }
}

/// Connects to the first reachable backend in the client's preference
/// order, trying at most `retries` more after the first.
async fn dial(pool: &Pool, client_addr: SocketAddr) -> io::Result<(TcpStream, Arc<str>)> {
    let mut last_error = None;
    for backend in pool.candidates(client_addr) {
        match net::connect(backend.addr, pool.connect_timeout).await {
            Ok(stream) => return Ok((TcpStream::from_std(stream), backend.name.clone())),
            Err(error) => {
                debug!(backend = %backend.name, client = %client_addr, "connect failed: {error}");
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

/// Relays both directions until both have ended; returns the bytes sent to
/// the backend and to the client.
async fn pump(client: &TcpStream, backend: &TcpStream) -> io::Result<(u64, u64)> {
    tokio::try_join!(copy(client, backend), copy(backend, client))
}

/// Copies `from` → `to` until `from` sends FIN, then passes the FIN on.
async fn copy(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let mut buf = Vec::with_capacity(BUFFER_SIZE);
    let mut total = 0u64;
    loop {
        let (read, returned) = from.read(buf).await;
        buf = returned;
        let n = read?;
        if n == 0 {
            // The peer may already be gone; the other direction will see it.
            match to.shutdown(Shutdown::Write) {
                Err(e) if e.kind() != io::ErrorKind::NotConnected => return Err(e),
                _ => return Ok(total),
            }
        }
        let (written, slice) = to.write_all(buf.slice(..n)).await;
        buf = slice.into_inner();
        written?;
        total += n as u64;
    }
}
