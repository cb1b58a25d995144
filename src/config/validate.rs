//! Checks that look across the whole file, run after serde has checked each
//! value on its own: references between sections, duplicates, limits, and
//! host-name resolution. The first problem found is reported.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use super::schema::{
    AcceptProxy, Backend, Balance, Config, Health, HttpProbe, Listener, Pool, Preset, ProbeAuth,
    Role, Secret, SendProxy, Sentinel,
};
use super::Problem;
use crate::balancer::maglev;

/// Further backends a connection may try after the first; more than this
/// only delays the error a client sees.
pub const MAX_RETRIES: u32 = maglev::MAX_ATTEMPTS as u32 - 1;
/// Largest backend weight. Weights are relative, and Maglev gives a backend a
/// share of table slots in proportion to its weight.
pub const MAX_WEIGHT: u32 = 1000;
/// Highest `rate_limit` rate: a connection a microsecond. Rate buckets
/// count in nanoseconds.
pub const MAX_RATE: u32 = 1_000_000;

/// How host names in backend addresses become addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolver {
    /// Ask the system's resolver (getaddrinfo).
    Dns,
    /// Every host name stands for 192.0.2.1 (TEST-NET-1) and nothing is
    /// asked of DNS: for fuzzing and property tests, which must send no
    /// packet anywhere.
    Offline,
}

pub fn validate(config: &mut Config, resolver: Resolver) -> Result<(), Problem> {
    if config.listeners.is_empty() {
        return Err(Problem::new("listeners", "no listeners are defined"));
    }
    for (name, listener) in &config.listeners {
        check_name("listeners", name)?;
        check_listener(name, listener, &config.pools)?;
    }
    check_listen_addresses(&config.listeners)?;
    if let Some(admin) = &mut config.admin {
        if !admin.token_file.as_os_str().is_empty() {
            let token = read_password(&admin.token_file)
                .map_err(|m| Problem::new("admin.token_file", m))?;
            admin.token = Some(Secret(token));
        }
    }
    for (name, pool) in &mut config.pools {
        check_name("pools", name)?;
        check_pool(name, pool, resolver)?;
    }
    Ok(())
}

/// Names appear in logs and as Prometheus label values, so keep them plain.
fn check_name(section: &str, name: &str) -> Result<(), Problem> {
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        Ok(())
    } else {
        Err(Problem::new(
            format!("{section}.{name}"),
            format!("invalid name {name:?}: use letters, digits, `_` and `-`"),
        ))
    }
}

fn check_listener(
    name: &str,
    listener: &Listener,
    pools: &BTreeMap<String, Pool>,
) -> Result<(), Problem> {
    if !pools.contains_key(&listener.pool) {
        let defined: Vec<&str> = pools.keys().map(String::as_str).collect();
        return Err(Problem::new(
            format!("listeners.{name}.pool"),
            format!(
                "pool {:?} is not defined (defined pools: {})",
                listener.pool,
                defined.join(", ")
            ),
        ));
    }
    if !(1..=65535).contains(&listener.backlog) {
        return Err(Problem::new(
            format!("listeners.{name}.backlog"),
            format!("{} is out of range: use 1 to 65535", listener.backlog),
        ));
    }
    if !(1..=128).contains(&listener.rate_limit.per_client.ipv6_prefix) {
        return Err(Problem::new(
            format!("listeners.{name}.rate_limit.per_client.ipv6_prefix"),
            format!(
                "{} is out of range: use 1 to 128 (64: a host's usual share)",
                listener.rate_limit.per_client.ipv6_prefix
            ),
        ));
    }
    if let AcceptProxy::On(sources) = &listener.accept_proxy {
        if sources.from.is_empty() {
            return Err(Problem::new(
                format!("listeners.{name}.accept_proxy.from"),
                "list the upstream balancers whose PROXY headers to believe (their addresses or ranges)",
            ));
        }
        if sources.timeout.is_zero() {
            return Err(Problem::new(
                format!("listeners.{name}.accept_proxy.timeout"),
                "must be above 0: a client that never sends its header would hold its place forever",
            ));
        }
    }
    let limit = &listener.rate_limit;
    for (key, rate, burst) in [
        ("rate_limit", limit.rate, limit.burst),
        (
            "rate_limit.per_client",
            limit.per_client.rate,
            limit.per_client.burst,
        ),
    ] {
        if rate == 0 && burst != 0 {
            return Err(Problem::new(
                format!("listeners.{name}.{key}.burst"),
                "a burst needs a rate (rate: 0 turns the limit off)",
            ));
        }
        if rate > MAX_RATE {
            return Err(Problem::new(
                format!("listeners.{name}.{key}.rate"),
                format!("{rate} is more than the limit of {MAX_RATE} new connections a second"),
            ));
        }
    }
    Ok(())
}

