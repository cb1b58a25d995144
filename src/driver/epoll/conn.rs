//! The epoll driver's connection, from the accepted client socket to the
//! end: a task that does what its [`Session`] asks (read a PROXY header,
//! connect with a timeout, try the next backend), then moves bytes both
//! ways until both directions are finished.
//!
//! Half-close is honoured, by the rules of
//! [`Halves`](crate::connection::relaying::Halves): when one side sends
//! FIN, the other side gets `shutdown(Write)` and the opposite direction
//! keeps flowing until its own FIN. An error or reset on either side ends
//! both directions at once and is passed on as a reset.
//!
//! How each attempt and each connection ended decides its log line, whether
//! its sides are reset, and what its backend's passive health hears:
//! [`ending::classify`] holds those rules, for every data path.
//!
//! How the bytes move (splice or copy) is [`pump`]'s business.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::sync::Notify;
use tokio::time::Sleep;
use tracing::warn;

use super::pump::{self, Failure};
use crate::capacity::Slot;
use crate::connection::ending::{Ending, Side};
use crate::connection::queue::RECHECK;
use crate::connection::relaying::{shutdown_write, PassFin};
use crate::connection::session::{Connected, Session, Step};
use crate::net::{self, Socket};
use crate::proxy_protocol;
use crate::shared::Shared;
use crate::snapshot::Route;

thread_local! {
    /// Wakes every connection of this worker when a drain runs out of time.
    static CLOSING: Rc<Notify> = Rc::new(Notify::new());
    /// Wakes the clients of this worker that wait in a queue.
    static DISPATCH: Rc<Notify> = Rc::new(Notify::new());
    /// Per backend (by the control plane's identifier), what wakes the
    /// connections of this worker relaying to it when it goes down.
    static BACKENDS: RefCell<HashMap<u64, Weak<Notify>>> = RefCell::default();
}

/// Closes every connection of the calling worker (each logs `shutdown`).
pub fn close_all() {
    CLOSING.with(|closing| closing.notify_waiters());
}

/// Resets the connections of the calling worker that relay to one of
/// `backends` (each logs `backend down`).
pub fn close_backends(backends: &[u64]) {
    BACKENDS.with_borrow(|map| {
        for id in backends {
            if let Some(down) = map.get(id).and_then(Weak::upgrade) {
                down.notify_waiters();
            }
        }
    });
}

/// Tries the clients waiting in a queue again.
pub fn dispatch() {
    DISPATCH.with(|dispatch| dispatch.notify_waiters());
}

/// What tells the connections relaying to backend `id` that it went down.
fn backend_down(id: u64) -> Rc<Notify> {
    BACKENDS.with_borrow_mut(|map| {
        if let Some(down) = map.get(&id).and_then(Weak::upgrade) {
            return down;
        }
        // Entries of backends no connection relays to any more go, from
        // time to time.
        if map.len() >= 64 && map.len().is_power_of_two() {
            map.retain(|_, down| down.strong_count() > 0);
        }
        let down = Rc::new(Notify::new());
        map.insert(id, Rc::downgrade(&down));
        down
    })
}

/// Why a relay ended.
enum Ended {
    /// Both sides sent FIN, and each was passed on (the session has
    /// recorded it).
    Finished,
    Failed(Failure),
    /// `shutdown_timeout` ran out.
    Shutdown,
    /// Nothing moved either way for `idle_timeout`.
    Idle,
    /// Its backend went down (`on_down: close`).
    BackendDown,
}

