//! Bytes per subscription of Canopy's `SubscriptionTable` and the baselines.
//!
//! Each structure is built in a fresh child process and measured as the growth of that
//! process's resident set, so allocator overhead counts for everyone alike.
//!
//! ```text
//! cargo run --release -p canopy-benches --bin match-memory [-- SIZE...]
//! ```

use std::process::Command;

use canopy::SubscriptionTable;
use canopy_benches::baseline::{Matcher, PerLengthHash, PrefixTrie};
use canopy_benches::memory::resident_bytes;
use canopy_benches::workload::{LengthMix, subscriptions};

fn measure<M: Matcher>(n: usize, mix: LengthMix) -> usize {
    let subs = subscriptions(n, mix, 1);
    let before = resident_bytes().expect("/proc/self/statm");
    let built = M::build(&subs);
    let after = resident_bytes().expect("/proc/self/statm");
    std::hint::black_box(&built);
    after.saturating_sub(before)
}

fn child(args: &[String]) {
    let n: usize = args[2].parse().expect("size");
    let mix = if args[1] == "messenger" { LengthMix::Messenger } else { LengthMix::Random };
    let bytes = match args[0].as_str() {
        "canopy" => measure::<SubscriptionTable<u32>>(n, mix),
        "prefix-trie" => measure::<PrefixTrie>(n, mix),
        _ => measure::<PerLengthHash>(n, mix),
    };
    println!("{bytes}");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("child") {
        return child(&args[1..]);
    }
    let sizes: Vec<usize> = if args.is_empty() {
        vec![100_000, 1_000_000]
    } else {
        args.iter().map(|a| a.parse().expect("size")).collect()
    };
    let exe = std::env::current_exe().expect("own path");
    println!("{:<10} {:>10} {:<16} {:>14} {:>10}", "mix", "subs", "structure", "resident", "bytes/sub");
    for mix in LengthMix::ALL {
        for &n in &sizes {
            for label in [SubscriptionTable::<u32>::LABEL, PrefixTrie::LABEL, PerLengthHash::LABEL] {
                let out = Command::new(&exe)
                    .args(["child", label, mix.label(), &n.to_string()])
                    .output()
                    .expect("run child");
                let bytes: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
                println!(
                    "{:<10} {:>10} {:<16} {:>14} {:>10.1}",
                    mix.label(),
                    n,
                    label,
                    bytes,
                    bytes as f64 / n as f64
                );
            }
        }
    }
}
