//! The latency of one dependent random memory access, by working-set size.
//!
//! Lookup costs at scale are counted in cache misses, and what a miss costs depends on the
//! machine: how much last-level cache this VM really gets, and what DRAM plus a TLB miss cost.
//! This walks a random cyclic permutation of cache lines (each load's address comes from the
//! previous load) over working sets from 32 KiB to 256 MiB, so the figures in
//! `docs/performance.md` can be read against the machine they were taken on.
//!
//! ```text
//! cargo run --release -p canopy-benches --bin mem-latency [-- MAX_MIB]
//! ```

use std::time::Instant;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// `usize` words per 64-byte cache line: the chain visits one word per line.
const WORDS_PER_LINE: usize = 8;

/// Mean nanoseconds per access of a dependent random walk over `bytes` of memory.
fn chase(bytes: usize, steps: usize, rng: &mut SmallRng) -> f64 {
    let lines = bytes / 64;
    // Sattolo's algorithm: a single cycle through every line, in random order.
    let mut order: Vec<usize> = (0..lines).collect();
    for i in (1..lines).rev() {
        let j = rng.random_range(0..i);
        order.swap(i, j);
    }
    let mut next = vec![0usize; lines * WORDS_PER_LINE];
    for (i, line) in order.iter().enumerate() {
        next[line * WORDS_PER_LINE] = order[(i + 1) % lines] * WORDS_PER_LINE;
    }
    let mut at = 0;
    // One pass to warm what fits, then the timed walk.
    for _ in 0..lines.min(steps) {
        at = next[at];
    }
    let began = Instant::now();
    for _ in 0..steps {
        at = next[at];
    }
    let ns = began.elapsed().as_nanos() as f64 / steps as f64;
    std::hint::black_box(at);
    ns
}

fn main() {
    let max_mib: usize = std::env::args().nth(1).map_or(256, |s| s.parse().expect("MAX_MIB is a number"));
    let mut rng = SmallRng::seed_from_u64(7);
    println!("| working set | ns per dependent access |");
    println!("| ---: | ---: |");
    let mut kib = 32;
    while kib <= max_mib * 1024 {
        let ns = chase(kib * 1024, 2_000_000, &mut rng);
        let label = if kib >= 1024 { format!("{} MiB", kib / 1024) } else { format!("{kib} KiB") };
        println!("| {label} | {ns:.1} |");
        kib *= 2;
    }
}
