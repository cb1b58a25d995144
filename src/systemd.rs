//! The systemd notify protocol (sd_notify): READY, RELOADING, STOPPING and
//! STATUS messages on `NOTIFY_SOCKET`. Without that variable (not started by
//! systemd with `Type=notify`), the [`Notifier`] does nothing.
//!
//! A send must never stall the control plane. The notify socket is a
//! datagram socket whose queue holds few messages (`net.unix.max_dgram_qlen`,
//! 10 by default); a service manager that reads it late would make a
//! blocking send wait, and with it reloads, health verdicts and SIGTERM. So
//! messages are queued here and a task of their own sends them, waiting for
//! the socket to take each one. State changes (READY, RELOADING, STOPPING)
//! all go out, in order; of the STATUS lines queued behind them only the
//! newest is kept, since each replaces the one before.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::SocketAddr;
use std::rc::Rc;

use sd_notify::NotifyState;
use tokio::net::UnixDatagram;
use tokio::sync::Notify;
use tracing::{debug, warn};

/// Messages held for a manager that does not read, at most: the oldest
/// are dropped beyond. Each reload queues two.
const QUEUE_LIMIT: usize = 256;

/// The notify messages of this process. Cheap to clone: clones share one
/// queue.
#[derive(Clone, Default)]
pub struct Notifier(Option<Rc<Queue>>);

#[derive(Default)]
struct Queue {
    messages: RefCell<VecDeque<Message>>,
    wake: Notify,
}

struct Message {
    text: String,
    /// Only a STATUS line: replaced by a newer one while it waits.
    status_only: bool,
}

impl Notifier {
    /// A notifier for `NOTIFY_SOCKET`, or one that does nothing without it.
    /// Messages wait until [`Notifier::start`] runs its sender.
    pub fn from_env() -> Notifier {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(_) => Notifier(Some(Rc::default())),
            None => Notifier(None),
        }
    }

    /// Spawns the task that sends the queued messages, on the calling
    /// thread's runtime.
    pub fn start(&self) {
        let (Some(queue), Some(path)) = (&self.0, std::env::var_os("NOTIFY_SOCKET")) else {
            return;
        };
        tokio::task::spawn_local(send_queued(queue.clone(), path));
    }

    /// Every listener is bound and every worker accepts; after a reload,
    /// sluice is serving again, whatever the reload's result.
    pub fn ready(&self, status: &str) {
        self.push(&[NotifyState::Ready, NotifyState::Status(status)], false);
    }

    /// A reload starts; `ready` follows when it is done.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.push(&[NotifyState::Reloading, now], false),
            Err(_) => self.push(&[NotifyState::Reloading], false),
        }
    }

    pub fn stopping(&self, status: &str) {
        self.push(&[NotifyState::Stopping, NotifyState::Status(status)], false);
    }

    pub fn status(&self, status: &str) {
        self.push(&[NotifyState::Status(status)], true);
    }

    fn push(&self, states: &[NotifyState], status_only: bool) {
        let Some(queue) = &self.0 else {
            return;
        };
        let text: String = states.iter().map(|state| format!("{state}\n")).collect();
        let mut messages = queue.messages.borrow_mut();
        if status_only && messages.back().is_some_and(|last| last.status_only) {
            messages.pop_back();
        }
        if messages.len() == QUEUE_LIMIT {
            messages.pop_front();
            debug!("the service manager reads no notify messages: dropping the oldest");
        }
        messages.push_back(Message { text, status_only });
        queue.wake.notify_one();
    }
}

/// Sends the queued messages in order, each once the socket takes it.
async fn send_queued(queue: Rc<Queue>, path: OsString) {
    let mut socket = None;
    let mut warned = false;
    loop {
        // Taken off the queue first, so that a newer STATUS line cannot
        // replace the message being sent.
        let next = queue.messages.borrow_mut().pop_front();
        let Some(message) = next else {
            queue.wake.notified().await;
            continue;
        };
        // Connected once and kept; connected again after an error, in case
        // the manager made its socket anew.
        if socket.is_none() {
            match connect(&path) {
                Ok(connected) => socket = Some(connected),
                Err(e) if !warned => {
                    warned = true;
                    warn!(
                        "cannot reach the service manager at NOTIFY_SOCKET={}: {e}",
                        path.to_string_lossy()
                    );
                }
                Err(_) => {}
            }
        }
        if let Some(connected) = &socket {
            // Waits, without blocking the thread, while the manager's queue
            // is full.
            if let Err(e) = connected.send(message.text.as_bytes()).await {
                debug!("cannot notify the service manager: {e}");
                socket = None;
            }
        }
    }
}

/// A datagram socket connected to `path`; `@name` is a name in the
/// abstract namespace, as systemd allows.
fn connect(path: &OsString) -> std::io::Result<UnixDatagram> {
    let socket = std::os::unix::net::UnixDatagram::unbound()?;
    match path.as_bytes().strip_prefix(b"@") {
        Some(name) => socket.connect_addr(&SocketAddr::from_abstract_name(name)?)?,
        None => socket.connect(path)?,
    }
    socket.set_nonblocking(true)?;
    UnixDatagram::from_std(socket)
}
