//! Process lifecycle: SIGTERM drains (new connections refused, open ones
//! finish, exit 0), a second signal exits at once, `shutdown_timeout` bounds
//! the drain; the systemd notify protocol; the unit file and `make install`.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use common::*;

/// sluice in front of one echo backend, with `extra` at the top level.
fn echo_sluice(extra: &str) -> (Sluice, TestServer) {
    let (server, text) = behind_echo("");
    (Sluice::start(&format!("{extra}{text}")), server)
}

#[test]
fn sigterm_refuses_new_connections_and_lets_open_ones_finish() {
    let (sluice, _server) = echo_sluice("");
    let addr = sluice.listen_addr();
    let mut open = connect_from(client_ip(1), addr);
    echoes(&mut open, b"before");

    sluice.signal(Signal::SIGTERM);
    sluice.wait_for_log("stopping: no new connections");
    wait_until("new connections to be refused", || {
        TcpStream::connect(addr).is_err()
    });
    // The open connection still works both ways...
    echoes(&mut open, b"during the drain");
    // ...and when it ends, sluice exits cleanly.
    drop(open);
    sluice.wait_for_log("all connections finished");
    assert_eq!(sluice.wait_exit().code(), Some(0));
}

#[test]
fn sighup_during_a_drain_does_not_end_it() {
    let (sluice, _server) = echo_sluice("");
    let mut open = connect_from(client_ip(5), sluice.listen_addr());
    echoes(&mut open, b"hello");
    sluice.signal(Signal::SIGTERM);
    sluice.wait_for_log("stopping");
    // logrotate or `systemctl reload` must not cut the open connections.
    sluice.signal(Signal::SIGHUP);
    sluice.wait_for_log("SIGHUP while stopping: ignored");
    echoes(&mut open, b"still draining");
    drop(open);
    sluice.wait_for_log("all connections finished");
    assert_eq!(sluice.wait_exit().code(), Some(0));
}

#[test]
fn a_second_signal_exits_at_once() {
    let (sluice, _server) = echo_sluice("");
    let mut open = connect_from(client_ip(2), sluice.listen_addr());
    echoes(&mut open, b"hello");
    sluice.signal(Signal::SIGTERM);
    sluice.wait_for_log("stopping");
    sluice.signal(Signal::SIGINT);
    sluice.wait_for_log("second signal: exiting now");
    assert_eq!(sluice.wait_exit().code(), Some(0));
}

#[test]
fn shutdown_timeout_bounds_the_drain() {
    let (sluice, _server) = echo_sluice("shutdown_timeout: 300ms\nlog:\n  connections: true\n");
    let mut open = connect_from(client_ip(3), sluice.listen_addr());
    echoes(&mut open, b"hello");
    let stopped_at = Instant::now();
    sluice.signal(Signal::SIGTERM);
    let line = sluice.wait_for_log("shutdown_timeout of 300ms reached");
    assert!(line.contains("open=1"), "{line}");
    // The connection cut by the timeout says so in its log line.
    let line = sluice.wait_for_log("connection closed");
    assert!(
        line.contains(r#"close="shutdown""#) && line.contains("to_client=5"),
        "{line}"
    );
    assert_eq!(sluice.wait_exit().code(), Some(0));
    assert!(stopped_at.elapsed() >= Duration::from_millis(300));
    // The client sees a reset.
    let mut buf = [0u8; 1];
    assert_eq!(
        open.read(&mut buf).unwrap_err().kind(),
        std::io::ErrorKind::ConnectionReset
    );
}

/// `shutdown_timeout` reaches a connection that has no backend yet: one
/// still waiting for its PROXY header (an early epoll driver's close-all
/// reached only relaying connections, and the drain waited on).
#[test]
fn shutdown_timeout_ends_a_connection_still_waiting_for_its_proxy_header() {
    let (_server, text) = behind_echo("");
    let text = text.replace(
        "    pool: back\n",
        "    pool: back\n    accept_proxy: { from: [127.0.0.0/8], timeout: 60s }\n",
    );
    let sluice = Sluice::start(&format!(
        "shutdown_timeout: 300ms\nlog:\n  connections: true\n{text}"
    ));
    let open = connect_from(client_ip(4), sluice.listen_addr());
    // Accepted, it waits for its header.
    wait_until("the connection to be accepted", || accepted(&open));
    sluice.signal(Signal::SIGTERM);
    let line = sluice.wait_for_log("shutdown_timeout of 300ms reached");
    assert!(line.contains("open=1"), "{line}");
    let line = sluice.wait_for_log("connection closed");
    assert!(line.contains(r#"close="shutdown""#), "{line}");
    assert_eq!(sluice.wait_exit().code(), Some(0));
    open.set_read_timeout(Some(DEADLINE)).unwrap();
    assert_eq!(
        (&open).read(&mut [0u8; 1]).unwrap_err().kind(),
        std::io::ErrorKind::ConnectionReset
    );
}

/// Reads notify datagrams until one has the line `state`; returns that
/// datagram. Others on the way may only be STATUS updates.
fn until(socket: &UnixDatagram, state: &str) -> String {
    let mut buf = [0u8; 4096];
    loop {
        let n = socket
            .recv(&mut buf)
            .expect("a notify message before the deadline");
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        if message.lines().any(|l| l == state) {
            return message;
        }
        assert!(
            message.starts_with("STATUS="),
            "unexpected {message:?} before {state}"
        );
    }
}

#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(DEADLINE)).unwrap();
    let server = name_server("only");
    let text = config(
        free_addr(unique_loopback()),
        &[("only".into(), server.addr)],
        "",
    );
    let sluice = Sluice::spawn_with_env(&text, &[("NOTIFY_SOCKET", path.to_str().unwrap())]);

    let ready = until(&socket, "READY=1");
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=1 listeners, 1/1 backends up")),
        "{ready:?}"
    );
    // READY comes only once clients are served.
    assert_eq!(backend_for(client_ip(4), sluice.listen_addr()), "only");

    sluice.signal(Signal::SIGHUP);
    let reloading = until(&socket, "RELOADING=1");
    let usec = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
    assert!(usec.parse::<u64>().unwrap() > 0);
    let after = until(&socket, "READY=1");
    assert!(after.contains("reloads 1 ok 0 failed"), "{after:?}");

    sluice.signal(Signal::SIGTERM);
    until(&socket, "STOPPING=1");
    assert_eq!(sluice.wait_exit().code(), Some(0));
}

/// The shipped unit, its ExecStart pointed at the binary under test: its
/// text, and a copy on disk for systemd-analyze.
fn unit_file() -> (String, TempFile) {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/sluice.service"
    ))
    .unwrap()
    .replace("/usr/bin/sluice", SLUICE);
    let file = temp_file("sluice.service", &unit);
    (unit, file)
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    // verify checks that ExecStart's binary exists: unit_file points it
    // at ours.
    let (unit, file) = unit_file();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&file.path)
        .output()
        .expect("systemd-analyze: `make test` installs the systemd package");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "verify: {stderr}"
    );
    for needle in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "SystemCallFilter=@system-service io_uring_setup io_uring_enter io_uring_register",
    ] {
        assert!(unit.contains(needle), "the unit lacks {needle}");
    }
}

