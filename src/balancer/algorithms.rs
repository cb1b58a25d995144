//! Every `balance` algorithm behind one interface: [`Balancer::candidates`]
//! gives, for a new connection, the backend to try first and the ones to try
//! after it if a connect fails.
//!
//! A balancer is built with its pool's snapshot from the backends that may
//! be chosen (up, or all of them in panic mode, and with a weight) and never
//! changes; what moves between connections is atomic: a rotation counter, and
//! the open-connection counts ([`Load`]) that `least_connections`,
//! `power_of_two` and bounded-load Maglev read. No lock is taken.
//!
//! - `maglev`: the client's preference order in the Maglev table. With
//!   `max_load_factor` c, a backend with more than c x its weighted share of
//!   the open connections (counting the new one) is passed over for the next
//!   in the client's order, and tried only after all the others ("Consistent
//!   Hashing with Bounded Loads", Mirrokni et al., 2018).
//! - `round_robin`: a fixed cycle in which each backend appears as often as
//!   its weight, interleaved as LVS does (3:2:1 gives a a b a b c).
//! - `weighted_round_robin`: the same, smooth as NGINX does it (3:2:1 gives
//!   a b a c b a): heavy backends' turns are spread out.
//! - `least_connections`: the fewest open connections per unit of weight;
//!   ties go round.
//! - `random`: weighted random.
//! - `power_of_two`: two weighted random picks, the less loaded one wins.
//! - `first`: the first eligible backend in file order, then the next:
//!   one writer, the same on every instance that sees the same health.
//!
//! After the first choice, the others follow in cycle order (Maglev: the
//! client's own order), so a failed connect moves on at once.
//!
//! Rotations start at a random point of their cycle, whenever a balancer is
//! built: otherwise every sluice started together, and every rebuild after a
//! health change, would send its first connections to the same backend.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::key_hash;
use super::load::Load;
use super::maglev::{Maglev, Member, Preference, MAX_ATTEMPTS};
use crate::config::{self, Balance, HashKey};

/// A cycle never gets longer than this; larger weights are scaled down
/// (keeping their ratios to within a part in 65536).
const MAX_CYCLE: u64 = 1 << 16;

/// A backend as a balancer sees it.
pub struct Choice<'a> {
    pub name: &'a str,
    /// Its weight, or 0 if it may not be chosen (down, or drained).
    pub weight: u32,
    pub load: &'a Arc<Load>,
}

pub struct Balancer {
    algorithm: Algorithm,
    /// The backends that may be chosen, as indices into the pool.
    eligible: Vec<Eligible>,
    /// For each backend of the pool, its place in `eligible`, if any.
    place: Vec<Option<usize>>,
    /// Sum of their weights.
    total_weight: u64,
}

struct Eligible {
    index: usize,
    weight: u32,
    load: Arc<Load>,
}

enum Algorithm {
    Maglev {
        table: Maglev,
        hash_key: HashKey,
        max_load_factor: f64,
    },
    /// A precomputed cycle of positions in `eligible`, and where it is.
    Cycle {
        cycle: Vec<u32>,
        next: AtomicUsize,
    },
    LeastConnections {
        next: AtomicUsize,
    },
    Random,
    PowerOfTwo,
    /// File order.
    First,
}

