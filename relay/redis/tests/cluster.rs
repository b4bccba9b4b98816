//! `RedisStore` against real Redis Clusters (`redis-server` processes on 127.0.0.1, started by
//! `canopy_redis::testing`), checked against `canopy::MemoryStore` where the two should agree.

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use canopy::{Chunk, Filter, InsertOutcome, MemoryStore, Name, Store};
use canopy_redis::testing::RedisCluster;
use canopy_redis::{RedisStore, RedisStoreConfig, RedisStoreError};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const HOUR: u64 = 3_600_000;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn chunk(name: u128, expiry: u64, data: &[u8]) -> Chunk {
    Chunk::new(Name::new(name), expiry, data.to_vec()).unwrap()
}

async fn store(cluster: &RedisCluster, min_replicas: u8) -> RedisStore {
    let mut config = RedisStoreConfig::new(cluster.urls());
    config.min_replicas = min_replicas;
    config.wait_timeout_ms = 1_000;
    RedisStore::connect(config).await.unwrap()
}

/// What a `MemoryStore` scan returns: the unexpired chunks under `filter`, in name order.
fn expected_scan(mem: &MemoryStore, filter: Filter, now_ms: u64) -> Vec<Chunk> {
    let mut out = Vec::new();
    mem.scan(filter, now_ms, &mut |c| {
        out.push(c);
        ControlFlow::Continue(())
    })
    .unwrap();
    out
}

