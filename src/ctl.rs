//! `sluice ctl`: a client of a running sluice's admin API, for operators
//! and their scripts: `status`, `drain POOL BACKEND [--wait DURATION]`,
//! `maint POOL BACKEND`, `ready POOL BACKEND`.
//!
//! It finds sluice the way sluice does: `admin.listen` and
//! `admin.token_file` of the configuration file (`-c`). Only those two keys
//! are read, so that a file whose probe passwords this user cannot read
//! still names the endpoint. Every request has a deadline; every failure
//! says what to check.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::Deserialize;

use crate::admin::api::{PoolsView, StateChange};
use crate::config;
use crate::config::schema::ListenAddr;
use crate::state::OperatorState;

/// How long one request to sluice may take.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// How often `drain --wait` looks at the open connections.
const POLL: Duration = Duration::from_millis(200);

/// What `sluice ctl` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Status,
    Set {
        pool: String,
        backend: String,
        state: OperatorState,
        /// After a drain: wait this long for its connections to end.
        wait: Option<Duration>,
    },
}

/// The two keys `sluice ctl` needs; every other key is ignored.
#[derive(Deserialize)]
struct File {
    admin: Option<AdminKeys>,
}

#[derive(Deserialize)]
struct AdminKeys {
    listen: Option<ListenAddr>,
    #[serde(default)]
    token_file: PathBuf,
}

/// Where the running sluice answers, and where the token it wants for a
/// state change is (read only for one: `status` needs none).
struct Target {
    addr: SocketAddr,
    token_file: Option<PathBuf>,
}

impl Target {
    fn from_file(path: &Path) -> Result<Target, String> {
        let text = config::read(path).map_err(|e| e.to_string())?;
        let file: File = serde_yaml::from_str(&text)
            .map_err(|e| format!("{}: {e} (try sluice --check)", path.display()))?;
        let admin = file.admin.unwrap_or(AdminKeys {
            listen: None,
            token_file: PathBuf::new(),
        });
        let Some(ListenAddr(mut addr)) = admin.listen else {
            return Err(format!(
                "{} sets no admin.listen: sluice ctl talks to sluice through its admin endpoint",
                path.display()
            ));
        };
        // Listening on every address: ask on loopback.
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        let token_file = match admin.token_file.as_os_str().is_empty() {
            true => None,
            false => Some(service_credential(admin.token_file)),
        };
        Ok(Target { addr, token_file })
    }

    /// The token of `admin.token_file`, if one is set.
    fn token(&self) -> Result<Option<String>, String> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        config::read_password(path).map(Some).map_err(|e| {
            let hint = match path.starts_with(SERVICE_CREDENTIALS) {
                true => " (systemd keeps it there while sluice.service runs, readable by root)",
                false => "",
            };
            format!("admin.token_file: {e}{hint}")
        })
    }
}

/// Where systemd puts the credentials of the service (`LoadCredential=`),
/// readable by root.
const SERVICE_CREDENTIALS: &str = "/run/credentials/sluice.service";

/// `token_file` as the service reads it: a relative name is one of its
/// credentials, which outside the service (no `$CREDENTIALS_DIRECTORY`)
/// are in [`SERVICE_CREDENTIALS`].
fn service_credential(token_file: PathBuf) -> PathBuf {
    match token_file.is_relative() && std::env::var_os("CREDENTIALS_DIRECTORY").is_none() {
        true => Path::new(SERVICE_CREDENTIALS).join(token_file),
        false => token_file,
    }
}

/// Runs `action` against the sluice that `config_path` describes; what to
/// print on success.
pub fn run(config_path: &Path, action: &Action) -> Result<String, String> {
    let target = Target::from_file(config_path)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start: {e}"))?;
    runtime.block_on(async {
        match action {
            Action::Status => Ok(status_table(&pools(&target).await?)),
            Action::Set {
                pool,
                backend,
                state,
                wait,
            } => {
                let was = set_state(&target, pool, backend, *state).await?;
                let mut out = format!("{pool}/{backend}: {state} (was {was})\n");
                if let Some(limit) = wait {
                    wait_for_drain(&target, pool, backend, *limit).await?;
                    out.push_str(&format!("{pool}/{backend}: no connection left\n"));
                }
                Ok(out)
            }
        }
    })
}

