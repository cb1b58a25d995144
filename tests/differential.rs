//! The two drivers against each other and against a direct connection. A
//! seeded generator writes a script for a client and one for its backend:
//! messages from 1 byte to 4 MiB, written whole or in pieces (pipelined
//! small writes among them), pauses, an urgent byte, a reader that starts
//! late or reads slowly, and an end by FIN or, for one side at most, by a
//! reset (once everything it sent is acknowledged, or at once). Each script
//! runs through sluice on io_uring, through sluice on epoll, and directly,
//! with each engine (a seed picks one). Every run must give what the rules
//! of relaying say:
//!
//! - each side that does not reset reads every byte the other sent, in
//!   order (the urgent byte in its place), then a clean end of stream if
//!   the other ended with FIN, or a reset if it reset (never a clean end
//!   instead, never before the last byte); of a side that resets at once,
//!   with bytes still on their way, the other reads a prefix, then the
//!   reset;
//! - no connection stays open past its script (a read that waits 10 s
//!   fails the seed), and sluice holds none once all are done.
//!
//! Since each target is held to the same expectation, the drivers agree
//! with each other and with a direct connection. `make test` runs seeds 0
//! to 299 (`SLUICE_DIFF_SEEDS` for more); `make soak` runs many more from a
//! random first seed. A failing seed is printed with its script:
//! `SLUICE_DIFF_SEED=N cargo test --test differential` replays it alone.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use socket2::SockRef;

use common::*;

/// The relay engines, one listener each; a seed picks one.
const ENGINES: [&str; 3] = ["copy", "splice", "auto"];

/// A target stops after this many failed scripts.
const MAX_FAILURES: usize = 5;

/// How long a side may wait for its next byte before the connection counts
/// as stuck open.
const STUCK: Duration = Duration::from_secs(10);

/// Deterministic dice (xorshift64*).
struct Dice(u64);

