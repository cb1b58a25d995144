//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016, section 3.4).
//!
//! A lookup table of `M` slots (M prime) is filled by letting each backend
//! claim slots in the order of its own permutation of `0..M`, taking turns.
//! Because every backend's permutation depends only on its name, removing a
//! backend changes little more than the slots it owned, and the table is the
//! same in every process that has the same set of backends.
//!
//! Determinism is part of the contract (SPEC "Consistent hashing rules"):
//! backends are sorted by name before the table is built, and all hashing
//! uses xxh3 with fixed seeds, never a per-process random key. Changing a
//! seed, the hash, or the fill order remaps live clients; the golden-vector
//! test exists to make such a change a deliberate decision.

use std::collections::HashMap;

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Seeds of the two hashes that give each backend its permutation.
const OFFSET_SEED: u64 = 0x736c_7569_6365_0001;
const SKIP_SEED: u64 = 0x736c_7569_6365_0002;

/// Most backends one lookup yields: the first choice and up to 15 retries.
pub const MAX_ATTEMPTS: usize = 16;

/// Largest table: 64 MiB of slots. The largest prime below 2^24.
pub const MAX_TABLE_SIZE: u64 = 16_777_213;

/// Slots per backend the table must at least have: with fewer, shares of
/// equal backends stray more than 1% from equal.
pub const SLOTS_PER_BACKEND: u64 = 100;

const EMPTY: u32 = u32::MAX;

/// One backend as the table sees it.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    pub name: &'a str,
    /// Relative share of the slots; 0 keeps the backend out of the table.
    pub weight: u32,
}

/// A built lookup table. Entries are indices into the slice given to
/// [`Maglev::build`], whatever order it was in.
#[derive(Debug, Clone)]
pub struct Maglev {
    table: Box<[u32]>,
    /// Backends that own at least one slot.
    members: usize,
}

impl Maglev {
    /// Builds the table for `backends` with `table_size` slots, which must
    /// have passed [`check_table_size`].
    pub fn build(backends: &[Member<'_>], table_size: u64) -> Maglev {
        let size = table_size;
        let mut order: Vec<usize> = (0..backends.len())
            .filter(|&i| backends[i].weight > 0)
            .collect();
        order.sort_by(|&a, &b| backends[a].name.cmp(backends[b].name));
        if order.is_empty() {
            return Maglev {
                table: Box::new([]),
                members: 0,
            };
        }

        // Each backend's permutation is position_j = (offset + j * skip) mod M;
        // with M prime and 0 < skip < M it visits every slot once.
        struct Turn {
            index: u32,
            weight: u64,
            position: u64,
            skip: u64,
            taken: u64,
        }
        let mut turns: Vec<Turn> = order
            .iter()
            .map(|&i| {
                let name = backends[i].name.as_bytes();
                Turn {
                    index: i as u32,
                    weight: u64::from(backends[i].weight),
                    position: xxh3_64_with_seed(name, OFFSET_SEED) % size,
                    skip: xxh3_64_with_seed(name, SKIP_SEED) % (size - 1) + 1,
                    taken: 0,
                }
            })
            .collect();
        let max_weight = turns.iter().map(|t| t.weight).max().unwrap_or(1);

        let mut table = vec![EMPTY; size as usize].into_boxed_slice();
        let mut filled = 0u64;
        // In round r a backend may hold up to r * weight / max_weight slots, so
        // slots are shared in proportion to weight (integer arithmetic, so
        // every machine fills the table identically).
        'rounds: for round in 1u64.. {
            for turn in &mut turns {
                if turn.taken * max_weight >= round * turn.weight {
                    continue;
                }
                while table[turn.position as usize] != EMPTY {
                    turn.position = (turn.position + turn.skip) % size;
                }
                table[turn.position as usize] = turn.index;
                turn.position = (turn.position + turn.skip) % size;
                turn.taken += 1;
                filled += 1;
                if filled == size {
                    break 'rounds;
                }
            }
        }
        let members = turns.iter().filter(|t| t.taken > 0).count();
        Maglev { table, members }
    }

