//! `make soak`: sluice under mixed traffic and faults for SOAK_SECONDS
//! (default 600), then a report in `benches/SOAK.md`. Not part of
//! `make test` (ignored); run on the release build.
//!
//! Traffic, all checked byte for byte:
//! - request/response: echo round trips on kept connections, and SET/GET
//!   against a real redis-server on a second listener;
//! - connection churn: one round trip per connection, from 1000 addresses;
//! - bulk both ways: up to 16 MiB each way at once, the client half-closes
//!   first and the backend goes on sending; one in eight backends resets
//!   halfway on purpose;
//! - resets: clients that send a little and reset.
//!
//! Faults meanwhile: every few seconds a backend is killed (its listener
//! closed and every connection it holds reset) and brought back three
//! seconds later, and the configuration is reloaded (weights, a backend
//! removed and added, the algorithm).
//!
//! The promise checked: no byte is lost or corrupted. A connection may be
//! cut (a killed backend resets it), but only with an error, never with a
//! clean end of stream that would pass a truncated transfer off as whole.
//! Memory and descriptors stay flat: once traffic stops, sluice holds what
//! it held before it started.

mod common;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use socket2::SockRef;

use common::*;

const MIB: u64 = 1024 * 1024;

/// What the soak counts, shared by every client and backend thread.
#[derive(Default)]
struct Tally {
    counts: Mutex<HashMap<&'static str, u64>>,
}

impl Tally {
    fn add(&self, what: &'static str, n: u64) {
        *self.counts.lock().unwrap().entry(what).or_default() += n;
    }

    fn get(&self, what: &str) -> u64 {
        self.counts.lock().unwrap().get(what).copied().unwrap_or(0)
    }
}

/// The seed of a bulk transfer that the backend cuts halfway with a reset.
fn resets_halfway(seed: u64) -> bool {
    seed % 8 == 0
}

/// A backend that can be killed and brought back on the same address. It
/// speaks by the first byte of each connection: `E` echoes, `B` is a bulk
/// transfer (seed, bytes up, bytes down: three little-endian u64).
struct Backend {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    /// Set by a kill: connections end with a reset, not a FIN.
    killed: Arc<AtomicBool>,
    /// A duplicate of each open connection, to reset it with: removed by
    /// the connection's thread as it ends (the duplicate would keep the
    /// socket open, and its FIN from being sent).
    open: Arc<Mutex<HashMap<u64, TcpStream>>>,
    accepter: Option<thread::JoinHandle<()>>,
    tally: Arc<Tally>,
}

impl Backend {
    fn start(addr: SocketAddr, tally: Arc<Tally>) -> Backend {
        let listener = TcpListener::bind(addr).unwrap();
        let addr = listener.local_addr().unwrap();
        let stopping = Arc::new(AtomicBool::new(false));
        let killed = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<HashMap<u64, TcpStream>>> = Arc::default();
        let accepter = {
            let (stopping, killed, open, tally) = (
                stopping.clone(),
                killed.clone(),
                open.clone(),
                tally.clone(),
            );
            thread::spawn(move || {
                for (id, stream) in (0u64..).zip(listener.incoming()) {
                    let Ok(stream) = stream else { continue };
                    if stopping.load(Ordering::SeqCst) {
                        // Killed: what it accepted last is reset, not
                        // closed with a FIN.
                        let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                        return;
                    }
                    open.lock().unwrap().insert(id, stream.try_clone().unwrap());
                    let (open, killed, tally) = (open.clone(), killed.clone(), tally.clone());
                    thread::spawn(move || {
                        serve(stream, &killed, &tally);
                        open.lock().unwrap().remove(&id);
                    });
                }
            })
        };
        Backend {
            addr,
            stopping,
            killed,
            open,
            accepter: Some(accepter),
            tally,
        }
    }

