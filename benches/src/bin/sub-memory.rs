//! Heap bytes per subscription in the relay's routing core, counted by the allocator.
//!
//! ```sh
//! cargo run --release -p canopy-benches --bin sub-memory -- [--links 1000] [--per-link 100]
//! ```
//!
//! Builds a `Node` (what a relay's actor owns: every per-subscription structure of a relay
//! lives there, the link tasks keep none) with `links × per-link` subscriptions, the filters
//! of `relay-load`, and prints the heap bytes and blocks it took per subscription beside the
//! subscription table alone (the matcher) for the same filters. Bytes are as requested:
//! the allocator adds its header and rounding per block (about 8–16 bytes with glibc), which
//! the block count shows. `relay-load` reports the same figure before its run, and the relay
//! process's resident set per subscription after it.

use canopy_benches::memory::{Counting, subscription_cost};
use clap::Parser;

#[global_allocator]
static ALLOC: Counting = Counting;

#[derive(Parser)]
#[command(about = "Heap bytes per subscription in the relay's routing core.")]
struct Cli {
    /// Client links.
    #[arg(long, default_value_t = 1000)]
    links: u64,
    /// Subscriptions per link.
    #[arg(long, default_value_t = 100)]
    per_link: u64,
    /// Seed of the random filters.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() {
    let cli = Cli::parse();
    let cost = subscription_cost(cli.links, cli.per_link, cli.seed);
    println!("subscriptions: {}", cost.subscriptions);
    println!("routing core (Node): {:.1} B per subscription in {:.2} heap blocks", cost.node_bytes, cost.node_blocks);
    println!("subscription table alone: {:.1} B per subscription", cost.table_bytes);
}
