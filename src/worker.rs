//! Worker threads: one tokio-uring runtime per thread, each with its own
//! SO_REUSEPORT socket for every listener, so the kernel spreads new
//! connections over the workers and nothing is handed between threads.
//!
//! A worker accepts, then runs each connection as a task on its own runtime
//! ([`relay::serve`]). The only state shared between workers is the routing
//! [`Snapshot`](crate::snapshot::Snapshot), read without a lock, and a few
//! counters ([`Shared`]). Listeners added by a reload (and the order to
//! close what is left at the end of a drain) arrive over a channel from the
//! control plane; a listener is removed by shutting its socket
//! down, which ends its accept loop.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno;
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use crate::logging::Throttle;
use crate::shared::Shared;
use crate::{net, relay};

/// What the control plane asks of a running worker.
pub enum Command {
    /// Start accepting on a listener a reload added.
    Listen(BoundListener),
    /// `shutdown_timeout` is over: close every connection still open.
    CloseAll,
}

/// A listening socket bound for one worker.
pub struct BoundListener {
    /// The address it listens on: the key of its route in the snapshot.
    pub addr: SocketAddr,
    pub socket: TcpListener,
    /// Shared by the listener's sockets on every worker: set when the
    /// control plane stops the listener.
    pub stop: Arc<Stop>,
}

/// Tells a listener's accept loops that it is stopped. The control plane
/// also shuts the sockets down, which ends a loop waiting to accept; this
/// reaches one that waits for room under the descriptor capacity.
#[derive(Default)]
pub struct Stop {
    stopped: AtomicBool,
    told: Notify,
}

impl Stop {
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.told.notify_waiters();
    }

    /// Returns once the listener is stopped.
    async fn wait(&self) {
        loop {
            let told = self.told.notified();
            let mut told = std::pin::pin!(told);
            told.as_mut().enable();
            if self.stopped.load(Ordering::SeqCst) {
                return;
            }
            told.await;
        }
    }
}

/// Accept errors other than a vanished client are logged at most once per
/// second.
static ACCEPT_ERROR: Throttle = Throttle::new();

/// So are pauses at the descriptor capacity, and their ends.
static AT_CAPACITY: Throttle = Throttle::new();
static RESUMED: Throttle = Throttle::new();

/// Starts worker `id` on its own thread, pinned to `cpu` if given, and
/// returns once the worker is accepting on all its listeners, or with the
/// error that kept it from starting (io_uring unavailable, say).
pub fn spawn(
    id: usize,
    listeners: Vec<BoundListener>,
    mut commands: UnboundedReceiver<Command>,
    shared: &'static Shared,
    cpu: Option<usize>,
) -> io::Result<JoinHandle<()>> {
    let (started, outcome) = mpsc::channel::<io::Result<()>>();
    let handle = std::thread::Builder::new()
        .name(format!("sluice-worker-{id}"))
        .spawn(move || {
            relay::keep_pipes(shared.pipes_per_worker);
            if let Some(cpu) = cpu {
                if let Err(e) = pin_to(cpu) {
                    warn!(worker = id, cpu, "cannot pin worker to its core: {e}");
                }
            }
            let runtime = match tokio_uring::Runtime::new(&tokio_uring::builder()) {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = started.send(Err(io::Error::new(
                        e.kind(),
                        format!("cannot create an io_uring runtime: {e}"),
                    )));
                    return;
                }
            };
            runtime.block_on(async move {
                for listener in listeners {
                    tokio_uring::spawn(accept_loop(listener, shared));
                }
                let _ = started.send(Ok(()));
                while let Some(command) = commands.recv().await {
                    match command {
                        Command::Listen(listener) => {
                            tokio_uring::spawn(accept_loop(listener, shared));
                        }
                        Command::CloseAll => relay::close_all(),
                    }
                }
                // The control plane is gone: the process is exiting.
                std::future::pending::<()>().await
            })
        })?;
    match outcome.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::other("the worker thread ended while starting")),
    }
}

