//! The PROXY protocol through the real binary: headers sent to a backend
//! that parses them (v1, v2, and on health probes), headers read from a
//! client standing in for an upstream balancer (v1, v2, LOCAL), the carried
//! address used for hashing and logs, and malformed headers of each kind.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use common::*;

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// What a backend saw before the client's bytes.
#[derive(Debug, PartialEq)]
enum Seen {
    V1(String),
    /// v2 PROXY over TCP/IPv4: source and destination.
    V2(SocketAddr, SocketAddr),
}

/// Reads one PROXY header, v1 or v2, off `stream`.
fn read_header(stream: &mut TcpStream) -> Seen {
    let mut first = [0u8; 12];
    stream.read_exact(&mut first[..6]).unwrap();
    if &first[..6] == b"PROXY " {
        let mut line = String::from("PROXY ");
        let mut byte = [0u8; 1];
        while !line.ends_with("\r\n") {
            stream.read_exact(&mut byte).unwrap();
            line.push(byte[0] as char);
        }
        return Seen::V1(line);
    }
    stream.read_exact(&mut first[6..]).unwrap();
    assert_eq!(first, V2_SIGNATURE);
    let mut fixed = [0u8; 4];
    stream.read_exact(&mut fixed).unwrap();
    assert_eq!(fixed[0], 0x21, "version 2, PROXY command");
    assert_eq!(fixed[1], 0x11, "TCP over IPv4");
    let len = u16::from_be_bytes([fixed[2], fixed[3]]) as usize;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).unwrap();
    let ip = |at: usize| {
        IpAddr::V4(Ipv4Addr::new(
            body[at],
            body[at + 1],
            body[at + 2],
            body[at + 3],
        ))
    };
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    Seen::V2(
        SocketAddr::new(ip(0), port(8)),
        SocketAddr::new(ip(4), port(10)),
    )
}

/// A backend that reads a PROXY header, reports it, then echoes.
fn header_reader() -> (TestServer, mpsc::Receiver<Seen>) {
    let (report, seen) = mpsc::channel();
    let report = Mutex::new(report);
    let server = TestServer::start(move |mut stream| {
        let header = read_header(&mut stream);
        report.lock().unwrap().send(header).unwrap();
        echo(&mut stream);
    });
    (server, seen)
}

/// Sends `bytes` through sluice from `client` and returns the echo.
fn echo_through(client: IpAddr, sluice: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = connect_from(client, sluice);
    stream.write_all(bytes).unwrap();
    let mut back = vec![0u8; bytes.len()];
    stream.read_exact(&mut back).unwrap();
    back
}

#[test]
fn send_proxy_v1_and_v2_tell_the_backend_who_the_client_is() {
    for version in ["v1", "v2"] {
        let (server, seen) = header_reader();
        let listen = free_addr(unique_loopback());
        let _sluice = Sluice::start(&config(
            listen,
            &[("reader".into(), server.addr)],
            &format!("    send_proxy: {version}\n"),
        ));
        let client = client_ip(5);
        // The client's bytes come after the header, intact.
        assert_eq!(echo_through(client, listen, b"hello"), b"hello");
        let header = seen.recv_timeout(DEADLINE).unwrap();
        match header {
            Seen::V1(line) => {
                assert_eq!(version, "v1");
                let words: Vec<&str> = line.trim_end().split(' ').collect();
                assert_eq!(
                    words[..4],
                    [
                        "PROXY",
                        "TCP4",
                        &client.to_string(),
                        &listen.ip().to_string()
                    ]
                );
                assert_eq!(words[5], listen.port().to_string());
            }
            Seen::V2(source, destination) => {
                assert_eq!(version, "v2");
                assert_eq!(source.ip(), client);
                assert_eq!(destination, listen);
            }
        }
    }
}

