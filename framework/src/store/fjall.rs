//! [`FjallStore`]: the on-disk [`Store`] backend, on the fjall LSM-tree.

use std::fmt;
use std::ops::{Bound, ControlFlow};
use std::path::{Path, PathBuf};

use ::fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use bytes::Bytes;

use super::{
    InsertOutcome, Store, StoreError, StoreStats, Syncer, Victim, plan_capacity_eviction, stored_size,
};
use crate::{Chunk, Filter, Name};

/// Keyspace of chunks: key = 16 big-endian name bytes, value = 8-byte BE expiry + data.
const CHUNKS: &str = "chunks";
/// Keyspace of the expiry index: key = 8-byte BE expiry + 16-byte name, empty value.
const EXPIRY: &str = "expiry";
/// Keyspace of the upstream outbox: key = 16 name bytes, empty value.
const OUTBOX: &str = "outbox";
/// Keyspace of plugins' key/value state: key = plugin name, a 0 byte, the plugin's key.
#[cfg(feature = "plugin-host")]
const PLUGIN_STATE: &str = "plugin-state";

/// How many expired chunks one write batch of [`Store::evict_expired`] deletes.
const EVICT_BATCH: usize = 4096;

/// Memtable bound of the `chunks` keyspace. fjall's default is 64 MiB per keyspace, counted as
/// keys + values + a fixed size per entry, so the heap a memtable takes (skiplist towers,
/// allocator overhead) is larger still: with four keyspaces, hundreds of megabytes of heap for
/// a store whose working set may be a few megabytes (20 MiB in the soak, whose relay grew
/// past 500 MiB), and every journal stays on disk until the slowest keyspace flushes (the
/// expiry index took minutes to fill its 64 MiB).
const CHUNKS_MEMTABLE: u64 = 16 * 1024 * 1024;
/// Memtable bound of the `expiry` index (24-byte keys, no values).
const EXPIRY_MEMTABLE: u64 = 8 * 1024 * 1024;
/// Memtable bound of the small keyspaces (outbox, plugin state).
const SMALL_MEMTABLE: u64 = 4 * 1024 * 1024;
/// Block cache of the database (fjall's default is 32 MiB).
const BLOCK_CACHE: u64 = 16 * 1024 * 1024;
/// Journals kept on disk before fjall flushes the keyspaces that pin the oldest one (its
/// default is 512 MiB; 64 MiB is its minimum, and it rotates journals at 64 MB).
const MAX_JOURNALING: u64 = 64 * 1024 * 1024;

/// Options of the keyspace called `name`. fjall persists them when it creates a keyspace, so
/// they apply to stores created with them; a store created earlier keeps its own.
fn keyspace_options(name: &str) -> KeyspaceCreateOptions {
    let memtable = match name {
        CHUNKS => CHUNKS_MEMTABLE,
        EXPIRY => EXPIRY_MEMTABLE,
        _ => SMALL_MEMTABLE,
    };
    KeyspaceCreateOptions::default().max_memtable_size(memtable)
}

/// A [`Store`] on disk, in a fjall database in one directory.
///
/// Three keyspaces:
/// - `chunks`: key = the 16 big-endian name bytes, so a [`Filter`] is one range scan; value =
///   8-byte big-endian expiry followed by the data.
/// - `expiry`: key = 8-byte big-endian expiry + 16 name bytes, empty value: chunks in the order
///   they expire, for expiry and capacity eviction.
/// - `outbox`: key = 16 name bytes, empty value: the upstream outbox.
///
/// An insert writes the chunk, its expiry entry and any capacity evictions in one atomic write
/// batch. Writes reach the journal's in-process buffer only (the database is opened with
/// manual journal persistence); [`Store::sync`] makes them durable.
///
/// `stats().chunks` and `bytes` are recomputed by scanning the `chunks` keyspace at open
/// (fine for now; a persisted counter would avoid the scan), `outbox` by scanning the outbox;
/// the eviction counters start at zero on each open.
pub struct FjallStore {
    chunks: Keyspace,
    expiry: Keyspace,
    outbox: Keyspace,
    db: Database,
    path: PathBuf,
    stats: StoreStats,
    /// The last `expiry` key [`Store::evict_expired`] deleted: every key up to it is gone, so
    /// scans of the index start after it rather than walking the tombstones of everything
    /// evicted since the last compaction. `None` until the first eviction, and again when a
    /// chunk expiring before it is inserted.
    evicted_through: Option<[u8; 24]>,
}

