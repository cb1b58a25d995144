//! One connection on the ring ([`Conn`]), as its [`Session`] asks:
//! waiting for a PROXY header (its bytes come in provided buffers like any
//! others), dialing (a socket made in the ring, then an io_uring connect
//! with `connect_timeout` as a linked timeout; the next backend of the plan
//! if it fails), relaying (two [`Flow`]s, `flow.rs`), and its end:
//! everything armed on its sockets is cancelled, and once the last
//! completion is in, its sockets are closed through the ring and the
//! session is closed (judged and logged).
//!
//! A connection's slot is freed only once every operation on it has
//! posted its last completion: closing a socket does not cancel what is
//! armed on it, and user data must never point at a reused slot. Should
//! the kernel drop completions (it may, out of memory), that count is
//! wrong: [`Worker::completions_lost`] ends every connection and sweeps
//! their sockets until nothing is in flight, so that no slot leaks.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use io_uring::{cqueue, opcode, squeue, types};
use socket2::{SockAddr, SockRef};
use tracing::debug;

use super::direction::{Flow, Out, Receive};
use super::lost::Sweep;
use super::slab::Generation;
use super::token::{FlowOp, Op, Token};
use super::{close_entry, error_of, Raw, Worker};
use crate::capacity::Slot;
use crate::connection::ending::{Ending, Side};
use crate::connection::relaying::EngineChoice;
use crate::connection::session::{Connected, Session, Step};
use crate::net;
use crate::proxy_protocol;
use crate::snapshot::Route;

/// A connection on the ring.
pub struct Conn {
    pub generation: u32,
    /// Operations whose last completion has not come yet.
    pub pending: u32,
    pub client: OwnedFd,
    pub backend: Option<OwnedFd>,
    pub session: Session,
    /// What came of a PROXY header so far, while one is awaited (a header
    /// split over segments is rare).
    pub header: Vec<u8>,
    /// The connect being made, while dialing.
    pub connecting: Option<Box<Connecting>>,
    /// Indexed by the side the bytes come from: the client's, the
    /// backend's.
    flows: [Flow; 2],
    /// Its deadline among the worker's timers: when its PROXY header is
    /// due, or its idle timeout (as last set; bytes may have moved since).
    pub timer: Option<Instant>,
    /// A failed side's last bytes on their way, before the reset.
    pub flushing: Option<Box<Flushing>>,
    /// Everything on its sockets is being cancelled: it is closed once the
    /// last completion is in.
    pub closing: bool,
    /// After lost completions: a sweep of its sockets under way.
    pub sweep: Option<Sweep>,
}

/// A connection whose failed side's last bytes are on their way, before
/// the reset (`flush.rs`).
pub struct Flushing {
    /// The side that failed: the direction of its bytes goes on.
    pub from: Side,
    /// The destination polls writable only once it has sent everything.
    pub writable_once_sent: bool,
}

/// Where the connect in flight goes, and when it must be done by: the ring
/// reads the address and the timeout when the entries are submitted.
pub struct Connecting {
    pub addr: SockAddr,
    /// `None`: no `connect_timeout`.
    pub deadline: Option<Instant>,
    /// What is left of the time limit, for the linked timeout.
    pub timeout: types::Timespec,
}

impl Generation for Conn {
    fn generation(&self) -> u32 {
        self.generation
    }
}

impl Conn {
    pub fn flow(&self, from: Side) -> &Flow {
        &self.flows[from as usize]
    }

    pub fn flow_mut(&mut self, from: Side) -> &mut Flow {
        &mut self.flows[from as usize]
    }

    /// Its sockets: the client's, and the backend's once it is made.
    pub fn sockets(&self) -> [Option<RawFd>; 2] {
        [self.socket(Side::Client), self.socket(Side::Backend)]
    }

    /// The socket of `side`, once it exists (the backend's only once it is
    /// made).
    pub fn socket(&self, side: Side) -> Option<RawFd> {
        match side {
            Side::Client => Some(self.client.as_raw_fd()),
            Side::Backend => self.backend.as_ref().map(AsRawFd::as_raw_fd),
        }
    }

    /// Whether the direction from `from` was dropped by a flush (it goes
    /// towards the side that failed).
    pub fn dropped(&self, from: Side) -> bool {
        self.flushing
            .as_ref()
            .is_some_and(|flushing| flushing.from != from)
    }
}

