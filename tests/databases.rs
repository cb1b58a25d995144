//! Database pools against the real servers: probes that log in and ask the
//! role (Redis with `requirepass`, a PostgreSQL primary and its standby
//! with a SCRAM password, MariaDB's `read_only`), the HTTP probe on another
//! port, and what a pool that knows its role does with them.

mod common;

use std::io::Write;
use std::net::SocketAddr;

use common::*;

/// A password file holding [`PROBE_PASSWORD`], with the trailing newline
/// an editor leaves.
fn password_file() -> TempFile {
    temp_file("probe.pass", &format!("{PROBE_PASSWORD}\n"))
}

/// A sluice over `backends` whose pool has the settings `pool` (indented
/// for the pool's mapping), with its admin endpoint.
fn start(pool: &str, backends: &[(&str, SocketAddr)]) -> (Sluice, SocketAddr) {
    let backends: Vec<(String, SocketAddr)> = backends
        .iter()
        .map(|&(name, addr)| (name.to_owned(), addr))
        .collect();
    let (admin, text) = with_admin(&format!(
        "log:\n  connections: true\n{}",
        config(free_addr(unique_loopback()), &backends, pool)
    ));
    (Sluice::start(&text), admin)
}

/// Waits until `backend` has had `n` probes with `result` (ok, fail).
fn wait_for_probes(admin: SocketAddr, backend: &str, result: &str, n: f64) {
    let backend = format!(r#"backend="{backend}""#);
    let result = format!(r#"result="{result}""#);
    wait_until(&format!("{n} probes with {backend}, {result}"), || {
        let body = scrape(admin);
        sample(&body, "sluice_health_checks_total", &[&backend, &result]).unwrap_or(0.0) >= n
    });
}

/// Waits for a log line about `backend` that contains `text`; returns it.
fn wait_for_backend(sluice: &Sluice, backend: &str, text: &str) -> String {
    let about = format!("backend={backend} ");
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let log = sluice.log_lines();
        if let Some(line) = log.iter().find(|l| l.contains(&about) && l.contains(text)) {
            return line.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {text:?} about {backend} in the log:\n{}",
            log.join("\n")
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The health settings of a role check with the probe's login.
fn role_check(preset: &str, role: &str, password: &TempFile) -> String {
    format!(
        "    health:\n      interval: 100ms\n      timeout: 100ms\n      rise: 1\n      fall: 1\n      preset: {preset}\n      role: {role}\n      auth: {{ user: probe, password_file: {} }}\n",
        password.path.display()
    )
}

#[test]
fn redis_with_a_password_knows_its_master() {
    let password = password_file();
    let master = redis_server_with(&["--requirepass", PROBE_PASSWORD]);
    let (ip, port) = (master.addr.ip().to_string(), master.addr.port().to_string());
    let replica = redis_server_with(&[
        "--requirepass",
        PROBE_PASSWORD,
        "--masterauth",
        PROBE_PASSWORD,
        "--replicaof",
        &ip,
        &port,
    ]);
    let backends = [("master", master.addr), ("replica", replica.addr)];
    // The default user: no `user` in the login.
    let health = role_check("redis", "primary", &password).replace("user: probe, ", "");
    let (sluice, _) = start(&health, &backends);
    wait_for_backend(
        &sluice,
        "master",
        "backend is up: its first probe succeeded",
    );
    let line = wait_for_backend(
        &sluice,
        "replica",
        "backend is down: role:slave, not master (its first probe)",
    );
    assert!(line.contains("WARN"), "{line}");

    let (sluice, _) = start(&health.replace("role: primary", "role: replica"), &backends);
    wait_for_backend(
        &sluice,
        "replica",
        "backend is up: its first probe succeeded",
    );
    wait_for_backend(
        &sluice,
        "master",
        "backend is down: role:master, not a replica",
    );
}

/// A wrong password takes the backend down with the server's words, once:
/// the backend never flaps and the line is not repeated at every probe.
#[test]
fn a_wrong_password_says_so_once() {
    let wrong = temp_file("wrong.pass", "not it\n");
    let redis = redis_server_with(&["--requirepass", PROBE_PASSWORD]);
    let health = role_check("redis", "primary", &wrong).replace("user: probe, ", "");
    let (sluice, admin) = start(&health, &[("redis", redis.addr)]);
    let line = wait_for_backend(
        &sluice,
        "redis",
        "backend is down: authentication failed for user \"default\": WRONGPASS",
    );
    wait_for_probes(admin, "redis", "fail", 10.0);
    assert_eq!(sluice.log_count("backend=redis "), 1, "{line}");

    let postgres = Postgres::primary();
    let health = role_check("postgres", "primary", &wrong);
    let (sluice, _) = start(&health, &[("postgres", postgres.server.addr)]);
    wait_for_backend(
        &sluice,
        "postgres",
        "backend is down: password authentication failed for user \"probe\" (its first probe)",
    );
}

#[test]
fn postgres_primary_and_standby_by_recovery() {
    let password = password_file();
    let primary = Postgres::primary();
    let standby = primary.standby();
    let backends = [
        ("standby", standby.server.addr),
        ("primary", primary.server.addr),
    ];
    let (sluice, _) = start(&role_check("postgres", "primary", &password), &backends);
    wait_for_backend(
        &sluice,
        "primary",
        "backend is up: its first probe succeeded",
    );
    wait_for_backend(
        &sluice,
        "standby",
        "backend is down: in recovery (standby) (its first probe)",
    );

    let (sluice, _) = start(&role_check("postgres", "replica", &password), &backends);
    wait_for_backend(
        &sluice,
        "standby",
        "backend is up: its first probe succeeded",
    );
    wait_for_backend(
        &sluice,
        "primary",
        "backend is down: not in recovery (a primary)",
    );

    // Any role: logging in is the check.
    let (sluice, admin) = start(&role_check("postgres", "any", &password), &backends);
    wait_for_probes(admin, "standby", "ok", 3.0);
    wait_for_probes(admin, "primary", "ok", 3.0);
    assert_eq!(sluice.log_count("backend is down"), 0);
}

#[test]
fn mariadb_read_only_is_a_replica() {
    let password = password_file();
    let server = mariadb_with_probe();
    let (sluice, _) = start(
        &role_check("mysql", "primary", &password),
        &[("mariadb", server.addr)],
    );
    wait_for_backend(
        &sluice,
        "mariadb",
        "backend is up: its first probe succeeded",
    );
    mariadb_sql(&server, "SET GLOBAL read_only = 1");
    wait_for_backend(
        &sluice,
        "mariadb",
        "backend is down: read_only=1 (1 probes in a row failed)",
    );
    mariadb_sql(&server, "SET GLOBAL read_only = 0");
    wait_for_backend(
        &sluice,
        "mariadb",
        "backend is up: 1 probes in a row succeeded",
    );
}

/// Patroni's REST API answers on its own port: 200 on the leader, 503 on a
/// replica. Each status line comes in pieces.
#[test]
fn http_probes_on_another_port() {
    // The APIs listen on one port, each on its own address; the backends'
    // data ports are elsewhere (nothing listens there).
    let port = free_addr(unique_loopback()).port();
    let api = |status: &'static str| {
        TestServer::start_on(
            SocketAddr::new(unique_loopback(), port),
            move |mut stream| {
                let mut request = [0u8; 1024];
                let _ = std::io::Read::read(&mut stream, &mut request);
                stream.set_nodelay(true).unwrap();
                for piece in [
                    &status[..6],
                    &status[6..],
                    "\r\nContent-Length: 0\r\n",
                    "\r\n",
                ] {
                    if stream.write_all(piece.as_bytes()).is_err() {
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            },
        )
    };
    let leader = api("HTTP/1.1 200 OK");
    let replica = api("HTTP/1.1 503 Service Unavailable");
    let garbage = TestServer::start_on(SocketAddr::new(unique_loopback(), port), |mut stream| {
        let _ = stream.write_all(b"\x00\x01 not http at all\r\n\r\n");
    });
    let data = |api: &TestServer| SocketAddr::new(api.addr.ip(), 1);
    let health = format!(
        "    health:\n      interval: 100ms\n      timeout: 100ms\n      fall: 1\n      port: {port}\n      http: {{ path: /primary }}\n"
    );
    let (sluice, _) = start(
        &health,
        &[
            ("leader", data(&leader)),
            ("replica", data(&replica)),
            ("garbage", data(&garbage)),
        ],
    );
    wait_for_backend(
        &sluice,
        "replica",
        "backend is down: HTTP 503 Service Unavailable (1 probes in a row failed)",
    );
    wait_for_backend(
        &sluice,
        "garbage",
        "backend is down: unexpected reply \"\\x00\\x01 not http",
    );
    // Up from the start (the pool fails open), it stays up.
    assert_eq!(sluice.log_count("backend=leader "), 0);
}