/// Syncs a [`FjallStore`] from another thread.
///
/// fjall's own `persist(SyncAll)` holds the journal's lock through the fsync, so every insert
/// on the writing thread would wait for the disk. Instead the writer hands its buffer to the
/// OS ([`Store::prepare_sync`], a `write` under the lock) and this fsyncs the active journal
/// file through a descriptor of its own, with no lock: an fsync covers the file's data
/// whichever descriptor wrote it. A journal is fsynced by fjall itself when it is sealed
/// (rotation), so every write made before `prepare_sync` is then durable: in a sealed journal
/// or in the active one. If the journal cannot be found (a layout this does not know), it
/// falls back to fjall's locked sync.
struct FjallSyncer {
    db: Database,
    dir: PathBuf,
    /// The active journal's number and an open descriptor of it.
    journal: Option<(u64, std::fs::File)>,
}

impl FjallSyncer {
    /// The number of the newest `N.jnl` in the store's directory.
    fn active_journal(&self) -> Option<u64> {
        std::fs::read_dir(&self.dir)
            .ok()?
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.strip_suffix(".jnl")?.parse::<u64>().ok())
            .max()
    }

    fn sync_journal(&mut self) -> std::io::Result<bool> {
        let Some(id) = self.active_journal() else { return Ok(false) };
        if self.journal.as_ref().is_none_or(|(open, _)| *open != id) {
            let file = std::fs::File::open(self.dir.join(format!("{id}.jnl")))?;
            self.journal = Some((id, file));
        }
        let (_, file) = self.journal.as_ref().expect("opened above");
        file.sync_all()?;
        Ok(true)
    }
}

impl Syncer for FjallSyncer {
    fn sync(&mut self) -> Result<(), StoreError> {
        match self.sync_journal() {
            Ok(true) => Ok(()),
            _ => {
                self.journal = None;
                self.db
                    .persist(PersistMode::SyncAll)
                    .map_err(|e| backend(&format!("syncing store at {}", self.dir.display()), e))
            }
        }
    }
}

fn backend(context: &str, err: ::fjall::Error) -> StoreError {
    StoreError::Backend(format!("{context}: {err}"))
}

fn corrupt(keyspace: &str, key: impl fmt::Display, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        key: format!("{keyspace}/{key}"),
        reason: reason.into(),
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * bytes.len());
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Decodes a 16-byte name key of `keyspace`.
fn decode_name(keyspace: &str, key: &[u8]) -> Result<Name, StoreError> {
    <[u8; 16]>::try_from(key)
        .map(Name::from_bytes)
        .map_err(|_| {
            corrupt(
                keyspace,
                hex(key),
                format!("key is {} bytes, not 16", key.len()),
            )
        })
}

fn expiry_key(expiry: u64, name: Name) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..8].copy_from_slice(&expiry.to_be_bytes());
    key[8..].copy_from_slice(&name.to_bytes());
    key
}

fn decode_expiry_key(key: &[u8]) -> Result<(u64, Name), StoreError> {
    let bad = || {
        corrupt(
            EXPIRY,
            hex(key),
            format!("key is {} bytes, not 24", key.len()),
        )
    };
    let (expiry, name) = key.split_first_chunk::<8>().ok_or_else(bad)?;
    let name = <[u8; 16]>::try_from(name).map_err(|_| bad())?;
    Ok((u64::from_be_bytes(*expiry), Name::from_bytes(name)))
}

fn encode_value(chunk: &Chunk) -> Vec<u8> {
    let mut value = Vec::with_capacity(8 + chunk.data().len());
    value.extend_from_slice(&chunk.expiry().to_be_bytes());
    value.extend_from_slice(chunk.data());
    value
}

/// Splits a stored chunk value into expiry and data.
fn split_value(name: Name, value: &[u8]) -> Result<(u64, &[u8]), StoreError> {
    let (expiry, data) = value.split_first_chunk::<8>().ok_or_else(|| {
        corrupt(
            CHUNKS,
            name,
            format!(
                "value is {} bytes, shorter than its 8-byte expiry",
                value.len()
            ),
        )
    })?;
    Ok((u64::from_be_bytes(*expiry), data))
}

