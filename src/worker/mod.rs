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
//! close what is left at the end of a drain, arrive through a
//! [`Mailbox`](crate::mailbox::Mailbox); a listener is removed by shutting
//! its socket down, which ends its accepts.

mod epoll;

use std::io;
use std::sync::mpsc;
use std::thread::JoinHandle;

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use tracing::warn;

use crate::config::Io;
use crate::mailbox::{BoundListener, Inbox};
use crate::shared::Shared;
use crate::uring;

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
