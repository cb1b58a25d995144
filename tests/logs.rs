//! Logs: JSON is one object per line; with `log.connections` every closed
//! connection gets one line with its listener, client, backend, bytes,
//! duration and why it closed; under journald no timestamps of our own.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use serde_json::Value;

use common::*;

/// sluice in front of `server`, logging every connection in `format`.
fn sluice_with(format: &str, server: &TestServer) -> Sluice {
    let text = format!(
        "log:\n  format: {format}\n  connections: true\n{}",
        config(
            free_addr(unique_loopback()),
            &[("b".into(), server.addr)],
            ""
        )
    );
    Sluice::start(&text)
}

#[test]
fn json_logs_are_one_object_per_line_with_connection_fields() {
    let server = TestServer::start(|mut stream| echo(&mut stream));
    let sluice = sluice_with("json", &server);
    let mut client = connect_from(client_ip(1), sluice.listen_addr());
    client.write_all(b"0123456789").unwrap();
    let mut echo = [0u8; 10];
    client.read_exact(&mut echo).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(client.read(&mut echo).unwrap(), 0);

    let line = sluice.wait_for_log("connection closed");
    for line in sluice.log_lines() {
        let parsed: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(parsed.is_object(), "{line}");
        assert!(parsed["timestamp"].is_string(), "{line}");
    }
    let fields = serde_json::from_str::<Value>(&line).unwrap()["fields"].clone();
    assert_eq!(fields["listener"], "front");
    assert_eq!(fields["backend"], "b");
    assert!(fields["client"]
        .as_str()
        .unwrap()
        .starts_with(&format!("{}:", client_ip(1))));
    assert_eq!(fields["to_backend"], 10);
    assert_eq!(fields["to_client"], 10);
    assert!(fields["duration_ms"].is_u64());
    assert_eq!(fields["close"], "client FIN");
}

#[test]
fn close_reasons_say_who_ended_the_connection() {
    let greeter = TestServer::start(|mut stream| {
        stream.write_all(b"bye").unwrap();
    });
    let sluice = sluice_with("text", &greeter);
    let mut client = connect_from(client_ip(2), sluice.listen_addr());
    let mut reply = String::new();
    client.read_to_string(&mut reply).unwrap();
    drop(client);
    let line = sluice.wait_for_log("connection closed");
    assert!(
        line.contains(r#"close="backend FIN""#) && line.contains("to_client=3"),
        "{line}"
    );

    let resetter = TestServer::start(|stream| {
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        let mut buf = [0u8; 1];
        let _ = (&stream).read(&mut buf);
    });
    let sluice = sluice_with("text", &resetter);
    let mut client = connect_from(client_ip(3), sluice.listen_addr());
    client.write_all(b"x").unwrap();
    let mut buf = [0u8; 1];
    let _ = client.read(&mut buf);
    let line = sluice.wait_for_log("connection closed");
    assert!(line.contains(r#"close="backend reset""#), "{line}");

    let dead = [("dead".to_owned(), free_addr(unique_loopback()))];
    let sluice = Sluice::start(&format!(
        "log:\n  connections: true\n{}",
        config(free_addr(unique_loopback()), &dead, "")
    ));
    let mut client = connect_from(client_ip(4), sluice.listen_addr());
    let _ = client.read(&mut buf);
    let line = sluice.wait_for_log("connection closed");
    assert!(
        line.contains(r#"close="no backend""#) && line.contains("backend=\"-\""),
        "{line}"
    );
}

#[test]
fn without_log_connections_there_is_no_connection_line() {
    let server = TestServer::start(|mut stream| echo(&mut stream));
    let sluice = Sluice::start(&config(
        free_addr(unique_loopback()),
        &[("b".into(), server.addr)],
        "",
    ));
    let mut client = connect_from(client_ip(5), sluice.listen_addr());
    client.write_all(b"x").unwrap();
    let mut buf = [0u8; 1];
    client.read_exact(&mut buf).unwrap();
    drop(client);
    // A reload is an event that comes after the close in the log.
    assert!(sluice
        .reload(&std::fs::read_to_string(sluice.config_path()).unwrap())
        .contains("reloaded"));
    assert_eq!(sluice.log_count("connection closed"), 0);
}

#[test]
fn under_journald_lines_have_no_timestamp() {
    let server = TestServer::start(|mut stream| echo(&mut stream));
    let text = config(
        free_addr(unique_loopback()),
        &[("b".into(), server.addr)],
        "",
    );
    let sluice = Sluice::spawn_with_env(&text, &[("JOURNAL_STREAM", "8:12345")]);
    let line = sluice.wait_for_log("sluice is ready");
    assert!(
        line.starts_with(" INFO sluice is ready") || line.starts_with("INFO sluice is ready"),
        "{line:?}"
    );
}
