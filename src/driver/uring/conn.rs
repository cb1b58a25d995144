//! One connection on the ring, as its [`Session`] asks: waiting for a
//! PROXY header (its bytes come in provided buffers like any others),
//! dialing (a socket made in the ring, then an io_uring connect with
//! `connect_timeout` as a linked timeout; the next backend of the plan if
//! it fails), relaying (two [`Flow`](super::state::Flow)s), and its end:
//! everything armed on its sockets is cancelled, and once the last
//! completion is in, its sockets are closed through the ring and the
//! session is closed (judged and logged).
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use io_uring::{cqueue, opcode, types};
use socket2::{SockAddr, SockRef};
use tracing::debug;

use super::state::{error_of, source_side, Conn, Connecting, Flow, DOWN, UP};
use super::{close_entry, FlowOp, Op, Token, Worker};
use crate::capacity::Slot;
use crate::connection::ending::{self, Classified, Ending, Side};
use crate::connection::relaying::EngineChoice;
use crate::connection::session::{Connected, Session, Step};
use crate::net;
use crate::proxy_protocol;
use crate::snapshot::Route;

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
        let (session, step) = match Session::open(route, peer, slot, local, self.shared) {
            Ok(opened) => opened,
            Err(slot) => return drop((client, slot)),
        };
        let (index, generation) = self.take_slot();
        self.conns[index as usize] = Some(Conn {
            generation,
            pending: 0,
            client,
            backend: None,
            session,
            header: Vec::new(),
            connecting: None,
            timer: None,
            flushing: None,
            flows: Default::default(),
            ending: None,
        });
        self.step(index, step);
    }

    /// Does what the session of connection `index` asked for.
    fn step(&mut self, index: u32, step: Step) {
        let Some(conn) = self.conns[index as usize].as_mut() else {
            // Finished already, by an earlier step of this turn.
            return;
        };
        let generation = conn.generation;
        match step {
            Step::ReadHeader { deadline } => {
                self.set_timer(index, Some(deadline));
                self.arm(index, UP);
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
                    limited: !timeout.is_zero(),
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
            }
            Step::Close => self.end(index, None),
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
        let Some(conn) = super::live(&mut self.conns, index, generation) else {
            // Cleanup entries of listeners and of freed connections.
            if let Some(id) = buffer {
                self.buffers.give_back(id);
            }
            return;
        };
        if last {
            conn.pending -= 1;
        }
        if conn.ending.is_some() {
            if let Some(id) = buffer {
                self.buffers.give_back(id);
            }
            if op == Op::Socket && result >= 0 {
                // Made for an attempt that is not going to happen: closed
                // with the connection.
                // SAFETY: the ring made this descriptor for us alone.
                conn.backend = Some(unsafe { OwnedFd::from_raw_fd(result) });
            }
            if conn.pending == 0 {
                self.finish(index);
            }
            return;
        }
        if let (Op::Flow, Some((kind, f))) = (op, flow) {
            if self.dropped(index, f, kind, last, buffer) {
                return;
            }
        }
        match (op, flow) {
            (Op::Socket, _) => self.socket_made(index, result),
            (Op::Connect, _) => self.connected(index, result),
            // A kernel without socket commands in the ring (before 6.7):
            // from now on, plain system calls.
            (Op::SocketOption, _) if result < 0 && self.ring_socket_options => {
                self.ring_socket_options = false;
                let conn = self.conns[index as usize].as_ref().expect("checked above");
                if let Some(backend) = &conn.backend {
                    if let Err(e) = net::relay_options(backend) {
                        debug!("socket options of a backend socket: {e}");
                    }
                }
            }
            (Op::Flow, Some((FlowOp::Recv, f))) => self.received(index, f, result, last, buffer),
            (Op::Flow, Some((FlowOp::Send, f))) => self.sent(index, f, result),
            (Op::Flow, Some((FlowOp::Readable, f))) => {
                let conn = self.conns[index as usize].as_mut().expect("checked above");
                conn.flows[f].armed = false;
                match result {
                    r if r >= 0 => self.splice_from(index, f),
                    r if -r == libc::ECANCELED => self.pump(index, f),
                    r => self.fail(index, source_side(f), error_of(r)),
                }
            }
            (Op::Flow, Some((FlowOp::Writable, f))) => {
                let conn = self.conns[index as usize].as_mut().expect("checked above");
                conn.flows[f].sending = false;
                match result {
                    r if r >= 0 => {
                        if self.drain_pipe(index, f) {
                            self.pump(index, f);
                        }
                    }
                    r => self.fail(index, source_side(f).other(), error_of(r)),
                }
            }
            // A linked timeout or a cancel: counted above.
            _ => {}
        }
    }

    /// Queues an operation of connection `index`, counted until its last
    /// completion.
    pub(super) fn push_for(&mut self, index: u32, entry: io_uring::squeue::Entry) {
        let Some(conn) = self.conns[index as usize].as_mut() else {
            // Finished already, by an earlier step of this turn.
            return;
        };
        conn.pending += 1;
        self.push(entry);
    }

    /// The socket for the connect to come was made (`result` is its
    /// descriptor) or not: connect it, or try the next backend.
    pub(super) fn socket_made(&mut self, index: u32, result: i32) {
        let Some(conn) = self.conns[index as usize].as_mut() else {
            // Finished already, by an earlier step of this turn.
            return;
        };
        if result < 0 {
            // Out of descriptors, say: the plan gives up at once.
            conn.connecting = None;
            let step = conn.session.connect_failed(error_of(result), self.shared);
            return self.step(index, step);
        }
        let generation = conn.generation;
        // SAFETY: the ring made this descriptor for us alone.
        let socket = unsafe { OwnedFd::from_raw_fd(result) };
        let fd = socket.as_raw_fd();
        if !self.ring_socket_options {
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
        if self.ring_socket_options {
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

    /// Queues `entry`, the connect or the wait for its outcome, with the
    /// pool's `connect_timeout` as a linked timeout.
    fn push_limited(&mut self, index: u32, entry: io_uring::squeue::Entry) {
        let Some(conn) = self.conns[index as usize].as_mut() else {
            // Finished already, by an earlier step of this turn.
            return;
        };
        let generation = conn.generation;
        let Some(connecting) = &conn.connecting else {
            return;
        };
        if !connecting.limited {
            return self.push_for(index, entry);
        }
        let timeout = opcode::LinkTimeout::new(&connecting.timeout)
            .build()
            .user_data(Token::new(Op::ConnectTimeout, index, generation).0);
        self.reserve(2);
        self.push_for(index, entry.flags(io_uring::squeue::Flags::IO_LINK));
        self.push_for(index, timeout);
    }

    /// The connect in flight ended.
    pub(super) fn connected(&mut self, index: u32, result: i32) {
        let shared = self.shared;
        let Some(conn) = self.conns[index as usize].as_mut() else {
            // Finished already, by an earlier step of this turn.
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
            // That wait ended (a poll mask): the socket says how.
            _ if result > 0 => match SockRef::from(backend).take_error() {
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
            let step = conn.session.connect_failed(error, shared);
            self.push(close_entry(socket.into_raw_fd()));
            return self.step(index, step);
        }
        let Connected {
            engine,
            proxy_header,
        } = conn.session.connected(shared);
        if let Some(header) = proxy_header {
            // Nothing the client sent has left: it all waits in the backlog.
            debug_assert!(conn.flows[UP].lent.is_none() && !conn.flows[UP].sending);
            conn.flows[UP].backlog.push_front(header.into_vec(), true);
        }
        for flow in &mut conn.flows {
            flow.engine = EngineChoice::new(engine);
        }
        // The idle timeout replaces the PROXY header's deadline.
        let idle = conn.session.idle_deadline();
        self.set_timer(index, idle);
        self.pump(index, UP);
        self.pump(index, DOWN);
    }

    /// Bytes of the PROXY header came: judge what there is so far.
    pub(super) fn header_came(&mut self, index: u32) {
        let Some(conn) = self.conns[index as usize].as_mut() else {
            // Finished already, by an earlier step of this turn.
            return;
        };
        if !conn.session.awaits_header() {
            return;
        }
        match proxy_protocol::parse_header(&conn.header) {
            // More must come: a receive that ended with these bytes (its
            // last completion can carry data) is armed again.
            Ok(None) => {
                let flow = &conn.flows[UP];
                if !flow.armed && !flow.starved && !flow.eof {
                    self.arm(index, UP);
                }
            }
            Err(e) => self.header_failed(index, &e),
            Ok(Some((length, carried))) => {
                let local = || net::local_addr(&conn.client);
                let step = conn.session.header(Ok(carried), local, self.shared);
                // What came after the header, and what comes next, waits
                // for the backend.
                let header = std::mem::take(&mut conn.header);
                conn.flows[UP].backlog.push(&header[length..], false);
                self.cancel_receive(index, UP);
                self.step(index, step);
            }
        }
    }

    /// The PROXY header awaited cannot be read, for `why`.
    pub(super) fn header_failed(&mut self, index: u32, why: &dyn std::fmt::Display) {
        let conn = self.conns[index as usize]
            .as_mut()
            .expect("a live connection");
        let local = || net::local_addr(&conn.client);
        let step = conn.session.header(Err(why), local, self.shared);
        self.step(index, step);
    }

    /// A deadline of connection `index` came: its PROXY header's, or its
    /// idle timeout's.
    pub(super) fn deadline(&mut self, index: u32, now: Instant) {
        let Some(conn) = self.conns[index as usize].as_mut() else {
            return;
        };
        if conn.ending.is_some() {
            return;
        }
        if let Some(deadline) = conn.session.header_deadline() {
            if now >= deadline {
                let step = conn.session.header_late();
                self.step(index, step);
            }
            return;
        }
        // Only a relaying connection has one.
        let Some(due) = conn.session.idle_deadline() else {
            return;
        };
        if now < due {
            return self.set_timer(index, Some(due));
        }
        let stalled = conn.flows.iter().any(Flow::holding);
        self.end(index, Some(ending::classify(&Ending::Idle { stalled })));
    }

    /// `shutdown_timeout` ran out: every connection ends now.
    pub(super) fn close_all(&mut self) {
        for index in 0..self.conns.len() as u32 {
            if self.conns[index as usize]
                .as_ref()
                .is_some_and(|c| c.ending.is_none())
            {
                self.end(index, Some(ending::classify(&Ending::Shutdown)));
            }
        }
    }

    /// `side` failed with `error`: the connection ends, both sides reset
    /// (once what it took from `side` is delivered: [`Worker::flush`]).
    pub(super) fn fail(&mut self, index: u32, side: Side, error: io::Error) {
        if self.failed_while_flushing(index, side) {
            return;
        }
        self.end(
            index,
            Some(ending::classify(&Ending::Failed {
                side,
                error: &error,
            })),
        );
    }

    /// Ends connection `index`: everything armed on its sockets is
    /// cancelled, and once the last completion is in it is closed and
    /// logged ([`Worker::finish`]). `how` is `None` when it was turned away
    /// (logged already). A reset that must deliver the failed side's bytes
    /// first waits for them ([`Worker::flush`]); a connection flushing
    /// ends at once, whatever `how`, for the reason the flush began with.
    pub(super) fn end(&mut self, index: u32, how: Option<Classified>) {
        let Some(conn) = self.conns[index as usize].as_mut() else {
            // Finished already, by an earlier step of this turn.
            return;
        };
        if conn.ending.is_some() {
            return;
        }
        let how = match (conn.flushing.take(), how) {
            (Some(flushing), _) => Some(flushing.how),
            (None, Some(how)) => match self.flush(index, how) {
                Some(how) => Some(how),
                None => return,
            },
            (None, None) => None,
        };
        let conn = self.conns[index as usize].as_mut().expect("live above");
        let generation = conn.generation;
        if how.as_ref().is_some_and(|c| c.reset) {
            // What the sockets took and have not sent is lost with the
            // reset: the log counts what was delivered.
            for f in [UP, DOWN] {
                if let Some(to) = conn.destination(f) {
                    let unsent = net::unsent(&super::flow::borrowed(to)).unwrap_or(0);
                    conn.session.undelivered(source_side(f), unsent);
                }
            }
            net::abort(&conn.client);
            if let Some(backend) = &conn.backend {
                net::abort(backend);
            }
        }
        conn.ending = Some(how);
        // The client's socket and the backend's, if there is one yet.
        let fds = [conn.source(UP), conn.source(DOWN)];
        if conn.pending == 0 {
            return self.finish(index);
        }
        for fd in fds.into_iter().flatten() {
            let entry = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
                .build()
                .user_data(Token::new(Op::Cleanup, index, generation).0);
            self.push_for(index, entry);
        }
    }

    /// Nothing is pending on connection `index` any more: close its
    /// sockets, then its session (which frees its places, judges and
    /// logs it).
    pub(super) fn finish(&mut self, index: u32) {
        self.set_timer(index, None);
        let conn = self.conns[index as usize]
            .take()
            .expect("a live connection");
        self.free.push(index);
        let Conn {
            client,
            backend,
            session,
            flows,
            ending,
            ..
        } = conn;
        for flow in flows {
            if let Some((id, _)) = flow.lent {
                self.buffers.give_back(id);
            }
        }
        self.push(close_entry(client.into_raw_fd()));
        if let Some(backend) = backend {
            self.push(close_entry(backend.into_raw_fd()));
        }
        session.close(ending.flatten().as_ref(), self.shared);
        debug!(index, "connection closed");
    }
}
