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

/// A connected TCP socket, non-blocking and registered with the calling
/// thread's reactor: what the relay moves bytes between.
pub type Socket = AsyncFd<TcpStream>;

/// A listening socket on `addr` that other sockets of this process (one per
/// worker) and of a second sluice process (a binary upgrade) may share; the
/// kernel spreads new connections over them.
///
/// The options every relayed socket needs ([`relay_options`]) are set on
/// the listening socket: the sockets it accepts inherit them, at no system
/// call per connection.
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
    relay_options(&socket)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog as i32)?;
    Ok(socket.into())
}

/// What every socket sluice relays between needs, client or backend:
///
/// - `TCP_NODELAY`: a balancer must not add Nagle delays to
///   request/response traffic (a reply in two writes would wait for the
///   peer's delayed ACK, about 40 ms);
/// - `SO_OOBINLINE`: a TCP urgent byte (`MSG_OOB`) is a byte of the stream
///   like any other, so that it is relayed in its place instead of being
///   dropped;
/// - `TCP_INQ`: a read says how many bytes wait after it ([`recv`]), so
///   that a short read is known to have emptied the socket, or not (TCP
///   stops a read at an urgent byte's mark).
///
/// The io_uring driver sets the first two on backend sockets in its ring
/// (its receives learn what waits from the kernel on their own).
pub fn relay_options(socket: &impl AsFd) -> io::Result<()> {
    let socket = SockRef::from(socket);
    socket.set_nodelay(true)?;
    socket.set_out_of_band_inline(true)?;
    let one: libc::c_int = 1;
    // SAFETY: a plain int option on a socket we hold.
    syscall(unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INQ,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } as isize)
    .map(drop)
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
/// calling thread's reactor, with the [`relay_options`] set.
///
/// With it, the error that already ended the connection if the backend
/// reset it as soon as it had accepted it: a socket reports a failure
/// once, here to the connect, and a connect that was accepted succeeded
/// (a refusal is `ECONNREFUSED`), so the relay must hear of it from here.
///
/// The connect is driven by readiness rather than an io_uring op so that a
/// timed-out attempt closes its socket at once: an abandoned io_uring connect
/// would keep the descriptor until the kernel gives up on the SYN (minutes).
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<(Socket, Option<io::Error>)> {
    let socket = socket2::Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    relay_options(&socket)?;
    let in_progress = match socket.connect(&addr.into()) {
        Ok(()) => false,
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => true,
        Err(e) => return Err(e),
    };
    let socket = watch(
        TcpStream::from(socket),
        Interest::READABLE | Interest::WRITABLE,
    )?;
    if !in_progress {
        return Ok((socket, None));
    }
    // With epoll, a connecting socket turns writable once the handshake is
    // over, however it ended; SO_ERROR says how.
    let established = async {
        socket.writable().await?.retain_ready();
        match socket.get_ref().take_error()? {
            Some(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(Some(e)),
            Some(e) => Err(e),
            None => Ok(None),
        }
    };
    let reset = if timeout.is_zero() {
        established.await?
    } else {
        tokio::time::timeout(timeout, established)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??
    };
    Ok((socket, reset))
}

/// Registers `socket` with the calling thread's reactor, for readiness.
pub fn watch<S: AsFd + AsRawFd>(socket: S, interest: Interest) -> io::Result<AsyncFd<S>> {
    // SAFETY: `socket` owns its descriptor (the `AsFd` bound), so the
    // descriptor stays open and the same until the `AsyncFd` lets it go.
    Ok(unsafe { AsyncFd::register_with_interest(socket, interest) }?)
}

/// Accepts one connection from a non-blocking listener: the new socket is
/// non-blocking too, and has the listener's [`relay_options`].
pub fn accept(listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
    let (socket, addr) =
        SockRef::from(listener).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
    let addr = addr
        .as_socket()
        .ok_or_else(|| io::Error::other("accepted a connection that is not TCP/IP"))?;
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

/// Whether the next byte to read from `socket` is TCP urgent data
/// (`SIOCATMARK`).
pub fn at_urgent_mark(socket: &impl AsRawFd) -> io::Result<bool> {
    /// From the kernel's `asm-generic/sockios.h`.
    const SIOCATMARK: libc::c_ulong = 0x8905;
    let mut at_mark: libc::c_int = 0;
    // SAFETY: SIOCATMARK writes one int.
    syscall(unsafe { libc::ioctl(socket.as_raw_fd(), SIOCATMARK, &mut at_mark) } as isize)?;
    Ok(at_mark != 0)
}

/// Bytes waiting to be read from `socket` (`FIONREAD`).
pub fn queued(socket: &impl AsRawFd) -> io::Result<usize> {
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    syscall(unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &mut queued) } as isize)?;
    Ok(queued as usize)
}

/// Bytes `socket` has taken and not sent yet (`SIOCOUTQNSD`): what a
/// reset would discard.
pub fn unsent(socket: &impl AsRawFd) -> io::Result<usize> {
    let mut unsent: libc::c_int = 0;
    // SAFETY: SIOCOUTQNSD writes one int.
    syscall(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCOUTQNSD, &mut unsent) } as isize)?;
    Ok(unsent as usize)
}

