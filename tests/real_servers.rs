//! sluice in front of real servers from Debian packages: redis-server (with
//! redis-benchmark through sluice) and memcached. Keys written through sluice
//! are found on exactly the backend `sluice explain` names, and only there.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;

use common::*;

fn redis_from(client: IpAddr, to: SocketAddr) -> BufReader<TcpStream> {
    BufReader::new(connect_from(client, to))
}

#[test]
fn redis_behind_sluice() {
    let servers: Vec<Server> = (0..3).map(|_| redis_server()).collect();
    let backends: Vec<(String, SocketAddr)> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("redis-{i}"), s.addr))
        .collect();
    let sluice = Sluice::start(&config(free_addr(unique_loopback()), &backends, ""));
    let front = sluice.listen_addr();

    // Each client writes a key through sluice; it must be on exactly the
    // backend that `explain` names.
    for i in 0..60 {
        let ip = client_ip(1000 + i);
        let key = format!("key-of-{ip}");
        let mut conn = redis_from(ip, front);
        assert_eq!(
            redis_call(&mut conn, &["SET", &key, &ip.to_string()]),
            "+OK"
        );
        assert_eq!(redis_call(&mut conn, &["GET", &key]), ip.to_string());
        let (owner, _) = explain(sluice.config_path(), "back", &ip.to_string());
        for (name, addr) in &backends {
            let mut direct = BufReader::new(TcpStream::connect(addr).unwrap());
            let found = redis_call(&mut direct, &["EXISTS", &key]);
            let expected = if *name == owner { ":1" } else { ":0" };
            assert_eq!(found, expected, "key of {ip} on {name} (owner {owner})");
        }
    }

    // redis-benchmark through sluice: 50 connections, pipelined and not.
    for extra in [&[][..], &["-P", "16"][..]] {
        let out = Command::new("redis-benchmark")
            .args([
                "-h",
                &front.ip().to_string(),
                "-p",
                &front.port().to_string(),
            ])
            .args(["-n", "20000", "-c", "50", "-t", "set,get", "-q"])
            .args(extra)
            .output()
            .expect("redis-benchmark: `make test` installs it");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "redis-benchmark failed: {stdout}");
        for test in ["SET", "GET"] {
            assert!(
                stdout
                    .lines()
                    .any(|l| l.contains(&format!("{test}: ")) && l.contains("requests per second")),
                "no {test} result from redis-benchmark: {stdout}"
            );
        }
    }
}

#[test]
fn memcached_behind_sluice() {
    let servers: Vec<Server> = (0..2).map(|_| memcached()).collect();
    let backends: Vec<(String, SocketAddr)> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("memcached-{i}"), s.addr))
        .collect();
    let sluice = Sluice::start(&config(free_addr(unique_loopback()), &backends, ""));
    let front = sluice.listen_addr();

    let mut owners = std::collections::HashSet::new();
    for i in 0..40 {
        let ip = client_ip(2000 + i);
        let key = format!("k{i}");
        let value = format!("value of {ip}");
        let mut conn = BufReader::new(connect_from(ip, front));
        write!(
            conn.get_mut(),
            "set {key} 0 0 {}\r\n{value}\r\n",
            value.len()
        )
        .unwrap();
        let mut reply = String::new();
        conn.read_line(&mut reply).unwrap();
        assert_eq!(reply, "STORED\r\n");

        write!(conn.get_mut(), "get {key}\r\n").unwrap();
        let mut lines = Vec::new();
        for _ in 0..3 {
            let mut line = String::new();
            conn.read_line(&mut line).unwrap();
            lines.push(line);
        }
        assert_eq!(
            lines,
            [
                format!("VALUE {key} 0 {}\r\n", value.len()),
                format!("{value}\r\n"),
                "END\r\n".into()
            ]
        );

        let (owner, _) = explain(sluice.config_path(), "back", &ip.to_string());
        owners.insert(owner.clone());
        let owner_addr = backends.iter().find(|(n, _)| *n == owner).unwrap().1;
        let mut direct = BufReader::new(TcpStream::connect(owner_addr).unwrap());
        write!(direct.get_mut(), "get {key}\r\n").unwrap();
        let mut line = String::new();
        direct.read_line(&mut line).unwrap();
        assert!(
            line.starts_with(&format!("VALUE {key} ")),
            "{key} is not on {owner}: {line:?}"
        );
    }
    assert_eq!(
        owners.len(),
        2,
        "40 clients should use both memcached servers"
    );
}
