//! The HTTP probe: one HTTP/1.1 request, judged by the status of its
//! answer. What Patroni's REST API (`GET /primary`: 200 on the leader, 503
//! elsewhere) and Galera's clustercheck answer.
//!
//! Only the head is read, at most [`MAX_HEAD_BYTES`]; the body is never
//! waited for.

use std::net::SocketAddr;

use super::wire::Wire;
use super::{unexpected, ProbeFailure};
use crate::config::schema::HttpProbe;

/// Longest response head a probe reads.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Headers a probe looks through for the end of the head.
const MAX_HEADERS: usize = 64;

pub(super) async fn check(
    mut wire: Wire,
    http: &HttpProbe,
    addr: SocketAddr,
) -> Result<(), ProbeFailure> {
    wire.send(request(http, addr).as_bytes()).await?;
    loop {
        if let Some(status) = status(&wire.read)? {
            return judge(status, http);
        }
        if wire.read.len() >= MAX_HEAD_BYTES {
            return Err(unexpected(&wire.read));
        }
        wire.fill().await?;
    }
}

fn request(http: &HttpProbe, addr: SocketAddr) -> String {
    let host = match http.host.as_str() {
        "" => addr.to_string(),
        host => host.to_owned(),
    };
    format!(
        "{} {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sluice-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        http.method, http.path
    )
}

/// The status of the response head in `read`, once the whole head is there.
fn status(read: &[u8]) -> Result<Option<(u16, String)>, ProbeFailure> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(read) {
        Ok(httparse::Status::Complete(_)) => Ok(Some((
            response.code.expect("a complete head has a status"),
            response.reason.unwrap_or_default().to_owned(),
        ))),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(unexpected(read)),
    }
}

fn judge((code, reason): (u16, String), http: &HttpProbe) -> Result<(), ProbeFailure> {
    if http.expect_status.contains(&code) {
        return Ok(());
    }
    Err(ProbeFailure::Refused(match reason.as_str() {
        "" => format!("HTTP {code}"),
        reason => format!("HTTP {code} {reason}"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe() -> HttpProbe {
        HttpProbe {
            path: "/primary".into(),
            method: "GET".into(),
            expect_status: vec![200],
            host: String::new(),
        }
    }

    #[test]
    fn the_request_names_the_host_probed_unless_told_otherwise() {
        let addr = "10.0.0.1:8008".parse().unwrap();
        assert_eq!(
            request(&probe(), addr),
            "GET /primary HTTP/1.1\r\nHost: 10.0.0.1:8008\r\nUser-Agent: sluice-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        let named = HttpProbe {
            host: "db.internal".into(),
            method: "OPTIONS".into(),
            ..probe()
        };
        assert!(
            request(&named, addr).starts_with("OPTIONS /primary HTTP/1.1\r\nHost: db.internal\r\n")
        );
    }

    #[test]
    fn a_head_is_judged_only_once_whole() {
        let head =
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\r\n{\"role\"";
        let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        for cut in 0..end {
            assert_eq!(status(&head[..cut]).unwrap(), None, "{cut}");
        }
        let whole = status(&head[..end]).unwrap().unwrap();
        assert_eq!(
            judge(whole, &probe()),
            Err(ProbeFailure::Refused("HTTP 503 Service Unavailable".into()))
        );
        assert_eq!(judge((200, "OK".into()), &probe()), Ok(()));
        assert!(status(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").is_err());
    }
}
