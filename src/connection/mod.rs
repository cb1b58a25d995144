//! What happens to a connection, whichever driver moves its bytes. Its
//! life is a [`session::Session`]: a state machine that does no I/O and
//! reads no clock, which the drivers feed with what their sockets said
//! and when, and which tells them what to do next (read a PROXY header,
//! connect there, close). Under it: who is let in ([`admit`]), which
//! backend it is given and how a failed connect is retried ([`dial`]), how
//! its FINs are passed on and which engine each direction uses
//! ([`relaying`]), and what its ending means ([`ending`]): the close reason
//! it is logged with, whether both sides are reset and what is delivered
//! first, what the backend's passive health hears and what is counted.
//! Before any of it, when a worker accepts at all: [`accepting`].
//!
//! The two drivers ([`crate::driver`]) own only the sockets and how bytes
//! move, so the rules are written once, unit-tested without sockets, and
//! cannot drift between drivers.

pub mod accepting;
pub mod admit;
pub mod dial;
pub mod ending;
pub mod queue;
pub mod relaying;
pub mod session;

#[cfg(test)]
pub(crate) mod fixtures;

use std::net::SocketAddr;
use std::time::Duration;

use tracing::info;

use crate::health::PassiveHealth;
use crate::logging;
use crate::shared::{Event, Shared};
use ending::Passive;

/// With `log.connections`, one line per closed connection: the client's
/// address, and its connection's own peer when a PROXY header carried
/// another; how long it lasted.
pub fn log_closed(
    listener: &str,
    (client, peer): (SocketAddr, Option<SocketAddr>),
    backend: &str,
    (to_backend, to_client): (u64, u64),
    lasted: Duration,
    close: &str,
) {
    if logging::log_connections() {
        info!(
            listener,
            %client,
            peer = peer.map(tracing::field::display),
            backend,
            to_backend,
            to_client,
            duration_ms = lasted.as_millis() as u64,
            close,
            "connection closed"
        );
    }
}

/// Applies what an ending says about the backend (see [`ending`]): a
/// failure that completes a streak of `eject_after` asks the control plane
/// to take the backend out.
pub fn judge(passive: Passive, health: &PassiveHealth, eject_after: Option<u32>, shared: &Shared) {
    match passive {
        Passive::Healthy => health.record_success(),
        Passive::Failing => {
            if let Some(threshold) = eject_after {
                if health.record_failure(threshold) {
                    let _ = shared.events.send(Event::Ejected { id: health.id });
                }
            }
        }
        Passive::Silent => {}
    }
}
