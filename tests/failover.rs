//! What a pool that fails closed does when its backends come and go, on
//! test servers whose health a switch decides (an HTTP endpoint beside
//! each, as Patroni's is): backends unknown until probed, clients held in
//! the queue and dispatched in order or turned away (`queue_full`,
//! `queue_timeout`), the sessions of a backend that goes down reset
//! (`on_down: close`), backups and `balance: first`.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// A backend that announces its name, with an HTTP health endpoint on
/// `health_port` of its own address: 200 while `up`, else 503.
struct Switchable {
    _server: TestServer,
    _health: TestServer,
    up: Arc<AtomicBool>,
}

impl Switchable {
    fn new(name: &str, health_port: u16, up: bool) -> (Switchable, SocketAddr) {
        let server = name_server(name);
        let flag = Arc::new(AtomicBool::new(up));
        let state = flag.clone();
        let health = TestServer::start_on(
            SocketAddr::new(server.addr.ip(), health_port),
            move |mut stream| {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request);
                let status = match state.load(Ordering::SeqCst) {
                    true => "200 OK",
                    false => "503 Service Unavailable",
                };
                let _ = write!(stream, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
            },
        );
        let addr = server.addr;
        (
            Switchable {
                _server: server,
                _health: health,
                up: flag,
            },
            addr,
        )
    }

    fn set(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }
}

/// `n` switchable backends `b0`, `b1`... (their health as `up` says), and
/// the health settings that probe them every 100 ms.
fn switchables(up: &[bool]) -> (Vec<Switchable>, Vec<(String, SocketAddr)>, String) {
    let port = free_addr(unique_loopback()).port();
    let (servers, backends) = up
        .iter()
        .enumerate()
        .map(|(i, &up)| {
            let name = format!("b{i}");
            let (server, addr) = Switchable::new(&name, port, up);
            (server, (name, addr))
        })
        .unzip();
    let health = format!(
        "    health:\n      interval: 100ms\n      timeout: 100ms\n      rise: 1\n      fall: 1\n      port: {port}\n      http: {{ path: /health }}\n"
    );
    (servers, backends, health)
}

fn start(backends: &[(String, SocketAddr)], pool: &str) -> (Sluice, SocketAddr) {
    start_with(backends, pool, |text| text)
}

/// [`start`], with the configuration's text changed by `edit` (a key on a
/// backend, say).
fn start_with(
    backends: &[(String, SocketAddr)],
    pool: &str,
    edit: impl Fn(String) -> String,
) -> (Sluice, SocketAddr) {
    let text = edit(config(free_addr(unique_loopback()), backends, pool));
    let (admin, text) = with_admin(&format!("log:\n  connections: true\n{text}"));
    (Sluice::start(&text), admin)
}

/// Connects to sluice; the backend's name line, or how the connection
/// ended without one.
fn name_of(sluice: &Sluice) -> Result<String, ErrorKind> {
    let mut stream = connect_from(client_ip(9), sluice.listen_addr());
    read_name(&mut stream)
}

fn read_name(stream: &mut TcpStream) -> Result<String, ErrorKind> {
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut name = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof),
            Ok(_) if byte[0] == b'\n' => return Ok(String::from_utf8(name).unwrap()),
            Ok(_) => name.push(byte[0]),
            Err(e) => return Err(e.kind()),
        }
    }
}

