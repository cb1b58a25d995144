//! The balancing algorithms through the real binary: who gets each new
//! connection, with connections held open across both workers where the
//! algorithm counts them, and backend connection limits.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, TcpStream};

use common::*;

/// A connection through sluice, held open, and the backend that answered.
fn hold(client: IpAddr, sluice: SocketAddr) -> (String, TcpStream) {
    let stream = connect_from(client, sluice);
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("reading the backend name: {e}"));
    assert!(line.ends_with('\n'), "no backend answered: {line:?}");
    (line.trim_end().to_owned(), stream)
}

/// How many of `names` each backend has.
fn tally<'a>(names: impl IntoIterator<Item = &'a String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for name in names {
        *counts.entry(name.clone()).or_insert(0) += 1;
    }
    counts
}

/// A pool of `weights.len()` name servers with those weights, balanced by
/// `pool_settings` (indented as pool keys).
fn start(weights: &[u32], pool_settings: &str) -> (Vec<TestServer>, Sluice) {
    let (servers, backends) = name_servers(weights.len());
    let mut text = config(free_addr(unique_loopback()), &backends, pool_settings);
    for (i, weight) in weights.iter().enumerate() {
        text = text.replace(
            &format!("name: backend-{i}\n"),
            &format!("name: backend-{i}\n        weight: {weight}\n"),
        );
    }
    let sluice = Sluice::start(&(text + "log:\n  connections: true\n"));
    (servers, sluice)
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|&(n, c)| (n.to_owned(), c)).collect()
}

#[test]
fn round_robin_is_exact() {
    let (_servers, sluice) = start(&[1, 1, 1], "    balance: round_robin\n");
    // From one client address, whichever worker accepts: each backend
    // exactly once per round.
    let names: Vec<String> = (0..30)
        .map(|_| backend_for(client_ip(1), sluice.listen_addr()))
        .collect();
    for round in names.chunks(3) {
        assert_eq!(tally(round).len(), 3, "a round missed a backend: {names:?}");
    }
}

#[test]
fn round_robin_honours_weights() {
    let (_servers, sluice) = start(&[3, 2, 1], "    balance: round_robin\n");
    let names: Vec<String> = (0..60)
        .map(|i| backend_for(client_ip(i), sluice.listen_addr()))
        .collect();
    assert_eq!(
        tally(&names),
        counts(&[("backend-0", 30), ("backend-1", 20), ("backend-2", 10)])
    );
}

#[test]
fn smooth_weighted_round_robin_spreads_the_heavy_backend_out() {
    let (_servers, sluice) = start(&[3, 2, 1], "    balance: weighted_round_robin\n");
    let order: String = (0..12)
        .map(|i| {
            let name = backend_for(client_ip(i), sluice.listen_addr());
            match name.as_str() {
                "backend-0" => 'a',
                "backend-1" => 'b',
                "backend-2" => 'c',
                other => panic!("unknown backend {other}"),
            }
        })
        .collect();
    // NGINX's cycle, from wherever the rotation starts.
    let cycle = "abacba".repeat(3);
    assert!(
        (0..6).any(|start| cycle[start..start + 12] == order),
        "{order} is not a rotation of abacba"
    );
}

#[test]
fn least_connections_counts_open_connections_across_workers() {
    let (_servers, sluice) = start(&[2, 1], "    balance: least_connections\n");
    // Held open one after the other (the kernel spreads them over both
    // workers): 2:1 weights give 6 and 3.
    let mut held: Vec<(String, TcpStream)> = (0..9)
        .map(|i| hold(client_ip(i), sluice.listen_addr()))
        .collect();
    let names = |held: &[(String, TcpStream)]| tally(held.iter().map(|(n, _)| n));
    assert_eq!(names(&held), counts(&[("backend-0", 6), ("backend-1", 3)]));
    // Close three of backend-0's: the next three go back to it.
    for _ in 0..3 {
        let at = held.iter().position(|(n, _)| n == "backend-0").unwrap();
        held.remove(at);
    }
    sluice.wait_for_log_count("connection closed", 3);
    held.extend((0..3).map(|i| hold(client_ip(100 + i), sluice.listen_addr())));
    assert_eq!(names(&held), counts(&[("backend-0", 6), ("backend-1", 3)]));
}