/// Two listeners may not bind the same address, nor the same port where one
/// of them is the wildcard of the same family: with SO_REUSEPORT the kernel
/// would accept both binds and quietly send each connection to only one.
fn check_listen_addresses(listeners: &BTreeMap<String, Listener>) -> Result<(), Problem> {
    let mut seen: Vec<(&str, SocketAddr)> = Vec::new();
    for (name, listener) in listeners {
        let addr = listener.listen.0;
        for &(other_name, other) in &seen {
            let overlap = addr == other
                || (addr.port() == other.port()
                    && addr.is_ipv4() == other.is_ipv4()
                    && (addr.ip().is_unspecified() || other.ip().is_unspecified()));
            if overlap {
                return Err(Problem::new(
                    format!("listeners.{name}.listen"),
                    format!("{addr} overlaps the address {other} of listener {other_name:?}"),
                ));
            }
        }
        seen.push((name, addr));
    }
    Ok(())
}

fn check_pool(name: &str, pool: &mut Pool, resolver: Resolver) -> Result<(), Problem> {
    let field = |key: &str| format!("pools.{name}.{key}");
    if let Some(discovery) = &mut pool.discovery {
        if !pool.backends.is_empty() {
            return Err(Problem::new(
                field("discovery"),
                "a pool finds its backend by discovery or lists its backends, not both",
            ));
        }
        check_sentinel(name, &mut discovery.sentinel, resolver)?;
    } else if pool.backends.is_empty() {
        return Err(Problem::new(
            field("backends"),
            "a pool needs at least one backend (or `discovery`)",
        ));
    }
    if pool.retries > MAX_RETRIES {
        return Err(Problem::new(
            field("retries"),
            format!("{} is more than the limit of {MAX_RETRIES}", pool.retries),
        ));
    }

    let factor = pool.max_load_factor;
    if factor != 0.0 && !(factor.is_finite() && factor > 1.0) {
        return Err(Problem::new(
            field("max_load_factor"),
            format!("{factor} is not above 1 (0 turns bounded load off; try 1.25)"),
        ));
    }
    if factor != 0.0 && pool.balance != Balance::Maglev {
        return Err(Problem::new(
            field("max_load_factor"),
            "bounded load applies to `balance: maglev` only",
        ));
    }

    check_health(name, &mut pool.health)?;
    if pool.queue.size > MAX_QUEUE {
        return Err(Problem::new(
            field("queue.size"),
            format!("{} is more than the limit of {MAX_QUEUE}", pool.queue.size),
        ));
    }
    if pool.queue.size > 0 && pool.queue.timeout.is_zero() {
        return Err(Problem::new(
            field("queue.timeout"),
            "clients would wait for ever: give a timeout above 0",
        ));
    }
    if let Health::Probe(probe) = &mut pool.health {
        if probe.send_proxy && pool.send_proxy == SendProxy::Off {
            return Err(Problem::new(
                field("health.send_proxy"),
                "probes send the pool's PROXY header: set `send_proxy: v1` or `v2` on the pool",
            ));
        }
        probe.proxy_version = if probe.send_proxy {
            pool.send_proxy
        } else {
            SendProxy::Off
        };
    }

    if let Some(discovery) = &pool.discovery {
        pool.backends = vec![Backend::discovered(&discovery.sentinel)];
        return Ok(());
    }
    let mut names: HashMap<String, usize> = HashMap::new();
    for (i, backend) in pool.backends.iter_mut().enumerate() {
        let here = |key: &str| format!("pools.{name}.backends[{i}].{key}");
        if backend.weight > MAX_WEIGHT {
            return Err(Problem::new(
                here("weight"),
                format!("{} is more than the limit of {MAX_WEIGHT}", backend.weight),
            ));
        }
        if backend.name().is_empty() || backend.name().contains('/') {
            return Err(Problem::new(
                here("name"),
                "a backend name may not be empty nor contain `/`",
            ));
        }
        if let Some(first) = names.insert(backend.name().to_owned(), i) {
            return Err(Problem::new(
                here(if backend.name.is_some() { "name" } else { "address" }),
                format!(
                    "duplicate backend name {:?} (also backends[{first}]); names must be unique in a pool",
                    backend.name()
                ),
            ));
        }
        backend.resolved =
            resolve(&backend.address, resolver).map_err(|m| Problem::new(here("address"), m))?;
    }
    // Two entries may not lead to one address (a host name and an IP, say).
    let mut owners: HashMap<SocketAddr, usize> = HashMap::new();
    for (i, backend) in pool.backends.iter().enumerate() {
        for addr in &backend.resolved {
            if let Some(first) = owners.insert(*addr, i).filter(|&first| first != i) {
                return Err(Problem::new(
                    format!("pools.{name}.backends[{i}].address"),
                    format!("{addr} is also the address of backends[{first}]"),
                ));
            }
        }
    }
    let endpoints = pool.backends.iter().map(|b| b.resolved.len()).sum();
    maglev::check_table_size(pool.table_size, endpoints)
        .map_err(|message| Problem::new(field("table_size"), message))?;
    Ok(())
}

