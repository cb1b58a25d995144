//! Bytes through the real binary: large transfers intact both ways, a slow
//! reader, half-close in each direction, and peers that vanish, with each
//! relay engine.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::*;

const MIB: usize = 1024 * 1024;

/// Every value of `pools.*.engine`: each test below runs with all of them.
const ENGINES: [&str; 3] = ["splice", "copy", "auto"];

/// The pool setting that selects `engine`.
fn engine_key(engine: &str) -> String {
    format!("    engine: {engine}\n")
}

/// A backend that streams `total` bytes of noise (seed 2) to the client
/// while hashing everything it receives, then reports (bytes, hash) of what
/// it received. `pause` makes it a slow reader.
fn sink_and_source(
    total: usize,
    pause: Option<Duration>,
) -> (TestServer, mpsc::Receiver<(usize, u64)>) {
    let (report, received) = mpsc::channel();
    let report = std::sync::Mutex::new(report);
    let server = TestServer::start(move |stream| {
        let mut writer = stream.try_clone().unwrap();
        let sender = thread::spawn(move || {
            send_noise(&mut writer, 2, total);
            writer.shutdown(Shutdown::Write).unwrap();
        });
        let mut reader = stream;
        let got = drain(&mut reader, 16 * 1024, pause);
        sender.join().unwrap();
        report.lock().unwrap().send(got).unwrap();
    });
    (server, received)
}

/// Sends `total` bytes (seed 1) and receives `total` bytes (seed 2) through
/// sluice at the same time; checks both arrive intact.
fn transfer_both_ways(engine: &str, total: usize, backend_pause: Option<Duration>) {
    let (server, received) = sink_and_source(total, backend_pause);
    let sluice = Sluice::start(&config(
        free_addr(unique_loopback()),
        &[("sink".into(), server.addr)],
        &engine_key(engine),
    ));
    let client = connect_from(client_ip(1), sluice.listen_addr());
    let mut writer = client.try_clone().unwrap();
    let sent = thread::spawn(move || {
        let hash = send_noise(&mut writer, 1, total);
        writer.shutdown(Shutdown::Write).unwrap();
        hash
    });
    let mut reader = client;
    let (got_bytes, got_hash) = drain(&mut reader, 64 * 1024, None);
    let sent_hash = sent.join().unwrap();

    let expected_from_backend = send_noise(&mut std::io::sink(), 2, total);
    assert_eq!(got_bytes, total, "{engine}: bytes from the backend");
    assert_eq!(
        got_hash, expected_from_backend,
        "{engine}: data from the backend corrupted"
    );
    let (backend_bytes, backend_hash) = received.recv_timeout(DEADLINE).unwrap();
    assert_eq!(backend_bytes, total, "{engine}: bytes to the backend");
    assert_eq!(
        backend_hash, sent_hash,
        "{engine}: data to the backend corrupted"
    );
}

#[test]
fn thirty_two_mib_each_way_arrive_intact() {
    for engine in ENGINES {
        transfer_both_ways(engine, 32 * MIB, None);
    }
}

#[test]
fn a_slow_reading_backend_gets_everything_intact() {
    // 1 ms after every read of at most 16 KiB: over 2 s for 32 MiB, far
    // slower than the client sends, so the socket buffers on the way fill
    // and the relay must wait for the backend without losing a byte.
    for engine in ENGINES {
        transfer_both_ways(engine, 32 * MIB, Some(Duration::from_millis(1)));
    }
}

#[test]
fn client_half_close_reaches_the_backend_and_the_reply_still_flows() {
    for engine in ENGINES {
        client_half_close_reaches_the_backend_and_the_reply_still_flows_with(engine);
    }
}

fn client_half_close_reaches_the_backend_and_the_reply_still_flows_with(engine: &str) {
    // The backend reads to end of stream, then answers with what it counted.
    let server = TestServer::start(|mut stream| {
        let mut data = Vec::new();
        stream.read_to_end(&mut data).unwrap();
        write!(stream, "received {} bytes", data.len()).unwrap();
    });
    let sluice = Sluice::start(&config(
        free_addr(unique_loopback()),
        &[("counter".into(), server.addr)],
        &engine_key(engine),
    ));
    let mut client = connect_from(client_ip(2), sluice.listen_addr());
    client.write_all(&[7u8; 100_000]).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut reply = String::new();
    client.read_to_string(&mut reply).unwrap();
    assert_eq!(reply, "received 100000 bytes");
}

