//! `sluice explain` beyond one client's route: `--without` agrees with live
//! routing while that backend is really down; `--remap` reports the share of
//! clients a change moves; mistakes are one line with exit 1, usage errors
//! exit 2.

mod common;

use std::net::SocketAddr;
use std::process::Output;

use common::*;

const CLIENTS: u32 = 200;

#[test]
fn without_agrees_with_live_routing_while_the_backend_is_down() {
    let (mut servers, backends) = name_servers(4);
    let sluice = Sluice::start(&config(
        free_addr(unique_loopback()),
        &backends,
        "    health: { interval: 100ms, timeout: 100ms, fall: 1, rise: 1 }\n",
    ));
    servers[2].stop();
    let line = sluice.wait_for_log("backend is down");
    assert!(line.contains("backend=backend-2 "), "{line}");

    let mut moved = 0;
    for i in 0..CLIENTS {
        let ip = client_ip(i).to_string();
        let (first, retries) = explain_without(sluice.config_path(), "back", &ip, &["backend-2"]);
        assert_eq!(
            backend_for(client_ip(i), sluice.listen_addr()),
            first,
            "client {ip}"
        );
        assert_eq!(retries.len(), 2, "retries: 2 by default");
        assert!(!retries.contains(&"backend-2".to_owned()), "{retries:?}");
        if explain(sluice.config_path(), "back", &ip).0 == "backend-2" {
            moved += 1;
        }
    }
    assert!(moved > 25, "only {moved} clients were on backend-2");
}

#[test]
fn without_says_whether_the_client_moved() {
    let file = pool_file(4);
    let path = file.path.to_str().unwrap();
    let without = |down: &[&str]| {
        let mut args = vec!["explain", "-c", path, "back", "10.1.2.3"];
        for name in down {
            args.extend(["--without", name]);
        }
        stdout(sluice_command(&args))
    };
    let (home, _) = explain(&file.path, "back", "10.1.2.3");
    let other = if home == "backend-0" {
        "backend-1"
    } else {
        "backend-0"
    };

    let moved = without(&[&home]);
    assert!(moved.contains(&format!("down:    {home}\n")), "{moved}");
    assert!(
        moved.contains(&format!("moved:   yes, from {home} (")),
        "{moved}"
    );
    let stayed = without(&[other]);
    assert!(stayed.contains(&format!("backend: {home} (")), "{stayed}");
    assert!(stayed.ends_with("moved:   no\n"), "{stayed}");

    // With every backend out, sluice routes over all of them, and says so.
    let all = without(&["backend-0", "backend-1", "backend-2", "backend-3"]);
    assert!(all.contains(&format!("backend: {home} (")), "{all}");
    assert!(
        all.contains("note:    every backend is down: sluice routes over all of them"),
        "{all}"
    );
}

#[test]
fn bounded_load_is_pointed_out() {
    let file = with_pool("    max_load_factor: 1.25\n");
    let text = stdout(sluice_command(&[
        "explain",
        "-c",
        file.path.to_str().unwrap(),
        "back",
        "10.1.2.3",
    ]));
    assert!(
        text.contains("note:    max_load_factor 1.25: live, a backend over its share"),
        "{text}"
    );
}

#[test]
fn remap_from_four_to_five_backends_moves_a_fifth() {
    let (four, five) = (pool_file(4), pool_file(5));
    let text = remap(&four, &five, &[]);
    let share = moved_share(&text);
    assert!((share - 20.0).abs() < 2.0, "{text}");
    assert!(
        text.contains("before:  4 backends, 65537 slots ("),
        "{text}"
    );
    assert!(
        text.contains("after:   5 backends, 65537 slots ("),
        "{text}"
    );
    // The table lists the largest moves first: onto the new backend.
    let first_row = text.lines().skip_while(|l| !l.starts_with("from")).nth(1);
    assert!(
        first_row.is_some_and(|row| row.contains("backend-4 (new)")),
        "{text}"
    );

    let back = remap(&five, &four, &[]);
    assert!((moved_share(&back) - share).abs() < 0.05, "{back}");
    assert!(back.contains("backend-4 (removed)"), "{back}");

    let same = remap(&four, &four, &[]);
    assert!(
        same.ends_with("moved:   0.0% of clients (0 of 65537 slots)\n"),
        "{same}"
    );
}

/// With a client, `--remap` says where it goes in each file, as plain
/// `explain` does.
#[test]
fn remap_follows_one_client() {
    let (four, five) = (pool_file(4), pool_file(5));
    for i in 0..40 {
        let ip = client_ip(i).to_string();
        let text = remap(&four, &five, &[&ip]);
        let (was, _) = explain(&four.path, "back", &ip);
        let (will, _) = explain(&five.path, "back", &ip);
        let expected = if was == will {
            format!("client:  {ip} stays on {will} (")
        } else {
            format!("client:  {ip} moves from {was} (")
        };
        assert!(text.contains(&expected), "{expected}\n{text}");
    }
}

