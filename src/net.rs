//! Socket set-up shared by the workers: listening sockets that share a port
//! through SO_REUSEPORT, and backend connections with a deadline.
//!
//! Sockets are made with socket2 so that every option is set before the
//! socket is used. They are non-blocking and driven by readiness.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tracing::debug;

/// A connected TCP socket, non-blocking and registered with the calling
/// thread's reactor: what the relay moves bytes between.
pub type Socket = AsyncFd<TcpStream>;

/// A listening socket on `addr` that other sockets of this process (one per
/// worker) and of a second sluice process (a binary upgrade) may share; the
/// kernel spreads new connections over them.
pub fn reuseport_listener(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket =
        socket2::Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // `[::]:port` must not also claim the IPv4 port: a separate
        // `0.0.0.0:port` listener may exist.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog as i32)?;
    Ok(socket.into())
}

/// The local address of a TCP socket: where a client was accepted.
pub fn local_addr(socket: &impl AsFd) -> io::Result<SocketAddr> {
    SockRef::from(socket)
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not a TCP/IP socket"))
}

/// Connects to `addr`, giving up after `timeout` (zero: the kernel's own
/// limit), and returns the socket non-blocking and registered with the
/// calling thread's reactor. TCP_NODELAY is set: a balancer must not add
/// Nagle delays to request/response traffic.
///
/// The connect is driven by readiness rather than an io_uring op so that a
/// timed-out attempt closes its socket at once: an abandoned io_uring connect
/// would keep the descriptor until the kernel gives up on the SYN (minutes).
pub async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Socket> {
    let socket = socket2::Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_nodelay(true)?;
    let in_progress = match socket.connect(&addr.into()) {
        Ok(()) => false,
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => true,
        Err(e) => return Err(e),
    };
    let socket = watch(
        TcpStream::from(socket),
        Interest::READABLE | Interest::WRITABLE,
    )?;
    if in_progress {
        // With epoll, a connecting socket turns writable once the handshake
        // is over, however it ended; SO_ERROR says how.
        let established = async {
            socket.writable().await?.retain_ready();
            match socket.get_ref().take_error()? {
                Some(e) => Err(e),
                None => Ok(()),
            }
        };
        if timeout.is_zero() {
            established.await?;
        } else {
            tokio::time::timeout(timeout, established)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        }
    }
    Ok(socket)
}

/// Registers `socket` with the calling thread's reactor, for readiness.
pub fn watch<S: AsFd + AsRawFd>(socket: S, interest: Interest) -> io::Result<AsyncFd<S>> {
    // SAFETY: `socket` owns its descriptor (the `AsFd` bound), so the
    // descriptor stays open and the same until the `AsyncFd` lets it go.
    Ok(unsafe { AsyncFd::register_with_interest(socket, interest) }?)
}

/// Accepts one connection from a non-blocking listener: the new socket is
/// non-blocking too, with TCP_NODELAY set.
pub fn accept(listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
    let (socket, addr) =
        SockRef::from(listener).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
    let addr = addr
        .as_socket()
        .ok_or_else(|| io::Error::other("accepted a connection that is not TCP/IP"))?;
    if let Err(e) = socket.set_nodelay(true) {
        // The client is already gone; serving it will notice.
        debug!(client = %addr, "TCP_NODELAY on a new client: {e}");
    }
    Ok((socket.into(), addr))
}

/// Makes the coming close of `socket` reset the connection (RST) instead of
/// ending it cleanly (FIN), so that an error on one side of a relay reaches
/// the other side as an error, never as a clean end of stream.
pub fn abort(socket: &impl AsFd) {
    // Ignored if it fails: a socket the peer already reset has nothing left
    // to reset.
    let _ = SockRef::from(socket).set_linger(Some(Duration::ZERO));
}

/// Reads from a non-blocking socket with recv(2) `flags` (`MSG_PEEK` looks
/// without taking).
pub fn recv(socket: &impl AsRawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length.
    syscall(unsafe {
        libc::recv(
            socket.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            flags,
        )
    })
}

/// A system call's result as `io::Result`. EINTR cannot happen on the data
/// path: its calls never block, and workers run with every signal blocked.
pub fn syscall(result: isize) -> io::Result<usize> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result as usize)
    }
}