fn check_health(pool: &str, health: &mut Health) -> Result<(), Problem> {
    let Health::Probe(probe) = health else {
        return Ok(());
    };
    let field = |key: &str| format!("pools.{pool}.health.{key}");
    if probe.interval.is_zero() {
        return Err(Problem::new(
            field("interval"),
            "must be above 0 (write `health: off` to disable probes)",
        ));
    }
    if probe.timeout.is_zero() || probe.timeout > probe.interval {
        return Err(Problem::new(
            field("timeout"),
            format!(
                "must be above 0 and at most the interval ({})",
                humantime::format_duration(probe.interval)
            ),
        ));
    }
    for (key, value) in [("rise", probe.rise), ("fall", probe.fall)] {
        if !(1..=100).contains(&value) {
            return Err(Problem::new(
                field(key),
                format!("{value} is out of range: use 1 to 100"),
            ));
        }
    }
    if probe.expect.as_deref() == Some("") {
        return Err(Problem::new(
            field("expect"),
            "an empty reply prefix matches anything: omit `expect` instead",
        ));
    }
    if probe.preset.is_some() && (probe.send.is_some() || probe.expect.is_some()) {
        return Err(Problem::new(
            field("preset"),
            "a preset decides what to send and expect: use either preset or send/expect",
        ));
    }
    if probe.require_master && probe.preset != Some(Preset::Redis) {
        return Err(Problem::new(
            field("require_master"),
            "applies only to `preset: redis`",
        ));
    }
    if probe.require_master {
        if probe.role == Role::Replica {
            return Err(Problem::new(
                field("require_master"),
                "contradicts `role: replica`: `require_master: true` means `role: primary`",
            ));
        }
        probe.role = Role::Primary;
    }
    if probe.port == Some(0) {
        return Err(Problem::new(field("port"), "port 0 is not allowed"));
    }
    if let Some(http) = &probe.http {
        check_http(http, &field)?;
        if probe.preset.is_some() || probe.send.is_some() || probe.expect.is_some() {
            return Err(Problem::new(
                field("http"),
                "an HTTP probe decides what to send and expect: use either http or preset or send/expect",
            ));
        }
    }
    let logs_in = matches!(
        probe.preset,
        Some(Preset::Redis | Preset::Postgres | Preset::Mysql)
    );
    if probe.role != Role::Any && !logs_in {
        return Err(Problem::new(
            field("role"),
            "needs a preset that can tell a primary from a replica: `preset: redis`, `postgres` or `mysql`",
        ));
    }
    if probe.auth.is_some() && !logs_in {
        return Err(Problem::new(
            field("auth"),
            "applies only to `preset: redis`, `postgres` or `mysql`",
        ));
    }
    let needs_user = probe.role != Role::Any && probe.preset != Some(Preset::Redis);
    if needs_user && probe.auth.as_ref().and_then(|a| a.user.as_ref()).is_none() {
        return Err(Problem::new(
            field("auth.user"),
            "the role check logs in: give the user it logs in as",
        ));
    }
    if let Some(auth) = &mut probe.auth {
        let required = (probe.preset == Some(Preset::Redis))
            .then_some("Redis logs in with a password: give the file that holds it");
        load_password(auth, required, &field)?;
    }
    Ok(())
}

