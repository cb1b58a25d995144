//! Criterion benchmarks of the Maglev balancer: lookup cost (hash of the
//! client address plus table lookup, as a worker does per connection) and
//! table build time, for 3 and 1000 backends.
//!
//!     cargo bench --bench maglev

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use sluice::balancer::key_hash;
use sluice::balancer::maglev::{recommended_table_size, Maglev, Member};
use sluice::config::HashKey;

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("backend-{i}")).collect()
}

fn members(names: &[String]) -> Vec<Member<'_>> {
    names
        .iter()
        .map(|name| Member { name, weight: 1 })
        .collect()
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev/lookup");
    for n in [3, 1000] {
        let names = names(n);
        let table = Maglev::build(&members(&names), recommended_table_size(n));
        let mut i: u32 = 0;
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                i = i.wrapping_add(0x9e37_79b9);
                let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(i)), 40000);
                table.lookup(key_hash(HashKey::SourceIp, black_box(client)))
            })
        });
    }
    group.finish();
}

fn preference(c: &mut Criterion) {
    let names = names(1000);
    let table = Maglev::build(&members(&names), 100_003);
    c.bench_function("maglev/first_3_of_preference/1000", |b| {
        let mut key = 0u64;
        b.iter(|| {
            key = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
            table.preference(black_box(key)).take(3).sum::<usize>()
        })
    });
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev/build");
    group.sample_size(10);
    for n in [3, 1000] {
        let names = names(n);
        let members = members(&names);
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| Maglev::build(black_box(&members), recommended_table_size(n)))
        });
    }
    group.finish();
}

criterion_group!(benches, lookup, preference, build);
criterion_main!(benches);
