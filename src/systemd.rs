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

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::net::UnixDatagram;
use tokio::sync::Notify;
use tracing::{debug, warn};

/// Messages held for a manager that does not read, at most. Beyond, STATUS
/// lines go first, then the oldest reloads (RELOADING with its READY):
/// the first READY, the latest state and STOPPING are kept.
const QUEUE_LIMIT: usize = 256;

/// How often a message that could not be sent is tried again (after a
/// pause of a second each time) before it is given up.
const SEND_ATTEMPTS: u32 = 3;

/// The notify messages of this process. Cheap to clone: clones share one
/// queue.
#[derive(Clone, Default)]
pub struct Notifier(Option<Rc<Queue>>);

#[derive(Default)]
struct Queue {
    messages: RefCell<VecDeque<Message>>,
    /// The sender is sending a message taken off the queue.
    in_flight: Cell<bool>,
    /// Wakes the sender: a message was queued.
    wake: Notify,
    /// Wakes [`Notifier::flush`]: the queue is empty and nothing is in
    /// flight.
    idle: Notify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ready,
    Reloading,
    Stopping,
    /// Only a STATUS line: replaced by a newer one while it waits.
    Status,
}

struct Message {
    text: String,
    kind: Kind,
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
        self.push(
            &[NotifyState::Ready, NotifyState::Status(status)],
            Kind::Ready,
        );
    }

    /// A reload starts; `ready` follows when it is done.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.push(&[NotifyState::Reloading, now], Kind::Reloading),
            Err(_) => self.push(&[NotifyState::Reloading], Kind::Reloading),
        }
    }

    pub fn stopping(&self, status: &str) {
        self.push(
            &[NotifyState::Stopping, NotifyState::Status(status)],
            Kind::Stopping,
        );
    }

    pub fn status(&self, status: &str) {
        self.push(&[NotifyState::Status(status)], Kind::Status);
    }

    /// Waits, at most `within`, until every queued message is sent: the
    /// last thing sluice does before it exits, so that STOPPING reaches a
    /// manager that reads late.
    pub async fn flush(&self, within: Duration) {
        let Some(queue) = &self.0 else {
            return;
        };
        let _ = tokio::time::timeout(within, async {
            loop {
                let idle = queue.idle.notified();
                let mut idle = std::pin::pin!(idle);
                idle.as_mut().enable();
                if queue.messages.borrow().is_empty() && !queue.in_flight.get() {
                    return;
                }
                idle.await;
            }
        })
        .await;
    }

    fn push(&self, states: &[NotifyState], kind: Kind) {
        let Some(queue) = &self.0 else {
            return;
        };
        let text: String = states.iter().map(|state| format!("{state}\n")).collect();
        let mut messages = queue.messages.borrow_mut();
        if kind == Kind::Status
            && messages
                .back()
                .is_some_and(|last| last.kind == Kind::Status)
        {
            messages.pop_back();
        }
        if messages.len() >= QUEUE_LIMIT {
            make_room(&mut messages);
        }
        messages.push_back(Message { text, kind });
        queue.wake.notify_one();
    }
}

/// Drops what matters least from a full queue: a STATUS line, else the
/// oldest reload (its RELOADING and the READY after it).
fn make_room(messages: &mut VecDeque<Message>) {
    warn!("the service manager reads no notify messages: dropping the oldest it has not read");
    if let Some(i) = messages.iter().position(|m| m.kind == Kind::Status) {
        messages.remove(i);
    } else if let Some(i) = messages.iter().position(|m| m.kind == Kind::Reloading) {
        messages.remove(i);
        if messages.get(i).is_some_and(|m| m.kind == Kind::Ready) {
            messages.remove(i);
        }
    } else {
        messages.pop_front();
    }
}

/// Sends the queued messages in order, each once the socket takes it.
async fn send_queued(queue: Rc<Queue>, path: OsString) {
    let mut socket = None;
    let mut warned = false;
    let mut failures = 0;
    loop {
        // Taken off the queue first, so that a newer STATUS line cannot
        // replace the message being sent.
        let next = queue.messages.borrow_mut().pop_front();
        let Some(message) = next else {
            queue.in_flight.set(false);
            queue.idle.notify_waiters();
            queue.wake.notified().await;
            continue;
        };
        queue.in_flight.set(true);
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
        // Waits, without blocking the thread, while the manager's queue is
        // full.
        let sent = match &socket {
            Some(connected) => connected.send(message.text.as_bytes()).await.map(drop),
            None => Err(std::io::ErrorKind::NotConnected.into()),
        };
        match sent {
            Ok(()) => failures = 0,
            Err(e) => {
                socket = None;
                failures += 1;
                if failures < SEND_ATTEMPTS {
                    queue.messages.borrow_mut().push_front(message);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                } else {
                    failures = 0;
                    debug!("cannot notify the service manager, giving up on a message: {e}");
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(messages: &VecDeque<Message>) -> Vec<Kind> {
        messages.iter().map(|m| m.kind).collect()
    }

    #[test]
    fn a_full_queue_drops_status_lines_then_old_reloads() {
        let message = |kind| Message {
            text: String::new(),
            kind,
        };
        let mut messages: VecDeque<Message> = [
            Kind::Ready,
            Kind::Status,
            Kind::Reloading,
            Kind::Ready,
            Kind::Reloading,
            Kind::Ready,
        ]
        .into_iter()
        .map(message)
        .collect();
        make_room(&mut messages);
        use Kind::*;
        assert_eq!(
            kinds(&messages),
            [Ready, Reloading, Ready, Reloading, Ready]
        );
        make_room(&mut messages);
        assert_eq!(
            kinds(&messages),
            [Ready, Reloading, Ready],
            "the first READY stays"
        );
    }
}
