//! The two drivers of the data path, which mirror each other: each has its
//! worker loop, its accepts, its connection (a
//! [`Session`](crate::connection::session::Session) fed with what its
//! sockets say) and its way of moving bytes.
//!
//! - [`uring`]: the default. The worker drives its own io_uring ring,
//!   completion by completion: about one system call per loop turn for all
//!   its connections.
//! - [`epoll`]: where io_uring cannot be used. Readiness through a tokio
//!   runtime's reactor, then plain system calls; a task per connection.
//!
//! What a connection is let do, and what its ending means, is
//! [`crate::connection`]'s, written once; when to accept and when to stop
//! is [`crate::connection::accepting`]'s. The drivers own the sockets and
//! how bytes move.

pub mod epoll;
pub mod uring;