    /// Stops accepting and resets every connection, as a crash with bytes
    /// in flight would. Shutting the read side sends nothing: it wakes the
    /// connection's threads, which stop; the last close, with SO_LINGER 0,
    /// sends the reset.
    fn kill(&mut self) {
        if let Some(accepter) = self.accepter.take() {
            self.stopping.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(self.addr);
            accepter.join().unwrap();
        }
        self.killed.store(true, Ordering::SeqCst);
        for stream in self.open.lock().unwrap().values() {
            let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
            let _ = stream.shutdown(Shutdown::Read);
        }
    }

    fn restart(&mut self) {
        *self = Backend::start(self.addr, self.tally.clone());
    }
}

fn serve(mut stream: TcpStream, killed: &AtomicBool, tally: &Tally) {
    let mut mode = [0u8; 1];
    if stream.read_exact(&mut mode).is_err() {
        return;
    }
    match mode[0] {
        b'E' => echo(&mut stream),
        b'B' => bulk_backend(stream, killed, tally),
        _ => {}
    }
}

fn bulk_backend(stream: TcpStream, killed: &AtomicBool, tally: &Tally) {
    let mut header = [0u8; 24];
    if (&stream).read_exact(&mut header).is_err() {
        return;
    }
    let word = |i: usize| u64::from_le_bytes(header[i * 8..i * 8 + 8].try_into().unwrap());
    let (seed, up, down) = (word(0), word(1), word(2));
    let (sent, then) = if resets_halfway(seed) {
        (down / 2, Then::Reset)
    } else {
        (down, Then::Fin)
    };
    // What comes up must be the client's noise, whole, then its FIN.
    let outcome = exchange(&stream, (seed ^ 0xd0d0, sent, then), (seed, up), killed);
    match outcome {
        _ if killed.load(Ordering::SeqCst) => tally.add("upstream cut by a kill", 1),
        Outcome::Whole { end: End::Fin } => tally.add("upstream transfers intact", 1),
        Outcome::Whole { end: End::Reset } => tally.add("upstream cut", 1),
        Outcome::Whole { end: End::More } => {
            tally.add("upstream CORRUPTED (bytes beyond the end)", 1)
        }
        Outcome::Cut => tally.add("upstream cut", 1),
        Outcome::Truncated => tally.add("upstream LOST (clean end too early)", 1),
        Outcome::Corrupted => tally.add("upstream CORRUPTED", 1),
        Outcome::Stalled => tally.add("upstream STALLED", 1),
    }
}

/// What a side does once it has sent all it sends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Half-close: FIN.
    Fin,
    /// Reset when the socket is closed (SO_LINGER 0).
    Reset,
}

/// How the received stream ended after its last expected byte.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Fin,
    Reset,
    More,
}

/// How one side's exchange went.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Every expected byte came, intact, and then `end`.
    Whole {
        end: End,
    },
    /// An error (a reset) came before the last expected byte, on a read or
    /// a write.
    Cut,
    /// A clean end of stream came before the last expected byte, with no
    /// error before it: bytes lost.
    Truncated,
    Corrupted,
    /// Nothing moved for `DEADLINE`.
    Stalled,
}

