//! Probe presets against the real servers from Debian packages: redis (PING,
//! and the master role), memcached (version), PostgreSQL (an SSLRequest) and
//! MySQL (the server greeting, or the error packet a server sends instead).
//! For every preset, a backend that answers something else goes down with
//! the reason in the log.

mod common;

use std::io::Write;
use std::net::SocketAddr;

use common::*;

/// A sluice probing `backends` every 200 ms with the health settings
/// `health` (the inside of a flow mapping); its admin endpoint counts the
/// probes.
struct Probed {
    sluice: Sluice,
    admin: SocketAddr,
}

impl Probed {
    fn start(backends: &[(&str, SocketAddr)], health: &str) -> Probed {
        let backends: Vec<(String, SocketAddr)> = backends
            .iter()
            .map(|&(name, addr)| (name.to_owned(), addr))
            .collect();
        let admin = free_addr(unique_loopback());
        let pool = format!(
            "    health: {{ interval: 200ms, timeout: 200ms, rise: 2, fall: 2, {health} }}\n"
        );
        let text = format!(
            "admin:\n  listen: {admin}\n{}",
            config(free_addr(unique_loopback()), &backends, &pool)
        );
        Probed {
            sluice: Sluice::start(&text),
            admin,
        }
    }

    /// Waits until `backend` has passed three probes; fails at once if it
    /// goes down.
    fn wait_until_up(&self, backend: &str) {
        let label = format!(r#"backend="{backend}""#);
        let down = format!("backend={backend} ");
        wait_until(&format!("three passed probes of {backend}"), || {
            let log = self.sluice.log_lines();
            assert!(
                !log.iter()
                    .any(|l| l.contains("backend is down") && l.contains(&down)),
                "{backend} went down:\n{}",
                log.join("\n")
            );
            let body = scrape(self.admin);
            let passed = sample(
                &body,
                "sluice_health_checks_total",
                &[&label, r#"result="ok""#],
            );
            passed.unwrap_or(0.0) >= 3.0
        });
    }

    /// Waits for `backend` to go down; returns the reason logged.
    fn wait_until_down(&self, backend: &str) -> String {
        let line = self.sluice.wait_for_log(&format!("backend={backend} "));
        // A pool that fails closed (`require_master`) judges a backend by
        // its first probe.
        let reason = line.split_once("backend is down: ").and_then(|(_, rest)| {
            rest.split_once(" (2 probes in a row failed)")
                .or_else(|| rest.split_once(" (its first probe)"))
        });
        let reason = reason.unwrap_or_else(|| panic!("not a probe failure: {line}"));
        reason.0.to_owned()
    }
}

#[test]
fn redis_a_replica_is_down_only_when_the_master_is_required() {
    let master = redis_server();
    let (ip, port) = (master.addr.ip().to_string(), master.addr.port().to_string());
    let replica = redis_server_with(&["--replicaof", &ip, &port]);
    let backends = [("master", master.addr), ("replica", replica.addr)];

    let probed = Probed::start(&backends, "preset: redis, require_master: true");
    assert_eq!(probed.wait_until_down("replica"), "role:slave, not master");
    probed.wait_until_up("master");

    let probed = Probed::start(&backends, "preset: redis");
    probed.wait_until_up("master");
    probed.wait_until_up("replica");
}

#[test]
fn memcached_answers_version() {
    let memcached = memcached();
    Probed::start(&[("memcached", memcached.addr)], "preset: memcached").wait_until_up("memcached");
}

#[test]
fn postgres_answers_the_ssl_request() {
    let postgres = postgres();
    Probed::start(&[("postgres", postgres.addr)], "preset: postgres").wait_until_up("postgres");
}

#[test]
fn mysql_greets_or_says_why_not() {
    // Anyone may connect to one. The other keeps only its `localhost`
    // accounts, which TCP clients never match without host name resolution:
    // it refuses them before greeting.
    let server = mariadb("CREATE USER 'probe'@'%';\n");
    let refusing =
        mariadb("DELETE FROM mysql.global_priv WHERE host <> 'localhost';\nFLUSH PRIVILEGES;\n");
    let backends = [("mariadb", server.addr), ("refusing", refusing.addr)];
    let probed = Probed::start(&backends, "preset: mysql");
    let reason = probed.wait_until_down("refusing");
    assert!(
        reason.starts_with("server error 1130: Host '")
            && reason.ends_with("' is not allowed to connect to this MariaDB server"),
        "{reason}"
    );
    probed.wait_until_up("mariadb");
}

/// Pointed at a web server by mistake, every preset takes the backend out.
#[test]
fn a_backend_that_answers_something_else_goes_down_with_each_preset() {
    let web = TestServer::start(|mut stream| {
        let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    for health in [
        "preset: redis",
        "preset: redis, require_master: true",
        "preset: memcached",
        "preset: postgres",
        "preset: mysql",
    ] {
        let probed = Probed::start(&[("web", web.addr)], health);
        let reason = probed.wait_until_down("web");
        assert!(
            reason.starts_with(r#"unexpected reply "HTTP/1.1"#),
            "{health}: {reason}"
        );
    }
}