#[test]
fn backend_half_close_reaches_the_client_and_the_request_still_flows() {
    for engine in ENGINES {
        backend_half_close_reaches_the_client_and_the_request_still_flows_with(engine);
    }
}

fn backend_half_close_reaches_the_client_and_the_request_still_flows_with(engine: &str) {
    // The backend greets and closes its sending side at once, then keeps
    // reading and reports what it got.
    let (report, received) = mpsc::channel();
    let report = std::sync::Mutex::new(report);
    let server = TestServer::start(move |mut stream| {
        stream.write_all(b"hello, then FIN").unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let mut data = Vec::new();
        stream.read_to_end(&mut data).unwrap();
        report.lock().unwrap().send(data).unwrap();
    });
    let sluice = Sluice::start(&config(
        free_addr(unique_loopback()),
        &[("greeter".into(), server.addr)],
        &engine_key(engine),
    ));
    let mut client = connect_from(client_ip(3), sluice.listen_addr());
    let mut greeting = String::new();
    client.read_to_string(&mut greeting).unwrap(); // ends only on the FIN
    assert_eq!(greeting, "hello, then FIN");
    client.write_all(b"still talking").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(received.recv_timeout(DEADLINE).unwrap(), b"still talking");
}

/// Closes `stream` with a reset instead of a FIN.
fn reset(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
}

#[test]
fn a_client_that_vanishes_ends_its_backend_connection() {
    for engine in ENGINES {
        a_client_that_vanishes_ends_its_backend_connection_with(engine);
    }
}

fn a_client_that_vanishes_ends_its_backend_connection_with(engine: &str) {
    let (ended, backend_saw_end) = mpsc::channel();
    let ended = std::sync::Mutex::new(ended);
    let server = TestServer::start(move |mut stream| {
        echo(&mut stream);
        ended.lock().unwrap().send(()).unwrap();
    });
    let sluice = Sluice::start(&config(
        free_addr(unique_loopback()),
        &[("echo".into(), server.addr)],
        &engine_key(engine),
    ));
    let mut client = connect_from(client_ip(4), sluice.listen_addr());
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    client.read_exact(&mut buf).unwrap();
    reset(client);
    backend_saw_end
        .recv_timeout(DEADLINE)
        .expect("the backend connection was not closed");

    // sluice keeps serving.
    let mut again = connect_from(client_ip(5), sluice.listen_addr());
    again.write_all(b"pong").unwrap();
    again.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
}

#[test]
fn a_backend_reset_ends_the_client_connection() {
    for engine in ENGINES {
        a_backend_reset_ends_the_client_connection_with(engine);
    }
}

fn a_backend_reset_ends_the_client_connection_with(engine: &str) {
    let server = TestServer::start(|mut stream| {
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).unwrap();
        reset(stream);
    });
    let sluice = Sluice::start(&config(
        free_addr(unique_loopback()),
        &[("resetter".into(), server.addr)],
        &engine_key(engine),
    ));
    let mut client = connect_from(client_ip(6), sluice.listen_addr());
    client.write_all(b"hello").unwrap();
    let mut buf = [0u8; 16];
    // The client sees a reset, not a clean end of stream that could pass a
    // truncated reply for a complete one.
    let error = client.read(&mut buf).expect_err("a reset, not data or EOF");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
}

