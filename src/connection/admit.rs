//! Who is let in: a new connection passes its listener's gate
//! (`max_connections`, then the rates) and, on an `accept_proxy` listener,
//! comes from a trusted upstream and sends a valid PROXY header in time.
//!
//! The order matters. The listener-wide rate is taken before a header is
//! awaited, so that clients sending none are held to it; the per-client
//! rate is taken after, since the header says who the client is. Whoever is
//! turned away is counted, logged (throttled) and given a connection log
//! line, here and only here.

use std::fmt::Display;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::balancer::load::Lease;
use crate::logging::Throttle;
use crate::metrics::ErrorReason;
use crate::proxy_protocol::Carried;
use crate::snapshot::Route;

use super::log_closed;

/// Connections turned away by a limit or for their PROXY header are logged
/// at most once per interval, with a count.
static TURNED_AWAY: Throttle = Throttle::new();

/// A connection through its listener's gate.
pub struct Admitted {
    /// Counts the connection against its listener's `max_connections`.
    pub lease: Lease,
    /// `Some(deadline)`: a PROXY header must come first, within this long.
    pub header_within: Option<Duration>,
}

/// Lets a connection accepted from `peer` through `route`'s gate, or turns
/// it away (counted and logged).
pub fn admit(route: &Route, peer: SocketAddr, accepted: Instant) -> Option<Admitted> {
    let lease = match route.gate.enter() {
        Ok(lease) => lease,
        Err(refusal) => {
            turn_away(
                route,
                ErrorReason::OverLimit,
                &refusal,
                (peer, peer),
                accepted,
            );
            return None;
        }
    };
    let header_within = match &route.accept_proxy {
        None => {
            if let Err(refusal) = route.gate.pace(peer.ip()) {
                turn_away(
                    route,
                    ErrorReason::OverLimit,
                    &refusal,
                    (peer, peer),
                    accepted,
                );
                return None;
            }
            None
        }
        Some(sources) => {
            // A header from anyone else, true or forged, is not believed:
            // it would let a client choose its backend and its rate.
            if !sources.trusts(peer.ip()) {
                let why = format!(
                    "{} may not send PROXY headers: accept_proxy.from does not list it",
                    peer.ip()
                );
                turn_away(
                    route,
                    ErrorReason::ProxyUntrusted,
                    &why,
                    (peer, peer),
                    accepted,
                );
                return None;
            }
            // Before the header is awaited: clients that send none are held
            // to the listener's rate, not only to its max_connections.
            if let Err(refusal) = route.gate.pace_listener() {
                turn_away(
                    route,
                    ErrorReason::OverLimit,
                    &refusal,
                    (peer, peer),
                    accepted,
                );
                return None;
            }
            Some(sources.timeout)
        }
    };
    Some(Admitted {
        lease,
        header_within,
    })
}

/// Takes the PROXY header a connection from `peer` sent (or why it was
/// refused: malformed, cut short, too late) and returns the client's
/// address, once that client is within its own rate.
pub fn admit_header(
    route: &Route,
    peer: SocketAddr,
    header: Result<Carried, &dyn Display>,
    accepted: Instant,
) -> Option<SocketAddr> {
    let carried = match header {
        Ok(carried) => carried,
        Err(why) => {
            turn_away(route, ErrorReason::ProxyHeader, why, (peer, peer), accepted);
            return None;
        }
    };
    let client = carried.map_or(peer, |(source, _)| source);
    if let Err(refusal) = route.gate.pace_client(client.ip()) {
        turn_away(
            route,
            ErrorReason::OverLimit,
            &refusal,
            (client, peer),
            accepted,
        );
        return None;
    }
    Some(client)
}

/// Why a header never came: for [`admit_header`].
pub fn header_too_late(within: Duration) -> String {
    format!(
        "no PROXY header within {}",
        humantime::format_duration(within)
    )
}

/// Counts, logs and gives a connection log line to a connection from
/// `client` (over `peer`) that is closed before it reaches a backend.
pub fn turn_away(
    route: &Route,
    reason: ErrorReason,
    why: &dyn Display,
    (client, peer): (SocketAddr, SocketAddr),
    accepted: Instant,
) {
    route.stats.error(reason);
    let listener = &*route.listener;
    let peer = (client != peer).then_some(peer);
    if let Some(suppressed) = TURNED_AWAY.allow() {
        warn!(
            listener, %client, peer = peer.map(tracing::field::display), suppressed,
            "closing a new connection: {why}"
        );
    }
    log_closed(
        listener,
        (client, peer),
        "-",
        (0, 0),
        accepted,
        &why.to_string(),
    );
}
