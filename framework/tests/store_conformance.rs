//! One conformance suite run against every `Store` backend, plus fjall-only durability and
//! corruption tests and a property test that both backends agree on random operation sequences.

use std::cell::RefCell;
use std::ops::ControlFlow;
use std::path::Path;

use canopy::store::{UNLIMITED, stored_size};
use canopy::{
    Chunk, Filter, FjallStore, InsertOutcome, MemoryStore, Name, Store, StoreError, StoreStats,
};
use proptest::prelude::*;
use tempfile::TempDir;

fn chunk(name: u128, expiry: u64, data: &[u8]) -> Chunk {
    Chunk::new(Name::new(name), expiry, data.to_vec()).unwrap()
}

fn filter(text: &str) -> Filter {
    text.parse().unwrap()
}

fn scan_all<S: Store>(store: &S, filter: Filter, now: u64) -> Vec<Chunk> {
    let mut out = Vec::new();
    store
        .scan(filter, now, &mut |c| {
            out.push(c);
            ControlFlow::Continue(())
        })
        .unwrap();
    out
}

fn names(chunks: &[Chunk]) -> Vec<u128> {
    chunks.iter().map(|c| c.name().to_u128()).collect()
}

/// Runs every backend-independent check; `make(capacity)` builds a fresh, empty store.
fn conformance<S: Store>(make: impl Fn(u64) -> S) {
    insert_duplicate_conflict(&make);
    scan_order_filter_expiry(&make);
    scan_stops_early(&make);
    scan_last_returns_last_n_ascending(&make);
    evict_expired_removes_exactly_expired(&make);
    capacity_evicts_earliest_first(&make);
    capacity_full_evicts_nothing(&make);
    outbox_order_limit_and_idempotence(&make);
}

fn insert_duplicate_conflict<S: Store>(make: &impl Fn(u64) -> S) {
    let mut s = make(UNLIMITED);
    assert_eq!(
        s.stats(),
        StoreStats {
            capacity: UNLIMITED,
            ..Default::default()
        }
    );
    let original = chunk(1, 100, b"first bytes");
    assert_eq!(s.insert(&original).unwrap(), InsertOutcome::Inserted);
    assert_eq!(s.insert(&original).unwrap(), InsertOutcome::Duplicate);
    assert_eq!(
        s.insert(&chunk(1, 100, b"other bytes")).unwrap(),
        InsertOutcome::Conflict
    );
    assert_eq!(
        s.insert(&chunk(1, 101, b"first bytes")).unwrap(),
        InsertOutcome::Conflict
    );
    assert_eq!(
        s.insert(&chunk(1, 100, b"")).unwrap(),
        InsertOutcome::Conflict
    );
    let got = s.get(Name::new(1)).unwrap().unwrap();
    assert_eq!(got, original);
    assert_eq!(got.data().as_ref(), b"first bytes");
    assert_eq!(got.expiry(), 100);
    assert_eq!(s.get(Name::new(2)).unwrap(), None);

    // Empty and maximal payloads round-trip too.
    let empty = chunk(2, 100, b"");
    let full = chunk(3, 100, &[0xee; canopy::MAX_CHUNK_DATA]);
    assert_eq!(s.insert(&empty).unwrap(), InsertOutcome::Inserted);
    assert_eq!(s.insert(&full).unwrap(), InsertOutcome::Inserted);
    assert_eq!(s.get(Name::new(2)).unwrap().unwrap(), empty);
    assert_eq!(s.get(Name::new(3)).unwrap().unwrap(), full);

    let stats = s.stats();
    assert_eq!(stats.chunks, 3);
    assert_eq!(
        stats.bytes,
        stored_size(&original) + stored_size(&empty) + stored_size(&full)
    );
    assert_eq!(stats.bytes, 24 * 3 + 11 + 1024);
    assert_eq!(
        (stats.evicted_capacity, stats.evicted_expired, stats.outbox),
        (0, 0, 0)
    );
}

