//! `sluice explain`: what a pool does with clients, from the configuration
//! file alone, computed by the code a running sluice routes with.
//!
//! This module owns the three questions an operator asks before changing a
//! pool: where a client goes and in which order its retries go
//! ([`client`]), where it would go while some backends are down
//! (`--without`), and what share of clients a new file would move, and
//! between which backends (`--remap`, [`remap`]). Each answer is text for
//! standard output; each error is one line.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use crate::balancer::maglev::{Maglev, Member};
use crate::config::{self, Balance, Config, HashKey};
use crate::snapshot::{Backend, Pool, Snapshot};

/// Pairs of backends the `--remap` table lists at most; the rest, and
/// pairs too small to show as a percentage with two decimals, are summed up.
const MAX_ROWS: usize = 20;

/// `sluice explain POOL CLIENT [--without NAME]...`: the client's backend
/// and retries; with `without`, also while those backends are down.
pub fn client(
    path: &Path,
    pool_name: &str,
    client: &str,
    without: &[String],
) -> Result<String, String> {
    let config = load(path, pool_name, &[Balance::Maglev, Balance::First])?;
    let settings = &config.pools[pool_name];
    let addr = client_addr(pool_name, settings.hash_key, client)?;
    let snapshot = Snapshot::from_config(&config);
    let pool = snapshot_pool(&snapshot, pool_name);
    let down = down_names(pool, without)?;

    let mut out = String::new();
    match settings.balance {
        Balance::First => writeln!(
            out,
            "pool:    {pool_name} (first: the first backend up in file order takes every client, {} backends)",
            pool.backends.len()
        ),
        _ => writeln!(
            out,
            "pool:    {pool_name} (maglev on {}, {} backends, {} slots)",
            hash_key_name(pool.hash_key),
            pool.backends.len(),
            pool.table_size()
        ),
    }
    .unwrap();
    let backups: Vec<String> = pool
        .backends
        .iter()
        .filter(|b| b.backup)
        .map(describe)
        .collect();
    if !backups.is_empty() {
        writeln!(
            out,
            "backups: {} (clients only while no other backend is up)",
            backups.join(", ")
        )
        .unwrap();
    }
    if settings.max_load_factor > 0.0 {
        writeln!(
            out,
            "note:    max_load_factor {}: live, a backend over its share of open \
             connections is passed over for the next in this order",
            settings.max_load_factor
        )
        .unwrap();
    }
    if !down.is_empty() {
        writeln!(out, "down:    {}", down.join(", ")).unwrap();
    }
    writeln!(out, "client:  {client}").unwrap();
    let all_up = route(pool, addr)?;
    if down.is_empty() {
        write_route(&mut out, &all_up);
        return Ok(out);
    }
    let rebuilt = pool.without(settings, &down);
    let order = route(&rebuilt, addr).unwrap_or_default();
    match order.is_empty() {
        true => writeln!(
            out,
            "backend: none: the pool does not fail open; clients {}",
            match rebuilt.queue.size {
                0 => "are turned away".to_owned(),
                size => format!(
                    "wait in its queue (up to {size}, {})",
                    humantime::format_duration(rebuilt.queue.timeout)
                ),
            }
        )
        .unwrap(),
        false => write_route(&mut out, &order),
    }
    if rebuilt.panic() {
        writeln!(
            out,
            "note:    every backend is down: sluice routes over all of them"
        )
        .unwrap();
    }
    if order.is_empty() {
        return Ok(out);
    }
    if order[0].name == all_up[0].name {
        writeln!(out, "moved:   no").unwrap();
    } else {
        writeln!(out, "moved:   yes, from {}", describe(all_up[0])).unwrap();
    }
    Ok(out)
}

