//! The JSON API's vocabulary: which resource a request names
//! ([`Resource::parse`]), the body of a state change ([`StateChange`]),
//! what `GET /api/pools` answers ([`PoolsView`]), and what the admin
//! endpoint asks of the control plane ([`Ask`]), which alone knows the
//! backends and may change their state.
//!
//! The schema of [`PoolsView`] is a contract (README, "Runtime control"):
//! fields are added, never renamed or removed. `sluice ctl` reads it with
//! the same types.

use std::fmt;

use hyper::StatusCode;
use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::state::OperatorState;

/// Largest request body read: a state change is a few dozen bytes.
pub const MAX_BODY: usize = 4096;

/// What a request's path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// `/`: the status page.
    Page,
    /// `/metrics`: Prometheus text.
    Metrics,
    /// `/ready`: whether to send this instance traffic.
    Ready,
    /// `/api/pools`: every pool and backend.
    Pools,
    /// `/api/pools/POOL/backends/NAME/state`: one backend's operator
    /// state. The names are percent-decoded.
    BackendState {
        pool: String,
        backend: String,
    },
    NotFound,
}

impl Resource {
    /// The resource of `path` (without its query string).
    pub fn parse(path: &str) -> Resource {
        match path {
            "/" => return Resource::Page,
            "/metrics" => return Resource::Metrics,
            "/ready" => return Resource::Ready,
            "/api/pools" | "/api/pools/" => return Resource::Pools,
            _ => {}
        }
        let decode = |part: &str| {
            percent_decode_str(part)
                .decode_utf8()
                .ok()
                .map(|s| s.into_owned())
                .filter(|s| !s.is_empty())
        };
        let parts: Vec<&str> = path.split('/').collect();
        match parts[..] {
            ["", "api", "pools", pool, "backends", backend, "state"] => {
                match (decode(pool), decode(backend)) {
                    (Some(pool), Some(backend)) => Resource::BackendState { pool, backend },
                    _ => Resource::NotFound,
                }
            }
            _ => Resource::NotFound,
        }
    }
}

/// The body of `POST .../state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateChange {
    pub state: OperatorState,
}

impl StateChange {
    pub fn parse(body: &[u8]) -> Result<StateChange, String> {
        serde_json::from_slice(body).map_err(|e| {
            format!("the body must be {{\"state\": \"ready\" | \"drain\" | \"maint\"}}: {e}")
        })
    }
}

/// `GET /api/pools`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolsView {
    pub pools: Vec<PoolView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolView {
    pub name: String,
    /// The balancing algorithm, as the file names it.
    pub balance: String,
    /// Clients waiting in its queue now.
    pub queued: u32,
    pub backends: Vec<BackendView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendView {
    pub name: String,
    pub address: String,
    pub weight: u32,
    pub backup: bool,
    /// What the operator said.
    pub state: OperatorState,
    /// What the probes say.
    pub health: Health,
    /// Why it is not up (the last probe's failure), if it is not.
    pub reason: Option<String>,
    /// The role its probes confirmed (`primary`, `replica`), in a pool
    /// whose probes check one and while it is up.
    pub role: Option<String>,
    /// Connections open now.
    pub active: u32,
    /// Connections since it joined (or since sluice started).
    pub total: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Up,
    Down,
    /// Not probed yet in a pool that fails closed, or not probed at all
    /// (in maintenance).
    Unknown,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Health::Up => "up",
            Health::Down => "down",
            Health::Unknown => "unknown",
        })
    }
}

/// What the admin endpoint asks the control plane; each ask carries the
/// channel for its answer.
pub enum Ask {
    Pools(oneshot::Sender<PoolsView>),
    SetState {
        pool: String,
        backend: String,
        /// The state the body asks for, or why the body is not one.
        change: Result<OperatorState, String>,
        /// The bearer token the request offered, if any.
        token: Option<String>,
        /// The state set and the one it replaced.
        done: oneshot::Sender<Result<(OperatorState, OperatorState), Refusal>>,
    },
}

/// Why a state change was not made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No `admin.token_file` is configured: state changes are off.
    NoToken,
    /// The request has no token, or the wrong one.
    BadToken,
    /// The body is not a state change.
    BadBody(String),
    UnknownPool(String),
    UnknownBackend {
        pool: String,
        backend: String,
        /// The backends the pool makes of a host-name entry so named, each
        /// of its addresses `NAME/IP`.
        addresses: Vec<String>,
    },
}