/// Sends `send` = (seed, bytes, then) of noise and, at the same time,
/// receives and checks `receive` = (seed, bytes) of noise and what follows,
/// on one thread, polling the socket. One thread matters: Linux reports a
/// reset to one system call only, and a second thread reading the socket
/// after a writer took the error would see a clean end of stream.
fn exchange(
    stream: &TcpStream,
    (send_seed, send_total, then): (u64, u64, Then),
    (receive_seed, receive_total): (u64, u64),
    killed: &AtomicBool,
) -> Outcome {
    use std::os::fd::AsRawFd;
    stream.set_nonblocking(true).unwrap();
    let (mut outgoing, mut out_noise) = (Chunks::default(), Noise::new(send_seed));
    let (mut incoming, mut in_noise) = (Chunks::default(), Noise::new(receive_seed));
    let (mut sent, mut received) = (0u64, 0u64);
    let mut sending = true;
    // How the receiving side ended, once it has.
    let mut end: Option<End> = None;
    let mut got = vec![0u8; 64 * 1024];
    let mut last_progress = Instant::now();
    let mut stream = stream;
    while sending || end.is_none() {
        if killed.load(Ordering::SeqCst) {
            return Outcome::Cut;
        }
        if sending && sent == send_total {
            sending = false;
            match then {
                Then::Fin => {
                    if stream.shutdown(Shutdown::Write).is_err() {
                        return Outcome::Cut;
                    }
                }
                Then::Reset => SockRef::from(stream)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap(),
            }
            continue;
        }
        let mut poll = libc::pollfd {
            fd: stream.as_raw_fd(),
            events: if end.is_none() { libc::POLLIN } else { 0 }
                | if sending { libc::POLLOUT } else { 0 },
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut poll, 1, 100) };
        if poll.revents == 0 {
            if last_progress.elapsed() > DEADLINE {
                return Outcome::Stalled;
            }
            continue;
        }
        last_progress = Instant::now();
        if sending && poll.revents & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) != 0 {
            let chunk = outgoing.next(&mut out_noise, sent, send_total);
            match stream.write(chunk) {
                Ok(n) => sent += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Outcome::Cut,
            }
        }
        if end.is_none() && poll.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            let room = if received < receive_total {
                (receive_total - received).min(got.len() as u64) as usize
            } else {
                1
            };
            match stream.read(&mut got[..room]) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) if received < receive_total => return Outcome::Cut,
                Err(_) => end = Some(End::Reset),
                Ok(0) if received < receive_total => return Outcome::Truncated,
                Ok(0) => end = Some(End::Fin),
                Ok(_) if received >= receive_total => return Outcome::Whole { end: End::More },
                Ok(n) => {
                    let mut checked = 0;
                    while checked < n {
                        let want = incoming.next(&mut in_noise, received, receive_total);
                        let take = want.len().min(n - checked);
                        if got[checked..checked + take] != want[..take] {
                            return Outcome::Corrupted;
                        }
                        checked += take;
                        received += take as u64;
                    }
                }
            }
        }
    }
    Outcome::Whole {
        end: end.expect("the loop ends once receiving has"),
    }
}

/// Noise in the 64 KiB steps both sides generate it in: the bytes from
/// `position` to the end of the current step.
#[derive(Default)]
struct Chunks {
    buf: Vec<u8>,
    /// Where `buf` starts in the stream.
    start: u64,
}

impl Chunks {
    fn next(&mut self, noise: &mut Noise, position: u64, total: u64) -> &[u8] {
        const STEP: u64 = 64 * 1024;
        if position == self.start + self.buf.len() as u64 && position < total {
            self.start = position;
            self.buf.resize((total - position).min(STEP) as usize, 0);
            noise.fill(&mut self.buf);
        }
        &self.buf[(position - self.start) as usize..]
    }
}

fn stalled(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// A small deterministic generator for sizes and choices.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// How a client's connect to sluice failed, as the report says it.
fn connect_failure(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
            "connect to sluice failed: timed out"
        }
        std::io::ErrorKind::ConnectionRefused => "connect to sluice failed: refused",
        std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable => {
            "connect to sluice failed: no local port (the client's, not sluice's)"
        }
        _ => "connect to sluice failed: other",
    }
}

fn connect(from: u32, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(client_ip(from), 0).into())?;
    socket.connect_timeout(&to.into(), DEADLINE)?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(DEADLINE))?;
    stream.set_write_timeout(Some(DEADLINE))?;
    Ok(stream)
}