/// Serves one accepted connection from `peer` on the listener of `route`,
/// which holds `slot` of the process's connection capacity until it ends.
/// `client` must be non-blocking.
pub async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    route: Arc<Route>,
    slot: Slot,
    shared: &'static Shared,
) {
    let client = match net::watch(client, Interest::READABLE | Interest::WRITABLE) {
        Ok(client) => client,
        Err(e) => {
            let listener = &*route.listener;
            warn!(listener, client = %peer, "cannot watch a new connection: {e}");
            return;
        }
    };
    let local = || client.get_ref().local_addr();
    // The route goes with the session: a long connection need not keep it
    // alive.
    let (mut session, step) = match Session::open(route, peer, slot, local, shared, Instant::now())
    {
        Ok(opened) => opened,
        Err(slot) => return drop((client, slot)),
    };
    // The end of a drain reaches every connection, dialing ones too.
    let closing = CLOSING.with(Rc::clone);
    let shutdown = closing.notified();
    let mut shutdown = std::pin::pin!(shutdown);
    // Boxed: what reading a header and dialing need is large and
    // short-lived; inline, it would make every connection's task that much
    // bigger for its whole life.
    let opened = tokio::select! {
        opened = Box::pin(open(&client, &mut session, step, shared)) => Ok(opened),
        () = shutdown.as_mut() => Err(()),
    };
    let (backend, connected, reset) = match opened {
        Ok(Some(opened)) => opened,
        Ok(None) => {
            drop(client);
            return session.close(shared, Instant::now());
        }
        Err(()) => {
            session.end(Ending::Shutdown);
            net::abort(&client);
            drop(client);
            return session.close(shared, Instant::now());
        }
    };
    let Connected {
        engine,
        proxy_header,
    } = connected;
    let mut relay = Relay {
        upstream: pump::Direction::new(Side::Client, engine),
        downstream: pump::Direction::new(Side::Backend, engine),
        idle: session
            .idle_deadline()
            .map(|deadline| Box::pin(tokio::time::sleep_until(deadline.into()))),
        session,
    };
    // A backend that reset the connection as it accepted it, or one that
    // does not take the PROXY header, fails it before anything is relayed.
    let failed = reset.map(|e| Failure::new(Side::Backend, e)).or_else(|| {
        let header = proxy_header?;
        let sent = proxy_protocol::send(backend.get_ref(), &header);
        sent.err().map(|e| Failure::new(Side::Backend, e))
    });
    let (client, backend) = (&client, &backend);
    let down = relay.session.backend_id().map(backend_down);
    let outcome = if let Some(failure) = failed {
        Ended::Failed(failure)
    } else {
        // The future holds one pointer to the relay, not one per field:
        // this is most of what an idle connection costs.
        let relay = &mut relay;
        let mut shutdown = shutdown.as_mut();
        let went_down = down.as_deref().map(Notify::notified);
        let mut went_down = std::pin::pin!(went_down);
        poll_fn(move |cx| {
            if shutdown.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ended::Shutdown);
            }
            if let Some(went_down) = went_down.as_mut().as_pin_mut() {
                if went_down.poll(cx).is_ready() {
                    return Poll::Ready(Ended::BackendDown);
                }
            }
            relay.poll(cx, client, backend)
        })
        .await
    };
    // Bytes read but not yet taken by their destination.
    let stalled = relay.upstream.holding() || relay.downstream.holding();
    let ended = match &outcome {
        // Recorded already.
        Ended::Finished => None,
        Ended::Shutdown => Some(Ending::Shutdown),
        Ended::BackendDown => Some(Ending::BackendDown),
        Ended::Idle => Some(Ending::Idle { stalled }),
        Ended::Failed(failure) => Some(Ending::Failed {
            side: failure.side,
            error: &failure.error,
        }),
    };
    if let Some(ending) = ended {
        relay.session.end(ending);
    }
    let how = relay.session.ending().expect("ended");
    let (flush_from, reset) = (how.flush_from, how.reset);
    if let Some(from) = flush_from {
        let relay = &mut relay;
        let mut flush = Flush::default();
        poll_fn(|cx| {
            if shutdown.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            relay.poll_flush(cx, &mut flush, from, (client, backend))
        })
        .await;
    }
    if reset {
        // What the sockets took and have not sent is lost with the reset:
        // the log counts what was delivered.
        for (from, to) in [(Side::Client, backend), (Side::Backend, client)] {
            relay
                .session
                .undelivered(from, net::unsent(to).unwrap_or(0));
        }
        net::abort(client);
        net::abort(backend);
    }
    relay.session.close(shared, Instant::now());
    // Its place at its backend is free: a client in a queue may take it.
    dispatch();
}

