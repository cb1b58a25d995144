//! Maglev routing through the real binary: every client keeps its backend,
//! equal backends share clients fairly, two processes agree, and a refused
//! backend's clients move to their next choice while everyone else stays.

mod common;

use std::collections::HashMap;

use common::*;

const CLIENTS: u32 = 300;

#[test]
fn each_client_keeps_its_backend_and_shares_are_fair() {
    let (_servers, backends) = name_servers(3);
    let sluice = Sluice::start(&config(free_addr(unique_loopback()), &backends, ""));
    let addr = sluice.listen_addr();

    let mut first: HashMap<u32, String> = HashMap::new();
    for i in 0..CLIENTS {
        first.insert(i, backend_for(client_ip(i), addr));
    }
    for round in 0..2 {
        for i in 0..CLIENTS {
            assert_eq!(
                backend_for(client_ip(i), addr),
                first[&i],
                "client {} changed backend in round {round}",
                client_ip(i)
            );
        }
    }

    let mut shares: HashMap<&str, u32> = HashMap::new();
    for name in first.values() {
        *shares.entry(name).or_default() += 1;
    }
    // 300 keys over 3 equal backends: 100 each, standard deviation about 8;
    // 70..130 fails only on a real skew.
    for (name, _) in &backends {
        let share = shares.get(name.as_str()).copied().unwrap_or(0);
        assert!(
            (70..=130).contains(&share),
            "{name} got {share} of {CLIENTS} clients: {shares:?}"
        );
    }
}

#[test]
fn explain_agrees_with_live_routing() {
    let (_servers, backends) = name_servers(4);
    let sluice = Sluice::start(&config(free_addr(unique_loopback()), &backends, ""));
    let addr = sluice.listen_addr();
    for i in (0..CLIENTS).step_by(6) {
        let ip = client_ip(i);
        let (explained, retries) = explain(sluice.config_path(), "back", &ip.to_string());
        assert_eq!(backend_for(ip, addr), explained, "client {ip}");
        assert_eq!(retries.len(), 2, "retries: 2 by default");
        assert!(!retries.contains(&explained));
    }
}

#[test]
fn two_processes_agree_whatever_the_backend_order() {
    let (_servers, backends) = name_servers(5);
    let mut reversed = backends.clone();
    reversed.reverse();
    let a = Sluice::start(&config(free_addr(unique_loopback()), &backends, ""));
    let b = Sluice::start(&config(free_addr(unique_loopback()), &reversed, ""));
    let (a_addr, b_addr) = (a.listen_addr(), b.listen_addr());
    for i in 0..CLIENTS {
        let ip = client_ip(i);
        assert_eq!(
            backend_for(ip, a_addr),
            backend_for(ip, b_addr),
            "client {ip}"
        );
    }
}

#[test]
fn refused_backend_moves_only_its_own_clients_to_their_next_choice() {
    let (mut servers, backends) = name_servers(3);
    // Connection lines, so that a failure shows how sluice ended the
    // connection (this test once saw a reset in ~13 full-suite runs).
    let text = format!(
        "log:\n  connections: true\n{}",
        config(free_addr(unique_loopback()), &backends, "")
    );
    let sluice = Sluice::start(&text);
    let addr = sluice.listen_addr();
    let name_for = |ip| {
        round_trip(ip, addr).unwrap_or_else(|e| {
            panic!(
                "client {ip}: {e}; sluice log:\n{}",
                sluice.log_lines().join("\n")
            )
        })
    };
    let before: Vec<String> = (0..CLIENTS).map(|i| name_for(client_ip(i))).collect();

    servers[1].stop(); // backend-1 now refuses connections
    let mut moved = 0;
    for i in 0..CLIENTS {
        let ip = client_ip(i);
        let now = name_for(ip);
        if before[i as usize] == "backend-1" {
            let (first, retries) = explain(sluice.config_path(), "back", &ip.to_string());
            assert_eq!(first, "backend-1");
            assert_eq!(now, retries[0], "client {ip} should go to its first retry");
            moved += 1;
        } else {
            assert_eq!(
                now, before[i as usize],
                "client {ip} of a live backend moved"
            );
        }
    }
    assert!(moved > 50, "only {moved} clients were on backend-1");
}

#[test]
fn a_pool_with_nothing_reachable_closes_clients_and_logs_once() {
    let dead: Vec<(String, std::net::SocketAddr)> = (0..2)
        .map(|i| (format!("dead-{i}"), free_addr(unique_loopback())))
        .collect();
    let sluice = Sluice::start(&config(free_addr(unique_loopback()), &dead, ""));
    let addr = sluice.listen_addr();
    for i in 0..20 {
        let mut stream = connect_from(client_ip(i), addr);
        let mut buf = [0u8; 16];
        let n = std::io::Read::read(&mut stream, &mut buf).unwrap_or(0);
        assert_eq!(n, 0, "a client with no backend must be closed");
    }
    sluice.wait_for_log("no backend reachable");
    let warnings = sluice
        .log_lines()
        .iter()
        .filter(|l| l.contains("no backend reachable"))
        .count();
    assert!(
        warnings < 20,
        "the warning is rate-limited, got {warnings} lines for 20 clients"
    );
}
