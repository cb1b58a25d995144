//! Faults, through the real binary: what sluice does when a backend, a
//! client, the service manager, the operator or the machine misbehaves.
//! Each test states the outcome sluice promises; together they hold any new
//! data path to today's behaviour.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use socket2::{Domain, SockRef, Socket, Type};

use common::*;

const MIB: usize = 1024 * 1024;

/// `config` with the admin endpoint on `admin` and connection logging.
fn with_admin(admin: SocketAddr, config: &str) -> String {
    format!("admin:\n  listen: {admin}\nlog:\n  connections: true\n{config}")
}

fn metric(admin: SocketAddr, family: &str, labels: &[&str]) -> f64 {
    sample(&scrape(admin), family, labels).unwrap_or(0.0)
}

/// Connects from `client` through sluice; the name line its backend sends.
fn read_name(stream: &TcpStream) -> std::io::Result<String> {
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line.trim_end().to_owned())
}

// ---- The service manager ----------------------------------------------

/// Reads notify datagrams until one carries `STOPPING=1`; returns the
/// state lines (READY, RELOADING, STOPPING) of each, in order.
fn states_until_stopping(socket: &UnixDatagram) -> Vec<String> {
    socket.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut states = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no STOPPING=1 after {states:?}: {e}"));
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        for line in message.lines() {
            if ["READY=1", "RELOADING=1", "STOPPING=1"].contains(&line) {
                states.push(line.to_owned());
            }
        }
        if states.last().is_some_and(|s| s == "STOPPING=1") {
            return states;
        }
    }
}

/// A service manager that does not read its notify socket (its queue holds
/// 10 datagrams) stalls nothing: five reloads apply, SIGTERM starts a
/// drain, and every state change still reaches the manager, in order, once
/// it reads.
#[test]
fn a_manager_that_reads_notify_late_stalls_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let manager = UnixDatagram::bind(&path).unwrap();
    let (_server, text) = behind_echo("");
    let sluice = Sluice::spawn_with_env(&text, &[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    sluice.wait_for_log("sluice is ready");
    for _ in 0..5 {
        let outcome = sluice.reload(&text);
        assert!(outcome.contains("configuration reloaded"), "{outcome}");
    }
    let mut open = connect_from(client_ip(1), sluice.listen_addr());
    echoes(&mut open, b"hi");
    sluice.signal(Signal::SIGTERM);
    sluice.wait_for_log("stopping: no new connections");

    // Now the manager reads.
    let mut expected = vec!["READY=1"];
    for _ in 0..5 {
        expected.extend(["RELOADING=1", "READY=1"]);
    }
    expected.push("STOPPING=1");
    assert_eq!(states_until_stopping(&manager), expected);
    drop(open);
    assert_eq!(sluice.wait_exit().code(), Some(0));
}

// ---- The operator ------------------------------------------------------

/// The name of a thread of process `pid` that is named `name`, if any.
fn has_thread(pid: u32, name: &str) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .any(|task| {
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == name)
        })
}

/// A reload stuck reading its file (here a FIFO nobody writes, as a file
/// on a hung network mount would be) does not keep SIGTERM from stopping
/// sluice at once.
#[test]
fn a_reload_stuck_reading_its_file_never_delays_a_stop() {
    let (_server, text) = behind_echo("");
    let sluice = Sluice::start(&text);
    let listen = sluice.listen_addr();
    std::fs::remove_file(sluice.config_path()).unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(sluice.config_path())
        .status()
        .unwrap();
    assert!(status.success());
    sluice.signal(Signal::SIGHUP);
    wait_until("a thread reading the configuration", || {
        has_thread(sluice.pid(), "sluice-reload")
    });
    // A second SIGHUP waits for the first.
    sluice.signal(Signal::SIGHUP);
    // Still serving.
    echoes(&mut connect_from(client_ip(2), listen), b"ping");

    sluice.signal(Signal::SIGTERM);
    sluice.wait_for_log("the reload under way is abandoned");
    assert_eq!(sluice.wait_exit().code(), Some(0));
}

