//! Admission of new connections on a listener: its `max_connections` and its
//! `rate_limit`, for the listener as a whole and per client address.
//!
//! Both are checked as soon as a connection is accepted, before any backend
//! is chosen; a connection turned away is closed at once and counted as
//! `over_limit`. The open-connection count lives as long as the listener, so
//! a reload that keeps the listener keeps counting the connections it already
//! has; rate buckets are kept too, unless the reload changes the limits.
//!
//! Rates are kept as a token bucket in its lock-free form (GCRA, the
//! "generic cell rate algorithm"): one atomic word per bucket, the time at
//! which the bucket will be full again. Per-client buckets live in a map
//! split into shards, each behind its own mutex, held only to read and
//! update one entry. An IPv6 client is its /64 (settable): a host given a
//! /64 must not dodge its limit by rotating addresses.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use crate::balancer::load::{Lease, Load};
use crate::config::schema::{ClientRate, Listener, RateLimit, TokenBucket};

/// What a listener lets in.
pub struct Gate {
    /// The settings the gate was built from.
    rate_limit: RateLimit,
    max_connections: u32,
    open: Arc<Load>,
    rate: Option<Bucket>,
    per_client: Option<ClientBuckets>,
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooManyConnections,
    Rate,
    ClientRate,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::TooManyConnections => "the listener's max_connections are open",
            Refusal::Rate => "over the listener's rate_limit",
            Refusal::ClientRate => "over the rate_limit per client",
        })
    }
}

impl Gate {
    /// The gate for `listener`, counting open connections in `open`.
    pub fn new(listener: &Listener, open: Arc<Load>) -> Gate {
        let limit = &listener.rate_limit;
        Gate {
            rate_limit: limit.clone(),
            max_connections: listener.max_connections,
            open,
            rate: Bucket::new(&TokenBucket {
                rate: limit.rate,
                burst: limit.burst,
            }),
            per_client: ClientBuckets::new(&limit.per_client, SWEEP_AT, SHARD_CAPACITY),
        }
    }

    /// The open-connection count, to carry over to the next gate of the
    /// same listener.
    pub fn open(&self) -> &Arc<Load> {
        &self.open
    }

    /// Whether this gate enforces `listener`'s limits as they are now: if
    /// so, it is kept (with its buckets) when a new snapshot is built.
    pub fn enforces(&self, listener: &Listener) -> bool {
        self.max_connections == listener.max_connections && self.rate_limit == listener.rate_limit
    }

    /// Counts a new connection until the lease is dropped, unless the
    /// listener has its `max_connections` open.
    pub fn enter(&self) -> Result<Lease, Refusal> {
        self.open
            .lease(self.max_connections)
            .ok_or(Refusal::TooManyConnections)
    }

    /// Takes a token for a new connection from `client` at `now`, or says
    /// which rate it is over.
    pub fn pace(&self, client: IpAddr, now: Instant) -> Result<(), Refusal> {
        self.pace_client(client, now)?;
        self.pace_listener(now)
    }

    /// Takes a token of the listener-wide rate: for a connection that is
    /// to send a PROXY header, before it has (the client is known after).
    pub fn pace_listener(&self, now: Instant) -> Result<(), Refusal> {
        match &self.rate {
            None => Ok(()),
            Some(rate) if rate.take(nanos(now)) => Ok(()),
            Some(_) => Err(Refusal::Rate),
        }
    }

    /// Takes a token of `client`'s own rate (the address a PROXY header
    /// carries, if any).
    pub fn pace_client(&self, client: IpAddr, now: Instant) -> Result<(), Refusal> {
        match &self.per_client {
            None => Ok(()),
            Some(per_client) if per_client.take(client, nanos(now)) => Ok(()),
            Some(_) => Err(Refusal::ClientRate),
        }
    }
}

/// `now` in the clock of every bucket: nanoseconds since the first time a
/// bucket was asked.
fn nanos(now: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    now.saturating_duration_since(*EPOCH.get_or_init(|| now))
        .as_nanos() as u64
}