impl Balancer {
    pub fn build(config: &config::Pool, backends: &[Choice]) -> Balancer {
        let eligible: Vec<Eligible> = backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.weight > 0)
            .map(|(index, b)| Eligible {
                index,
                weight: b.weight,
                load: b.load.clone(),
            })
            .collect();
        let mut place = vec![None; backends.len()];
        for (i, e) in eligible.iter().enumerate() {
            place[e.index] = Some(i);
        }
        let total_weight = eligible.iter().map(|e| u64::from(e.weight)).sum();
        let weights: Vec<u32> = eligible.iter().map(|e| e.weight).collect();
        let algorithm = match config.balance {
            Balance::Maglev => {
                let members: Vec<Member> = backends
                    .iter()
                    .map(|b| Member {
                        name: b.name,
                        weight: b.weight,
                    })
                    .collect();
                Algorithm::Maglev {
                    table: Maglev::build(&members, config.table_size),
                    hash_key: config.hash_key,
                    max_load_factor: config.max_load_factor,
                }
            }
            Balance::RoundRobin => Algorithm::Cycle {
                cycle: interleaved_cycle(&scaled(&weights)),
                next: AtomicUsize::new(fastrand::usize(..)),
            },
            Balance::WeightedRoundRobin => Algorithm::Cycle {
                cycle: smooth_cycle(&scaled(&weights)),
                next: AtomicUsize::new(fastrand::usize(..)),
            },
            Balance::LeastConnections => Algorithm::LeastConnections {
                next: AtomicUsize::new(fastrand::usize(..)),
            },
            Balance::Random => Algorithm::Random,
            Balance::PowerOfTwo => Algorithm::PowerOfTwo,
            Balance::First => Algorithm::First,
        };
        Balancer {
            algorithm,
            eligible,
            place,
            total_weight,
        }
    }

    /// The backends to try for a new connection from `client`, best first,
    /// as indices into the pool; each at most once.
    pub fn candidates(&self, client: SocketAddr) -> Candidates<'_> {
        if self.eligible.is_empty() {
            return Candidates(Order::Cycle {
                eligible: &self.eligible,
                start: 0,
                taken: 0,
            });
        }
        let start = match &self.algorithm {
            Algorithm::Maglev {
                table,
                hash_key,
                max_load_factor,
            } => {
                let order = table.preference(key_hash(*hash_key, client));
                return Candidates(if *max_load_factor > 0.0 {
                    Order::Bounded(Bounded::new(order, self.capacity(*max_load_factor)))
                } else {
                    Order::Maglev(order)
                });
            }
            Algorithm::Cycle { cycle, next } => {
                cycle[next.fetch_add(1, Ordering::Relaxed) % cycle.len()] as usize
            }
            Algorithm::LeastConnections { next } => {
                self.least_loaded(next.fetch_add(1, Ordering::Relaxed))
            }
            Algorithm::First => 0,
            Algorithm::Random => self.weighted_random(),
            Algorithm::PowerOfTwo => {
                let (a, b) = (self.weighted_random(), self.weighted_random());
                if self.lighter(b, a) {
                    b
                } else {
                    a
                }
            }
        };
        Candidates(Order::Cycle {
            eligible: &self.eligible,
            start,
            taken: 0,
        })
    }

    /// The Maglev table's size, for `sluice explain`; 0 for other
    /// algorithms.
    pub fn table_size(&self) -> usize {
        match &self.algorithm {
            Algorithm::Maglev { table, .. } => table.slots(),
            _ => 0,
        }
    }

    /// Whether eligible backend `a` has fewer open connections per unit of
    /// weight than `b`.
    fn lighter(&self, a: usize, b: usize) -> bool {
        let (a, b) = (&self.eligible[a], &self.eligible[b]);
        u64::from(a.load.open()) * u64::from(b.weight)
            < u64::from(b.load.open()) * u64::from(a.weight)
    }

    /// The least loaded eligible backend, looking from `offset` on so that
    /// ties go round.
    fn least_loaded(&self, offset: usize) -> usize {
        let n = self.eligible.len();
        let start = offset % n;
        (1..n)
            .map(|step| (start + step) % n)
            .fold(
                start,
                |best, i| if self.lighter(i, best) { i } else { best },
            )
    }

    fn weighted_random(&self) -> usize {
        let mut point = fastrand::u64(0..self.total_weight);
        self.eligible
            .iter()
            .position(|e| {
                let inside = point < u64::from(e.weight);
                point = point.saturating_sub(u64::from(e.weight));
                inside
            })
            .expect("the point is below the total weight")
    }

    /// For bounded load: how many open connections each backend (by pool
    /// index) may have before it is passed over, counting the new one.
    fn capacity(&self, factor: f64) -> Capacity<'_> {
        let open: u64 = self.eligible.iter().map(|e| u64::from(e.load.open())).sum();
        Capacity {
            balancer: self,
            per_weight: factor * (open + 1) as f64 / self.total_weight as f64,
        }
    }
}

/// Bounded load's limit for one connection.
struct Capacity<'a> {
    balancer: &'a Balancer,
    per_weight: f64,
}

impl Capacity<'_> {
    /// Whether backend `index` of the pool has all the connections it may.
    fn full(&self, index: usize) -> bool {
        self.balancer.place[index].is_some_and(|place| {
            let e = &self.balancer.eligible[place];
            f64::from(e.load.open() + 1) > (self.per_weight * f64::from(e.weight)).ceil()
        })
    }
}

/// The backends to try for one connection, by pool index.
pub struct Candidates<'a>(Order<'a>);