/// Polls until backend `backend` of `pool` has no open connection, at most
/// `limit`. A poll that fails (sluice busy, or restarting) is tried again
/// until then; a backend that leaves the configuration ends the wait, since
/// its connections are no longer counted.
async fn wait_for_drain(
    target: &Target,
    pool: &str,
    backend: &str,
    limit: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        let view = match pools(target).await {
            Ok(view) => view,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(POLL).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let Some(open) = view
            .pools
            .iter()
            .filter(|p| p.name == pool)
            .flat_map(|p| &p.backends)
            .find(|b| b.name == backend)
            .map(|b| b.active)
        else {
            return Err(format!(
                "{pool}/{backend} left the configuration while it drained: its connections are no longer counted"
            ));
        };
        if open == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{pool}/{backend}: {open} connections still open after {}",
                humantime::format_duration(limit)
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn pools(target: &Target) -> Result<PoolsView, String> {
    let (status, body) = request(target, Method::GET, "/api/pools", None, None).await?;
    if status != StatusCode::OK {
        return Err(refused(status, &body));
    }
    serde_json::from_slice(&body).map_err(|e| {
        format!(
            "sluice at {} answered what is not a pool list: {e}",
            target.addr
        )
    })
}

/// Sets a backend's state; the state it had.
async fn set_state(
    target: &Target,
    pool: &str,
    backend: &str,
    state: OperatorState,
) -> Result<OperatorState, String> {
    let path = format!(
        "/api/pools/{}/backends/{}/state",
        utf8_percent_encode(pool, NON_ALPHANUMERIC),
        utf8_percent_encode(backend, NON_ALPHANUMERIC)
    );
    let body = serde_json::to_vec(&StateChange { state }).expect("plain data serializes");
    let token = target.token()?;
    let (status, answer) =
        request(target, Method::POST, &path, Some(body), token.as_deref()).await?;
    if status != StatusCode::OK {
        return Err(refused(status, &answer));
    }
    #[derive(Deserialize)]
    struct Changed {
        was: OperatorState,
    }
    serde_json::from_slice::<Changed>(&answer)
        .map(|changed| changed.was)
        .map_err(|e| format!("sluice at {} answered unexpectedly: {e}", target.addr))
}

/// What to say when sluice answered `status`.
fn refused(status: StatusCode, body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Error {
        error: String,
    }
    let why = serde_json::from_slice::<Error>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_owned());
    let hint = match status {
        StatusCode::UNAUTHORIZED => {
            " (is admin.token_file the file sluice was started or reloaded with?)"
        }
        _ => "",
    };
    format!("sluice refused ({status}): {why}{hint}")
}

/// One HTTP/1.1 exchange with sluice, within [`REQUEST_DEADLINE`], with
/// `token` as its bearer token.
async fn request(
    target: &Target,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    token: Option<&str>,
) -> Result<(StatusCode, Bytes), String> {
    let addr = target.addr;
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| {
            format!("cannot reach sluice at {addr}: {e} (is it running, with this configuration?)")
        })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("sluice at {addr}: {e}"))?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, addr.to_string());
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| format!("cannot make the request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("sluice at {addr}: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("sluice at {addr}: {e}"))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(REQUEST_DEADLINE, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "sluice at {addr} did not answer within {}",
                humantime::format_duration(REQUEST_DEADLINE)
            ))
        })
}

/// `sluice ctl status`: one line per backend.
fn status_table(view: &PoolsView) -> String {
    let mut rows = vec![[
        "POOL", "BACKEND", "ADDRESS", "STATE", "HEALTH", "OPEN", "TOTAL", "QUEUED", "WHY",
    ]
    .map(String::from)];
    for pool in &view.pools {
        for b in &pool.backends {
            rows.push([
                pool.name.clone(),
                b.name.clone(),
                b.address.clone(),
                b.state.to_string(),
                b.health.to_string(),
                b.active.to_string(),
                b.total.to_string(),
                pool.queued.to_string(),
                b.reason.clone().unwrap_or_default(),
            ]);
        }
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
            match i + 1 == row.len() {
                true => line.push_str(cell),
                false => {
                    let _ = write!(line, "{cell:<width$}  ");
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_token_file_is_the_service_credential() {
        if std::env::var_os("CREDENTIALS_DIRECTORY").is_some() {
            return; // run inside a service: the name stays for read_password
        }
        assert_eq!(
            service_credential(PathBuf::from("admin.token")),
            Path::new("/run/credentials/sluice.service/admin.token")
        );
        assert_eq!(
            service_credential(PathBuf::from("/etc/sluice/admin.token")),
            Path::new("/etc/sluice/admin.token")
        );
    }
}
