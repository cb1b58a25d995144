//! The metric handles and what they export.

use super::*;

#[test]
fn series_follow_what_is_registered_between_sweeps() {
    let metrics = Metrics::new(true);
    metrics.build_info("io_uring");
    let _process = ProcessStats::new(&metrics);
    let a = BackendStats::new(&metrics, "p", "a", &["front"]);
    let _b = BackendStats::new(&metrics, "p", "b", &["front"]);
    a.up.set(1.0);
    metrics.sweep();
    let text = metrics.render();
    assert!(
        text.contains("sluice_backend_up{pool=\"p\",backend=\"a\"} 1\n"),
        "{text}"
    );
    assert!(text
        .contains("sluice_health_checks_total{pool=\"p\",backend=\"b\",result=\"timeout\"} 0\n"));
    assert!(text.contains("sluice_config_reloads_total{result=\"fail\"} 0\n"));

    // The next configuration has only `a`: `b` goes, `a` keeps its values.
    metrics.renew();
    let a = BackendStats::new(&metrics, "p", "a", &["front"]);
    metrics.sweep();
    let text = metrics.render();
    assert!(
        text.contains("sluice_backend_up{pool=\"p\",backend=\"a\"} 1\n"),
        "{text}"
    );
    assert!(!text.contains("backend=\"b\""), "{text}");
    assert!(
        text.contains("sluice_build_info{version="),
        "permanent series stay"
    );
    // A handle of a removed series counts into nothing.
    drop(a);
}

#[test]
fn a_histogram_renders_cumulative_buckets() {
    let metrics = Metrics::new(true);
    let stats = BackendStats::new(&metrics, "p", "a", &[]);
    stats.connect_seconds.record(0.0003);
    stats.connect_seconds.record(3.0);
    let text = metrics.render();
    assert!(
        text.contains(
            "sluice_backend_connect_seconds_bucket{pool=\"p\",backend=\"a\",le=\"0.00025\"} 0\n"
        ),
        "{text}"
    );
    assert!(text.contains(
        "sluice_backend_connect_seconds_bucket{pool=\"p\",backend=\"a\",le=\"0.0005\"} 1\n"
    ));
    assert!(text.contains(
        "sluice_backend_connect_seconds_bucket{pool=\"p\",backend=\"a\",le=\"+Inf\"} 2\n"
    ));
    assert!(text.contains("sluice_backend_connect_seconds_count{pool=\"p\",backend=\"a\"} 2\n"));
    assert!(text.contains("# TYPE sluice_backend_connect_seconds histogram\n"));
}

#[test]
fn a_disabled_registry_keeps_nothing() {
    let metrics = Metrics::new(false);
    BackendStats::new(&metrics, "p", "a", &["front"])
        .up
        .set(1.0);
    assert_eq!(metrics.render(), "");
}
