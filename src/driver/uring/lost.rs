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