/// `sluice explain --remap NEWFILE POOL [CLIENT]`: the share of clients
/// whose backend changes from the pool in `path` to the pool in `new_path`,
/// overall and for each pair of backends; with `client`, where it goes
/// before and after.
pub fn remap(
    path: &Path,
    new_path: &Path,
    pool_name: &str,
    client: Option<&str>,
) -> Result<String, String> {
    let before = load(path, pool_name, &[Balance::Maglev])?;
    let after = load(new_path, pool_name, &[Balance::Maglev])?;
    let (old, new) = (&before.pools[pool_name], &after.pools[pool_name]);
    if old.hash_key != new.hash_key {
        return Err(format!(
            "pool {pool_name:?} hashes on {} in {} but on {} in {}: clients' keys differ, \
             so the tables cannot be compared",
            hash_key_name(old.hash_key),
            path.display(),
            hash_key_name(new.hash_key),
            new_path.display()
        ));
    }
    let (old_table, new_table) = (Table::build(old), Table::build(new));
    for (table, file) in [(&old_table, path), (&new_table, new_path)] {
        if table.maglev.slots() == 0 {
            return Err(format!(
                "pool {pool_name:?} has no backend with a weight above 0 in {}",
                file.display()
            ));
        }
    }

    // Hashes (out of 2^64) that go from one backend to another, by name:
    // a backend keeps its clients when only its address changes.
    let mut pairs: HashMap<(&str, &str), u128> = HashMap::new();
    for ((i, j), hashes) in old_table.maglev.overlap(&new_table.maglev) {
        let (from, to) = (&*old_table.names[i], &*new_table.names[j]);
        if from != to {
            *pairs.entry((from, to)).or_default() += hashes;
        }
    }
    let moved = share(pairs.values().sum());

    let mut out = String::new();
    writeln!(
        out,
        "pool:    {pool_name} (maglev on {})",
        hash_key_name(old.hash_key)
    )
    .unwrap();
    writeln!(out, "before:  {}", old_table.describe(path)).unwrap();
    writeln!(out, "after:   {}", new_table.describe(new_path)).unwrap();
    write!(out, "moved:   {:.1}% of clients", moved * 100.0).unwrap();
    let slots = old_table.maglev.slots();
    if slots == new_table.maglev.slots() {
        // Both tables cut the hash space at the same places: whole slots move.
        let moved_slots = (moved * slots as f64).round() as u64;
        write!(out, " ({moved_slots} of {slots} slots)").unwrap();
    }
    out.push('\n');

    if let Some(client) = client {
        let addr = client_addr(pool_name, old.hash_key, client)?;
        let (old_snapshot, new_snapshot) = (
            Snapshot::from_config(&before),
            Snapshot::from_config(&after),
        );
        let first =
            |snapshot| route(snapshot_pool(snapshot, pool_name), addr).map(|order| order[0]);
        let (was, will) = (first(&old_snapshot)?, first(&new_snapshot)?);
        if was.name == will.name {
            writeln!(out, "client:  {client} stays on {}", describe(will)).unwrap();
        } else {
            let (was, will) = (describe(was), describe(will));
            writeln!(out, "client:  {client} moves from {was} to {will}").unwrap();
        }
    }

    write_moves(&mut out, &old_table, &new_table, pairs);
    Ok(out)
}

/// The table of `--remap`: the largest moves between pairs of backends,
/// with the share of clients each takes.
fn write_moves(out: &mut String, old: &Table, new: &Table, pairs: HashMap<(&str, &str), u128>) {
    let old_names: HashSet<&str> = old.names.iter().map(|n| &**n).collect();
    let new_names: HashSet<&str> = new.names.iter().map(|n| &**n).collect();
    let mut rows: Vec<(String, String, u128)> = pairs
        .into_iter()
        .map(|((from, to), hashes)| {
            let mut from = from.to_owned();
            if !new_names.contains(&*from) {
                from.push_str(" (removed)");
            }
            let mut to = to.to_owned();
            if !old_names.contains(&*to) {
                to.push_str(" (new)");
            }
            (from, to, hashes)
        })
        .collect();
    // Largest moves first; names break ties so that the output is stable.
    rows.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| (&a.0, &a.1).cmp(&(&b.0, &b.1))));
    let shown = rows
        .iter()
        .take(MAX_ROWS)
        .take_while(|row| share(row.2) >= 0.00005)
        .count();
    let rest: u128 = rows[shown..].iter().map(|row| row.2).sum();
    let hidden = rows.len() - shown;
    rows.truncate(shown);
    if !rows.is_empty() {
        let from_width = rows.iter().map(|row| row.0.len()).chain([4]).max().unwrap();
        let to_width = rows.iter().map(|row| row.1.len()).chain([2]).max().unwrap();
        writeln!(out, "\n{:from_width$}  {:to_width$}  clients", "from", "to").unwrap();
        for (from, to, hashes) in &rows {
            let percent = share(*hashes) * 100.0;
            writeln!(out, "{from:from_width$}  {to:to_width$}  {percent:6.2}%").unwrap();
        }
    }
    if hidden > 0 {
        let pairs = if hidden == 1 { "pair" } else { "pairs" };
        let percent = match share(rest) * 100.0 {
            tiny if tiny < 0.005 => "under 0.01".to_owned(),
            percent => format!("{percent:.2}"),
        };
        writeln!(out, "... and {hidden} more {pairs}: {percent}% of clients").unwrap();
    }
}

/// `hashes` out of the 2^64 key hashes, as a fraction.
fn share(hashes: u128) -> f64 {
    hashes as f64 / 2f64.powi(64)
}

