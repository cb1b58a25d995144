//! How the control plane reaches the workers, whichever driver they run:
//! the [`Command`]s it sends (a listener a reload added, the order to close
//! what is left of a drain or what relays to a backend gone down, the word
//! that queued clients may find a backend), the listening sockets it binds for them, the
//! [`Stop`] of a listener, and the [`Mailbox`] that carries commands and
//! wakes the worker (an eventfd its ring reads or its reactor watches).
//! A leaf of the module graph: the control plane, the spawner and both
//! drivers depend on it.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::net;

/// What the control plane asks of a running worker.
pub enum Command {
    /// Start accepting on a listener a reload added.
    Listen(BoundListener),
    /// `shutdown_timeout` is over: close every connection still open.
    CloseAll,
    /// These backends (by the control plane's identifiers) were marked
    /// down or removed, in pools with `on_down: close`: reset both sides
    /// of each connection relaying to one of them.
    CloseBackends(Arc<[u64]>),
    /// A pool's routing changed (a backend came up, a reload): clients in
    /// a queue may find a backend now.
    Dispatch,
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
/// also shuts the sockets down, which ends a pending accept; this reaches
/// a worker that waits for room under the descriptor capacity.
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

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Returns once the listener is stopped.
    pub async fn wait(&self) {
        loop {
            let told = self.told.notified();
            let mut told = std::pin::pin!(told);
            told.as_mut().enable();
            if self.is_stopped() {
                return;
            }
            told.await;
        }
    }
}

/// The control plane's end of a worker's commands: a queue, and an eventfd
/// that wakes the worker (its ring reads it, or its reactor watches it).
pub struct Mailbox {
    commands: Sender<Command>,
    wake: Arc<OwnedFd>,
}

/// The worker's end.
pub struct Inbox {
    commands: Receiver<Command>,
    wake: Arc<OwnedFd>,
}

/// A worker's mailbox and inbox.
pub fn mailbox() -> io::Result<(Mailbox, Inbox)> {
    // SAFETY: eventfd makes a new descriptor, owned below.
    let fd =
        net::syscall(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) } as isize)?;
    // SAFETY: eventfd succeeded: the descriptor is open and ours.
    let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    let (commands, received) = mpsc::channel();
    Ok((
        Mailbox {
            commands,
            wake: wake.clone(),
        },
        Inbox {
            commands: received,
            wake,
        },
    ))
}

impl Mailbox {
    /// Queues `command` and wakes the worker; nothing if it is gone (the
    /// process is exiting).
    pub fn send(&self, command: Command) {
        if self.commands.send(command).is_err() {
            return;
        }
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer. A full counter
        // (EAGAIN) still wakes the worker.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

impl Inbox {
    /// The eventfd to wait on.
    pub fn fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// The next command, if any is queued.
    pub fn take(&mut self) -> Option<Command> {
        self.commands.try_recv().ok()
    }
}
