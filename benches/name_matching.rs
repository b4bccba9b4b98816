//! Name matching: Canopy's `SubscriptionTable` against `prefix-trie`'s `PrefixMap::cover()` and
//! a per-length hash table, in the same run, on the same data.
//!
//! Tables of 1k, 100k and 1M subscriptions (10M with `CANOPY_BENCH_10M=1`), two length mixes
//! (uniform 8..=128; the messenger schema's boundaries) and two traffic kinds (random names;
//! names under stored filters). Lookups cycle through 2^20 pre-generated names so that large
//! tables are not served from cache. Also measured: the batched lookup, and insert + remove at
//! full size. Bytes per subscription come from the `match-memory` binary.

use std::time::Duration;

use canopy::{Name, SubscriptionTable};
use canopy_benches::baseline::{Matcher, PerLengthHash, PrefixTrie};
use canopy_benches::workload::{LOOKUP_NAMES, LengthMix, Traffic, lookups, subscriptions};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const BATCH: usize = 64;

fn sizes() -> Vec<usize> {
    let mut sizes = vec![1_000, 100_000, 1_000_000];
    if std::env::var_os("CANOPY_BENCH_10M").is_some() {
        sizes.push(10_000_000);
    }
    if let Ok(only) = std::env::var("CANOPY_BENCH_SIZES") {
        sizes = only.split(',').filter_map(|s| s.trim().parse().ok()).collect();
    }
    sizes
}

fn bench_single<M: Matcher>(c: &mut Criterion, group: &str, m: &M, names: &[Name], n: usize) {
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(1));
    g.bench_with_input(BenchmarkId::new(M::LABEL, n), names, |b, names| {
        let mut i = 0usize;
        b.iter(|| {
            let name = names[i & (LOOKUP_NAMES - 1)];
            i = i.wrapping_add(1);
            let mut sum = 0u32;
            m.lookup(name, |v| sum = sum.wrapping_add(v));
            sum
        })
    });
    g.finish();
}

fn name_matching(c: &mut Criterion) {
    for n in sizes() {
        for mix in LengthMix::ALL {
            let subs = subscriptions(n, mix, 1);
            let canopy = SubscriptionTable::<u32>::build(&subs);
            eprintln!(
                "canopy table: {n} subscriptions ({}), {:.1} heap bytes/subscription",
                mix.label(),
                canopy.heap_bytes() as f64 / n as f64
            );
            let trie = PrefixTrie::build(&subs);
            let hash = PerLengthHash::build(&subs);
            for traffic in Traffic::ALL {
                let names = lookups(&subs, traffic, LOOKUP_NAMES, 2);
                let group = format!("match/{}/{}", mix.label(), traffic.label());
                bench_single(c, &group, &canopy, &names, n);
                bench_single(c, &group, &trie, &names, n);
                bench_single(c, &group, &hash, &names, n);

                let mut g = c.benchmark_group(&group);
                g.throughput(Throughput::Elements(BATCH as u64));
                g.bench_with_input(BenchmarkId::new("canopy-batch64", n), &names, |b, names| {
                    let mut i = 0usize;
                    b.iter(|| {
                        let start = (i * BATCH) & (LOOKUP_NAMES - 1);
                        i = i.wrapping_add(1);
                        let mut sum = 0u32;
                        canopy.for_each_match_batch(&names[start..start + BATCH], |_, v| {
                            sum = sum.wrapping_add(v)
                        });
                        sum
                    })
                });
                g.finish();
            }
            drop((trie, hash));

            // Insert + remove of a pair absent from the table, at full size: the relay's online
            // update. Each iteration does one insert and one remove of a fresh filter.
            let mut canopy = canopy;
            let extra = subscriptions(LOOKUP_NAMES, mix, 3);
            let mut g = c.benchmark_group(format!("update/{}", mix.label()));
            g.throughput(Throughput::Elements(2));
            g.bench_function(BenchmarkId::new("canopy-insert+remove", n), |b| {
                let mut i = 0usize;
                b.iter(|| {
                    let (f, _) = extra[i & (LOOKUP_NAMES - 1)];
                    i = i.wrapping_add(1);
                    let added = canopy.insert(f, u32::MAX);
                    let removed = canopy.remove(f, u32::MAX);
                    (added, removed)
                })
            });
            g.finish();
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = name_matching
}
criterion_main!(benches);
