//! The Prometheus endpoint, scraped during a run: every SPEC family is
//! there with its labels; bytes move while a connection is open; the active
//! gauge follows open connections; backend_up follows a backend going down;
//! reloads are counted.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;

#[test]
fn every_family_moves_with_the_traffic() {
    let (mut servers, backends) = name_servers(2);
    let (admin, text) = with_admin(&config(
        free_addr(unique_loopback()),
        &backends,
        "    health: { interval: 100ms, timeout: 50ms, fall: 1, rise: 1 }\n",
    ));
    let sluice = Sluice::start(&text);
    let front = sluice.listen_addr();

    // A connection that stays open: bytes show before it closes.
    let mut open = connect_from(client_ip(1), front);
    let mut name = [0u8; 10];
    open.read_exact(&mut name).unwrap();
    let backend = String::from_utf8_lossy(&name[..9]).into_owned();
    let route = [r#"listener="front""#, &format!(r#"backend="{backend}""#)];
    open.write_all(&[b'x'; 1000]).unwrap();
    let mut echo = [0u8; 1000];
    open.read_exact(&mut echo).unwrap();
    let bytes = |body: &str, direction: &str| {
        let mut labels = route.to_vec();
        let direction = format!(r#"direction="{direction}""#);
        labels.push(&direction);
        sample(body, "sluice_bytes_total", &labels).unwrap_or(0.0)
    };
    // Counted once each write completes, which the client may see first.
    wait_until("bytes counted while the connection is open", || {
        let body = scrape(admin);
        bytes(&body, "to_backend") == 1000.0 && bytes(&body, "to_client") == 1010.0
    });
    let body = scrape(admin);
    assert_eq!(
        sample(&body, "sluice_connections_active", &route),
        Some(1.0)
    );
    assert_eq!(sample(&body, "sluice_connections_total", &route), Some(1.0));

    drop(open);
    wait_until("the active gauge to drop", || {
        sample(&scrape(admin), "sluice_connections_active", &route) == Some(0.0)
    });

    // A backend going down shows in backend_up, in the health checks and,
    // for a connect that races the probe, in the errors.
    let up = |body: &str| {
        sample(
            body,
            "sluice_backend_up",
            &[r#"pool="back""#, r#"backend="backend-1""#],
        )
    };
    assert_eq!(up(&scrape(admin)), Some(1.0));
    wait_until("a successful probe of backend-1", || {
        let body = scrape(admin);
        sample(
            &body,
            "sluice_health_checks_total",
            &[r#"backend="backend-1""#, r#"result="ok""#],
        )
        .is_some_and(|ok| ok >= 1.0)
    });
    servers[1].stop();
    sluice.wait_for_log("backend is down");
    let body = scrape(admin);
    assert_eq!(up(&body), Some(0.0));
    let checks = |result: &str| {
        sample(
            &body,
            "sluice_health_checks_total",
            &[r#"backend="backend-1""#, &format!(r#"result="{result}""#)],
        )
    };
    assert!(checks("ok").unwrap() >= 1.0);
    assert!(checks("fail").unwrap() >= 1.0);

    // Reloads, good and bad.
    assert!(sluice.reload(&text).contains("configuration reloaded"));
    assert!(sluice.reload("listeners: [").contains("reload failed"));
    let body = scrape(admin);
    assert_eq!(
        sample(&body, "sluice_config_reloads_total", &[r#"result="ok""#]),
        Some(1.0)
    );
    assert_eq!(
        sample(&body, "sluice_config_reloads_total", &[r#"result="fail""#]),
        Some(1.0)
    );

    // The remaining families, with their labels.
    assert!(
        sample(
            &body,
            "sluice_backend_connect_seconds_bucket",
            &[&format!(r#"backend="{backend}""#), r#"le="0.001""#]
        )
        .is_some(),
        "{body}"
    );
    assert!(sample(
        &body,
        "sluice_connection_errors_total",
        &[r#"listener="front""#, r#"reason="no_backend""#]
    )
    .is_some());
    assert_eq!(
        sample(
            &body,
            "sluice_build_info",
            &[&format!(r#"version="{}""#, env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    for family in [
        "sluice_connections_total counter",
        "sluice_connections_active gauge",
        "sluice_connection_errors_total counter",
        "sluice_bytes_total counter",
        "sluice_backend_connect_seconds histogram",
        "sluice_backend_up gauge",
        "sluice_health_checks_total counter",
        "sluice_config_reloads_total counter",
        "sluice_build_info gauge",
    ] {
        assert!(
            body.contains(&format!("# TYPE {family}")),
            "no {family} in\n{body}"
        );
    }
}

#[test]
fn clients_turned_away_are_counted_by_reason() {
    let dead = [("dead".to_owned(), free_addr(unique_loopback()))];
    let admin = free_addr(unique_loopback());
    let text = format!(
        "admin:\n  listen: {admin}\n{}",
        config(free_addr(unique_loopback()), &dead, "    retries: 0\n")
    );
    let sluice = Sluice::start(&text);
    for i in 0..3 {
        let mut stream = connect_from(client_ip(i), sluice.listen_addr());
        let mut buf = [0u8; 1];
        assert!(matches!(stream.read(&mut buf), Ok(0) | Err(_)));
    }
    wait_until("three clients counted", || {
        sample(
            &scrape(admin),
            "sluice_connection_errors_total",
            &[r#"reason="no_backend""#],
        ) == Some(3.0)
    });
    let body = scrape(admin);
    assert_eq!(
        sample(
            &body,
            "sluice_connection_errors_total",
            &[r#"reason="connect_refused""#]
        ),
        Some(3.0)
    );
}

#[test]
fn the_admin_endpoint_serves_its_pages_and_refuses_other_methods() {
    let (_servers, backends) = name_servers(1);
    let admin = free_addr(unique_loopback());
    let sluice = Sluice::start(&format!(
        "admin:\n  listen: {admin}\n{}",
        config(free_addr(unique_loopback()), &backends, "")
    ));
    assert_eq!(get(admin, "/").0, "HTTP/1.1 200 OK");
    assert_eq!(get(admin, "/nothing").0, "HTTP/1.1 404 Not Found");
    let mut stream = TcpStream::connect(admin).unwrap();
    stream.write_all(b"POST /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
    drop(sluice);
}

/// Series follow the configuration: a backend or a listener that a reload
/// removes takes its series with it (a retired backend's `backend_up 0`
/// would otherwise fire a "backend down" alert forever), while the series
/// of what stays keep their values.
#[test]
fn series_follow_the_configuration() {
    let (_servers, backends) = name_servers(3);
    let admin = free_addr(unique_loopback());
    let extra = free_addr(unique_loopback());
    let listen = free_addr(unique_loopback());
    let text = |backends: &[(String, std::net::SocketAddr)], with_extra: bool| {
        let mut text = format!(
            "admin:\n  listen: {admin}\n{}",
            config(listen, backends, "")
        );
        if with_extra {
            text = text.replace(
                "pools:\n",
                &format!("  extra:\n    listen: {extra}\n    pool: back\npools:\n"),
            );
        }
        text
    };
    let sluice = Sluice::start(&text(&backends, true));
    assert_eq!(round_trip(client_ip(1), listen).map(|_| ()), Ok(()));
    let before = scrape(admin);
    for series in [
        r#"sluice_backend_up{pool="back",backend="backend-2"} 1"#,
        r#"sluice_connection_errors_total{listener="extra",reason="no_backend"} 0"#,
        r#"sluice_bytes_total{listener="extra",backend="backend-2",direction="to_client"} 0"#,
    ] {
        assert!(before.contains(series), "{series} missing:\n{before}");
    }
    let total_before = sample(
        &before,
        "sluice_connections_total",
        &[r#"listener="front""#],
    );

    let outcome = sluice.reload(&text(&backends[..2], false));
    assert!(outcome.contains("configuration reloaded"), "{outcome}");
    let after = scrape(admin);
    assert!(!after.contains(r#"backend="backend-2""#), "{after}");
    assert!(!after.contains(r#"listener="extra""#), "{after}");
    assert!(after.contains(r#"sluice_backend_up{pool="back",backend="backend-1"} 1"#));
    assert_eq!(
        sample(&after, "sluice_connections_total", &[r#"listener="front""#]),
        total_before,
        "what stays keeps its values"
    );
}

/// Clients of the admin endpoint that send a request head slowly, or never
/// finish it, keep no scrape waiting: an early sluice served 16 at a time
/// for 10 s each, so sixteen such clients starved Prometheus and every
/// `/ready` check. Here 300 of them, reconnecting as soon as they are
/// closed, send a byte a second, while 20 scrapers scrape three times
/// each: every scrape is answered, within a second.
#[test]
fn slow_admin_clients_keep_no_scrape_waiting() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    let (admin, text) = with_admin(&config(
        free_addr(unique_loopback()),
        &[("none".into(), free_addr(unique_loopback()))],
        "",
    ));
    let _sluice = Sluice::start(&text);
    let slow_start = |stream: &mut TcpStream| stream.write_all(b"GET /metr").is_ok();
    let mut slow: Vec<TcpStream> = (0..300)
        .map(|_| {
            let mut stream = TcpStream::connect(admin).unwrap();
            assert!(slow_start(&mut stream));
            stream
        })
        .collect();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let trickler = std::thread::spawn(move || {
        while !stopping.load(Ordering::SeqCst) {
            for stream in &mut slow {
                if stream.write_all(b"i").is_err() {
                    // Closed by sluice: come back at once.
                    if let Ok(mut again) = TcpStream::connect(admin) {
                        if slow_start(&mut again) {
                            *stream = again;
                        }
                    }
                }
            }
            // A byte a second, per client (a slow client, not a wait).
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    let scrapers: Vec<_> = (0..20)
        .map(|_| {
            std::thread::spawn(move || {
                (0..3)
                    .map(|_| {
                        let started = Instant::now();
                        let answer = try_get(admin, "/metrics").map(|(status, _)| status);
                        // Scrapes spread over the slow clients' seconds.
                        std::thread::sleep(Duration::from_millis(700));
                        (answer, started.elapsed() - Duration::from_millis(700))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let scrapes: Vec<_> = scrapers
        .into_iter()
        .flat_map(|s| s.join().unwrap())
        .collect();
    stop.store(true, Ordering::SeqCst);
    trickler.join().unwrap();
    for (answer, took) in scrapes {
        assert_eq!(answer.as_deref(), Some("HTTP/1.1 200 OK"));
        // Waiting behind the slow clients took 10 s; a busy host takes
        // a second or two.
        assert!(took < Duration::from_secs(3), "a scrape took {took:?}");
    }
}
