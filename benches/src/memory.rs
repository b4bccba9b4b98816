//! Resident memory of the current process, read from `/proc/self/statm`.
//!
//! Growth of the resident set while building a structure in a fresh process counts every byte
//! the structure really costs, allocator overhead and fragmentation included, without
//! instrumenting the allocator.

/// Resident set size in bytes, or `None` where `/proc` is unavailable.
pub fn resident_bytes() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// A global allocator that counts the bytes live on the heap (as requested, before the
/// allocator's own overhead) and the allocations made. Install it in a bench binary:
///
/// ```ignore
/// #[global_allocator]
/// static ALLOC: canopy_benches::memory::Counting = canopy_benches::memory::Counting;
/// ```
pub struct Counting;

static LIVE_BYTES: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);
static LIVE_BLOCKS: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);

/// Heap bytes and blocks live now, if [`Counting`] is the global allocator (zeros otherwise).
pub fn heap() -> (isize, isize) {
    use std::sync::atomic::Ordering::Relaxed;
    (LIVE_BYTES.load(Relaxed), LIVE_BLOCKS.load(Relaxed))
}

// SAFETY: every call is forwarded to the system allocator with the same arguments; the
// counters only observe sizes. (`unsafe` is allowed here only: a global allocator is an
// allocator boundary, and this one exists for the benches' counts.)
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use std::sync::atomic::Ordering::Relaxed;
        // SAFETY: forwarded as is (the caller upholds `alloc`'s contract).
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Relaxed);
            LIVE_BLOCKS.fetch_add(1, Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        use std::sync::atomic::Ordering::Relaxed;
        // SAFETY: forwarded as is.
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Relaxed);
            LIVE_BLOCKS.fetch_add(1, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        use std::sync::atomic::Ordering::Relaxed;
        // SAFETY: forwarded as is (`ptr` came from this allocator, which is `System`'s).
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size() as isize, Relaxed);
        LIVE_BLOCKS.fetch_sub(1, Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        use std::sync::atomic::Ordering::Relaxed;
        // SAFETY: forwarded as is.
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(new_size as isize - layout.size() as isize, Relaxed);
        }
        p
    }
}

/// What one subscription costs the relay's routing core, counted on the heap.
#[derive(Debug, Clone, Copy)]
pub struct SubscriptionCost {
    /// Subscriptions made.
    pub subscriptions: usize,
    /// Heap bytes per subscription in the routing core (`Node`: its link's entry, the
    /// subscription table, and everything else it keeps).
    pub node_bytes: f64,
    /// Heap blocks per subscription in the routing core (each costs the allocator a header
    /// and rounding besides).
    pub node_blocks: f64,
    /// Heap bytes per subscription of the subscription table alone, the same filters.
    pub table_bytes: f64,
}

/// Builds a routing core (`canopy::node::Node`, memory store, no parent: an origin, as in
/// `relay-load`) with `links` client links of `per_link` `CachedAndLive` subscriptions each,
/// the filters of `relay-load` (one of 4 shared `/24`s per link, the rest distinct `/64`..
/// `/128`), and counts the heap it takes; then the subscription table alone with the same
/// filters. Needs [`Counting`] as the global allocator.
pub fn subscription_cost(links: u64, per_link: u64, seed: u64) -> SubscriptionCost {
    use canopy::node::{Node, NodeConfig};
    use canopy::store::{MemoryStore, UNLIMITED};
    use canopy::wire::{Frame, PROTOCOL_VERSION, RelayId, ReplayMode, Role};
    use canopy::{Filter, Name, SubscriptionTable};
    use rand::{Rng, SeedableRng};

    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let broad: Vec<Filter> = (0..4u128).map(|i| Filter::new(Name::new((0xb0 + i) << 120), 24).expect("valid")).collect();
    let mut filters = Vec::with_capacity((links * per_link) as usize);
    for link in 0..links {
        for i in 0..per_link {
            let f = if i == 0 {
                broad[(link % 4) as usize]
            } else {
                Filter::new(Name::new(rng.random::<u128>()), rng.random_range(64..=128)).expect("valid")
            };
            filters.push(f);
        }
    }

    let mut node = Node::new(NodeConfig::new(RelayId(1)), MemoryStore::new(UNLIMITED), false);
    for link in 0..links {
        node.accept(link);
        node.handle(link, Frame::Hello { version: PROTOCOL_VERSION, role: Role::Client, relay_path: vec![], token: None }, 0);
        node.drain(link, usize::MAX, 0);
    }
    let (bytes0, blocks0) = heap();
    for link in 0..links {
        for i in 0..per_link {
            let filter = filters[(link * per_link + i) as usize];
            node.handle(link, Frame::Subscribe { id: i, filter, mode: ReplayMode::CachedAndLive, credit: 64 }, 0);
        }
        // The `ReplayDone`s leave at once in a relay; they are not a subscription's cost.
        node.drain(link, usize::MAX, 0);
    }
    // What a relay's periodic tick does (every `evict_interval`): idle links give back the
    // buffer the burst of `ReplayDone`s grew.
    node.tick(0).expect("a memory store evicts");
    let (bytes1, blocks1) = heap();
    assert_eq!(node.subscriptions(), filters.len(), "every subscription was taken");
    let n = filters.len() as f64;

    let mut table = SubscriptionTable::new();
    let (tb0, _) = heap();
    for (i, f) in filters.iter().enumerate() {
        table.insert(*f, (i as u64 / per_link, i as u64 % per_link));
    }
    let (tb1, _) = heap();
    std::hint::black_box(&table);
    drop(node);
    SubscriptionCost {
        subscriptions: filters.len(),
        node_bytes: (bytes1 - bytes0) as f64 / n,
        node_blocks: (blocks1 - blocks0) as f64 / n,
        table_bytes: (tb1 - tb0) as f64 / n,
    }
}