impl Dice {
    fn new(seed: u64) -> Dice {
        Dice(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn millis(&mut self, below: u64) -> Duration {
        Duration::from_millis(self.below(below))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Client,
    Backend,
}

#[derive(Debug, Clone)]
enum Step {
    /// `len` bytes, in `pieces` writes `gap` apart.
    Send {
        len: usize,
        pieces: usize,
        gap: Duration,
    },
    /// The byte `!` as TCP urgent data (`MSG_OOB`).
    Urgent,
    Pause(Duration),
    /// `shutdown(Write)`: FIN, and reading goes on.
    Fin,
    /// A close with a reset: once the peer has acknowledged every byte
    /// sent, or, `abrupt`, at once (what the peer gets of the bytes still
    /// on their way is then a matter of timing: a prefix).
    Reset {
        abrupt: bool,
    },
}

/// How a side reads: after `start_after`, `chunk` bytes at a time, with
/// `gap` after each read.
#[derive(Debug, Clone)]
struct Reader {
    start_after: Duration,
    chunk: usize,
    gap: Duration,
}

#[derive(Debug, Clone)]
struct Actor {
    who: Who,
    steps: Vec<Step>,
    reader: Reader,
}

#[derive(Debug, Clone)]
struct Script {
    seed: u64,
    /// Into [`ENGINES`].
    engine: usize,
    client: Actor,
    backend: Actor,
}

impl Script {
    fn new(seed: u64) -> Script {
        let mut dice = Dice::new(seed);
        let resets = match dice.below(8) {
            0 => Some(Who::Client),
            1 => Some(Who::Backend),
            _ => None,
        };
        let mut client = Actor::new(&mut dice, Who::Client, resets == Some(Who::Client));
        let mut backend = Actor::new(&mut dice, Who::Backend, resets == Some(Who::Backend));
        client.reader = Reader::new(&mut dice, backend.sends());
        backend.reader = Reader::new(&mut dice, client.sends());
        Script {
            seed,
            engine: (seed % ENGINES.len() as u64) as usize,
            client,
            backend,
        }
    }

    fn actor(&self, who: Who) -> &Actor {
        match who {
            Who::Client => &self.client,
            Who::Backend => &self.backend,
        }
    }

    /// What `who` must read: every byte of the other side, and how it
    /// ends. `None` when `who` resets (what it reads until then is its
    /// own business).
    fn expected(&self, who: Who) -> Option<Expected> {
        if self.actor(who).resets() {
            return None;
        }
        let other = self.actor(match who {
            Who::Client => Who::Backend,
            Who::Backend => Who::Client,
        });
        let all = other.stream(self.seed, usize::MAX);
        Some(match other.steps.last() {
            Some(Step::Reset { abrupt: true }) => Expected::PrefixThenReset {
                len: all.len,
                other: other.clone(),
            },
            Some(Step::Reset { abrupt: false }) => Expected::Exactly(Seen {
                end: End::Reset,
                ..all
            }),
            _ => Expected::Exactly(all),
        })
    }
}

/// What a side must read.
#[derive(Debug)]
enum Expected {
    Exactly(Seen),
    /// The first bytes of what `other` sends (at most `len`), then a reset.
    PrefixThenReset {
        len: usize,
        other: Actor,
    },
}

impl Expected {
    /// Whether `seen` is what was expected, of script `seed`.
    fn met_by(&self, seen: &Seen, seed: u64) -> bool {
        match self {
            Expected::Exactly(expected) => seen == expected,
            Expected::PrefixThenReset { len, other } => {
                seen.end == End::Reset
                    && seen.len <= *len
                    && seen.hash == other.stream(seed, seen.len).hash
            }
        }
    }
}

impl Actor {
    /// Up to four steps, then FIN, or a reset if `resets`. (The reader is
    /// set once both sides' steps are known.)
    fn new(dice: &mut Dice, who: Who, resets: bool) -> Actor {
        let mut steps = Vec::new();
        for _ in 0..dice.below(5) {
            steps.push(match dice.below(10) {
                0 => Step::Urgent,
                1 | 2 => Step::Pause(dice.millis(20)),
                _ => {
                    // 1 byte to 4 MiB, small ones far more often.
                    let bits = dice.below(23);
                    let len = 1 + dice.below(1 << bits) as usize;
                    let pieces = if dice.chance(30) {
                        1 + dice.below(40) as usize
                    } else {
                        1
                    };
                    let gap = if dice.chance(50) {
                        Duration::ZERO
                    } else {
                        dice.millis(3)
                    };
                    Step::Send { len, pieces, gap }
                }
            });
        }
        steps.push(if resets {
            Step::Reset {
                abrupt: dice.chance(30),
            }
        } else {
            Step::Fin
        });
        Actor {
            who,
            steps,
            reader: Reader {
                start_after: Duration::ZERO,
                chunk: 64 * 1024,
                gap: Duration::ZERO,
            },
        }
    }

    /// Bytes sent, all steps together.
    fn sends(&self) -> usize {
        self.stream(0, usize::MAX).len
    }

    fn resets(&self) -> bool {
        matches!(self.steps.last(), Some(Step::Reset { .. }))
    }

    /// What reading the first `limit` bytes it sends in script `seed`
    /// (all of them, if fewer) and then a clean end would be.
    fn stream(&self, seed: u64, limit: usize) -> Seen {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut len = 0;
        self.each_byte_run(seed, |bytes| {
            let take = bytes.len().min(limit - len);
            hasher.update(&bytes[..take]);
            len += take;
        });
        Seen {
            len,
            hash: hasher.digest(),
            end: End::Fin,
        }
    }

    /// Calls `f` with the bytes of each step that sends, in order.
    fn each_byte_run(&self, seed: u64, mut f: impl FnMut(&[u8])) {
        for (i, step) in self.steps.iter().enumerate() {
            match step {
                Step::Send { len, .. } => f(&message(seed, self.who, i, *len)),
                Step::Urgent => f(b"!"),
                _ => {}
            }
        }
    }
}

impl Reader {
    /// A reader of a side that is sent `incoming` bytes: at once and fast,
    /// or late, or slowly (but never so slowly that it takes over 300 ms).
    fn new(dice: &mut Dice, incoming: usize) -> Reader {
        let start_after = if dice.chance(20) {
            dice.millis(60)
        } else {
            Duration::ZERO
        };
        if !dice.chance(30) {
            return Reader {
                start_after,
                chunk: 64 * 1024,
                gap: Duration::ZERO,
            };
        }
        let gap = Duration::from_millis(1 + dice.below(2));
        let reads_allowed = (300 / gap.as_millis()) as usize;
        let chunk = (1 + dice.below(16 * 1024) as usize).max(incoming / reads_allowed + 1);
        Reader {
            start_after,
            chunk,
            gap,
        }
    }
}

/// The bytes of step `step` of `who` in script `seed`.
fn message(seed: u64, who: Who, step: usize, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    let stream = seed << 8 | (who as u64) << 7 | step as u64;
    Noise::new(stream.wrapping_mul(0x100_0000_01b3)).fill(&mut bytes);
    bytes
}

/// How a side's reading ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// A clean end of stream.
    Fin,
    Reset,
    /// No byte came for [`STUCK`].
    StuckOpen,
    Error(ErrorKind),
}

/// What a side read of the other.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    len: usize,
    hash: u64,
    end: End,
}

/// Reads `stream` to its end as `reader` says.
fn read_all(mut stream: TcpStream, reader: &Reader) -> Seen {
    thread::sleep(reader.start_after);
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut len = 0;
    let mut buf = vec![0u8; reader.chunk];
    let end = loop {
        match stream.read(&mut buf) {
            Ok(0) => break End::Fin,
            Ok(n) => {
                hasher.update(&buf[..n]);
                len += n;
                // A slow reader, not a wait for an event.
                thread::sleep(reader.gap);
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break End::Reset,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break End::StuckOpen
            }
            Err(e) => break End::Error(e.kind()),
        }
    };
    Seen {
        len,
        hash: hasher.digest(),
        end,
    }
}

/// Bytes `stream` has sent that its peer has not acknowledged.
fn unacknowledged(stream: &TcpStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one int.
    unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    queued as usize
}

/// Connects to `to` as the client of script `seed`, from an address of its
/// own (so that no two scripts share a connection's address and port, one
/// of them closing), with the urgent byte read in its place (set before
/// any byte can come). `true` with it if the peer reset the connection
/// before the connect returned (a backend that resets at once): the
/// socket reports a reset once, and that was to the connect.
fn connect(to: SocketAddr, seed: u64) -> (TcpStream, bool) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_out_of_band_inline(true).unwrap();
    let from = client_ip(1000 + (seed % 60_000) as u32);
    socket.bind(&SocketAddr::new(from, 0).into()).unwrap();
    let reset = match socket.connect_timeout(&to.into(), STUCK) {
        Ok(()) => false,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
        Err(e) => panic!("seed {seed}: connect from {from} to {to}: {e}"),
    };
    (socket.into(), reset)
}