    /// Number of slots (0 when no backend has weight).
    pub fn slots(&self) -> usize {
        self.table.len()
    }

    /// The backend for `key_hash`, or `None` if no backend has weight.
    #[inline]
    pub fn lookup(&self, key_hash: u64) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        Some(self.table[self.slot(key_hash)] as usize)
    }

    /// The key's preference order: its backend, then the distinct backends
    /// met walking the table onwards from its slot. Retries follow this order,
    /// so they are as deterministic as the first choice. Allocates nothing.
    pub fn preference(&self, key_hash: u64) -> Preference<'_> {
        Preference {
            table: &self.table,
            start: if self.table.is_empty() {
                0
            } else {
                self.slot(key_hash)
            },
            steps: 0,
            seen: [EMPTY; MAX_ATTEMPTS],
            yielded: 0,
            limit: self.members.min(MAX_ATTEMPTS),
        }
    }

    /// The largest relative difference between a backend's share of slots
    /// and its share of the total weight: 0.01 means some backend owns 1%
    /// more or fewer slots than its weight asks for. `backends` must be the
    /// slice the table was built from.
    pub fn share_error(&self, backends: &[Member<'_>]) -> f64 {
        let mut owned = vec![0u64; backends.len()];
        for &b in self.table.iter() {
            owned[b as usize] += 1;
        }
        let total_weight: u64 = backends.iter().map(|m| u64::from(m.weight)).sum();
        backends
            .iter()
            .zip(owned)
            .filter(|(m, _)| m.weight > 0)
            .map(|(m, count)| {
                let ideal = self.slots() as f64 * f64::from(m.weight) / total_weight as f64;
                (count as f64 - ideal).abs() / ideal
            })
            .fold(0.0, f64::max)
    }

    /// How the key hashes move from this table to `other`, which may have
    /// another size: for each pair (backend here, backend there), how many
    /// of the 2^64 hashes map to both. Clients' hashes are uniform, so these
    /// are shares of clients. Empty if either table is.
    pub fn overlap(&self, other: &Maglev) -> HashMap<(usize, usize), u128> {
        let mut shares = HashMap::new();
        if self.table.is_empty() || other.table.is_empty() {
            return shares;
        }
        // Walk both partitions of the hash space into slots at once.
        let (mut i, mut j, mut from) = (0, 0, 0u128);
        while i < self.slots() && j < other.slots() {
            let (end_i, end_j) = (self.first_hash(i + 1), other.first_hash(j + 1));
            let end = end_i.min(end_j);
            let pair = (self.table[i] as usize, other.table[j] as usize);
            *shares.entry(pair).or_default() += end - from;
            from = end;
            i += usize::from(end == end_i);
            j += usize::from(end == end_j);
        }
        shares
    }

    /// The smallest hash that [`Maglev::slot`] maps to `slot`, as 128 bits so
    /// that the end of the last slot, 2^64, fits.
    fn first_hash(&self, slot: usize) -> u128 {
        ((slot as u128) << 64).div_ceil(self.table.len() as u128)
    }

    /// Maps a 64-bit hash onto a slot without a division (Lemire's
    /// multiply-shift reduction).
    #[inline]
    fn slot(&self, key_hash: u64) -> usize {
        ((u128::from(key_hash) * self.table.len() as u128) >> 64) as usize
    }
}

/// Iterator over a key's backends in preference order; see
/// [`Maglev::preference`].
pub struct Preference<'a> {
    table: &'a [u32],
    start: usize,
    steps: usize,
    seen: [u32; MAX_ATTEMPTS],
    yielded: usize,
    limit: usize,
}

impl Iterator for Preference<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.yielded >= self.limit {
            return None;
        }
        while self.steps < self.table.len() {
            let slot = (self.start + self.steps) % self.table.len();
            self.steps += 1;
            let candidate = self.table[slot];
            if !self.seen[..self.yielded].contains(&candidate) {
                self.seen[self.yielded] = candidate;
                self.yielded += 1;
                return Some(candidate as usize);
            }
        }
        None
    }
}

