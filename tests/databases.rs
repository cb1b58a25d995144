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

/// The connections of `backend` that `on_down: close` has reset.
fn closed_on_down(admin: SocketAddr, backend: &str) -> Option<f64> {
    let backend = format!(r#"backend="{backend}""#);
    sample(
        &scrape(admin),
        "sluice_connections_closed_on_down_total",
        &[&backend],
    )
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

/// A Redis master and its replica, both asking for [`PROBE_PASSWORD`].
fn redis_pair() -> (Server, Server) {
    let auth = [
        "--requirepass",
        PROBE_PASSWORD,
        "--masterauth",
        PROBE_PASSWORD,
    ];
    let master = redis_server_with(&auth);
    let (ip, port) = (master.addr.ip().to_string(), master.addr.port().to_string());
    let replica = redis_server_with(&[&auth[..], &["--replicaof", &ip, &port]].concat());
    // Synced before anyone looks: a replica whose link is down fails a
    // `role: replica` probe, and a Sentinel that asks the master for its
    // replicas before this one has connected asks again only 10 s later.
    let mut to_replica =
        std::io::BufReader::new(std::net::TcpStream::connect(replica.addr).unwrap());
    assert_eq!(
        redis_call(&mut to_replica, &["AUTH", PROBE_PASSWORD]),
        "+OK"
    );
    wait_until("the replica to sync with its master", || {
        redis_call(&mut to_replica, &["INFO", "replication"]).contains("master_link_status:up")
    });
    (master, replica)
}

/// A connection to Redis through `sluice` from client address `ip`,
/// logged in.
fn redis_client(sluice: &Sluice, ip: u32) -> std::io::BufReader<std::net::TcpStream> {
    let mut stream = std::io::BufReader::new(connect_from(client_ip(ip), sluice.listen_addr()));
    assert_eq!(redis_call(&mut stream, &["AUTH", PROBE_PASSWORD]), "+OK");
    stream
}

/// After a switchover: `writer`'s session on the old master is reset, not
/// left to write to a replica, and a new client writes to the new master.
fn writes_move_to_the_new_master(
    sluice: &Sluice,
    mut writer: std::io::BufReader<std::net::TcpStream>,
) {
    writer.get_mut().set_read_timeout(Some(DEADLINE)).unwrap();
    let mut line = String::new();
    let ended = std::io::BufRead::read_line(&mut writer, &mut line);
    assert!(
        matches!(&ended, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{ended:?} {line:?}"
    );
    let mut writer = redis_client(sluice, 7);
    assert_eq!(
        redis_call(&mut writer, &["SET", "k", "2"]),
        "+OK",
        "the new master takes writes"
    );
}

/// The health settings of a role check with the probe's login.
fn role_check(preset: &str, role: &str, password: &TempFile) -> String {
    format!(
        "    health:\n      interval: 300ms\n      timeout: 300ms\n      rise: 1\n      fall: 1\n      preset: {preset}\n      role: {role}\n      auth: {{ user: probe, password_file: {} }}\n",
        password.path.display()
    )
}

#[test]
fn redis_with_a_password_knows_its_master() {
    let password = password_file();
    let (master, replica) = redis_pair();
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
    // Down for the server's words (a probe that found no listener yet
    // would say so first, in a line of its own).
    wait_for_backend(
        &sluice,
        "redis",
        "down: authentication failed for user \"default\": WRONGPASS",
    );
    wait_for_probes(admin, "redis", "fail", 10.0);
    let log = sluice.log_lines().join("\n");
    assert_eq!(sluice.log_count("WRONGPASS"), 1, "said once:\n{log}");
    assert_eq!(sluice.log_count("INFO backend is up"), 0, "no flap:\n{log}");

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

/// A MariaDB server behind a `role: primary` check: up, then down for
/// `reason` once `down_sql` runs, up again after `up_sql`.
fn down_and_back(server: &Server, name: &str, (down_sql, reason): (&str, &str), up_sql: &str) {
    let password = password_file();
    let (sluice, _) = start(
        &role_check("mysql", "primary", &password),
        &[(name, server.addr)],
    );
    wait_for_backend(&sluice, name, "backend is up: its first probe succeeded");
    mariadb_sql(server, down_sql);
    wait_for_backend(
        &sluice,
        name,
        &format!("backend is down: {reason} (1 probes in a row failed)"),
    );
    mariadb_sql(server, up_sql);
    wait_for_backend(&sluice, name, "backend is up: 1 probes in a row succeeded");
}

#[test]
fn mariadb_read_only_is_a_replica() {
    let server = mariadb_with_probe();
    down_and_back(
        &server,
        "mariadb",
        ("SET GLOBAL read_only = 1", "read_only=1"),
        "SET GLOBAL read_only = 0",
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
    // Accepts, reads, never answers.
    let silent = TestServer::start_on(SocketAddr::new(unique_loopback(), port), |mut stream| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stream, &mut sink);
    });
    let data = |api: &TestServer| SocketAddr::new(api.addr.ip(), 1);
    let health = format!(
        "    health:\n      interval: 300ms\n      timeout: 300ms\n      fall: 1\n      port: {port}\n      http: {{ path: /primary }}\n"
    );
    let (sluice, _) = start(
        &health,
        &[
            ("leader", data(&leader)),
            ("replica", data(&replica)),
            ("garbage", data(&garbage)),
            ("silent", data(&silent)),
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
    wait_for_backend(&sluice, "silent", "backend is down: no answer within 300ms");
    // Up from the start (the pool fails open), it stays up.
    assert_eq!(sluice.log_count("backend=leader "), 0);
}

/// A replicated PostgreSQL behind a pool that knows its role: the standby
/// is listed first (`balance: first`), yet from the first client on none
/// reaches it, clients that come before the first probe wait in the queue.
/// The primary dies; the standby is promoted: clients that connect during
/// the gap wait and are served by the new primary, within `fall x interval
/// + timeout` of the promotion.
#[test]
fn postgres_failover_sends_no_client_to_a_standby() {
    let password = password_file();
    let primary = Postgres::primary();
    let standby = primary.standby();
    let pool = format!(
        "{}    balance: first\n    queue: {{ size: 100, timeout: 30s }}\n",
        role_check("postgres", "primary", &password)
            .replace("interval: 100ms", "interval: 200ms")
            .replace("timeout: 100ms", "timeout: 200ms")
            .replace("fall: 1", "fall: 2")
    );
    let (sluice, admin) = start(
        &pool,
        &[
            ("standby", standby.server.addr),
            ("primary", primary.server.addr),
        ],
    );
    let front = sluice.listen_addr();
    // From the first client on, every query runs on the primary.
    let clients: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(move || psql(front, "SELECT pg_is_in_recovery()")))
        .collect();
    for client in clients {
        assert_eq!(client.join().unwrap().as_deref(), Ok("f"));
    }
    wait_for_backend(&sluice, "standby", "backend is down: in recovery (standby)");

    // The primary goes; clients that come now wait.
    drop(primary);
    wait_for_backend(&sluice, "primary", "backend is down");
    let waiting: Vec<_> = (0..5)
        .map(|_| std::thread::spawn(move || psql(front, "SELECT pg_is_in_recovery()")))
        .collect();
    wait_until("five clients in the queue", || {
        sample(&scrape(admin), "sluice_queue_length", &[r#"pool="back""#]) == Some(5.0)
    });
    let promoted = std::time::Instant::now();
    standby.promote();
    for client in waiting {
        assert_eq!(
            client.join().unwrap().as_deref(),
            Ok("f"),
            "served by the new primary"
        );
    }
    let gap = promoted.elapsed();
    // fall x interval + timeout and the promotion itself: well under a
    // second here; the bound leaves room for a slow host, and still
    // catches clients left to the queue's timeout.
    assert!(gap < std::time::Duration::from_secs(10), "{gap:?}");
    eprintln!("switchover: clients queued 5, served {gap:?} after the promotion began");
    assert_eq!(
        psql(front, "SELECT pg_is_in_recovery()").as_deref(),
        Ok("f")
    );
    let turned_away: f64 = ["no_backend", "queue_full", "queue_timeout"]
        .iter()
        .map(|reason| {
            sample(
                &scrape(admin),
                "sluice_connection_errors_total",
                &[&format!(r#"reason="{reason}""#)],
            )
            .unwrap_or(0.0)
        })
        .sum();
    assert_eq!(turned_away, 0.0, "no client refused");
}

/// MariaDB turned read-only has its open sessions reset (`on_down: close`,
/// the default with a role): the client sees an error, not a FIN. New
/// clients wait in the queue and are turned away after its timeout;
/// `read_only = 0` brings the backend back.
#[test]
fn mariadb_made_read_only_loses_its_sessions() {
    let password = password_file();
    let server = mariadb_with_probe();
    let pool = format!(
        "{}    queue: {{ size: 10, timeout: 500ms }}\n",
        role_check("mysql", "primary", &password)
    );
    let (sluice, admin) = start(&pool, &[("mariadb", server.addr)]);
    wait_for_backend(&sluice, "mariadb", "backend is up");
    let greeting = |stream: &mut std::net::TcpStream| {
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut head = [0u8; 5];
        std::io::Read::read_exact(stream, &mut head).map(|()| head[4])
    };
    let mut session = connect_from(client_ip(3), sluice.listen_addr());
    assert_eq!(greeting(&mut session).unwrap(), 10, "a server greeting");

    mariadb_sql(&server, "SET GLOBAL read_only = 1");
    wait_for_backend(&sluice, "mariadb", "backend is down: read_only=1");
    let mut rest = [0u8; 256];
    let error = loop {
        match std::io::Read::read(&mut session, &mut rest) {
            Ok(0) => panic!("a FIN, not a reset"),
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
    assert_eq!(closed_on_down(admin, "mariadb"), Some(1.0));
    let mut late = connect_from(client_ip(4), sluice.listen_addr());
    assert!(
        greeting(&mut late).is_err(),
        "turned away after the queue's timeout"
    );
    assert_eq!(
        sample(
            &scrape(admin),
            "sluice_connection_errors_total",
            &[r#"reason="queue_timeout""#]
        ),
        Some(1.0)
    );

    mariadb_sql(&server, "SET GLOBAL read_only = 0");
    wait_for_backend(
        &sluice,
        "mariadb",
        "backend is up: 1 probes in a row succeeded",
    );
    let mut back = connect_from(client_ip(5), sluice.listen_addr());
    assert_eq!(greeting(&mut back).unwrap(), 10);
}

/// A Redis switchover by hand (the replica promoted, the old master made
/// its replica): clients of the old master are reset rather than left to
/// get -READONLY, and new ones write to the new master.
#[test]
fn redis_switchover_moves_writers_to_the_new_master() {
    let password = password_file();
    let (first, second) = redis_pair();
    let health = role_check("redis", "primary", &password).replace("user: probe, ", "");
    let pool = format!("{health}    balance: first\n    queue: {{ size: 10, timeout: 10s }}\n");
    let (sluice, admin) = start(&pool, &[("second", second.addr), ("first", first.addr)]);
    wait_for_backend(&sluice, "first", "backend is up");
    let mut writer = redis_client(&sluice, 6);
    assert_eq!(redis_call(&mut writer, &["SET", "k", "1"]), "+OK");

    let admin_of = |server: &Server| {
        let mut stream =
            std::io::BufReader::new(std::net::TcpStream::connect(server.addr).unwrap());
        assert_eq!(redis_call(&mut stream, &["AUTH", PROBE_PASSWORD]), "+OK");
        stream
    };
    assert_eq!(
        redis_call(&mut admin_of(&second), &["REPLICAOF", "NO", "ONE"]),
        "+OK"
    );
    let (ip, port) = (second.addr.ip().to_string(), second.addr.port().to_string());
    assert_eq!(
        redis_call(&mut admin_of(&first), &["REPLICAOF", &ip, &port]),
        "+OK"
    );
    wait_for_backend(&sluice, "first", "backend is down: role:slave, not master");

    writes_move_to_the_new_master(&sluice, writer);
    assert_eq!(closed_on_down(admin, "first"), Some(1.0));
}

/// Three Sentinels watch a master and its replica; the pool has no
/// backends of its own but `discovery: { sentinel }`. It routes to the
/// master they name, and after `SENTINEL FAILOVER` to the new one at once
/// (on `+switch-master`): the old master's sessions are reset, new clients
/// write to the new master.
#[test]
fn redis_sentinel_names_the_master() {
    let password = password_file();
    let (master, replica) = redis_pair();
    let sentinels: Vec<Server> = (0..3)
        .map(|_| redis_sentinel(master.addr, PROBE_PASSWORD))
        .collect();
    let addresses: Vec<String> = sentinels.iter().map(|s| s.addr.to_string()).collect();
    let login = format!("{{ password_file: {} }}", password.path.display());
    let pool = format!(
        "    health:\n      interval: 100ms\n      timeout: 100ms\n      preset: redis\n      role: primary\n      auth: {login}\n    queue: {{ size: 10, timeout: 10s }}\n    discovery:\n      sentinel:\n        addresses: [{}]\n        master: mymaster\n        auth: {login}\n",
        addresses.join(", ")
    );
    let text = format!(
        "log:\n  connections: true\nworkers: 2\nlisteners:\n  front:\n    listen: {}\n    pool: back\npools:\n  back:\n{pool}",
        free_addr(unique_loopback())
    );
    let (admin, text) = with_admin(&text);
    let sluice = Sluice::start(&text);
    sluice.wait_for_log(&format!(
        "the Sentinels name {} as master mymaster",
        master.addr
    ));
    let mut writer = redis_client(&sluice, 6);
    assert_eq!(redis_call(&mut writer, &["SET", "k", "1"]), "+OK");

    // The replica must have synced before a Sentinel will promote it.
    let mut to_sentinel =
        std::io::BufReader::new(std::net::TcpStream::connect(sentinels[0].addr).unwrap());
    assert_eq!(
        redis_call(&mut to_sentinel, &["AUTH", PROBE_PASSWORD]),
        "+OK"
    );
    wait_until("the Sentinels to see the replica", || {
        redis_call(&mut to_sentinel, &["SENTINEL", "FAILOVER", "mymaster"]) == "+OK"
    });
    let started = std::time::Instant::now();
    sluice.wait_for_log(&format!(
        "the Sentinels name {} as master mymaster",
        replica.addr
    ));
    eprintln!(
        "sentinel failover followed {:?} after SENTINEL FAILOVER",
        started.elapsed()
    );
    writes_move_to_the_new_master(&sluice, writer);
    assert_eq!(
        sample(
            &scrape(admin),
            "sluice_connection_errors_total",
            &[r#"reason="queue_timeout""#]
        ),
        Some(0.0)
    );
}

/// A Galera node that is not synced (`wsrep_desync`, as for a backup: its
/// wsrep_local_state is 2) is down whatever its `read_only`; synced again,
/// it is back.
#[test]
fn a_galera_node_out_of_sync_is_down() {
    let node = galera_with_probe();
    down_and_back(
        &node,
        "galera",
        (
            "SET GLOBAL wsrep_desync = ON",
            "Galera node not synced: wsrep_local_state=2",
        ),
        "SET GLOBAL wsrep_desync = OFF",
    );
}