fn scan_order_filter_expiry<S: Store>(make: &impl Fn(u64) -> S) {
    let mut s = make(UNLIMITED);
    let aa = 0xaa_u128 << 120;
    let ab = 0xab_u128 << 120;
    let inserted = [
        (ab | 3, 100),
        (aa | 2, 100),
        (u128::MAX, 100),
        (aa | 1, 50), // expires at 50
        (0, 100),
        (ab | 1, 100),
        (aa | 3, 100),
        (aa | (1 << 100), 100),
    ];
    for (name, expiry) in inserted {
        assert_eq!(
            s.insert(&chunk(name, expiry, &name.to_be_bytes())).unwrap(),
            InsertOutcome::Inserted
        );
    }

    let all = scan_all(&s, Filter::ALL, 10);
    let mut expected: Vec<u128> = inserted.iter().map(|(n, _)| *n).collect();
    expected.sort();
    assert_eq!(
        names(&all),
        expected,
        "Filter::ALL returns everything in name order"
    );
    for c in &all {
        assert_eq!(c.data().as_ref(), c.name().to_bytes(), "payload intact");
    }

    let under_aa = filter("0xaa000000000000000000000000000000/8");
    assert_eq!(
        names(&scan_all(&s, under_aa, 10)),
        [aa | 1, aa | 2, aa | 3, aa | (1 << 100)]
    );
    assert_eq!(
        names(&scan_all(&s, under_aa, 50)),
        [aa | 2, aa | 3, aa | (1 << 100)],
        "expiry is exclusive"
    );
    assert_eq!(names(&scan_all(&s, under_aa, 49)).len(), 4);
    let narrow = Filter::new(Name::new(aa), 100).unwrap();
    assert_eq!(names(&scan_all(&s, narrow, 10)), [aa | 1, aa | 2, aa | 3]);
    assert_eq!(
        names(&scan_all(&s, Filter::exact(Name::new(ab | 3)), 10)),
        [ab | 3]
    );
    assert_eq!(
        names(&scan_all(&s, Filter::exact(Name::MAX), 10)),
        [u128::MAX]
    );
    assert_eq!(names(&scan_all(&s, Filter::exact(Name::MIN), 10)), [0]);
    assert!(scan_all(&s, Filter::exact(Name::new(ab | 2)), 10).is_empty());
    assert!(scan_all(&s, Filter::exact(Name::new(aa | 1)), 60).is_empty());
    assert!(scan_all(&s, filter("0xac000000000000000000000000000000/8"), 10).is_empty());
    assert!(
        scan_all(&s, Filter::ALL, 100).is_empty(),
        "everything expired at 100"
    );
    // Scans do not evict: get still sees the expired chunk.
    assert!(s.get(Name::new(aa | 1)).unwrap().is_some());
}