#[test]
fn a_backend_that_accepts_but_never_answers_holds_only_its_client() {
    // Accepts and reads forever, never writes.
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = connections.clone();
    let silent = TestServer::start(move |mut stream| {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut buf = [0u8; 1024];
        while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
    });
    let sluice = Sluice::start(&config(
        free_addr(unique_loopback()),
        &[("silent".into(), silent.addr)],
        "",
    ));
    let mut stuck = connect_from(client_ip(7), sluice.listen_addr());
    stuck.write_all(b"anyone?").unwrap();
    stuck
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 1];
    let err = stuck
        .read(&mut buf)
        .expect_err("the silent backend must not answer");
    assert!(matches!(
        err.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ));
    // Other clients are still accepted and connected meanwhile.
    let _other = connect_from(client_ip(8), sluice.listen_addr());
    wait_until("a second backend connection", || {
        connections.load(std::sync::atomic::Ordering::SeqCst) == 2
    });
}

#[test]
fn ipv6_listener_and_backend() {
    let listener = std::net::TcpListener::bind("[::1]:0").unwrap();
    let backend_addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (mut stream, peer) = listener.accept().unwrap();
        stream.write_all(peer.ip().to_string().as_bytes()).unwrap();
    });
    let front = free_addr("::1".parse().unwrap());
    let sluice = Sluice::start(&config(front, &[("v6".into(), backend_addr)], ""));
    let mut client = TcpStream::connect(front).unwrap();
    let mut seen_by_backend = String::new();
    client.read_to_string(&mut seen_by_backend).unwrap();
    assert_eq!(seen_by_backend, "::1");
    server.join().unwrap();
    drop(sluice);
}

/// A client that goes on sending after its backend answered and closed:
/// with the splice engine the bytes meet a closed socket (EPIPE or a
/// reset). Expected: that connection is reset, and sluice serves on (an
/// early io_uring driver aborted here, stepping a connection it had just
/// finished).
#[test]
fn sending_on_after_the_backend_closed_resets_that_connection_only() {
    let server = TestServer::start(|mut stream| {
        let mut request = [0u8; 5];
        if stream.read_exact(&mut request).is_ok() {
            let _ = stream.write_all(b"bye");
        }
    });
    for engine in ["splice", "copy"] {
        let sluice = Sluice::start(&config(
            free_addr(unique_loopback()),
            &[("closer".into(), server.addr)],
            &format!("    engine: {engine}\n"),
        ));
        let mut client = connect_from(client_ip(70), sluice.listen_addr());
        client.write_all(b"hello").unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).unwrap();
        assert_eq!(reply, b"bye", "{engine}");
        // Until sluice resets us for it (or gives up reading).
        let chunk = vec![7u8; 16 * 1024];
        for _ in 0..2000 {
            if client.write_all(&chunk).is_err() {
                break;
            }
        }
        let mut again = connect_from(client_ip(71), sluice.listen_addr());
        again.write_all(b"hello").unwrap();
        let mut reply = Vec::new();
        again.read_to_end(&mut reply).unwrap();
        assert_eq!(reply, b"bye", "{engine}: sluice serves on");
    }
}

/// Sends `byte` as TCP urgent data (`MSG_OOB`).
fn send_urgent(stream: &TcpStream, byte: u8) {
    use std::os::fd::AsRawFd;
    // SAFETY: sends one byte from a live buffer.
    let sent = unsafe { libc::send(stream.as_raw_fd(), [byte].as_ptr().cast(), 1, libc::MSG_OOB) };
    assert_eq!(sent, 1, "{}", std::io::Error::last_os_error());
}

/// A backend that reads to the end of the stream and reports every byte.
fn recorder() -> (TestServer, mpsc::Receiver<Vec<u8>>) {
    let (report, received) = mpsc::channel();
    let report = std::sync::Mutex::new(report);
    let server = TestServer::start(move |mut stream| {
        let mut data = Vec::new();
        let _ = stream.read_to_end(&mut data);
        let _ = report.lock().unwrap().send(data);
    });
    (server, received)
}

/// A client's urgent byte (`MSG_OOB`) stops `splice(2)` at its mark: an
/// early sluice then spun on a readable socket (io_uring), waited for a
/// readiness edge that never came (epoll), and took the FIN that followed
/// for the end of the stream, so the backend got a clean end of a
/// truncated stream; the copy engine dropped the byte. Expected: every
/// byte in order, the urgent one too, with no CPU spent while the stream
/// waits, and the FIN only after all of them. `auto` has splicing on by
/// the time the urgent byte comes (a bulk start).
#[test]
fn an_urgent_byte_arrives_in_order_among_the_others() {
    for (engine, bulk) in [("splice", 100), ("copy", 100), ("auto", 1_000_000)] {
        an_urgent_byte_arrives_in_order_among_the_others_with(engine, bulk);
    }
}