#[test]
fn mistakes_are_one_line_and_exit_1() {
    let file = pool_file(3);
    let path = file.path.to_str().unwrap();
    let elsewhere = temp_file(
        "other.yaml",
        &config(free_addr(unique_loopback()), &backends(1), "")
            .replace(" back\n", " elsewhere\n")
            .replace(" back:\n", " elsewhere:\n"),
    );
    let by_port = with_pool("    hash_key: source_ip_port\n");
    let round_robin = with_pool("    balance: round_robin\n");
    let sentinel = temp_file(
        "sentinel.yaml",
        &config(free_addr(unique_loopback()), &[], "").replace(
            "    backends:\n",
            "    discovery: { sentinel: { addresses: [10.0.0.1:26379], master: m } }\n",
        ),
    );
    let [elsewhere, by_port, round_robin, sentinel] =
        [&elsewhere, &by_port, &round_robin, &sentinel].map(|f| f.path.to_str().unwrap());

    let cases = [
        (
            vec![path, "back", "10.1.2.3", "--without", "nope"],
            "pool \"back\" has no backend \"nope\" (backends: backend-0, backend-1, backend-2)"
                .to_owned(),
        ),
        (
            vec![path, "nope", "--remap", path],
            format!("pool \"nope\" is not defined in {path} (defined pools: back)"),
        ),
        (
            vec![path, "back", "--remap", elsewhere],
            format!("pool \"back\" is not defined in {elsewhere} (defined pools: elsewhere)"),
        ),
        (
            vec![path, "back", "--remap", by_port],
            format!(
                "pool \"back\" hashes on source_ip in {path} but on source_ip_port in \
                 {by_port}: clients' keys differ, so the tables cannot be compared"
            ),
        ),
        (
            vec![round_robin, "back", "10.1.2.3"],
            "pool \"back\" is not balanced by maglev or first, and its algorithm does not map \
             clients to backends deterministically"
                .to_owned(),
        ),
        (
            vec![sentinel, "back", "10.1.2.3"],
            "pool \"back\" takes its backend from Redis Sentinel when it runs: the file alone does not say which"
                .to_owned(),
        ),
    ];
    for (args, expected) in cases {
        let out = sluice_command(&[&["explain", "-c"][..], &args].concat());
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!("sluice: {expected}\n")
        );
    }
}

#[test]
fn usage_errors_exit_2() {
    let file = pool_file(3);
    let path = file.path.to_str().unwrap();
    for args in [
        &["explain", "-c", path, "back"][..],
        &["explain", "-c", path, "back", "10.1.2.3", "--without"],
        &[
            "explain",
            "-c",
            path,
            "back",
            "10.1.2.3",
            "--without",
            "a",
            "--remap",
            path,
        ],
    ] {
        let out = sluice_command(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    }
    let help = stdout(sluice_command(&["explain", "--help"]));
    for option in [
        "--without <NAME>",
        "--remap <NEWFILE>",
        "Optional with --remap",
    ] {
        assert!(help.contains(option), "{help}");
    }
}

/// `n` backends named `backend-0`... on made-up addresses: explain never
/// connects.
/// `first` takes the file's order; a backup is named, and used only once
/// every other backend is down; a pool that fails closed says where its
/// clients go when none is left.
#[test]
fn first_and_backups() {
    let file = temp_file(
        "sluice.yaml",
        &config(
            free_addr(unique_loopback()),
            &backends(3),
            "    balance: first\n    fail_open: false\n    queue: { size: 10, timeout: 3s }\n",
        )
        .replace(
            "name: backend-2\n",
            "name: backend-2\n        backup: true\n",
        ),
    );
    let explain = |args: &[&str]| {
        let path = file.path.to_str().unwrap();
        stdout(sluice_command(
            &[&["explain", "-c", path, "back", "10.9.9.9"][..], args].concat(),
        ))
    };
    assert_eq!(
        explain(&[]),
        "pool:    back (first: the first backend up in file order takes every client, 3 backends)\n\
         backups: backend-2 (10.0.0.3:6379) (clients only while no other backend is up)\n\
         client:  10.9.9.9\n\
         backend: backend-0 (10.0.0.1:6379)\n\
         retries: backend-1 (10.0.0.2:6379)\n"
    );
    let without_first = explain(&["--without", "backend-0"]);
    assert!(
        without_first.contains("backend: backend-1 (10.0.0.2:6379)\nretries: none\n"),
        "{without_first}"
    );
    let only_backup = explain(&["--without", "backend-0", "--without", "backend-1"]);
    assert!(
        only_backup.contains("backend: backend-2 (10.0.0.3:6379)\nretries: none\nmoved:   yes"),
        "{only_backup}"
    );
    let none = explain(&[
        "--without",
        "backend-0",
        "--without",
        "backend-1",
        "--without",
        "backend-2",
    ]);
    assert!(
        none.ends_with("backend: none: the pool does not fail open; clients wait in its queue (up to 10, 3s)\n"),
        "{none}"
    );
}

fn backends(n: u8) -> Vec<(String, SocketAddr)> {
    (0..n)
        .map(|i| {
            (
                format!("backend-{i}"),
                SocketAddr::from(([10, 0, 0, i + 1], 6379)),
            )
        })
        .collect()
}

/// A file with pool `back` of `n` backends.
fn pool_file(n: u8) -> TempFile {
    temp_file(
        "sluice.yaml",
        &config(free_addr(unique_loopback()), &backends(n), ""),
    )
}

/// A file with pool `back` of three backends and `settings`.
fn with_pool(settings: &str) -> TempFile {
    temp_file(
        "sluice.yaml",
        &config(free_addr(unique_loopback()), &backends(3), settings),
    )
}

/// `sluice explain -c BEFORE back [ARGS] --remap AFTER`: its output.
fn remap(before: &TempFile, after: &TempFile, args: &[&str]) -> String {
    let (before, after) = (before.path.to_str().unwrap(), after.path.to_str().unwrap());
    let args = [
        &["explain", "-c", before, "back"][..],
        args,
        &["--remap", after],
    ]
    .concat();
    stdout(sluice_command(&args))
}

fn stdout(out: Output) -> String {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The percentage on the `moved:` line.
fn moved_share(text: &str) -> f64 {
    let line = text.lines().find_map(|l| l.strip_prefix("moved:")).unwrap();
    line.trim().split('%').next().unwrap().parse().unwrap()
}