/// Where a socket stands in sending what it took: what a flush waits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sending {
    /// Every byte it took has been sent.
    Done,
    /// The connection is gone (reset): what it holds will never leave.
    Gone,
    /// Bytes wait. Not `shut`: it polls writable once they are sent
    /// (under [`writable_once_sent`]), and has been asked (poll(2)) so
    /// that it wakes its waiters then: the kernel only does so for a socket
    /// found not writable by a poll or a send. `shut`: its writing side is
    /// shut down, so it polls writable all the time: ask again later.
    Waiting { shut: bool },
}

/// Where `socket` stands in sending what it took (see [`Sending`]).
pub fn sending(socket: &impl AsRawFd) -> io::Result<Sending> {
    if unsent(socket)? == 0 {
        return Ok(Sending::Done);
    }
    // A reset leaves the count of unsent bytes as it was: the state tells.
    const TCP_CLOSE: u8 = 7;
    // SAFETY: an all-zero tcp_info is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: TCP_INFO writes at most `len` bytes into `info`.
    syscall(unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    } as isize)?;
    if info.tcpi_state == TCP_CLOSE {
        return Ok(Sending::Gone);
    }
    let mut entry = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one pollfd, not waiting.
    syscall(unsafe { libc::poll(&mut entry, 1, 0) } as isize)?;
    // Writable with bytes unsent, under a low-water mark of one: shut.
    Ok(Sending::Waiting {
        shut: entry.revents & libc::POLLOUT != 0,
    })
}

/// Makes `socket` poll writable only once it has sent every byte it took
/// (`TCP_NOTSENT_LOWAT` of 1), so that a wait for writability is a wait
/// for [`unsent`] to reach 0.
pub fn writable_once_sent(socket: &impl AsRawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a plain int option on a socket we hold.
    syscall(unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } as isize)
    .map(drop)
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

/// Reads from a non-blocking socket, and says how many bytes wait after
/// what it read, where the socket has `TCP_INQ` ([`relay_options`]) and
/// the kernel tells.
pub fn recv_and_left(socket: &impl AsRawFd, buf: &mut [u8]) -> io::Result<(usize, Option<usize>)> {
    let mut vector = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Room for one control message of one int, aligned.
    let mut control = [0u64; 4];
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive
    // the call.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut vector;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: the message describes live buffers.
    let n = syscall(unsafe { libc::recvmsg(socket.as_raw_fd(), &mut message, 0) })?;
    let mut left = None;
    // SAFETY: the kernel filled `msg_controllen` bytes of `control` with
    // well-formed control messages; the macros stay within them.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_TCP && (*header).cmsg_type == libc::TCP_CM_INQ {
                let waiting =
                    std::ptr::read_unaligned(libc::CMSG_DATA(header).cast::<libc::c_int>());
                left = usize::try_from(waiting).ok();
            }
            header = libc::CMSG_NXTHDR(&message, header);
        }
    }
    Ok((n, left))
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

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::task::{Context, Waker};

    use super::*;

    /// Where a socket stands in sending: bytes waiting behind a peer that
    /// does not read; the same with its writing side shut down (it polls
    /// writable then, which says nothing); the peer reset (the count of
    /// unsent bytes stays, the state tells).
    #[test]
    fn a_socket_says_whether_it_has_sent_everything() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let sender = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (peer, _) = listener.accept().unwrap();
        assert_eq!(sending(&sender).unwrap(), Sending::Done);
        writable_once_sent(&sender).unwrap();
        sender.set_nonblocking(true).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while std::io::Write::write(&mut &sender, &chunk).is_ok() {}
        assert!(unsent(&sender).unwrap() > 0);
        assert_eq!(sending(&sender).unwrap(), Sending::Waiting { shut: false });
        sender.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(sending(&sender).unwrap(), Sending::Waiting { shut: true });
        abort(&peer);
        drop(peer);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while sending(&sender).unwrap() != Sending::Gone {
            assert!(
                std::time::Instant::now() < deadline,
                "the reset never showed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A backend that resets the connection as it accepts it: the connect
    /// succeeded, and the reset (which the socket reports once, here to
    /// the connect) comes with the socket, not as a failed connect.
    #[test]
    fn a_connect_reset_at_once_is_a_connect_and_its_reset() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.block_on(async {
            let mut connect = std::pin::pin!(connect(addr, Duration::from_secs(5)));
            // The SYN goes out; the handshake ends in the kernel.
            let mut cx = Context::from_waker(Waker::noop());
            assert!(connect.as_mut().poll(&mut cx).is_pending());
            let (accepted, _) = listener.accept().unwrap();
            abort(&accepted);
            drop(accepted);
            let (socket, reset) = connect.await.expect("the connect succeeded");
            let reset = reset.expect("and was reset");
            assert_eq!(reset.kind(), io::ErrorKind::ConnectionReset);
            drop(socket);
        });
    }
}
