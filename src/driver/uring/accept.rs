//! The worker's listening sockets: accepting clients, within the
//! process's descriptor capacity.
//!
//! Far from the capacity, each listener has a multishot accept. A
//! multishot accept takes every client waiting in the backlog at once, and
//! only then can the worker count them; so nearer the capacity accepts are
//! single-shot, and at the capacity they are cancelled: new clients wait in
//! the kernel's backlog, and a tick looks for room. Near means: less room
//! than every accept queue of the process could fill at once (listeners ×
//! workers × `somaxconn`); multishot accepts come back once there is room
//! for [`SLACK`] more per queue, so a process hovering at the line does
//! not switch at every connection.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use io_uring::{cqueue, opcode, types};
use socket2::SockRef;
use tracing::debug;

use super::{Op, Token, Worker};
use crate::capacity::Slot;
use crate::connection::accepting::{AcceptError, BACKOFF};
use crate::mailbox::{BoundListener, Stop};

/// Connections per accept queue, beyond room for a burst, before accepts
/// are multishot again.
const SLACK: usize = 64;

/// A listening socket of this worker.
pub(super) struct Listening {
    addr: SocketAddr,
    socket: TcpListener,
    stop: Arc<Stop>,
    /// An accept is armed on it.
    armed: bool,
    /// The accept armed is multishot, and not being cancelled.
    multishot: bool,
    /// After an accept error: not re-armed before this.
    backoff: Option<Instant>,
    /// Tells its accepts from those of an earlier listener in the same
    /// slot, whose last completions may still come.
    generation: u32,
}

impl Worker {
    /// Starts accepting on `listener`.
    pub(super) fn listen(&mut self, listener: BoundListener) {
        self.shared.accepting.fetch_add(1, Ordering::AcqRel);
        let index = match self.listeners.iter().position(Option::is_none) {
            Some(index) => index,
            None => {
                self.listeners.push(None);
                self.listeners.len() - 1
            }
        };
        self.listeners[index] = Some(Listening {
            addr: listener.addr,
            socket: listener.socket,
            stop: listener.stop,
            armed: false,
            multishot: false,
            backoff: None,
            generation: self.next_listener_generation(),
        });
        if !self.pause.paused() {
            self.arm_accept(index);
        }
    }

    /// Arms an accept on listener `index`: multishot with room for a
    /// burst and [`SLACK`] (see the module's doc), single-shot otherwise. Single-shot,
    /// at most one client per listener and worker is accepted beyond the
    /// capacity (the [`Budget`](crate::capacity::Budget) keeps a
    /// descriptor for it), held until there is room, and the rest wait in
    /// the backlog.
    fn arm_accept(&mut self, index: usize) {
        let multishot = self.room_for_burst(SLACK);
        let Some(listener) = &mut self.listeners[index] else {
            return;
        };
        if listener.armed {
            return;
        }
        let fd = types::Fd(listener.socket.as_raw_fd());
        let flags = libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
        let entry = if multishot {
            opcode::AcceptMulti::new(fd).flags(flags).build()
        } else {
            opcode::Accept::new(fd, std::ptr::null_mut(), std::ptr::null_mut())
                .flags(flags)
                .build()
        };
        listener.armed = true;
        listener.multishot = multishot;
        let token = Token::new(Op::Accept, index as u32, listener.generation);
        self.push(entry.user_data(token.0));
    }

    /// Whether the descriptor capacity has room for every accept queue of
    /// the process to be emptied at once, and `slack` more connections per
    /// queue.
    fn room_for_burst(&self, slack: usize) -> bool {
        let connections = &self.shared.connections;
        let room = connections.capacity().saturating_sub(connections.open());
        room >= self.shared.accepting.load(Ordering::Relaxed) * (self.accept_queue + slack)
    }

    /// Once a loop turn: without room for one burst, every multishot
    /// accept becomes single-shot, including those of quiet listeners
    /// while others (or other workers) fill the capacity.
    pub(super) fn bound_accepts(&mut self) {
        let multishot = |l: &Option<Listening>| l.as_ref().is_some_and(|l| l.multishot);
        if !self.listeners.iter().any(multishot) || self.room_for_burst(0) {
            return;
        }
        for index in 0..self.listeners.len() {
            if multishot(&self.listeners[index]) {
                self.cancel_accept(index);
            }
        }
    }

