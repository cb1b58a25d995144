//! Health: probes take a dead backend out within `fall` x `interval` +
//! `timeout` and bring it back after `rise` probes, moving only its own
//! clients; send/expect probes against a real redis-server; passive ejection
//! of a backend that refuses connections, and none for one that resets them
//! (which any client could provoke).

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;

const CLIENTS: u32 = 200;

/// What a detection or a recovery may take beyond its bound: the log line
/// travels through a pipe and a reader thread, and CI hosts are busy.
const SLACK_MS: u64 = 1000;

fn routes(sluice: &Sluice) -> HashMap<u32, String> {
    (0..CLIENTS)
        .map(|i| (i, backend_for(client_ip(i), sluice.listen_addr())))
        .collect()
}

#[test]
fn a_dead_backend_leaves_within_fall_intervals_and_its_clients_return() {
    let (mut servers, backends) = name_servers(3);
    let (interval, timeout, fall, rise) = (200, 100, 2, 2);
    let sluice = Sluice::start(&config(
        free_addr(unique_loopback()),
        &backends,
        &format!("    health: {{ interval: {interval}ms, timeout: {timeout}ms, rise: {rise}, fall: {fall} }}\n"),
    ));
    let before = routes(&sluice);

    let killed_at = Instant::now();
    servers[1].stop();
    let line = sluice.wait_for_log("backend is down");
    let detection = killed_at.elapsed();
    assert!(
        line.contains("backend=backend-1") && line.contains("Connection refused"),
        "{line}"
    );
    eprintln!(
        "detection: {detection:?} (bound {}ms)",
        fall * interval + timeout
    );
    assert!(
        detection <= Duration::from_millis(fall * interval + timeout + SLACK_MS),
        "took {detection:?} to mark the backend down"
    );

    let during = routes(&sluice);
    for i in 0..CLIENTS {
        if before[&i] == "backend-1" {
            assert_ne!(during[&i], "backend-1");
        } else {
            assert_eq!(
                during[&i],
                before[&i],
                "client {} of a live backend moved",
                client_ip(i)
            );
        }
    }

    let back_at = Instant::now();
    servers[1] = name_server_on("backend-1", backends[1].1);
    let line = sluice.wait_for_log("backend is up");
    let recovery = back_at.elapsed();
    assert!(line.contains("backend=backend-1"), "{line}");
    eprintln!(
        "recovery: {recovery:?} (bound {}ms)",
        rise * interval + timeout
    );
    assert!(recovery <= Duration::from_millis(rise * interval + timeout + SLACK_MS));
    let after = routes(&sluice);
    let strays: Vec<u32> = (0..CLIENTS).filter(|i| after[i] != before[i]).collect();
    assert!(
        strays.is_empty(),
        "clients {strays:?} did not return to their backend"
    );
}

#[test]
fn send_expect_takes_out_only_the_silent_and_the_wrong_backend() {
    let redis = redis_server();
    // Accepts and reads, never answers.
    let silent = TestServer::start(|mut stream| {
        let mut buf = [0u8; 64];
        while matches!(std::io::Read::read(&mut stream, &mut buf), Ok(n) if n > 0) {}
    });
    // Answers, but not what the probe expects.
    let wrong = TestServer::start(|mut stream| {
        let _ = std::io::Write::write_all(&mut stream, b"-ERR not redis\r\n");
    });
    let backends = [
        ("redis".to_owned(), redis.addr),
        ("silent".to_owned(), silent.addr),
        ("wrong".to_owned(), wrong.addr),
    ];
    let sluice = Sluice::start(&config(
        free_addr(unique_loopback()),
        &backends,
        "    health:\n      interval: 200ms\n      timeout: 100ms\n      fall: 2\n      send: \"PING\\r\\n\"\n      expect: \"+PONG\"\n",
    ));
    let silent_line = sluice.wait_for_log("backend=silent");
    assert!(
        silent_line.contains("backend is down: no answer within 100ms"),
        "{silent_line}"
    );
    let wrong_line = sluice.wait_for_log("backend=wrong");
    assert!(
        wrong_line.contains(r#"backend is down: unexpected reply "-ERR not redis\r\n""#),
        "{wrong_line}"
    );
    // Both went down after two failed rounds; redis answered the same
    // rounds, and a few more.
    sluice.wait_for_log_count("backend is down", 2);
    assert_eq!(sluice.log_count("backend=redis"), 0, "redis must stay up");
    // Every client is now served by redis.
    for i in 0..20 {
        let mut conn = std::io::BufReader::new(connect_from(client_ip(i), sluice.listen_addr()));
        std::io::Write::write_all(conn.get_mut(), b"PING\r\n").unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut conn, &mut line).unwrap();
        assert_eq!(line, "+PONG\r\n");
    }
}

