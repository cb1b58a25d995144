//! Operating sluice live: the JSON API (`/api/pools`, state changes with a
//! bearer token), drain and maintenance without a reload, operator states
//! across reloads and restarts in the state file, `sluice ctl`, and the
//! status page loaded in a real browser (headless Chromium).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const TOKEN: &str = "t0ken-for-tests";

/// sluice in front of `n` name servers (`backend-0`...) with the admin
/// endpoint, a token file and a state file in a directory of its own.
struct Setup {
    servers: Vec<TestServer>,
    backends: Vec<(String, SocketAddr)>,
    dir: tempfile::TempDir,
    admin: SocketAddr,
    front: SocketAddr,
}

impl Setup {
    fn new(n: usize) -> Setup {
        let (servers, backends) = name_servers(n);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
        Setup {
            servers,
            backends,
            dir,
            admin: free_addr(unique_loopback()),
            front: free_addr(unique_loopback()),
        }
    }

    fn state_file(&self) -> PathBuf {
        self.dir.path().join("state.json")
    }

    /// The configuration, with `extra_pool` in the pool (see
    /// [`common::config`]) and `top` at the top level.
    fn config(&self, top: &str, extra_pool: &str) -> String {
        self.config_without(&[], top, extra_pool)
    }

    /// [`Setup::config`] without the backends named `left_out`.
    fn config_without(&self, left_out: &[&str], top: &str, extra_pool: &str) -> String {
        let backends: Vec<(String, SocketAddr)> = self
            .backends
            .iter()
            .filter(|(name, _)| !left_out.contains(&name.as_str()))
            .cloned()
            .collect();
        format!(
            "{top}state_file: {}\nadmin:\n  listen: {}\n  token_file: {}\n{}",
            self.state_file().display(),
            self.admin,
            self.dir.path().join("token").display(),
            config(self.front, &backends, extra_pool)
        )
    }
}

