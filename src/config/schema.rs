//! The configuration file's schema: one Rust type per YAML mapping, with the
//! defaults of `SPEC.md` and `conf/sluice.yaml`.
//!
//! Everything here is checked by serde while the file is parsed (unknown keys,
//! types, durations, socket addresses), so that each such error carries the
//! line and column of the offending value. Checks that need the whole file
//! (duplicates, references between sections) live in `validate.rs`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

mod read;

use read::{duration, unique_map};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub workers: Workers,
    /// Which driver moves the workers' bytes.
    #[serde(default)]
    pub io: Io,
    #[serde(default)]
    pub pin_workers: bool,
    #[serde(default = "defaults::shutdown_timeout", with = "duration")]
    pub shutdown_timeout: Duration,
    /// After a stop signal, how long listeners keep accepting while
    /// `/ready` says 503, so that routers move new flows away first.
    #[serde(default, with = "duration")]
    pub shutdown_delay: Duration,
    pub admin: Option<Admin>,
    /// Where operator states (drain, maint) are kept across restarts;
    /// empty: nowhere.
    #[serde(default = "defaults::state_file")]
    pub state_file: std::path::PathBuf,
    #[serde(default)]
    pub log: Log,
    #[serde(deserialize_with = "unique_map")]
    pub listeners: BTreeMap<String, Listener>,
    #[serde(deserialize_with = "unique_map")]
    pub pools: BTreeMap<String, Pool>,
}

/// `workers: auto` or a thread count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Workers {
    /// One worker per core available to the process.
    #[default]
    Auto,
    Count(usize),
}

/// `io: auto | io_uring | epoll`: the workers' driver. `auto` is io_uring
/// where this kernel and the process's sandbox allow it, epoll elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Io {
    #[default]
    Auto,
    IoUring,
    Epoll,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub listen: Option<ListenAddr>,
    /// The file holding the bearer token that state changes need; empty:
    /// state changes are refused. Read like a probe's password file.
    #[serde(default)]
    pub token_file: std::path::PathBuf,
    /// The file's contents, read by validation at start and at each reload.
    #[serde(skip)]
    pub token: Option<Secret>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    #[serde(default)]
    pub level: LogLevel,
    #[serde(default)]
    pub format: LogFormat,
    #[serde(default)]
    pub connections: bool,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: LogLevel::Info,
            format: LogFormat::Text,
            connections: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub listen: ListenAddr,
    pub pool: String,
    #[serde(default)]
    pub accept_proxy: AcceptProxy,
    #[serde(default)]
    pub max_connections: u32,
    #[serde(default)]
    pub rate_limit: RateLimit,
    #[serde(default = "defaults::backlog")]
    pub backlog: u32,
}

/// `accept_proxy: false | true | { from: [RANGE, ...], timeout: 5s }`:
/// whether connections start with a PROXY header, whom such a header is
/// believed from, and how long a client has to send it.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum AcceptProxy {
    #[default]
    Off,
    On(ProxySources),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySources {
    /// The upstream balancers: addresses and ranges (`10.0.0.0/8`,
    /// `192.0.2.7`) whose headers are believed. A connection from anywhere
    /// else is refused.
    pub from: Vec<Cidr>,
    #[serde(default = "defaults::proxy_timeout", with = "duration")]
    pub timeout: Duration,
}

impl ProxySources {
    /// Whether a header from `peer` is believed.
    pub fn trusts(&self, peer: std::net::IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.from.iter().any(|range| range.0.contains(&peer))
    }
}

/// An address range, `10.0.0.0/8`, or one address, `192.0.2.7`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub ipnet::IpNet);

/// `rate: 0` turns a limit off.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    #[serde(default)]
    pub rate: u32,
    #[serde(default)]
    pub burst: u32,
    #[serde(default)]
    pub per_client: ClientRate,
}

/// A token bucket per client address.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientRate {
    #[serde(default)]
    pub rate: u32,
    #[serde(default)]
    pub burst: u32,
    /// IPv6 clients that share this many leading bits are one client: a
    /// host is usually given a /64, and could otherwise rotate addresses
    /// within it to dodge its limit.
    #[serde(default = "defaults::ipv6_prefix")]
    pub ipv6_prefix: u8,
}