/// Accepts until the control plane shuts the listening socket down.
async fn accept_loop(listener: BoundListener, shared: &'static Shared) {
    shared.accepting.fetch_add(1, Ordering::AcqRel);
    accept_until_stopped(listener, shared).await;
    shared.accepting.fetch_sub(1, Ordering::AcqRel);
}

async fn accept_until_stopped(listener: BoundListener, shared: &'static Shared) {
    // Logged by address: a reload may rename the listener and keep its
    // socket.
    let address = listener.addr;
    let stop = listener.stop;
    let listener = match net::watch(listener.socket, Interest::READABLE) {
        Ok(listener) => listener,
        Err(e) => {
            error!(%address, "cannot watch the listening socket: {e}");
            return;
        }
    };
    let stopped = || {
        !SockRef::from(listener.get_ref())
            .is_listener()
            .unwrap_or(false)
    };
    let connections = &shared.connections;
    let mut paused = false;
    loop {
        let mut ready = match listener.readable().await {
            Ok(ready) => ready,
            Err(e) => {
                error!(%address, "cannot wait for connections: {e}");
                return;
            }
        };
        // A connection is counted before it is accepted, and only if there
        // is room for it: at capacity, new clients wait in the listen
        // backlog, where the kernel holds them without a descriptor of ours.
        let Some(slot) = connections.take() else {
            if !paused {
                paused = true;
                shared.accept_paused.increment(1);
                if let Some(suppressed) = AT_CAPACITY.allow() {
                    warn!(
                        %address, suppressed,
                        "{} connections are open, all the descriptor limit allows: \
                         new clients wait in the listen backlog until some close",
                        connections.capacity()
                    );
                }
            }
            // Readiness is kept: the waiting clients are accepted once
            // there is room, unless the listener is stopped meanwhile.
            drop(ready);
            tokio::select! {
                () = connections.wait_for_room() => continue,
                () = stop.wait() => {
                    debug!(%address, "listener stopped");
                    return;
                }
            }
        };
        if paused {
            paused = false;
            if let Some(suppressed) = RESUMED.allow() {
                info!(%address, suppressed, "accepting again: connections have closed");
            }
        }
        let accepted = match ready.try_io(|listener| net::accept(listener.get_ref())) {
            Ok(accepted) => accepted,
            // Every waiting connection taken: wait for the next.
            Err(_would_block) => continue,
        };
        match accepted {
            Ok((client, client_addr)) => {
                // The route as of now: a reload published after this
                // moment does not take it away.
                let Some(route) = shared.snapshot.load().route(address).cloned() else {
                    // Accepted just as a reload removed the listener.
                    shared.unrouted.increment(1);
                    continue;
                };
                tokio_uring::spawn(async move {
                    relay::serve(client, client_addr, route, slot, shared).await;
                });
            }
            Err(e) => {
                let errno = e.raw_os_error().map(Errno::from_raw);
                match errno {
                    Some(Errno::ECONNABORTED) => continue,
                    // shutdown() by the control plane (a reload removed the
                    // listener, or sluice is stopping) leaves the socket no
                    // longer listening; any other EINVAL is an error.
                    Some(Errno::EINVAL) if stopped() => {
                        debug!(%address, "listener stopped");
                        return;
                    }
                    _ => {}
                }
                if let Some(suppressed) = ACCEPT_ERROR.allow() {
                    error!(%address, suppressed, "cannot accept connections: {e}");
                }
                // Out of descriptors or memory after all (the limit was
                // lowered under us, say): back off instead of spinning,
                // leaving new clients in the kernel's backlog meanwhile.
                if matches!(
                    errno,
                    Some(
                        Errno::EMFILE
                            | Errno::ENFILE
                            | Errno::ENOBUFS
                            | Errno::ENOMEM
                            | Errno::EINVAL
                    )
                ) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// The CPUs this process may run on, in order: worker `i` is pinned to the
/// `i`-th (wrapping around when there are more workers than CPUs).
pub fn allowed_cpus() -> Vec<usize> {
    let Ok(set) = sched_getaffinity(Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect()
}

fn pin_to(cpu: usize) -> nix::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    // Pid 0: the calling thread.
    sched_setaffinity(Pid::from_raw(0), &set)
}