fn scan_stops_early<S: Store>(make: &impl Fn(u64) -> S) {
    let mut s = make(UNLIMITED);
    for n in (0..20u128).rev() {
        s.insert(&chunk(n, 100, b"x")).unwrap();
    }
    let mut seen = Vec::new();
    s.scan(Filter::ALL, 0, &mut |c| {
        seen.push(c.name().to_u128());
        if seen.len() == 3 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!(seen, [0, 1, 2]);
}

fn scan_last_returns_last_n_ascending<S: Store>(make: &impl Fn(u64) -> S) {
    let mut s = make(UNLIMITED);
    let base = 0x0102_u128 << 112;
    for seq in 1..=10u128 {
        // seq 9 has already expired at the scan time below.
        let expiry = if seq == 9 { 20 } else { 100 };
        s.insert(&chunk(base | seq, expiry, b"m")).unwrap();
    }
    s.insert(&chunk((0x0103 << 112) | 1, 100, b"after"))
        .unwrap();
    s.insert(&chunk((0x0101 << 112) | 99, 100, b"before"))
        .unwrap();
    let f = Filter::new(Name::new(base), 16).unwrap();

    let last3 = s.scan_last(f, 3, 30).unwrap();
    assert_eq!(names(&last3), [base | 7, base | 8, base | 10]);
    let last3_early = s.scan_last(f, 3, 10).unwrap();
    assert_eq!(names(&last3_early), [base | 8, base | 9, base | 10]);
    assert!(s.scan_last(f, 0, 30).unwrap().is_empty());
    let everything = s.scan_last(f, 100, 30).unwrap();
    assert_eq!(
        names(&everything),
        (1..=10)
            .filter(|&q| q != 9)
            .map(|q| base | q)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        names(&s.scan_last(Filter::ALL, 1, 30).unwrap()),
        [(0x0103 << 112) | 1]
    );
    assert!(s.scan_last(f, 5, 100).unwrap().is_empty());
}

fn evict_expired_removes_exactly_expired<S: Store>(make: &impl Fn(u64) -> S) {
    let mut s = make(UNLIMITED);
    let items = [(1u128, 10u64), (2, 20), (3, 30), (4, 20), (5, u64::MAX)];
    for (name, expiry) in items {
        s.insert(&chunk(name, expiry, b"abcd")).unwrap();
    }
    assert_eq!(s.evict_expired(9).unwrap(), 0);
    assert_eq!(s.evict_expired(20).unwrap(), 3, "expiry ≤ now is expired");
    for gone in [1, 2, 4] {
        assert_eq!(s.get(Name::new(gone)).unwrap(), None, "{gone} evicted");
    }
    for kept in [3, 5] {
        assert!(s.get(Name::new(kept)).unwrap().is_some(), "{kept} kept");
    }
    assert_eq!(s.evict_expired(20).unwrap(), 0);
    let stats = s.stats();
    assert_eq!(
        (stats.chunks, stats.bytes, stats.evicted_expired),
        (2, 2 * 28, 3)
    );
    // An evicted name is free again.
    assert_eq!(
        s.insert(&chunk(1, 50, b"new")).unwrap(),
        InsertOutcome::Inserted
    );
    assert_eq!(s.evict_expired(u64::MAX - 1).unwrap(), 2);
    assert_eq!(names(&scan_all(&s, Filter::ALL, 0)), [5]);
    assert_eq!(s.stats().evicted_expired, 5);
}

/// Every chunk here costs 24 + 100 = 124 bytes.
const C: u64 = 124;

fn capacity_evicts_earliest_first<S: Store>(make: &impl Fn(u64) -> S) {
    let mut s = make(3 * C);
    let data = [7u8; 100];
    s.insert(&chunk(1, 30, &data)).unwrap();
    s.insert(&chunk(2, 10, &data)).unwrap();
    s.insert(&chunk(3, 20, &data)).unwrap();
    assert_eq!(s.stats().bytes, 3 * C);

    // Full, and a duplicate needs no room.
    assert_eq!(
        s.insert(&chunk(2, 10, &data)).unwrap(),
        InsertOutcome::Duplicate
    );
    assert_eq!(s.stats().evicted_capacity, 0);

    assert_eq!(
        s.insert(&chunk(4, 40, &data)).unwrap(),
        InsertOutcome::Inserted
    );
    assert_eq!(
        s.get(Name::new(2)).unwrap(),
        None,
        "earliest-expiring chunk evicted"
    );
    let stats = s.stats();
    assert_eq!(
        (stats.chunks, stats.bytes, stats.evicted_capacity),
        (3, 3 * C, 1)
    );

    // A 324-byte chunk expiring last needs three evictions: 3 (20), 1 (30), 4 (40).
    assert_eq!(
        s.insert(&chunk(5, 100, &[1u8; 300])).unwrap(),
        InsertOutcome::Inserted
    );
    assert_eq!(names(&scan_all(&s, Filter::ALL, 0)), [5]);
    let stats = s.stats();
    assert_eq!(
        (stats.chunks, stats.bytes, stats.evicted_capacity),
        (1, 324, 4)
    );
    assert_eq!(stats.evicted_expired, 0);

    // Equal expiry does not count as "expires before": no eviction possible.
    let err = s.insert(&chunk(6, 100, &[1u8; 100])).unwrap_err();
    assert!(matches!(err, StoreError::Full { needed: C, .. }), "{err}");
}

fn capacity_full_evicts_nothing<S: Store>(make: &impl Fn(u64) -> S) {
    let mut s = make(3 * C);
    let data = [7u8; 100];
    for (name, expiry) in [(1u128, 30u64), (2, 10), (3, 20)] {
        s.insert(&chunk(name, expiry, &data)).unwrap();
    }
    let before = s.stats();

    // Expires before everything stored.
    let err = s.insert(&chunk(9, 5, &data)).unwrap_err();
    match &err {
        StoreError::Full {
            name,
            needed,
            capacity,
        } => {
            assert_eq!((*name, *needed, *capacity), (Name::new(9), C, 3 * C));
        }
        other => panic!("expected Full, got {other:?}"),
    }
    assert!(
        err.to_string()
            .starts_with("store full: 124 bytes needed, capacity 372 bytes"),
        "{err}"
    );

    // A 224-byte chunk expiring at 15: only chunk 2 (expiry 10) may go, which frees 124 of
    // the 224 bytes → Full, and chunk 2 must survive the failed attempt. Expiring at 25,
    // chunks 2 (10) and 3 (20) may both go, which is enough.
    let err = s.insert(&chunk(8, 15, &[0u8; 200])).unwrap_err();
    assert!(matches!(err, StoreError::Full { needed: 224, .. }), "{err}");
    assert_eq!(s.stats(), before, "a refused insert evicts nothing");
    assert_eq!(names(&scan_all(&s, Filter::ALL, 0)), [1, 2, 3]);
    assert_eq!(s.get(Name::new(8)).unwrap(), None);

    assert_eq!(
        s.insert(&chunk(8, 25, &[0u8; 200])).unwrap(),
        InsertOutcome::Inserted
    );
    assert_eq!(names(&scan_all(&s, Filter::ALL, 0)), [1, 8]);
    assert_eq!(s.stats().evicted_capacity, 2);
    assert_eq!(s.stats().bytes, C + 224);

    // Larger than the whole capacity.
    let mut tiny = make(100);
    let err = tiny.insert(&chunk(1, u64::MAX, &data)).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Full {
                needed: C,
                capacity: 100,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(tiny.stats().chunks, 0);
}

fn outbox_order_limit_and_idempotence<S: Store>(make: &impl Fn(u64) -> S) {
    let mut s = make(UNLIMITED);
    assert!(s.outbox_pending(10).unwrap().is_empty());
    for n in [30u128, 10, u128::MAX, 20, 0] {
        s.outbox_push(Name::new(n)).unwrap();
    }
    s.outbox_push(Name::new(10)).unwrap();
    assert_eq!(s.stats().outbox, 5);
    let all: Vec<u128> = s
        .outbox_pending(10)
        .unwrap()
        .iter()
        .map(|n| n.to_u128())
        .collect();
    assert_eq!(all, [0, 10, 20, 30, u128::MAX]);
    let two: Vec<u128> = s
        .outbox_pending(2)
        .unwrap()
        .iter()
        .map(|n| n.to_u128())
        .collect();
    assert_eq!(two, [0, 10]);
    assert!(s.outbox_pending(0).unwrap().is_empty());
    assert!(s.outbox_remove(Name::new(10)).unwrap());
    assert!(!s.outbox_remove(Name::new(10)).unwrap());
    assert!(!s.outbox_remove(Name::new(11)).unwrap());
    let rest: Vec<u128> = s
        .outbox_pending(10)
        .unwrap()
        .iter()
        .map(|n| n.to_u128())
        .collect();
    assert_eq!(rest, [0, 20, 30, u128::MAX]);
    assert_eq!(s.stats().outbox, 4);
    // The outbox is independent of chunk storage and capacity.
    assert_eq!(s.stats().chunks, 0);
    s.sync().unwrap();
}

/// Hands out fjall stores, each in its own temporary directory that lives as long as `self`.
#[derive(Default)]
struct FjallDirs(RefCell<Vec<TempDir>>);

impl FjallDirs {
    fn make(&self, capacity: u64) -> FjallStore {
        let dir = tempfile::tempdir().unwrap();
        let store = FjallStore::open(dir.path(), capacity).unwrap();
        self.0.borrow_mut().push(dir);
        store
    }
}

#[test]
fn memory_store_conforms() {
    conformance(MemoryStore::new);
}

#[test]
fn fjall_store_conforms() {
    let dirs = FjallDirs::default();
    conformance(|capacity| dirs.make(capacity));
}

fn durable_name(i: u128) -> Name {
    // Spread names over the whole space, not in insertion order.
    Name::new(i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835))
}

#[test]
fn fjall_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (stats, chunks, outbox) = {
        let mut s = FjallStore::open(dir.path(), UNLIMITED).unwrap();
        for i in 0..1000u128 {
            let len = (i % 97) as usize * 7;
            let c = Chunk::new(durable_name(i), 1_000_000 + i as u64, vec![i as u8; len]).unwrap();
            assert_eq!(s.insert(&c).unwrap(), InsertOutcome::Inserted);
            if i % 3 == 0 {
                s.outbox_push(durable_name(i)).unwrap();
            }
        }
        s.sync().unwrap();
        (
            s.stats(),
            scan_all(&s, Filter::ALL, 0),
            s.outbox_pending(usize::MAX).unwrap(),
        )
    };
    assert_eq!(chunks.len(), 1000);
    assert_eq!(outbox.len(), 334);

    let mut s = FjallStore::open(dir.path(), UNLIMITED).unwrap();
    assert_eq!(s.stats(), stats);
    assert_eq!(scan_all(&s, Filter::ALL, 0), chunks);
    assert_eq!(s.outbox_pending(usize::MAX).unwrap(), outbox);
    let c = &chunks[500];
    assert_eq!(s.get(c.name()).unwrap().as_ref(), Some(c));
    assert_eq!(s.insert(c).unwrap(), InsertOutcome::Duplicate);
    // The expiry index survived too.
    assert_eq!(s.evict_expired(1_000_000 + 499).unwrap(), 500);
    assert_eq!(s.stats().chunks, 500);
}

#[test]
fn fjall_reopen_with_smaller_capacity_evicts_on_insert() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = FjallStore::open(dir.path(), UNLIMITED).unwrap();
        for n in 0..10u128 {
            s.insert(&chunk(n, 10 + n as u64, &[0; 100])).unwrap();
        }
        s.sync().unwrap();
    }
    let mut s = FjallStore::open(dir.path(), 5 * C).unwrap();
    assert_eq!(s.stats().bytes, 10 * C);
    s.insert(&chunk(100, 1000, &[0; 100])).unwrap();
    assert_eq!(s.stats().evicted_capacity, 6);
    assert_eq!(names(&scan_all(&s, Filter::ALL, 0)), [6, 7, 8, 9, 100]);
}