fn an_urgent_byte_arrives_in_order_among_the_others_with(engine: &str, bulk: usize) {
    let (server, received) = recorder();
    let sluice = Sluice::start(&config(
        free_addr(unique_loopback()),
        &[("recorder".into(), server.addr)],
        &engine_key(engine),
    ));
    let mut client = connect_from(client_ip(72), sluice.listen_addr());
    let mut expected = vec![0u8; bulk];
    Noise::new(3).fill(&mut expected);
    client.write_all(&expected).unwrap();
    send_urgent(&client, b'!');
    expected.push(b'!');
    // The urgent byte waits at its mark now: a relay that spins on it
    // burns a core meanwhile. (Measuring quiet: a sleep, not a wait for
    // an event.)
    thread::sleep(Duration::from_millis(200));
    let cpu = cpu_time(sluice.pid());
    thread::sleep(Duration::from_millis(500));
    let spent = cpu_time(sluice.pid()) - cpu;
    assert!(
        spent < Duration::from_millis(150),
        "{engine}: sluice used {spent:?} of CPU in 500 ms with one stream waiting"
    );
    let after = b"after the urgent byte. ".repeat(5);
    client.write_all(&after).unwrap();
    expected.extend_from_slice(&after);
    client.shutdown(Shutdown::Write).unwrap();
    let got = received.recv_timeout(DEADLINE).unwrap();
    assert_eq!(got.len(), expected.len(), "{engine}: bytes the backend got");
    assert!(got == expected, "{engine}: the bytes arrived out of order");
}

/// A backend that answers each byte it reads with a reply in two small
/// writes, 2 ms apart. Without TCP_NODELAY on sluice's side of the client, the second
/// piece waits for the client's delayed ACK of the first (Nagle): about
/// 40 ms per round trip instead of well under one.
#[test]
fn a_reply_in_two_pieces_is_not_held_back_by_nagle() {
    let server = TestServer::start(|mut stream| {
        stream.set_nodelay(true).unwrap();
        let mut byte = [0u8; 1];
        while stream.read_exact(&mut byte).is_ok() {
            if stream.write_all(b"+O").is_err() {
                break;
            }
            // Long enough for sluice to send the first piece on its own.
            thread::sleep(Duration::from_millis(2));
            if stream.write_all(b"K\r\n").is_err() {
                break;
            }
        }
    });
    for engine in ENGINES {
        let sluice = Sluice::start(&config(
            free_addr(unique_loopback()),
            &[("two-pieces".into(), server.addr)],
            &engine_key(engine),
        ));
        let mut client = connect_from(client_ip(73), sluice.listen_addr());
        client.set_nodelay(true).unwrap();
        let mut times: Vec<Duration> = (0..21)
            .map(|_| {
                let started = std::time::Instant::now();
                client.write_all(b"?").unwrap();
                let mut reply = [0u8; 5];
                client.read_exact(&mut reply).unwrap();
                assert_eq!(&reply, b"+OK\r\n");
                started.elapsed()
            })
            .collect();
        times.sort();
        let median = times[times.len() / 2];
        assert!(
            median < Duration::from_millis(25),
            "{engine}: a round trip takes {median:?} (the median of 21)"
        );
    }
}

/// Bytes the kernel has not had acknowledged yet on `stream`.
fn unacknowledged(stream: &TcpStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one int.
    let done = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    assert_eq!(done, 0, "{}", std::io::Error::last_os_error());
    queued as usize
}

/// A backend that sends bytes and then resets: the client must get every
/// byte sluice took from the backend, then the reset (never fewer bytes,
/// never a clean end of stream), and the log must count what the client
/// got. Once with a client that reads as the bytes come (the backend sends
/// 100-byte pieces), once with a client that reads only after the reset
/// (sluice holds what the client has no room for when the reset comes).
#[test]
fn a_backend_reset_reaches_the_client_after_every_byte_sluice_took() {
    for engine in ENGINES {
        for (pieces, piece, reads_late) in [(10, 100, false), (8, 32 * 1024, true)] {
            backend_reset_after_bytes(engine, pieces, piece, reads_late);
        }
    }
}

