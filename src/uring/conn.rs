//! One connection on the ring, through its stages: waiting for a PROXY
//! header (its bytes come in provided buffers like any others), dialing
//! (an io_uring connect with `connect_timeout` as a linked timeout, and
//! retries along the client's preference order), relaying (two
//! [`Flow`](super::state::Flow)s), and its end: everything armed on its
//! sockets is cancelled, and once the last completion is in, its sockets
//! are closed through the ring and it is judged and logged.
use std::borrow::Cow;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use io_uring::{cqueue, opcode, types};
use socket2::{SockAddr, SockRef};
use tracing::debug;

use super::state::{
    error_of, source_side, Conn, Dialing, Flow, HeaderWait, Relaying, Stage, DOWN, UP,
};
use super::{close_entry, FlowOp, Op, Token, Worker};
use crate::capacity::Slot;
use crate::connection::admit::{self, Admitted};
use crate::connection::dial::{Dialer, Next};
use crate::connection::ending::{self, Classified, Ending, Side};
use crate::connection::relaying::{EngineChoice, Halves};
use crate::connection::{judge, log_closed, Bytes};
use crate::net;
use crate::proxy_protocol::{self, Carried};
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
        let accepted = Instant::now();
        let Some(Admitted {
            lease,
            header_within,
        }) = admit::admit(&route, peer, accepted)
        else {
            return;
        };
        let (index, generation) = self.take_slot();
        let stage = match header_within {
            Some(within) => Stage::Header(Box::new(HeaderWait {
                route: route.clone(),
                within,
                deadline: accepted + within,
                bytes: Vec::new(),
            })),
            None => Stage::Bare,
        };
        self.conns[index as usize] = Some(Conn {
            generation,
            pending: 0,
            client,
            backend: None,
            stage,
            flows: Default::default(),
            peer,
            client_addr: peer,
            accepted,
            listener: route.listener.clone(),
            _lease: lease,
            _slot: slot,
            idle_timeout: None,
            last_moved: accepted,
            halves: Halves::default(),
            ending: None,
        });
        match header_within {
            Some(within) => {
                self.add_timer(accepted + within, index, generation);
                self.arm(index, UP);
            }
            None => self.dial(index, route, None),
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
        match (op, flow) {
            (Op::Socket, _) => self.socket_made(index, result),
            (Op::Connect, _) => self.connected(index, result),
            // A kernel without socket commands in the ring (before 6.7).
            (Op::NoDelay, _) if result < 0 => {
                let conn = self.conns[index as usize].as_ref().expect("checked above");
                if let Some(backend) = &conn.backend {
                    if let Err(e) = SockRef::from(backend).set_nodelay(true) {
                        debug!("TCP_NODELAY on a backend socket: {e}");
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

    /// Loads the pool of `route` and makes the first connect; `carried` is
    /// what a PROXY header said.
    pub(super) fn dial(&mut self, index: u32, route: Arc<Route>, carried: Carried) {
        let Some(conn) = self.conns[index as usize].as_mut() else {
            // Finished already, by an earlier step of this turn.
            return;
        };
        let client = &conn.client;
        let local = || {
            SockRef::from(client)
                .local_addr()
                .and_then(|a| a.as_socket().ok_or_else(|| io::Error::other("not TCP/IP")))
        };
        let Some(dialer) = Dialer::new(
            &route,
            (conn.client_addr, conn.peer),
            carried,
            local,
            self.shared,
            conn.accepted,
        ) else {
            conn.stage = Stage::Bare;
            return self.end(index, None);
        };
        let timeout = types::Timespec::from(dialer.connect_timeout());
        conn.stage = Stage::Dialing(Box::new(Dialing {
            route,
            dialer,
            attempt: None,
            // Set before each connect.
            addr: SockAddr::from(conn.peer),
            timeout,
        }));
        self.connect_next(index);
    }

    /// Connects to the next backend of the plan, or gives up.
    pub(super) fn connect_next(&mut self, index: u32) {
        let Some(conn) = self.conns[index as usize].as_mut() else {
            // Finished already, by an earlier step of this turn.
            return;
        };
        let generation = conn.generation;
        let Stage::Dialing(dialing) = &mut conn.stage else {
            return;
        };
        let Some(attempt) = dialing.dialer.next_attempt() else {
            let Stage::Dialing(dialing) = std::mem::replace(&mut conn.stage, Stage::Bare) else {
                unreachable!("dialing above")
            };
            dialing
                .dialer
                .give_up(&dialing.route, conn.peer, conn.accepted);
            return self.end(index, None);
        };
        // The socket is made in the ring; the connect follows once it is
        // there ([`Worker::socket_made`]).
        let domain = match attempt.addr {
            SocketAddr::V4(_) => libc::AF_INET,
            SocketAddr::V6(_) => libc::AF_INET6,
        };
        dialing.addr = SockAddr::from(attempt.addr);
        dialing.attempt = Some(attempt);
        let entry = opcode::Socket::new(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::IPPROTO_TCP,
        )
        .build()
        .user_data(Token::new(Op::Socket, index, generation).0);
        self.push_for(index, entry);
    }

    /// The socket for the attempt in flight was made (`result` is its
    /// descriptor) or not: connect it, or try the next backend.
    pub(super) fn socket_made(&mut self, index: u32, result: i32) {
        let shared = self.shared;
        let Some(conn) = self.conns[index as usize].as_mut() else {
            // Finished already, by an earlier step of this turn.
            return;
        };
        let generation = conn.generation;
        let Stage::Dialing(dialing) = &mut conn.stage else {
            return;
        };
        if result < 0 {
            // Out of descriptors, say: the plan gives up at once.
            let attempt = dialing.attempt.take().expect("a socket in the making");
            let _: Next = dialing
                .dialer
                .failed(attempt, error_of(result), &dialing.route, shared);
            return self.connect_next(index);
        }
        // SAFETY: the ring made this descriptor for us alone.
        let socket = unsafe { OwnedFd::from_raw_fd(result) };
        let fd = socket.as_raw_fd();
        conn.backend = Some(socket);
        let connect = opcode::Connect::new(
            types::Fd(fd),
            dialing.addr.as_ptr().cast(),
            dialing.addr.len(),
        )
        .build()
        .user_data(Token::new(Op::Connect, index, generation).0);
        // A balancer must not add Nagle delays to request/response
        // traffic. Set in the ring, before the connect is issued.
        static ONE: libc::c_int = 1;
        let no_delay = opcode::SetSockOpt::new(
            types::Fd(fd),
            libc::IPPROTO_TCP as u32,
            libc::TCP_NODELAY as u32,
            (&ONE as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
        .build()
        .user_data(Token::new(Op::NoDelay, index, generation).0);
        self.push_for(index, no_delay);
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
        let Stage::Dialing(dialing) = &conn.stage else {
            return;
        };
        if dialing.dialer.connect_timeout().is_zero() {
            return self.push_for(index, entry);
        }
        let timeout = opcode::LinkTimeout::new(&dialing.timeout)
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
        let Stage::Dialing(dialing) = &mut conn.stage else {
            return;
        };
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
        let attempt = dialing.attempt.take().expect("a connect in flight");
        if result < 0 {
            let error = match -result {
                // The linked timeout fired.
                libc::ECANCELED => io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
                errno => io::Error::from_raw_os_error(errno),
            };
            if let Some(socket) = conn.backend.take() {
                self.push(close_entry(socket.into_raw_fd()));
            }
            let Some(conn) = self.conns[index as usize].as_mut() else {
                // Finished already, by an earlier step of this turn.
                return;
            };
            let Stage::Dialing(dialing) = &mut conn.stage else {
                unreachable!()
            };
            // Both outcomes go on: a retry, or giving up when the plan is
            // empty.
            let _: Next = dialing
                .dialer
                .failed(attempt, error, &dialing.route, shared);
            return self.connect_next(index);
        }
        let dialed = dialing.dialer.connected(attempt, shared);
        if let Some(header) = dialing.dialer.proxy_header() {
            // Nothing the client sent has left: it all waits in the backlog.
            debug_assert!(conn.flows[UP].lent.is_none() && !conn.flows[UP].sending);
            conn.flows[UP].backlog.push_front(header.to_vec(), true);
        }
        let stats = dialed.stats.route(&conn.listener).cloned();
        if let Some(stats) = &stats {
            stats.connections.increment(1);
            stats.active.increment(1.0);
        }
        for (f, flow) in conn.flows.iter_mut().enumerate() {
            flow.engine = EngineChoice::new(dialed.engine);
            let counter = stats
                .as_ref()
                .map(|s| if f == UP { &s.to_backend } else { &s.to_client });
            flow.bytes = Some(Bytes::new(counter));
        }
        conn.idle_timeout = dialed.idle_timeout;
        // Waiting for a PROXY header or a backend is not idleness.
        conn.last_moved = Instant::now();
        let generation = conn.generation;
        if let Some(limit) = conn.idle_timeout {
            self.add_timer(Instant::now() + limit, index, generation);
        }
        let Some(conn) = self.conns[index as usize].as_mut() else {
            // Finished already, by an earlier step of this turn.
            return;
        };
        conn.stage = Stage::Relaying(Box::new(Relaying { dialed, stats }));
        self.pump(index, UP);
        self.pump(index, DOWN);
    }

    /// Bytes of the PROXY header came: judge what there is so far.
    pub(super) fn header_came(&mut self, index: u32) {
        let Some(conn) = self.conns[index as usize].as_mut() else {
            // Finished already, by an earlier step of this turn.
            return;
        };
        let Stage::Header(wait) = &mut conn.stage else {
            return;
        };
        match proxy_protocol::parse_header(&wait.bytes) {
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
                let Some(client) =
                    admit::admit_header(&wait.route, conn.peer, Ok(carried), conn.accepted)
                else {
                    return self.end(index, None);
                };
                conn.client_addr = client;
                // What came after the header, and what comes next, waits
                // for the backend.
                conn.flows[UP].backlog.push(&wait.bytes[length..], false);
                let route = wait.route.clone();
                conn.stage = Stage::Bare;
                self.cancel_receive(index, UP);
                self.dial(index, route, carried);
            }
        }
    }

    pub(super) fn header_failed(&mut self, index: u32, why: &dyn std::fmt::Display) {
        let conn = self.conns[index as usize]
            .as_ref()
            .expect("a live connection");
        if let Stage::Header(wait) = &conn.stage {
            admit::admit_header(&wait.route, conn.peer, Err(why), conn.accepted);
        }
        self.end(index, None);
    }

    /// A deadline of connection `index` came: its PROXY header's, or its
    /// idle timeout's.
    pub(super) fn deadline(&mut self, index: u32, generation: u32, now: Instant) {
        let Some(conn) = self.conn(index, generation) else {
            return;
        };
        if conn.ending.is_some() {
            return;
        }
        match &conn.stage {
            Stage::Header(wait) if now >= wait.deadline => {
                let why = admit::header_too_late(wait.within);
                self.header_failed(index, &why);
            }
            Stage::Relaying(_) => {
                let Some(limit) = conn.idle_timeout else {
                    return;
                };
                let due = conn.last_moved + limit;
                if now < due {
                    return self.add_timer(due, index, generation);
                }
                let stalled = conn.flows.iter().any(Flow::holding);
                self.end(index, Some(ending::classify(&Ending::Idle { stalled })));
            }
            _ => {}
        }
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

    /// `side` failed with `error`: the connection ends, both sides reset.
    pub(super) fn fail(&mut self, index: u32, side: Side, error: io::Error) {
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
    /// (logged already).
    pub(super) fn end(&mut self, index: u32, how: Option<Classified>) {
        let Some(conn) = self.conns[index as usize].as_mut() else {
            // Finished already, by an earlier step of this turn.
            return;
        };
        if conn.ending.is_some() {
            return;
        }
        let generation = conn.generation;
        if how.as_ref().is_some_and(|c| c.reset) {
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
    /// sockets, free its places, judge and log it.
    pub(super) fn finish(&mut self, index: u32) {
        let conn = self.conns[index as usize]
            .take()
            .expect("a live connection");
        self.free.push(index);
        let Conn {
            client,
            backend,
            stage,
            flows,
            peer,
            client_addr,
            accepted,
            listener,
            _lease,
            _slot,
            ending,
            ..
        } = conn;
        let totals = (flows[UP].total(), flows[DOWN].total());
        for flow in flows {
            if let Some((id, _)) = flow.lent {
                self.buffers.give_back(id);
            }
        }
        self.push(close_entry(client.into_raw_fd()));
        if let Some(backend) = backend {
            self.push(close_entry(backend.into_raw_fd()));
        }
        drop((_lease, _slot));
        let Some(Some(classified)) = ending else {
            return;
        };
        let mut name: Cow<str> = "-".into();
        if let Stage::Relaying(relaying) = stage {
            let Relaying { dialed, stats } = *relaying;
            if let Some(stats) = stats {
                stats.active.decrement(1.0);
            }
            judge(
                classified.passive,
                &dialed.passive,
                dialed.eject_after,
                self.shared,
            );
            name = String::from(&*dialed.name).into();
        }
        let peer = (client_addr != peer).then_some(peer);
        log_closed(
            &listener,
            (client_addr, peer),
            &name,
            totals,
            accepted,
            &classified.close,
        );
        debug!(index, "connection closed");
    }
}