/// Reads the password file of `auth` into it. `required`: what to say if
/// there is none and one is needed.
fn load_password(
    auth: &mut ProbeAuth,
    required: Option<&str>,
    field: &impl Fn(&str) -> String,
) -> Result<(), Problem> {
    let Some(path) = &auth.password_file else {
        return match required {
            Some(why) => Err(Problem::new(field("auth.password_file"), why)),
            None => Ok(()),
        };
    };
    let password = read_password(path).map_err(|m| Problem::new(field("auth.password_file"), m))?;
    auth.password = Some(Secret(password));
    Ok(())
}

/// The Sentinels of a `discovery: { sentinel }`: each address resolved
/// (every address of a host name is one Sentinel's vote), the master's name
/// plain, the login's password read.
fn check_sentinel(pool: &str, sentinel: &mut Sentinel, resolver: Resolver) -> Result<(), Problem> {
    let field = |key: &str| format!("pools.{pool}.discovery.sentinel.{key}");
    if sentinel.addresses.is_empty() {
        return Err(Problem::new(
            field("addresses"),
            "list the Sentinels to ask (three or more, so that a majority can be had)",
        ));
    }
    let mut resolved = Vec::new();
    for (i, address) in sentinel.addresses.iter().enumerate() {
        let addrs = resolve(address, resolver).map_err(|m| {
            Problem::new(format!("pools.{pool}.discovery.sentinel.addresses[{i}]"), m)
        })?;
        resolved.extend(addrs);
    }
    resolved.sort();
    resolved.dedup();
    sentinel.resolved = resolved;
    let plain = |c: char| c.is_ascii_graphic();
    if sentinel.master.is_empty()
        || !sentinel.master.chars().all(plain)
        || sentinel.master.contains('/')
    {
        return Err(Problem::new(
            field("master"),
            "the master's name as the Sentinels know it: printable, without spaces or `/`",
        ));
    }
    if let Some(auth) = &mut sentinel.auth {
        let required = "Sentinels log in with a password: give the file that holds it";
        load_password(auth, Some(required), &field)?;
    }
    Ok(())
}

/// Largest `queue.size`: waiting clients hold a descriptor each.
pub const MAX_QUEUE: u32 = 100_000;

/// Reads a password file: a relative name is one of systemd's credentials
/// (`LoadCredential=`), in `$CREDENTIALS_DIRECTORY`. One trailing newline
/// (`\n` or `\r\n`) is not part of the password.
pub fn read_password(path: &Path) -> Result<String, String> {
    let full = if path.is_absolute() {
        path.to_owned()
    } else {
        match std::env::var_os("CREDENTIALS_DIRECTORY") {
            Some(dir) => Path::new(&dir).join(path),
            None => {
                return Err(format!(
                    "{} is a relative name, which is looked up in $CREDENTIALS_DIRECTORY (systemd's LoadCredential=), but that is not set: give an absolute path",
                    path.display()
                ))
            }
        }
    };
    let text = std::fs::read_to_string(&full)
        .map_err(|e| format!("cannot read {}: {e}", full.display()))?;
    let password = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if password.is_empty() {
        return Err(format!("{} is empty", full.display()));
    }
    Ok(password.to_owned())
}