/// A file nested deeply enough to keep a YAML parser busy for a minute is
/// refused on reload before it is parsed, and SIGTERM right after is
/// handled at once.
#[test]
fn a_pathological_file_on_reload_is_refused_before_it_is_parsed() {
    let (_server, text) = behind_echo("");
    let sluice = Sluice::start(&text);
    let nested = format!(
        "{text}extra: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let outcome = sluice.reload(&nested);
    assert!(
        outcome.contains("reload failed")
            && outcome.contains("nest deeper than the limit of 32 levels"),
        "{outcome}"
    );
    sluice.signal(Signal::SIGTERM);
    assert_eq!(sluice.wait_exit().code(), Some(0));
}

/// A storm of SIGHUPs while clients come and go: reloads coalesce, no
/// client fails, every reload succeeds, the last file read is the one in
/// use; then SIGTERM starts a drain and SIGINT ends it at once, with
/// status 0.
#[test]
fn a_storm_of_signals_fails_no_client() {
    let (_servers, backends) = name_servers(2);
    let listen = free_addr(unique_loopback());
    let text = config(listen, &backends, "");
    let sluice = Sluice::start(&text);
    let loops = ClientLoops::start(4, listen);
    loops.wait_for(20);
    for _ in 0..300 {
        sluice.signal(Signal::SIGHUP);
    }
    loops.wait_for(100);
    // The file changes (a second listener): one more SIGHUP, and the
    // change is in use once some reload after it has read it.
    let second = free_addr(unique_loopback());
    let changed = text.replace(
        "pools:\n",
        &format!(
            "  second:\n    listen: {}\n    pool: back\npools:\n",
            fmt_addr(second)
        ),
    );
    std::fs::write(sluice.config_path(), &changed).unwrap();
    sluice.signal(Signal::SIGHUP);
    wait_until("the second listener", || {
        round_trip(client_ip(9), second).is_ok()
    });
    let failures = loops.stop();
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(sluice.log_count("reload failed"), 0);
    assert!(sluice.log_count("configuration reloaded") >= 1);

    let mut open = connect_from(client_ip(3), listen);
    assert!(read_name(&open).is_ok());
    sluice.signal(Signal::SIGTERM);
    // Two signals sent at once would arrive as one: the kernel keeps one
    // of each kind pending.
    sluice.wait_for_log("stopping: no new connections");
    sluice.signal(Signal::SIGINT);
    sluice.wait_for_log("second signal: exiting now");
    assert_eq!(sluice.wait_exit().code(), Some(0));
    // The second signal cut the open connection.
    let _ = open.write_all(b"x");
    let mut buf = [0u8; 16];
    assert!(!matches!(open.read(&mut buf), Ok(n) if n > 0));
}

/// A client that streams both ways for the whole test, checking every byte
/// that comes back; the outcome is (bytes sent, bytes back and intact) or
/// what went wrong.
fn stream_until(
    to: SocketAddr,
    from: IpAddr,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Result<u64, String>> {
    thread::spawn(move || {
        let stream = connect_from(from, to);
        let mut reader = stream.try_clone().unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        let counted = sent.clone();
        let mut writer = stream;
        let sender = thread::spawn(move || {
            let mut noise = Noise::new(seed);
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                noise.fill(&mut buf);
                if let Err(e) = writer.write_all(&buf) {
                    return Err(format!("sending: {e}"));
                }
                counted.fetch_add(buf.len() as u64, Ordering::Relaxed);
                // Paced: a long-lived, lively connection, not a bulk one.
                thread::sleep(Duration::from_millis(1));
            }
            writer.shutdown(Shutdown::Write).unwrap();
            Ok(())
        });
        let mut expected = Noise::new(seed);
        let (mut got, mut want) = (vec![0u8; 4096], vec![0u8; 4096]);
        let mut received = 0u64;
        loop {
            let n = reader
                .read(&mut got)
                .map_err(|e| format!("receiving after {received} bytes: {e}"))?;
            if n == 0 {
                break;
            }
            // The noise is regenerated in the same 4096-byte steps it was
            // sent in; a read may end anywhere in one.
            let mut checked = 0;
            while checked < n {
                let offset = (received % 4096) as usize;
                if offset == 0 {
                    expected.fill(&mut want);
                }
                let take = (n - checked).min(4096 - offset);
                if got[checked..checked + take] != want[offset..offset + take] {
                    return Err(format!("corrupted near byte {received}"));
                }
                checked += take;
                received += take as u64;
            }
        }
        sender.join().unwrap()?;
        let sent = sent.load(Ordering::Relaxed);
        if received != sent {
            return Err(format!("sent {sent} bytes, {received} came back"));
        }
        Ok(sent)
    })
}

/// Fifty reloads, changing the pool each time, under long-lived streaming
/// connections and short ones: no connection fails, no byte is lost or
/// corrupted.
#[test]
fn fifty_reloads_under_streaming_load_lose_no_byte() {
    let echoes: Vec<TestServer> = (0..3)
        .map(|_| TestServer::start(|mut stream| echo(&mut stream)))
        .collect();
    let listen = free_addr(unique_loopback());
    let backends: Vec<(String, SocketAddr)> = echoes
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("echo-{i}"), s.addr))
        .collect();
    let sluice = Sluice::start(&config(listen, &backends, ""));
    let stop = Arc::new(AtomicBool::new(false));
    let streams: Vec<_> = (0..8)
        .map(|i| stream_until(listen, client_ip(100 + i), 10 + i as u64, stop.clone()))
        .collect();
    let (name_servers, names) = name_servers(2);
    // Short connections go through a second listener to the name servers.
    let short = free_addr(unique_loopback());
    let with_short = |backends: &[(String, SocketAddr)], balance: &str| {
        let mut text = config(listen, backends, &format!("    balance: {balance}\n"));
        text = text.replace(
            "pools:\n",
            &format!(
                "  short:\n    listen: {}\n    pool: names\npools:\n",
                fmt_addr(short)
            ),
        );
        text.push_str("  names:\n    health: off\n    backends:\n");
        for (name, addr) in &names {
            text.push_str(&format!("      - address: {addr}\n        name: {name}\n"));
        }
        text
    };
    sluice.reload(&with_short(&backends, "maglev"));
    let loops = ClientLoops::start(4, short);
    for i in 0..50 {
        // Drop a backend, change the algorithm, bring it back: the
        // streaming connections keep the backend they were given.
        let kept = if i % 2 == 0 {
            &backends[..2]
        } else {
            &backends[..]
        };
        let balance = ["maglev", "round_robin", "least_connections"][i % 3];
        let outcome = sluice.reload(&with_short(kept, balance));
        assert!(outcome.contains("configuration reloaded"), "{outcome}");
    }
    loops.wait_for(50);
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for stream in streams {
        total += stream.join().unwrap().expect("a streaming connection");
    }
    let failures = loops.stop();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(total > 0);
    drop(name_servers);
}