/// A raw connection to the primary holding `key`.
fn primary_connection(cluster: &RedisCluster, key: &[u8]) -> redis::Connection {
    cluster.connection(cluster.primary_for_key(key).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_duplicate_conflict() {
    let cluster = RedisCluster::start(3, 0).unwrap();
    let store = store(&cluster, 0).await;
    let expiry = now_ms() + HOUR;
    let name = 0x0123_4567_89ab_cdef_0011_2233_4455_6677;
    let original = chunk(name, expiry, b"one");

    assert_eq!(store.insert_batch(std::slice::from_ref(&original)).await.unwrap(), [InsertOutcome::Inserted]);
    assert_eq!(store.insert_batch(std::slice::from_ref(&original)).await.unwrap(), [InsertOutcome::Duplicate]);
    let other_data = chunk(name, expiry, b"two");
    let other_expiry = chunk(name, expiry + 1, b"one");
    assert_eq!(
        store.insert_batch(&[other_data, other_expiry]).await.unwrap(),
        [InsertOutcome::Conflict, InsertOutcome::Conflict]
    );
    assert_eq!(store.get(Name::new(name), 0).await.unwrap(), Some(original.clone()));
    assert_eq!(store.get(Name::new(name + 1), 0).await.unwrap(), None);
    assert_eq!(store.scan(Filter::ALL, None, 10, 0).await.unwrap(), [original]);
    assert!(store.insert_batch(&[]).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_chunk_is_stored_once() {
    let cluster = RedisCluster::start(3, 0).unwrap();
    let store = store(&cluster, 0).await;
    let mut rng = SmallRng::seed_from_u64(2);
    let expiry = now_ms() + HOUR;
    let chunks: Vec<Chunk> = (0..300).map(|i| chunk(rng.random(), expiry, &[i as u8; 10])).collect();

    let first = store.insert_batch(&chunks[..200]).await.unwrap();
    assert!(first.iter().all(|o| *o == InsertOutcome::Inserted));
    // The last 100 of the first batch again, the rest new, and a few twice in one batch.
    let mut second: Vec<Chunk> = chunks[100..].to_vec();
    second.extend_from_slice(&chunks[250..260]);
    let outcomes = store.insert_batch(&second).await.unwrap();
    for (i, outcome) in outcomes.iter().enumerate() {
        let expected = if (100..200).contains(&i) { InsertOutcome::Inserted } else { InsertOutcome::Duplicate };
        assert_eq!(*outcome, expected, "chunk {i} of the second batch");
    }

    assert_eq!(cluster.record_count().unwrap(), chunks.len());
    let buckets: HashSet<u32> = chunks.iter().map(|c| store.bucket_of(c.name())).collect();
    let mut indexed = 0;
    for bucket in buckets {
        let key = format!("{{c:{bucket:03x}}}:n");
        let card: usize =
            redis::cmd("ZCARD").arg(&key).query(&mut primary_connection(&cluster, key.as_bytes())).unwrap();
        indexed += card;
    }
    assert_eq!(indexed, chunks.len());

    // The cluster's view, as a front-end's metrics report it: every record once, spread over
    // the three primaries, two index sets per bucket in use besides the records.
    let view = store.cluster_view().await.unwrap();
    let buckets = chunks.iter().map(|c| store.bucket_of(c.name())).collect::<HashSet<u32>>().len() as u64;
    assert!(view.state_ok, "{view:?}");
    assert_eq!((view.primaries, view.replicas), (3, 0), "{view:?}");
    assert_eq!(view.chunks, chunks.len() as u64, "{view:?}");
    assert_eq!(view.keys, chunks.len() as u64 + 2 * buckets, "{view:?}");
    assert!(view.max_primary_chunks >= 100 && view.max_primary_chunks < 300, "{view:?}");
    assert!(view.used_memory_bytes > 300 * 10, "{view:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_match_memory_store() {
    let cluster = RedisCluster::start(3, 0).unwrap();
    let store = store(&cluster, 0).await;
    let mut rng = SmallRng::seed_from_u64(3);
    let base = now_ms() + HOUR;
    let p8: u128 = 0xa5 << 120;
    let p20: u128 = 0x5a_5a5 << 108;
    let p100: u128 = rng.random::<u128>() & !((1 << 28) - 1);
    let mut names: Vec<u128> = (0..400).map(|_| rng.random()).collect();
    names.extend((0..100).map(|_| p20 | (rng.random::<u128>() >> 20)));
    names.extend((0..60).map(|_| p8 | (rng.random::<u128>() >> 8)));
    names.extend((0..30).map(|_| p100 | (rng.random::<u128>() >> 100)));
    names.extend([0, u128::MAX, p8, p20]);
    let chunks: Vec<Chunk> =
        names.iter().map(|&n| chunk(n, base + rng.random_range(0..1_000), &n.to_be_bytes()[..4])).collect();

    let mut mem = MemoryStore::default();
    let expected_outcomes: Vec<InsertOutcome> = chunks.iter().map(|c| mem.insert(c).unwrap()).collect();
    assert_eq!(store.insert_batch(&chunks).await.unwrap(), expected_outcomes);

    let filter = |name: u128, len: u8| Filter::new(Name::new(name), len).unwrap();
    let filters = [
        Filter::ALL,
        filter(names[0], 1),
        filter(names[1], 4),
        filter(p8, 8),
        filter(p8, 11),
        filter(p20, 12),
        filter(p20, 13),
        filter(p20, 20),
        filter(p20 | (names[2] >> 20), 24),
        filter(p100, 100),
        filter(p100, 120),
        Filter::exact(Name::new(names[5])),
        filter(0x77 << 120, 16),
        Filter::exact(Name::new(u128::MAX)),
    ];
    for filter in filters {
        for now in [0, base + 500, base + 1_000] {
            let expected = expected_scan(&mem, filter, now);
            let all = store.scan(filter, None, 100_000, now).await.unwrap();
            assert_eq!(all, expected, "scan {filter} at {now}");

            // Paging at one `now` (the scans above cover expiry), pages of 1 only where short.
            if now != base + 500 {
                continue;
            }
            for limit in [1, 7, 100] {
                if limit == 1 && expected.len() > 60 {
                    continue;
                }
                let mut paged = Vec::new();
                let mut after = None;
                loop {
                    let page = store.scan(filter, after, limit, now).await.unwrap();
                    assert!(page.len() <= limit);
                    let Some(last) = page.last() else { break };
                    after = Some(last.name());
                    paged.extend(page);
                    assert!(paged.len() <= expected.len(), "paging {filter} by {limit} overran");
                }
                assert_eq!(paged, expected, "scan {filter} at {now} in pages of {limit}");
            }
        }
        // The most recent N, as `MostRecent(n)` replays ask for them.
        for n in [1, 3, 50, 100_000] {
            for now in [0, base + 500] {
                let expected = mem.scan_last(filter, n, now).unwrap();
                assert_eq!(store.scan_last(filter, n, now).await.unwrap(), expected, "last {n} of {filter} at {now}");
            }
        }
        // A range that is not a filter's, as a replay resuming from its cursor reads it.
        let (first, last) = filter.range();
        let mid = Name::new(first.to_u128() + (last.to_u128() - first.to_u128()) / 3);
        for limit in [1, 9, 100_000] {
            let mut expected = Vec::new();
            mem.scan_range(mid, last, base + 500, &mut |c| {
                expected.push(c);
                if expected.len() >= limit { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
            })
            .unwrap();
            let got = store.scan_range(mid, last, limit, base + 500).await.unwrap();
            assert_eq!(got, expected, "range {mid}..={last} of {filter}, limit {limit}");
        }
        // Resuming after a name that is not stored, inside and outside the filter.
        let (first, last) = filter.range();
        let probes = [first.to_u128(), first.to_u128().saturating_sub(1), last.to_u128(), rng.random()];
        for probe in probes {
            let expected: Vec<Chunk> =
                expected_scan(&mem, filter, 0).into_iter().filter(|c| c.name().to_u128() > probe).take(5).collect();
            let got = store.scan(filter, Some(Name::new(probe)), 5, 0).await.unwrap();
            assert_eq!(got, expected, "scan {filter} after {probe:#x}");
        }
    }
    assert!(store.scan(Filter::ALL, None, 0, 0).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_chunks_are_never_served_and_are_swept() {
    let cluster = RedisCluster::start(3, 0).unwrap();
    let store = store(&cluster, 0).await;
    let now = now_ms();
    let live = chunk(0x1111 << 112, now + HOUR, b"live");
    let late = chunk(0x2222 << 112, now - 1_000, b"already expired");
    // Long enough for the checks before it expires on a loaded machine.
    let soon = chunk(0x3333 << 112, now + 1_500, b"expires in Redis");
    let outcomes = store.insert_batch(&[live.clone(), late.clone(), soon.clone()]).await.unwrap();
    assert_eq!(outcomes, vec![InsertOutcome::Inserted; 3]);

    // The already-expired chunk was not written at all.
    let late_key = store.record_key(late.name());
    let exists: bool = redis::cmd("EXISTS").arg(&late_key).query(&mut primary_connection(&cluster, &late_key)).unwrap();
    assert!(!exists);
    assert_eq!(store.get(late.name(), 0).await.unwrap(), None);

    // Expiry is checked against `now_ms`, whatever Redis still holds.
    assert_eq!(store.get(live.name(), live.expiry() - 1).await.unwrap(), Some(live.clone()));
    assert_eq!(store.get(live.name(), live.expiry()).await.unwrap(), None);
    assert_eq!(store.scan(Filter::ALL, None, 10, 0).await.unwrap(), [live.clone(), soon.clone()]);
    assert_eq!(store.scan(Filter::ALL, None, 10, soon.expiry()).await.unwrap(), std::slice::from_ref(&live));
    assert!(store.scan(Filter::ALL, None, 10, live.expiry()).await.unwrap().is_empty());

    // Once Redis has dropped the record, the index entry alone serves nothing.
    tokio::time::sleep(Duration::from_millis(soon.expiry().saturating_sub(now_ms()) + 300)).await;
    assert_eq!(store.get(soon.name(), 0).await.unwrap(), None);
    assert_eq!(store.scan(Filter::ALL, None, 10, 0).await.unwrap(), std::slice::from_ref(&live));
    let x_key = format!("{{c:{:03x}}}:x", store.bucket_of(soon.name()));
    let indexed = |cluster: &RedisCluster, key: &str, name: Name| -> bool {
        let score: Option<f64> = redis::cmd("ZSCORE")
            .arg(key)
            .arg(&name.to_bytes())
            .query(&mut primary_connection(cluster, key.as_bytes()))
            .unwrap();
        score.is_some()
    };
    assert!(indexed(&cluster, &x_key, soon.name()));

    assert_eq!(store.sweep_expired(now_ms()).await.unwrap(), 1);
    assert!(!indexed(&cluster, &x_key, soon.name()));
    let n_key = format!("{{c:{:03x}}}:n", store.bucket_of(soon.name()));
    assert!(!indexed(&cluster, &n_key, soon.name()));
    assert_eq!(store.sweep_expired(now_ms()).await.unwrap(), 0);

    // Sweeping at the live chunk's expiry removes it too, record included.
    assert_eq!(store.sweep_expired(live.expiry()).await.unwrap(), 1);
    let live_key = store.record_key(live.name());
    let exists: bool = redis::cmd("EXISTS").arg(&live_key).query(&mut primary_connection(&cluster, &live_key)).unwrap();
    assert!(!exists);
    assert_eq!(cluster.record_count().unwrap(), 0);
    assert_eq!(store.get(live.name(), 0).await.unwrap(), None);

    // The name is free again.
    assert_eq!(store.insert_batch(std::slice::from_ref(&live)).await.unwrap(), [InsertOutcome::Inserted]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_of_2000() {
    let cluster = RedisCluster::start(3, 0).unwrap();
    let store = store(&cluster, 0).await;
    let mut rng = SmallRng::seed_from_u64(5);
    let expiry = now_ms() + HOUR;
    let mut batch: Vec<Chunk> = (0..1_800).map(|i: u32| chunk(rng.random(), expiry, &i.to_be_bytes())).collect();
    for i in 0..100 {
        // Exact repeats (Duplicate) and other data at a used name (Conflict), later in the batch.
        let repeat = batch[rng.random_range(0..1_800)].clone();
        batch.push(repeat);
        let used = batch[rng.random_range(0..1_800)].name();
        batch.push(Chunk::new(used, expiry, vec![0xee; i + 1]).unwrap());
    }
    // Anywhere in the batch: whichever of two chunks at one name comes first is the one stored.
    batch.shuffle(&mut rng);
    assert_eq!(batch.len(), 2_000);

    let mut mem = MemoryStore::default();
    let expected: Vec<InsertOutcome> = batch.iter().map(|c| mem.insert(c).unwrap()).collect();
    let counts = |o: &[InsertOutcome], which: InsertOutcome| o.iter().filter(|x| **x == which).count();
    assert_eq!(counts(&expected, InsertOutcome::Inserted), 1_800);

    let started = Instant::now();
    let outcomes = store.insert_batch(&batch).await.unwrap();
    eprintln!("2,000 inserts in one batch: {:?}", started.elapsed());
    assert_eq!(outcomes, expected);

    let again = store.insert_batch(&batch).await.unwrap();
    let expected_again: Vec<InsertOutcome> = batch.iter().map(|c| mem.insert(c).unwrap()).collect();
    assert_eq!(again, expected_again);
    assert_eq!(cluster.record_count().unwrap(), 1_800);
    assert_eq!(store.scan(Filter::ALL, None, 5_000, 0).await.unwrap(), expected_scan(&mem, Filter::ALL, 0));
}

/// Inserts `chunks`, retrying transient failures (a failover in progress) until `deadline`;
/// `NotReplicated` is returned, not retried.
async fn insert_until(
    store: &RedisStore,
    chunks: &[Chunk],
    deadline: Instant,
) -> Result<Vec<InsertOutcome>, RedisStoreError> {
    loop {
        match store.insert_batch(chunks).await {
            Err(RedisStoreError::Redis { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_chunks_survive_a_failover() {
    let mut cluster = RedisCluster::start(3, 1).unwrap();
    let store = store(&cluster, 1).await;
    let mut rng = SmallRng::seed_from_u64(6);
    let expiry = now_ms() + HOUR;
    let acked: Vec<Chunk> = (0..300).map(|i: u32| chunk(rng.random(), expiry, &i.to_be_bytes())).collect();
    let outcomes = store.insert_batch(&acked).await.unwrap();
    assert!(outcomes.iter().all(|o| *o == InsertOutcome::Inserted));
    let view = store.cluster_view().await.unwrap();
    assert_eq!((view.primaries, view.replicas, view.chunks), (3, 3, 300), "{view:?}");

    let slot_of = |c: &Chunk| store.bucket_slot(store.bucket_of(c.name()));
    let victim = cluster.primary_for_slot(slot_of(&acked[0])).unwrap();
    let on_victim = acked.iter().filter(|c| cluster.primary_for_slot(slot_of(c)).unwrap() == victim).count();
    assert!(on_victim > 0);
    let started = Instant::now();
    cluster.kill(victim);
    cluster.wait_failover(victim, Duration::from_secs(30)).unwrap();
    let promoted = cluster.primary_for_slot(slot_of(&acked[0])).unwrap();
    assert_ne!(promoted, victim);
    eprintln!("failover of node {victim} ({on_victim} acked chunks) took {:?}", started.elapsed());

    // Every acknowledged chunk is still there (the client finds the promoted replica).
    let deadline = Instant::now() + Duration::from_secs(20);
    for c in &acked {
        let got = loop {
            match store.get(c.name(), 0).await {
                Ok(got) => break got,
                Err(err) if Instant::now() < deadline => {
                    eprintln!("get after failover: {err}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => panic!("get after failover: {err}"),
            }
        };
        assert_eq!(got.as_ref(), Some(c));
    }

    // New inserts: the healthy shards take them at once; the failed-over shard has no replica
    // left, so its writes are applied but not acknowledged, until the old primary rejoins.
    let fresh: Vec<Chunk> = (0..200).map(|i: u32| chunk(rng.random(), expiry, &i.to_le_bytes())).collect();
    let (degraded, healthy): (Vec<Chunk>, Vec<Chunk>) =
        fresh.into_iter().partition(|c| cluster.primary_for_slot(slot_of(c)).unwrap() == promoted);
    assert!(!degraded.is_empty() && !healthy.is_empty());
    let outcomes = insert_until(&store, &healthy, Instant::now() + Duration::from_secs(20)).await.unwrap();
    assert!(outcomes.iter().all(|o| *o != InsertOutcome::Conflict));
    match insert_until(&store, &degraded, Instant::now() + Duration::from_secs(20)).await {
        Err(RedisStoreError::NotReplicated { wanted: 1, acked: 0, outcomes, .. }) => {
            assert_eq!(outcomes.len(), degraded.len());
        }
        other => panic!("expected NotReplicated from a shard without replicas, got {other:?}"),
    }

    cluster.restart(victim).unwrap();
    cluster.wait_ready(Duration::from_secs(30)).unwrap();
    assert_eq!(cluster.primary_for_slot(slot_of(&acked[0])).unwrap(), promoted, "the old primary rejoins as a replica");
    let outcomes = insert_until(&store, &degraded, Instant::now() + Duration::from_secs(20)).await.unwrap();
    assert!(outcomes.iter().all(|o| *o == InsertOutcome::Duplicate), "{outcomes:?}");
    for c in healthy.iter().chain(&degraded) {
        assert_eq!(store.get(c.name(), 0).await.unwrap().as_ref(), Some(c));
    }
    eprintln!("failover test body took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_records_are_errors() {
    let cluster = RedisCluster::start(3, 0).unwrap();
    let store = store(&cluster, 0).await;
    let expiry = now_ms() + HOUR;
    let good = chunk(0x4444_5555_6666 << 80, expiry, b"good");
    store.insert_batch(std::slice::from_ref(&good)).await.unwrap();
    let key = store.record_key(good.name());
    let mut con = primary_connection(&cluster, &key);

    let mut oversized = vec![1];
    oversized.extend_from_slice(&expiry.to_be_bytes());
    oversized.extend(std::iter::repeat_n(0u8, 1_025));
    let mut wrong_version = vec![9];
    wrong_version.extend_from_slice(&expiry.to_be_bytes());
    let cases: [(&[u8], &str); 4] =
        [(b"\xde\xad", "shorter"), (b"", "shorter"), (&wrong_version, "version 9"), (&oversized, "exceeds")];
    for (garbage, reason) in cases {
        let () = redis::cmd("SET").arg(&key).arg(garbage).query(&mut con).unwrap();
        match store.get(good.name(), 0).await {
            Err(RedisStoreError::Corrupt { key: shown, reason: why }) => {
                assert!(why.contains(reason), "{why}");
                assert!(shown.contains(&good.name().to_string()), "{shown}");
            }
            other => panic!("get of {garbage:?}: expected Corrupt, got {other:?}"),
        }
        let scanned = store.scan(Filter::ALL, None, 10, 0).await;
        assert!(matches!(scanned, Err(RedisStoreError::Corrupt { .. })), "scan: {scanned:?}");
    }

    // A malformed index member (not 16 bytes) inside the scanned range.
    let () = redis::cmd("SET").arg(&key).arg(canopy_redis_record(&good)).query(&mut con).unwrap();
    assert_eq!(store.get(good.name(), 0).await.unwrap(), Some(good.clone()));
    let other = Name::new(0x7777_0102_0304 << 80);
    let n_key = format!("{{c:{:03x}}}:n", store.bucket_of(other));
    let member = &other.to_bytes()[..5];
    let _: i64 = redis::cmd("ZADD")
        .arg(&n_key)
        .arg(0)
        .arg(member)
        .query(&mut primary_connection(&cluster, n_key.as_bytes()))
        .unwrap();
    match store.scan(Filter::new(other, 16).unwrap(), None, 10, 0).await {
        Err(RedisStoreError::Corrupt { reason, .. }) => assert!(reason.contains("16-byte name"), "{reason}"),
        other => panic!("expected Corrupt for a short index member, got {other:?}"),
    }
    assert_eq!(store.scan(Filter::new(good.name(), 16).unwrap(), None, 10, 0).await.unwrap(), [good]);
}

/// The record the store writes for `chunk` (version 1, expiry, data), to restore it.
fn canopy_redis_record(chunk: &Chunk) -> Vec<u8> {
    let mut record = vec![canopy_redis::RECORD_VERSION];
    record.extend_from_slice(&chunk.expiry().to_be_bytes());
    record.extend_from_slice(chunk.data());
    record
}

/// The live fan-out: a chunk newly stored is published on its bucket's channel in the same
/// script, so another handle subscribed to the bucket hears of it (a duplicate or conflict is
/// not published again); a handle does not hear its own inserts; a fence comes out after what
/// arrived before it; unsubscribing stops the messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_feed_carries_new_chunks_of_subscribed_buckets() {
    use canopy_redis::LiveEvent;
    let cluster = RedisCluster::start(3, 0).unwrap();
    let config = RedisStoreConfig::new(cluster.urls());
    let (reader, mut feed) = RedisStore::connect_live(config.clone()).await.unwrap();
    let (writer, mut writer_feed) = RedisStore::connect_live(config).await.unwrap();
    assert_ne!(reader.writer(), writer.writer());
    let base = now_ms() + HOUR;
    let here: u128 = 0x123 << 116;
    let elsewhere: u128 = 0x456 << 116;
    let bucket = reader.bucket_of(Name::new(here));
    reader.subscribe_buckets(&[bucket]).await.unwrap();
    writer.subscribe_buckets(&[bucket]).await.unwrap();

    let first = chunk(here | 1, base, b"first");
    let outside = chunk(elsewhere | 1, base, b"not subscribed");
    let conflicting = chunk(here | 1, base, b"other bytes");
    assert_eq!(
        writer.insert_batch(&[first.clone(), outside, first.clone(), conflicting]).await.unwrap(),
        vec![InsertOutcome::Inserted, InsertOutcome::Inserted, InsertOutcome::Duplicate, InsertOutcome::Conflict]
    );
    let own = chunk(here | 2, base, b"the reader's own");
    reader.insert_batch(std::slice::from_ref(&own)).await.unwrap();
    reader.fence(7).await.unwrap();
    let mut events = Vec::new();
    while events.last() != Some(&LiveEvent::Fence(7)) {
        let event = tokio::time::timeout(Duration::from_secs(10), feed.recv()).await.expect("the fence comes").unwrap();
        events.push(event);
    }
    assert_eq!(events, vec![LiveEvent::Chunk(first.clone()), LiveEvent::Fence(7)], "one message, the other handle's");
    // The writer hears the reader's insert, not its own, and not the reader's fence.
    writer.fence(8).await.unwrap();
    let mut events = Vec::new();
    while events.last() != Some(&LiveEvent::Fence(8)) {
        events.push(tokio::time::timeout(Duration::from_secs(10), writer_feed.recv()).await.unwrap().unwrap());
    }
    assert_eq!(events, vec![LiveEvent::Chunk(own), LiveEvent::Fence(8)]);

    reader.unsubscribe_buckets(&[bucket]).await.unwrap();
    writer.insert_batch(&[chunk(here | 3, base, b"after")]).await.unwrap();
    reader.fence(9).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), feed.recv()).await.unwrap().unwrap();
    assert_eq!(event, LiveEvent::Fence(9), "nothing after unsubscribing");
}