/// Reads the client's PROXY header if one is due, then dials a backend,
/// as `session` asks, starting with `step`: the backend's socket, how to
/// relay, and the error that ended the connection already if the backend
/// reset it at once (see [`net::connect`]). `None` if the client was
/// turned away or no backend could be reached (counted and logged).
async fn open(
    client: &Socket,
    session: &mut Session,
    mut step: Step,
    shared: &'static Shared,
) -> Option<(Socket, Connected, Option<io::Error>)> {
    let local = || client.get_ref().local_addr();
    loop {
        step = match step {
            Step::ReadHeader { deadline } => {
                let read = proxy_protocol::read_header(client);
                let read = tokio::time::timeout_at(deadline.into(), read).await;
                let now = Instant::now();
                match read {
                    Ok(Ok(carried)) => session.header(Ok(carried), local, shared, now),
                    Ok(Err(e)) => session.header(Err(&e), local, shared, now),
                    Err(_) => session.header_late(now),
                }
            }
            Step::Connect { addr, timeout } => {
                let connected = net::connect(addr, timeout).await;
                let now = Instant::now();
                match connected {
                    Ok((socket, reset)) => {
                        return Some((socket, session.connected(shared, now), reset))
                    }
                    Err(error) => session.connect_failed(error, shared, now),
                }
            }
            Step::Wait { deadline } => wait(session, deadline, local, shared).await,
            Step::Close => return None,
        }
    }
}

/// Holds a client in its pool's queue until a backend can take it (the
/// step that dials it) or `deadline` passes (it is turned away). Tries
/// again when told that a pool changed or a connection of this worker
/// closed, and every [`RECHECK`].
async fn wait(
    session: &mut Session,
    deadline: Instant,
    local: impl Fn() -> io::Result<SocketAddr>,
    shared: &'static Shared,
) -> Step {
    let dispatch = DISPATCH.with(Rc::clone);
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline.into()) => {
                return session.wait_over(Instant::now());
            }
            () = dispatch.notified() => {}
            () = tokio::time::sleep(RECHECK) => {}
        }
        match session.retry(&local, shared, Instant::now()) {
            Step::Wait { .. } => {}
            step => return step,
        }
    }
}

/// The state of a connection's relay, both ways.
struct Relay {
    upstream: pump::Direction,
    downstream: pump::Direction,
    session: Session,
    /// The idle timeout's timer, re-armed from the last time bytes moved.
    /// Boxed: most connections have none, and an idle one pays for a word.
    idle: Option<Pin<Box<Sleep>>>,
}

impl Relay {
    /// Relays both ways until both are finished, one fails, or the idle
    /// timeout passes.
    fn poll(&mut self, cx: &mut Context, client: &Socket, backend: &Socket) -> Poll<Ended> {
        let now = Instant::now();
        let session = &mut self.session;
        let relayed =
            drive(&mut self.upstream, cx, (client, backend), session, now).and_then(|over| {
                match over {
                    true => Ok(true),
                    false => drive(&mut self.downstream, cx, (backend, client), session, now),
                }
            });
        match relayed {
            Err(failure) => return Poll::Ready(Ended::Failed(failure)),
            Ok(true) => return Poll::Ready(Ended::Finished),
            Ok(false) => {}
        }
        self.poll_idle(cx, now).map(|()| Ended::Idle)
    }

