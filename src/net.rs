//! Socket set-up shared by the workers: listening sockets that share a port
//! through SO_REUSEPORT, and backend connections with a deadline.
//!
//! Sockets are made with socket2 so that every option is set before the
//! socket is used, then handed to tokio-uring, which does the I/O.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A listening socket on `addr` that other sockets of this process (one per
/// worker) and of a second sluice process (a binary upgrade) may share; the
/// kernel spreads new connections over them.
pub fn reuseport_listener(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // `[::]:port` must not also claim the IPv4 port: a separate
        // `0.0.0.0:port` listener may exist.
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(backlog as i32)?;
    Ok(socket.into())
}

/// Connects to `addr`, giving up after `timeout` (zero: the kernel's own
/// limit). TCP_NODELAY is set: a balancer must not add Nagle delays to
/// request/response traffic.
///
/// The connect is driven by readiness rather than an io_uring op so that a
/// timed-out attempt closes its socket at once: an abandoned io_uring connect
/// would keep the descriptor until the kernel gives up on the SYN (minutes).
pub async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<std::net::TcpStream> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EINPROGRESS as i32) => {
            // SAFETY: the AsyncFd owns `socket`, whose descriptor stays open
            // and unchanged until `into_inner` below or the drop on timeout.
            let pending = unsafe { AsyncFd::register_with_interest(socket, Interest::WRITABLE) }?;
            let established = async {
                loop {
                    let mut ready = pending.writable().await?;
                    if let Some(e) = pending.get_ref().take_error()? {
                        return Err(e);
                    }
                    // Writable with no error can still be spurious: check
                    // that the handshake completed.
                    match pending.get_ref().peer_addr() {
                        Ok(_) => return Ok(()),
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => ready.clear_ready(),
                        Err(e) => return Err(e),
                    }
                }
            };
            if timeout.is_zero() {
                established.await?;
            } else {
                tokio::time::timeout(timeout, established)
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
            }
            let socket = pending.into_inner();
            socket.set_nonblocking(false)?;
            return Ok(socket.into());
        }
        Err(e) => return Err(e),
    }
    socket.set_nonblocking(false)?;
    Ok(socket.into())
}

/// Resets the connection of `socket` now, and wakes any io_uring operation
/// pending on it, so that an error on one side of a relay reaches the other
/// side as an error (RST), never as a clean end of stream.
///
/// `connect()` with `AF_UNSPEC` disconnects a TCP socket the way a close with
/// a zero linger does (RST), but at once: a close would wait until every
/// pending io_uring operation on the descriptor completed, and tokio-uring
/// cannot cancel them.
pub fn abort(socket: &impl AsRawFd) {
    let unspec = libc::sockaddr {
        sa_family: libc::AF_UNSPEC as libc::sa_family_t,
        sa_data: [0; 14],
    };
    // SAFETY: `unspec` is a valid sockaddr of the length given, and the
    // descriptor stays open while `socket` is borrowed. The result is
    // ignored: a socket the peer already reset has nothing left to reset.
    unsafe {
        libc::connect(
            socket.as_raw_fd(),
            &unspec,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        );
    }
}