/// A token bucket's shape: a token every `interval` ns, and room for
/// `burst` of them, kept as the tolerance GCRA allows ahead of schedule.
#[derive(Clone, Copy)]
struct Shape {
    interval: u64,
    tolerance: u64,
}

impl Shape {
    /// `None` when `rate` is 0 (no limit). A burst of 0 is one second's
    /// worth of tokens.
    fn new(bucket: &TokenBucket) -> Option<Shape> {
        if bucket.rate == 0 {
            return None;
        }
        let burst = if bucket.burst == 0 {
            bucket.rate
        } else {
            bucket.burst
        };
        let interval = 1_000_000_000 / u64::from(bucket.rate);
        Some(Shape {
            interval,
            tolerance: interval * u64::from(burst - 1),
        })
    }

    /// GCRA: given the time the bucket is full again (`full_at`), whether
    /// a token is there `now`, and the new `full_at` if so.
    fn take(&self, full_at: u64, now: u64) -> Option<u64> {
        let full_at = full_at.max(now);
        (full_at - now <= self.tolerance).then_some(full_at + self.interval)
    }
}

/// One bucket shared by all workers.
struct Bucket {
    shape: Shape,
    full_at: AtomicU64,
}

impl Bucket {
    fn new(bucket: &TokenBucket) -> Option<Bucket> {
        Some(Bucket {
            shape: Shape::new(bucket)?,
            full_at: AtomicU64::new(0),
        })
    }

    fn take(&self, now: u64) -> bool {
        self.full_at
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |full_at| {
                self.shape.take(full_at, now)
            })
            .is_ok()
    }
}

/// Shards of the per-client map: enough that two workers rarely meet.
const SHARDS: usize = 16;

/// Entries a shard holds before the first sweep of those whose bucket is
/// full again (and so carry no information). After a sweep, the next comes
/// when the shard has doubled, so sweeping costs O(1) per connection.
const SWEEP_AT: usize = 4096;

/// Entries a shard never grows beyond: 1M client addresses in all. A new
/// address that finds its shard full of live buckets is not limited (fails
/// open) rather than turned away for others' sake; a full shard is swept
/// again at most once a second, so that buckets that have filled up since
/// make room.
const SHARD_CAPACITY: usize = 65536;

/// How often a full shard is swept at most, in nanoseconds.
const FULL_SWEEP_EVERY: u64 = 1_000_000_000;

/// One bucket per client.
struct ClientBuckets {
    shape: Shape,
    /// An IPv6 client is its address's first this many bits.
    ipv6_prefix: u8,
    hasher: RandomState,
    shards: [Mutex<Shard>; SHARDS],
    sweep_at: usize,
    capacity: usize,
}

#[derive(Default)]
struct Shard {
    /// When each client's bucket is full again.
    full_at: HashMap<IpAddr, u64>,
    /// Size at which the next sweep runs; 0 until the first.
    sweep_at: usize,
    /// When the last sweep ran.
    swept: u64,
}

impl ClientBuckets {
    /// Buckets for `rate`, with shards swept first at `sweep_at` entries
    /// and holding at most `capacity`.
    fn new(rate: &ClientRate, sweep_at: usize, capacity: usize) -> Option<ClientBuckets> {
        Some(ClientBuckets {
            shape: Shape::new(&TokenBucket {
                rate: rate.rate,
                burst: rate.burst,
            })?,
            ipv6_prefix: rate.ipv6_prefix,
            hasher: RandomState::new(),
            shards: Default::default(),
            sweep_at,
            capacity,
        })
    }

    fn take(&self, client: IpAddr, now: u64) -> bool {
        let client = client_key(client, self.ipv6_prefix);
        let shard = self.hasher.hash_one(client) as usize % SHARDS;
        let mut shard = self.shards[shard]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let full = shard.full_at.len() >= self.capacity;
        let due = shard.full_at.len() >= shard.sweep_at.max(self.sweep_at)
            && (!full || now.saturating_sub(shard.swept) >= FULL_SWEEP_EVERY);
        if due {
            shard.full_at.retain(|_, full_at| *full_at > now);
            // Never beyond the capacity: a shard kept more than half full
            // by the sweep would otherwise never be swept again, and admit
            // every new client unlimited for good.
            shard.sweep_at = (2 * shard.full_at.len()).min(self.capacity);
            shard.swept = now;
        }
        if shard.full_at.len() >= self.capacity && !shard.full_at.contains_key(&client) {
            return true;
        }
        let full_at = shard.full_at.entry(client).or_insert(0);
        match self.shape.take(*full_at, now) {
            Some(next) => {
                *full_at = next;
                true
            }
            None => false,
        }
    }
}

