//! The session's rules, without sockets and without a clock.

use std::time::Duration;

use super::*;
use crate::connection::ending::{classify, Ending};
use crate::connection::fixtures::{preference, refused, route, shared};

/// Two backends, one retry; listener `p` wants PROXY headers from
/// 127.0.0.1.
const CONFIG: &str = "listeners:\n  l: { listen: 127.0.0.1:7000, pool: p }\n  h: { listen: 127.0.0.1:7001, pool: p, accept_proxy: { from: [127.0.0.1], timeout: 2s } }\npools:\n  p:\n    retries: 1\n    connect_timeout: 500ms\n    idle_timeout: 30s\n    backends:\n      - { address: 10.0.0.1:1, name: a }\n      - { address: 10.0.0.2:1, name: b }\n";

/// `None` if turned away.
fn open(shared: &'static Shared, listen: &str, peer: &str) -> Option<(Session, Step)> {
    let route = route(shared, listen);
    let slot = shared.connections.take().unwrap();
    let local = || unreachable!("no send_proxy");
    Session::open(route, peer.parse().unwrap(), slot, local, shared, start()).ok()
}

/// When the tests' connections are accepted; later times are told as
/// offsets from it.
fn start() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn at(millis: u64) -> Instant {
    start() + Duration::from_millis(millis)
}

fn connect_to(step: &Step) -> SocketAddr {
    match step {
        Step::Connect { addr, timeout } => {
            assert_eq!(
                *timeout,
                Duration::from_millis(500),
                "the pool's connect_timeout"
            );
            *addr
        }
        other => panic!("expected a connect, got {other:?}"),
    }
}

#[test]
fn a_connection_dials_in_its_clients_order_and_gives_up_after_the_retries() {
    let (shared, _events) = shared(CONFIG);
    let client = "192.0.2.1:5000";
    let (mut session, step) = open(shared, "127.0.0.1:7000", client).unwrap();
    let order = preference(shared, "p", client);
    assert_eq!(connect_to(&step), order[0]);
    let step = session.connect_failed(refused(), shared, at(500));
    assert_eq!(connect_to(&step), order[1]);
    assert_eq!(
        session.connect_failed(refused(), shared, at(1000)),
        Step::Close
    );
    assert!(!session.relaying());
    assert!(session.ending().is_none(), "turned away: logged already");
    assert_eq!(shared.connections.open(), 1);
    // Its places are freed.
    session.close(shared, at(1000));
    assert_eq!(shared.connections.open(), 0);
}

#[test]
fn a_proxy_header_names_the_client_whose_backend_is_dialled() {
    let (shared, _events) = shared(CONFIG);
    let (mut session, step) = open(shared, "127.0.0.1:7001", "127.0.0.1:6000").unwrap();
    let Step::ReadHeader { deadline } = step else {
        panic!("expected a header read, got {step:?}");
    };
    assert_eq!(deadline, at(2000), "accept_proxy's timeout");
    assert!(session.awaits_header());
    assert_eq!(session.header_deadline(), Some(deadline));
    let client = "198.51.100.9:4000";
    let carried = Some((client.parse().unwrap(), "127.0.0.1:7001".parse().unwrap()));
    let step = session.header(Ok(carried), || unreachable!("no send_proxy"), shared, at(5));
    assert_eq!(connect_to(&step), preference(shared, "p", client)[0]);
    assert!(!session.awaits_header());
    assert_eq!(session.header_deadline(), None);
}

#[test]
fn a_header_that_comes_late_or_broken_closes_the_connection() {
    let (shared, _events) = shared(CONFIG);
    let (mut late, _) = open(shared, "127.0.0.1:7001", "127.0.0.1:6001").unwrap();
    assert_eq!(late.header_late(at(2000)), Step::Close);
    assert!(!late.awaits_header());
    let (mut broken, _) = open(shared, "127.0.0.1:7001", "127.0.0.1:6002").unwrap();
    let step = broken.header(Err(&"garbage"), || unreachable!(), shared, at(5));
    assert_eq!(step, Step::Close);
    // Only the upstream named in `from` may send one.
    assert!(open(shared, "127.0.0.1:7001", "127.0.0.2:6003").is_none());
}

#[test]
fn a_relayed_connection_counts_its_bytes_and_restarts_its_idle_clock() {
    let (shared, _events) = shared(CONFIG);
    let (mut session, _) = open(shared, "127.0.0.1:7000", "192.0.2.2:5000").unwrap();
    assert_eq!(session.idle_deadline(), None, "not idle while dialing");
    let connected = session.connected(shared, at(10));
    assert_eq!(connected.engine, Engine::Auto);
    assert_eq!(connected.proxy_header, None, "no send_proxy");
    assert!(session.relaying());
    assert_eq!(
        session.idle_deadline(),
        Some(at(30_010)),
        "idle_timeout: 30s"
    );
    session.moved(Side::Client, 10, at(20));
    session.moved(Side::Backend, 32, at(25));
    assert_eq!(session.idle_deadline(), Some(at(30_025)));
    assert_eq!([session.bytes[0].total, session.bytes[1].total], [10, 32]);
    assert_eq!(session.fin(Side::Backend), PassFin::Shutdown);
    assert!(session.passed(Side::Backend));
    assert_eq!(
        session.fin(Side::Client),
        PassFin::Close {
            first_fin: Side::Backend
        },
        "the second FIN ends the connection"
    );
    let finished = classify(&Ending::Finished {
        first_fin: Side::Backend,
    });
    assert_eq!(session.ending(), Some(&finished));
    session.close(shared, at(30));
    assert_eq!(shared.connections.open(), 0);
}