#[test]
fn probes_send_the_header_when_asked() {
    let (server, seen) = header_reader();
    let sluice = Sluice::start(&config(
        free_addr(unique_loopback()),
        &[("reader".into(), server.addr)],
        "    send_proxy: v2\n    health: { interval: 100ms, timeout: 100ms, send_proxy: true }\n",
    ));
    match seen.recv_timeout(DEADLINE).unwrap() {
        Seen::V2(_, destination) => assert_eq!(destination, server.addr),
        other => panic!("a v1 header from a probe: {other:?}"),
    }
    drop(sluice);
}

/// sluice with `accept_proxy` in front of name servers, logging each
/// connection.
fn accepting() -> (Vec<TestServer>, Sluice, SocketAddr) {
    accepting_with("    accept_proxy: true\n")
}

/// sluice in front of three name servers, with `listener` settings.
fn accepting_with(listener: &str) -> (Vec<TestServer>, Sluice, SocketAddr) {
    let (servers, backends) = name_servers(3);
    let admin = free_addr(unique_loopback());
    let text = config(free_addr(unique_loopback()), &backends, "")
        .replace("    pool: back\n", &format!("    pool: back\n{listener}"));
    let text = format!("admin:\n  listen: {admin}\nlog:\n  connections: true\n{text}");
    (servers, Sluice::start(&text), admin)
}

fn errors(admin: SocketAddr, reason: &str) -> f64 {
    let label = format!("reason=\"{reason}\"");
    sample(&scrape(admin), "sluice_connection_errors_total", &[&label]).unwrap_or(0.0)
}

/// Only the upstream balancers that `accept_proxy.from` lists are
/// believed. A header from anyone else, true or forged, is refused and
/// counted as `proxy_untrusted`: it can neither choose a backend nor dodge
/// a rate per client (one real client with five forged addresses, through
/// a limit of one a second). Logs name the carried address and the
/// upstream's own.
#[test]
fn only_listed_upstreams_may_send_proxy_headers() {
    let trusted = client_ip(1);
    let (_servers, sluice, admin) = accepting_with(&format!(
        "    accept_proxy: {{ from: [{trusted}] }}\n    rate_limit: {{ per_client: {{ rate: 1, burst: 1 }} }}\n"
    ));
    for i in 0..5 {
        let forged = format!("PROXY TCP4 10.9.0.{i} 192.0.2.1 40000 6379\r\n");
        let mut stream = connect_from(client_ip(2), sluice.listen_addr());
        let _ = stream.write_all(forged.as_bytes());
        let mut buf = [0u8; 64];
        assert_eq!(stream.read(&mut buf).unwrap_or(0), 0, "refused");
    }
    wait_until("five untrusted headers counted", || {
        errors(admin, "proxy_untrusted") == 5.0
    });
    let header = b"PROXY TCP4 10.9.0.7 192.0.2.1 40000 6379\r\n";
    let expected = explain(sluice.config_path(), "back", "10.9.0.7").0;
    let mut stream = connect_from(trusted, sluice.listen_addr());
    stream.write_all(header).unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    assert_eq!(line.trim_end(), expected);
    drop(stream);
    let closed = sluice.wait_for_log("client=10.9.0.7:40000");
    assert!(closed.contains(&format!("peer={trusted}:")), "{closed}");
}

/// Clients that never send their header are held to the listener's rate
/// before their header is awaited (beyond it they are refused at once,
/// instead of holding places), and `accept_proxy.timeout` bounds the wait.
#[test]
fn silent_clients_are_held_to_the_rate_and_the_timeout() {
    let (_servers, sluice, admin) = accepting_with(
        "    accept_proxy: { from: [127.0.0.0/8], timeout: 300ms }\n    rate_limit: { rate: 1, burst: 2 }\n",
    );
    let silent: Vec<TcpStream> = (0..5)
        .map(|i| connect_from(client_ip(70 + i), sluice.listen_addr()))
        .collect();
    wait_until("three refused before any header", || {
        errors(admin, "over_limit") == 3.0
    });
    sluice.wait_for_log_count("no PROXY header within 300ms", 2);
    assert_eq!(errors(admin, "proxy_header"), 2.0);
    drop(silent);
}