fn make_chunk(name: Name, expiry: u64, data: &[u8]) -> Result<Chunk, StoreError> {
    Chunk::new(name, expiry, Bytes::copy_from_slice(data))
        .map_err(|e| corrupt(CHUNKS, name, e.to_string()))
}

/// Decodes one `chunks` record; `None` when it is expired at `now_ms`.
fn decode_unexpired(key: &[u8], value: &[u8], now_ms: u64) -> Result<Option<Chunk>, StoreError> {
    let name = decode_name(CHUNKS, key)?;
    let (expiry, data) = split_value(name, value)?;
    if now_ms >= expiry {
        return Ok(None);
    }
    make_chunk(name, expiry, data).map(Some)
}

/// Feeds the record decoders one corrupt record made of arbitrary bytes and checks them: none
/// panics, a decode that succeeds is canonical (re-encoding gives back exactly the stored
/// bytes), and one that fails says `Corrupt`.
///
/// The harness of the `store_records` fuzz target and of its regression test
/// (`framework/tests/fuzz_regressions.rs`); not an API. `data` is read as one byte giving the
/// key's length (modulo 41), the key, 8 bytes of clock (big-endian, zero-padded), and the
/// rest as the value.
#[doc(hidden)]
pub fn check_record_decoding(data: &[u8]) {
    let (key_len, rest) = data.split_first().map_or((0, data), |(n, rest)| (usize::from(*n) % 41, rest));
    let (key, rest) = rest.split_at(key_len.min(rest.len()));
    let (clock, value) = rest.split_at(8.min(rest.len()));
    let mut now = [0u8; 8];
    now[..clock.len()].copy_from_slice(clock);
    let now_ms = u64::from_be_bytes(now);
    let corrupt_only = |err: StoreError| {
        assert!(matches!(err, StoreError::Corrupt { .. }), "not `Corrupt`: {err:?}");
        assert!(!err.to_string().is_empty());
    };

    // Name keys of the `chunks` and `outbox` keyspaces.
    for keyspace in [CHUNKS, OUTBOX] {
        match decode_name(keyspace, key) {
            Ok(name) => assert_eq!(name.to_bytes().as_slice(), key),
            Err(err) => {
                assert_ne!(key.len(), 16, "a 16-byte key is a name");
                corrupt_only(err);
            }
        }
    }
    // Keys of the `expiry` index.
    match decode_expiry_key(key) {
        Ok((expiry, name)) => assert_eq!(expiry_key(expiry, name).as_slice(), key),
        Err(err) => {
            assert_ne!(key.len(), 24, "a 24-byte key is an expiry entry");
            corrupt_only(err);
        }
    }
    // A `chunks` record as scans read it.
    match decode_unexpired(key, value, now_ms) {
        Ok(Some(chunk)) => {
            assert_eq!(chunk.name().to_bytes().as_slice(), key);
            assert!(chunk.expiry() > now_ms, "an expired chunk was returned");
            assert_eq!(encode_value(&chunk), value);
        }
        Ok(None) => {
            let expiry = value.first_chunk::<8>().map(|e| u64::from_be_bytes(*e));
            assert!(expiry.is_some_and(|e| e <= now_ms), "an unexpired record was skipped");
        }
        Err(err) => corrupt_only(err),
    }
    // The same value as `get` reads it (no expiry check).
    let name = Name::new(u128::from_be_bytes(now.repeat(2).try_into().expect("16 bytes")));
    match split_value(name, value).and_then(|(expiry, data)| make_chunk(name, expiry, data)) {
        Ok(chunk) => {
            assert_eq!(chunk.name(), name);
            assert_eq!(encode_value(&chunk), value);
        }
        Err(err) => {
            assert!(value.len() < 8 || value.len() > 8 + crate::MAX_CHUNK_DATA, "a valid value was refused");
            corrupt_only(err);
        }
    }
}