#[test]
fn the_first_ending_reported_is_the_one() {
    let (shared, _events) = shared(CONFIG);
    let (mut session, _) = open(shared, "127.0.0.1:7000", "192.0.2.3:5000").unwrap();
    session.connected(shared, at(10));
    let reset = std::io::Error::from_raw_os_error(libc::ECONNRESET);
    let how = session.end(Ending::Failed {
        side: Side::Backend,
        error: &reset,
    });
    assert_eq!(how.flush_from, Some(Side::Backend));
    // An idle timeout while its last bytes are delivered: still a
    // backend reset.
    let how = session.end(Ending::Idle { stalled: true });
    assert_eq!(how.close, "backend reset");
    session.close(shared, at(40_000));
}

/// Pool `q` queues one client for a second; its one backend takes one
/// connection at a time. Pool `c` fails closed and queues too.
const QUEUED: &str = "listeners:\n  l: { listen: 127.0.0.1:7000, pool: q }\n  c: { listen: 127.0.0.1:7001, pool: c }\npools:\n  q:\n    retries: 0\n    queue: { size: 1, timeout: 1s }\n    backends:\n      - { address: 10.0.0.1:1, name: a, max_connections: 1 }\n  c:\n    retries: 1\n    fail_open: false\n    queue: { size: 5, timeout: 1s }\n    backends:\n      - { address: 10.0.0.2:1, name: b }\n      - { address: 10.0.0.3:1, name: c }\n";

#[test]
fn a_client_no_backend_can_take_waits_in_the_queue_and_is_dialled_once_one_can() {
    let (shared, _events) = shared(QUEUED);
    let local = || unreachable!("no send_proxy");
    let (mut holder, step) = open(shared, "127.0.0.1:7000", "192.0.2.1:1").unwrap();
    assert!(matches!(step, Step::Connect { .. }));
    holder.connected(shared, at(1));
    let (mut waiting, step) = open(shared, "127.0.0.1:7000", "192.0.2.2:1").unwrap();
    assert_eq!(
        step,
        Step::Wait { deadline: at(1000) },
        "the backend is full"
    );
    assert_eq!(waiting.wait_deadline(), Some(at(1000)));
    // The queue holds one: the next is turned away at once.
    let (full, step) = open(shared, "127.0.0.1:7000", "192.0.2.3:1").unwrap();
    assert_eq!(step, Step::Close);
    assert!(full.ending().is_none(), "turned away: logged already");
    full.close(shared, at(2));
    // Still full: it waits on, its deadline unchanged.
    assert_eq!(
        waiting.retry(local, shared, at(10)),
        Step::Wait { deadline: at(1000) }
    );
    holder.end(Ending::Finished {
        first_fin: Side::Client,
    });
    holder.close(shared, at(20));
    let step = waiting.retry(local, shared, at(21));
    assert_eq!(connect_to_any(&step), "10.0.0.1:1".parse().unwrap());
    assert_eq!(waiting.wait_deadline(), None);
    waiting.connected(shared, at(22));
    assert!(waiting.relaying());
}

#[test]
fn a_client_waits_no_longer_than_the_queue_timeout() {
    let (shared, _events) = shared(QUEUED);
    let (mut holder, _) = open(shared, "127.0.0.1:7000", "192.0.2.1:1").unwrap();
    holder.connected(shared, at(1));
    let (mut waiting, step) = open(shared, "127.0.0.1:7000", "192.0.2.2:1").unwrap();
    assert_eq!(step, Step::Wait { deadline: at(1000) });
    assert_eq!(waiting.wait_over(at(1000)), Step::Close);
    assert_eq!(waiting.wait_deadline(), None);
    // Its place in the queue is free again.
    waiting.close(shared, at(1000));
    let (_next, step) = open(shared, "127.0.0.1:7000", "192.0.2.3:1").unwrap();
    assert!(matches!(step, Step::Wait { .. }));
}

/// In a pool that fails closed, a client whose connects all failed (its
/// primary died a moment before probes noticed) waits rather than being
/// turned away; once its deadline has passed, a failed dial turns it away.
#[test]
fn failed_connects_in_a_pool_that_fails_closed_lead_to_the_queue() {
    let (shared, _events) = shared(QUEUED);
    let local = || unreachable!("no send_proxy");
    let (mut session, step) = open(shared, "127.0.0.1:7001", "192.0.2.1:1").unwrap();
    connect_to_any(&step);
    let step = session.connect_failed(refused(), shared, at(10));
    connect_to_any(&step);
    let step = session.connect_failed(refused(), shared, at(20));
    assert_eq!(step, Step::Wait { deadline: at(1020) });
    let step = session.retry(local, shared, at(500));
    connect_to_any(&step);
    let step = session.connect_failed(refused(), shared, at(1100));
    connect_to_any(&step);
    assert_eq!(
        session.connect_failed(refused(), shared, at(1200)),
        Step::Close
    );
}

fn connect_to_any(step: &Step) -> SocketAddr {
    match step {
        Step::Connect { addr, .. } => *addr,
        other => panic!("expected a connect, got {other:?}"),
    }
}