/// Plays `actor` of script `seed` on `stream` (whose urgent byte is read in
/// its place): writes its steps while a thread reads; returns what it
/// read. `reset`: the stream was reset already (see [`connect`]).
fn act(mut stream: TcpStream, actor: &Actor, seed: u64, reset: bool) -> Seen {
    use std::os::fd::AsRawFd;
    stream.set_nodelay(true).unwrap();
    stream.set_read_timeout(Some(STUCK)).unwrap();
    stream.set_write_timeout(Some(STUCK)).unwrap();
    let reading = {
        let stream = stream.try_clone().unwrap();
        let reader = actor.reader.clone();
        thread::spawn(move || read_all(stream, &reader))
    };
    // A socket reports a reset once, to whichever call comes first: when
    // that is a write (or the connect), the read that follows sees a clean
    // end instead.
    let mut reset_reported = reset;
    let mut refused = |e: std::io::Error| {
        reset_reported |= matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe);
    };
    'steps: for (i, step) in actor.steps.iter().enumerate() {
        match step {
            Step::Send { len, pieces, gap } => {
                let bytes = message(seed, actor.who, i, *len);
                for piece in bytes.chunks(len.div_ceil(*pieces)) {
                    // An error: the peer reset, and nothing more is owed.
                    if let Err(e) = stream.write_all(piece) {
                        refused(e);
                        break 'steps;
                    }
                    thread::sleep(*gap);
                }
            }
            Step::Urgent => {
                // SAFETY: sends one byte from a live buffer.
                let sent = unsafe {
                    libc::send(stream.as_raw_fd(), b"!".as_ptr().cast(), 1, libc::MSG_OOB)
                };
                if sent != 1 {
                    refused(std::io::Error::last_os_error());
                    break 'steps;
                }
            }
            Step::Pause(pause) => thread::sleep(*pause),
            Step::Fin => {
                let _ = stream.shutdown(Shutdown::Write);
            }
            Step::Reset { abrupt } => {
                let deadline = Instant::now() + STUCK;
                while !abrupt && unacknowledged(&stream) > 0 && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(1));
                }
                // The reader's copy of the socket must be closed first, or
                // the last close would not be this one.
                let _ = stream.shutdown(Shutdown::Read);
                let seen = reading.join().unwrap();
                SockRef::from(&stream)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                drop(stream);
                return seen;
            }
        }
    }
    let mut seen = reading.join().unwrap();
    if seen.end == End::Fin && reset_reported {
        seen.end = End::Reset;
    }
    seen
}

/// Where a script's client connects: sluice (one listener per engine), or
/// the backend directly.
struct Target {
    name: &'static str,
    /// Per engine: where the client connects, and the backend server's
    /// current script.
    lanes: Vec<Lane>,
    _sluice: Option<Sluice>,
    admin: Option<SocketAddr>,
}