impl FjallStore {
    /// Opens (creating if needed) the store in directory `dir`, holding at most `capacity`
    /// bytes (see [`stored_size`]); [`super::UNLIMITED`] never evicts.
    ///
    /// Scans the stored chunks and outbox to recompute the counters. A store reopened with a
    /// smaller capacity than it holds evicts on the next insert.
    pub fn open(dir: &Path, capacity: u64) -> Result<Self, StoreError> {
        let context = |what: &str| format!("{what} {}", dir.display());
        let db = Database::builder(dir)
            .manual_journal_persist(true)
            .cache_size(BLOCK_CACHE)
            .max_journaling_size(MAX_JOURNALING)
            .open()
            .map_err(|e| backend(&context("opening database at"), e))?;
        let keyspace = |name: &str| {
            db.keyspace(name, || keyspace_options(name))
                .map_err(|e| backend(&context(&format!("opening keyspace {name} in")), e))
        };
        let chunks = keyspace(CHUNKS)?;
        let expiry = keyspace(EXPIRY)?;
        let outbox = keyspace(OUTBOX)?;

        let mut stats = StoreStats {
            capacity,
            ..StoreStats::default()
        };
        for guard in chunks.iter() {
            let value_len = guard
                .size()
                .map_err(|e| backend(&context("counting chunks in"), e))?;
            stats.chunks += 1;
            stats.bytes += 16 + u64::from(value_len);
        }
        stats.outbox = outbox
            .len()
            .map_err(|e| backend(&context("counting outbox in"), e))? as u64;

        Ok(FjallStore {
            chunks,
            expiry,
            outbox,
            db,
            path: dir.to_owned(),
            stats,
            evicted_through: None,
        })
    }

    /// The directory the store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key/value state of the plugin called `plugin`, in this database: its own
    /// namespace of the `plugin-state` keyspace. Writes are synced when applied.
    #[cfg(feature = "plugin-host")]
    pub fn plugin_state(&self, plugin: &str) -> Result<FjallState, StoreError> {
        if plugin.is_empty() || plugin.contains('\0') {
            return Err(StoreError::Backend(format!("plugin name {plugin:?} must be non-empty text without NUL")));
        }
        let keyspace = self
            .db
            .keyspace(PLUGIN_STATE, || keyspace_options(PLUGIN_STATE))
            .map_err(|e| backend(&format!("opening keyspace {PLUGIN_STATE}"), e))?;
        let mut prefix = plugin.as_bytes().to_vec();
        prefix.push(0);
        Ok(FjallState { db: self.db.clone(), keyspace, prefix })
    }

    /// Size of the chunk stored at `name` (see [`stored_size`]), without decoding it.
    fn size_of(&self, name: Name) -> Result<Option<u64>, StoreError> {
        let size = self
            .chunks
            .size_of(name.to_bytes())
            .map_err(|e| backend(&format!("reading size of chunk {name}"), e))?;
        Ok(size.map(|len| 16 + u64::from(len)))
    }

    /// The part of the `expiry` index not known to be evicted: after
    /// [`evicted_through`](Self::evicted_through), or all of it.
    fn unevicted(&self) -> (Bound<[u8; 24]>, Bound<[u8; 24]>) {
        let from = self.evicted_through.map_or(Bound::Unbounded, Bound::Excluded);
        (from, Bound::Unbounded)
    }

