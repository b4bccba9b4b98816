//! Chunk storage: the [`Store`] trait every relay and endpoint caches chunks in, and its two
//! backends, [`MemoryStore`] (tests, small relays) and [`FjallStore`] (the default, on disk).
//!
//! A store keeps chunks by name, so a [`Filter`] is one key range and a scan returns chunks in
//! name order. Inserting is insert-if-absent: the first chunk stored at a name wins. A store
//! also indexes chunks by `(expiry, name)`, which drives both expiry eviction and capacity
//! eviction, and keeps the durable upstream *outbox*: the names of chunks the parent has not
//! acknowledged yet.
//!
//! # Capacity accounting
//!
//! Each stored chunk counts [`RECORD_OVERHEAD`] (`16 + 8` bytes: name and expiry) plus its
//! payload length against the store's capacity; [`stored_size`] computes it. A capacity of
//! [`UNLIMITED`] (`u64::MAX`) never evicts. Outbox entries are not counted.
//!
//! ```
//! use canopy::{Chunk, Filter, InsertOutcome, MemoryStore, Name, Store};
//!
//! let mut store = MemoryStore::new(canopy::store::UNLIMITED);
//! let chunk = Chunk::new(Name::new(7), 1_000, &b"hi"[..]).unwrap();
//! assert_eq!(store.insert(&chunk).unwrap(), InsertOutcome::Inserted);
//! assert_eq!(store.insert(&chunk).unwrap(), InsertOutcome::Duplicate);
//! assert_eq!(store.scan_last(Filter::ALL, 10, 999).unwrap(), vec![chunk]);
//! assert!(store.scan_last(Filter::ALL, 10, 1_000).unwrap().is_empty()); // expired at 1000
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;

use crate::{Chunk, Filter, Name};

// fjall needs a file system and threads; the core's other parts also build for Wasm guests
// (the messenger's member plugin packs names with the same `Schema`).
#[cfg(not(target_arch = "wasm32"))]
mod fjall;

#[cfg(not(target_arch = "wasm32"))]
pub use self::fjall::FjallStore;
#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
pub use self::fjall::check_record_decoding;
#[cfg(feature = "plugin-host")]
pub use self::fjall::FjallState;

/// Bytes a stored chunk counts against capacity on top of its payload: 16 name bytes plus
/// 8 expiry bytes.
pub const RECORD_OVERHEAD: u64 = 16 + 8;

/// The capacity that never evicts.
pub const UNLIMITED: u64 = u64::MAX;

/// Bytes `chunk` counts against a store's capacity: [`RECORD_OVERHEAD`] plus its payload.
pub fn stored_size(chunk: &Chunk) -> u64 {
    RECORD_OVERHEAD + chunk.data().len() as u64
}

/// What happened to a chunk offered to a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    /// The name was free; the chunk is now stored.
    Inserted,
    /// The identical chunk (same name, expiry and data) was already stored; nothing was
    /// written.
    Duplicate,
    /// A different chunk (other data or expiry) is stored at this name; it was kept and the
    /// offered chunk refused.
    Conflict,
}

/// Counters describing a store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Chunks stored (including expired ones not yet evicted).
    pub chunks: u64,
    /// Bytes stored, as counted against capacity (see [`stored_size`]).
    pub bytes: u64,
    /// The configured capacity in bytes; [`UNLIMITED`] never evicts.
    pub capacity: u64,
    /// Chunks removed by [`Store::evict_expired`] since the store was created or opened.
    pub evicted_expired: u64,
    /// Chunks removed to make room for newer ones since the store was created or opened.
    pub evicted_capacity: u64,
    /// Names pending in the upstream outbox.
    pub outbox: u64,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The chunk cannot be placed without evicting chunks that outlive it.
    #[error(
        "store full: {needed} bytes needed, capacity {capacity} bytes, and every stored chunk outlives {name}"
    )]
    Full {
        /// Name of the refused chunk.
        name: Name,
        /// Bytes the refused chunk would count against capacity ([`stored_size`]).
        needed: u64,
        /// The store's capacity in bytes.
        capacity: u64,
    },
    /// The storage backend failed; the text says what the store was doing and why it failed.
    #[error("storage backend: {0}")]
    Backend(String),
    /// A stored record could not be decoded.
    #[error("corrupt record for {key}: {reason}")]
    Corrupt {
        /// The record's key, as `keyspace/name` (or `keyspace/0x<hex>` for a malformed key).
        key: String,
        /// What was wrong with it.
        reason: String,
    },
}

