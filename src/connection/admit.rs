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
use crate::limits::Refusal;
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

/// Lets a connection accepted from `peer` at `now` through `route`'s gate,
/// or turns it away (counted and logged).
pub fn admit(route: &Route, peer: SocketAddr, now: Instant) -> Option<Admitted> {
    match pass_gate(route, peer, now) {
        Ok(admitted) => Some(admitted),
        Err((reason, why)) => {
            turn_away(route, reason, &why, (peer, peer), Duration::ZERO);
            None
        }
    }
}

/// [`admit`]'s checks, in order; what to count and say if one fails.
fn pass_gate(
    route: &Route,
    peer: SocketAddr,
    now: Instant,
) -> Result<Admitted, (ErrorReason, String)> {
    let over = |refusal: Refusal| (ErrorReason::OverLimit, refusal.to_string());
    let lease = route.gate.enter().map_err(over)?;
    let header_within = match &route.accept_proxy {
        None => {
            route.gate.pace(peer.ip(), now).map_err(over)?;
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
                return Err((ErrorReason::ProxyUntrusted, why));
            }
            // Before the header is awaited: clients that send none are held
            // to the listener's rate, not only to its max_connections.
            route.gate.pace_listener(now).map_err(over)?;
            Some(sources.timeout)
        }
    };
    Ok(Admitted {
        lease,
        header_within,
    })
}

/// Takes the PROXY header a connection from `peer` sent (or why it was
/// refused: malformed, cut short, too late) at `now`, `waited` after it was
/// accepted, and returns the client's address, once that client is within
/// its own rate.
pub fn admit_header(
    route: &Route,
    peer: SocketAddr,
    header: Result<Carried, &dyn Display>,
    (now, waited): (Instant, Duration),
) -> Option<SocketAddr> {
    let carried = match header {
        Ok(carried) => carried,
        Err(why) => {
            turn_away(route, ErrorReason::ProxyHeader, why, (peer, peer), waited);
            return None;
        }
    };
    let client = carried.map_or(peer, |(source, _)| source);
    if let Err(refusal) = route.gate.pace_client(client.ip(), now) {
        turn_away(
            route,
            ErrorReason::OverLimit,
            &refusal,
            (client, peer),
            waited,
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
/// `client` (over `peer`) that is closed, `lasted` after it was accepted,
/// before it reaches a backend.
pub fn turn_away(
    route: &Route,
    reason: ErrorReason,
    why: &dyn Display,
    (client, peer): (SocketAddr, SocketAddr),
    lasted: Duration,
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
        lasted,
        &why.to_string(),
    );
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::config::{self, Resolver};
    use crate::snapshot::Snapshot;

    fn route(listener: &str) -> Arc<Route> {
        let text = format!(
            "listeners:\n  l: {{ listen: 127.0.0.1:7000, pool: p, {listener} }}\npools:\n  p:\n    backends: [{{ address: 10.0.0.1:1 }}]\n"
        );
        let config = config::parse(Path::new("t.yaml"), &text, Resolver::Offline).unwrap();
        let snapshot = Snapshot::from_config(&config);
        snapshot
            .route("127.0.0.1:7000".parse().unwrap())
            .cloned()
            .unwrap()
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn max_connections_turns_away_the_one_too_many_until_one_leaves() {
        let route = route("max_connections: 2");
        let now = Instant::now();
        let first = admit(&route, addr("192.0.2.1:1"), now).unwrap();
        let _second = admit(&route, addr("192.0.2.2:1"), now).unwrap();
        assert!(admit(&route, addr("192.0.2.3:1"), now).is_none());
        drop(first);
        assert!(admit(&route, addr("192.0.2.3:1"), now).is_some());
    }

    #[test]
    fn a_proxy_header_is_awaited_only_from_listed_upstreams() {
        let route = route("accept_proxy: { from: [10.1.0.0/16], timeout: 3s }");
        let now = Instant::now();
        assert!(admit(&route, addr("192.0.2.1:1"), now).is_none());
        let admitted = admit(&route, addr("10.1.2.3:1"), now).unwrap();
        assert_eq!(admitted.header_within, Some(Duration::from_secs(3)));
        // The client is the address the header carries.
        let carried = Some((addr("198.51.100.7:4000"), addr("127.0.0.1:7000")));
        let at = (now, Duration::ZERO);
        let client = admit_header(&route, addr("10.1.2.3:1"), Ok(carried), at);
        assert_eq!(client, Some(addr("198.51.100.7:4000")));
        let why: &dyn Display = &"garbage";
        assert!(admit_header(&route, addr("10.1.2.3:1"), Err(why), at).is_none());
    }

    #[test]
    fn the_listener_rate_is_taken_before_the_header_and_the_clients_after() {
        let limits = "accept_proxy: true, rate_limit: { rate: 1000, burst: 1000, per_client: { rate: 1, burst: 1 } }";
        let route = route(limits);
        let now = Instant::now();
        let upstream = addr("10.1.2.3:1");
        // Two headers naming the same client: the second is over its rate,
        // though the upstream connection itself is let in.
        for (i, expected) in [true, false].into_iter().enumerate() {
            let _admitted = admit(&route, upstream, now).unwrap();
            let carried = Some((addr("198.51.100.7:4000"), addr("127.0.0.1:7000")));
            let client = admit_header(&route, upstream, Ok(carried), (now, Duration::ZERO));
            assert_eq!(client.is_some(), expected, "header {i}");
        }
    }
}
