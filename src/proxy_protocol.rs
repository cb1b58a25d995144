//! The PROXY protocol (versions 1 and 2, as HAProxy defines them): the
//! header an upstream balancer puts before a client's bytes to say who the
//! client is (`accept_proxy` on a listener), and the header sluice puts
//! before a client's bytes to tell a backend (`send_proxy` on a pool).
//! Parsing and encoding are the `ppp` crate's; this module reads exactly the
//! header off a socket, never a byte of what follows.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};

use ppp::v2::{Builder, Command, Protocol, Version};
use ppp::{v1, v2, HeaderResult, PartialResult};
use tokio::io::Ready;

use crate::config::schema::SendProxy;
use crate::net::{self, Socket};

/// Longest header accepted: a version 2 header with addresses and room for
/// TLVs such as a client certificate's name (a version 1 header is at most
/// 107 bytes).
const MAX_HEADER: usize = 4096;

/// Longest version 1 header, CRLF included (the PROXY protocol's own
/// figure).
const MAX_V1_HEADER: usize = 107;

/// The addresses a header carries: the client's, and the one it connected
/// to. `None` for a header without addresses (v2 LOCAL, v1 UNKNOWN: a
/// health check from the upstream balancer itself).
pub type Carried = Option<(SocketAddr, SocketAddr)>;

thread_local! {
    /// Where a worker peeks at headers: a connection waiting for its header
    /// holds no buffer of its own, only between readiness and the verdict
    /// on what it sent so far.
    static PEEKED: RefCell<[u8; MAX_HEADER]> = const { RefCell::new([0; MAX_HEADER]) };
}

/// Reads a PROXY header, v1 or v2, from the start of `socket`: what it
/// carries, or why it is unacceptable. The caller bounds the wait.
pub async fn read_header(socket: &Socket) -> io::Result<Carried> {
    loop {
        let mut ready = poll_fn(|cx| socket.poll_read_ready(cx)).await?;
        let read = PEEKED.with(|peeked| -> io::Result<Option<Carried>> {
            let mut buf = peeked.borrow_mut();
            let seen = match net::recv(socket, &mut buf[..], libc::MSG_PEEK) {
                Ok(0) => return Err(malformed("the connection closed before a PROXY header")),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            };
            let Some((length, carried)) = parse_header(&buf[..seen])? else {
                return Ok(None);
            };
            // Take exactly the header; the client's own bytes stay queued.
            let taken = net::recv(socket, &mut buf[..length], 0)?;
            debug_assert_eq!(taken, length, "the header was peeked whole");
            Ok(Some(carried))
        })?;
        match read {
            Some(carried) => return Ok(carried),
            // All there is has been seen: wait for more.
            None => ready.clear_ready_matching(Ready::READABLE),
        }
    }
}