/// Syncs a [`Store`] from a thread of its own: see [`Store::syncer`].
pub trait Syncer: Send {
    /// Makes durable every write made before the store's last [`Store::prepare_sync`].
    fn sync(&mut self) -> Result<(), StoreError>;
}

/// Storage for chunks and the upstream outbox.
///
/// Stores are not time-aware on insert: expired chunks stay until [`Store::evict_expired`],
/// and [`Store::get`] returns them (check [`Chunk::is_expired`]); scans skip them.
pub trait Store: Send {
    /// Insert-if-absent. Identical chunk (same name, expiry and data) already present →
    /// `Duplicate` (nothing written); same name with different data or expiry → `Conflict`
    /// (original kept). At capacity, evicts the earliest-expiring chunks that expire before
    /// this one (counting them in `evicted_capacity`); if that is not enough → `Err(Full)`,
    /// and nothing is evicted. Does not itself make the write durable: see [`Store::sync`].
    fn insert(&mut self, chunk: &Chunk) -> Result<InsertOutcome, StoreError>;

    /// The chunk stored at `name`, expired or not.
    fn get(&self, name: Name) -> Result<Option<Chunk>, StoreError>;

    /// Calls `f` for every chunk named `first..=last`, in name order, skipping chunks expired
    /// at `now_ms`; stops early when `f` returns [`ControlFlow::Break`]. Paced replays resume
    /// from a cursor with this.
    fn scan_range(
        &self,
        first: Name,
        last: Name,
        now_ms: u64,
        f: &mut dyn FnMut(Chunk) -> ControlFlow<()>,
    ) -> Result<(), StoreError>;

    /// Calls `f` for every chunk under `filter`, in name order, skipping chunks expired at
    /// `now_ms`; stops early when `f` returns [`ControlFlow::Break`].
    fn scan(
        &self,
        filter: Filter,
        now_ms: u64,
        f: &mut dyn FnMut(Chunk) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        let (first, last) = filter.range();
        self.scan_range(first, last, now_ms, f)
    }

    /// The `n` greatest-named unexpired chunks under `filter`, returned in ascending name
    /// order (for most-recent-N replay: names end in sequence numbers).
    fn scan_last(&self, filter: Filter, n: usize, now_ms: u64) -> Result<Vec<Chunk>, StoreError>;

    /// Deletes every chunk expired at `now_ms` (expiry ≤ `now_ms`); returns how many (also
    /// counted in `evicted_expired`).
    fn evict_expired(&mut self, now_ms: u64) -> Result<u64, StoreError>;

    /// Makes every insert/outbox change so far durable (fsync for fjall; no-op in memory).
    /// A chunk is acked to its publisher only after this.
    fn sync(&mut self) -> Result<(), StoreError>;