impl Default for ClientRate {
    fn default() -> Self {
        ClientRate {
            rate: 0,
            burst: 0,
            ipv6_prefix: defaults::ipv6_prefix(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    #[serde(default)]
    pub rate: u32,
    #[serde(default)]
    pub burst: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    #[serde(default)]
    pub balance: Balance,
    #[serde(default)]
    pub hash_key: HashKey,
    #[serde(default = "defaults::table_size")]
    pub table_size: u64,
    #[serde(default)]
    pub max_load_factor: f64,
    #[serde(default)]
    pub engine: Engine,
    #[serde(default = "defaults::connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    #[serde(default, with = "duration")]
    pub idle_timeout: Duration,
    #[serde(default = "defaults::retries")]
    pub retries: u32,
    #[serde(default)]
    pub send_proxy: SendProxy,
    #[serde(default, with = "duration")]
    pub resolve_interval: Duration,
    #[serde(default)]
    pub health: Health,
    /// Every backend down (or unknown): route over all of them (`true`) or
    /// none. Unset: `false` when `health.role` is set, else `true`.
    pub fail_open: Option<bool>,
    /// What a backend marked down does to its open connections. Unset:
    /// `close` when `health.role` is set, else `keep`.
    pub on_down: Option<OnDown>,
    #[serde(default)]
    pub queue: Queue,
    /// The pool's backends, or none when `discovery` finds its backend.
    #[serde(default)]
    pub backends: Vec<Backend>,
    pub discovery: Option<Discovery>,
}

/// Where a pool without `backends` learns its backend.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Discovery {
    pub sentinel: Sentinel,
}

/// Redis Sentinel: the pool's one backend is the master that a majority
/// of the Sentinels name.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Sentinel {
    /// `host:port` of each Sentinel.
    pub addresses: Vec<String>,
    /// The name the Sentinels monitor the master by.
    pub master: String,
    /// A login for the Sentinels themselves (their `requirepass`).
    pub auth: Option<ProbeAuth>,
    /// What `addresses` resolved to: each address is one Sentinel's vote.
    #[serde(skip)]
    pub resolved: Vec<SocketAddr>,
}

/// What a backend marked down (by probes, maintenance, or leaving the
/// configuration) does to its open connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDown {
    /// They stay until either side closes them.
    Keep,
    /// Both sides are reset: a client mid-transaction sees an error rather
    /// than writing on to a demoted primary.
    Close,
}

/// Clients that no backend can take wait here, first in first out.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Queue {
    /// Clients that may wait at once; 0: none wait, they are turned away.
    #[serde(default)]
    pub size: u32,
    /// How long a client may wait before it is turned away.
    #[serde(default = "defaults::queue_timeout", with = "duration")]
    pub timeout: Duration,
}