// ---- Backends ----------------------------------------------------------

/// A listening socket that never completes a handshake: its accept queue
/// (one place) is full, so the kernel drops further SYNs and a connect to
/// it hangs, as one to a blackholed address would.
fn blackhole() -> (Socket, TcpStream) {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::new(unique_loopback(), 0).into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    // Fills the queue; never accepted.
    let filler = TcpStream::connect(addr).unwrap();
    (socket, filler)
}

/// A blackholed backend: connects time out after `connect_timeout`, the
/// client is retried onto its next backend and served, and `fall` timeouts
/// in a row take the blackholed backend out, so later clients go straight
/// to their next choice. Timed-out sockets are closed at once.
#[test]
fn a_blackholed_backend_times_out_and_its_clients_move_on() {
    let (hole, _filler) = blackhole();
    let dark = hole.local_addr().unwrap().as_socket().unwrap();
    let lit = name_server("lit");
    let admin = free_addr(unique_loopback());
    let text = with_admin(
        admin,
        &config(
            free_addr(unique_loopback()),
            &[("dark".into(), dark), ("lit".into(), lit.addr)],
            "    connect_timeout: 200ms\n    retries: 1\n    \
             health: { interval: 60s, timeout: 1s, fall: 2, rise: 1 }\n",
        ),
    );
    let sluice = Sluice::start(&text);
    // Clients whose first choice is the dark backend.
    let clients: Vec<IpAddr> = (0..500)
        .map(client_ip)
        .filter(|ip| explain(sluice.config_path(), "back", &ip.to_string()).0 == "dark")
        .take(3)
        .collect();
    assert_eq!(clients.len(), 3);
    let descriptors = open_descriptors(sluice.pid());

    for (i, &client) in clients[..2].iter().enumerate() {
        let started = Instant::now();
        let stream = connect_from(client, sluice.listen_addr());
        assert_eq!(
            read_name(&stream).unwrap(),
            "lit",
            "retried onto its next backend"
        );
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(
            metric(
                admin,
                "sluice_connection_errors_total",
                &["reason=\"connect_timeout\""]
            ),
            (i + 1) as f64
        );
    }
    sluice.wait_for_log("backend is down: 2 connections in a row failed");
    assert_eq!(
        metric(admin, "sluice_backend_up", &["backend=\"dark\""]),
        0.0
    );
    let stream = connect_from(clients[2], sluice.listen_addr());
    assert_eq!(read_name(&stream).unwrap(), "lit");
    assert_eq!(
        metric(
            admin,
            "sluice_connection_errors_total",
            &["reason=\"connect_timeout\""]
        ),
        2.0,
        "the ejected backend is not tried"
    );
    drop(stream);
    wait_until("the timed-out sockets to be closed", || {
        open_descriptors(sluice.pid()) <= descriptors
    });
}