    /// Readies every write so far for a [`Syncer`] on another thread (fjall: hands its
    /// buffered journal to the operating system). Cheap; the default does nothing.
    fn prepare_sync(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    /// A handle that syncs this store from another thread, so the thread that writes never
    /// waits for the disk (group commit). `None` (the default) when [`Store::sync`] costs
    /// nothing worth moving, as in memory.
    fn syncer(&self) -> Option<Box<dyn Syncer>> {
        None
    }

    /// Current counters.
    fn stats(&self) -> StoreStats;

    /// Adds `name` to the durable upstream outbox (chunks not yet acknowledged by the
    /// parent). Pushing a pending name again is a no-op.
    fn outbox_push(&mut self, name: Name) -> Result<(), StoreError>;

    /// Removes `name` from the outbox; returns whether it was pending.
    fn outbox_remove(&mut self, name: Name) -> Result<bool, StoreError>;

    /// Pending outbox names in name order (at most `limit`).
    fn outbox_pending(&self, limit: usize) -> Result<Vec<Name>, StoreError>;
}

/// A chunk chosen for capacity eviction.
#[derive(Debug, Clone, Copy)]
struct Victim {
    expiry: u64,
    name: Name,
    /// Its [`stored_size`]; `None` for an index entry whose chunk is missing (removed, not
    /// counted).
    size: Option<u64>,
}

/// Chooses what to evict so that `chunk` fits, from `candidates` in `(expiry, name)` order
/// (each with its size, `None` when the chunk behind an index entry is missing). Only chunks
/// expiring strictly before `chunk` may go; if they are not enough, the answer is `Full` and
/// nothing is to be evicted.
fn plan_capacity_eviction(
    stats: &StoreStats,
    chunk: &Chunk,
    candidates: impl Iterator<Item = Result<Victim, StoreError>>,
) -> Result<Vec<Victim>, StoreError> {
    let needed = stored_size(chunk);
    let full = || StoreError::Full {
        name: chunk.name(),
        needed,
        capacity: stats.capacity,
    };
    if needed > stats.capacity {
        return Err(full());
    }
    let mut excess = stats
        .bytes
        .saturating_add(needed)
        .saturating_sub(stats.capacity);
    let mut victims = Vec::new();
    if excess == 0 {
        return Ok(victims);
    }
    for candidate in candidates {
        let victim = candidate?;
        if victim.expiry >= chunk.expiry() {
            break;
        }
        excess = excess.saturating_sub(victim.size.unwrap_or(0));
        victims.push(victim);
        if excess == 0 {
            return Ok(victims);
        }
    }
    Err(full())
}

/// An in-memory [`Store`]: a `BTreeMap` by name, a `BTreeSet` of `(expiry, name)` for
/// eviction and a `BTreeSet` outbox. Nothing survives a restart; `sync` is a no-op.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    chunks: BTreeMap<Name, Chunk>,
    by_expiry: BTreeSet<(u64, Name)>,
    outbox: BTreeSet<Name>,
    stats: StoreStats,
}

impl MemoryStore {
    /// An empty store holding at most `capacity` bytes (see [`stored_size`]); [`UNLIMITED`]
    /// never evicts.
    pub fn new(capacity: u64) -> Self {
        MemoryStore {
            chunks: BTreeMap::new(),
            by_expiry: BTreeSet::new(),
            outbox: BTreeSet::new(),
            stats: StoreStats {
                capacity,
                ..StoreStats::default()
            },
        }
    }

    fn remove_chunk(&mut self, expiry: u64, name: Name) -> bool {
        self.by_expiry.remove(&(expiry, name));
        match self.chunks.remove(&name) {
            Some(chunk) => {
                self.stats.chunks -= 1;
                self.stats.bytes -= stored_size(&chunk);
                true
            }
            None => false,
        }
    }
}

impl Default for MemoryStore {
    /// An empty, unlimited store.
    fn default() -> Self {
        MemoryStore::new(UNLIMITED)
    }
}

impl Store for MemoryStore {
    fn insert(&mut self, chunk: &Chunk) -> Result<InsertOutcome, StoreError> {
        let same = |existing: &Chunk| if existing == chunk { InsertOutcome::Duplicate } else { InsertOutcome::Conflict };
        let size = stored_size(chunk);
        if self.stats.bytes.saturating_add(size) > self.stats.capacity {
            // Full: a chunk already at the name needs no room, so look before evicting.
            if let Some(existing) = self.chunks.get(&chunk.name()) {
                return Ok(same(existing));
            }
            let candidates = self.by_expiry.iter().map(|&(expiry, name)| {
                Ok(Victim {
                    expiry,
                    name,
                    size: self.chunks.get(&name).map(stored_size),
                })
            });
            let victims = plan_capacity_eviction(&self.stats, chunk, candidates)?;
            for victim in victims {
                if self.remove_chunk(victim.expiry, victim.name) {
                    self.stats.evicted_capacity += 1;
                }
            }
        }
        // The common case, room without evicting, walks down the tree once: to a chunk
        // already at the name, or to the place to insert.
        match self.chunks.entry(chunk.name()) {
            std::collections::btree_map::Entry::Occupied(existing) => return Ok(same(existing.get())),
            std::collections::btree_map::Entry::Vacant(place) => {
                place.insert(chunk.clone());
            }
        }
        self.by_expiry.insert((chunk.expiry(), chunk.name()));
        self.stats.chunks += 1;
        self.stats.bytes += size;
        Ok(InsertOutcome::Inserted)
    }

