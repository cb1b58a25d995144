//! `/ready` on the admin endpoint, and `shutdown_delay`: what a BGP
//! speaker or an upstream balancer polls. 200 while sluice serves and every
//! pool has a backend up; 503 while a pool has none, and from the moment a
//! stop signal comes, while the listeners still accept for
//! `shutdown_delay` so that routers can move new flows away first.

mod common;

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use common::*;

#[test]
fn ready_follows_the_pools_then_turns_503_on_sigterm_while_accepting_for_shutdown_delay() {
    let (mut servers, backends) = name_servers(1);
    let backend_addr = backends[0].1;
    let admin = free_addr(unique_loopback());
    let delay = Duration::from_millis(1500);
    let text = format!(
        "admin:\n  listen: {admin}\nshutdown_delay: 1500ms\n{}",
        config(
            free_addr(unique_loopback()),
            &backends,
            "    health: { interval: 100ms, timeout: 100ms, fall: 1, rise: 1 }\n",
        )
    );
    let sluice = Sluice::start(&text);
    let front = sluice.listen_addr();
    let ready = || get(admin, "/ready");
    assert_eq!(
        ready(),
        ("HTTP/1.1 200 OK".to_owned(), "ready\n".to_owned())
    );

    // The pool's only backend goes down: not ready, until it is back.
    servers[0].stop();
    wait_until("/ready to say the pool has no backend up", || {
        ready()
            == (
                "HTTP/1.1 503 Service Unavailable".to_owned(),
                "not ready: no backend up in pool back\n".to_owned(),
            )
    });
    let _back = name_server_on("backend-0", backend_addr);
    wait_until("/ready to say ready again", || {
        ready().0 == "HTTP/1.1 200 OK"
    });

    // SIGTERM: 503 at once, yet new connections are still served until
    // shutdown_delay has passed.
    let stopped_at = Instant::now();
    sluice.signal(Signal::SIGTERM);
    wait_until("/ready to say draining", || {
        ready()
            == (
                "HTTP/1.1 503 Service Unavailable".to_owned(),
                "not ready: draining\n".to_owned(),
            )
    });
    let mut served_during_delay = 0;
    while stopped_at.elapsed() < delay - Duration::from_millis(500) {
        assert!(
            round_trip(client_ip(1), front).is_ok(),
            "a new connection refused {:?} into a delay of {delay:?}",
            stopped_at.elapsed()
        );
        served_during_delay += 1;
    }
    assert!(served_during_delay > 0);
    sluice.wait_for_log("stopping: no new connections");
    assert!(
        stopped_at.elapsed() >= delay,
        "the listeners stopped {:?} after SIGTERM, before shutdown_delay",
        stopped_at.elapsed()
    );
    assert_eq!(sluice.wait_exit().code(), Some(0));
}

#[test]
fn a_second_signal_during_shutdown_delay_exits_at_once() {
    let (_server, text) = behind_echo("");
    let admin = free_addr(unique_loopback());
    let text = format!("admin:\n  listen: {admin}\nshutdown_delay: 1h\n{text}");
    let sluice = Sluice::start(&text);
    sluice.signal(Signal::SIGTERM);
    sluice.wait_for_log("still accepting for 1h");
    assert_eq!(get(admin, "/ready").0, "HTTP/1.1 503 Service Unavailable");
    sluice.signal(Signal::SIGTERM);
    assert_eq!(sluice.wait_exit().code(), Some(0));
}