    /// Ready once nothing has moved either way for `idle_timeout`.
    fn poll_idle(&mut self, cx: &mut Context, now: Instant) -> Poll<()> {
        if let (Some(timer), Some(deadline)) = (&mut self.idle, self.session.idle_deadline()) {
            if now >= deadline {
                return Poll::Ready(());
            }
            if timer.deadline() != deadline.into() {
                timer.as_mut().reset(deadline.into());
            }
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }

    /// Delivers what was taken from `from` to the other side, reading its
    /// socket to the end, and waits until the other side's socket has sent
    /// it all (see [`Classified::flush_from`]): ready then, or once the
    /// destination fails or the connection has been idle for
    /// `idle_timeout`. The direction towards `from` is dropped.
    fn poll_flush(
        &mut self,
        cx: &mut Context,
        flush: &mut Flush,
        from: Side,
        (client, backend): (&Socket, &Socket),
    ) -> Poll<()> {
        let (direction, source, to) = match from {
            Side::Client => (&mut self.upstream, client, backend),
            Side::Backend => (&mut self.downstream, backend, client),
        };
        let session = &mut self.session;
        let now = Instant::now();
        if !flush.source_ended {
            match direction.poll(cx, source, to, |n| session.moved(from, n, now)) {
                Poll::Pending => return self.poll_idle(cx, now),
                // Its end, or its failure (reported once: so this may well
                // be what looks like an end).
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(failure)) if failure.side == from => {}
                // The destination failed: nothing more can reach it.
                Poll::Ready(Err(_)) => return Poll::Ready(()),
            }
            flush.source_ended = true;
        }
        match ready_once_sent(cx, to, flush) {
            Ok(Poll::Pending) => self.poll_idle(cx, now),
            Ok(Poll::Ready(())) | Err(_) => Poll::Ready(()),
        }
    }
}

/// Where a flush stands: whether the failed side's socket has come to its
/// end, and whether the destination polls writable only once it has sent
/// everything.
#[derive(Default)]
struct Flush {
    source_ended: bool,
    writable_once_sent: bool,
    /// While the destination's writing side is shut down (writability
    /// says nothing then): when to ask again.
    ask_again: Option<Pin<Box<Sleep>>>,
}

/// How often a flush asks again whether a destination whose writing side
/// is shut down has sent everything.
const ASK_AGAIN: Duration = Duration::from_millis(20);

/// Whether `to` has sent every byte it took, or never will (it was reset):
/// ready then, pending while it has not (woken when it has, or to ask
/// again).
fn ready_once_sent(cx: &mut Context, to: &Socket, flush: &mut Flush) -> io::Result<Poll<()>> {
    if !flush.writable_once_sent {
        if net::unsent(to)? == 0 {
            return Ok(Poll::Ready(()));
        }
        net::writable_once_sent(to)?;
        flush.writable_once_sent = true;
    }
    loop {
        if let Some(sleep) = &mut flush.ask_again {
            if sleep.as_mut().poll(cx).is_pending() {
                return Ok(Poll::Pending);
            }
            flush.ask_again = None;
        }
        let mut ready = match to.poll_write_ready(cx) {
            Poll::Ready(ready) => ready?,
            Poll::Pending => return Ok(Poll::Pending),
        };
        match net::sending(to)? {
            net::Sending::Done | net::Sending::Gone => return Ok(Poll::Ready(())),
            net::Sending::Waiting { shut: false } => {
                ready.clear_ready_matching(tokio::io::Ready::WRITABLE);
            }
            net::Sending::Waiting { shut: true } => {
                flush.ask_again = Some(Box::pin(tokio::time::sleep(ASK_AGAIN)));
            }
        }
    }
}

/// Moves what one direction has to move now, and passes its FIN on once
/// it is finished: `Some` once the connection is over.
fn drive(
    direction: &mut pump::Direction,
    cx: &mut Context,
    (from, to): (&Socket, &Socket),
    session: &mut Session,
    now: Instant,
) -> Result<bool, Failure> {
    let sender = direction.sender();
    if session.passed(sender) {
        return Ok(false);
    }
    let mut moved = 0;
    let done = direction.poll(cx, from, to, |n| moved += n);
    session.moved(sender, moved, now);
    if let Poll::Ready(done) = done {
        done?;
        match session.fin(sender) {
            PassFin::Shutdown => {
                shutdown_write(to).map_err(|e| Failure::new(sender.other(), e))?;
            }
            PassFin::Close { .. } => return Ok(true),
        }
    }
    Ok(false)
}