struct Lane {
    connect_to: SocketAddr,
    /// sluice's admin endpoint, and the listener's name in its metrics.
    sluice: Option<(SocketAddr, &'static str)>,
    script: Arc<Mutex<Option<Script>>>,
    seen: Mutex<mpsc::Receiver<Seen>>,
    _backend: TestServer,
}

impl Lane {
    /// A backend server that plays the backend of the current script.
    fn backend() -> (TestServer, Arc<Mutex<Option<Script>>>, mpsc::Receiver<Seen>) {
        let script: Arc<Mutex<Option<Script>>> = Arc::default();
        let current = script.clone();
        let (report, seen) = mpsc::channel();
        let report = Mutex::new(report);
        let server = TestServer::start(move |stream| {
            let Some(script) = current.lock().unwrap().clone() else {
                return;
            };
            let seen = act(stream, &script.backend, script.seed, false);
            let _ = report.lock().unwrap().send(seen);
        });
        (server, script, seen)
    }

    /// Runs `script`: what the client and the backend read. (A client
    /// that resets may be gone before sluice takes it from the listen
    /// queue: then no backend connection comes, and none is waited for
    /// long.)
    fn run(&self, script: &Script) -> (Seen, Option<Seen>) {
        *self.script.lock().unwrap() = Some(script.clone());
        let (client, reset) = connect(self.connect_to, script.seed);
        let client_seen = act(client, &script.client, script.seed, reset);
        let wait = if script.client.resets() {
            Duration::from_secs(3)
        } else {
            2 * STUCK
        };
        let backend_seen = self.seen.lock().unwrap().recv_timeout(wait).ok();
        (client_seen, backend_seen)
    }

    /// Whether sluice holds no connection of this lane, once both sides
    /// are done (waiting a little: its closing may come just after).
    fn holds_nothing(&self) -> bool {
        let Some((admin, listener)) = self.sluice else {
            return true;
        };
        let label = format!("listener=\"{listener}\"");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let open = sample(&scrape(admin), "sluice_connections_active", &[&label]);
            if open.unwrap_or(0.0) == 0.0 {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Target {
    fn direct() -> Target {
        let lanes = ENGINES
            .iter()
            .map(|_| {
                let (backend, script, seen) = Lane::backend();
                Lane {
                    connect_to: backend.addr,
                    sluice: None,
                    script,
                    seen: Mutex::new(seen),
                    _backend: backend,
                }
            })
            .collect();
        Target {
            name: "direct",
            lanes,
            _sluice: None,
            admin: None,
        }
    }

    /// sluice with `io`: a listener and a pool per engine.
    fn sluice(io: &'static str) -> Target {
        let admin = free_addr(unique_loopback());
        let mut text = format!("io: {io}\nworkers: 2\nadmin:\n  listen: {admin}\nlisteners:\n");
        let mut pools = String::from("pools:\n");
        let mut lanes = Vec::new();
        for engine in ENGINES {
            let (backend, script, seen) = Lane::backend();
            let listen = free_addr(unique_loopback());
            text.push_str(&format!(
                "  {engine}: {{ listen: {listen}, pool: {engine} }}\n"
            ));
            pools.push_str(&format!(
                "  {engine}:\n    engine: {engine}\n    health: off\n    backends: [{{ address: {} }}]\n",
                backend.addr
            ));
            lanes.push(Lane {
                connect_to: listen,
                sluice: Some((admin, engine)),
                script,
                seen: Mutex::new(seen),
                _backend: backend,
            });
        }
        Target {
            name: io,
            lanes,
            _sluice: Some(Sluice::start(&(text + &pools))),
            admin: Some(admin),
        }
    }

    /// Runs `scripts`, the lanes side by side: the scripts that went
    /// against the rules, each with why.
    fn run(&self, scripts: &[Script]) -> Vec<(u64, String)> {
        let failures = Mutex::new(Vec::new());
        thread::scope(|scope| {
            for (engine, lane) in self.lanes.iter().enumerate() {
                let failures = &failures;
                scope.spawn(move || {
                    for script in scripts.iter().filter(|script| script.engine == engine) {
                        if failures.lock().unwrap().len() >= MAX_FAILURES {
                            // Enough to go on: a broken lane would make the
                            // rest wait out their timeouts.
                            return;
                        }
                        let (client, backend) = lane.run(script);
                        let why = self.judge(script, client, backend).or_else(|| {
                            (!lane.holds_nothing()).then(|| {
                                format!(
                                    "{} ({}): sluice kept the connection open",
                                    self.name, ENGINES[script.engine]
                                )
                            })
                        });
                        if let Some(why) = why {
                            eprintln!("seed {}: {why}", script.seed);
                            failures.lock().unwrap().push((script.seed, why));
                        }
                    }
                });
            }
        });
        failures.into_inner().unwrap()
    }

    /// Why what the sides read breaks the rules, if it does.
    fn judge(&self, script: &Script, client: Seen, backend: Option<Seen>) -> Option<String> {
        let mut wrong = Vec::new();
        let client_resets = script.client.resets();
        let Some(backend) = backend else {
            return (!client_resets).then(|| format!("{}: the backend never finished", self.name));
        };
        for (who, seen) in [(Who::Client, client), (Who::Backend, backend)] {
            if let Some(expected) = script.expected(who) {
                if !expected.met_by(&seen, script.seed) {
                    wrong.push(format!("{who:?} read {seen:?}, expected {expected:?}"));
                }
            }
        }
        (!wrong.is_empty()).then(|| {
            format!(
                "{} ({}): {}",
                self.name,
                ENGINES[script.engine],
                wrong.join("; ")
            )
        })
    }

    /// Once every script is done, sluice holds no connection.
    fn holds_nothing(&self) {
        let Some(admin) = self.admin else {
            return;
        };
        let open = || -> Vec<String> {
            scrape(admin)
                .lines()
                .filter(|l| l.starts_with("sluice_connections_active{") && !l.ends_with(" 0"))
                .map(str::to_owned)
                .collect()
        };
        let deadline = Instant::now() + DEADLINE;
        while !open().is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            open(),
            Vec::<String>::new(),
            "{}: connections left open",
            self.name
        );
    }
}

/// Runs `scripts` through every target; panics naming each seed that broke
/// a rule, with its script.
fn run_everywhere(scripts: &[Script]) {
    let targets = [
        Target::direct(),
        Target::sluice("io_uring"),
        Target::sluice("epoll"),
    ];
    let failures: Vec<(u64, String)> = thread::scope(|scope| {
        let runs: Vec<_> = targets
            .iter()
            .map(|target| scope.spawn(|| target.run(scripts)))
            .collect();
        runs.into_iter().flat_map(|r| r.join().unwrap()).collect()
    });
    for target in &targets {
        target.holds_nothing();
    }
    if !failures.is_empty() {
        let report: Vec<String> = failures
            .iter()
            .map(|(seed, why)| {
                let script = scripts.iter().find(|s| s.seed == *seed).unwrap();
                format!("seed {seed}: {why}\n  script: {script:?}\n  replay: SLUICE_DIFF_SEED={seed} cargo test --test differential")
            })
            .collect();
        panic!(
            "{} of {} scripts broke the rules:\n{}",
            failures.len(),
            scripts.len(),
            report.join("\n")
        );
    }
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}"))
    })
}