/// Echo round trips of 64 bytes, `per_connection` on each connection.
fn round_trips(to: SocketAddr, from: u32, per_connection: u32, tally: &Tally) {
    let mut stream = match connect(from, to) {
        Ok(stream) => stream,
        Err(e) => return tally.add(connect_failure(&e), 1),
    };
    tally.add("connections", 1);
    if stream.write_all(b"E").is_err() {
        tally.add("cut", 1);
        return;
    }
    let mut message = [0u8; 64];
    let mut back = [0u8; 64];
    for i in 0..per_connection {
        message.fill((from as u8).wrapping_add(i as u8));
        if stream.write_all(&message).is_err() {
            tally.add("cut", 1);
            return;
        }
        match stream.read_exact(&mut back) {
            Ok(()) if back == message => tally.add("round trips", 1),
            Ok(()) => {
                tally.add("CORRUPTED round trips", 1);
                return;
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                tally.add("LOST round trips (clean end too early)", 1);
                return;
            }
            Err(e) if stalled(&e) => {
                tally.add("STALLED round trips", 1);
                return;
            }
            Err(_) => {
                tally.add("cut", 1);
                return;
            }
        }
        tally.add("bytes", 128);
    }
}

/// One bulk transfer both ways; the client half-closes first.
fn bulk(to: SocketAddr, from: u32, seed: u64, up: u64, down: u64, tally: &Tally) {
    let mut stream = match connect(from, to) {
        Ok(stream) => stream,
        Err(e) => return tally.add(connect_failure(&e), 1),
    };
    tally.add("connections", 1);
    let mut header = vec![b'B'];
    for word in [seed, up, down] {
        header.extend(word.to_le_bytes());
    }
    if stream.write_all(&header).is_err() {
        tally.add("cut", 1);
        return;
    }
    let expected = if resets_halfway(seed) { down / 2 } else { down };
    let never = AtomicBool::new(false);
    let outcome = exchange(
        &stream,
        (seed, up, Then::Fin),
        (seed ^ 0xd0d0, expected),
        &never,
    );
    match outcome {
        Outcome::Whole { end: End::Reset } if resets_halfway(seed) => {
            tally.add("backend resets passed on as resets", 1);
            tally.add("bytes", up + expected);
        }
        Outcome::Whole { end: End::Fin } if resets_halfway(seed) => {
            tally.add("LOST: a backend reset passed on as a clean end", 1)
        }
        Outcome::Whole { end: End::Fin } => {
            tally.add("bulk transfers intact", 1);
            tally.add("bytes", up + down);
        }
        Outcome::Whole { end: End::Reset } | Outcome::Cut => tally.add("cut", 1),
        Outcome::Whole { end: End::More } | Outcome::Corrupted => {
            tally.add("CORRUPTED bulk transfers", 1)
        }
        Outcome::Truncated => tally.add("LOST bulk transfers (clean end too early)", 1),
        Outcome::Stalled => tally.add("STALLED bulk transfers", 1),
    }
}

/// Connects, sends a little, resets.
fn reset_midway(to: SocketAddr, from: u32, tally: &Tally) {
    let mut stream = match connect(from, to) {
        Ok(stream) => stream,
        Err(e) => return tally.add(connect_failure(&e), 1),
    };
    tally.add("connections", 1);
    let _ = stream.write_all(b"E hello, and goodbye");
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    tally.add("client resets", 1);
}

/// SET then GET of a value only this client writes, through sluice to
/// redis-server.
fn redis_exchange(to: SocketAddr, from: u32, n: u64, tally: &Tally) {
    let Ok(stream) = connect(from, to) else {
        tally.add("connect failed", 1);
        return;
    };
    tally.add("connections", 1);
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    for i in 0..10 {
        let value = format!("{from}-{n}-{i}");
        let set = format!("SET soak:{from} {value}\r\nGET soak:{from}\r\n");
        let mut ok = String::new();
        let mut len = String::new();
        let mut got = String::new();
        let answered = writer.write_all(set.as_bytes()).is_ok()
            && reader.read_line(&mut ok).is_ok()
            && reader.read_line(&mut len).is_ok()
            && reader.read_line(&mut got).is_ok();
        if !answered {
            tally.add("cut", 1);
            return;
        }
        if ok != "+OK\r\n" || got.trim_end() != value {
            tally.add("CORRUPTED redis replies", 1);
            return;
        }
        tally.add("redis round trips", 1);
        tally.add(
            "bytes",
            (set.len() + ok.len() + len.len() + got.len()) as u64,
        );
    }
}