/// Writes `header` through sluice and returns the backend name, if any.
fn name_after(header: &[u8], sluice: SocketAddr) -> Option<String> {
    let mut stream = connect_from(client_ip(1), sluice);
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.write_all(header).ok()?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).ok()?;
    line.strip_suffix('\n').map(str::to_owned)
}

fn v2_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut header = V2_SIGNATURE.to_vec();
    header.extend([0x21, 0x11, 0, 12]);
    for addr in [source, destination] {
        match addr.ip() {
            IpAddr::V4(ip) => header.extend(ip.octets()),
            IpAddr::V6(_) => unreachable!(),
        }
    }
    header.extend(source.port().to_be_bytes());
    header.extend(destination.port().to_be_bytes());
    header
}

#[test]
fn accept_proxy_routes_and_logs_by_the_carried_address() {
    let (_servers, sluice, _admin) = accepting();
    // 300 carried addresses, v1 and v2 alike, each routed exactly as
    // `explain` says for that address (all arrive from client_ip(1)).
    for i in 0..300u32 {
        let carried = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(10, 9, (i >> 8) as u8, i as u8)),
            40000,
        );
        let header = if i % 2 == 0 {
            format!("PROXY TCP4 {} 192.0.2.1 40000 6379\r\n", carried.ip()).into_bytes()
        } else {
            v2_header(carried, "192.0.2.1:6379".parse().unwrap())
        };
        let expected = explain(sluice.config_path(), "back", &carried.ip().to_string()).0;
        assert_eq!(
            name_after(&header, sluice.listen_addr()).as_deref(),
            Some(expected.as_str()),
            "{carried}"
        );
    }
    sluice.wait_for_log("client=10.9.1.43:40000");
}

#[test]
fn a_header_split_over_segments_is_read_whole() {
    let (_servers, sluice, _admin) = accepting();
    let expected = explain(sluice.config_path(), "back", "10.9.0.7").0;
    // Cut where ppp alone would judge it malformed (found by property
    // testing), and in the middle of each field.
    for cut in [
        "PROXY TCP4 10.9.0.7 192.0.2.1 40000 ".len(),
        "PROXY TC".len(),
        "PROXY TCP4 10.9".len(),
        "PROXY TCP4 10.9.0.7 192.0.2.1 40000 6379\r".len(),
    ] {
        let header = b"PROXY TCP4 10.9.0.7 192.0.2.1 40000 6379\r\n";
        let mut stream = connect_from(client_ip(2), sluice.listen_addr());
        stream.write_all(&header[..cut]).unwrap();
        // A slow upstream: the first part is read alone.
        std::thread::sleep(Duration::from_millis(100));
        stream.write_all(&header[cut..]).unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        assert_eq!(line.trim_end(), expected, "cut at {cut}");
    }
}

#[test]
fn a_local_or_unknown_header_keeps_the_connections_own_address() {
    let (_servers, sluice, _admin) = accepting();
    let expected = explain(sluice.config_path(), "back", &client_ip(1).to_string()).0;
    let mut local = V2_SIGNATURE.to_vec();
    local.extend([0x20, 0x00, 0, 0]);
    for header in [local, b"PROXY UNKNOWN\r\n".to_vec()] {
        assert_eq!(
            name_after(&header, sluice.listen_addr()),
            Some(expected.clone())
        );
    }
}