/// A backend that resets in the middle of its reply: the client receives a
/// prefix of the reply, intact, then a reset; never a clean end of stream
/// that would pass the truncated reply off as whole. With every engine.
#[test]
fn a_backend_that_resets_mid_stream_is_passed_on_as_a_reset() {
    for engine in ["splice", "copy", "auto"] {
        let server = TestServer::start(|mut stream| {
            let mut request = [0u8; 4];
            stream.read_exact(&mut request).unwrap();
            // Big enough for `auto` to switch to splicing.
            send_noise(&mut stream, 7, 4 * MIB);
            SockRef::from(&stream)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        });
        let sluice = Sluice::start(&config(
            free_addr(unique_loopback()),
            &[("resetter".into(), server.addr)],
            &format!("    engine: {engine}\n"),
        ));
        let mut client = connect_from(client_ip(20), sluice.listen_addr());
        client.write_all(b"GET!").unwrap();
        let mut expected = Noise::new(7);
        let (mut got, mut want) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
        let mut received = 0usize;
        let error = loop {
            match client.read(&mut got) {
                Ok(0) => panic!("{engine}: a clean end of stream after {received} bytes"),
                Ok(n) => {
                    // Checked in the sender's 64 KiB steps.
                    let mut checked = 0;
                    while checked < n {
                        let offset = received % want.len();
                        if offset == 0 {
                            expected.fill(&mut want);
                        }
                        let take = (n - checked).min(want.len() - offset);
                        assert_eq!(
                            got[checked..checked + take],
                            want[offset..offset + take],
                            "{engine}: corrupted near byte {received}"
                        );
                        checked += take;
                        received += take;
                    }
                }
                Err(e) => break e,
            }
        };
        assert_eq!(
            error.kind(),
            std::io::ErrorKind::ConnectionReset,
            "{engine}"
        );
        assert!(received <= 4 * MIB);
    }
}

/// A client that reads slowly while its backend sends 192 MiB as fast as
/// it can: sluice holds no more than a bounded amount for it (its memory
/// stays flat), and every byte arrives intact. With every engine.
#[test]
fn a_slow_reader_keeps_memory_flat_and_gets_every_byte() {
    const TOTAL: usize = 192 * MIB;
    for engine in ["splice", "copy", "auto"] {
        let server = TestServer::start(|mut stream| {
            let mut request = [0u8; 4];
            stream.read_exact(&mut request).unwrap();
            send_noise(&mut stream, 3, TOTAL);
        });
        let sluice = Sluice::start(&config(
            free_addr(unique_loopback()),
            &[("firehose".into(), server.addr)],
            &format!("    engine: {engine}\n"),
        ));
        let pid = sluice.pid();
        let mut client = connect_from(client_ip(30), sluice.listen_addr());
        client.write_all(b"GET!").unwrap();
        let before = rss_kib(pid);
        let peak = Arc::new(AtomicU64::new(before));
        let done = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (peak, done) = (peak.clone(), done.clone());
            thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                    thread::sleep(Duration::from_millis(20));
                }
            })
        };
        // Slow for the first 16 MiB (about a second), then as fast as the
        // relay goes.
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut received = 0;
        loop {
            let slow = received < 16 * MIB;
            let chunk = if slow { 16 * 1024 } else { buf.len() };
            let n = client.read(&mut buf[..chunk]).expect("reading the stream");
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            received += n;
            if slow {
                // A deliberately slow reader, not a wait for an event.
                thread::sleep(Duration::from_millis(1));
            }
        }
        done.store(true, Ordering::Relaxed);
        sampler.join().unwrap();
        assert_eq!(received, TOTAL, "{engine}");
        assert_eq!(
            hasher.digest(),
            send_noise(&mut std::io::sink(), 3, TOTAL),
            "{engine}: corrupted"
        );
        let growth = peak.load(Ordering::Relaxed).saturating_sub(before);
        assert!(
            growth < 8 * 1024,
            "{engine}: sluice grew by {growth} KiB while relaying to a slow reader"
        );
    }
}

