//! Checks that look across the whole file, run after serde has checked each
//! value on its own: references between sections, duplicates, limits, and
//! host-name resolution. The first problem found is reported.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, ToSocketAddrs};

use super::schema::{Balance, Config, Health, HealthProbe, Listener, Pool, SendProxy};
use super::Problem;
use crate::balancer::maglev;

/// Further backends a connection may try after the first; more than this
/// only delays the error a client sees.
pub const MAX_RETRIES: u32 = maglev::MAX_ATTEMPTS as u32 - 1;
/// Largest backend weight. Weights are relative, and Maglev gives a backend a
/// share of table slots in proportion to its weight.
pub const MAX_WEIGHT: u32 = 1000;

pub fn validate(config: &mut Config) -> Result<(), Problem> {
    reject_unsupported(config)?;
    if config.listeners.is_empty() {
        return Err(Problem::new("listeners", "no listeners are defined"));
    }
    for (name, listener) in &config.listeners {
        check_name("listeners", name)?;
        check_listener(name, listener, &config.pools)?;
    }
    check_listen_addresses(&config.listeners)?;
    for (name, pool) in &mut config.pools {
        check_name("pools", name)?;
        check_pool(name, pool)?;
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

fn check_pool(name: &str, pool: &mut Pool) -> Result<(), Problem> {
    let field = |key: &str| format!("pools.{name}.{key}");
    if pool.backends.is_empty() {
        return Err(Problem::new(
            field("backends"),
            "a pool needs at least one backend",
        ));
    }
    if pool.retries > MAX_RETRIES {
        return Err(Problem::new(
            field("retries"),
            format!("{} is more than the limit of {MAX_RETRIES}", pool.retries),
        ));
    }

    check_health(name, &pool.health)?;

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
            resolve(&backend.address).map_err(|m| Problem::new(here("address"), m))?;
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

fn check_health(pool: &str, health: &Health) -> Result<(), Problem> {
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
    Ok(())
}

/// Resolves `ip:port`, `[ipv6]:port` or `host:port` to its addresses,
/// sorted and without duplicates, so that the same answer in another order
/// changes nothing.
pub fn resolve(address: &str) -> Result<Vec<SocketAddr>, String> {
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
            (host, port)
                .to_socket_addrs()
                .map_err(|e| format!("cannot resolve host {host:?}: {e}"))?
                .collect()
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

/// Settings of the schema whose feature is not built yet are accepted at
/// their defaults and refused otherwise, so that nothing an operator asks for
/// is silently ignored.
fn reject_unsupported(config: &Config) -> Result<(), Problem> {
    let unsupported = |field: String, what: &str| {
        Err(Problem::new(
            field,
            format!("not supported yet in this version of sluice: {what}"),
        ))
    };
    for (name, listener) in &config.listeners {
        let field = |key: &str| format!("listeners.{name}.{key}");
        if listener.accept_proxy {
            return unsupported(field("accept_proxy"), "the PROXY protocol");
        }
        if listener.max_connections != 0 {
            return unsupported(field("max_connections"), "a connection limit");
        }
        if listener.rate_limit != Default::default() {
            return unsupported(field("rate_limit"), "rate limiting");
        }
    }
    for (name, pool) in &config.pools {
        let field = |key: &str| format!("pools.{name}.{key}");
        if pool.balance != Balance::Maglev {
            return unsupported(field("balance"), "a balance other than maglev");
        }
        if pool.max_load_factor != 0.0 {
            return unsupported(field("max_load_factor"), "bounded-load Maglev");
        }
        if !pool.idle_timeout.is_zero() {
            return unsupported(field("idle_timeout"), "an idle timeout");
        }
        if pool.send_proxy != SendProxy::Off {
            return unsupported(field("send_proxy"), "the PROXY protocol");
        }
        if let Health::Probe(HealthProbe {
            preset: Some(_), ..
        }) = pool.health
        {
            return unsupported(
                field("health.preset"),
                "probe presets (write `send` and `expect`)",
            );
        }
        for (i, backend) in pool.backends.iter().enumerate() {
            if backend.max_connections != 0 {
                return unsupported(
                    format!("pools.{name}.backends[{i}].max_connections"),
                    "a backend connection limit",
                );
            }
        }
    }
    Ok(())
}