/// Clients in pool `back`'s queue now.
fn queue_length(admin: SocketAddr) -> Option<f64> {
    sample(&scrape(admin), "sluice_queue_length", &[r#"pool="back""#])
}

fn errors(admin: SocketAddr, reason: &str) -> f64 {
    sample(
        &scrape(admin),
        "sluice_connection_errors_total",
        &[&format!(r#"reason="{reason}""#)],
    )
    .unwrap_or(0.0)
}

/// Until its first probe passes, a backend of a pool that fails closed
/// takes no client; one that is down is never routed to, even when all
/// are (no fail open). `fail_open: true` keeps today's routing over all.
#[test]
fn a_pool_that_fails_closed_routes_only_to_backends_up() {
    let (servers, backends, health) = switchables(&[false, true]);
    let (sluice, admin) = start(
        &backends,
        &format!("{health}    fail_open: false\n    balance: first\n"),
    );
    sluice.wait_for_log("backend is up: its first probe succeeded pool=back backend=b1 ");
    for _ in 0..20 {
        assert_eq!(name_of(&sluice).as_deref(), Ok("b1"));
    }
    servers[1].set(false);
    sluice.wait_for_log("backend is down: HTTP 503 Service Unavailable (1 probes in a row failed) pool=back backend=b1");
    sluice.wait_for_log("no backend is up: new clients are turned away until one is");
    assert!(
        name_of(&sluice).is_err(),
        "turned away, not sent to a backend down"
    );
    assert_eq!(errors(admin, "no_backend"), 1.0);
    // Failing open routes over all of them.
    let (sluice, _) = start(
        &backends,
        &format!("{health}    fail_open: true\n    balance: first\n"),
    );
    sluice.wait_for_log("every backend is down: routing over all of them");
    assert_eq!(name_of(&sluice).as_deref(), Ok("b0"));
}

/// Clients wait while no backend is up, each holding no backend socket,
/// and are served in arrival order once one comes up; the queue's
/// length is exported; beyond `size` they are turned away at once.
#[test]
fn the_queue_holds_clients_until_a_backend_comes_up() {
    let (servers, backends, health) = switchables(&[false]);
    let (sluice, admin) = start(
        &backends,
        &format!("{health}    fail_open: false\n    queue: {{ size: 3, timeout: 30s }}\n"),
    );
    sluice.wait_for_log("backend is down: HTTP 503");
    let mut waiting: Vec<TcpStream> = (0..3)
        .map(|_| connect_from(client_ip(9), sluice.listen_addr()))
        .collect();
    wait_until("three clients in the queue", || {
        queue_length(admin) == Some(3.0)
    });
    // The fourth finds the queue full.
    let started = Instant::now();
    assert!(name_of(&sluice).is_err());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "turned away at once"
    );
    assert_eq!(errors(admin, "queue_full"), 1.0);
    servers[0].set(true);
    for stream in &mut waiting {
        assert_eq!(read_name(stream).as_deref(), Ok("b0"));
    }
    assert_eq!(queue_length(admin), Some(0.0));
    assert_eq!(errors(admin, "queue_timeout"), 0.0);
}

/// A client no backend takes within `queue.timeout` is turned away.
#[test]
fn the_queue_turns_clients_away_after_its_timeout() {
    let (_servers, backends, health) = switchables(&[false]);
    let (sluice, admin) = start(
        &backends,
        &format!("{health}    fail_open: false\n    queue: {{ size: 10, timeout: 300ms }}\n"),
    );
    sluice.wait_for_log("backend is down: HTTP 503");
    let started = Instant::now();
    assert!(name_of(&sluice).is_err());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(280) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    assert_eq!(errors(admin, "queue_timeout"), 1.0);
    let line = sluice.wait_for_log("connection closed");
    assert!(line.contains("queue timeout"), "{line}");
}

/// A backend full at its `max_connections` makes clients wait; each place
/// freed serves the next, in arrival order (one worker: each keeps its own
/// clients in order).
#[test]
fn clients_wait_for_a_place_at_a_full_backend() {
    let (_servers, backends, health) = switchables(&[true]);
    let pool = format!("{health}    queue: {{ size: 10, timeout: 30s }}\n");
    let (sluice, admin) = start_with(&backends, &pool, |text| {
        text.replace("name: b0\n", "name: b0\n        max_connections: 1\n")
            .replace("workers: 2\n", "workers: 1\n")
    });
    let mut holder = connect_from(client_ip(9), sluice.listen_addr());
    assert_eq!(read_name(&mut holder).as_deref(), Ok("b0"));
    let mut second = connect_from(client_ip(9), sluice.listen_addr());
    wait_until("a client in the queue", || queue_length(admin) == Some(1.0));
    let mut third = connect_from(client_ip(9), sluice.listen_addr());
    wait_until("two clients in the queue", || {
        queue_length(admin) == Some(2.0)
    });
    drop(holder);
    assert_eq!(
        read_name(&mut second).as_deref(),
        Ok("b0"),
        "the first to wait"
    );
    third
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(
        third.read(&mut byte).unwrap_err().kind(),
        ErrorKind::WouldBlock,
        "the second still waits"
    );
    drop(second);
    assert_eq!(read_name(&mut third).as_deref(), Ok("b0"));
}

/// With `on_down: close`, a backend marked down by its probes has both
/// sides of its connections reset: the client sees an error, not a FIN.
/// Counted in `sluice_connections_closed_on_down_total`. With `keep`
/// (the default without a role), they stay.
#[test]
fn on_down_close_resets_the_sessions_of_a_backend_marked_down() {
    for on_down in ["close", "keep"] {
        let (servers, backends, health) = switchables(&[true, true]);
        let pool = format!("{health}    balance: first\n    on_down: {on_down}\n");
        let (sluice, admin) = start(&backends, &pool);
        let mut open = connect_from(client_ip(9), sluice.listen_addr());
        assert_eq!(read_name(&mut open).as_deref(), Ok("b0"));
        servers[0].set(false);
        sluice.wait_for_log("backend=b0");
        open.set_read_timeout(Some(DEADLINE)).unwrap();
        let labels = [r#"pool="back""#, r#"backend="b0""#];
        let closed = || {
            sample(
                &scrape(admin),
                "sluice_connections_closed_on_down_total",
                &labels,
            )
        };
        if on_down == "close" {
            let mut byte = [0u8; 1];
            assert_eq!(
                open.read(&mut byte).unwrap_err().kind(),
                ErrorKind::ConnectionReset
            );
            let line = sluice.wait_for_log("connection closed");
            assert!(line.contains(r#"close="backend down""#), "{line}");
            assert_eq!(closed(), Some(1.0));
            // New clients go to the next backend.
            assert_eq!(name_of(&sluice).as_deref(), Ok("b1"));
        } else {
            echoes(&mut open, b"still here");
            assert_eq!(closed(), Some(0.0));
        }
    }
}

/// A backup gets clients only while no other backend is up; `first` sends
/// every client to the first backend up in file order.
#[test]
fn backups_and_first() {
    let (servers, backends, health) = switchables(&[true, true, true]);
    let pool = format!("{health}    balance: round_robin\n");
    let (sluice, _) = start_with(&backends, &pool, |text| {
        text.replace("name: b2\n", "name: b2\n        backup: true\n")
    });
    let names: Vec<String> = (0..12).map(|_| name_of(&sluice).unwrap()).collect();
    assert!(names.iter().all(|n| n != "b2"), "{names:?}");
    assert!(names.iter().any(|n| n == "b0") && names.iter().any(|n| n == "b1"));
    servers[0].set(false);
    servers[1].set(false);
    sluice.wait_for_log("backend=b1");
    sluice.wait_for_log("backend=b0");
    assert_eq!(name_of(&sluice).as_deref(), Ok("b2"));
    servers[1].set(true);
    wait_until("b1 back", || name_of(&sluice).as_deref() == Ok("b1"));

    let (sluice, _) = start(&backends, &format!("{health}    balance: first\n"));
    // Up from the start (the pool fails open), until its first probe.
    sluice.wait_for_log("backend is down: HTTP 503 Service Unavailable (1 probes in a row failed) pool=back backend=b0");
    for _ in 0..10 {
        assert_eq!(
            name_of(&sluice).as_deref(),
            Ok("b1"),
            "b0 is down, b1 first"
        );
    }
    servers[0].set(true);
    wait_until("b0, first in the file, back", || {
        name_of(&sluice).as_deref() == Ok("b0")
    });
}

/// A reload that removes a backend resets its connections with `on_down:
/// close`; one whose probe login's password file is missing fails, and
/// the configuration in use stays.
#[test]
fn a_reload_removes_a_backend_and_refuses_a_missing_password_file() {
    let (_servers, backends, health) = switchables(&[true, true]);
    let pool = format!("{health}    balance: first\n    on_down: close\n");
    let text = config(free_addr(unique_loopback()), &backends, &pool);
    let sluice = Sluice::start(&text);
    let mut open = connect_from(client_ip(9), sluice.listen_addr());
    assert_eq!(read_name(&mut open).as_deref(), Ok("b0"));

    let missing = text.replace(
        "    health:\n",
        "    health:\n      preset: redis\n      auth: { password_file: /nonexistent/probe.pass }\n",
    );
    let line = sluice.reload(&missing.replace("      http: { path: /health }\n", ""));
    assert!(
        line.contains("reload failed")
            && line.contains(
                "pools.back.health.auth.password_file: cannot read /nonexistent/probe.pass"
            ),
        "{line}"
    );
    echoes(&mut open, b"the old configuration still serves");

    let without_b0 = text.replace(
        &format!("      - address: {}\n        name: b0\n", backends[0].1),
        "",
    );
    assert!(sluice
        .reload(&without_b0)
        .contains("configuration reloaded"));
    open.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(
        open.read(&mut byte).unwrap_err().kind(),
        ErrorKind::ConnectionReset
    );
    assert_eq!(name_of(&sluice).as_deref(), Ok("b1"));
}

/// With every backend of a pool that fails closed down for longer than
/// the queue's timeout, no connection and no byte reaches any backend,
/// however clients behave: waiting, sending, leaving early.
#[test]
fn a_pool_that_fails_closed_sends_nothing_to_backends_down() {
    let port = free_addr(unique_loopback()).port();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let servers: Vec<(TestServer, TestServer)> = (0..2)
        .map(|_| {
            let count = accepted.clone();
            let server = TestServer::start(move |_| {
                count.fetch_add(1, Ordering::SeqCst);
            });
            let health =
                TestServer::start_on(SocketAddr::new(server.addr.ip(), port), |mut stream| {
                    let mut request = [0u8; 1024];
                    let _ = stream.read(&mut request);
                    let _ = stream.write_all(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
                    );
                });
            (server, health)
        })
        .collect();
    let backends: Vec<(String, SocketAddr)> = servers
        .iter()
        .enumerate()
        .map(|(i, (server, _))| (format!("b{i}"), server.addr))
        .collect();
    let health = format!(
        "    health:\n      interval: 100ms\n      timeout: 100ms\n      fall: 1\n      port: {port}\n      http: {{ path: /health }}\n"
    );
    let (sluice, admin) = start(
        &backends,
        &format!("{health}    fail_open: false\n    queue: {{ size: 4, timeout: 200ms }}\n"),
    );
    let clients: Vec<_> = (0..12)
        .map(|i| {
            let front = sluice.listen_addr();
            std::thread::spawn(move || {
                let mut stream = connect_from(client_ip(20 + i), front);
                // Some send at once, some leave early, the rest wait.
                match i % 3 {
                    0 => {
                        let _ = stream.write_all(b"GET / HTTP/1.0\r\n\r\n");
                    }
                    1 => return,
                    _ => {}
                }
                stream.set_read_timeout(Some(DEADLINE)).unwrap();
                let mut byte = [0u8; 1];
                assert!(
                    !matches!(stream.read(&mut byte), Ok(1)),
                    "no backend answers"
                );
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    // A client that left early is counted when its place comes up or
    // times out, which may be after the others are done.
    let turned_away = || {
        errors(admin, "queue_full") + errors(admin, "queue_timeout") + errors(admin, "no_backend")
    };
    wait_until("12 clients turned away", || turned_away() >= 12.0);
    assert_eq!(turned_away(), 12.0, "each client turned away once");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "no connection reached a backend"
    );
    assert_eq!(
        sample(
            &scrape(admin),
            "sluice_bytes_total",
            &[r#"direction="to_backend""#]
        )
        .unwrap_or(0.0),
        0.0
    );
}
