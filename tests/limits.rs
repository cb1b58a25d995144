//! Listener limits through the real binary: `max_connections`, the rate
//! limits (whole listener and per client), each with its `over_limit`
//! count, and `idle_timeout`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

/// The configuration of `start`, with metrics at `admin`.
fn text(
    backend: SocketAddr,
    admin: SocketAddr,
    listen: SocketAddr,
    listener: &str,
    pool: &str,
) -> String {
    let text = config(listen, &[("echo".into(), backend)], pool)
        .replace("    pool: back\n", &format!("    pool: back\n{listener}"));
    format!("admin:\n  listen: {admin}\nlog:\n  connections: true\n{text}")
}

/// sluice with metrics, in front of one echo server; `listener` and `pool`
/// add settings to each (indented as their keys).
fn start(listener: &str, pool: &str) -> (TestServer, Sluice, SocketAddr) {
    let server = TestServer::start(|mut stream| echo(&mut stream));
    let admin = free_addr(unique_loopback());
    let listen = free_addr(unique_loopback());
    let text = text(server.addr, admin, listen, listener, pool);
    (server, Sluice::start(&text), admin)
}

/// Whether a connection from `client` is served: an echo comes back.
fn served(client: std::net::IpAddr, sluice: SocketAddr) -> (bool, TcpStream) {
    let mut stream = connect_from(client, sluice);
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let _ = stream.write_all(b"ping");
    let mut reply = [0u8; 4];
    let ok = stream.read_exact(&mut reply).is_ok() && &reply == b"ping";
    (ok, stream)
}

fn over_limit(admin: SocketAddr) -> f64 {
    sample(
        &scrape(admin),
        "sluice_connection_errors_total",
        &["reason=\"over_limit\""],
    )
    .unwrap_or(0.0)
}

#[test]
fn max_connections_turns_the_next_client_away_until_one_leaves() {
    let (_server, sluice, admin) = start("    max_connections: 2\n", "");
    let (first, first_stream) = served(client_ip(1), sluice.listen_addr());
    let (second, _second_stream) = served(client_ip(2), sluice.listen_addr());
    assert!(first && second);
    let (third, _) = served(client_ip(3), sluice.listen_addr());
    assert!(!third, "a third connection over max_connections: 2");
    assert_eq!(over_limit(admin), 1.0);
    sluice.wait_for_log("the listener's max_connections are open");

    drop(first_stream);
    sluice.wait_for_log("close=\"client FIN\"");
    let (again, _) = served(client_ip(4), sluice.listen_addr());
    assert!(again, "a place is free again");
}

#[test]
fn the_listener_rate_lets_a_burst_through_then_turns_clients_away() {
    // A burst of 3, then one new connection a second: five connections
    // made at once find the bucket empty after three.
    let (_server, sluice, admin) = start("    rate_limit: { rate: 1, burst: 3 }\n", "");
    let outcomes: Vec<bool> = (0..5)
        .map(|i| served(client_ip(10 + i), sluice.listen_addr()).0)
        .collect();
    assert_eq!(outcomes, [true, true, true, false, false]);
    assert_eq!(over_limit(admin), 2.0);
    sluice.wait_for_log("over the listener's rate_limit");
}

#[test]
fn the_rate_per_client_limits_each_client_on_its_own() {
    let (_server, sluice, admin) = start(
        "    rate_limit: { per_client: { rate: 1, burst: 2 } }\n",
        "",
    );
    let a: Vec<bool> = (0..3)
        .map(|_| served(client_ip(20), sluice.listen_addr()).0)
        .collect();
    assert_eq!(a, [true, true, false], "client A: a burst of 2");
    assert!(
        served(client_ip(21), sluice.listen_addr()).0,
        "client B is not held back by A"
    );
    assert_eq!(over_limit(admin), 1.0);
    sluice.wait_for_log("over the rate_limit per client");
}

#[test]
fn idle_timeout_closes_only_connections_idle_both_ways() {
    let (_server, sluice, _admin) = start("", "    idle_timeout: 400ms\n");
    let (ok, mut idle) = served(client_ip(30), sluice.listen_addr());
    assert!(ok);
    let (ok, mut busy) = served(client_ip(31), sluice.listen_addr());
    assert!(ok);
    let started = Instant::now();
    // The busy one talks every 100 ms for a second, well past the timeout.
    let mut reply = [0u8; 4];
    while started.elapsed() < Duration::from_millis(1000) {
        std::thread::sleep(Duration::from_millis(100));
        busy.write_all(b"more").unwrap();
        busy.read_exact(&mut reply).unwrap();
    }
    // The idle one was closed (a clean end of stream) after ~400 ms.
    idle.set_read_timeout(Some(DEADLINE)).unwrap();
    assert_eq!(idle.read(&mut reply).unwrap(), 0, "end of stream");
    let log = sluice.wait_for_log("close=\"idle timeout\"");
    assert!(log.contains(&client_ip(30).to_string()), "{log}");
    busy.write_all(b"last").unwrap();
    busy.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"last");
}

#[test]
fn rate_buckets_outlive_a_reload_that_keeps_the_limits() {
    let server = TestServer::start(|mut stream| echo(&mut stream));
    let (admin, listen) = (free_addr(unique_loopback()), free_addr(unique_loopback()));
    let limited = "    rate_limit: { rate: 1, burst: 2 }\n";
    let sluice = Sluice::start(&text(server.addr, admin, listen, limited, ""));
    assert!(served(client_ip(40), listen).0 && served(client_ip(41), listen).0);
    // A reload that changes something else keeps the empty bucket.
    sluice.reload(&text(
        server.addr,
        admin,
        listen,
        limited,
        "    retries: 1\n",
    ));
    assert!(
        !served(client_ip(42), listen).0,
        "the bucket is still empty"
    );
    // One that changes the limits starts it full.
    let relaxed = "    rate_limit: { rate: 1, burst: 3 }\n";
    sluice.reload(&text(
        server.addr,
        admin,
        listen,
        relaxed,
        "    retries: 1\n",
    ));
    assert!(served(client_ip(43), listen).0);
}