fn backend_reset_after_bytes(engine: &str, pieces: usize, piece: usize, reads_late: bool) {
    let (reset_done, after_reset) = mpsc::channel();
    let reset_done = std::sync::Mutex::new(reset_done);
    let server = TestServer::start(move |mut stream| {
        stream.set_nodelay(true).unwrap();
        let mut data = vec![0u8; pieces * piece];
        Noise::new(4).fill(&mut data);
        for chunk in data.chunks(piece) {
            stream.write_all(chunk).unwrap();
            thread::sleep(Duration::from_millis(2));
        }
        // Once sluice's kernel has every byte, reset.
        wait_until("sluice to take every byte", || unacknowledged(&stream) == 0);
        reset(stream);
        let _ = reset_done.lock().unwrap().send(());
    });
    let sluice = Sluice::start(&format!(
        "log:\n  connections: true\n{}",
        config(
            free_addr(unique_loopback()),
            &[("resetter".into(), server.addr)],
            &engine_key(engine),
        )
    ));
    let mut client = connect_from(client_ip(74), sluice.listen_addr());
    if reads_late {
        after_reset.recv_timeout(DEADLINE).unwrap();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let error = loop {
        match client.read(&mut buf) {
            Ok(0) => panic!("{engine}: a clean end of stream after {} bytes", got.len()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break e,
        }
    };
    let mut expected = vec![0u8; pieces * piece];
    Noise::new(4).fill(&mut expected);
    assert_eq!(
        (got.len(), error.kind()),
        (expected.len(), std::io::ErrorKind::ConnectionReset),
        "{engine}, reads late: {reads_late}: bytes before the reset"
    );
    assert!(got == expected, "{engine}: the bytes arrived corrupted");
    let line = sluice.wait_for_log("connection closed");
    assert!(
        line.contains(&format!("to_client={}", expected.len())),
        "{engine}: {line}"
    );
}

/// A backend that resets each connection as soon as it accepts it: the
/// connect succeeded, so the client gets a reset, like any backend reset
/// (an early epoll driver took the reset, which the socket reports once,
/// for a failed connect, and closed the client cleanly as if no backend
/// could be reached, where io_uring reset it).
#[test]
fn a_backend_that_resets_at_once_resets_the_client() {
    let server = TestServer::start(reset);
    let sluice = Sluice::start(&format!(
        "log:\n  connections: true\n{}",
        config(
            free_addr(unique_loopback()),
            &[("resetter".into(), server.addr)],
            "",
        )
    ));
    for i in 0..20 {
        // The reset can come before the connect returns.
        let error = TcpStream::connect(sluice.listen_addr()).map_or_else(
            |e| e,
            |mut client| {
                client.set_read_timeout(Some(DEADLINE)).unwrap();
                client
                    .read(&mut [0u8; 16])
                    .expect_err("a reset, not data or EOF")
            },
        );
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{i}");
    }
    sluice.wait_for_log_count("close=\"backend reset\"", 20);
    assert_eq!(sluice.log_count("close=\"no backend\""), 0);
}

/// Urgent bytes in a row from the backend, after small writes: a receive
/// in the ring can stop at an urgent byte's mark and wait for bytes that
/// are there already (an early io_uring driver left about one connection
/// in a hundred open, one byte short). Expected: every byte, then the end
/// of the stream, on every connection.
#[test]
fn urgent_bytes_in_a_row_from_the_backend_all_arrive() {
    let server = TestServer::start(|mut stream| {
        stream.set_nodelay(true).unwrap();
        for piece in [&b"a"[..], b"b", b"c"] {
            stream.write_all(piece).unwrap();
        }
        for _ in 0..13 {
            stream.write_all(b"xy").unwrap();
        }
        send_urgent(&stream, b'!');
        send_urgent(&stream, b'!');
        stream.shutdown(Shutdown::Write).unwrap();
        let _ = stream.read_to_end(&mut Vec::new());
    });
    let expected = [&b"abc"[..], &b"xy".repeat(13), b"!!"].concat();
    for engine in ENGINES {
        let sluice = Sluice::start(&config(
            free_addr(unique_loopback()),
            &[("urgent".into(), server.addr)],
            &engine_key(engine),
        ));
        for i in 0..100 {
            let mut client = connect_from(client_ip(81), sluice.listen_addr());
            client.shutdown(Shutdown::Write).unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).unwrap_or_else(|e| {
                panic!("{engine}, connection {i}: {e} after {} bytes", got.len())
            });
            assert_eq!(got, expected, "{engine}, connection {i}");
        }
    }
}

/// A client that filled every buffer towards a backend that does not read
/// resets, and then the backend resets too: the connection ends, and
/// sluice spends no CPU on it afterwards.
#[test]
fn a_backend_that_resets_while_sluice_delivers_to_it_ends_the_connection() {
    let (reset_now, reset_told) = mpsc::channel::<()>();
    let reset_told = std::sync::Mutex::new(reset_told);
    let server = TestServer::start(move |stream| {
        // Reads nothing until told, then resets.
        let _ = reset_told.lock().unwrap().recv_timeout(DEADLINE);
        reset(stream);
    });
    let (admin, text) = with_admin(&config(
        free_addr(unique_loopback()),
        &[("deaf".into(), server.addr)],
        "",
    ));
    let sluice = Sluice::start(&text);
    let mut client = connect_from(client_ip(82), sluice.listen_addr());
    client
        .set_write_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let chunk = vec![7u8; 64 * 1024];
    // Until every buffer on the way is full.
    while client.write_all(&chunk).is_ok() {}
    let open = || sample(&scrape(admin), "sluice_connections_active", &[]);
    wait_until("the connection to be relaying", || open() == Some(1.0));
    reset(client);
    // The backend resets: whatever sluice still held for it is moot.
    reset_now.send(()).unwrap();
    wait_until("sluice to close the connection", || open() == Some(0.0));
    let cpu = cpu_time(sluice.pid());
    // Measuring quiet: a sleep, not a wait for an event.
    thread::sleep(Duration::from_millis(300));
    let spent = cpu_time(sluice.pid()) - cpu;
    assert!(
        spent < Duration::from_millis(100),
        "sluice used {spent:?} of CPU idle"
    );
}

/// A few bytes, an urgent byte, then more than sluice's receive window at
/// once: TCP stops a read at the urgent byte's mark, and an early epoll
/// driver took that short read for an empty socket and waited for a
/// readiness edge that could not come (the backend waited for the window,
/// the window for a read).
#[test]
fn bytes_behind_an_urgent_mark_are_read_without_waiting_for_more() {
    let mut bulk = vec![0u8; 242_840];
    Noise::new(5).fill(&mut bulk);
    let sent = bulk.clone();
    let server = TestServer::start(move |mut stream| {
        stream.set_nodelay(true).unwrap();
        stream.write_all(&[b'a'; 62]).unwrap();
        thread::sleep(Duration::from_millis(1));
        stream.write_all(&[b'b'; 38]).unwrap();
        send_urgent(&stream, b'!');
        stream.write_all(&sent).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let _ = stream.read_to_end(&mut Vec::new());
    });
    let expected = [&[b'a'; 62][..], &[b'b'; 38], b"!", &bulk].concat();
    for engine in ENGINES {
        let sluice = Sluice::start(&config(
            free_addr(unique_loopback()),
            &[("urgent".into(), server.addr)],
            &engine_key(engine),
        ));
        for i in 0..20 {
            let mut client = connect_from(client_ip(83), sluice.listen_addr());
            client.shutdown(Shutdown::Write).unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).unwrap_or_else(|e| {
                panic!("{engine}, connection {i}: {e} after {} bytes", got.len())
            });
            assert!(
                got == expected,
                "{engine}, connection {i}: {} bytes",
                got.len()
            );
        }
    }
}
