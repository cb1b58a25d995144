//! SIGHUP reloads: under a client loop, twenty changes (backends added,
//! removed, reweighted; a listener added and removed) fail no connection and
//! cut none; a broken file changes nothing; health state of the backends
//! that stay is kept; host names are re-resolved.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};

use common::*;

/// A configuration with the `main` listener on `main`, optionally the
/// `extra` listener on `extra`, and a pool of the given (name, addr, weight).
fn two_listener_config(
    main: SocketAddr,
    extra: Option<SocketAddr>,
    backends: &[(&str, SocketAddr, u32)],
) -> String {
    let mut text = format!("workers: 2\nlisteners:\n  main:\n    listen: {main}\n    pool: back\n");
    if let Some(extra) = extra {
        text.push_str(&format!("  extra:\n    listen: {extra}\n    pool: back\n"));
    }
    text.push_str(
        "pools:\n  back:\n    health: { interval: 200ms, timeout: 100ms }\n    backends:\n",
    );
    for (name, addr, weight) in backends {
        text.push_str(&format!(
            "      - {{ address: {addr}, name: {name}, weight: {weight} }}\n"
        ));
    }
    text
}

#[test]
fn twenty_reloads_under_load_fail_and_cut_no_connection() {
    let servers: Vec<TestServer> = (0..4).map(|i| name_server(&format!("b{i}"))).collect();
    let b = |i: usize| servers[i].addr;
    let main = free_addr(unique_loopback());
    let extra = free_addr(unique_loopback());
    let step_config = |step: usize| match step % 5 {
        0 => two_listener_config(
            main,
            None,
            &[("b0", b(0), 1), ("b1", b(1), 1), ("b2", b(2), 1)],
        ),
        1 => two_listener_config(
            main,
            None,
            &[
                ("b0", b(0), 1),
                ("b1", b(1), 1),
                ("b2", b(2), 1),
                ("b3", b(3), 1),
            ],
        ),
        2 => two_listener_config(
            main,
            None,
            &[("b1", b(1), 1), ("b2", b(2), 1), ("b3", b(3), 1)],
        ),
        3 => two_listener_config(
            main,
            None,
            &[("b1", b(1), 3), ("b2", b(2), 1), ("b3", b(3), 1)],
        ),
        _ => two_listener_config(
            main,
            Some(extra),
            &[("b1", b(1), 3), ("b2", b(2), 1), ("b3", b(3), 1)],
        ),
    };
    let sluice = Sluice::start(&step_config(0));

    // Connections that stay open across every reload, b0's among them.
    let held: Vec<(BufReader<TcpStream>, String)> = (0..12)
        .map(|i| {
            let mut reader = BufReader::new(connect_from(client_ip(500 + i), main));
            let mut name = String::new();
            reader.read_line(&mut name).unwrap();
            (reader, name)
        })
        .collect();
    assert!(
        held.iter().any(|(_, name)| name == "b0\n"),
        "no held connection on b0"
    );

    let clients = ClientLoops::start(1, main);

    for step in 1..=20 {
        let outcome = sluice.reload(&step_config(step));
        assert!(
            outcome.contains("configuration reloaded"),
            "step {step}: {outcome}"
        );
        if step % 5 == 4 {
            let name = round_trip(client_ip(900), extra).expect("the added listener serves");
            assert!(["b1", "b2", "b3"].contains(&name.as_str()), "{name}");
        }
        if step % 5 == 0 {
            // The listener removed by this reload refuses connections.
            wait_until("the removed listener to refuse", || {
                TcpStream::connect(extra).is_err()
            });
        }
        // Let the client loop run through this configuration.
        clients.wait_for(20);
    }
    let served = clients.served();
    let failures = clients.stop();
    assert!(failures.is_empty(), "failed connections: {failures:?}");
    assert!(served >= 400);

    for (mut reader, name) in held {
        reader.get_mut().write_all(b"still here").unwrap();
        let mut echo = [0u8; 10];
        reader.read_exact(&mut echo).unwrap();
        assert_eq!(&echo, b"still here", "held connection to {name}");
    }
}

#[test]
fn a_broken_file_on_reload_changes_nothing() {
    let (_servers, backends) = name_servers(3);
    let text = config(free_addr(unique_loopback()), &backends, "");
    let sluice = Sluice::start(&text);
    let before: Vec<String> = (0..50)
        .map(|i| backend_for(client_ip(i), sluice.listen_addr()))
        .collect();

    let broken = text.replace("    pool: back\n", "    pool: back\n    typo: 1\n");
    let outcome = sluice.reload(&broken);
    assert!(
        outcome.contains("reload failed, the configuration in use is unchanged"),
        "{outcome}"
    );
    assert!(
        outcome.contains("sluice.yaml:6:5: listeners.front: unknown field `typo`"),
        "{outcome}"
    );
    let after: Vec<String> = (0..50)
        .map(|i| backend_for(client_ip(i), sluice.listen_addr()))
        .collect();
    assert_eq!(before, after);

    // A good file after a broken one is taken.
    let fewer = config(sluice.listen_addr(), &backends[..2], "");
    assert!(sluice.reload(&fewer).contains("configuration reloaded"));
    for i in 0..50 {
        assert_ne!(backend_for(client_ip(i), sluice.listen_addr()), "backend-2");
    }
}

