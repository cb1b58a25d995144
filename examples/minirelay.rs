//! The smallest completion-driven io_uring TCP relay we could write: the
//! yardstick of the performance work (`benches/RESULTS.md`), not a product.
//! What sluice's own loop costs beyond the kernel's TCP work shows as the
//! difference between the two on the same workload.
//!
//! One thread per `--threads`, each with its own `SO_REUSEPORT` listener and
//! ring (single issuer, deferred task running, as sluice's): a multishot
//! accept; for each client a socket and a connect to the one backend; then,
//! per direction, a receive into the direction's own 16 KiB buffer and a
//! send of what came, again and again. The first end of stream or error on
//! either side closes both. No health, no routing, no metrics, no timers,
//! no half-close, no splice.
//!
//! ```text
//! cargo run --release --example minirelay -- 127.0.0.1:17300 127.0.0.1:6379 2
//! ```

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const BUFFER: usize = 16 * 1024;

/// What a completion is about: the operation, in the low bits of the user
/// data, and the connection's slot above them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Accept,
    Connect,
    /// Receive on the side `from` (0: client, 1: backend).
    Recv(usize),
    /// Send towards the other side of `from`.
    Send(usize),
}

fn token(op: Op, slot: usize) -> u64 {
    let low = match op {
        Op::Accept => 0,
        Op::Connect => 1,
        Op::Recv(from) => 2 + from as u64,
        Op::Send(from) => 4 + from as u64,
    };
    (slot as u64) << 3 | low
}

fn untoken(data: u64) -> (Op, usize) {
    let op = match data & 7 {
        0 => Op::Accept,
        1 => Op::Connect,
        2 | 3 => Op::Recv((data & 1) as usize),
        _ => Op::Send((data & 1) as usize),
    };
    (op, (data >> 3) as usize)
}

/// One relayed connection: its two sockets and, per direction, the bytes
/// received and how many of them are sent.
struct Conn {
    sockets: [OwnedFd; 2],
    buffers: [Box<[u8; BUFFER]>; 2],
    filled: [usize; 2],
    sent: [usize; 2],
    /// Operations in flight; the slot is freed when the last one is in.
    pending: u32,
    closing: bool,
}

struct Relay {
    ring: IoUring,
    backend: SockAddr,
    conns: Vec<Option<Conn>>,
}