impl Default for Queue {
    fn default() -> Self {
        Queue {
            size: 0,
            timeout: defaults::queue_timeout(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    Maglev,
    RoundRobin,
    WeightedRoundRobin,
    LeastConnections,
    Random,
    PowerOfTwo,
    /// The first backend up, in file order, takes every client.
    First,
}

impl Balance {
    /// As the configuration spells it.
    pub fn name(self) -> &'static str {
        match self {
            Balance::Maglev => "maglev",
            Balance::RoundRobin => "round_robin",
            Balance::WeightedRoundRobin => "weighted_round_robin",
            Balance::LeastConnections => "least_connections",
            Balance::Random => "random",
            Balance::PowerOfTwo => "power_of_two",
            Balance::First => "first",
        }
    }
}

/// What part of the client's address Maglev hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    #[default]
    SourceIp,
    SourceIpPort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    #[default]
    Auto,
    Splice,
    Copy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendProxy {
    #[default]
    Off,
    V1,
    V2,
}

/// `health: off`, or a mapping of probe settings. Absent means probes with
/// the defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Health {
    Off,
    #[default]
    Defaults,
    Probe(Box<HealthProbe>),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthProbe {
    #[serde(default = "defaults::health_interval", with = "duration")]
    pub interval: Duration,
    #[serde(default = "defaults::health_timeout", with = "duration")]
    pub timeout: Duration,
    #[serde(default = "defaults::rise")]
    pub rise: u32,
    #[serde(default = "defaults::fall")]
    pub fall: u32,
    pub send: Option<String>,
    pub expect: Option<String>,
    /// A ready-made exchange instead of `send`/`expect`.
    pub preset: Option<Preset>,
    /// Kept from before `role`: with `preset: redis`, the same as
    /// `role: primary`.
    #[serde(default)]
    pub require_master: bool,
    /// The role a backend must have to pass, with a preset that can tell.
    #[serde(default)]
    pub role: Role,
    /// The login a role check (or an authenticated preset) uses.
    pub auth: Option<ProbeAuth>,
    /// Probe this port of the backend's address instead of its own.
    pub port: Option<u16>,
    /// An HTTP/1.1 probe instead of send/expect or a preset.
    pub http: Option<HttpProbe>,
    /// Start each probe with the PROXY header the pool sends its
    /// connections, for backends that require one.
    #[serde(default)]
    pub send_proxy: bool,
    /// The header version when `send_proxy` is set: the pool's, filled in
    /// by validation.
    #[serde(skip)]
    pub proxy_version: SendProxy,
}

/// The role a database server plays in its replication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Whatever it is, it passes.
    #[default]
    Any,
    /// It accepts writes: a Redis master, a PostgreSQL server not in
    /// recovery, a MySQL server with `read_only` off.
    Primary,
    /// It is a replica (a standby): reads only.
    Replica,
}

/// A login for probes. The password is read from a file, never written in
/// the configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProbeAuth {
    /// Redis: omit for `AUTH password` (the default user).
    pub user: Option<String>,
    /// Its trailing newline is ignored; a relative name is looked up in
    /// `$CREDENTIALS_DIRECTORY`.
    pub password_file: Option<std::path::PathBuf>,
    /// PostgreSQL: the database to log in to (default: `postgres`);
    /// MySQL: the schema (default: none).
    pub database: Option<String>,
    /// The file's contents, read by validation: at start and at each
    /// reload, so a changed password takes effect with SIGHUP.
    #[serde(skip)]
    pub password: Option<Secret>,
}

/// A password: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// An HTTP/1.1 request that passes on one of the expected statuses.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpProbe {
    #[serde(default = "defaults::http_path")]
    pub path: String,
    #[serde(default = "defaults::http_method")]
    pub method: String,
    #[serde(default = "defaults::expect_status")]
    pub expect_status: Vec<u16>,
    /// The `Host` header; empty: the address probed.
    #[serde(default)]
    pub host: String,
}

/// The servers sluice knows how to probe without `send`/`expect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    Redis,
    Memcached,
    Postgres,
    Mysql,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// `ip:port`, `[ipv6]:port` or `host:port`; host names are resolved
    /// when the file is loaded.
    pub address: String,
    #[serde(default = "defaults::weight")]
    pub weight: u32,
    #[serde(default)]
    pub max_connections: u32,
    /// Gets clients only while no other backend of the pool is up.
    #[serde(default)]
    pub backup: bool,
    /// The backend's identity for hashing; defaults to `address`.
    pub name: Option<String>,
    /// What `address` resolved to, sorted: filled in by validation, and
    /// again whenever host names are re-resolved (or the Sentinels name
    /// another master).
    #[serde(skip)]
    pub resolved: Vec<SocketAddr>,
    /// Made by validation for a pool with `discovery`: its address is the
    /// master the Sentinels name, not a host name.
    #[serde(skip)]
    pub discovered: bool,
}