    fn get(&self, name: Name) -> Result<Option<Chunk>, StoreError> {
        Ok(self.chunks.get(&name).cloned())
    }

    fn scan_range(
        &self,
        first: Name,
        last: Name,
        now_ms: u64,
        f: &mut dyn FnMut(Chunk) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        if first > last {
            return Ok(());
        }
        for chunk in self.chunks.range(first..=last).map(|(_, c)| c) {
            if !chunk.is_expired(now_ms) && f(chunk.clone()).is_break() {
                break;
            }
        }
        Ok(())
    }

    fn scan_last(&self, filter: Filter, n: usize, now_ms: u64) -> Result<Vec<Chunk>, StoreError> {
        let (first, last) = filter.range();
        let mut out: Vec<Chunk> = self
            .chunks
            .range(first..=last)
            .rev()
            .map(|(_, c)| c)
            .filter(|c| !c.is_expired(now_ms))
            .take(n)
            .cloned()
            .collect();
        out.reverse();
        Ok(out)
    }

    fn evict_expired(&mut self, now_ms: u64) -> Result<u64, StoreError> {
        let expired: Vec<(u64, Name)> = self
            .by_expiry
            .range(..=(now_ms, Name::MAX))
            .copied()
            .collect();
        let mut evicted = 0;
        for (expiry, name) in expired {
            if self.remove_chunk(expiry, name) {
                evicted += 1;
            }
        }
        self.stats.evicted_expired += evicted;
        Ok(evicted)
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn stats(&self) -> StoreStats {
        self.stats
    }

    fn outbox_push(&mut self, name: Name) -> Result<(), StoreError> {
        if self.outbox.insert(name) {
            self.stats.outbox += 1;
        }
        Ok(())
    }

    fn outbox_remove(&mut self, name: Name) -> Result<bool, StoreError> {
        let removed = self.outbox.remove(&name);
        if removed {
            self.stats.outbox -= 1;
        }
        Ok(removed)
    }

    fn outbox_pending(&self, limit: usize) -> Result<Vec<Name>, StoreError> {
        Ok(self.outbox.iter().take(limit).copied().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(name: u128, expiry: u64, len: usize) -> Chunk {
        Chunk::new(Name::new(name), expiry, vec![0xa5; len]).unwrap()
    }

    #[test]
    fn plan_takes_earliest_first_and_stops_at_later_expiry() {
        let stats = StoreStats {
            chunks: 3,
            bytes: 3 * 34,
            capacity: 3 * 34,
            ..Default::default()
        };
        let cands = [(5, 1), (7, 2), (9, 3)].map(|(expiry, n)| {
            Ok(Victim {
                expiry,
                name: Name::new(n),
                size: Some(34),
            })
        });
        let plan = plan_capacity_eviction(&stats, &chunk(9, 8, 10), cands.into_iter()).unwrap();
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].name, Name::new(1));
        let cands = [(5, 1), (7, 2), (9, 3)].map(|(expiry, n)| {
            Ok(Victim {
                expiry,
                name: Name::new(n),
                size: Some(34),
            })
        });
        let err = plan_capacity_eviction(&stats, &chunk(9, 6, 50), cands.into_iter());
        assert!(matches!(err, Err(StoreError::Full { needed: 74, .. })));
    }

    #[test]
    fn too_big_for_capacity_is_full_even_when_empty() {
        let mut store = MemoryStore::new(30);
        let err = store.insert(&chunk(1, 10, 7)).unwrap_err();
        assert!(
            err.to_string()
                .contains("31 bytes needed, capacity 30 bytes"),
            "{err}"
        );
        assert_eq!(
            store.insert(&chunk(1, 10, 6)).unwrap(),
            InsertOutcome::Inserted
        );
        assert_eq!(store.stats().bytes, 30);
    }
}
