//! What the unit tests of a connection's rules start from: a process's
//! shared state from a configuration, a listener's route, a client's
//! preference order, a refused connect.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use arc_swap::ArcSwap;
use metrics::Counter;
use tokio::sync::mpsc::{self, UnboundedReceiver};

use crate::capacity::Connections;
use crate::config::{self, Resolver};
use crate::shared::{Event, Shared};
use crate::snapshot::{Route, Snapshot};

/// The shared state of a process started with configuration `text` (host
/// names not looked up), room for 10 connections, and what its workers
/// report; leaked, as in the process.
pub fn shared(text: &str) -> (&'static Shared, UnboundedReceiver<Event>) {
    let config = config::parse(Path::new("t.yaml"), text, Resolver::Offline)
        .expect("a valid test configuration");
    let (events, received) = mpsc::unbounded_channel();
    let shared = Shared {
        snapshot: ArcSwap::from_pointee(Snapshot::from_config(&config)),
        events,
        connections: Connections::new(10),
        accepting: AtomicUsize::new(0),
        pipes_per_worker: 0,
        accept_paused: Counter::noop(),
        unrouted: Counter::noop(),
    };
    (Box::leak(Box::new(shared)), received)
}

/// The route of the listener on `listen`.
pub fn route(shared: &Shared, listen: &str) -> Arc<Route> {
    shared
        .snapshot
        .load()
        .route(listen.parse().unwrap())
        .cloned()
        .expect("a listener on that address")
}

/// Where `client`'s connects go in `pool`, in order.
pub fn preference(shared: &Shared, pool: &str, client: &str) -> Vec<SocketAddr> {
    let snapshot = shared.snapshot.load();
    snapshot
        .pool(pool)
        .expect("a pool of that name")
        .candidates(client.parse().unwrap())
        .map(|b| b.addr)
        .collect()
}

/// What a connect to a backend that is down fails with.
pub fn refused() -> io::Error {
    io::Error::from_raw_os_error(libc::ECONNREFUSED)
}