/// Writes raw records into the store's `chunks` keyspace behind its back.
fn write_raw(dir: &Path, records: &[(&[u8], &[u8])]) {
    let db = fjall::Database::builder(dir).open().unwrap();
    let chunks = db
        .keyspace("chunks", fjall::KeyspaceCreateOptions::default)
        .unwrap();
    for (key, value) in records {
        chunks.insert(*key, *value).unwrap();
    }
    db.persist(fjall::PersistMode::SyncAll).unwrap();
}

#[test]
fn fjall_corrupt_values_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = chunk(1, 100, b"good");
    {
        let mut s = FjallStore::open(dir.path(), UNLIMITED).unwrap();
        s.insert(&good).unwrap();
        s.sync().unwrap();
    }
    let short = Name::new(2).to_bytes();
    let too_long = Name::new(3).to_bytes();
    let mut long_value = 50u64.to_be_bytes().to_vec();
    long_value.extend_from_slice(&[0; 1025]);
    write_raw(
        dir.path(),
        &[
            (short.as_slice(), [1u8, 2, 3].as_slice()),
            (too_long.as_slice(), long_value.as_slice()),
        ],
    );

    let mut s = FjallStore::open(dir.path(), UNLIMITED).unwrap();
    assert_eq!(s.get(Name::new(1)).unwrap(), Some(good.clone()));
    let err = s.get(Name::new(2)).unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { key, .. } if key.starts_with("chunks/0x")),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("shorter than its 8-byte expiry"),
        "{err}"
    );
    let err = s.get(Name::new(3)).unwrap_err();
    assert!(err.to_string().contains("1025 bytes"), "{err}");
    assert!(matches!(
        s.scan_last(Filter::ALL, 10, 0),
        Err(StoreError::Corrupt { .. })
    ));
    let mut seen = 0;
    let res = s.scan(Filter::ALL, 0, &mut |_| {
        seen += 1;
        ControlFlow::Continue(())
    });
    assert!(matches!(res, Err(StoreError::Corrupt { .. })));
    assert_eq!(
        seen, 1,
        "the good chunk before the corrupt one was delivered"
    );
    // Inserting over a corrupt record reports it rather than guessing.
    assert!(matches!(
        s.insert(&chunk(2, 100, b"x")),
        Err(StoreError::Corrupt { .. })
    ));
    // A scan that stays clear of the corrupt records still works.
    assert_eq!(scan_all(&s, Filter::exact(Name::new(1)), 0), [good]);

    // A malformed key is reported, not a panic.
    drop(s);
    write_raw(dir.path(), &[([0xffu8; 5].as_slice(), [0u8; 8].as_slice())]);
    let s = FjallStore::open(dir.path(), UNLIMITED).unwrap();
    let err = s.scan_last(Filter::ALL, 1, 0).unwrap_err();
    assert!(err.to_string().contains("key is 5 bytes"), "{err}");
}

