//! How many times faster Canopy's single lookups are than `prefix-trie`'s `cover()`, measured
//! so that the machine's drift cannot bias the ratio.
//!
//! The criterion bench (`name_matching`) measures each structure for a few seconds, one after
//! the other. On a shared VM, memory latency drifts by tens of percent within a minute, so a
//! ratio of two such figures carries that drift. Here the two structures take turns: each
//! round times a slice of lookups on Canopy, then a slice on `prefix-trie`, on the same tables
//! and traffic, and the ratio is taken per round. The report gives the median of the per-round
//! ratios and their spread.
//!
//! ```text
//! cargo run --release -p canopy-benches --bin match-ratio [-- SIZE [ROUNDS]]
//! ```

use std::time::Instant;

use canopy::{Name, SubscriptionTable};
use canopy_benches::baseline::{Matcher, PrefixTrie};
use canopy_benches::workload::{LOOKUP_NAMES, LengthMix, Traffic, lookups, subscriptions};

/// Mean nanoseconds per lookup over `count` names starting at `start`.
fn time<M: Matcher>(m: &M, names: &[Name], start: usize, count: usize) -> f64 {
    let began = Instant::now();
    let mut sum = 0u32;
    for i in 0..count {
        m.lookup(names[(start + i) & (LOOKUP_NAMES - 1)], |v| sum = sum.wrapping_add(v));
    }
    std::hint::black_box(sum);
    began.elapsed().as_nanos() as f64 / count as f64
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(1_000_000, |s| s.parse().expect("SIZE is a number"));
    let rounds: usize = args.next().map_or(25, |s| s.parse().expect("ROUNDS is a number"));
    println!("{n} subscriptions, {rounds} alternating rounds; ns per single lookup (median), trie ÷ canopy");
    println!("| mix | traffic | canopy | prefix-trie | ratio (median) | ratio (min–max) |");
    println!("| --- | --- | ---: | ---: | ---: | ---: |");
    for mix in LengthMix::ALL {
        let subs = subscriptions(n, mix, 1);
        let canopy = SubscriptionTable::<u32>::build(&subs);
        let trie = PrefixTrie::build(&subs);
        for traffic in Traffic::ALL {
            let names = lookups(&subs, traffic, LOOKUP_NAMES, 2);
            // Slices sized so that each structure runs for a similar time per round.
            let (fast, slow) = match traffic {
                Traffic::Hit => (100_000, 25_000),
                Traffic::Random => (100_000, 50_000),
            };
            let (mut ours, mut theirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            let mut at = 0;
            for _ in 0..rounds {
                let a = time(&canopy, &names, at, fast);
                let b = time(&trie, &names, at + fast, slow);
                at += fast + slow;
                ours.push(a);
                theirs.push(b);
                ratios.push(b / a);
            }
            let (lo, hi) = ratios.iter().fold((f64::MAX, 0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
            println!(
                "| {} | {} | {:.0} | {:.0} | {:.2}× | {:.2}–{:.2}× |",
                mix.label(),
                traffic.label(),
                median(&mut ours),
                median(&mut theirs),
                median(&mut ratios),
                lo,
                hi
            );
        }
    }
}