/// The configuration for the `variant`-th reload: backends weighed, one
/// left out, the algorithm switched.
fn soak_config(
    listen: SocketAddr,
    cache: SocketAddr,
    admin: SocketAddr,
    backends: &[SocketAddr],
    redis: SocketAddr,
    variant: usize,
) -> String {
    let balance = ["maglev", "least_connections", "maglev", "round_robin"][variant % 4];
    let mut text = format!(
        "admin:\n  listen: {admin}\nlisteners:\n  front:\n    listen: {listen}\n    pool: mixed\n    backlog: 4096\n  \
         cache:\n    listen: {cache}\n    pool: redis\npools:\n  mixed:\n    balance: {balance}\n    \
         connect_timeout: 1s\n    retries: 3\n    \
         health: {{ interval: 500ms, timeout: 250ms, rise: 2, fall: 2 }}\n    backends:\n"
    );
    for (i, addr) in backends.iter().enumerate() {
        if variant % 3 == 1 && i == 2 {
            continue;
        }
        let weight = if variant % 2 == 0 && i == 3 { 2 } else { 1 };
        text.push_str(&format!(
            "      - address: {addr}\n        name: b{i}\n        weight: {weight}\n"
        ));
    }
    text.push_str(&format!(
        "  redis:\n    health: {{ preset: redis }}\n    backends:\n      - address: {redis}\n"
    ));
    text
}

/// (seconds since the start, RSS in KiB, open descriptors) of sluice.
type Sample = (u64, u64, usize);

/// Process `pid`'s descriptors: (pipes, everything else).
fn descriptors_by_kind(pid: u32) -> (usize, usize) {
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap();
    let links: Vec<String> = entries
        .flatten()
        .filter_map(|e| Some(std::fs::read_link(e.path()).ok()?.display().to_string()))
        .collect();
    let pipes = links.iter().filter(|l| l.starts_with("pipe:")).count();
    (pipes, links.len() - pipes)
}