impl Backend {
    /// The name the backend is known by: in the Maglev table, logs and metrics.
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.address)
    }

    /// Whether `address` is a host name (resolved through DNS) rather than
    /// an IP literal.
    pub fn has_host_name(&self) -> bool {
        !self.discovered && self.address.parse::<SocketAddr>().is_err()
    }

    /// The entry a pool with `discovery` routes to: named after the master,
    /// with no address until the Sentinels name one.
    pub fn discovered(sentinel: &Sentinel) -> Backend {
        Backend {
            address: format!("sentinel:{}", sentinel.master),
            weight: 1,
            max_connections: 0,
            backup: false,
            name: Some(sentinel.master.clone()),
            resolved: Vec::new(),
            discovered: true,
        }
    }
}

/// One address to connect to, as a backend entry expands: an entry with an
/// IP address is one endpoint; an entry with a host name is one endpoint per
/// address it resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The backend's identity: the entry's name, or `NAME/IP` for each
    /// address of a host-name entry, however many it has, so that an
    /// address keeps its name (and with it its health, its load and its
    /// place in the Maglev table) when the host name gains or loses others.
    pub name: String,
    pub addr: SocketAddr,
    pub weight: u32,
    /// Applies to each address of the entry on its own.
    pub max_connections: u32,
    pub backup: bool,
}

impl Pool {
    /// Every endpoint of the pool, in file order.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        let mut endpoints = Vec::new();
        for backend in &self.backends {
            for &addr in &backend.resolved {
                let name = if backend.has_host_name() {
                    format!("{}/{}", backend.name(), addr.ip())
                } else {
                    backend.name().to_owned()
                };
                endpoints.push(Endpoint {
                    name,
                    addr,
                    weight: backend.weight,
                    max_connections: backend.max_connections,
                    backup: backend.backup,
                });
            }
        }
        endpoints
    }
}

impl Pool {
    /// The role probes require, if any: a pool that knows it serves one
    /// role fails closed and closes the sessions of a backend that leaves it.
    fn role(&self) -> Role {
        self.health.probe().map_or(Role::Any, |probe| probe.role)
    }

    pub fn fail_open(&self) -> bool {
        self.fail_open.unwrap_or(self.role() == Role::Any)
    }

    pub fn on_down(&self) -> OnDown {
        self.on_down.unwrap_or(match self.role() {
            Role::Any => OnDown::Keep,
            _ => OnDown::Close,
        })
    }
}

impl Health {
    /// The probe settings, or `None` with `health: off`.
    pub fn probe(&self) -> Option<HealthProbe> {
        match self {
            Health::Off => None,
            Health::Defaults => Some(HealthProbe::default()),
            Health::Probe(probe) => Some(HealthProbe::clone(probe)),
        }
    }
}

impl Default for HealthProbe {
    fn default() -> Self {
        HealthProbe {
            interval: defaults::health_interval(),
            timeout: defaults::health_timeout(),
            rise: defaults::rise(),
            fall: defaults::fall(),
            send: None,
            expect: None,
            preset: None,
            require_master: false,
            role: Role::Any,
            auth: None,
            port: None,
            http: None,
            send_proxy: false,
            proxy_version: SendProxy::Off,
        }
    }
}

/// A listening address: an IP literal and a non-zero port. Host names are not
/// accepted here, since what a listener binds must not depend on DNS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

mod defaults {
    use std::time::Duration;

    pub fn state_file() -> std::path::PathBuf {
        "/var/lib/sluice/state.json".into()
    }
    pub fn shutdown_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn backlog() -> u32 {
        1024
    }
    pub fn table_size() -> u64 {
        65537
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn retries() -> u32 {
        2
    }
    pub fn health_interval() -> Duration {
        Duration::from_secs(2)
    }
    pub fn health_timeout() -> Duration {
        Duration::from_secs(1)
    }
    pub fn rise() -> u32 {
        2
    }
    pub fn fall() -> u32 {
        3
    }
    pub fn weight() -> u32 {
        1
    }
    pub fn proxy_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn ipv6_prefix() -> u8 {
        64
    }
    pub fn queue_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn http_path() -> String {
        "/".into()
    }
    pub fn http_method() -> String {
        "GET".into()
    }
    pub fn expect_status() -> Vec<u16> {
        vec![200]
    }
}