// ---- The machine -------------------------------------------------------

/// Many slow readers at once, each behind a backend sending 1 MiB: more
/// bytes wait for their destinations than the io_uring driver's buffer ring
/// holds (256 buffers per worker), and receives in the same instant can
/// find it empty (ENOBUFS). No connection fails for that: once the readers
/// read, every byte of every stream arrives intact. (On epoll, the same
/// load through the scratch buffer.)
#[test]
fn slow_readers_that_drain_the_buffer_ring_lose_nothing() {
    const CLIENTS: u64 = 160;
    const EACH: usize = MIB;
    let server = TestServer::start(|mut stream| {
        let mut seed = [0u8; 1];
        stream.read_exact(&mut seed).unwrap();
        send_noise(&mut stream, u64::from(seed[0]), EACH);
    });
    let sluice = Sluice::start(&config(
        free_addr(unique_loopback()),
        &[("firehose".into(), server.addr)],
        "    engine: copy\n",
    ));
    let mut clients: Vec<TcpStream> = (0..CLIENTS)
        .map(|i| {
            let mut client = connect_from(client_ip(40 + i as u32 % 50), sluice.listen_addr());
            client.write_all(&[i as u8]).unwrap();
            client
        })
        .collect();
    // Nobody reads until every client's receive queue has filled up:
    // sluice then holds what the backends sent beyond it.
    wait_until("every reader's queue to fill", || {
        clients.iter().all(|c| queued(c) >= 32 * 1024)
    });
    let readers: Vec<_> = clients
        .drain(..)
        .enumerate()
        .map(|(i, mut client)| {
            thread::spawn(move || {
                let (received, digest) = drain(&mut client, 64 * 1024, None);
                (i, received, digest)
            })
        })
        .collect();
    for reader in readers {
        let (i, received, digest) = reader.join().unwrap();
        assert_eq!(received, EACH, "client {i}");
        let expected = send_noise(&mut std::io::sink(), i as u64, EACH);
        assert_eq!(digest, expected, "client {i}: corrupted");
    }
}

/// Bytes waiting in `client`'s receive queue.
fn queued(client: &TcpStream) -> usize {
    let mut bytes: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(client),
            libc::FIONREAD,
            &mut bytes,
        )
    };
    bytes as usize
}