#[test]
#[ignore = "a long run: `make soak`"]
fn soak() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let tally = Arc::new(Tally::default());
    let mut backends: Vec<Backend> = (0..4)
        .map(|_| Backend::start(SocketAddr::new(unique_loopback(), 0), tally.clone()))
        .collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let redis = redis_server();
    let (listen, cache, admin) = (
        free_addr(unique_loopback()),
        free_addr(unique_loopback()),
        free_addr(unique_loopback()),
    );
    let text = |variant| soak_config(listen, cache, admin, &addrs, redis.addr, variant);
    let sluice = Sluice::start(&text(0));
    let pid = sluice.pid();
    let idle_before = (rss_kib(pid), descriptors_by_kind(pid));

    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let running = || Instant::now() < deadline;
    let mut clients = Vec::new();
    // Kept connections with 100 round trips each.
    for t in 0..4u32 {
        let tally = tally.clone();
        clients.push(thread::spawn(move || {
            let mut n = 0;
            while Instant::now() < deadline {
                round_trips(listen, 10 * t + n % 10, 100, &tally);
                n += 1;
            }
        }));
    }
    // Churn: one round trip per connection, from 1000 addresses.
    for t in 0..2u32 {
        let tally = tally.clone();
        clients.push(thread::spawn(move || {
            let mut n = t;
            while Instant::now() < deadline {
                round_trips(listen, 100 + n % 1000, 1, &tally);
                n += 2;
            }
        }));
    }
    // Bulk both ways.
    for t in 0..2u64 {
        let tally = tally.clone();
        clients.push(thread::spawn(move || {
            let mut dice = Dice(0x9e37_79b9 + t);
            let mut seed = t;
            while Instant::now() < deadline {
                let (up, down) = (dice.roll(16 * MIB), dice.roll(16 * MIB));
                bulk(listen, 2000 + dice.roll(50) as u32, seed, up, down, &tally);
                seed += 2;
            }
        }));
    }
    // Clients that reset, and redis.
    {
        let tally = tally.clone();
        clients.push(thread::spawn(move || {
            let mut n = 0;
            while Instant::now() < deadline {
                reset_midway(listen, 3000 + n % 100, &tally);
                redis_exchange(cache, 4000 + n % 100, n as u64, &tally);
                n += 1;
            }
        }));
    }

    // Faults, and samples, until the deadline.
    let mut samples: Vec<Sample> = Vec::new();
    let mut dice = Dice(42);
    let mut killed: Option<(usize, Instant)> = None;
    let (mut kills, mut reloads, mut reload_failures) = (0, 0, 0);
    let mut next_kill = started + Duration::from_secs(5);
    let mut next_reload = started + Duration::from_secs(3);
    let mut next_sample = started;
    while running() {
        let now = Instant::now();
        if now >= next_sample {
            samples.push((
                started.elapsed().as_secs(),
                rss_kib(pid),
                open_descriptors(pid),
            ));
            next_sample += Duration::from_secs(1);
        }
        if let Some((i, at)) = killed {
            if now >= at + Duration::from_secs(3) {
                backends[i].restart();
                killed = None;
            }
        } else if now >= next_kill {
            let i = dice.roll(4) as usize;
            backends[i].kill();
            kills += 1;
            killed = Some((i, now));
            next_kill = now + Duration::from_secs(7);
        }
        if now >= next_reload {
            reloads += 1;
            let outcome = sluice.reload(&text(reloads));
            if !outcome.contains("configuration reloaded") {
                reload_failures += 1;
            }
            next_reload = now + Duration::from_secs(4);
        }
        thread::sleep(Duration::from_millis(100));
    }
    for client in clients {
        client.join().unwrap();
    }
    if let Some((i, _)) = killed {
        backends[i].restart();
    }
    // Idle again: every connection gone, sluice holds what it held before.
    let open_connections = || -> Vec<String> {
        scrape(admin)
            .lines()
            .filter(|l| l.starts_with("sluice_connections_active{") && !l.ends_with(" 0"))
            .map(str::to_owned)
            .collect()
    };
    let give_up = Instant::now() + DEADLINE;
    while !open_connections().is_empty() {
        assert!(
            Instant::now() < give_up,
            "connections still open with no client left: {:?}\n{}",
            open_connections(),
            sluice.log_lines().join("\n")
        );
        thread::sleep(Duration::from_millis(50));
    }
    // Probes in flight come and go: wait for a moment without one.
    let give_up = Instant::now() + DEADLINE;
    while descriptors_by_kind(pid).1 > idle_before.1 .1 && Instant::now() < give_up {
        thread::sleep(Duration::from_millis(20));
    }
    let idle_after = (rss_kib(pid), descriptors_by_kind(pid));
    let metrics = scrape(admin);

    let report = report(
        seconds,
        &tally,
        (kills, reloads, reload_failures),
        &samples,
        idle_before,
        idle_after,
        &metrics,
    );
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/SOAK.md");
    std::fs::write(path, &report).unwrap();
    println!("{report}");

    let bad: Vec<(String, u64)> = tally
        .counts
        .lock()
        .unwrap()
        .iter()
        .filter(|(what, &n)| {
            n > 0
                && ["LOST", "CORRUPTED", "STALLED"]
                    .iter()
                    .any(|bad| what.contains(bad))
        })
        .map(|(what, n)| (what.to_string(), *n))
        .collect();
    assert!(bad.is_empty(), "lost, corrupted or stalled: {bad:?}");
    assert_eq!(reload_failures, 0);
    assert!(
        idle_after.1 .1 <= idle_before.1 .1,
        "descriptors other than pipes: {} idle before, {} after",
        idle_before.1 .1,
        idle_after.1 .1
    );
    drop(backends);
}

