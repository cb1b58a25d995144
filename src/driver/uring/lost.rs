//! Recovering from completions the kernel dropped. With
//! `IORING_FEAT_NODROP` (which [`probe`](super::probe) requires), a full
//! completion queue overflows into kernel memory instead of dropping; only
//! when that memory cannot be had does the kernel drop a completion, and
//! says so once (`EBADR` from `io_uring_enter`). Which one is not known,
//! so the worker re-arms everything that might have been lost:
//!
//! - the read of the control plane's eventfd (the old one, if it lives,
//!   is cancelled; a command it may still bring is carried out all the
//!   same);
//! - every listener's accept;
//! - every connection ends, with a reset (a lost send's outcome is
//!   unknown, and a guess could corrupt its stream), logged as
//!   `completions lost by io_uring`. Its count of operations in flight may
//!   be wrong, so its sockets are swept (everything on them cancelled)
//!   until a sweep finds nothing in flight: then it is closed, whatever
//!   the count, and its slot and capacity place are freed. Nothing leaks.

use std::time::Duration;

use io_uring::opcode;
use tracing::error;

use super::token::{Op, Token};
use super::Worker;
use crate::connection::ending::Ending;
use crate::logging::Throttle;

/// How often a connection's sockets are swept until nothing is in flight
/// on them.
const SWEEP_EVERY: Duration = Duration::from_millis(200);

static LOST: Throttle = Throttle::new();

/// A sweep of a connection's sockets under way: cancels outstanding, and
/// whether any found an operation in flight.
#[derive(Clone, Copy)]
pub struct Sweep {
    outstanding: u8,
    found: bool,
}

impl Worker {
    /// The kernel said it dropped completions: re-arm what may have been
    /// lost (see the module's documentation).
    pub(super) fn completions_lost(&mut self) {
        if let Some(suppressed) = LOST.allow() {
            error!(
                suppressed,
                "io_uring dropped completions (the kernel is out of memory): \
                 this worker's connections are reset, its listeners armed again"
            );
        }
        let old = Token::new(Op::Wake, 0, self.wake_generation);
        let cancel = opcode::AsyncCancel::new(old.0)
            .build()
            .user_data(Token::new(Op::Cleanup, u32::MAX, 0).0);
        self.push(cancel);
        self.wake_generation = self.wake_generation.wrapping_add(1) & 0xff_ffff;
        self.arm_wake();
        self.rearm_accepts();
        self.close_all(|| Ending::Lost);
        for index in 0..self.slab.end() {
            if self.slab.live(index).is_some() {
                self.set_timer(index, Some(self.now + SWEEP_EVERY));
            }
        }
    }

    /// Sweeps the sockets of connection `index`: cancels whatever is still
    /// armed on them, and hears what was found ([`Worker::swept`]).
    pub(super) fn sweep(&mut self, index: u32) {
        let Some(conn) = self.slab.live(index) else {
            return;
        };
        let sockets = conn.sockets();
        conn.sweep = Some(Sweep {
            outstanding: sockets.iter().flatten().count() as u8,
            found: false,
        });
        self.cancel_all(index, Op::Sweep);
    }

    /// A sweep of connection `index` found `result` operations (none:
    /// `ENOENT`). Once its sweeps have found nothing, nothing is in flight
    /// on its sockets, whatever its count says: it is closed.
    pub(super) fn swept(&mut self, index: u32, result: i32) {
        let next = self.now + SWEEP_EVERY;
        let Some(conn) = self.slab.live(index) else {
            return;
        };
        let Some(sweep) = conn.sweep.as_mut() else {
            return;
        };
        sweep.outstanding = sweep.outstanding.saturating_sub(1);
        sweep.found |= result > 0;
        if sweep.outstanding > 0 {
            return;
        }
        let found = sweep.found;
        conn.sweep = None;
        if found {
            self.set_timer(index, Some(next));
        } else {
            self.finish(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::super::{Ring, Worker};
    use crate::connection::fixtures::shared;
    use crate::mailbox::{self, BoundListener};
    use crate::net;

    /// Runs turns of `worker` until `done`, for at most 20 s.
    fn turn_until(worker: &mut Worker, mut done: impl FnMut(&mut Worker) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut batch = Vec::new();
        while !done(worker) {
            assert!(Instant::now() < deadline, "timed out");
            worker.turn(&mut batch);
        }
    }

    fn open(worker: &mut Worker) -> usize {
        (0..worker.slab.end())
            .filter(|&i| worker.slab.live(i).is_some())
            .count()
    }

    /// The kernel says it dropped completions while a connection relays:
    /// the connection is reset and its slot and capacity place freed (its
    /// count of operations in flight cannot be trusted: sweeps tell), and
    /// the listener accepts again.
    #[test]
    fn after_lost_completions_no_slot_leaks_and_accepts_go_on() {
        let backend = TcpListener::bind("127.0.0.1:0").unwrap();
        let front: SocketAddr = {
            let probe = TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap()
        };
        let (shared, _events) = shared(&format!(
            "listeners:\n  l: {{ listen: {front}, pool: p }}\npools:\n  p:\n    health: off\n    backends: [{{ address: {} }}]\n",
            backend.local_addr().unwrap()
        ));
        let (_mailbox, inbox) = mailbox::mailbox().unwrap();
        let mut worker = Worker::new(Ring::new().unwrap(), inbox, shared);
        worker.listen(BoundListener {
            addr: front,
            socket: net::reuseport_listener(front, 16).unwrap(),
            stop: Arc::default(),
        });
        worker.arm_wake();

        let client = TcpStream::connect(front).unwrap();
        let served = std::thread::spawn(move || backend.accept().unwrap());
        turn_until(&mut worker, |w| {
            w.slab.live(0).is_some_and(|conn| conn.session.relaying())
        });
        assert_eq!(shared.connections.open(), 1);
        let _served = served.join().unwrap();

        // The completion the kernel dropped: one that never comes.
        worker.slab.live(0).unwrap().pending += 1;
        worker.completions_lost();
        turn_until(&mut worker, |w| open(w) == 0);
        assert_eq!(shared.connections.open(), 0, "its capacity place is free");
        // Its sockets' closes are queued: submitted with the next turn's.
        worker.ring.submit().unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let error = std::io::Read::read(&mut &client, &mut [0u8; 1]).expect_err("a reset");
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);

        let _again = TcpStream::connect(front).unwrap();
        turn_until(&mut worker, |w| open(w) == 1);
    }
}