/// The bucket a client address falls in: itself, or for IPv6 its first
/// `ipv6_prefix` bits. An IPv4 client seen through an IPv6 socket is itself.
fn client_key(client: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match client.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let mask = u128::MAX
                .checked_shl(128 - u32::from(ipv6_prefix))
                .unwrap_or(0);
            IpAddr::V6((bits & mask).into())
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn bucket(rate: u32, burst: u32) -> Bucket {
        Bucket::new(&TokenBucket { rate, burst }).unwrap()
    }

    #[test]
    fn a_burst_passes_at_once_then_the_rate_holds() {
        let b = bucket(10, 5);
        let start = 7 * SECOND;
        assert!((0..5).all(|_| b.take(start)), "the burst");
        assert!(!b.take(start), "one more at once");
        assert!(
            b.take(start + SECOND / 10),
            "a token a tenth of a second on"
        );
        assert!(!b.take(start + SECOND / 10));
        // A quiet second fills the bucket again, but no further.
        let later = start + 2 * SECOND;
        assert!((0..5).all(|_| b.take(later)));
        assert!(!b.take(later));
    }

    #[test]
    fn no_burst_means_one_seconds_worth() {
        let b = bucket(3, 0);
        assert!((0..3).all(|_| b.take(SECOND)));
        assert!(!b.take(SECOND));
        assert!(Bucket::new(&TokenBucket { rate: 0, burst: 9 }).is_none());
    }

    fn per_client(ipv6_prefix: u8) -> ClientBuckets {
        let rate = ClientRate {
            rate: 1,
            burst: 1,
            ipv6_prefix,
        };
        ClientBuckets::new(&rate, SWEEP_AT, SHARD_CAPACITY).unwrap()
    }

    #[test]
    fn an_ipv6_client_is_its_prefix() {
        let buckets = per_client(64);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(buckets.take(ip("2001:db8:1:2::1"), SECOND));
        assert!(
            !buckets.take(ip("2001:db8:1:2:ffff::9"), SECOND),
            "the same /64"
        );
        assert!(buckets.take(ip("2001:db8:1:3::1"), SECOND), "another /64");
        let buckets = per_client(128);
        assert!(buckets.take(ip("2001:db8:1:2::1"), SECOND));
        assert!(buckets.take(ip("2001:db8:1:2::2"), SECOND));
    }

    #[test]
    fn a_full_shard_is_swept_again_once_buckets_fill_up() {
        // Shards of 16, swept first at 4: they fill with live buckets.
        let rate = ClientRate {
            rate: 1,
            burst: 1,
            ipv6_prefix: 64,
        };
        let buckets = ClientBuckets::new(&rate, 4, 16).unwrap();
        let client = |i: u32| IpAddr::from(Ipv4Addr::from(0x0a00_0000 + i));
        for i in 0..16 * SHARDS as u32 * 4 {
            buckets.take(client(i), SECOND);
        }
        // Every bucket is full again two seconds later: a client is
        // limited again, not let through for want of room.
        let later = 3 * SECOND + FULL_SWEEP_EVERY;
        let someone = client(1_000_000);
        assert!(buckets.take(someone, later));
        assert!(
            !buckets.take(someone, later),
            "limited: the shard was swept"
        );
    }

    #[test]
    fn each_client_has_its_own_bucket() {
        let buckets = per_client(64);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert!(buckets.take(a, SECOND));
        assert!(!buckets.take(a, SECOND));
        assert!(buckets.take(b, SECOND));
        // IPv4 seen through an IPv6 socket is the same client.
        assert!(!buckets.take("::ffff:10.0.0.1".parse().unwrap(), SECOND));
    }
}