impl Relay {
    fn push(&mut self, entry: squeue::Entry) {
        // SAFETY: every buffer an entry names lives in its connection,
        // which stays in its slot until the entry's completion is in.
        while unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.ring.submit().expect("submit");
        }
    }

    fn recv(&mut self, slot: usize, from: usize) {
        let conn = self.conns[slot].as_mut().expect("live");
        conn.pending += 1;
        let entry = opcode::Recv::new(
            types::Fd(conn.sockets[from].as_raw_fd()),
            conn.buffers[from].as_mut_ptr(),
            BUFFER as u32,
        )
        .build()
        .user_data(token(Op::Recv(from), slot));
        self.push(entry);
    }

    fn send(&mut self, slot: usize, from: usize) {
        let conn = self.conns[slot].as_mut().expect("live");
        conn.pending += 1;
        let rest = &conn.buffers[from][conn.sent[from]..conn.filled[from]];
        let entry = opcode::Send::new(
            types::Fd(conn.sockets[1 - from].as_raw_fd()),
            rest.as_ptr(),
            rest.len() as u32,
        )
        .build()
        .user_data(token(Op::Send(from), slot));
        self.push(entry);
    }

    /// A new client: its backend socket, and the connect.
    fn accepted(&mut self, client: RawFd) {
        // SAFETY: the accept's result is a new descriptor, ours.
        let client = unsafe { OwnedFd::from_raw_fd(client) };
        let backend = Socket::new(
            Domain::for_address(self.backend.as_socket().expect("IP")),
            Type::STREAM,
            Some(Protocol::TCP),
        )
        .expect("socket");
        for socket in [
            socket2::SockRef::from(&client),
            socket2::SockRef::from(&backend),
        ] {
            socket.set_nodelay(true).expect("TCP_NODELAY");
        }
        let backend = OwnedFd::from(backend);
        let slot = match self.conns.iter().position(Option::is_none) {
            Some(slot) => slot,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        self.conns[slot] = Some(Conn {
            sockets: [client, backend],
            buffers: [Box::new([0; BUFFER]), Box::new([0; BUFFER])],
            filled: [0; 2],
            sent: [0; 2],
            pending: 1,
            closing: false,
        });
        let conn = self.conns[slot].as_ref().expect("just made");
        let entry = opcode::Connect::new(
            types::Fd(conn.sockets[1].as_raw_fd()),
            self.backend.as_ptr().cast(),
            self.backend.len(),
        )
        .build()
        .user_data(token(Op::Connect, slot));
        self.push(entry);
    }

    fn completed(&mut self, data: u64, result: i32, flags: u32) {
        let (op, slot) = untoken(data);
        if op == Op::Accept {
            if result >= 0 {
                self.accepted(result);
            }
            if !cqueue::more(flags) {
                panic!("the multishot accept ended: {result}");
            }
            return;
        }
        let conn = self.conns[slot].as_mut().expect("live");
        conn.pending -= 1;
        // A connect succeeds with 0; a receive of 0 is the end of stream.
        let ended = result < 0 || (result == 0 && op != Op::Connect);
        if conn.closing || ended {
            return self.close(slot);
        }
        match op {
            Op::Connect => {
                self.recv(slot, 0);
                self.recv(slot, 1);
            }
            Op::Recv(from) => {
                conn.filled[from] = result as usize;
                conn.sent[from] = 0;
                self.send(slot, from);
            }
            Op::Send(from) => {
                conn.sent[from] += result as usize;
                match conn.sent[from] < conn.filled[from] {
                    true => self.send(slot, from),
                    false => self.recv(slot, from),
                }
            }
            Op::Accept => unreachable!("handled above"),
        }
    }

    /// Ends the connection in `slot`: both sockets shut, so that what is
    /// in flight completes; freed with its last completion.
    fn close(&mut self, slot: usize) {
        let conn = self.conns[slot].as_mut().expect("live");
        if !conn.closing {
            conn.closing = true;
            for socket in &conn.sockets {
                let _ = socket2::SockRef::from(socket).shutdown(std::net::Shutdown::Both);
            }
        }
        if conn.pending == 0 {
            self.conns[slot] = None;
        }
    }
}

fn serve(listen: SocketAddr, backend: SocketAddr) {
    let listener = Socket::new(Domain::for_address(listen), Type::STREAM, None).expect("socket");
    listener.set_reuse_port(true).expect("SO_REUSEPORT");
    listener.bind(&listen.into()).expect("bind");
    listener.listen(1024).expect("listen");
    let listener: TcpListener = listener.into();
    let ring = IoUring::builder()
        .setup_defer_taskrun()
        .setup_single_issuer()
        .setup_cqsize(4096)
        .build(1024)
        .expect("io_uring");
    let mut relay = Relay {
        ring,
        backend: backend.into(),
        conns: Vec::new(),
    };
    let accept = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
        .build()
        .user_data(token(Op::Accept, 0));
    relay.push(accept);
    let mut batch = Vec::new();
    loop {
        relay.ring.submit_and_wait(1).expect("io_uring_enter");
        batch.extend(
            relay
                .ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result(), cqe.flags())),
        );
        for (data, result, flags) in batch.drain(..) {
            relay.completed(data, result, flags);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, backend, rest @ ..] = &args[..] else {
        eprintln!("usage: minirelay LISTEN BACKEND [THREADS]");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN: ip:port");
    let backend: SocketAddr = backend.parse().expect("BACKEND: ip:port");
    let threads: usize = rest
        .first()
        .map_or(2, |t| t.parse().expect("THREADS: a number"));
    let workers: Vec<_> = (0..threads)
        .map(|_| std::thread::spawn(move || serve(listen, backend)))
        .collect();
    for worker in workers {
        worker.join().expect("a worker panicked");
    }
}