/// Clients that never read, behind backends that send without pause and
/// no idle timeout to clear them away: sluice holds a bounded amount for
/// each (on io_uring, none of it in the worker's shared buffer ring), so a
/// client that comes after them is served at once. With the engines that
/// copy.
#[test]
fn clients_that_never_read_starve_no_other_client() {
    const STUCK: u32 = 96;
    // `f`: a firehose that never stops; `e`: an echo.
    let sent = Arc::new(AtomicU64::new(0));
    let server = TestServer::start({
        let sent = sent.clone();
        move |mut stream| {
            let mut mode = [0u8; 1];
            if stream.read_exact(&mut mode).is_err() {
                return;
            }
            if mode[0] == b'e' {
                return echo(&mut stream);
            }
            let chunk = [b'x'; 16 * 1024];
            while stream.write_all(&chunk).is_ok() {
                sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }
    });
    for engine in ["copy", "auto"] {
        // One worker: every connection shares one buffer ring.
        let text = config(
            free_addr(unique_loopback()),
            &[("mixed".into(), server.addr)],
            &format!("    engine: {engine}\n"),
        )
        .replace("workers: 2", "workers: 1");
        let sluice = Sluice::start(&text);
        let before = rss_kib(sluice.pid());
        let stuck: Vec<TcpStream> = (0..STUCK)
            .map(|i| {
                let mut client = connect_from(client_ip(40 + i % 50), sluice.listen_addr());
                client.write_all(b"f").unwrap();
                client
            })
            .collect();
        // Until every buffer on the way is full: the firehoses stop.
        let mut last = u64::MAX;
        wait_until("the firehoses to stall", || {
            thread::sleep(Duration::from_millis(500));
            let now = sent.load(Ordering::Relaxed);
            std::mem::replace(&mut last, now) == now && stuck.iter().all(|c| queued(c) >= 32 * 1024)
        });
        // Eight more at once, each echoing 256 KiB: more than the stuck
        // ones could have left in the ring. Every one is served (a read
        // that waits 10 s fails the test), every byte intact.
        const ECHOED: usize = 256 * 1024;
        let message: Arc<Vec<u8>> = Arc::new((0..ECHOED).map(|i| i as u8).collect());
        let fresh: Vec<_> = (0..8)
            .map(|i| {
                let client = connect_from(client_ip(100 + i), sluice.listen_addr());
                let message = message.clone();
                thread::spawn(move || {
                    client
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                    let mut writer = client.try_clone().unwrap();
                    let writer = thread::spawn(move || {
                        writer.write_all(b"e")?;
                        writer.write_all(&message)
                    });
                    let echoed = drain(&mut (&client).take(ECHOED as u64), 64 * 1024, None);
                    writer.join().unwrap().unwrap();
                    echoed
                })
            })
            .collect();
        for (i, echo) in fresh.into_iter().enumerate() {
            let (received, digest) = echo
                .join()
                .unwrap_or_else(|_| panic!("{engine}: fresh client {i} was not served"));
            assert_eq!(received, ECHOED, "{engine}: fresh client {i}");
            assert_eq!(
                digest,
                xxhash_rust::xxh3::xxh3_64(&message),
                "{engine}: client {i}"
            );
        }
        let growth = rss_kib(sluice.pid()).saturating_sub(before);
        let each = growth / u64::from(STUCK);
        assert!(
            each < 256,
            "{engine}: sluice holds {each} KiB for each client that does not read"
        );
        drop(stuck);
    }
}

/// sluice in front of two name servers, `backend-0` and `backend-1`, with
/// `pool` settings and metrics on `admin`.
fn name_pair(admin: SocketAddr, pool: &str) -> (Vec<TestServer>, String) {
    let (servers, backends) = name_servers(2);
    let text = with_admin(
        admin,
        &config(free_addr(unique_loopback()), &backends, pool),
    );
    (servers, text)
}

/// Clients waiting in the accept queues of the listening sockets on `addr`
/// (an IPv4 address; one socket per worker).
fn accept_queue(addr: SocketAddr) -> usize {
    let IpAddr::V4(ip) = addr.ip() else {
        panic!("an IPv4 listener");
    };
    // /proc/net/tcp writes the address as the hexadecimal of its bytes in
    // memory order, then the port.
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(ip.octets()),
        addr.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // For a listening socket (state 0A), rx_queue is the accept queue.
            (fields[1] == local && fields[3] == "0A").then(|| {
                let (_, rx) = fields[4].split_once(':').unwrap();
                usize::from_str_radix(rx, 16).unwrap()
            })
        })
        .sum()
}

/// Under a descriptor limit of 256, sluice computes its capacity, logs and
/// exports it, and at that capacity stops accepting: further clients wait
/// in the listen backlog (not one is accepted early) and are served as
/// connections close. No backend is blamed, none is ejected, no connect
/// fails.
#[test]
fn at_the_descriptor_capacity_clients_wait_and_no_backend_is_blamed() {
    let admin = free_addr(unique_loopback());
    // Probes every 200 ms; two failures take a backend out.
    let (_servers, text) = name_pair(
        admin,
        "    health: { interval: 200ms, timeout: 100ms, fall: 2, rise: 1 }\n",
    );
    let sluice = Sluice::start_with_descriptor_limit(&text, 256);
    let line = sluice.wait_for_log("descriptor limit 256: room for");
    let capacity = metric(admin, "sluice_connections_capacity", &[]) as usize;
    assert!(
        line.contains(&format!("room for {capacity} connections")),
        "{line}"
    );
    assert!((50..128).contains(&capacity), "{capacity}");

    let total = capacity + 30;
    let served = Arc::new(AtomicUsize::new(0));
    let clients: Vec<(TcpStream, thread::JoinHandle<()>)> = (0..total as u32)
        .map(|i| {
            let stream = connect_from(client_ip(1000 + i), sluice.listen_addr());
            let reader = stream.try_clone().unwrap();
            let served = served.clone();
            let waiter = thread::spawn(move || {
                let name = read_name(&reader).expect("a backend's name, sooner or later");
                assert!(name.starts_with("backend-"), "{name:?}");
                served.fetch_add(1, Ordering::SeqCst);
            });
            (stream, waiter)
        })
        .collect();
    wait_until("the capacity to fill", || {
        served.load(Ordering::SeqCst) == capacity
    });
    // The clients beyond the capacity wait in the kernel's accept queue:
    // sluice takes at most one it has no room for per accept loop (one per
    // worker here), and keeps it until there is room.
    const LOOPS: usize = 2;
    wait_until(
        "the clients beyond the capacity in the accept queue",
        || accept_queue(sluice.listen_addr()) >= 30 - LOOPS,
    );
    sluice.wait_for_log("all the descriptor limit allows");
    assert!(metric(admin, "sluice_accept_paused_total", &[]) >= 1.0);

    // Each connection that closes lets one waiting client in.
    let mut clients = clients.into_iter();
    let mut closed = 0;
    for (stream, waiter) in clients.by_ref().take(10) {
        drop(stream);
        waiter.join().unwrap();
        closed += 1;
        assert!(served.load(Ordering::SeqCst) <= capacity + closed);
    }
    wait_until("ten waiting clients to be served", || {
        served.load(Ordering::SeqCst) == capacity + 10
    });
    // Room for ten did not empty the accept queue into sluice.
    let waiting = accept_queue(sluice.listen_addr());
    assert!(waiting >= 20 - LOOPS, "{waiting} left in the accept queue");
    for (stream, waiter) in clients {
        drop(stream);
        waiter.join().unwrap();
    }
    assert_eq!(served.load(Ordering::SeqCst), total);

    assert_eq!(sluice.log_count("backend is down"), 0);
    assert_eq!(sluice.log_count("Too many open files"), 0);
    let metrics = scrape(admin);
    for backend in ["backend-0", "backend-1"] {
        let label = format!("backend=\"{backend}\"");
        assert_eq!(sample(&metrics, "sluice_backend_up", &[&label]), Some(1.0));
    }
    for reason in ["connect_refused", "out_of_resources", "no_backend"] {
        let label = format!("reason=\"{reason}\"");
        assert_eq!(
            sample(&metrics, "sluice_connection_errors_total", &[&label]),
            Some(0.0),
            "{reason}"
        );
    }
}