// ---- both backends agree on random operation sequences ----

#[derive(Debug, Clone)]
enum Op {
    Insert(u128, u64, Vec<u8>),
    Get(u128),
    Scan(Filter, u64),
    ScanStop(Filter, u64, usize),
    ScanLast(Filter, usize, u64),
    Evict(u64),
    Push(u128),
    Remove(u128),
    Pending(usize),
    Sync,
}

/// Names clustered under a few prefixes so filters and collisions are frequent.
fn name_strategy() -> impl Strategy<Value = u128> {
    prop_oneof![
        9 => (0u128..3, 0u128..3, 0u128..12).prop_map(|(a, b, c)| (a << 120) | (b << 112) | c),
        1 => Just(u128::MAX),
    ]
}

fn filter_strategy() -> impl Strategy<Value = Filter> {
    (
        name_strategy(),
        prop_oneof![
            Just(0u8),
            Just(8),
            Just(16),
            Just(124),
            Just(128),
            0u8..=128
        ],
    )
        .prop_map(|(name, len)| Filter::new(Name::new(name), len).unwrap())
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let data = prop_oneof![
        Just(Vec::new()),
        Just(vec![1u8; 40]),
        proptest::collection::vec(any::<u8>(), 0..120),
    ];
    prop_oneof![
        6 => (name_strategy(), 0u64..100, data).prop_map(|(n, e, d)| Op::Insert(n, e, d)),
        1 => name_strategy().prop_map(Op::Get),
        2 => (filter_strategy(), 0u64..100).prop_map(|(f, t)| Op::Scan(f, t)),
        1 => (filter_strategy(), 0u64..100, 0usize..5).prop_map(|(f, t, k)| Op::ScanStop(f, t, k)),
        2 => (filter_strategy(), 0usize..6, 0u64..100).prop_map(|(f, n, t)| Op::ScanLast(f, n, t)),
        1 => (0u64..100).prop_map(Op::Evict),
        1 => name_strategy().prop_map(Op::Push),
        1 => name_strategy().prop_map(Op::Remove),
        1 => (0usize..6).prop_map(Op::Pending),
        1 => Just(Op::Sync),
    ]
}

