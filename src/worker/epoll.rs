//! The epoll driver: a tokio runtime on the worker's thread, whose reactor
//! is epoll; an accept loop per listener and a task per connection
//! ([`relay::serve`]), moving bytes with plain system calls once a socket
//! is ready.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use nix::errno::Errno;
use socket2::SockRef;
use tokio::io::Interest;
use tracing::{debug, error, info, warn};

use crate::logging::Throttle;
use crate::mailbox::{BoundListener, Command, Inbox};
use crate::shared::Shared;
use crate::{net, relay};

/// Accept errors other than a vanished client are logged at most once per
/// second.
static ACCEPT_ERROR: Throttle = Throttle::new();

/// So are pauses at the descriptor capacity, and their ends.
static AT_CAPACITY: Throttle = Throttle::new();
static RESUMED: Throttle = Throttle::new();

/// Runs a worker on the calling thread: a tokio runtime whose reactor is
/// epoll, an accept loop per listener and a task per connection. Says on
/// `started` when it is accepting; returns only if it could not start.
pub fn run(
    listeners: Vec<BoundListener>,
    inbox: Inbox,
    shared: &'static Shared,
    started: mpsc::Sender<io::Result<()>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = started.send(Err(io::Error::new(
                e.kind(),
                format!("cannot create the worker's runtime: {e}"),
            )));
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        for listener in listeners {
            tokio::task::spawn_local(accept_loop(listener, shared));
        }
        let wake = match net::watch(Wake(inbox.fd()), Interest::READABLE) {
            Ok(wake) => wake,
            Err(e) => {
                let _ = started.send(Err(e));
                return;
            }
        };
        let _ = started.send(Ok(()));
        let mut inbox = inbox;
        loop {
            match wake.readable().await {
                Ok(mut ready) => {
                    let mut count = [0u8; 8];
                    // SAFETY: reads 8 bytes into a live buffer.
                    let read = unsafe { libc::read(inbox.fd(), count.as_mut_ptr().cast(), 8) };
                    if read < 0 {
                        ready.clear_ready();
                    }
                }
                Err(e) => {
                    error!("cannot wait for the control plane: {e}");
                    return std::future::pending().await;
                }
            }
            while let Some(command) = inbox.take() {
                match command {
                    Command::Listen(listener) => {
                        tokio::task::spawn_local(accept_loop(listener, shared));
                    }
                    Command::CloseAll => relay::close_all(),
                }
            }
        }
    });
}

/// The inbox's eventfd, watched without being owned (the inbox owns it).
struct Wake(RawFd);

impl AsRawFd for Wake {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

impl AsFd for Wake {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the inbox keeps the descriptor open for the worker's life.
        unsafe { BorrowedFd::borrow_raw(self.0) }
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
                tokio::task::spawn_local(async move {
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
