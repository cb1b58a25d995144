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
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use nix::sys::signal::Signal;

use common::*;

const CLIENT_LOOPS: u32 = 8;

fn round_trip(client: IpAddr, to: SocketAddr) -> Result<(), String> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::new(client, 0).into()).unwrap();
    socket
        .connect_timeout(&to.into(), DEADLINE)
        .map_err(|e| format!("connect: {e}"))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut reader = BufReader::new(stream);
    let mut name = String::new();
    reader
        .read_line(&mut name)
        .map_err(|e| format!("name: {e}"))?;
    reader
        .get_mut()
        .write_all(b"ping")
        .map_err(|e| format!("write: {e}"))?;
    let mut echo = [0u8; 4];
    reader
        .read_exact(&mut echo)
        .map_err(|e| format!("echo: {e}"))?;
    Ok(())
}

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

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    // Eight clients at once, so that connections wait in the accept queues
    // when the old process stops listening.
    let loads: Vec<_> = (0..CLIENT_LOOPS)
        .map(|loop_id| {
            let (stop, served) = (stop.clone(), served.clone());
            thread::spawn(move || {
                let mut failures = Vec::new();
                let mut i = loop_id;
                while !stop.load(Ordering::Relaxed) {
                    match round_trip(client_ip(i % 400), front) {
                        Ok(()) => {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.push(e),
                    }
                    i += CLIENT_LOOPS;
                }
                failures
            })
        })
        .collect();
    let wait_for_traffic = |n: usize| {
        let target = served.load(Ordering::Relaxed) + n;
        wait_until("traffic", || served.load(Ordering::Relaxed) >= target);
    };
    wait_for_traffic(100);

    let new = Sluice::start(&text);
    wait_for_traffic(100);
    old.signal(Signal::SIGTERM);
    old.wait_for_log("stopping: no new connections");
    wait_for_traffic(100);

    // The connection open on the old process still works, and when it
    // ends the old process exits.
    held.get_mut().write_all(b"still here").unwrap();
    let mut echo = [0u8; 10];
    held.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"still here");
    drop(held);
    assert_eq!(old.wait_exit().code(), Some(0));

    wait_for_traffic(100);
    stop.store(true, Ordering::Relaxed);
    let failures: Vec<String> = loads.into_iter().flat_map(|l| l.join().unwrap()).collect();
    assert!(
        failures.is_empty(),
        "{} connections lost: {failures:?}",
        failures.len()
    );
    drop(new);
}