    /// Visits unexpired chunks under `filter`, forwards or backwards.
    fn for_each(
        &self,
        first: Name,
        last: Name,
        now_ms: u64,
        reverse: bool,
        f: &mut dyn FnMut(Chunk) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        if first > last {
            return Ok(());
        }
        let range = self.chunks.range(first.to_bytes()..=last.to_bytes());
        let iter: Box<dyn Iterator<Item = ::fjall::Guard>> = if reverse {
            Box::new(range.rev())
        } else {
            Box::new(range)
        };
        for guard in iter {
            let (key, value) = guard
                .into_inner()
                .map_err(|e| backend(&format!("scanning chunks {first}..={last}"), e))?;
            if let Some(chunk) = decode_unexpired(&key, &value, now_ms)?
                && f(chunk).is_break()
            {
                break;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for FjallStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FjallStore")
            .field("path", &self.path)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Store for FjallStore {
    fn insert(&mut self, chunk: &Chunk) -> Result<InsertOutcome, StoreError> {
        let name = chunk.name();
        let key = name.to_bytes();
        let existing = self
            .chunks
            .get(key)
            .map_err(|e| backend(&format!("reading chunk {name}"), e))?;
        if let Some(value) = existing {
            let (expiry, data) = split_value(name, &value)?;
            return Ok(
                if expiry == chunk.expiry() && data == chunk.data().as_ref() {
                    InsertOutcome::Duplicate
                } else {
                    InsertOutcome::Conflict
                },
            );
        }

        let new_key = expiry_key(chunk.expiry(), name);
        if self.evicted_through.is_some_and(|through| new_key <= through) {
            self.evicted_through = None;
        }
        // With room to spare (the common case) nothing is evicted: skip opening a range
        // iterator over the expiry index, which costs more than the rest of the insert.
        let room = self.stats.bytes.saturating_add(stored_size(chunk)) <= self.stats.capacity;
        let candidates = (!room).then(|| self.expiry.range(self.unevicted())).into_iter().flatten().map(|guard| {
            let key = guard
                .key()
                .map_err(|e| backend("scanning expiry index", e))?;
            let (expiry, name) = decode_expiry_key(&key)?;
            Ok(Victim {
                expiry,
                name,
                size: self.size_of(name)?,
            })
        });
        let victims = plan_capacity_eviction(&self.stats, chunk, candidates)?;

        let mut batch = self.db.batch();
        for victim in &victims {
            batch.remove(&self.chunks, victim.name.to_bytes().as_slice());
            batch.remove(
                &self.expiry,
                expiry_key(victim.expiry, victim.name).as_slice(),
            );
        }
        batch.insert(&self.chunks, key.as_slice(), encode_value(chunk));
        batch.insert(&self.expiry, new_key.as_slice(), Vec::new());
        batch
            .commit()
            .map_err(|e| backend(&format!("writing chunk {name}"), e))?;

        for size in victims.iter().filter_map(|v| v.size) {
            self.stats.chunks -= 1;
            self.stats.bytes -= size;
            self.stats.evicted_capacity += 1;
        }
        self.stats.chunks += 1;
        self.stats.bytes += stored_size(chunk);
        Ok(InsertOutcome::Inserted)
    }

    fn get(&self, name: Name) -> Result<Option<Chunk>, StoreError> {
        let value = self
            .chunks
            .get(name.to_bytes())
            .map_err(|e| backend(&format!("reading chunk {name}"), e))?;
        value
            .map(|value| {
                let (expiry, data) = split_value(name, &value)?;
                make_chunk(name, expiry, data)
            })
            .transpose()
    }

    fn scan_range(
        &self,
        first: Name,
        last: Name,
        now_ms: u64,
        f: &mut dyn FnMut(Chunk) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        self.for_each(first, last, now_ms, false, f)
    }

    fn scan_last(&self, filter: Filter, n: usize, now_ms: u64) -> Result<Vec<Chunk>, StoreError> {
        let mut out = Vec::new();
        if n == 0 {
            return Ok(out);
        }
        let (first, last) = filter.range();
        self.for_each(first, last, now_ms, true, &mut |chunk| {
            out.push(chunk);
            if out.len() >= n {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        out.reverse();
        Ok(out)
    }

    fn evict_expired(&mut self, now_ms: u64) -> Result<u64, StoreError> {
        let last = expiry_key(now_ms, Name::MAX);
        let mut evicted = 0;
        loop {
            let mut batch = self.db.batch();
            let (mut chunks, mut bytes, mut seen) = (0u64, 0u64, 0usize);
            let mut through = None;
            let (from, _) = self.unevicted();
            for guard in self.expiry.range((from, Bound::Included(last))).take(EVICT_BATCH) {
                let key = guard
                    .key()
                    .map_err(|e| backend("scanning expiry index", e))?;
                let (expiry, name) = decode_expiry_key(&key)?;
                if let Some(size) = self.size_of(name)? {
                    chunks += 1;
                    bytes += size;
                }
                batch.remove(&self.chunks, name.to_bytes().as_slice());
                batch.remove(&self.expiry, expiry_key(expiry, name).as_slice());
                through = Some(expiry_key(expiry, name));
                seen += 1;
            }
            if seen == 0 {
                break;
            }
            batch
                .commit()
                .map_err(|e| backend("deleting expired chunks", e))?;
            self.evicted_through = through;
            self.stats.chunks -= chunks;
            self.stats.bytes -= bytes;
            self.stats.evicted_expired += chunks;
            evicted += chunks;
            if seen < EVICT_BATCH {
                break;
            }
        }
        Ok(evicted)
    }

    /// Persists the journal with [`PersistMode::SyncAll`] (`fsync`). `SyncData`
    /// (`fdatasync`) would save little here: journal appends grow the file, so its size
    /// metadata must be flushed either way, and `fsync` is the portable guarantee.
    fn sync(&mut self) -> Result<(), StoreError> {
        self.db
            .persist(PersistMode::SyncAll)
            .map_err(|e| backend(&format!("syncing store at {}", self.path.display()), e))
    }

    /// Hands the journal's buffer to the operating system, under fjall's journal lock, which
    /// is held only for that `write`.
    fn prepare_sync(&mut self) -> Result<(), StoreError> {
        self.db
            .persist(PersistMode::Buffer)
            .map_err(|e| backend(&format!("flushing the journal of {}", self.path.display()), e))
    }

    fn syncer(&self) -> Option<Box<dyn Syncer>> {
        Some(Box::new(FjallSyncer { db: self.db.clone(), dir: self.path.clone(), journal: None }))
    }

    fn stats(&self) -> StoreStats {
        self.stats
    }

    fn outbox_push(&mut self, name: Name) -> Result<(), StoreError> {
        let key = name.to_bytes();
        let context = || format!("adding {name} to the outbox");
        if !self
            .outbox
            .contains_key(key)
            .map_err(|e| backend(&context(), e))?
        {
            self.outbox
                .insert(key.as_slice(), Vec::new())
                .map_err(|e| backend(&context(), e))?;
            self.stats.outbox += 1;
        }
        Ok(())
    }

    fn outbox_remove(&mut self, name: Name) -> Result<bool, StoreError> {
        let key = name.to_bytes();
        let context = || format!("removing {name} from the outbox");
        if !self
            .outbox
            .contains_key(key)
            .map_err(|e| backend(&context(), e))?
        {
            return Ok(false);
        }
        self.outbox
            .remove(key.as_slice())
            .map_err(|e| backend(&context(), e))?;
        self.stats.outbox -= 1;
        Ok(true)
    }

    fn outbox_pending(&self, limit: usize) -> Result<Vec<Name>, StoreError> {
        self.outbox
            .iter()
            .take(limit)
            .map(|guard| {
                let key = guard.key().map_err(|e| backend("scanning the outbox", e))?;
                decode_name(OUTBOX, &key)
            })
            .collect()
    }
}

/// One plugin's [`StateStore`](crate::plugin::StateStore) in a [`FjallStore`]'s database
/// (see [`FjallStore::plugin_state`]).
#[cfg(feature = "plugin-host")]
pub struct FjallState {
    db: Database,
    keyspace: Keyspace,
    /// The plugin's name and a 0 byte: every key of this plugin starts with it.
    prefix: Vec<u8>,
}

#[cfg(feature = "plugin-host")]
impl FjallState {
    fn key(&self, key: &[u8]) -> Vec<u8> {
        [self.prefix.as_slice(), key].concat()
    }
}

#[cfg(feature = "plugin-host")]
impl crate::plugin::StateStore for FjallState {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let value = self.keyspace.get(self.key(key)).map_err(|e| backend("reading plugin state", e))?;
        Ok(value.map(|v| v.to_vec()))
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<crate::plugin::Entry>, StoreError> {
        let full = self.key(prefix);
        let iter = self.keyspace.prefix(&full);
        let after = after.map(|a| self.key(a));
        let mut out = Vec::new();
        for guard in iter {
            if out.len() >= limit {
                break;
            }
            let (key, value) = guard.into_inner().map_err(|e| backend("scanning plugin state", e))?;
            if after.as_deref().is_some_and(|a| key.as_ref() <= a) {
                continue;
            }
            out.push((key[self.prefix.len()..].to_vec(), value.to_vec()));
        }
        Ok(out)
    }

    fn apply(&mut self, writes: Vec<crate::plugin::Write>) -> Result<(), StoreError> {
        let mut batch = self.db.batch();
        for (key, value) in writes {
            match value {
                Some(value) => batch.insert(&self.keyspace, self.key(&key), value),
                None => batch.remove(&self.keyspace, self.key(&key)),
            }
        }
        batch.commit().map_err(|e| backend("writing plugin state", e))?;
        self.db.persist(PersistMode::SyncAll).map_err(|e| backend("syncing plugin state", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_keys_sort_by_expiry_then_name() {
        let a = expiry_key(1, Name::MAX);
        let b = expiry_key(2, Name::MIN);
        assert!(a < b);
        assert_eq!(decode_expiry_key(&b).unwrap(), (2, Name::MIN));
        assert!(matches!(
            decode_expiry_key(&a[..23]),
            Err(StoreError::Corrupt { .. })
        ));
    }

    fn chunk(n: u128, expiry: u64, len: usize) -> Chunk {
        Chunk::new(Name::new(n), expiry, vec![7u8; len]).unwrap()
    }

    /// The soak's store held 20 MiB of chunks while fjall's default 64 MiB memtables (one per
    /// keyspace, never flushed before they filled) kept far more than that in the heap.
    #[test]
    fn memtables_stay_small_under_insert_and_evict_churn() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FjallStore::open(dir.path(), crate::store::UNLIMITED).unwrap();
        // 40 MB through the store, evicted as it goes, as expiring chunks are.
        for n in 0..80_000u64 {
            store.insert(&chunk(u128::from(n), 1_000 + n, 480)).unwrap();
            if n % 1_000 == 999 {
                store.evict_expired(1_000 + n - 500).unwrap();
            }
        }
        store.sync().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while store.db.outstanding_flushes() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let memtables = store.db.write_buffer_size();
        assert!(memtables < 32 << 20, "{memtables} bytes in memtables");
        assert!(store.stats().chunks <= 1_000, "{:?}", store.stats());
    }

    /// Eviction scans start after the last key evicted; a chunk inserted below that point
    /// (already expired, which the store does not refuse) is still found and evicted.
    #[test]
    fn a_chunk_expiring_before_the_last_eviction_is_still_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FjallStore::open(dir.path(), crate::store::UNLIMITED).unwrap();
        for n in 0..10_000u64 {
            store.insert(&chunk(u128::from(n), 100 + n, 8)).unwrap();
        }
        assert_eq!(store.evict_expired(100 + 5_000).unwrap(), 5_001);
        assert!(store.evicted_through.is_some());
        store.insert(&chunk(1 << 100, 50, 8)).unwrap();
        assert!(store.evicted_through.is_none(), "the scan starts over");
        assert_eq!(store.evict_expired(100 + 5_000).unwrap(), 1);
        assert_eq!(store.evict_expired(100 + 10_000).unwrap(), 4_999);
        assert_eq!(store.stats().chunks, 0);
        assert_eq!(store.expiry.iter().count(), 0);
    }

    #[test]
    fn malformed_values_are_corrupt_not_panics() {
        let name = Name::new(3);
        let err = split_value(name, &[1, 2, 3]).unwrap_err();
        assert!(err.to_string().contains("chunks/0x"), "{err}");
        let big = vec![0u8; 8 + 1025];
        let (expiry, data) = split_value(name, &big).unwrap();
        assert!(matches!(
            make_chunk(name, expiry, data),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            decode_name(CHUNKS, &[1, 2]),
            Err(StoreError::Corrupt { .. })
        ));
    }
}

#[cfg(test)]
mod sync_tests {
    use super::*;

    /// The syncer fsyncs fjall's active journal through its own descriptor: this checks the
    /// journal layout it relies on is the one fjall writes (were it not, it would fall back to
    /// fjall's locked sync, correct but slower), and that what it synced reads back after a
    /// reopen.
    #[test]
    fn the_syncer_finds_the_active_journal_and_what_it_synced_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<u128> = (1..=50).collect();
        {
            let mut store = FjallStore::open(dir.path(), crate::store::UNLIMITED).unwrap();
            let mut syncer = store.syncer().expect("fjall syncs on a thread of its own");
            for &name in &names {
                let chunk = Chunk::new(Name::new(name), u64::MAX, vec![7; 100]).unwrap();
                assert_eq!(store.insert(&chunk).unwrap(), InsertOutcome::Inserted);
            }
            store.outbox_push(Name::new(3)).unwrap();
            store.prepare_sync().unwrap();
            // From another thread, as the relay runs it.
            std::thread::spawn(move || syncer.sync().unwrap()).join().unwrap();
            let mut direct = FjallSyncer { db: store.db.clone(), dir: store.path.clone(), journal: None };
            assert!(direct.sync_journal().unwrap(), "the active journal is found in {}", dir.path().display());
        }
        let store = FjallStore::open(dir.path(), crate::store::UNLIMITED).unwrap();
        for &name in &names {
            assert!(store.get(Name::new(name)).unwrap().is_some(), "chunk {name} is back");
        }
        assert_eq!(store.outbox_pending(10).unwrap(), vec![Name::new(3)]);
    }
}
