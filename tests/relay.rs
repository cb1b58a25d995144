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