/// Reads the PROXY header at the start of `bytes`: its length and what it
/// carries, `None` if `bytes` could still be the start of a header (more
/// must be read), or why it is unacceptable.
pub fn parse_header(bytes: &[u8]) -> io::Result<Option<(usize, Carried)>> {
    let parsed = HeaderResult::parse(bytes);
    if parsed.is_incomplete() || unfinished_v1(bytes) {
        if bytes.len() >= MAX_HEADER {
            return Err(malformed("a PROXY header longer than 4096 bytes"));
        }
        return Ok(None);
    }
    let (length, carried) = match parsed {
        // ppp takes whatever follows the first CR for the LF (found by
        // fuzzing: `PROXY UNKNOWN \n\r/`); a header ends with CRLF.
        HeaderResult::V1(Ok(header)) if !header.header.ends_with("\r\n") => {
            return Err(malformed("a PROXY v1 header not ended by CRLF"))
        }
        HeaderResult::V1(Ok(header)) => (header.header.len(), from_v1(header.addresses)),
        HeaderResult::V2(Ok(header))
            if header.command == Command::Proxy && header.protocol != Protocol::Stream =>
        {
            return Err(malformed("a PROXY v2 header for a protocol other than TCP"))
        }
        HeaderResult::V2(Ok(header)) => (header.len(), from_v2(&header)),
        HeaderResult::V1(Err(e)) => return Err(malformed(&format!("not a PROXY header: {e}"))),
        HeaderResult::V2(Err(e)) => return Err(malformed(&format!("a bad PROXY v2 header: {e}"))),
    };
    Ok(Some((length, carried)))
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

/// Whether `bytes` are the start of a version 1 header still to be ended
/// by its CRLF, within the longest a v1 header may be. ppp judges some
/// such starts malformed (`PROXY TCP4 A B 1234 `, cut just before the
/// destination port), which would refuse a header split over two TCP
/// segments there; until the CRLF, nothing is malformed for lack of bytes.
fn unfinished_v1(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PROXY ")
        && bytes.len() < MAX_V1_HEADER
        && !bytes.windows(2).any(|w| w == b"\r\n")
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
    use proptest::prelude::*;

    fn address() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
            (any::<[u16; 8]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        ]
    }

    /// Two addresses of one family, as a socket's two ends always are.
    fn ends() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
        (address(), address()).prop_filter("one family", |(a, b)| a.is_ipv4() == b.is_ipv4())
    }

    fn version() -> impl Strategy<Value = SendProxy> {
        prop_oneof![Just(SendProxy::V1), Just(SendProxy::V2)]
    }

    proptest! {
        #[test]
        fn a_header_reads_back_whole_and_leaves_what_follows(
            (client, local) in ends(),
            version in version(),
            tail in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let header = header(version, client, local);
            let mut bytes = header.clone();
            bytes.extend_from_slice(&tail);
            let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
            let expected = if canonical(client).is_ipv4() == canonical(local).is_ipv4() {
                (canonical(client), canonical(local))
            } else {
                (client, local)
            };
            prop_assert_eq!(parse_header(&bytes).unwrap(), Some((header.len(), Some(expected))));
        }

        #[test]
        fn a_partial_header_asks_for_more(
            (client, local) in ends(),
            version in version(),
            cut in any::<prop::sample::Index>(),
        ) {
            let header = header(version, client, local);
            let prefix = &header[..cut.index(header.len())];
            prop_assert_eq!(parse_header(prefix).unwrap(), None);
        }

        #[test]
        fn any_bytes_are_judged_without_reading_past_them(
            bytes in proptest::collection::vec(any::<u8>(), 0..MAX_HEADER + 16),
        ) {
            if let Ok(Some((length, _))) = parse_header(&bytes) {
                prop_assert!(length <= bytes.len());
            }
        }

        #[test]
        fn any_bytes_after_a_signature_are_judged(
            v2 in any::<bool>(),
            rest in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut bytes = if v2 {
                b"\r\n\r\n\0\r\nQUIT\n".to_vec()
            } else {
                b"PROXY ".to_vec()
            };
            bytes.extend_from_slice(&rest);
            if let Ok(Some((length, _))) = parse_header(&bytes) {
                prop_assert!(length <= bytes.len());
            }
        }
    }

    #[test]
    fn a_v1_header_cut_before_its_destination_port_is_incomplete() {
        // ppp alone calls this an invalid port.
        assert_eq!(
            parse_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 1234 ").unwrap(),
            None
        );
        assert_eq!(parse_header(b"PROXY TCP6 ::1 ::2 1 ").unwrap(), None);
        // Still refused at once: a line that is whole, and a line too long.
        assert!(parse_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 1234 \r\n").is_err());
        assert!(parse_header(&[b"PROXY ".as_slice(), &[b'1'; 200]].concat()).is_err());
    }

    #[test]
    fn a_v1_header_ends_with_crlf() {
        // ppp alone takes the first 17 bytes for a header (found by fuzzing).
        assert!(parse_header(b"PROXY UNKNOWN \n\r/ R [\r\n\r\n\0\"\n").is_err());
        assert_eq!(
            parse_header(b"PROXY UNKNOWN whatever\r\nbytes").unwrap(),
            Some((24, None))
        );
    }

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