/// `GET /api/pools`, parsed.
fn pools(admin: SocketAddr) -> Value {
    let (status, body) = get(admin, "/api/pools");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Backend `name` of pool `back` as `/api/pools` shows it.
fn backend(admin: SocketAddr, name: &str) -> Value {
    let view = pools(admin);
    view["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "back")
        .and_then(|p| {
            p["backends"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["name"] == name)
        })
        .unwrap_or_else(|| panic!("no backend {name} in {view}"))
        .clone()
}

/// POSTs a state change: (status line, body).
fn set_state(
    admin: SocketAddr,
    backend: &str,
    body: &str,
    token: Option<&str>,
) -> (String, String) {
    let authorization = token.map(|t| format!("Authorization: Bearer {t}"));
    let headers: Vec<&str> = authorization.iter().map(String::as_str).collect();
    let path = format!("/api/pools/back/backends/{backend}/state");
    let (status, _, body) = try_request(admin, "POST", &path, &headers, body)
        .unwrap_or_else(|| panic!("POST {path}: no answer"));
    (status, body)
}

fn change(admin: SocketAddr, backend: &str, state: &str) {
    let (status, body) = set_state(
        admin,
        backend,
        &format!(r#"{{"state": "{state}"}}"#),
        Some(TOKEN),
    );
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
}

/// `sluice ctl -c CONFIG ARGS...`.
fn ctl(config: &Path, args: &[&str]) -> Output {
    let mut all = vec!["ctl", "-c", config.to_str().unwrap()];
    all.extend(args);
    sluice_command(&all)
}

/// `sluice ctl -c CONFIG drain back BACKEND --wait 20s`, started.
fn drain_and_wait(config: &Path, backend: &str) -> Child {
    Command::new(SLUICE)
        .args(["ctl", "-c", config.to_str().unwrap()])
        .args(["drain", "back", backend, "--wait", "20s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Asserts that a `sluice ctl` run exited with `code`, saying `text`.
fn assert_ended(output: &Output, code: i32, text: &str) {
    assert_eq!(output.status.code(), Some(code), "{}", said(output));
    assert!(said(output).contains(text), "{}", said(output));
}

fn said(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Asserts that each new client of `clients` (see [`client_ip`]) is sent
/// to `name`.
fn every_client_goes_to(front: SocketAddr, clients: std::ops::Range<u32>, name: &str) {
    for i in clients {
        assert_eq!(
            backend_for(client_ip(i), front),
            name,
            "client {}",
            client_ip(i)
        );
    }
}

/// A client that maglev sends to `name`, and an open connection from it
/// whose name line has been read.
fn client_of(front: SocketAddr, name: &str) -> (std::net::IpAddr, TcpStream) {
    for i in 1..200 {
        let client = client_ip(i);
        if backend_for(client, front) == name {
            let stream = connect_from(client, front);
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            assert_eq!(line.trim_end(), name);
            return (client, stream);
        }
    }
    panic!("no client maps to {name}");
}

#[test]
fn the_api_shows_every_backend_with_its_state_health_and_connections() {
    let mut setup = Setup::new(2);
    // A third backend that refuses connections.
    let dead = free_addr(unique_loopback());
    setup.backends.push(("dead".into(), dead));
    let health = "    health: { interval: 100ms, timeout: 50ms, fall: 1, rise: 1 }\n";
    let sluice = Sluice::start(&setup.config("", health));
    wait_until("the dead backend down", || {
        backend(setup.admin, "dead")["health"] == "down"
    });
    let view = pools(setup.admin);
    let pool = &view["pools"][0];
    assert_eq!(pool["name"], "back");
    assert_eq!(pool["balance"], "maglev");
    assert_eq!(pool["queued"], 0);
    let a = &pool["backends"][0];
    assert_eq!(a["name"], "backend-0");
    assert_eq!(a["address"], setup.backends[0].1.to_string());
    assert_eq!(a["weight"], 1);
    assert_eq!(a["backup"], false);
    assert_eq!(a["state"], "ready");
    assert_eq!(a["health"], "up");
    assert_eq!(a["reason"], Value::Null);
    assert_eq!(a["role"], Value::Null);
    let dead = backend(setup.admin, "dead");
    assert!(
        dead["reason"].as_str().unwrap().contains("connect failed"),
        "{dead}"
    );

    // Open and total follow the connections.
    let (_, open) = client_of(setup.front, "backend-1");
    // The connection that found the client's backend may still be closing.
    wait_until("one connection open", || {
        backend(setup.admin, "backend-1")["active"] == 1
    });
    let b = backend(setup.admin, "backend-1");
    assert!(b["total"].as_u64().unwrap() >= 2, "{b}");
    drop(open);
    wait_until("no connection open", || {
        backend(setup.admin, "backend-1")["active"] == 0
    });
    drop(sluice);
}

#[test]
fn a_drained_backend_takes_no_new_client_and_keeps_relaying_for_open_ones() {
    let setup = Setup::new(2);
    let sluice = Sluice::start(&setup.config("", ""));
    let (client, mut open) = client_of(setup.front, "backend-0");
    change(setup.admin, "backend-0", "drain");

    // The open connection goes on; its client's new ones go elsewhere.
    echoes(&mut open, b"still relayed");
    assert_eq!(backend_for(client, setup.front), "backend-1");
    every_client_goes_to(setup.front, 200..230, "backend-1");
    let a = backend(setup.admin, "backend-0");
    assert_eq!(
        (a["state"].as_str(), a["active"].as_u64()),
        (Some("drain"), Some(1))
    );
    let scraped = scrape(setup.admin);
    let state = |s: &str| {
        sample(
            &scraped,
            "sluice_backend_state",
            &[r#"backend="backend-0""#, &format!(r#"state="{s}""#)],
        )
    };
    assert_eq!(
        (state("drain"), state("ready"), state("maint")),
        (Some(1.0), Some(0.0), Some(0.0))
    );

    // `ctl drain --wait` at its limit: 1, with the count left.
    let config = sluice.config_path();
    let late = ctl(config, &["drain", "back", "backend-0", "--wait", "300ms"]);
    assert_ended(&late, 1, "1 connections still open after 300ms");

    // `ctl drain --wait` returns 0 once the last connection closes.
    let waiting = drain_and_wait(config, "backend-0");
    echoes(&mut open, b"one more");
    drop(open);
    let done = waiting.wait_with_output().unwrap();
    assert_ended(&done, 0, "back/backend-0: no connection left");

    // Ready again: its clients come back (maglev keeps them).
    let ready = ctl(config, &["ready", "back", "backend-0"]);
    assert!(ready.status.success(), "{}", said(&ready));
    assert_eq!(backend_for(client, setup.front), "backend-0");

    // A reload that removes the backend ends a wait with 1: its
    // connections, still open, are no longer counted.
    let (_, mut open) = client_of(setup.front, "backend-0");
    let waiting = drain_and_wait(config, "backend-0");
    wait_until("backend-0 drained", || {
        backend(setup.admin, "backend-0")["state"] == "drain"
    });
    sluice.reload(&setup.config_without(&["backend-0"], "", ""));
    let left = waiting.wait_with_output().unwrap();
    assert_ended(
        &left,
        1,
        "back/backend-0 left the configuration while it drained",
    );
    echoes(&mut open, b"kept by on_down: keep");
    drop(sluice);
}

/// Draining the backends that are up leaves nothing to route to, but the
/// pool is not down: `/ready` stays 200 and the log says whose doing it
/// is. Once the drained backend is down too, the pool is.
#[test]
fn draining_the_backends_up_does_not_make_the_pool_down() {
    let mut setup = Setup::new(2);
    let pool = "    health: { interval: 100ms, timeout: 100ms, fall: 1, rise: 1 }\n";
    let sluice = Sluice::start(&setup.config("", pool));
    let health = |name: &str| backend(setup.admin, name)["health"].clone();
    setup.servers[1].stop();
    wait_until("backend-1 down", || health("backend-1") == "down");
    change(setup.admin, "backend-0", "drain");
    sluice.wait_for_log("no backend in rotation is up (those up are drained)");
    assert_eq!(get(setup.admin, "/ready").0, "HTTP/1.1 200 OK");

    setup.servers[0].stop();
    wait_until("backend-0 down", || health("backend-0") == "down");
    wait_until("not ready", || {
        get(setup.admin, "/ready").0 == "HTTP/1.1 503 Service Unavailable"
    });
    let (_, body) = get(setup.admin, "/ready");
    assert!(body.contains("no backend up in pool back"), "{body}");
    sluice.wait_for_log("every backend is down");
    drop(sluice);

    // A backend in maint is not probed: its health is unknown, and the
    // pool with nothing else up is down.
    let mut setup = Setup::new(2);
    let sluice = Sluice::start(&setup.config("", pool));
    setup.servers[1].stop();
    wait_until("backend-1 down", || {
        backend(setup.admin, "backend-1")["health"] == "down"
    });
    change(setup.admin, "backend-0", "maint");
    wait_until("not ready", || {
        get(setup.admin, "/ready").0 == "HTTP/1.1 503 Service Unavailable"
    });
    // Out of rotation entirely, the pool is the operator's doing.
    change(setup.admin, "backend-1", "drain");
    sluice.wait_for_log("no backend is in rotation (each is drained, in maint or at weight 0)");
    assert_eq!(get(setup.admin, "/ready").0, "HTTP/1.1 200 OK");
    drop(sluice);
}

/// Each address of a host-name entry is a backend of its own, `NAME/IP`,
/// addressed percent-encoded; the entry's bare name is not one, and the
/// 404 says which are.
#[test]
fn the_addresses_of_a_host_name_are_drained_one_by_one() {
    let setup = Setup::new(1);
    let text = setup.config("", "").replace(
        &setup.backends[0].1.to_string(),
        &format!("localhost:{}", setup.backends[0].1.port()),
    );
    let sluice = Sluice::start(&text);
    let (status, body) = set_state(
        setup.admin,
        "backend-0",
        r#"{"state": "drain"}"#,
        Some(TOKEN),
    );
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    assert!(
        body.contains("each address of a host name is a backend of its own: backend-0/127.0.0.1"),
        "{body}"
    );
    change(setup.admin, "backend-0%2F127.0.0.1", "drain");
    assert_eq!(
        backend(setup.admin, "backend-0/127.0.0.1")["state"],
        "drain"
    );
    drop(sluice);
}

/// An address of a host-name entry keeps its state while a DNS answer
/// leaves it out for a while (Consul drops an instance that is down for
/// its maintenance), and has it again when the address comes back.
#[test]
fn an_address_left_out_by_dns_keeps_its_state() {
    let setup = Setup::new(1);
    let (first, port) = (setup.backends[0].1.ip(), setup.backends[0].1.port());
    let second = unique_loopback();
    let host = format!("sluice-state-{}.invalid", std::process::id());
    let hosts = HostsEntry::set(&host, &[first, second]);
    let text = setup
        .config("", "    resolve_interval: 100ms\n")
        .replace(&setup.backends[0].1.to_string(), &format!("{host}:{port}"));
    let sluice = Sluice::start(&text);
    let name = format!("backend-0/{second}");
    change(setup.admin, &format!("backend-0%2F{second}"), "maint");
    let state_of = |name: &str| {
        pools(setup.admin)["pools"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .map(|b| b["state"].clone())
    };

    hosts.write(&[first]);
    wait_until("the address gone", || state_of(&name).is_none());
    assert_eq!(sluice.log_count("is forgotten"), 0);
    let file = std::fs::read_to_string(setup.state_file()).unwrap();
    assert!(file.contains(&name), "{file}");

    hosts.write(&[first, second]);
    wait_until("the address back", || state_of(&name).is_some());
    assert_eq!(state_of(&name), Some(Value::from("maint")));
    drop(sluice);
}

/// With every backend drained, a client is turned away as `no_backend`,
/// and the log says why; `/ready` stays 200.
#[test]
fn a_pool_drained_whole_turns_clients_away_as_no_backend() {
    let setup = Setup::new(1);
    let sluice = Sluice::start(&setup.config("", ""));
    change(setup.admin, "backend-0", "drain");
    let mut client = connect_from(client_ip(5), setup.front);
    client.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut byte = [0u8; 1];
    assert!(!matches!(client.read(&mut byte), Ok(1)), "turned away");
    sluice.wait_for_log(
        "no backend reachable, closing the client: every backend is drained or in maint",
    );
    let turned_away = |reason: &str| {
        sample(
            &scrape(setup.admin),
            "sluice_connection_errors_total",
            &[&format!(r#"reason="{reason}""#)],
        )
    };
    assert_eq!(turned_away("no_backend"), Some(1.0));
    assert_eq!(turned_away("over_limit"), Some(0.0));
    assert_eq!(get(setup.admin, "/ready").0, "HTTP/1.1 200 OK");
    drop(sluice);
}

#[test]
fn maint_stops_probes_and_closes_connections_with_on_down_close() {
    let setup = Setup::new(2);
    let pool =
        "    on_down: close\n    health: { interval: 100ms, timeout: 50ms, fall: 1, rise: 1 }\n";
    let sluice = Sluice::start(&setup.config("", pool));
    let (_, mut open) = client_of(setup.front, "backend-0");
    let probes = || {
        sample(
            &scrape(setup.admin),
            "sluice_health_checks_total",
            &[r#"backend="backend-0""#, r#"result="ok""#],
        )
        .unwrap()
    };
    let out = ctl(sluice.config_path(), &["maint", "back", "backend-0"]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(
        said(&out).contains("back/backend-0: maint (was ready)"),
        "{}",
        said(&out)
    );

    // Its connection is reset, the client sees the end.
    open.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut rest = Vec::new();
    let ended = Instant::now();
    let _ = open.read_to_end(&mut rest);
    assert!(ended.elapsed() < DEADLINE, "the connection stayed open");
    sluice.wait_for_log("on_down: close: resetting the connections");

    // No probe runs while in maintenance.
    let a = backend(setup.admin, "backend-0");
    assert_eq!(
        (a["state"].as_str(), a["health"].as_str()),
        (Some("maint"), Some("unknown"))
    );
    let before = probes();
    std::thread::sleep(Duration::from_millis(500)); // five probe intervals
    assert_eq!(probes(), before, "probes ran during maintenance");
    every_client_goes_to(setup.front, 1..20, "backend-1");

    // Ready: probed again, and up.
    change(setup.admin, "backend-0", "ready");
    wait_until("backend-0 probed up again", || {
        backend(setup.admin, "backend-0")["health"] == "up" && probes() > before
    });
    drop(sluice);
}

#[test]
fn operator_states_survive_a_reload_and_a_restart() {
    let setup = Setup::new(3);
    let text = setup.config("", "");
    let sluice = Sluice::start(&text);
    change(setup.admin, "backend-0", "drain");
    change(setup.admin, "backend-1", "maint");
    sluice.reload(&text);
    let states = || {
        ["backend-0", "backend-1", "backend-2"].map(|b| {
            backend(setup.admin, b)["state"]
                .as_str()
                .unwrap()
                .to_owned()
        })
    };
    assert_eq!(states(), ["drain", "maint", "ready"]);
    // Stopped at once: sluice waits for the state file's last write.
    sluice.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(sluice.wait_exit().success());

    // A new process reads the states before its first client.
    let sluice = Sluice::start(&text);
    assert_eq!(states(), ["drain", "maint", "ready"]);
    every_client_goes_to(setup.front, 1..30, "backend-2");
    sluice.wait_for_log("backends in drain or maint");

    // A reload that removes a backend forgets its state, in the file too:
    // a server added back later under its name starts ready.
    sluice.reload(&setup.config_without(&["backend-1"], "", ""));
    sluice.wait_for_log("its operator state maint is forgotten pool=back backend=backend-1");
    wait_until("the state file without backend-1", || {
        std::fs::read_to_string(setup.state_file()).is_ok_and(|t| !t.contains("backend-1"))
    });
    sluice.reload(&text);
    assert_eq!(states(), ["drain", "ready", "ready"]);
    drop(sluice);
}

#[test]
fn a_state_file_that_is_corrupt_or_from_another_configuration_is_ignored() {
    let setup = Setup::new(2);
    let text = setup.config("", "");
    std::fs::write(setup.state_file(), "{\"version\": 1, \"backends\": [").unwrap();
    let sluice = Sluice::start(&text);
    sluice.wait_for_log("is not valid");
    assert_eq!(backend(setup.admin, "backend-0")["state"], "ready");
    drop(sluice);

    // From an older configuration: a backend that is gone is ignored, one
    // that remains keeps its state.
    std::fs::write(
        setup.state_file(),
        r#"{"version": 1, "backends": [
            {"pool": "back", "backend": "retired", "state": "maint"},
            {"pool": "gone", "backend": "x", "state": "drain"},
            {"pool": "back", "backend": "backend-1", "state": "drain"}]}"#,
    )
    .unwrap();
    let sluice = Sluice::start(&text);
    sluice.wait_for_log(
        "the configuration has no such backend: its operator state maint is forgotten pool=back backend=retired",
    );
    sluice.wait_for_log("its operator state drain is forgotten pool=gone backend=x");
    assert_eq!(backend(setup.admin, "backend-1")["state"], "drain");
    // The file is rewritten with only what the configuration has.
    wait_until("the state file rewritten", || {
        std::fs::read_to_string(setup.state_file())
            .is_ok_and(|t| !t.contains("retired") && !t.contains("gone") && t.contains("backend-1"))
    });
    drop(sluice);
}

#[test]
fn a_state_file_that_cannot_be_written_is_logged_and_states_still_apply() {
    let setup = Setup::new(2);
    // sysfs takes no new file, not even from root.
    let text = setup.config("", "").replace(
        &setup.state_file().display().to_string(),
        "/sys/sluice-state.json",
    );
    let sluice = Sluice::start(&text);
    change(setup.admin, "backend-0", "drain");
    sluice.wait_for_log("cannot write the state file /sys/sluice-state.json");
    assert_eq!(backend(setup.admin, "backend-0")["state"], "drain");
    every_client_goes_to(setup.front, 1..20, "backend-1");
    drop(sluice);
}

#[test]
fn state_changes_need_the_token_and_name_what_exists() {
    let setup = Setup::new(1);
    let text = setup.config("", "");
    let sluice = Sluice::start(&text);
    let drain = r#"{"state": "drain"}"#;
    let status = |backend: &str, body: &str, token: Option<&str>| {
        set_state(setup.admin, backend, body, token).0
    };
    assert_eq!(
        status("backend-0", drain, None),
        "HTTP/1.1 401 Unauthorized"
    );
    // The token is judged first: without it, the body's fate is not told.
    let (line, head, _) = try_request(
        setup.admin,
        "POST",
        "/api/pools/back/backends/backend-0/state",
        &[],
        "not json",
    )
    .unwrap();
    assert_eq!(line, "HTTP/1.1 401 Unauthorized");
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{head}"
    );
    assert_eq!(
        status("backend-0", drain, Some("wrong")),
        "HTTP/1.1 401 Unauthorized"
    );
    assert_eq!(
        status("nobody", drain, Some(TOKEN)),
        "HTTP/1.1 404 Not Found"
    );
    let (_, _, body) = try_request(
        setup.admin,
        "POST",
        "/api/pools/nopool/backends/backend-0/state",
        &[&format!("Authorization: Bearer {TOKEN}")],
        drain,
    )
    .unwrap();
    assert!(body.contains("no pool \\\"nopool\\\""), "{body}");
    for bad in [
        "",
        "drain",
        r#"{"state": "off"}"#,
        r#"{"state": "drain", "why": 1}"#,
    ] {
        assert_eq!(
            status("backend-0", bad, Some(TOKEN)),
            "HTTP/1.1 400 Bad Request",
            "{bad}"
        );
    }
    let huge = format!(r#"{{"state": "drain", "x": "{}"}}"#, "x".repeat(10_000));
    assert_eq!(
        status("backend-0", &huge, Some(TOKEN)),
        "HTTP/1.1 413 Payload Too Large"
    );
    let (line, head, _) = try_request(
        setup.admin,
        "GET",
        "/api/pools/back/backends/backend-0/state",
        &[],
        "",
    )
    .unwrap();
    assert_eq!(line, "HTTP/1.1 405 Method Not Allowed");
    assert!(head.to_ascii_lowercase().contains("allow: post"), "{head}");
    assert_eq!(
        backend(setup.admin, "backend-0")["state"],
        "ready",
        "nothing changed"
    );

    // A new token takes effect with a reload.
    std::fs::write(setup.dir.path().join("token"), "another\n").unwrap();
    sluice.reload(&text);
    assert_eq!(
        status("backend-0", drain, Some(TOKEN)),
        "HTTP/1.1 401 Unauthorized"
    );
    assert_eq!(
        status("backend-0", drain, Some("another")),
        "HTTP/1.1 200 OK"
    );
    std::fs::write(setup.dir.path().join("wrong"), "wrong\n").unwrap();
    let wrong_token = temp_file("ctl.yaml", &text.replace("/token", "/wrong"));
    let wrong = ctl(&wrong_token.path, &["ready", "back", "backend-0"]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(said(&wrong).contains("401"), "{}", said(&wrong));

    // Without a token file, state changes are off.
    let without: String = text
        .lines()
        .filter(|l| !l.contains("token_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    sluice.reload(&without);
    let (status_line, body) = set_state(setup.admin, "backend-0", drain, Some("another"));
    assert_eq!(status_line, "HTTP/1.1 403 Forbidden");
    assert!(body.contains("admin.token_file"), "{body}");
    drop(sluice);
}

#[test]
fn ctl_says_what_is_wrong() {
    let setup = Setup::new(1);
    let text = setup.config("", "");
    let file = temp_file("sluice.yaml", &text);

    // Not running.
    let out = ctl(&file.path, &["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        said(&out).contains("cannot reach sluice at"),
        "{}",
        said(&out)
    );

    // No admin endpoint.
    let no_admin = temp_file("sluice.yaml", &config(setup.front, &setup.backends, ""));
    let out = ctl(&no_admin.path, &["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        said(&out).contains("sets no admin.listen"),
        "{}",
        said(&out)
    );

    // Running: status, then an unknown backend.
    let sluice = Sluice::start(&text);
    let out = ctl(&file.path, &["status"]);
    assert!(out.status.success(), "{}", said(&out));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(table.starts_with("POOL"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("back") && l.contains("backend-0") && l.contains("ready")),
        "{table}"
    );
    let out = ctl(&file.path, &["drain", "back", "nobody"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        said(&out).contains(r#"pool "back" has no backend "nobody""#),
        "{}",
        said(&out)
    );
    let usage = ctl(&file.path, &["drain", "back"]);
    assert_eq!(usage.status.code(), Some(2));
    drop(sluice);
}

/// The page as headless Chromium shows it once its script ran: the DOM.
fn page_in_browser(admin: SocketAddr) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=3000",
            "--dump-dom",
            &format!("http://{admin}/"),
        ])
        .stderr(Stdio::null())
        .output()
        .expect("chromium is installed (make deps)");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// The row of backend `name` in the page's DOM.
fn row<'a>(dom: &'a str, name: &str) -> Option<&'a str> {
    let start = dom.find(&format!(r#"data-backend="{name}""#))?;
    let end = dom[start..].find("</tr>")? + start;
    Some(&dom[dom[..start].rfind("<tr")?..end])
}

#[test]
fn the_status_page_shows_the_backends_in_a_real_browser() {
    let mut setup = Setup::new(2);
    let health = "    health: { interval: 100ms, timeout: 50ms, fall: 1, rise: 1 }\n";
    let sluice = Sluice::start(&setup.config("", health));
    let (status, head, _) = try_request(setup.admin, "GET", "/", &[], "").unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        head.contains("content-security-policy: default-src 'none'; script-src 'sha256-"),
        "{head}"
    );

    let dom = page_in_browser(setup.admin);
    for name in ["backend-0", "backend-1"] {
        let row = row(&dom, name).unwrap_or_else(|| panic!("no row for {name}:\n{dom}"));
        assert!(row.contains(r#"class="health-up""#), "{row}");
        assert!(row.contains(&setup.backends[0].1.ip().to_string()) || name == "backend-1");
    }
    assert!(
        dom.contains(r#"<p id="problem" hidden=""></p>"#),
        "the page says it cannot read the API:\n{dom}"
    );

    // A backend that goes down turns red within a few seconds.
    setup.servers[1].stop();
    let went_down = Instant::now();
    let deadline = went_down + Duration::from_secs(10);
    loop {
        let dom = page_in_browser(setup.admin);
        if row(&dom, "backend-1").is_some_and(|r| r.contains(r#"class="health-down""#)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backend-1 not shown down:\n{dom}"
        );
    }
    assert!(went_down.elapsed() < Duration::from_secs(10));

    // A drained one is marked as such.
    change(setup.admin, "backend-0", "drain");
    let dom = page_in_browser(setup.admin);
    let drained = row(&dom, "backend-0").unwrap();
    assert!(
        drained.contains(r#"<td class="state-drain">drain</td>"#),
        "{drained}"
    );
    drop(sluice);
}