/// A pool's Maglev table with every backend up, built as a running sluice
/// builds it, and the names its entries stand for.
struct Table {
    names: Vec<String>,
    maglev: Maglev,
}

impl Table {
    fn build(pool: &config::Pool) -> Table {
        let endpoints = pool.endpoints();
        let members: Vec<Member> = endpoints
            .iter()
            .map(|e| Member {
                name: &e.name,
                weight: e.weight,
            })
            .collect();
        let maglev = Maglev::build(&members, pool.table_size);
        let names = endpoints.into_iter().map(|e| e.name).collect();
        Table { names, maglev }
    }

    fn describe(&self, file: &Path) -> String {
        format!(
            "{} backends, {} slots ({})",
            self.names.len(),
            self.maglev.slots(),
            file.display()
        )
    }
}

/// Loads `path` and checks that it has a pool `pool` balanced by one of
/// `balances`: those that map a client to backends deterministically.
fn load(path: &Path, pool: &str, balances: &[Balance]) -> Result<Config, String> {
    let config = config::load(path).map_err(|e| e.to_string())?;
    let Some(settings) = config.pools.get(pool) else {
        let defined: Vec<&str> = config.pools.keys().map(String::as_str).collect();
        return Err(format!(
            "pool {pool:?} is not defined in {} (defined pools: {})",
            path.display(),
            defined.join(", ")
        ));
    };
    if settings.discovery.is_some() {
        return Err(format!(
            "pool {pool:?} takes its backend from Redis Sentinel when it runs: the file alone does not say which"
        ));
    }
    if !balances.contains(&settings.balance) {
        let names: Vec<&str> = balances.iter().map(|b| b.name()).collect();
        return Err(format!(
            "pool {pool:?} is not balanced by {}, and its algorithm does not map \
             clients to backends deterministically",
            names.join(" or ")
        ));
    }
    Ok(config)
}

/// The client as the pool's `hash_key` reads it.
fn client_addr(pool: &str, hash_key: HashKey, client: &str) -> Result<SocketAddr, String> {
    match (client.parse::<IpAddr>(), client.parse::<SocketAddr>()) {
        (Ok(_), _) if hash_key == HashKey::SourceIpPort => Err(format!(
            "pool {pool:?} hashes on source_ip_port: give the client as IP:PORT"
        )),
        (Ok(ip), _) => Ok(SocketAddr::new(ip, 0)),
        (_, Ok(addr)) => Ok(addr),
        _ => Err(format!("invalid client address {client:?}")),
    }
}

/// The endpoint names `without` stands for: a backend entry's name also
/// names every address its host name resolved to (`NAME/IP`).
fn down_names<'a>(pool: &'a Pool, without: &[String]) -> Result<Vec<&'a str>, String> {
    let mut down = Vec::new();
    for name in without {
        let prefix = format!("{name}/");
        let before = down.len();
        down.extend(
            pool.backends
                .iter()
                .map(|b| &*b.name)
                .filter(|b| b == name || b.starts_with(&prefix)),
        );
        if down.len() == before {
            let names: Vec<&str> = pool.backends.iter().map(|b| &*b.name).collect();
            return Err(format!(
                "pool {:?} has no backend {name:?} (backends: {})",
                pool.name,
                names.join(", ")
            ));
        }
    }
    Ok(down)
}

fn snapshot_pool<'a>(snapshot: &'a Snapshot, name: &str) -> &'a Pool {
    snapshot.pool(name).expect("`load` checked the pool")
}

/// The backends a connection from `client` tries, first choice first.
fn route(pool: &Pool, client: SocketAddr) -> Result<Vec<&Backend>, String> {
    let order: Vec<&Backend> = pool
        .candidates(client)
        .take(pool.retries as usize + 1)
        .collect();
    if order.is_empty() {
        return Err(format!(
            "pool {:?} has no backend with a weight above 0",
            pool.name
        ));
    }
    Ok(order)
}

fn write_route(out: &mut String, order: &[&Backend]) {
    let retries: Vec<String> = order[1..].iter().map(|b| describe(b)).collect();
    writeln!(out, "backend: {}", describe(order[0])).unwrap();
    writeln!(
        out,
        "retries: {}",
        if retries.is_empty() {
            "none".to_owned()
        } else {
            retries.join(", ")
        }
    )
    .unwrap();
}

fn describe(backend: &Backend) -> String {
    format!("{} ({})", backend.name, backend.addr)
}

fn hash_key_name(hash_key: HashKey) -> &'static str {
    match hash_key {
        HashKey::SourceIp => "source_ip",
        HashKey::SourceIpPort => "source_ip_port",
    }
}