impl Worker {
    /// Admits a client accepted from `peer` and starts it on its way.
    pub(super) fn start(
        &mut self,
        client: OwnedFd,
        peer: SocketAddr,
        route: Arc<Route>,
        slot: Slot,
    ) {
        let local = || net::local_addr(&client);
        let opened = Session::open(route, peer, slot, local, self.shared, self.now);
        let (session, step) = match opened {
            Ok(opened) => opened,
            Err(slot) => return drop((client, slot)),
        };
        let (index, _) = self.slab.insert(|generation| Conn {
            generation,
            pending: 0,
            client,
            backend: None,
            session,
            header: Vec::new(),
            connecting: None,
            flows: Default::default(),
            timer: None,
            flushing: None,
            closing: false,
            sweep: None,
        });
        self.step(index, step);
    }

    /// Does what the session of connection `index` asked for.
    pub(super) fn step(&mut self, index: u32, step: Step) {
        let now = self.now;
        let Some(conn) = self.slab.live(index) else {
            return;
        };
        let generation = conn.generation;
        match step {
            Step::ReadHeader { deadline } => {
                self.set_timer(index, Some(deadline));
                self.arm(index, Side::Client);
            }
            Step::Wait { deadline } => {
                self.set_timer(index, Some(deadline));
                self.enqueue(index, generation);
            }
            Step::Connect { addr, timeout } => {
                // The socket is made in the ring; the connect follows once
                // it is there ([`Worker::socket_made`]).
                let domain = match addr {
                    SocketAddr::V4(_) => libc::AF_INET,
                    SocketAddr::V6(_) => libc::AF_INET6,
                };
                conn.connecting = Some(Box::new(Connecting {
                    addr: SockAddr::from(addr),
                    deadline: (!timeout.is_zero()).then(|| now + timeout),
                    timeout: types::Timespec::from(timeout),
                }));
                let entry = opcode::Socket::new(
                    domain,
                    libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    libc::IPPROTO_TCP,
                )
                .build()
                .user_data(Token::new(Op::Socket, index, generation).0);
                self.push_for(index, entry);
                // A client from the queue had its deadline set.
                self.set_timer(index, None);
            }
            Step::Close => self.end(index),
        }
    }

    /// Completions of connection operations.
    pub(super) fn conn_completed(&mut self, token: Token, result: i32, flags: u32) {
        let (op, flow) = token.op();
        let (index, generation) = (token.index(), token.generation());
        // A buffer taken by a receive belongs to the worker whatever
        // became of the connection.
        let buffer = cqueue::buffer_select(flags);
        if buffer.is_some() {
            self.buffers.lend();
        }
        let last =
            !(op == Op::Flow && flow.map(|f| f.0) == Some(FlowOp::Recv) && cqueue::more(flags));
        let Some(conn) = self.slab.of(index, generation) else {
            // Cleanup entries of listeners and of freed connections.
            if let Some(id) = buffer {
                self.buffers.give_back(id);
            }
            return;
        };
        if last {
            conn.pending = conn.pending.saturating_sub(1);
        }
        if op == Op::Sweep {
            return self.swept(index, result);
        }
        if conn.closing {
            if let Some(id) = buffer {
                self.buffers.give_back(id);
            }
            if op == Op::Socket && result >= 0 {
                // Made for an attempt that is not going to happen: closed
                // with the connection.
                // SAFETY: the ring made this descriptor for us alone.
                conn.backend = Some(unsafe { OwnedFd::from_raw_fd(result) });
            }
            if conn.pending == 0 && conn.sweep.is_none() {
                self.finish(index);
            }
            return;
        }
        if let (Op::Flow, Some((kind, from))) = (op, flow) {
            if conn.dropped(from) {
                return self.dropped_completed(index, from, kind, last, buffer);
            }
        }
        match (op, flow) {
            (Op::Socket, _) => self.socket_made(index, result),
            (Op::Connect, _) => self.connected(index, result),
            // A kernel without socket commands in the ring (before 6.7):
            // from now on, plain system calls.
            (Op::SocketOption, _) if result < 0 && self.ring_socket_options => {
                self.ring_socket_options = false;
                if let Some(backend) = &conn.backend {
                    if let Err(e) = net::relay_options(backend) {
                        debug!("socket options of a backend socket: {e}");
                    }
                }
            }
            (Op::Flow, Some((FlowOp::Recv, from))) => {
                self.received(index, from, result, last, buffer)
            }
            (Op::Flow, Some((FlowOp::Send, from))) => self.sent(index, from, result),
            (Op::Flow, Some((FlowOp::Readable, from))) => self.readable(index, from, result),
            (Op::Flow, Some((FlowOp::Writable, from))) => self.writable(index, from, result),
            // A linked timeout or a cancel: counted above.
            _ => {}
        }
    }

