//! Prints how evenly Maglev spreads slots and how many keys move when one
//! backend is removed, for 3 to 1000 backends: the figures behind the unit
//! tests' bounds, for operators sizing `table_size`.
//!
//!     cargo run --release --example maglev_report

use sluice::balancer::maglev::{recommended_table_size, Maglev, Member};

fn main() {
    println!(
        "{:>8} {:>10} {:>16} {:>22} {:>10}",
        "backends", "table_size", "worst share off", "keys moved (1 removed)", "1/N"
    );
    for n in [3usize, 5, 10, 50, 100, 257, 500, 1000] {
        let names: Vec<String> = (0..n).map(|i| format!("backend-{i}")).collect();
        let all: Vec<Member> = names
            .iter()
            .map(|name| Member { name, weight: 1 })
            .collect();
        let size = recommended_table_size(n);
        let full = Maglev::build(&all, size);
        let worst = full.share_error(&all);

        // Remove the middle backend; count slots whose owner's name changed.
        let removed = n / 2;
        let mut rest = all.clone();
        rest.remove(removed);
        let smaller = Maglev::build(&rest, size);
        let moved = (0..size as usize)
            .filter(|&slot| {
                let key = slot_key(slot, size);
                all[full.lookup(key).unwrap()].name != rest[smaller.lookup(key).unwrap()].name
            })
            .count() as f64
            / size as f64;
        println!(
            "{:>8} {:>10} {:>15.2}% {:>21.2}% {:>9.2}%",
            n,
            size,
            worst * 100.0,
            moved * 100.0,
            100.0 / n as f64
        );
    }
}

/// A hash that lands on `slot` (the inverse of the multiply-shift reduction).
fn slot_key(slot: usize, size: u64) -> u64 {
    ((((slot as u128) << 64) + (1u128 << 63)) / size as u128) as u64
}
