//! The PROXY protocol (versions 1 and 2, as HAProxy defines them): the
//! header an upstream balancer puts before a client's bytes to say who the
//! client is (`accept_proxy` on a listener), and the header sluice puts
//! before a client's bytes to tell a backend (`send_proxy` on a pool).
//! Parsing and encoding are the `ppp` crate's; this module reads exactly the
//! header off a socket, never a byte of what follows.

use std::future::poll_fn;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use ppp::v2::{Builder, Command, Protocol, Version};
use ppp::{v1, v2, HeaderResult, PartialResult};
use tokio::io::Ready;

use crate::config::schema::SendProxy;
use crate::net;
use crate::relay::Socket;

/// How long a client has to send its whole header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest header accepted: a version 2 header with addresses and room for
/// TLVs such as a client certificate's name (a version 1 header is at most
/// 107 bytes).
const MAX_HEADER: usize = 4096;

/// The addresses a header carries: the client's, and the one it connected
/// to. `None` for a header without addresses (v2 LOCAL, v1 UNKNOWN: a
/// health check from the upstream balancer itself).
pub type Carried = Option<(SocketAddr, SocketAddr)>;

/// Reads a PROXY header, v1 or v2, from the start of `socket`: what it
/// carries, or why it is unacceptable. The caller bounds the wait.
pub async fn read_header(socket: &Socket) -> io::Result<Carried> {
    let mut buf = vec![0u8; MAX_HEADER];
    loop {
        let mut ready = poll_fn(|cx| socket.poll_read_ready(cx)).await?;
        let seen = match net::recv(socket, &mut buf, libc::MSG_PEEK) {
            Ok(0) => return Err(malformed("the connection closed before a PROXY header")),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                ready.clear_ready_matching(Ready::READABLE);
                continue;
            }
            Err(e) => return Err(e),
        };
        let parsed = HeaderResult::parse(&buf[..seen]);
        if parsed.is_incomplete() {
            if seen == MAX_HEADER {
                return Err(malformed("a PROXY header longer than 4096 bytes"));
            }
            // All there is has been seen: wait for more.
            ready.clear_ready_matching(Ready::READABLE);
            continue;
        }
        let (length, carried) = match parsed {
            HeaderResult::V1(Ok(header)) => (header.header.len(), from_v1(header.addresses)),
            HeaderResult::V2(Ok(header))
                if header.command == Command::Proxy && header.protocol != Protocol::Stream =>
            {
                return Err(malformed("a PROXY v2 header for a protocol other than TCP"))
            }
            HeaderResult::V2(Ok(header)) => (header.len(), from_v2(&header)),
            HeaderResult::V1(Err(e)) => return Err(malformed(&format!("not a PROXY header: {e}"))),
            HeaderResult::V2(Err(e)) => {
                return Err(malformed(&format!("a bad PROXY v2 header: {e}")))
            }
        };
        // Take exactly the header; the client's own bytes stay queued.
        let taken = net::recv(socket, &mut buf[..length], 0)?;
        debug_assert_eq!(taken, length, "the header was peeked whole");
        return Ok(carried);
    }
}

/// The header that tells a backend about a connection from `client` to
/// `local`.
pub fn header(version: SendProxy, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (client, local) = same_family(client, local);
    match version {
        SendProxy::Off => Vec::new(),
        SendProxy::V1 => v1::Addresses::from((client, local))
            .to_string()
            .into_bytes(),
        SendProxy::V2 => Builder::with_addresses(
            Version::Two | Command::Proxy,
            Protocol::Stream,
            (client, local),
        )
        .build()
        .expect("a header with two addresses and no TLV always builds"),
    }
}

/// Writes `header` on a connection just made: its send buffer is empty, so
/// the header goes whole at once or not at all.
pub fn send(socket: &TcpStream, header: &[u8]) -> io::Result<()> {
    match (&mut &*socket).write(header)? {
        n if n == header.len() => Ok(()),
        _ => Err(io::Error::other(
            "the PROXY header did not fit the send buffer",
        )),
    }
}

/// A header names both addresses in one family: an IPv4 client seen through
/// an IPv6 socket is written as IPv4 when the other address can be too.
fn same_family(client: SocketAddr, local: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (c, l) = (canonical(client), canonical(local));
    if c.is_ipv4() == l.is_ipv4() {
        (c, l)
    } else {
        (client, local)
    }
}

fn from_v1(addresses: v1::Addresses) -> Carried {
    match addresses {
        v1::Addresses::Tcp4(a) => Some((
            (a.source_address, a.source_port).into(),
            (a.destination_address, a.destination_port).into(),
        )),
        v1::Addresses::Tcp6(a) => Some((
            (a.source_address, a.source_port).into(),
            (a.destination_address, a.destination_port).into(),
        )),
        v1::Addresses::Unknown => None,
    }
}

fn from_v2(header: &v2::Header) -> Carried {
    if header.command == Command::Local {
        return None;
    }
    match header.addresses {
        v2::Addresses::IPv4(a) => Some((
            (a.source_address, a.source_port).into(),
            (a.destination_address, a.destination_port).into(),
        )),
        v2::Addresses::IPv6(a) => Some((
            (a.source_address, a.source_port).into(),
            (a.destination_address, a.destination_port).into(),
        )),
        v2::Addresses::Unix(_) | v2::Addresses::Unspecified => None,
    }
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_name_the_client_and_what_it_reached() {
        let client: SocketAddr = "192.0.2.7:51000".parse().unwrap();
        let local: SocketAddr = "198.51.100.1:6379".parse().unwrap();
        assert_eq!(
            header(SendProxy::V1, client, local),
            b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 6379\r\n"
        );
        let v2 = header(SendProxy::V2, client, local);
        match HeaderResult::parse(&v2) {
            HeaderResult::V2(Ok(parsed)) => {
                assert_eq!(parsed.len(), v2.len());
                assert_eq!(from_v2(&parsed), Some((client, local)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_mapped_ipv4_client_is_written_as_ipv4() {
        let client: SocketAddr = "[::ffff:192.0.2.7]:51000".parse().unwrap();
        let local: SocketAddr = "[::ffff:198.51.100.1]:6379".parse().unwrap();
        assert_eq!(
            header(SendProxy::V1, client, local),
            b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 6379\r\n"
        );
    }
}