impl Refusal {
    /// The HTTP status and the message for the client.
    pub fn answer(&self) -> (StatusCode, String) {
        match self {
            Refusal::NoToken => (
                StatusCode::FORBIDDEN,
                "state changes are off: set admin.token_file in the configuration".into(),
            ),
            Refusal::BadToken => (
                StatusCode::UNAUTHORIZED,
                "a state change needs the header `Authorization: Bearer TOKEN` with the token of admin.token_file".into(),
            ),
            Refusal::BadBody(why) => (StatusCode::BAD_REQUEST, why.clone()),
            Refusal::UnknownPool(pool) => (StatusCode::NOT_FOUND, format!("no pool {pool:?}")),
            Refusal::UnknownBackend {
                pool,
                backend,
                addresses,
            } => {
                let mut why = format!("pool {pool:?} has no backend {backend:?}");
                if !addresses.is_empty() {
                    why.push_str(&format!(
                        "; each address of a host name is a backend of its own: {}",
                        addresses.join(", ")
                    ));
                }
                (StatusCode::NOT_FOUND, why)
            }
        }
    }
}

/// The token of an `Authorization` header's value: `Bearer TOKEN`.
pub fn bearer(header: &[u8]) -> Option<String> {
    let header = std::str::from_utf8(header).ok()?;
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

/// Whether `offered` is `expected`, in time that depends on their lengths
/// only, not on where they first differ.
pub fn token_matches(offered: &str, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    offered.as_bytes().ct_eq(expected.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn health_reads_the_same_in_the_api_and_in_ctl() {
        for health in [Health::Up, Health::Down, Health::Unknown] {
            assert_eq!(serde_json::to_value(health).unwrap(), health.to_string());
        }
    }

    #[test]
    fn paths_name_resources_and_names_are_percent_decoded() {
        assert_eq!(Resource::parse("/"), Resource::Page);
        assert_eq!(Resource::parse("/api/pools"), Resource::Pools);
        assert_eq!(
            Resource::parse("/api/pools/pg/backends/db1/state"),
            Resource::BackendState {
                pool: "pg".into(),
                backend: "db1".into()
            }
        );
        assert_eq!(
            Resource::parse(
                "/api/pools/redis/backends/cache.internal%3A6379%2F10.0.0.5%3A6379/state"
            ),
            Resource::BackendState {
                pool: "redis".into(),
                backend: "cache.internal:6379/10.0.0.5:6379".into()
            }
        );
        for path in [
            "/api/pools/pg/backends//state",
            "/api/pools/pg/backends/db1",
            "/api/pools/pg/backends/db1/state/x",
            "/api/pools/pg/backends/%ff/state",
            "/metricsx",
            "",
        ] {
            assert_eq!(Resource::parse(path), Resource::NotFound, "{path}");
        }
    }

    #[test]
    fn a_state_change_body_is_strict() {
        assert_eq!(
            StateChange::parse(br#"{"state": "drain"}"#).unwrap().state,
            OperatorState::Drain
        );
        for body in [
            &b""[..],
            br#"{"state": "down"}"#,
            br#"{"state": "drain", "x": 1}"#,
            b"drain",
        ] {
            assert!(StateChange::parse(body).is_err());
        }
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer(b"Bearer abc").as_deref(), Some("abc"));
        assert_eq!(bearer(b"bearer  abc ").as_deref(), Some("abc"));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer"), None);
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abd", "abc"));
        assert!(!token_matches("ab", "abc"));
    }

    proptest! {
        #[test]
        fn any_path_names_a_resource_or_none(path in "[ -~]{0,80}") {
            Resource::parse(&path);
        }

        #[test]
        fn any_encoded_name_comes_back(pool in "[a-z]{1,8}", backend in "[ -~]{1,30}") {
            let encoded = percent_encoding::utf8_percent_encode(&backend, percent_encoding::NON_ALPHANUMERIC);
            let path = format!("/api/pools/{pool}/backends/{encoded}/state");
            prop_assert_eq!(Resource::parse(&path), Resource::BackendState { pool, backend });
        }
    }
}