/// Seeds 0 to 299 (`SLUICE_DIFF_SEEDS` to change the count), or the one
/// `SLUICE_DIFF_SEED` names. The test drives both drivers itself, so the
/// second pass of `make test` (`SLUICE_TEST_IO=epoll`) skips it.
#[test]
fn both_drivers_and_a_direct_connection_follow_the_same_rules() {
    if std::env::var_os("SLUICE_TEST_IO").is_some() {
        eprintln!("skipped: this test runs both drivers itself");
        return;
    }
    let seeds = match env_number("SLUICE_DIFF_SEED") {
        Some(seed) => seed..seed + 1,
        None => 0..env_number("SLUICE_DIFF_SEEDS").unwrap_or(300),
    };
    let scripts: Vec<Script> = seeds.map(Script::new).collect();
    run_everywhere(&scripts);
}

/// `make soak`: `SLUICE_DIFF_SEEDS` (default 5000) seeds from a random
/// first one, printed so that a failure can be replayed.
#[test]
#[ignore]
fn many_seeds() {
    let count = env_number("SLUICE_DIFF_SEEDS").unwrap_or(5000);
    let first = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 1_000_000
        * 10_000;
    eprintln!("seeds {first} to {}", first + count - 1);
    let scripts: Vec<Script> = (first..first + count).map(Script::new).collect();
    run_everywhere(&scripts);
}

/// `SLUICE_DIFF_SEED=N cargo test --test differential -- --ignored
/// show_script --nocapture`: prints the script of seed N.
#[test]
#[ignore]
fn show_script() {
    match env_number("SLUICE_DIFF_SEED") {
        Some(seed) => eprintln!("{:#?}", Script::new(seed)),
        None => eprintln!("SLUICE_DIFF_SEED=N names the seed whose script to show"),
    }
}