    pub(super) fn accepted(&mut self, token: Token, result: i32, flags: u32) {
        let index = token.index() as usize;
        let listener = self.listeners[index]
            .as_mut()
            .filter(|l| l.generation == token.generation());
        let Some(listener) = listener else {
            // The accept of a listener already ended; close what it gave.
            if result >= 0 {
                // SAFETY: the accept gave us this descriptor.
                drop(unsafe { OwnedFd::from_raw_fd(result) });
            }
            return;
        };
        if !cqueue::more(flags) {
            listener.armed = false;
            listener.multishot = false;
        }
        if result >= 0 {
            // SAFETY: the accept gave us this descriptor.
            let client = unsafe { OwnedFd::from_raw_fd(result) };
            let address = listener.addr;
            match self.shared.connections.take() {
                Some(slot) => self.open(client, address, slot),
                None => {
                    self.held.push_back((client, address));
                    self.pause(address);
                }
            }
        } else {
            let address = listener.addr;
            let listening = || {
                SockRef::from(&listener.socket)
                    .is_listener()
                    .unwrap_or(false)
            };
            match AcceptError::of(-result, address, listening) {
                AcceptError::Ignore => {}
                // shutdown() by the control plane: the listener is stopped.
                AcceptError::Stop => {
                    debug!(%address, "listener stopped");
                    self.end_listener(index);
                    return;
                }
                // Out of descriptors or memory after all: clients wait in
                // the backlog meanwhile.
                AcceptError::BackOff => {
                    listener.backoff = Some(Instant::now() + BACKOFF);
                    return;
                }
            }
        }
        let listener = self.listeners[index].as_ref().expect("present above");
        if !listener.armed && !self.pause.paused() && listener.backoff.is_none() {
            if listener.stop.is_stopped() {
                self.end_listener(index);
            } else {
                self.arm_accept(index);
            }
        }
    }

    /// After lost completions: every listener's accept, which may have
    /// ended unseen, is given up (a client it still brings is closed) and
    /// armed again.
    pub(super) fn rearm_accepts(&mut self) {
        for index in 0..self.listeners.len() {
            let generation = self.next_listener_generation();
            let Some(listener) = &mut self.listeners[index] else {
                continue;
            };
            let old = std::mem::replace(&mut listener.generation, generation);
            listener.armed = false;
            listener.multishot = false;
            self.push_cancel_accept(index, old);
            if !self.pause.paused() {
                self.arm_accept(index);
            }
        }
    }

    fn next_listener_generation(&mut self) -> u32 {
        self.listener_generation = self.listener_generation.wrapping_add(1) & 0xff_ffff;
        self.listener_generation
    }

    fn end_listener(&mut self, index: usize) {
        if let Some(listener) = self.listeners[index].take() {
            if listener.armed {
                // Its last completion finds the slot empty, or another
                // listener's.
                self.push_cancel_accept(index, listener.generation);
            }
            self.shared.accepting.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Cancels the accept armed on listener `index`; its last completion
    /// says when it has stopped.
    fn cancel_accept(&mut self, index: usize) {
        let Some(listener) = &mut self.listeners[index] else {
            return;
        };
        listener.multishot = false;
        let generation = listener.generation;
        self.push_cancel_accept(index, generation);
    }

    fn push_cancel_accept(&mut self, index: usize, generation: u32) {
        let token = Token::new(Op::Accept, index as u32, generation);
        let cancel = opcode::AsyncCancel::new(token.0)
            .build()
            .user_data(Token::new(Op::Cleanup, u32::MAX, 0).0);
        self.push(cancel);
    }

    /// At the descriptor capacity: stop accepting until connections close.
    fn pause(&mut self, address: SocketAddr) {
        if !self.pause.at_capacity(address, self.shared) {
            return;
        }
        for index in 0..self.listeners.len() {
            if self.listeners[index].as_ref().is_some_and(|l| l.armed) {
                self.cancel_accept(index);
            }
        }
    }

    /// Whether the loop must wake every [`TICK`] for [`tick`](Self::tick).
    pub(super) fn needs_tick(&self) -> bool {
        self.pause.paused() || self.listeners.iter().flatten().any(|l| l.backoff.is_some())
    }

    /// While paused or backing off: serve the clients held back if there is
    /// room now, then accept again; drop listeners stopped meanwhile.
    pub(super) fn tick(&mut self, now: Instant) {
        // A listener stopped meanwhile ends now, paused or not.
        for index in 0..self.listeners.len() {
            let stopped = self.listeners[index]
                .as_ref()
                .is_some_and(|l| l.stop.is_stopped() && !l.armed);
            if stopped {
                self.end_listener(index);
            }
        }
        if self.pause.paused() {
            // Oldest first.
            while let Some((client, address)) = self.held.pop_front() {
                match self.shared.connections.take() {
                    Some(slot) => self.open(client, address, slot),
                    None => {
                        self.held.push_front((client, address));
                        break;
                    }
                }
            }
            if !self.held.is_empty()
                || self.shared.connections.open() >= self.shared.connections.capacity()
            {
                return;
            }
            self.pause.room();
        }
        for index in 0..self.listeners.len() {
            let Some(listener) = &mut self.listeners[index] else {
                continue;
            };
            if listener.stop.is_stopped() || listener.backoff.is_some_and(|until| until > now) {
                continue;
            }
            listener.backoff = None;
            self.arm_accept(index);
        }
    }

    /// Serves a client accepted on the listening address `address` (its
    /// route is looked up by address: the listener may be gone by now).
    fn open(&mut self, client: OwnedFd, address: SocketAddr, slot: Slot) {
        let peer = SockRef::from(&client)
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket());
        let Some(peer) = peer else {
            // The client is already gone.
            return;
        };
        // The route as of now: a reload published after this moment does
        // not take it away.
        let Some(route) = self.shared.snapshot.load().route(address).cloned() else {
            self.shared.unrouted.increment(1);
            return;
        };
        self.start(client, peer, route, slot);
    }
}

/// The kernel's cap on every listen backlog (4096 if it cannot be read).
pub(super) fn somaxconn() -> usize {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(4096)
}
