//! Worker threads: one per core, each with its own SO_REUSEPORT socket for
//! every listener, so the kernel spreads new connections over the workers
//! and nothing is handed between threads.
//!
//! A worker runs one of two drivers, chosen once at start for all of them
//! (`io` in the configuration):
//!
//! - **io_uring** ([`crate::uring`]): the worker drives its own ring,
//!   completion by completion; about one system call per loop turn for all
//!   its connections.
//! - **epoll** ([`epoll`]): readiness through a tokio-uring runtime's
//!   reactor, then plain system calls. Where io_uring cannot be used: a
//!   kernel without it or without a feature it needs, `io_uring_disabled`,
//!   or a seccomp profile that blocks it (Docker's default one does).
//!
//! Both apply the same connection rules ([`crate::connection`]). The only
//! state shared between workers is the routing
//! [`Snapshot`](crate::snapshot::Snapshot), read without a lock, and a few
//! counters ([`Shared`]). Listeners added by a reload, and the order to
//! close what is left at the end of a drain, arrive through a [`Mailbox`];
//! a listener is removed by shutting its socket down, which ends its
//! accepts.

mod epoll;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use tokio::sync::Notify;
use tracing::warn;

use crate::config::Io;
use crate::net;
use crate::shared::Shared;
use crate::uring;

/// What the control plane asks of a running worker.
pub enum Command {
    /// Start accepting on a listener a reload added.
    Listen(BoundListener),
    /// `shutdown_timeout` is over: close every connection still open.
    CloseAll,
}

/// A listening socket bound for one worker.
pub struct BoundListener {
    /// The address it listens on: the key of its route in the snapshot.
    pub addr: SocketAddr,
    pub socket: TcpListener,
    /// Shared by the listener's sockets on every worker: set when the
    /// control plane stops the listener.
    pub stop: Arc<Stop>,
}

/// Tells a listener's accept loops that it is stopped. The control plane
/// also shuts the sockets down, which ends a pending accept; this reaches
/// a worker that waits for room under the descriptor capacity.
#[derive(Default)]
pub struct Stop {
    stopped: AtomicBool,
    told: Notify,
}

impl Stop {
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.told.notify_waiters();
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Returns once the listener is stopped.
    async fn wait(&self) {
        loop {
            let told = self.told.notified();
            let mut told = std::pin::pin!(told);
            told.as_mut().enable();
            if self.is_stopped() {
                return;
            }
            told.await;
        }
    }
}

/// The control plane's end of a worker's commands: a queue, and an eventfd
/// that wakes the worker (its ring reads it, or its reactor watches it).
pub struct Mailbox {
    commands: Sender<Command>,
    wake: Arc<OwnedFd>,
}

/// The worker's end.
pub struct Inbox {
    commands: Receiver<Command>,
    wake: Arc<OwnedFd>,
}

/// A worker's mailbox and inbox.
pub fn mailbox() -> io::Result<(Mailbox, Inbox)> {
    // SAFETY: eventfd makes a new descriptor, owned below.
    let fd =
        net::syscall(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) } as isize)?;
    // SAFETY: eventfd succeeded: the descriptor is open and ours.
    let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    let (commands, received) = mpsc::channel();
    Ok((
        Mailbox {
            commands,
            wake: wake.clone(),
        },
        Inbox {
            commands: received,
            wake,
        },
    ))
}

impl Mailbox {
    /// Queues `command` and wakes the worker; nothing if it is gone (the
    /// process is exiting).
    pub fn send(&self, command: Command) {
        if self.commands.send(command).is_err() {
            return;
        }
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer. A full counter
        // (EAGAIN) still wakes the worker.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

impl Inbox {
    /// The eventfd to wait on.
    pub fn fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// The next command, if any is queued.
    pub fn take(&mut self) -> Option<Command> {
        self.commands.try_recv().ok()
    }
}

/// The driver every worker runs, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Uring,
    Epoll,
}

impl Driver {
    /// Picks the driver for `io`: `auto` tries io_uring and falls back to
    /// epoll, saying why; `io_uring` insists (an error if it cannot run).
    pub fn choose(io: Io) -> Result<(Driver, String), String> {
        match io {
            Io::Epoll => Ok((Driver::Epoll, "io: epoll in the configuration".into())),
            Io::IoUring => match uring::probe() {
                Ok(()) => Ok((Driver::Uring, "io: io_uring in the configuration".into())),
                Err(why) => Err(format!("io: io_uring, but {why}")),
            },
            Io::Auto => Ok(match uring::probe() {
                Ok(()) => (Driver::Uring, "io_uring works here".into()),
                Err(why) => (Driver::Epoll, format!("io_uring cannot be used: {why}")),
            }),
        }
    }

    /// As the `io` label of `sluice_build_info` says it.
    pub fn name(self) -> &'static str {
        match self {
            Driver::Uring => "io_uring",
            Driver::Epoll => "epoll",
        }
    }
}

/// Starts worker `id` with `driver` on its own thread, pinned to `cpu` if
/// given, and returns once the worker is accepting on all its listeners,
/// or with the error that kept it from starting.
pub fn spawn(
    id: usize,
    driver: Driver,
    listeners: Vec<BoundListener>,
    inbox: Inbox,
    shared: &'static Shared,
    cpu: Option<usize>,
) -> io::Result<JoinHandle<()>> {
    let (started, outcome) = mpsc::channel::<io::Result<()>>();
    let handle = std::thread::Builder::new()
        .name(format!("sluice-worker-{id}"))
        .spawn(move || {
            crate::pipe::keep_pipes(shared.pipes_per_worker);
            if let Some(cpu) = cpu {
                if let Err(e) = pin_to(cpu) {
                    warn!(worker = id, cpu, "cannot pin worker to its core: {e}");
                }
            }
            match driver {
                Driver::Uring => match uring::Worker::new(inbox, shared) {
                    Ok(worker) => {
                        let _ = started.send(Ok(()));
                        worker.run(listeners)
                    }
                    Err(e) => {
                        let _ = started.send(Err(io::Error::new(
                            e.kind(),
                            format!("cannot set up the worker's io_uring: {e}"),
                        )));
                    }
                },
                Driver::Epoll => epoll::run(listeners, inbox, shared, started),
            }
        })?;
    match outcome.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::other("the worker thread ended while starting")),
    }
}

/// The CPUs this process may run on, in order: worker `i` is pinned to the
/// `i`-th (wrapping around when there are more workers than CPUs).
pub fn allowed_cpus() -> Vec<usize> {
    let Ok(set) = sched_getaffinity(Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect()
}

fn pin_to(cpu: usize) -> nix::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    // Pid 0: the calling thread.
    sched_setaffinity(Pid::from_raw(0), &set)
}

/// Runs `work` to completion on the calling thread, with `spawn_local`
/// available: on a tokio-uring runtime, or on a plain tokio one where
/// io_uring cannot be used (the control plane's runtime).
pub fn block_on_local<F: std::future::Future>(work: F) -> F::Output {
    match tokio_uring::Runtime::new(&tokio_uring::builder()) {
        Ok(runtime) => runtime.block_on(work),
        Err(_) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime needs only an epoll descriptor");
            tokio::task::LocalSet::new().block_on(&runtime, work)
        }
    }
}