/// A listener that a reload removes while sluice is at capacity stops at
/// once on every worker, although its accept loops were waiting for room.
#[test]
fn a_listener_removed_at_capacity_stops_at_once() {
    let admin = free_addr(unique_loopback());
    let (_servers, text) = name_pair(admin, "");
    let text = text.replace("log:\n", "log:\n  level: debug\n");
    let sluice = Sluice::start_with_descriptor_limit(&text, 256);
    let capacity = metric(admin, "sluice_connections_capacity", &[]) as usize;
    let held: Vec<TcpStream> = (0..capacity as u32)
        .map(|i| connect_from(client_ip(3000 + i), sluice.listen_addr()))
        .collect();
    for stream in &held {
        read_name(stream).unwrap();
    }
    // One more waits in the backlog; both workers' loops wait for room.
    let _waiting = connect_from(client_ip(2999), sluice.listen_addr());
    sluice.wait_for_log("all the descriptor limit allows");
    let moved = text.replace(
        &fmt_addr(sluice.listen_addr()),
        &fmt_addr(free_addr(unique_loopback())),
    );
    sluice.reload(&moved);
    sluice.wait_for_log_count("listener stopped", 2);
    drop(held);
}

/// Sets the soft descriptor limit of process `pid` (0: this process) to
/// `soft`, or to its hard limit.
fn set_descriptor_limit(pid: u32, soft: Option<u64>) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit reads the pid and writes `limit`, both valid.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut limit,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    limit.rlim_cur = soft.unwrap_or(limit.rlim_max);
    // SAFETY: as above.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

/// The lowest descriptor number process `pid` has free.
fn lowest_free_descriptor(pid: u32) -> u64 {
    let mut used: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    used.sort_unstable();
    (0..).find(|n| used.binary_search(n).is_err()).unwrap()
}

