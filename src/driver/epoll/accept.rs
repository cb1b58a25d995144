//! A listener's accept loop on the epoll driver: it waits for readiness,
//! takes a place in the process's capacity before each accept (at the
//! capacity, new clients wait in the listen backlog), and starts a task
//! per connection. What an accept error means and the pause at the capacity
//! are [`crate::connection::accepting`]'s.

use std::sync::atomic::Ordering;

use socket2::SockRef;
use tokio::io::Interest;
use tracing::{debug, error};

use super::conn;
use crate::connection::accepting::{AcceptError, Pause, BACKOFF};
use crate::mailbox::BoundListener;
use crate::net;
use crate::shared::Shared;

/// Accepts until the control plane shuts the listening socket down.
pub(super) async fn accept_loop(listener: BoundListener, shared: &'static Shared) {
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
    let listening = || {
        SockRef::from(listener.get_ref())
            .is_listener()
            .unwrap_or(false)
    };
    let connections = &shared.connections;
    let mut pause = Pause::default();
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
            pause.at_capacity(address, shared);
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
        pause.room();
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
                    conn::serve(client, client_addr, route, slot, shared).await;
                });
            }
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                match AcceptError::of(errno, address, listening) {
                    AcceptError::Ignore => {}
                    // shutdown() by the control plane: a reload removed the
                    // listener, or sluice is stopping.
                    AcceptError::Stop => {
                        debug!(%address, "listener stopped");
                        return;
                    }
                    // Clients wait in the kernel's backlog meanwhile.
                    AcceptError::BackOff => tokio::time::sleep(BACKOFF).await,
                }
            }
        }
    }
}