#[test]
fn health_state_of_remaining_backends_survives_a_reload() {
    let (_servers, mut backends) = name_servers(3);
    backends.push(("dead".into(), free_addr(unique_loopback())));
    let health = "    health: { interval: 100ms, timeout: 50ms, fall: 1, rise: 1 }\n";
    let listen = free_addr(unique_loopback());
    let sluice = Sluice::start(&config(
        listen,
        &[backends[0].clone(), backends[3].clone()],
        health,
    ));
    sluice.wait_for_log("backend=dead");
    // Add two backends: the dead one stays down, the new ones start up.
    let outcome = sluice.reload(&config(listen, &backends, health));
    assert!(outcome.contains("up=3 backends=4"), "{outcome}");
    assert_eq!(sluice.log_count("backend is down"), 1);
}

#[test]
fn host_names_are_re_resolved_every_resolve_interval() {
    let first = name_server("first");
    let port = first.addr.port();
    let second_addr = SocketAddr::new(unique_loopback(), port);
    let second = name_server_on("second", second_addr);
    let host = format!("sluice-test-{}.invalid", std::process::id());
    let hosts = HostsEntry::set(&host, &[first.addr.ip()]);

    let text = format!(
        "workers: 2\nlisteners:\n  front:\n    listen: {}\n    pool: back\npools:\n  back:\n    health: off\n    resolve_interval: 100ms\n    backends:\n      - address: {host}:{port}\n",
        free_addr(unique_loopback())
    );
    let sluice = Sluice::start(&text);
    for i in 0..20 {
        assert_eq!(backend_for(client_ip(i), sluice.listen_addr()), "first");
    }

    // The name gains an address: both serve.
    hosts.write(&[first.addr.ip(), second.addr.ip()]);
    sluice.wait_for_log("now resolves to");
    let mut seen = std::collections::HashSet::new();
    for i in 0..60 {
        seen.insert(backend_for(client_ip(i), sluice.listen_addr()));
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    // And loses the first: only the second serves.
    hosts.write(&[second.addr.ip()]);
    sluice.wait_for_log_count("now resolves to", 2);
    for i in 0..20 {
        assert_eq!(backend_for(client_ip(i), sluice.listen_addr()), "second");
    }
}

/// A host name that gains an address keeps the verdict, the load and the
/// name of the address it had: a dead first address stays out of
/// rotation when a second one appears, instead of coming back as a new
/// backend that starts up.
#[test]
fn a_host_name_gaining_an_address_keeps_the_first_ones_verdict() {
    let dead = free_addr(unique_loopback());
    let live = name_server_on("live", SocketAddr::new(unique_loopback(), dead.port()));
    let host = format!("sluice-gain-{}.invalid", std::process::id());
    let hosts = HostsEntry::set(&host, &[dead.ip()]);
    let admin = free_addr(unique_loopback());
    let text = format!(
        "admin:\n  listen: {admin}\nworkers: 2\nlisteners:\n  front:\n    listen: {}\n    pool: back\npools:\n  back:\n    resolve_interval: 100ms\n    health: {{ interval: 100ms, timeout: 50ms, fall: 1, rise: 1 }}\n    backends:\n      - address: {host}:{}\n        name: cache\n",
        free_addr(unique_loopback()),
        dead.port()
    );
    let sluice = Sluice::start(&text);
    let first = format!("backend=\"cache/{}\"", dead.ip());
    sluice.wait_for_log("backend is down");
    assert_eq!(
        sample(&scrape(admin), "sluice_backend_up", &[&first]),
        Some(0.0)
    );

    hosts.write(&[dead.ip(), live.addr.ip()]);
    sluice.wait_for_log("now resolves to");
    let body = scrape(admin);
    assert_eq!(
        sample(&body, "sluice_backend_up", &[&first]),
        Some(0.0),
        "{body}"
    );
    let second = format!("backend=\"cache/{}\"", live.addr.ip());
    assert_eq!(sample(&body, "sluice_backend_up", &[&second]), Some(1.0));
    for i in 0..20 {
        assert_eq!(backend_for(client_ip(i), sluice.listen_addr()), "live");
    }
    assert_eq!(
        sluice.log_count("INFO backend is down"),
        1,
        "{}",
        sluice.log_lines().join("\n")
    );
}

/// Renaming a listener keeps its sockets, and the connections in their
/// backlog: forty renames under four client loops fail no connection.
#[test]
fn renaming_a_listener_keeps_its_sockets_under_load() {
    let (_servers, backends) = name_servers(2);
    let listen = free_addr(unique_loopback());
    let text = config(listen, &backends, "");
    let sluice = Sluice::start(&text);
    let loops = ClientLoops::start(4, listen);
    for i in 0..40 {
        let name = if i % 2 == 0 { "renamed" } else { "front" };
        let outcome = sluice.reload(&text.replace("  front:\n", &format!("  {name}:\n")));
        assert!(outcome.contains("configuration reloaded"), "{outcome}");
        loops.wait_for(5);
    }
    let failures = loops.stop();
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    sluice.wait_for_log("listener front renamed renamed, its sockets kept");
}

/// Keys that apply only on restart warn on every reload that changes
/// them, not only on the first.
#[test]
fn a_restart_only_change_warns_on_every_reload() {
    let (_servers, backends) = name_servers(1);
    let text = config(free_addr(unique_loopback()), &backends, "");
    let sluice = Sluice::start(&text);
    let changed = text.replace("workers: 2", "workers: 3");
    for reloads in 1..=2 {
        sluice.reload(&changed);
        assert_eq!(
            sluice.log_count("workers changed: it takes effect when sluice restarts"),
            reloads
        );
    }
}
