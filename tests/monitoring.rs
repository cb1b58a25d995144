//! sluice watched the way operators watch it: Debian's Prometheus scrapes a
//! sluice under traffic, with `conf/prometheus-alerts.yml` loaded. Every
//! metric family of the SPEC arrives with its labels, the exposition passes
//! `promtool check metrics`, every query of `conf/grafana-dashboard.json`
//! runs and returns data, and every alert rule evaluates (a dead backend
//! makes `SluiceBackendDown` pending). The alert rules also pass `promtool
//! check rules` and their unit tests.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use serde_json::Value;

use common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Every family of the SPEC, the labels each series has (besides the
/// `job` and `instance` Prometheus adds), and the series name to query.
const FAMILIES: [(&str, &[&str]); 14] = [
    ("sluice_connections_total", &["listener", "backend"]),
    ("sluice_connections_active", &["listener", "backend"]),
    ("sluice_connection_errors_total", &["listener", "reason"]),
    ("sluice_bytes_total", &["listener", "backend", "direction"]),
    (
        "sluice_backend_connect_seconds_bucket",
        &["pool", "backend", "le"],
    ),
    ("sluice_backend_up", &["pool", "backend"]),
    ("sluice_health_checks_total", &["pool", "backend", "result"]),
    ("sluice_config_reloads_total", &["result"]),
    ("sluice_build_info", &["version", "io"]),
    ("sluice_connections_capacity", &[]),
    ("sluice_listener_max_connections", &["listener"]),
    (
        "sluice_connections_closed_on_down_total",
        &["pool", "backend"],
    ),
    ("sluice_queue_length", &["pool"]),
    ("sluice_backend_state", &["pool", "backend", "state"]),
];

/// The alert rules in conf/prometheus-alerts.yml.
const ALERT_RULES: usize = 13;

/// A Prometheus server (Debian's `prometheus`) scraping one target every
/// second as job `sluice`; stopped when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files: [{ROOT}/conf/prometheus-alerts.yml]\n\
                 scrape_configs:\n  - job_name: sluice\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr = free_addr("127.0.0.1".parse().unwrap());
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus: `make test` installs Debian's prometheus package");
        let prometheus = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        wait_until("Prometheus to answer", || {
            TcpStream::connect(addr).is_ok()
                && prometheus
                    .get("/-/ready")
                    .is_some_and(|r| r.contains("Ready"))
        });
        prometheus
    }

    /// The body of `path`, or `None` if the server did not answer 200.
    fn get(&self, path: &str) -> Option<String> {
        let (status, body) = try_get(self.addr, path)?;
        status.contains(" 200 ").then_some(body)
    }

    /// The `data` of an API call that must succeed.
    fn api(&self, path: &str) -> Value {
        let body = self
            .get(path)
            .unwrap_or_else(|| panic!("Prometheus refused {path}"));
        let reply: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(reply["status"], "success", "{path}: {body}");
        reply["data"].clone()
    }

    /// The series an instant query returns.
    fn query(&self, query: &str) -> Vec<Value> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(query)));
        data["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes `text` for a URL's query string.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs `promtool` with `args`; its output, after asserting it succeeded.
fn promtool(args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(ROOT)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool: `make test` installs Debian's prometheus package");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let checked = promtool(&["check", "rules", "conf/prometheus-alerts.yml"], None);
    assert!(
        checked.contains(&format!("SUCCESS: {ALERT_RULES} rules found")),
        "{checked}"
    );
    let tested = promtool(&["test", "rules", "tests/prometheus-alerts.test.yml"], None);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// Every query of the dashboard, with Grafana's variables filled in.
fn dashboard_queries() -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(Path::new(ROOT).join("conf/grafana-dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let mut queries = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"].as_array().unwrap().iter().collect();
    while let Some(panel) = panels.pop() {
        if let Some(inner) = panel["panels"].as_array() {
            panels.extend(inner);
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let filled = expr
                    .replace("$instance", ".*")
                    .replace("$__rate_interval", "30s")
                    .replace("$__range", "5m");
                let title = panel["title"].as_str().unwrap_or("?").to_owned();
                queries.push((title, filled));
            }
        }
    }
    queries
}

#[test]
fn a_real_prometheus_scrapes_every_family_and_runs_the_dashboard_and_the_alerts() {
    let (_servers, mut backends) = name_servers(2);
    // Nothing listens there: its probes fail and it is taken out.
    backends.push(("dead".to_owned(), free_addr(unique_loopback())));
    let (admin, text) = with_admin(
        &config(
            free_addr(unique_loopback()),
            &backends,
            "    health: { interval: 200ms, timeout: 100ms, fall: 1, rise: 1 }\n",
        )
        .replace(
            "    pool: back\n",
            "    pool: back\n    max_connections: 50\n",
        ),
    );
    let sluice = Sluice::start(&text);
    let front = sluice.listen_addr();

    // Before any event, the counters whose labels are known are there at 0.
    let first = scrape(admin);
    for (family, labels) in [
        ("sluice_config_reloads_total", [r#"result="ok""#]),
        ("sluice_config_reloads_total", [r#"result="fail""#]),
        ("sluice_connection_errors_total", [r#"reason="no_backend""#]),
        ("sluice_connection_errors_total", [r#"reason="over_limit""#]),
    ] {
        assert_eq!(
            sample(&first, family, &labels),
            Some(0.0),
            "{family} {labels:?}"
        );
    }
    promtool(&["check", "metrics"], Some(&first));

    // Traffic for as long as the test runs: a connection every 20 ms from
    // many client addresses, and one that stays open.
    let running = Arc::new(AtomicBool::new(true));
    let traffic = {
        let running = running.clone();
        thread::spawn(move || {
            let mut i = 0;
            while running.load(Ordering::Relaxed) {
                let mut client = connect_from(client_ip(i % 200), front);
                let mut name = [0u8; 10];
                client.read_exact(&mut name).unwrap();
                i += 1;
                thread::sleep(std::time::Duration::from_millis(20));
            }
        })
    };
    let mut open = connect_from(client_ip(1000), front);
    let mut name = [0u8; 10];
    open.read_exact(&mut name).unwrap();
    sluice.wait_for_log("backend is down");

    let prometheus = Prometheus::start(admin);
    wait_until(
        "Prometheus to have scraped sluice twice under traffic",
        || {
            !prometheus
                .query(r#"sum(rate(sluice_connections_total{job="sluice"}[30s])) > 0"#)
                .is_empty()
        },
    );
    assert_eq!(
        prometheus.query(r#"up{job="sluice"} == 1"#).len(),
        1,
        "sluice is up"
    );
    promtool(&["check", "metrics"], Some(&scrape(admin)));

    for (family, labels) in FAMILIES {
        let series = prometheus.query(family);
        assert!(!series.is_empty(), "Prometheus has no {family}");
        for one in &series {
            for label in labels.iter().chain(&["job", "instance"]) {
                assert!(
                    one["metric"].get(*label).is_some(),
                    "{family} lacks {label}: {one}"
                );
            }
        }
    }
    assert!(!prometheus
        .query(r#"sluice_backend_up{backend="dead"} == 0"#)
        .is_empty());
    assert!(!prometheus
        .query(r#"sluice_listener_max_connections{listener="front"} == 50"#)
        .is_empty());

    // Every query of the dashboard runs, and returns data.
    let queries = dashboard_queries();
    assert!(queries.len() >= 10, "{queries:?}");
    for (title, query) in &queries {
        let series = prometheus.query(query);
        assert!(!series.is_empty(), "panel {title:?}: no data for {query}");
    }

    // Every alert rule evaluates without error, and the dead backend's
    // alert is on its way (pending for its `for`, then firing).
    wait_until("every alert rule evaluated", || {
        let groups = prometheus.api("/api/v1/rules");
        let rules: Vec<Value> = groups["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        rules.len() == ALERT_RULES && rules.iter().all(|r| r["health"] == "ok")
    });
    wait_until("SluiceBackendDown for the dead backend", || {
        let alerts = prometheus.api("/api/v1/alerts");
        alerts["alerts"].as_array().into_iter().flatten().any(|a| {
            a["labels"]["alertname"] == "SluiceBackendDown" && a["labels"]["backend"] == "dead"
        })
    });

    running.store(false, Ordering::Relaxed);
    traffic.join().unwrap();
    drop(open);
}
