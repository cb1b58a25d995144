//! Thread per core: `workers` threads, each with its own runtime, pinned to
//! a core when asked, all accepting; no threads beyond them, however many
//! connections are open.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;

/// (name, allowed CPUs) of every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|task| {
            let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
            let field = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .unwrap()
                    .trim()
                    .to_owned()
            };
            (field("Name:"), field("Cpus_allowed_list:"))
        })
        .collect()
}

fn workers(pid: u32) -> Vec<(String, String)> {
    threads(pid)
        .into_iter()
        .filter(|(name, _)| name.starts_with("sluice-worker"))
        .collect()
}

#[test]
fn the_configured_number_of_workers_run_and_all_accept() {
    let (_servers, backends) = name_servers(1);
    let text =
        config(free_addr(unique_loopback()), &backends, "").replace("workers: 2", "workers: 3");
    let sluice = Sluice::start(&text);
    assert_eq!(workers(sluice.pid()).len(), 3);
    // The kernel spreads connections over the three SO_REUSEPORT sockets;
    // every one of 60 connections must be served, whichever worker has it.
    for i in 0..60 {
        assert_eq!(backend_for(client_ip(i), sluice.listen_addr()), "backend-0");
    }
}

#[test]
fn pinned_workers_each_get_one_core() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    let (_servers, backends) = name_servers(1);
    let text = config(free_addr(unique_loopback()), &backends, "")
        .replace("workers: 2", &format!("workers: {cpus}\npin_workers: true"));
    let sluice = Sluice::start(&text);
    let pinned: Vec<String> = workers(sluice.pid())
        .into_iter()
        .map(|(_, cpus)| cpus)
        .collect();
    assert_eq!(pinned.len(), cpus);
    let distinct: HashSet<&String> = pinned.iter().collect();
    assert_eq!(
        distinct.len(),
        cpus,
        "each worker on its own core: {pinned:?}"
    );
    assert!(
        pinned
            .iter()
            .all(|list| !list.contains(',') && !list.contains('-')),
        "{pinned:?}"
    );
    assert_eq!(backend_for(client_ip(1), sluice.listen_addr()), "backend-0");
}

#[test]
fn open_connections_add_no_threads() {
    // Neither engine may park an operation on a kernel worker thread (as
    // io_uring's own splice or shutdown would): a process's io-wq threads
    // are listed among its tasks.
    let server = TestServer::start(|mut stream| echo(&mut stream));
    for engine in ["splice", "copy"] {
        let sluice = Sluice::start(&config(
            free_addr(unique_loopback()),
            &[("echo".into(), server.addr)],
            &format!("    engine: {engine}\n"),
        ));
        let before = threads(sluice.pid()).len();
        let open: Vec<TcpStream> = (0..200)
            .map(|i| {
                let mut client = connect_from(client_ip(i), sluice.listen_addr());
                client.write_all(b"ping").unwrap();
                let mut reply = [0u8; 4];
                client.read_exact(&mut reply).unwrap();
                assert_eq!(&reply, b"ping", "{engine}");
                client
            })
            .collect();
        assert_eq!(
            threads(sluice.pid()).len(),
            before,
            "{engine}: threads with {} idle connections open",
            open.len()
        );
        // Half-closes and closes (shutdown, close and cancels on the
        // io_uring driver) add none either.
        for mut client in open {
            client.shutdown(std::net::Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).unwrap();
        }
        assert_eq!(
            threads(sluice.pid()).len(),
            before,
            "{engine}: threads after closing"
        );
    }
}
