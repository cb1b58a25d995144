//! Zero-downtime binary upgrade, as docs/operations.md describes it: with
//! `net.ipv4.tcp_migrate_req=1`, start the new process on the same addresses
//! (SO_REUSEPORT), wait until it is ready, then SIGTERM the old one, which
//! drains. Client loops running throughout lose no connection, and a
//! connection open on the old process finishes there.
//!
//! Without the sysctl the kernel resets the connections waiting in the old
//! process's accept queues when it stops listening (seen here: 2 of ~800 in
//! one run out of six).

mod common;

use std::io::{BufRead, BufReader, Read, Write};

use nix::sys::signal::Signal;

use common::*;

const CLIENT_LOOPS: u32 = 8;

/// Sets `net.ipv4.tcp_migrate_req` to 1 for the life of the guard (it is
/// per network namespace), then puts the old value back.
struct MigrateRequests(String);

const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

impl MigrateRequests {
    fn enable() -> MigrateRequests {
        let old = std::fs::read_to_string(MIGRATE_REQ).expect("kernel 5.14 or later");
        std::fs::write(MIGRATE_REQ, "1").expect("setting net.ipv4.tcp_migrate_req needs root");
        MigrateRequests(old)
    }
}

impl Drop for MigrateRequests {
    fn drop(&mut self) {
        let _ = std::fs::write(MIGRATE_REQ, self.0.trim());
    }
}

#[test]
fn a_new_process_takes_over_without_losing_a_connection() {
    let _migrate = MigrateRequests::enable();
    let (_servers, backends) = name_servers(2);
    let text = config(free_addr(unique_loopback()), &backends, "");
    let old = Sluice::start(&text);
    let front = old.listen_addr();

    let mut held = BufReader::new(connect_from(client_ip(900), front));
    let mut name = String::new();
    held.read_line(&mut name).unwrap();

    // Eight clients at once, so that connections wait in the accept queues
    // when the old process stops listening.
    let clients = ClientLoops::start(CLIENT_LOOPS, front);
    clients.wait_for(100);

    let new = Sluice::start(&text);
    clients.wait_for(100);
    old.signal(Signal::SIGTERM);
    old.wait_for_log("stopping: no new connections");
    clients.wait_for(100);

    // The connection open on the old process still works, and when it
    // ends the old process exits.
    held.get_mut().write_all(b"still here").unwrap();
    let mut echo = [0u8; 10];
    held.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"still here");
    drop(held);
    assert_eq!(old.wait_exit().code(), Some(0));

    clients.wait_for(100);
    let failures = clients.stop();
    assert!(
        failures.is_empty(),
        "{} connections lost: {failures:?}",
        failures.len()
    );
    drop(new);
}