/// The smallest valid table size for `backends`, and never below the
/// default of 65537.
pub fn recommended_table_size(backends: usize) -> u64 {
    next_prime((SLOTS_PER_BACKEND * backends as u64 + 1).max(65537))
}

/// The rules for `table_size`, as one message an operator can act on.
pub fn check_table_size(size: u64, backends: usize) -> Result<(), String> {
    if size > MAX_TABLE_SIZE {
        return Err(format!("{size} is more than the limit of {MAX_TABLE_SIZE}"));
    }
    if !is_prime(size) {
        return Err(format!(
            "{size} is not a prime number (the next prime is {})",
            next_prime(size)
        ));
    }
    let minimum = SLOTS_PER_BACKEND * backends as u64;
    if size <= minimum {
        return Err(format!(
            "{size} is too small for {backends} backends: it must be a prime larger \
             than {SLOTS_PER_BACKEND} x backends = {minimum}, e.g. {}",
            next_prime(minimum + 1)
        ));
    }
    Ok(())
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

/// The smallest prime >= n.
fn next_prime(n: u64) -> u64 {
    (n.max(2)..)
        .find(|&k| is_prime(k))
        .expect("primes are unbounded")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("backend-{i}")).collect()
    }

    fn members(names: &[String]) -> Vec<Member<'_>> {
        names
            .iter()
            .map(|name| Member { name, weight: 1 })
            .collect()
    }

    #[test]
    fn limits_are_prime() {
        assert!(is_prime(MAX_TABLE_SIZE));
        assert!(is_prime(65537));
        assert_eq!(next_prime(100_001), 100_003);
    }

    #[test]
    fn table_size_messages() {
        assert!(check_table_size(65537, 3).is_ok());
        assert_eq!(
            check_table_size(1000, 3).unwrap_err(),
            "1000 is not a prime number (the next prime is 1009)"
        );
        assert_eq!(
            check_table_size(65537, 1000).unwrap_err(),
            "65537 is too small for 1000 backends: it must be a prime larger than \
             100 x backends = 100000, e.g. 100003"
        );
        assert!(check_table_size(MAX_TABLE_SIZE + 2, 1).is_err());
    }

    /// Equal backends get equal shares, within 2% of the ideal, for 3 to 1000.
    #[test]
    fn shares_follow_equal_weights() {
        for n in [3, 7, 10, 100, 257, 1000] {
            let names = names(n);
            let size = recommended_table_size(n);
            let members = members(&names);
            let worst = Maglev::build(&members, size).share_error(&members);
            assert!(
                worst <= 0.02,
                "{n} backends: worst share off by {:.3}%",
                worst * 100.0
            );
        }
    }

    /// Weighted backends get shares in proportion to weight, within 2%.
    #[test]
    fn shares_follow_weights() {
        for n in [3, 10, 100, 1000] {
            let names = names(n);
            let weighted: Vec<Member> = names
                .iter()
                .enumerate()
                .map(|(i, name)| Member {
                    name,
                    weight: 1 + (i % 4) as u32,
                })
                .collect();
            let size = recommended_table_size(n * 4);
            let worst = Maglev::build(&weighted, size).share_error(&weighted);
            assert!(
                worst <= 0.02,
                "{n} weighted backends: worst share off by {:.3}%",
                worst * 100.0
            );
        }
    }

    #[test]
    fn weight_zero_owns_nothing() {
        let names = names(3);
        let mut m = members(&names);
        m[1].weight = 0;
        let table = Maglev::build(&m, 65537);
        assert!(!table.table.contains(&1), "weight 0 owns a slot");
        m.iter_mut().for_each(|m| m.weight = 0);
        let empty = Maglev::build(&m, 65537);
        assert_eq!(empty.lookup(42), None);
        assert_eq!(empty.preference(42).next(), None);
    }

    /// The table depends on the set of backends, not their order in the file.
    #[test]
    fn independent_of_backend_order() {
        let names = names(50);
        let forward = members(&names);
        let mut reversed = forward.clone();
        reversed.reverse();
        let a = Maglev::build(&forward, 65537);
        let b = Maglev::build(&reversed, 65537);
        for key in 0..100_000u64 {
            let key = key.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let x = forward[a.lookup(key).unwrap()].name;
            let y = reversed[b.lookup(key).unwrap()].name;
            assert_eq!(x, y);
        }
    }

    /// Fraction of slots whose owner differs between two tables, compared by
    /// name.
    fn moved(a: &Maglev, a_names: &[Member], b: &Maglev, b_names: &[Member]) -> f64 {
        let changed = a
            .table
            .iter()
            .zip(b.table.iter())
            .filter(|(&x, &y)| a_names[x as usize].name != b_names[y as usize].name)
            .count();
        changed as f64 / a.slots() as f64
    }

    /// Removing one of N backends moves at most 1/N + 1% of keys.
    #[test]
    fn removal_moves_few_keys() {
        for n in [3, 5, 10, 50, 100, 500, 1000] {
            let names = names(n);
            let all = members(&names);
            let size = recommended_table_size(n);
            let full = Maglev::build(&all, size);
            for removed in [0, n / 2, n - 1] {
                let mut rest = all.clone();
                rest.remove(removed);
                let smaller = Maglev::build(&rest, size);
                let fraction = moved(&full, &all, &smaller, &rest);
                let bound = 1.0 / n as f64 + 0.01;
                assert!(
                    fraction <= bound,
                    "{n} backends, removing #{removed}: {:.4} of keys moved, bound {bound:.4}",
                    fraction
                );
            }
        }
    }

    /// Overlaps cover the hash space once, agree with slot-by-slot counts
    /// between tables of one size and with lookups between sizes.
    #[test]
    fn overlap_partitions_the_hash_space() {
        let names = names(5);
        let five = members(&names);
        let four = Maglev::build(&five[..4], 65537);
        let same_size = Maglev::build(&five, 65537);
        let larger = Maglev::build(&five, 100_003);
        assert!(four.overlap(&four).keys().all(|(x, y)| x == y));
        let share_moved = |shares: HashMap<(usize, usize), u128>| {
            assert_eq!(shares.values().sum::<u128>(), 1 << 64);
            let moved: u128 = shares
                .iter()
                .filter(|((x, y), _)| x != y)
                .map(|(_, s)| s)
                .sum();
            moved as f64 / 2f64.powi(64)
        };
        let by_slots = moved(&four, &five[..4], &same_size, &five);
        assert!((share_moved(four.overlap(&same_size)) - by_slots).abs() < 1e-9);
        let shares = four.overlap(&larger);
        for key in 0..10_000u64 {
            let key = key.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let pair = (four.lookup(key).unwrap(), larger.lookup(key).unwrap());
            assert!(shares.contains_key(&pair), "key {key:#x}: {pair:?}");
        }
        // Another table size reshuffles most clients.
        assert!(share_moved(shares) > 0.5);
    }

    #[test]
    fn preference_is_distinct_and_starts_at_lookup() {
        let names = names(20);
        let m = members(&names);
        let table = Maglev::build(&m, 65537);
        for key in 0..10_000u64 {
            let key = key.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let order: Vec<usize> = table.preference(key).collect();
            assert_eq!(order[0], table.lookup(key).unwrap());
            assert_eq!(order.len(), MAX_ATTEMPTS);
            let mut sorted = order.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), order.len());
        }
        // Fewer backends than attempts: each appears exactly once.
        let three = &m[..3];
        let small = Maglev::build(three, 65537);
        let mut order: Vec<usize> = small.preference(7).collect();
        order.sort();
        assert_eq!(order, vec![0, 1, 2]);
    }
}
