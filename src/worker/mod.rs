//! Worker threads: one per core, each with its own SO_REUSEPORT socket for
//! every listener, so the kernel spreads new connections over the workers
//! and nothing is handed between threads.
//!
//! A worker runs one of two drivers ([`crate::driver`]), chosen once at
//! start for all of them (`io` in the configuration):
//!
//! - **io_uring** ([`uring`]): the worker drives its own ring, completion
//!   by completion; about one system call per loop turn for all its
//!   connections.
//! - **epoll** ([`epoll`]): readiness through a plain tokio runtime's
//!   reactor, then plain system calls. Where io_uring cannot be used: a
//!   kernel without it or without a feature it needs, `io_uring_disabled`,
//!   or a seccomp profile that blocks it (Docker's default one does).
//!
//! Under `io: auto`, a worker whose ring cannot be set up after all (the
//! first one could: memory is short, say) runs on epoll, saying why,
//! rather than fail a start whose first workers may already serve clients.
//!
//! Both apply the same connection rules ([`crate::connection`]). The only
//! state shared between workers is the routing
//! [`Snapshot`](crate::snapshot::Snapshot), read without a lock, and a few
//! counters ([`Shared`]). Listeners added by a reload, and the order to
//! close what is left at the end of a drain, arrive through a
//! [`Mailbox`](crate::mailbox::Mailbox); a listener is removed by shutting
//! its socket down, which ends its accepts.

use std::io;
use std::sync::mpsc;
use std::thread::JoinHandle;

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use tracing::warn;

use crate::config::Io;
use crate::driver::{epoll, uring};
use crate::mailbox::{BoundListener, Inbox};
use crate::shared::Shared;

/// Why the workers cannot start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// `io: io_uring` where io_uring cannot run (what the probe found).
    #[error("io: io_uring, but {0}")]
    IoUringRefused(String),
    #[error("cannot start worker {id}: {source}")]
    Start { id: usize, source: io::Error },
}

/// The driver every worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// `or_epoll`: a worker whose ring cannot be set up runs on epoll
    /// (`io: auto`) instead of failing the start (`io: io_uring`).
    Uring {
        or_epoll: bool,
    },
    Epoll,
}

impl Driver {
    /// Picks the driver for `io`: `auto` tries io_uring and falls back to
    /// epoll, saying why; `io_uring` insists (an error if it cannot run).
    pub fn choose(io: Io) -> Result<(Driver, String), WorkerError> {
        match io {
            Io::Epoll => Ok((Driver::Epoll, "io: epoll in the configuration".into())),
            Io::IoUring => match uring::probe() {
                Ok(()) => Ok((
                    Driver::Uring { or_epoll: false },
                    "io: io_uring in the configuration".into(),
                )),
                Err(why) => Err(WorkerError::IoUringRefused(why)),
            },
            Io::Auto => Ok(match uring::probe() {
                Ok(()) => (
                    Driver::Uring { or_epoll: true },
                    "io_uring works here".into(),
                ),
                Err(why) => (Driver::Epoll, format!("io_uring cannot be used: {why}")),
            }),
        }
    }

    /// As the `io` label of `sluice_build_info` says it.
    pub fn name(self) -> &'static str {
        match self {
            Driver::Uring { .. } => "io_uring",
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
            let worker = Worker {
                id,
                listeners,
                inbox,
                shared,
                started,
            };
            worker.run(driver, uring::Ring::new);
        })?;
    match outcome.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::other("the worker thread ended while starting")),
    }
}

/// A worker thread's start.
struct Worker {
    id: usize,
    listeners: Vec<BoundListener>,
    inbox: Inbox,
    shared: &'static Shared,
    /// Told once the worker accepts, or why it could not start.
    started: mpsc::Sender<io::Result<()>>,
}

impl Worker {
    /// Runs the worker on `driver`, its ring from `ring` on io_uring;
    /// returns only if it could not start.
    fn run(self, driver: Driver, ring: impl FnOnce() -> io::Result<uring::Ring>) {
        let Worker {
            id,
            listeners,
            inbox,
            shared,
            started,
        } = self;
        let Driver::Uring { or_epoll } = driver else {
            return epoll::run(listeners, inbox, shared, started);
        };
        match ring() {
            Ok(ring) => {
                let _ = started.send(Ok(()));
                uring::Worker::new(ring, inbox, shared).run(listeners)
            }
            Err(e) if or_epoll => {
                warn!(
                    worker = id,
                    "cannot set up the worker's io_uring, so it runs on epoll: {e}"
                );
                epoll::run(listeners, inbox, shared, started)
            }
            Err(e) => {
                let _ = started.send(Err(io::Error::new(
                    e.kind(),
                    format!("cannot set up the worker's io_uring: {e}"),
                )));
            }
        }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::connection::fixtures::shared;
    use crate::{mailbox, net};

    /// Starts a worker with one listener, on `driver`, whose ring cannot
    /// be set up: what its start says, and the process's shared state.
    fn start_without_a_ring(driver: Driver) -> (io::Result<()>, &'static Shared) {
        let (shared, _events) = shared(
            "listeners:\n  l: { listen: 127.0.0.1:7000, pool: p }\npools:\n  p:\n    backends: [{ address: 10.0.0.1:1 }]\n",
        );
        let addr = "127.0.0.1:0".parse().unwrap();
        let listener = BoundListener {
            addr,
            socket: net::reuseport_listener(addr, 16).unwrap(),
            stop: Arc::default(),
        };
        let (_mailbox, inbox) = mailbox::mailbox().unwrap();
        let (started, outcome) = mpsc::channel();
        let worker = Worker {
            id: 1,
            listeners: vec![listener],
            inbox,
            shared,
            started,
        };
        let refused = || Err(io::Error::from_raw_os_error(libc::EPERM));
        std::thread::spawn(move || worker.run(driver, refused));
        let outcome = outcome.recv_timeout(Duration::from_secs(20)).unwrap();
        (outcome, shared)
    }

    #[test]
    fn under_auto_a_worker_without_a_ring_runs_on_epoll() {
        let (outcome, shared) = start_without_a_ring(Driver::Uring { or_epoll: true });
        assert!(outcome.is_ok(), "{outcome:?}");
        // Its accept loop runs.
        let deadline = Instant::now() + Duration::from_secs(20);
        while shared.accepting.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "no accept loop");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn insisting_on_io_uring_a_worker_without_a_ring_fails_the_start() {
        let (outcome, _) = start_without_a_ring(Driver::Uring { or_epoll: false });
        let error = outcome.expect_err("no ring, no start");
        assert!(
            error
                .to_string()
                .starts_with("cannot set up the worker's io_uring"),
            "{error}"
        );
    }
}