#[test]
fn waiting_for_a_proxy_header_is_not_idleness() {
    let (_server, sluice, _admin) = start("    accept_proxy: true\n", "    idle_timeout: 300ms\n");
    let mut stream = connect_from(client_ip(32), sluice.listen_addr());
    // The header comes late (well within its 5 s), the bytes right after.
    std::thread::sleep(Duration::from_millis(500));
    stream
        .write_all(b"PROXY TCP4 203.0.113.1 192.0.2.1 40000 80\r\nping")
        .unwrap();
    let mut reply = [0u8; 4];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"ping");
}

#[test]
fn an_idle_timeout_with_bytes_stuck_resets_both_sides() {
    // A client that stops reading a long reply: sluice holds what the
    // client's socket cannot take. When the timeout closes the connection,
    // the client must see a reset, never a clean end of a truncated reply.
    const REPLY: usize = 32 * 1024 * 1024;
    let talker = TestServer::start(|mut stream| {
        let _ = stream.write_all(&vec![7u8; REPLY]);
        // Then holds the connection.
        loop {
            std::thread::park();
        }
    });
    let admin = free_addr(unique_loopback());
    let listen = free_addr(unique_loopback());
    let sluice = Sluice::start(&text(
        talker.addr,
        admin,
        listen,
        "",
        "    idle_timeout: 300ms\n",
    ));
    let mut stream = connect_from(client_ip(33), listen);
    sluice.wait_for_log("idle timeout (stalled)");
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let end = loop {
        match stream.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => got += n,
            Err(e) => break Err(e),
        }
    };
    assert!(got < REPLY, "the reply cannot all have arrived");
    let error = end.expect_err("a reset, not a clean end of stream");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
}

#[test]
fn a_reload_keeps_counting_the_connections_already_open() {
    let server = TestServer::start(|mut stream| echo(&mut stream));
    let (admin, listen) = (free_addr(unique_loopback()), free_addr(unique_loopback()));
    let limited = "    max_connections: 2\n";
    let sluice = Sluice::start(&text(server.addr, admin, listen, limited, ""));
    let (a, _a) = served(client_ip(50), listen);
    let (b, _b) = served(client_ip(51), listen);
    assert!(a && b);
    sluice.reload(&text(
        server.addr,
        admin,
        listen,
        limited,
        "    retries: 1\n",
    ));
    assert!(!served(client_ip(52), listen).0, "still two open");
    // Raising the limit lets the next one in, the two still counted.
    sluice.reload(&text(
        server.addr,
        admin,
        listen,
        "    max_connections: 3\n",
        "",
    ));
    let (c, _c) = served(client_ip(53), listen);
    assert!(c);
    assert!(!served(client_ip(54), listen).0, "three open");
}

/// An IPv6 client is its /64 unless `ipv6_prefix` says otherwise: a host
/// rotating addresses within its /64 shares one bucket. The addresses come
/// in PROXY headers, since loopback has a single IPv6 address.
#[test]
fn an_ipv6_client_rotating_within_its_slash_64_is_one_client() {
    for (prefix, second_served) in [("", false), (", ipv6_prefix: 128", true)] {
        let (_server, sluice, _admin) = start(
            &format!(
                "    accept_proxy: true\n    rate_limit: {{ per_client: {{ rate: 1, burst: 1{prefix} }} }}\n"
            ),
            "",
        );
        let served_as = |source: &str| {
            let mut stream = connect_from(client_ip(1), sluice.listen_addr());
            let header = format!("PROXY TCP6 {source} 2001:db8::ffff 40000 6379\r\n");
            let _ = stream.write_all(header.as_bytes());
            let _ = stream.write_all(b"ping");
            let mut reply = [0u8; 4];
            stream.read_exact(&mut reply).is_ok() && &reply == b"ping"
        };
        assert!(served_as("2001:db8:1:2::1"));
        assert_eq!(served_as("2001:db8:1:2:ffff::9"), second_served, "{prefix}");
        assert!(
            served_as("2001:db8:1:3::1"),
            "another /64 is another client"
        );
    }
}

/// Connections that closed leave nothing of their idle timeout behind: an
/// early io_uring worker kept each one's timer until it came due (memory
/// growing with every short connection, and a wake-up for each). Expected:
/// once they are gone, the worker sleeps through the time their timeouts
/// would have come.
#[test]
fn closed_connections_leave_no_timer_behind() {
    let (_server, sluice, admin) = start("", "    idle_timeout: 1s\n");
    let text = std::fs::read_to_string(sluice.config_path()).unwrap();
    assert!(text.contains("workers: 2"), "{text}");
    for i in 0..1000 {
        let (ok, stream) = served(client_ip(40 + i % 50), sluice.listen_addr());
        assert!(ok);
        drop(stream);
    }
    wait_until("every connection to close", || {
        sample(&scrape(admin), "sluice_connections_active", &[]) == Some(0.0)
    });
    let wakeups = worker_wakeups(sluice.pid());
    // Measuring quiet, past the time every timeout would have come: a
    // sleep, not a wait for an event.
    std::thread::sleep(Duration::from_millis(1500));
    let woke = worker_wakeups(sluice.pid()) - wakeups;
    assert!(
        woke < 20,
        "the workers woke {woke} times in 1.5 s with no connection open"
    );
}