    /// Queues an operation of connection `index`, counted until its last
    /// completion.
    pub(super) fn push_for(&mut self, index: u32, entry: squeue::Entry) {
        let Some(conn) = self.slab.live(index) else {
            return;
        };
        conn.pending += 1;
        self.push(entry);
    }

    /// The socket for the connect to come was made (`result` is its
    /// descriptor) or not: connect it, or try the next backend.
    fn socket_made(&mut self, index: u32, result: i32) {
        let (now, shared) = (self.now, self.shared);
        let ring_socket_options = self.ring_socket_options;
        let Some(conn) = self.slab.live(index) else {
            return;
        };
        if result < 0 {
            // Out of descriptors, say: the plan gives up at once.
            conn.connecting = None;
            let step = conn.session.connect_failed(error_of(result), shared, now);
            return self.step(index, step);
        }
        let generation = conn.generation;
        // SAFETY: the ring made this descriptor for us alone.
        let socket = unsafe { OwnedFd::from_raw_fd(result) };
        let fd = socket.as_raw_fd();
        if !ring_socket_options {
            if let Err(e) = net::relay_options(&socket) {
                debug!("socket options of a backend socket: {e}");
            }
        }
        conn.backend = Some(socket);
        let addr = &conn.connecting.as_ref().expect("dialing").addr;
        let connect = opcode::Connect::new(types::Fd(fd), addr.as_ptr().cast(), addr.len())
            .build()
            .user_data(Token::new(Op::Connect, index, generation).0);
        // The relay options, set in the ring before the connect is issued.
        if ring_socket_options {
            static ONE: libc::c_int = 1;
            for (level, option) in [
                (libc::IPPROTO_TCP, libc::TCP_NODELAY),
                (libc::SOL_SOCKET, libc::SO_OOBINLINE),
            ] {
                let entry = opcode::SetSockOpt::new(
                    types::Fd(fd),
                    level as u32,
                    option as u32,
                    (&ONE as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                )
                .build()
                .user_data(Token::new(Op::SocketOption, index, generation).0);
                self.push_for(index, entry);
            }
        }
        self.push_limited(index, connect);
    }

    /// Queues `entry`, the connect or the wait for its outcome, with what
    /// is left of the pool's `connect_timeout` as a linked timeout: one
    /// limit for the whole dial, however many waits it takes.
    fn push_limited(&mut self, index: u32, entry: squeue::Entry) {
        let now = self.now;
        let Some(conn) = self.slab.live(index) else {
            return;
        };
        let generation = conn.generation;
        let Some(connecting) = conn.connecting.as_mut() else {
            return;
        };
        let Some(deadline) = connecting.deadline else {
            return self.push_for(index, entry);
        };
        // Spent already: the link times out at once.
        connecting.timeout = types::Timespec::from(deadline.saturating_duration_since(now));
        let timeout = opcode::LinkTimeout::new(&connecting.timeout)
            .build()
            .user_data(Token::new(Op::ConnectTimeout, index, generation).0);
        conn.pending += 2;
        self.push_linked(entry, timeout);
    }

    /// The connect in flight ended.
    fn connected(&mut self, index: u32, result: i32) {
        let (now, shared) = (self.now, self.shared);
        let Some(conn) = self.slab.live(index) else {
            return;
        };
        if conn.connecting.is_none() {
            return;
        }
        let backend = conn.backend.as_ref().expect("a connect in flight");
        let result = match -result {
            // A connect that io_uring retried on a non-blocking socket can
            // report the handshake as still under way (seen under a storm
            // of connects): wait for its outcome instead.
            libc::EINPROGRESS | libc::EALREADY => {
                let entry =
                    opcode::PollAdd::new(types::Fd(backend.as_raw_fd()), libc::POLLOUT as u32)
                        .build()
                        .user_data(Token::new(Op::Connect, index, conn.generation).0);
                return self.push_limited(index, entry);
            }
            // That wait ended (a poll mask): the socket says how. A reset
            // as soon as the backend accepted means it did accept: the
            // relay meets the reset (the socket reports it once, so it is
            // kept for the relay).
            _ if result > 0 => match SockRef::from(backend).take_error() {
                Ok(Some(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                    conn.flow_mut(Side::Backend).failed = Some(-libc::ECONNRESET);
                    0
                }
                Ok(None) => 0,
                Ok(Some(e)) | Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
            },
            _ => result,
        };
        conn.connecting = None;
        if result < 0 {
            let error = match -result {
                // The linked timeout fired.
                libc::ECANCELED => io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
                errno => io::Error::from_raw_os_error(errno),
            };
            let socket = conn.backend.take().expect("a connect in flight");
            let step = conn.session.connect_failed(error, shared, now);
            self.push(close_entry(socket.into_raw_fd()));
            return self.step(index, step);
        }
        let Connected {
            engine,
            proxy_header,
        } = conn.session.connected(shared, now);
        if let Some(header) = proxy_header {
            // Nothing the client sent has left: it all waits in the backlog.
            let up = conn.flow_mut(Side::Client);
            debug_assert!(matches!(up.out, Out::Idle));
            up.backlog.push_front(header.into_vec(), true);
        }
        for flow in &mut conn.flows {
            flow.engine = EngineChoice::new(engine);
        }
        // The idle timeout replaces the PROXY header's deadline.
        let idle = conn.session.idle_deadline();
        self.set_timer(index, idle);
        self.pump(index, Side::Client);
        self.pump(index, Side::Backend);
    }

    /// Bytes of the PROXY header came: judge what there is so far.
    pub(super) fn header_came(&mut self, index: u32) {
        let (now, shared) = (self.now, self.shared);
        let Some(conn) = self.slab.live(index) else {
            return;
        };
        if !conn.session.awaits_header() {
            return;
        }
        match proxy_protocol::parse_header(&conn.header) {
            // More must come: a receive that ended with these bytes (its
            // last completion can carry data) is armed again.
            Ok(None) => {
                if conn.flow(Side::Client).receive == Receive::Idle {
                    self.arm(index, Side::Client);
                }
            }
            Err(e) => self.header_failed(index, &e),
            Ok(Some((length, carried))) => {
                let local = || net::local_addr(&conn.client);
                let step = conn.session.header(Ok(carried), local, shared, now);
                // What came after the header, and what comes next, waits
                // for the backend.
                let header = std::mem::take(&mut conn.header);
                conn.flow_mut(Side::Client)
                    .backlog
                    .push(&header[length..], false);
                self.cancel_receive(index, Side::Client);
                self.step(index, step);
            }
        }
    }

    /// The PROXY header awaited cannot be read, for `why`.
    pub(super) fn header_failed(&mut self, index: u32, why: &dyn std::fmt::Display) {
        let (now, shared) = (self.now, self.shared);
        let Some(conn) = self.slab.live(index) else {
            return;
        };
        let local = || net::local_addr(&conn.client);
        let step = conn.session.header(Err(why), local, shared, now);
        self.step(index, step);
    }

    /// A deadline of connection `index` came: its PROXY header's, its idle
    /// timeout's, or (after lost completions) the next sweep's.
    pub(super) fn deadline(&mut self, index: u32) {
        let now = self.now;
        let Some(conn) = self.slab.live(index) else {
            return;
        };
        if conn.closing {
            return self.sweep(index);
        }
        if conn.session.header_deadline().is_some() {
            let step = conn.session.header_late(now);
            return self.step(index, step);
        }
        if let Some(due) = conn.session.wait_deadline() {
            if now < due {
                return self.set_timer(index, Some(due));
            }
            let step = conn.session.wait_over(now);
            return self.step(index, step);
        }
        let idle = conn.session.idle_deadline();
        let asking = conn.flushing.as_ref().is_some_and(|flushing| {
            matches!(conn.flow(flushing.from).out, Out::Unsent { polling: false })
        });
        if asking && idle.is_none_or(|due| now < due) {
            // A flush asks again whether its destination has sent all.
            return self.flushed(index);
        }
        // Only a relaying connection has one.
        let Some(due) = idle else {
            return;
        };
        if now < due {
            return self.set_timer(index, Some(due));
        }
        let stalled = conn.flows.iter().any(Flow::holding);
        conn.session.end(Ending::Idle { stalled });
        self.end(index);
    }

    /// Every connection ends now, with `ending`: `shutdown_timeout` ran
    /// out, or the kernel lost completions.
    pub(super) fn close_all(&mut self, ending: fn() -> Ending<'static>) {
        for index in 0..self.slab.end() {
            if let Some(conn) = self.slab.live(index).filter(|conn| !conn.closing) {
                conn.session.end(ending());
                self.end(index);
            }
        }
    }

    /// `side` failed with `error`: the connection ends, both sides reset
    /// (once what it took from `side` is delivered: [`Worker::flush`]).
    pub(super) fn fail(&mut self, index: u32, side: Side, error: io::Error) {
        if self.failed_while_flushing(index, side) {
            return;
        }
        let Some(conn) = self.slab.live(index) else {
            return;
        };
        conn.session.end(Ending::Failed {
            side,
            error: &error,
        });
        self.end(index);
    }

    /// Ends connection `index` as its session says it ended (nothing to
    /// say if it was turned away): everything armed on its sockets is
    /// cancelled, and once the last completion is in it is closed and
    /// logged ([`Worker::finish`]). A reset that must deliver the failed
    /// side's bytes first waits for them ([`Worker::flush`]); a connection
    /// already flushing ends at once.
    pub(super) fn end(&mut self, index: u32) {
        let Some(conn) = self.slab.live(index) else {
            return;
        };
        if conn.closing {
            return;
        }
        let ending = conn.session.ending().map(|how| (how.reset, how.flush_from));
        let flushing = conn.flushing.take().is_some();
        if let (false, Some((_, Some(from)))) = (flushing, ending) {
            if self.flush(index, from) {
                return;
            }
        }
        let conn = self.slab.live(index).expect("live above");
        if ending.is_some_and(|(reset, _)| reset) {
            // What the sockets took and have not sent is lost with the
            // reset: the log counts what was delivered.
            for from in [Side::Client, Side::Backend] {
                if let Some(to) = conn.socket(from.other()) {
                    let unsent = net::unsent(&Raw(to)).unwrap_or(0);
                    conn.session.undelivered(from, unsent);
                }
            }
            net::abort(&conn.client);
            if let Some(backend) = &conn.backend {
                net::abort(backend);
            }
        }
        conn.closing = true;
        if conn.pending == 0 {
            return self.finish(index);
        }
        // No deadline of its own any more (only a sweep, after lost
        // completions, sets one now).
        self.set_timer(index, None);
        self.cancel_all(index, Op::Cleanup);
    }

    /// Cancels everything armed on the sockets of connection `index`, the
    /// cancels' user data naming `op`.
    pub(super) fn cancel_all(&mut self, index: u32, op: Op) {
        let Some(conn) = self.slab.live(index) else {
            return;
        };
        let generation = conn.generation;
        for fd in conn.sockets().into_iter().flatten() {
            let entry = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
                .build()
                .user_data(Token::new(op, index, generation).0);
            self.push_for(index, entry);
        }
    }

    /// Nothing is pending on connection `index` any more: close its
    /// sockets, then its session (which frees its places, judges and
    /// logs it).
    pub(super) fn finish(&mut self, index: u32) {
        self.set_timer(index, None);
        let conn = self.slab.remove(index);
        let Conn {
            client,
            backend,
            session,
            flows,
            ..
        } = *conn;
        for flow in flows {
            if let Out::Lent { id, .. } = flow.out {
                self.buffers.give_back(id);
            }
        }
        self.push(close_entry(client.into_raw_fd()));
        if let Some(backend) = backend {
            self.push(close_entry(backend.into_raw_fd()));
        }
        session.close(self.shared, self.now);
        // Its place at its backend is free: a client in a queue may take it.
        self.waiting.wake();
        debug!(index, "connection closed");
    }
}