fn check_http(http: &HttpProbe, field: &impl Fn(&str) -> String) -> Result<(), Problem> {
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    if !token(&http.method) {
        return Err(Problem::new(
            field("http.method"),
            format!("{:?} is not an HTTP method", http.method),
        ));
    }
    let printable = |s: &str| s.bytes().all(|b| b.is_ascii_graphic());
    if !http.path.starts_with('/') || !printable(&http.path) {
        return Err(Problem::new(
            field("http.path"),
            format!(
                "{:?} is not a path: it starts with `/` and has no spaces",
                http.path
            ),
        ));
    }
    if !printable(&http.host) {
        return Err(Problem::new(
            field("http.host"),
            format!("{:?} is not a host name", http.host),
        ));
    }
    if http.expect_status.is_empty() {
        return Err(Problem::new(
            field("http.expect_status"),
            "no status could pass: list at least one",
        ));
    }
    if let Some(bad) = http
        .expect_status
        .iter()
        .find(|s| !(100..=599).contains(*s))
    {
        return Err(Problem::new(
            field("http.expect_status"),
            format!("{bad} is not an HTTP status (100 to 599)"),
        ));
    }
    Ok(())
}

/// How long a host name's lookup may take: a resolver that does not answer
/// must not hold a reload (or a start) for the minutes its retries take.
pub const LOOKUP_TIME_LIMIT: Duration = Duration::from_secs(10);

/// Asks the system's resolver for `host`, giving up after
/// [`LOOKUP_TIME_LIMIT`]. getaddrinfo cannot be cancelled: it runs on a
/// thread of its own, left to finish (within the resolver's own retries)
/// when the answer is no longer awaited.
fn lookup(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let (answer, answered) = mpsc::channel();
    let name = host.to_owned();
    std::thread::Builder::new()
        .name("sluice-lookup".into())
        .spawn(move || {
            let addrs = (name.as_str(), port)
                .to_socket_addrs()
                .map(Iterator::collect::<Vec<_>>);
            let _ = answer.send(addrs);
        })
        .map_err(|e| format!("cannot start a thread to look it up: {e}"))?;
    match answered.recv_timeout(LOOKUP_TIME_LIMIT) {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {}s", LOOKUP_TIME_LIMIT.as_secs())),
    }
}

/// Resolves `ip:port`, `[ipv6]:port` or `host:port` to its addresses,
/// sorted and without duplicates, so that the same answer in another order
/// changes nothing.
pub fn resolve(address: &str, resolver: Resolver) -> Result<Vec<SocketAddr>, String> {
    let invalid = || {
        format!("invalid socket address {address:?} (expected ip:port, [ipv6]:port or host:port)")
    };
    let mut addrs = match address.parse::<SocketAddr>() {
        Ok(addr) => vec![addr],
        Err(_) => {
            let (host, port) = address.rsplit_once(':').ok_or_else(invalid)?;
            let port: u16 = port.parse().map_err(|_| {
                format!("invalid socket address {address:?}: port must be 1 to 65535")
            })?;
            if host.is_empty() || host.contains(':') || host.starts_with('[') {
                return Err(invalid());
            }
            match resolver {
                Resolver::Dns => {
                    lookup(host, port).map_err(|e| format!("cannot resolve host {host:?}: {e}"))?
                }
                Resolver::Offline => vec![SocketAddr::from(([192, 0, 2, 1], port))],
            }
        }
    };
    if addrs.is_empty() {
        return Err(format!("host of {address:?} has no addresses"));
    }
    if addrs[0].port() == 0 {
        return Err(format!(
            "invalid socket address {address:?}: port 0 is not allowed"
        ));
    }
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}
