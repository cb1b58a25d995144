//! Patroni (Debian's `patroni` and `etcd-server`) with two PostgreSQL
//! nodes on loopback, behind a pool that probes Patroni's REST API
//! (`GET /primary`) and fails closed: through `patronictl switchover`, no
//! client ever reaches a replica, clients that come during the switch wait
//! and are served by the new leader.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// Where a query through `front` ran: `f|IP` on a primary, `t|IP` on a
/// replica.
fn in_recovery(front: SocketAddr) -> Result<String, String> {
    psql(front, "SELECT pg_is_in_recovery(), inet_server_addr()")
}

/// What clients saw through one switchover.
struct Switched {
    queries: usize,
    /// The errors of queries that failed: sessions on the old leader as it
    /// stopped.
    failed: Vec<String>,
    longest: Duration,
    /// From the switchover's start until a fresh client was served by the
    /// new leader.
    served_after: Duration,
}

/// Runs `patronictl switchover` from `from` to `to` while four clients
/// query through `front` without a break; asserts that none reached a
/// replica and that sluice turned none away.
fn switch_under_load(
    front: SocketAddr,
    admin: SocketAddr,
    (from, from_name): (&PatroniNode, &str),
    (to, to_name): (&PatroniNode, &str),
) -> Switched {
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, answers) = (stop.clone(), answers.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    let answer = in_recovery(front);
                    answers.lock().unwrap().push((started.elapsed(), answer));
                }
            })
        })
        .collect();
    wait_until("clients under way", || answers.lock().unwrap().len() >= 8);
    let switched = Instant::now();
    from.switchover(from_name, to_name);
    wait_until("the new leader", || to.status("/primary") == Some(200));
    wait_until("a fresh client served by the new leader", || {
        in_recovery(front).is_ok_and(|a| a == format!("f|{}", to.addr.ip()))
    });
    let served_after = switched.elapsed();
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.join().unwrap();
    }
    let answers = std::mem::take(&mut *answers.lock().unwrap());
    let on_replica: Vec<&String> = answers
        .iter()
        .filter_map(|(_, a)| a.as_ref().ok().filter(|a| a.starts_with("t|")))
        .collect();
    assert!(
        on_replica.is_empty(),
        "clients reached a replica: {on_replica:?}"
    );
    let turned_away: f64 = ["no_backend", "queue_full", "queue_timeout"]
        .iter()
        .map(|reason| {
            let reason = format!(r#"reason="{reason}""#);
            sample(&scrape(admin), "sluice_connection_errors_total", &[&reason]).unwrap_or(0.0)
        })
        .sum();
    assert_eq!(turned_away, 0.0, "no client turned away by sluice");
    let failed: Vec<String> = answers
        .iter()
        .filter_map(|(_, a)| a.clone().err())
        .collect();
    // A query fails only if its session was on the old leader as it
    // stopped, or was reset there by `on_down: close` (before psql's
    // start-up finished, psql says the connection failed).
    for error in &failed {
        assert!(
            error.contains("shutting down")
                || error.contains("terminating connection")
                || error.contains("server closed the connection")
                || error.contains("connection to server was lost")
                || error.contains("Connection reset by peer"),
            "{error}"
        );
    }
    if failed
        .iter()
        .any(|e| e.contains("Connection reset by peer"))
    {
        let closed = sample(
            &scrape(admin),
            "sluice_connections_closed_on_down_total",
            &[&format!(r#"backend="{from_name}""#)],
        );
        assert!(closed > Some(0.0), "a reset, but none by on_down: close");
    }
    Switched {
        queries: answers.len(),
        failed,
        longest: answers.iter().map(|(took, _)| *took).max().unwrap(),
        served_after,
    }
}

/// How long a Patroni node may take to bootstrap (initdb, election) or to
/// rejoin as a replica (base backup, streaming): seconds here, longer on a
/// slow, busy host.
const BOOTSTRAP: Duration = Duration::from_secs(90);

/// A sluice over the two nodes, the one that does not lead listed first
/// (`first` would pick it were it up), probing as `health` says.
fn sluice_over(nodes: [(&PatroniNode, &str); 2], health: &str) -> (Sluice, SocketAddr) {
    let pool = format!(
        "    balance: first\n    fail_open: false\n    on_down: close\n    queue: {{ size: 100, timeout: 30s }}\n{health}"
    );
    let backends = nodes.map(|(node, name)| (name.to_owned(), node.addr));
    let (admin, text) = with_admin(&format!(
        "log:\n  connections: true\n{}",
        config(free_addr(unique_loopback()), &backends, &pool)
    ));
    let sluice = Sluice::start(&text);
    wait_until("a client served", || {
        in_recovery(sluice.listen_addr()).is_ok_and(|a| a.starts_with("f|"))
    });
    (sluice, admin)
}

#[test]
fn a_patroni_switchover_sends_no_client_to_a_replica() {
    let etcd = etcd();
    // One port for the REST APIs and one for PostgreSQL, on two addresses:
    // the pool probes the same `port` on each backend's address.
    let (ip1, ip2) = (unique_loopback(), unique_loopback());
    let api_port = free_addr(ip1).port();
    let pg_port = free_addr(ip1).port();
    let node1 = PatroniNode::start("node1", ip1, pg_port, api_port, etcd.addr);
    wait_until_within(BOOTSTRAP, "node1 to lead", || {
        node1.status("/primary") == Some(200)
    });
    let node2 = PatroniNode::start("node2", ip2, pg_port, api_port, etcd.addr);
    wait_until_within(BOOTSTRAP, "node2 to replicate", || {
        node2.status("/replica") == Some(200)
    });

    // Patroni's REST API: `rise: 2`, since a new leader says 200 as it
    // starts its promotion.
    let rest = format!(
        "    health:\n      interval: 200ms\n      timeout: 200ms\n      rise: 2\n      fall: 1\n      port: {api_port}\n      http: {{ path: /primary }}\n"
    );
    let (sluice, admin) = sluice_over([(&node2, "node2"), (&node1, "node1")], &rest);
    let by_api = switch_under_load(
        sluice.listen_addr(),
        admin,
        (&node1, "node1"),
        (&node2, "node2"),
    );
    drop(sluice);
    wait_until_within(BOOTSTRAP, "node1 to replicate", || {
        node1.status("/replica") == Some(200)
    });

    // PostgreSQL asked itself: a leader that starts to shut down fails at
    // once.
    let password = temp_file("probe.pass", "pw\n");
    let role = format!(
        "    health:\n      interval: 200ms\n      timeout: 200ms\n      rise: 1\n      fall: 1\n      preset: postgres\n      role: primary\n      auth: {{ user: postgres, password_file: {} }}\n",
        password.path.display()
    );
    let (sluice, admin) = sluice_over([(&node1, "node1"), (&node2, "node2")], &role);
    let by_role = switch_under_load(
        sluice.listen_addr(),
        admin,
        (&node2, "node2"),
        (&node1, "node1"),
    );
    for (probe, switched) in [("REST API /primary", by_api), ("role: primary", by_role)] {
        eprintln!(
            "patroni switchover, probes by {probe}: {} queries, none on a replica, none turned away; {} failed on the old leader as it stopped ({:?}); longest query {:?}; a fresh client served by the new leader {:?} after the switchover began",
            switched.queries,
            switched.failed.len(),
            switched.failed,
            switched.longest,
            switched.served_after
        );
    }
}