/// When descriptors run out anyway (the limit lowered under a running
/// sluice), a client accepted with the last descriptor cannot be given a
/// backend connection: it is closed and counted as `out_of_resources`, and
/// the backends are not blamed: more failures in a row than `fall` eject
/// nothing.
#[test]
fn a_connect_that_fails_for_want_of_descriptors_is_not_the_backends_fault() {
    let admin = free_addr(unique_loopback());
    let (_servers, text) = name_pair(
        admin,
        "    engine: copy\n    health: { interval: 60s, timeout: 1s, fall: 2, rise: 1 }\n",
    );
    let sluice = Sluice::start(&text);
    let pid = sluice.pid();
    for i in 0..4 {
        // One descriptor left: the accepted client takes it.
        set_descriptor_limit(pid, Some(lowest_free_descriptor(pid) + 1));
        let stream = connect_from(client_ip(40 + i), sluice.listen_addr());
        let mut buf = [0u8; 64];
        let outcome = (&stream).read(&mut buf);
        assert!(
            matches!(outcome, Ok(0) | Err(_)),
            "closed without a backend, got {outcome:?}"
        );
        set_descriptor_limit(pid, None);
    }
    sluice.wait_for_log("not counted against it");
    assert_eq!(sluice.log_count("backend is down"), 0);
    let metrics = scrape(admin);
    let resources = sample(
        &metrics,
        "sluice_connection_errors_total",
        &["reason=\"out_of_resources\""],
    )
    .unwrap();
    assert!(resources >= 4.0, "{resources}");
    for backend in ["backend-0", "backend-1"] {
        let label = format!("backend=\"{backend}\"");
        assert_eq!(sample(&metrics, "sluice_backend_up", &[&label]), Some(1.0));
    }
    // With descriptors back, clients are served.
    let stream = connect_from(client_ip(50), sluice.listen_addr());
    assert!(read_name(&stream).unwrap().starts_with("backend-"));
}

/// Two thousand clients at once, from two hundred addresses, through to a
/// real redis-server: every one is served, all are counted open together,
/// and once they leave sluice holds no more descriptors than before.
#[test]
fn a_storm_of_two_thousand_clients_is_served() {
    const CLIENTS: usize = 2000;
    // The clients' descriptors, and what redis-server inherits.
    set_descriptor_limit(0, None);
    let redis = redis_server_with(&["--tcp-backlog", "4096", "--maxclients", "4000"]);
    let admin = free_addr(unique_loopback());
    let sluice = Sluice::start(
        &with_admin(
            admin,
            &config(
                free_addr(unique_loopback()),
                &[("redis".into(), redis.addr)],
                "",
            ),
        )
        .replace("log:\n  connections: true\n", "")
        .replacen("    listen: ", "    backlog: 4096\n    listen: ", 1),
    );
    let to = sluice.listen_addr();
    let descriptors = open_descriptors(sluice.pid());
    let connected = Mutex::new(Vec::with_capacity(CLIENTS));
    thread::scope(|scope| {
        for t in 0..16 {
            let connected = &connected;
            scope.spawn(move || {
                for i in (t..CLIENTS).step_by(16) {
                    let mut stream = connect_from(client_ip((i % 200) as u32), to);
                    stream.write_all(b"PING\r\n").unwrap();
                    connected.lock().unwrap().push(stream);
                }
            });
        }
    });
    let mut streams = connected.into_inner().unwrap();
    for stream in &mut streams {
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"+PONG\r\n");
    }
    let open = metric(admin, "sluice_connections_active", &["backend=\"redis\""]);
    assert_eq!(open, CLIENTS as f64);
    drop(streams);
    wait_until("every connection to close", || {
        metric(admin, "sluice_connections_active", &["backend=\"redis\""]) == 0.0
    });
    wait_until("sluice's descriptors to return to what they were", || {
        open_descriptors(sluice.pid()) <= descriptors
    });
}

/// A resolver that never answers fails a reload within the lookup's time
/// limit (10 s), with the name it could not resolve, instead of holding the
/// reload for as long as the resolver's retries take (here 30 s).
#[test]
fn a_resolver_that_never_answers_fails_a_reload_in_ten_seconds() {
    let Some(netns) = NetNs::new("dns") else {
        return;
    };
    netns.etc(
        "resolv.conf",
        "nameserver 127.0.0.1\noptions timeout:30 attempts:1\n",
    );
    // Takes every query and answers none.
    let _silent = netns.enter(|| std::net::UdpSocket::bind("127.0.0.1:53").unwrap());
    let listen: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    let text = config(
        listen,
        &[("ip".into(), "127.0.0.1:7001".parse().unwrap())],
        "",
    );
    let sluice = Sluice::start_in(&netns, &text);
    let host = format!("sluice-{}.invalid", std::process::id());
    let slow = text.replace("address: 127.0.0.1:7001", &format!("address: {host}:7001"));
    let started = Instant::now();
    let outcome = sluice.reload(&slow);
    assert!(
        outcome.contains("reload failed")
            && outcome.contains(&format!(
                "cannot resolve host \"{host}\": no answer within 10s"
            )),
        "{outcome}"
    );
    assert!(started.elapsed() >= Duration::from_secs(10));
    sluice.signal(Signal::SIGTERM);
    assert_eq!(sluice.wait_exit().code(), Some(0));
}
