//! The epoll driver: a tokio runtime on the worker's thread, whose reactor
//! is epoll; an accept loop per listener ([`accept`]) and a task per
//! connection ([`conn`]), moving bytes with plain system calls once a
//! socket is ready ([`pump`]).

mod accept;
mod conn;
mod pump;

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::mpsc;

use tokio::io::Interest;
use tracing::error;

use crate::mailbox::{BoundListener, Command, Inbox};
use crate::net;
use crate::shared::Shared;
use accept::accept_loop;

/// Runs a worker on the calling thread: a tokio runtime whose reactor is
/// epoll, an accept loop per listener and a task per connection. Says on
/// `started` when it is accepting; returns only if it could not start.
pub fn run(
    listeners: Vec<BoundListener>,
    inbox: Inbox,
    shared: &'static Shared,
    started: mpsc::Sender<io::Result<()>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = started.send(Err(io::Error::new(
                e.kind(),
                format!("cannot create the worker's runtime: {e}"),
            )));
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        for listener in listeners {
            tokio::task::spawn_local(accept_loop(listener, shared));
        }
        let wake = match net::watch(Wake(inbox.fd()), Interest::READABLE) {
            Ok(wake) => wake,
            Err(e) => {
                let _ = started.send(Err(e));
                return;
            }
        };
        let _ = started.send(Ok(()));
        let mut inbox = inbox;
        loop {
            match wake.readable().await {
                Ok(mut ready) => {
                    let mut count = [0u8; 8];
                    // SAFETY: reads 8 bytes into a live buffer.
                    let read = unsafe { libc::read(inbox.fd(), count.as_mut_ptr().cast(), 8) };
                    if read < 0 {
                        ready.clear_ready();
                    }
                }
                Err(e) => {
                    error!("cannot wait for the control plane: {e}");
                    return std::future::pending().await;
                }
            }
            while let Some(command) = inbox.take() {
                match command {
                    Command::Listen(listener) => {
                        tokio::task::spawn_local(accept_loop(listener, shared));
                    }
                    Command::CloseAll => conn::close_all(),
                    Command::CloseBackends(backends) => conn::close_backends(&backends),
                    Command::Dispatch => conn::dispatch(),
                }
            }
        }
    });
}

/// The inbox's eventfd, watched without being owned (the inbox owns it).
struct Wake(RawFd);

impl AsRawFd for Wake {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

impl AsFd for Wake {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the inbox keeps the descriptor open for the worker's life.
        unsafe { BorrowedFd::borrow_raw(self.0) }
    }
}