/// Refused connects on the data path take a backend out before the next
/// probe: `fall` of them in a row.
#[test]
fn a_backend_that_refuses_is_ejected_before_the_next_probe() {
    // Nothing listens there.
    let refusing = free_addr(unique_loopback());
    let good = name_server("good");
    let backends = [("bad".to_owned(), refusing), ("good".to_owned(), good.addr)];
    // Probes every 60 s: only the data path can take the backend out here.
    let sluice = Sluice::start(&config(
        free_addr(unique_loopback()),
        &backends,
        "    health: { interval: 60s, timeout: 1s, fall: 3, rise: 2 }\n",
    ));
    let bad_clients: Vec<u32> = (0..100)
        .filter(|&i| explain(sluice.config_path(), "back", &client_ip(i).to_string()).0 == "bad")
        .take(3)
        .collect();
    assert_eq!(bad_clients.len(), 3);
    for &i in &bad_clients {
        // Retried onto the next backend.
        assert_eq!(backend_for(client_ip(i), sluice.listen_addr()), "good");
    }
    let line = sluice.wait_for_log("backend is down");
    assert!(
        line.contains("backend=bad") && line.contains("3 connections in a row failed"),
        "{line}"
    );
}

/// No client can get a healthy backend ejected: a backend that resets a
/// connection whose bytes it rejects (here PostgreSQL, given a startup
/// packet with an impossible length, which it closes with the rest unread,
/// and a server that resets whatever it is sent) is not failing. Ten such
/// connections against `fall: 2` leave every backend in rotation.
#[test]
fn no_client_can_get_a_healthy_backend_ejected() {
    let postgres = postgres();
    let resetter = TestServer::start(|mut stream| {
        let mut buf = [0u8; 1];
        let _ = stream.read(&mut buf);
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    });
    let admin = free_addr(unique_loopback());
    let text = format!(
        "admin:\n  listen: {admin}\n{}",
        config(
            free_addr(unique_loopback()),
            &[
                ("postgres".to_owned(), postgres.addr),
                ("resetter".to_owned(), resetter.addr),
            ],
            "    health: { interval: 60s, timeout: 1s, fall: 2, rise: 1 }\n",
        )
    );
    let sluice = Sluice::start(&text);
    for i in 0..10 {
        let mut stream = connect_from(client_ip(200 + i), sluice.listen_addr());
        // Length 4: shorter than any startup packet; then bytes left unread.
        let _ = stream.write_all(b"\x00\x00\x00\x04garbage that is never read");
        let mut buf = [0u8; 64];
        while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
    }
    let body = scrape(admin);
    for backend in ["postgres", "resetter"] {
        let label = format!("backend=\"{backend}\"");
        assert_eq!(
            sample(&body, "sluice_backend_up", &[&label]),
            Some(1.0),
            "{backend}"
        );
    }
    assert_eq!(sluice.log_count("backend is down"), 0);
}

#[test]
fn with_every_backend_down_the_pool_routes_over_all_of_them() {
    // The probe expects "+PONG", which name servers never say: every
    // backend fails its probes while still serving real clients.
    let (_servers, backends) = name_servers(3);
    let sluice = Sluice::start(&config(
        free_addr(unique_loopback()),
        &backends,
        "    health: { interval: 100ms, timeout: 50ms, fall: 1, rise: 1, send: \"PING\\r\\n\", expect: \"+PONG\" }\n",
    ));
    sluice.wait_for_log_count("backend is down", 3);
    let line = sluice.wait_for_log("every backend is down");
    assert!(line.contains("routing over all of them"), "{line}");
    // Clients keep the backends the full table gives them, as if all were up.
    let mut used = std::collections::HashSet::new();
    for i in 0..60 {
        let ip = client_ip(i);
        let (expected, _) = explain(sluice.config_path(), "back", &ip.to_string());
        assert_eq!(
            backend_for(ip, sluice.listen_addr()),
            expected,
            "client {ip}"
        );
        used.insert(expected);
    }
    assert_eq!(used.len(), 3);
}