enum Order<'a> {
    Maglev(Preference<'a>),
    Bounded(Bounded<'a>),
    /// Every eligible backend once, from `start` on, in cycle order.
    Cycle {
        eligible: &'a [Eligible],
        start: usize,
        taken: usize,
    },
}

impl Iterator for Candidates<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        match &mut self.0 {
            Order::Maglev(order) => order.next(),
            Order::Bounded(bounded) => bounded.next(),
            Order::Cycle {
                eligible,
                start,
                taken,
            } => {
                if *taken == eligible.len() {
                    return None;
                }
                let next = eligible[(*start + *taken) % eligible.len()].index;
                *taken += 1;
                Some(next)
            }
        }
    }
}

/// The client's Maglev order, backends over capacity moved to the end.
struct Bounded<'a> {
    order: Preference<'a>,
    capacity: Capacity<'a>,
    passed_over: [usize; MAX_ATTEMPTS],
    passed: usize,
    replayed: usize,
}

impl<'a> Bounded<'a> {
    fn new(order: Preference<'a>, capacity: Capacity<'a>) -> Bounded<'a> {
        Bounded {
            order,
            capacity,
            passed_over: [0; MAX_ATTEMPTS],
            passed: 0,
            replayed: 0,
        }
    }
}

impl Iterator for Bounded<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        for index in self.order.by_ref() {
            if !self.capacity.full(index) {
                return Some(index);
            }
            self.passed_over[self.passed] = index;
            self.passed += 1;
        }
        // Everyone in the client's order is full: the soft bound gives way.
        let index = *self.passed_over[..self.passed].get(self.replayed)?;
        self.replayed += 1;
        Some(index)
    }
}

/// `weights` divided by their greatest common divisor, then scaled down if
/// their sum would exceed [`MAX_CYCLE`] (each stays at least 1).
fn scaled(weights: &[u32]) -> Vec<u32> {
    let divisor = weights.iter().fold(0, |g, &w| gcd(g, w)).max(1);
    let reduced: Vec<u32> = weights.iter().map(|w| w / divisor).collect();
    let sum: u64 = reduced.iter().map(|&w| u64::from(w)).sum();
    if sum <= MAX_CYCLE {
        return reduced;
    }
    reduced
        .iter()
        .map(|&w| ((u64::from(w) * MAX_CYCLE / sum) as u32).max(1))
        .collect()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// LVS's weighted round robin: sweep the backends again and again, each
/// sweep taking those whose weight reaches a falling threshold.
fn interleaved_cycle(weights: &[u32]) -> Vec<u32> {
    let max = weights.iter().copied().max().unwrap_or(0);
    (1..=max)
        .rev()
        .flat_map(|threshold| {
            weights
                .iter()
                .enumerate()
                .filter(move |(_, &w)| w >= threshold)
                .map(|(i, _)| i as u32)
        })
        .collect()
}

/// NGINX's smooth weighted round robin: each turn, every backend gains its
/// weight, the one with the most goes and loses the total.
fn smooth_cycle(weights: &[u32]) -> Vec<u32> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    (0..total)
        .map(|_| {
            for (c, &w) in current.iter_mut().zip(weights) {
                *c += i64::from(w);
            }
            let best = (0..weights.len())
                .max_by_key(|&i| (current[i], std::cmp::Reverse(i)))
                .expect("a cycle is built only with backends");
            current[best] -= total;
            best as u32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(cycle: &[u32]) -> String {
        cycle.iter().map(|&i| (b'a' + i as u8) as char).collect()
    }

    #[test]
    fn smooth_weighted_round_robin_spreads_turns_as_nginx_does() {
        assert_eq!(names(&smooth_cycle(&[3, 2, 1])), "abacba");
        // The example in NGINX's own source.
        assert_eq!(names(&smooth_cycle(&[5, 1, 1])), "aabacaa");
        assert_eq!(names(&smooth_cycle(&[1, 1, 1])), "abc");
    }

    #[test]
    fn round_robin_gives_each_backend_its_weight_per_cycle() {
        assert_eq!(names(&interleaved_cycle(&[3, 2, 1])), "aababc");
        assert_eq!(names(&interleaved_cycle(&[1, 1, 1])), "abc");
    }

    #[test]
    fn weights_are_reduced_and_cycles_bounded() {
        assert_eq!(scaled(&[300, 200, 100]), [3, 2, 1]);
        let big = scaled(&[u32::MAX, 1, 7]);
        assert!(big.iter().map(|&w| u64::from(w)).sum::<u64>() <= MAX_CYCLE + 2);
        assert!(big.iter().all(|&w| w >= 1));
    }
}