fn report(
    seconds: u64,
    tally: &Tally,
    (kills, reloads, reload_failures): (u64, usize, usize),
    samples: &[Sample],
    idle_before: (u64, (usize, usize)),
    idle_after: (u64, (usize, usize)),
    metrics: &str,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Soak run\n");
    let _ = writeln!(
        out,
        "Written by `make soak` (tests/soak.rs) on the release build: {seconds} s of mixed \
         traffic through sluice while backends were killed and reloads applied. Every \
         transfer is checked byte for byte. `cut` counts connections ended by a reset \
         (a killed backend resets what it held): allowed. LOST, CORRUPTED and STALLED (nothing \
         for 20 s) must be 0.\n"
    );
    let _ = writeln!(out, "| | |\n|---|---|");
    let mut counts: Vec<(&'static str, u64)> = tally
        .counts
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (*k, *v))
        .collect();
    counts.sort();
    for (what, n) in &counts {
        let _ = writeln!(out, "| {what} | {n} |");
    }
    for what in [
        "LOST round trips (clean end too early)",
        "LOST bulk transfers (clean end too early)",
        "LOST: a backend reset passed on as a clean end",
        "CORRUPTED bulk transfers",
        "CORRUPTED round trips",
    ] {
        if tally.get(what) == 0 {
            let _ = writeln!(out, "| {what} | 0 |");
        }
    }
    let _ = writeln!(
        out,
        "| backends killed and brought back | {kills} |\n| reloads (failed) | {reloads} ({reload_failures}) |"
    );
    let _ = writeln!(
        out,
        "| GiB relayed (client side, both ways) | {:.2} |\n",
        tally.get("bytes") as f64 / (1u64 << 30) as f64
    );
    let errors: Vec<String> = metrics
        .lines()
        .filter(|l| l.starts_with("sluice_connection_errors_total{") && !l.ends_with(" 0"))
        .map(|l| format!("`{l}`"))
        .collect();
    let _ = writeln!(
        out,
        "sluice's own error counters: {}\n",
        if errors.is_empty() {
            "none".to_owned()
        } else {
            errors.join(", ")
        }
    );
    let _ = writeln!(out, "## Memory and descriptors\n");
    let _ = writeln!(
        out,
        "Idle before the traffic: RSS {} KiB, {} descriptors and {} pipe ends. Idle after it: \
         RSS {} KiB, {} descriptors and {} pipe ends (empty pipes the workers keep for the next \
         splice, within their budget).\n",
        idle_before.0,
        idle_before.1 .1,
        idle_before.1 .0,
        idle_after.0,
        idle_after.1 .1,
        idle_after.1 .0
    );
    let _ = writeln!(
        out,
        "Under load, every tenth of the run (connections come and go, so descriptors move with them):\n"
    );
    let _ = writeln!(out, "| second | RSS KiB | descriptors |\n|---|---|---|");
    let step = (samples.len() / 10).max(1);
    for &(t, rss, fds) in samples.iter().step_by(step) {
        let _ = writeln!(out, "| {t} | {rss} | {fds} |");
    }
    let warm = &samples[samples.len() / 10..];
    let max_rss = warm.iter().map(|s| s.1).max().unwrap_or(0);
    let min_rss = warm.iter().map(|s| s.1).min().unwrap_or(0);
    let _ = writeln!(
        out,
        "\nAfter the first tenth, RSS stayed between {min_rss} and {max_rss} KiB."
    );
    out
}