/// Applies `op` and renders what came back (errors by their message), plus the stats.
fn apply<S: Store>(s: &mut S, op: &Op) -> String {
    fn show<T: std::fmt::Debug>(r: Result<T, StoreError>) -> String {
        match r {
            Ok(v) => format!("{v:?}"),
            Err(e) => format!("error: {e}"),
        }
    }
    let result = match op {
        Op::Insert(n, e, d) => show(s.insert(&chunk(*n, *e, d))),
        Op::Get(n) => show(s.get(Name::new(*n))),
        Op::Scan(f, t) => {
            let mut out = Vec::new();
            let r = s.scan(*f, *t, &mut |c| {
                out.push(c);
                ControlFlow::Continue(())
            });
            show(r.map(|()| out))
        }
        Op::ScanStop(f, t, k) => {
            let mut out = Vec::new();
            let r = s.scan(*f, *t, &mut |c| {
                out.push(c.name());
                if out.len() > *k {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            });
            show(r.map(|()| out))
        }
        Op::ScanLast(f, n, t) => show(s.scan_last(*f, *n, *t)),
        Op::Evict(t) => show(s.evict_expired(*t)),
        Op::Push(n) => show(s.outbox_push(Name::new(*n))),
        Op::Remove(n) => show(s.outbox_remove(Name::new(*n))),
        Op::Pending(limit) => show(s.outbox_pending(*limit)),
        Op::Sync => show(s.sync()),
    };
    format!("{result} {:?}", s.stats())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn memory_and_fjall_agree(
        capacity in prop_oneof![Just(UNLIMITED), 100u64..1200],
        ops in proptest::collection::vec(op_strategy(), 1..80),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut memory = MemoryStore::new(capacity);
        let mut fjall = FjallStore::open(dir.path(), capacity).unwrap();
        for (i, op) in ops.iter().enumerate() {
            let m = apply(&mut memory, op);
            let f = apply(&mut fjall, op);
            prop_assert_eq!(m, f, "op {} {:?}", i, op);
        }
        // Stored contents agree in full, expired chunks included.
        prop_assert_eq!(scan_all(&memory, Filter::ALL, 0), scan_all(&fjall, Filter::ALL, 0));
    }
}