/// The unit's sandbox lets sluice do what it does (raise its descriptor
/// limit, pin its workers) and keeps the exposure `systemd-analyze
/// security` measures at 1.5 or below: 1.6 before PrivateMounts and UMask.
#[test]
fn the_unit_file_keeps_its_security_score_and_allows_what_sluice_calls() {
    let (unit, file) = unit_file();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&file.path)
        .output()
        .expect("systemd-analyze: `make test` installs the systemd package");
    let report = String::from_utf8_lossy(&out.stdout);
    let score: f64 = report
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for sluice.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure in:\n{report}"));
    assert!(score <= 1.5, "exposure {score}:\n{report}");
    // The system call filter takes setrlimit, prlimit64 and
    // sched_setaffinity back from @resources.
    assert!(report.contains("sched_setaffinity is allowed"), "{report}");
    let filters: Vec<&str> = unit
        .lines()
        .filter(|l| l.starts_with("SystemCallFilter="))
        .collect();
    let allowed_after_deny = filters
        .iter()
        .skip_while(|l| !(l.starts_with("SystemCallFilter=~") && l.contains("@resources")))
        .any(|l| l.contains("setrlimit") && l.contains("prlimit64"));
    assert!(allowed_after_deny, "{filters:?}");
}

#[test]
fn make_install_lays_out_the_files() {
    let root = tempfile::tempdir().unwrap();
    let out = Command::new("make")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("install")
        .arg(format!("DESTDIR={}", root.path().display()))
        .arg("PREFIX=/usr/local")
        .arg(format!("BIN={SLUICE}"))
        .output()
        .expect("make");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let binary = root.path().join("usr/local/bin/sluice");
    let version = Command::new(&binary).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("sluice "));
    let unit =
        std::fs::read_to_string(root.path().join("lib/systemd/system/sluice.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/bin/sluice -c /etc/sluice/sluice.yaml"),
        "{unit}"
    );
    for file in ["grafana-dashboard.json", "prometheus-alerts.yml"] {
        assert!(root
            .path()
            .join("usr/local/share/sluice")
            .join(file)
            .exists());
    }
    let conf = root.path().join("etc/sluice/sluice.yaml");
    let check = Command::new(&binary)
        .arg("--check")
        .arg("-c")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // A second install keeps the operator's configuration.
    std::fs::write(&conf, "# edited by the operator\n").unwrap();
    let again = Command::new("make")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["install", "PREFIX=/usr/local"])
        .arg(format!("DESTDIR={}", root.path().display()))
        .arg(format!("BIN={SLUICE}"))
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap(),
        "# edited by the operator\n"
    );
}
