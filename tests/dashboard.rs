//! conf/grafana-dashboard.json is valid JSON, every query in it names only
//! metric families sluice exports (SPEC "Metrics"), and every family is on
//! the dashboard.

use std::collections::BTreeSet;

use serde_json::Value;

const FAMILIES: [&str; 14] = [
    "sluice_connections_total",
    "sluice_connections_active",
    "sluice_connection_errors_total",
    "sluice_bytes_total",
    "sluice_backend_connect_seconds",
    "sluice_backend_up",
    "sluice_health_checks_total",
    "sluice_config_reloads_total",
    "sluice_build_info",
    "sluice_connections_capacity",
    "sluice_listener_max_connections",
    "sluice_connections_closed_on_down_total",
    "sluice_queue_length",
    "sluice_backend_state",
];

/// Every `expr` and `query` string in the dashboard.
fn queries(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "query", Value::String(q)) => out.push(q.clone()),
                    _ => queries(value, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

/// The `sluice_*` names in a query, with histogram suffixes folded into
/// their family.
fn names(query: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = query;
    while let Some(start) = rest.find("sluice_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).filter(|f| FAMILIES.contains(f)))
            .unwrap_or(name);
        names.push(family.to_owned());
        rest = &tail[end..];
    }
    names
}

#[test]
fn the_dashboard_uses_exactly_the_exported_families() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/conf/grafana-dashboard.json"
    ))
    .unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("valid JSON");
    assert!(dashboard["panels"]
        .as_array()
        .is_some_and(|p| !p.is_empty()));
    let mut all = Vec::new();
    queries(&dashboard, &mut all);
    let used: BTreeSet<String> = all.iter().flat_map(|q| names(q)).collect();
    for name in &used {
        assert!(
            FAMILIES.contains(&name.as_str()),
            "the dashboard queries {name}, which sluice does not export"
        );
    }
    for family in FAMILIES {
        assert!(used.contains(family), "{family} is not on the dashboard");
    }
}