#[test]
fn random_follows_the_weights() {
    let (_servers, sluice) = start(&[1, 1, 2], "    balance: random\n");
    let names: Vec<String> = (0..800)
        .map(|i| backend_for(client_ip(i), sluice.listen_addr()))
        .collect();
    let got = tally(&names);
    // Expected 200, 200, 400; the bounds are over five standard deviations.
    for (name, expected) in [("backend-0", 200), ("backend-1", 200), ("backend-2", 400)] {
        let n = got.get(name).copied().unwrap_or(0) as i64;
        assert!((n - expected).abs() < 80, "{name}: {n} of 800 ({got:?})");
    }
}

#[test]
fn power_of_two_keeps_held_connections_level() {
    let (_servers, sluice) = start(&[1, 1, 1, 1], "    balance: power_of_two\n");
    let held: Vec<(String, TcpStream)> = (0..80)
        .map(|i| hold(client_ip(i), sluice.listen_addr()))
        .collect();
    let got = tally(held.iter().map(|(n, _)| n));
    let (min, max) = (
        got.values().min().copied().unwrap_or(0),
        got.values().max().copied().unwrap_or(0),
    );
    // Random choice alone spreads 80 over 4 with a typical gap of ~10;
    // the less loaded of two keeps it within a few.
    assert_eq!(got.len(), 4, "{got:?}");
    assert!(max - min <= 6, "{got:?}");
}

#[test]
fn bounded_load_maglev_passes_an_overloaded_backend_over() {
    // Every connection from one client address hashes to the same backend.
    let (_servers, plain) = start(&[1, 1], "");
    let held: Vec<_> = (0..20)
        .map(|_| hold(client_ip(7), plain.listen_addr()))
        .collect();
    assert_eq!(tally(held.iter().map(|(n, _)| n)).len(), 1);

    let (_servers, bounded) = start(&[1, 1], "    max_load_factor: 1.25\n");
    let held: Vec<_> = (0..20)
        .map(|_| hold(client_ip(7), bounded.listen_addr()))
        .collect();
    let got = tally(held.iter().map(|(n, _)| n));
    // 1.25 x the mean of 10 (counting the newest) caps a backend at 13.
    assert!(
        got.values().all(|&n| (7..=13).contains(&n)) && got.len() == 2,
        "{got:?}"
    );
}

#[test]
fn a_full_backend_is_passed_over_and_a_full_pool_turns_clients_away() {
    let (_servers, backends) = name_servers(2);
    let text = config(free_addr(unique_loopback()), &backends, "")
        .replace(
            "name: backend-0\n",
            "name: backend-0\n        max_connections: 2\n",
        )
        .replace(
            "name: backend-1\n",
            "name: backend-1\n        max_connections: 1\n",
        );
    let sluice = Sluice::start(&text);
    let held: Vec<_> = (0..3)
        .map(|_| hold(client_ip(3), sluice.listen_addr()))
        .collect();
    let mut names: Vec<&str> = held.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    assert_eq!(names, ["backend-0", "backend-0", "backend-1"]);
    // Both full: the next client is closed at once, and the log says why.
    let error = round_trip(client_ip(4), sluice.listen_addr()).expect_err("turned away");
    assert!(!error.is_empty());
    sluice.wait_for_log("every backend is at its max_connections");
}

#[test]
fn a_reload_switches_the_algorithm_for_new_connections() {
    let (_servers, backends) = name_servers(3);
    let text = config(free_addr(unique_loopback()), &backends, "");
    let sluice = Sluice::start(&text);
    let from_one_client = |sluice: &Sluice| {
        let names: Vec<String> = (0..9)
            .map(|_| backend_for(client_ip(8), sluice.listen_addr()))
            .collect();
        tally(&names)
    };
    assert_eq!(from_one_client(&sluice).len(), 1, "maglev: one backend");
    sluice.reload(&text.replace(
        "    health: off\n",
        "    health: off\n    balance: round_robin\n",
    ));
    assert_eq!(
        from_one_client(&sluice),
        counts(&[("backend-0", 3), ("backend-1", 3), ("backend-2", 3)])
    );
}