#[test]
fn malformed_headers_are_refused_and_counted() {
    let (_servers, sluice, admin) = accepting();
    let truncated_v2 = {
        let mut h = v2_header("10.0.0.1:1".parse().unwrap(), "10.0.0.2:2".parse().unwrap());
        h.truncate(20);
        h
    };
    let cases: [(&str, Vec<u8>); 6] = [
        ("no header", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        (
            "bad v1 address",
            b"PROXY TCP4 10.0.0.999 10.0.0.2 1 2\r\n".to_vec(),
        ),
        (
            "v1 too long",
            format!("PROXY TCP4 {}\r\n", "1".repeat(200)).into_bytes(),
        ),
        ("bad v2 version", {
            let mut h = v2_header("10.0.0.1:1".parse().unwrap(), "10.0.0.2:2".parse().unwrap());
            h[12] = 0x31;
            h
        }),
        ("v2 for UDP", {
            let mut h = v2_header("10.0.0.1:1".parse().unwrap(), "10.0.0.2:2".parse().unwrap());
            h[13] = 0x12;
            h
        }),
        ("v2 cut short", truncated_v2),
    ];
    for (i, (what, header)) in cases.iter().enumerate() {
        let mut stream = connect_from(client_ip(50 + i as u32), sluice.listen_addr());
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream.write_all(header).unwrap();
        if *what == "v2 cut short" {
            // Then the client gives up: sluice must not wait forever.
            stream.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "{what}: closed without a backend's answer");
    }
    let errors = |admin| {
        sample(
            &scrape(admin),
            "sluice_connection_errors_total",
            &["reason=\"proxy_header\""],
        )
    };
    wait_until("six proxy_header errors", || errors(admin) == Some(6.0));
    // A client that sends nothing at all is closed after the deadline.
    let mut silent = connect_from(client_ip(60), sluice.listen_addr());
    silent
        .set_read_timeout(Some(Duration::from_secs(8)))
        .unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(silent.read(&mut buf).unwrap(), 0);
    sluice.wait_for_log("no PROXY header within 5s");
}

#[test]
fn a_carried_address_is_passed_on_to_the_backend() {
    let (server, seen) = header_reader();
    let text = config(
        free_addr(unique_loopback()),
        &[("reader".into(), server.addr)],
        "    send_proxy: v1\n",
    )
    .replace(
        "    pool: back\n",
        "    pool: back\n    accept_proxy: true\n",
    );
    let sluice = Sluice::start(&text);
    let mut stream = connect_from(client_ip(9), sluice.listen_addr());
    stream
        .write_all(b"PROXY TCP4 203.0.113.9 192.0.2.1 40001 6379\r\nhello")
        .unwrap();
    let mut back = [0u8; 5];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello");
    assert_eq!(
        seen.recv_timeout(DEADLINE).unwrap(),
        Seen::V1("PROXY TCP4 203.0.113.9 192.0.2.1 40001 6379\r\n".into())
    );
}

/// A client whose bytes follow its PROXY header closely (a second write,
/// while sluice is still connecting to the backend): the backend still
/// gets sluice's header first, then every byte of the client's, in order.
#[test]
fn bytes_right_after_a_header_wait_behind_the_one_sent_on() {
    let (server, seen) = header_reader();
    let text = config(
        free_addr(unique_loopback()),
        &[("reader".into(), server.addr)],
        "    send_proxy: v1\n",
    )
    .replace(
        "    pool: back\n",
        "    pool: back\n    accept_proxy: true\n",
    );
    let sluice = Sluice::start(&text);
    let header = b"PROXY TCP4 203.0.113.9 192.0.2.1 40001 6379\r\n";
    for round in 0..200u32 {
        let mut stream = connect_from(client_ip(9), sluice.listen_addr());
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream.write_all(header).unwrap();
        let body: Vec<u8> = (0..3000u32).map(|i| (i * 7 + round) as u8).collect();
        for piece in body.chunks(1000) {
            stream.write_all(piece).unwrap();
        }
        let mut back = vec![0u8; body.len()];
        stream.read_exact(&mut back).unwrap();
        assert!(back == body, "round {round}: the bytes came back changed");
        assert_eq!(
            seen.recv_timeout(DEADLINE).unwrap(),
            Seen::V1(String::from_utf8(header.to_vec()).unwrap()),
            "round {round}"
        );
    }
}
