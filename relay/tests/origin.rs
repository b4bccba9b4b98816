//! Origin front-ends over a Redis Cluster (issue 16): relays with `store = "redis://…"` and role
//! `origin-frontend`, against a real cluster of `redis-server` processes on 127.0.0.1
//! (`canopy_redis::testing`), with real QUIC clients.

mod common;

use canopy::wire::{ErrorCode, Frame, ReplayMode};
use canopy::{Chunk, Filter};
use canopy_redis::testing::RedisCluster;
use canopy_relay::{RelayConfig, RelayHandle, RelayRole, StoreKind};
use common::*;

/// Names under `0x0a0b…/16`: one bucket of the cluster's.
const TEAM: u128 = 0x0a0b << 112;
const TEAM_FILTER: &str = "0x0a0b0000000000000000000000000000/16";

fn names(chunks: &[Chunk]) -> Vec<u128> {
    chunks.iter().map(|c| c.name().to_u128()).collect()
}

fn frontend_config(dir: &std::path::Path, cluster: &RedisCluster) -> RelayConfig {
    RelayConfig {
        store: StoreKind::Redis { nodes: cluster.urls() },
        role: Some(RelayRole::OriginFrontend),
        ..config(dir)
    }
}

async fn frontend(dir: &std::path::Path, cluster: &RedisCluster) -> RelayHandle {
    spawn(frontend_config(dir, cluster)).await
}

/// A 3-primary cluster with two front-ends over it, in the first two of `dirs` data
/// directories (the others are for the test's further relays).
async fn two_frontends(dirs: usize) -> (RedisCluster, Vec<tempfile::TempDir>, RelayHandle, RelayHandle) {
    let cluster = RedisCluster::start(3, 0).unwrap();
    let dirs: Vec<_> = (0..dirs).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = frontend(dirs[0].path(), &cluster).await;
    let b = frontend(dirs[1].path(), &cluster).await;
    (cluster, dirs, a, b)
}

/// One front-end is a whole origin: publishes are stored in the cluster once (a duplicate is
/// acknowledged, a conflict refused with the original kept), replays come from the cluster in
/// name order (every replay mode, and replays larger than one page), live chunks follow, and a
/// cloud relay below it works as below any origin. A second front-end over the same cluster
/// serves what the first stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frontend_keeps_its_chunks_in_the_cluster() {
    init_tracing();
    let cluster = RedisCluster::start(3, 0).unwrap();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let origin = frontend(dirs[0].path(), &cluster).await;
    let team = filter(TEAM_FILTER);

    // Chunks across many buckets (the top 12 bits differ) as well as within one.
    let spread: Vec<u128> = (0..40u128).map(|i| ((i * 0x0641) << 116) | i).collect();
    let mut publisher = Client::connect(&origin).await;
    let published: Vec<Chunk> = (0..300u128).map(|i| chunk(TEAM | i, &format!("team {i}"))).collect();
    for chunk in &published {
        publisher.publish_acked(chunk.clone()).await;
    }
    for &name in &spread {
        publisher.publish_acked(chunk(name, "spread")).await;
    }
    // The same bytes again: acknowledged, not stored twice. Other bytes: refused.
    let original = published[7].clone();
    publisher.publish_acked(original.clone()).await;
    let seq = publisher.publish(Chunk::new(original.name(), original.expiry(), b"forged".to_vec()).unwrap()).await;
    assert_eq!(publisher.expect_error().await, (ErrorCode::Conflict, Some(seq)));
    assert_eq!(cluster.record_count().unwrap(), 300 + spread.len(), "every chunk stored once");

    // Replays: whole (in pages of the credit), most recent, cached only, across buckets.
    let mut reader = Client::connect(&origin).await;
    let replay = reader.subscribe(1, team, ReplayMode::CachedAndLive).await;
    assert_eq!(names(&replay), (0..300).map(|i| TEAM | i).collect::<Vec<_>>());
    assert_eq!(replay[7].data().as_ref(), b"team 7", "the original is kept");
    let recent = reader.subscribe(2, team, ReplayMode::MostRecent(5)).await;
    assert_eq!(names(&recent), (295..300).map(|i| TEAM | i).collect::<Vec<_>>());
    let all = reader.subscribe(3, Filter::ALL, ReplayMode::CachedOnly).await;
    let mut expected: Vec<u128> = spread.iter().copied().chain((0..300).map(|i| TEAM | i)).collect();
    expected.sort_unstable();
    assert_eq!(names(&all), expected, "ALL reads every bucket in name order");

    // Live after the replay, to the covering subscriptions only.
    publisher.publish_acked(chunk(TEAM | 1000, "live")).await;
    assert_eq!(names(&reader.delivered_until(1, TEAM | 1000).await), vec![TEAM | 1000]);
    assert_eq!(names(&reader.delivered_until(2, TEAM | 1000).await), vec![TEAM | 1000]);

    // A cloud relay below the front-end: its client's publish is stored in the cluster and
    // reaches the front-end's subscriber; its subscriber gets the cluster's replay.
    let cloud = spawn(child_config(dirs[1].path(), &origin)).await;
    let mut below = Client::connect(&cloud).await;
    // The cloud relay's cache is empty: its subscriber's replay is the front-end's, coming down
    // after its own (empty) one, in name order.
    let mut replay = below.subscribe(1, team, ReplayMode::CachedAndLive).await;
    replay.extend(below.delivered_until(1, TEAM | 1000).await);
    assert_eq!(names(&replay), (0..300).chain([1000]).map(|i| TEAM | i).collect::<Vec<_>>());
    below.publish_acked(chunk(TEAM | 2000, "from below")).await;
    assert_eq!(names(&reader.delivered_until(1, TEAM | 2000).await), vec![TEAM | 2000]);
    eventually("the cloud relay's publish is in the cluster", || cluster.record_count().unwrap() == 302 + spread.len()).await;

    // A second front-end over the same cluster serves what the first stored.
    let second = frontend(dirs[2].path(), &cluster).await;
    let mut other = Client::connect(&second).await;
    let replay = other.subscribe(1, team, ReplayMode::CachedOnly).await;
    assert_eq!(replay.len(), 302);
    let m = origin.metrics();
    assert_eq!((m.node.duplicates, m.node.conflicts), (1, 1), "{m:?}");

    cloud.shutdown().await;
    second.shutdown().await;
    origin.shutdown().await;
}

/// A front-end is configured as one: the role and the store go together, and it has no parent.
#[tokio::test]
async fn a_frontend_needs_a_redis_store_and_no_parent() {
    let dir = tempfile::tempdir().unwrap();
    let frontend_memory = RelayConfig { role: Some(RelayRole::OriginFrontend), store: StoreKind::Memory, ..config(dir.path()) };
    let err = frontend_memory.validate().unwrap_err().to_string();
    assert!(err.contains("origin-frontend needs a Redis store"), "{err}");
    let redis = StoreKind::Redis { nodes: vec!["redis://127.0.0.1:1".into()] };
    let cloud = RelayConfig { role: Some(RelayRole::Cloud), store: redis.clone(), ..config(dir.path()) };
    assert!(cloud.validate().unwrap_err().to_string().contains("role must be origin-frontend"));
    let child = RelayConfig { parent: Some("127.0.0.1:1".into()), parent_fingerprint: Some("00".into()), store: redis, ..config(dir.path()) };
    assert!(child.validate().unwrap_err().to_string().contains("has no parent"));
    assert_eq!("redis://a:1, redis://b:2".parse::<StoreKind>(), Ok(StoreKind::Redis { nodes: vec!["redis://a:1".into(), "redis://b:2".into()] }));
    assert!("redis://a:1,b:2".parse::<StoreKind>().unwrap_err().contains("\"b:2\" is not a redis://HOST:PORT node"));
    assert!("rediss://a:1".parse::<StoreKind>().unwrap_err().contains("not built in yet"));
}

/// Collects subscription 1's deliveries on `client` until every name of `want` has arrived,
/// failing on a name delivered twice or one not in `want`.
async fn exactly_once(client: &mut Client, want: &std::collections::BTreeSet<u128>, who: &str) {
    let mut got = std::collections::BTreeSet::new();
    while got.len() < want.len() {
        match client.recv().await.unwrap_or_else(|| panic!("{who}: stream ended")) {
            Frame::Deliver { id: 1, chunk } => {
                let name = chunk.name().to_u128();
                assert!(want.contains(&name), "{who}: {name:#x} was not published");
                assert!(got.insert(name), "{who}: {name:#x} delivered twice");
            }
            Frame::Deliver { .. } | Frame::Ack { .. } => {}
            other => panic!("{who}: unexpected {other:?}"),
        }
    }
}

/// Issue 16: two front-ends over one cluster are one origin. With a cloud relay below each and
/// subscribers at all four relays, chunks published on either side (directly at a front-end
/// and through a cloud relay) reach every covering subscriber exactly once and are stored once;
/// the same chunk published on both sides is acknowledged on both and stored once; other bytes
/// at a stored name are refused on either side, the original kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_frontends_are_one_origin() {
    init_tracing();
    let (cluster, dirs, a, b) = two_frontends(4).await;
    let cloud_a = spawn(child_config(dirs[2].path(), &a)).await;
    let cloud_b = spawn(child_config(dirs[3].path(), &b)).await;
    let team = filter(TEAM_FILTER);

    // A chunk stored before anyone subscribes: every subscriber gets it from a replay.
    let mut early = Client::connect(&a).await;
    let first = chunk(TEAM | 0xfff, "before the subscriptions");
    early.publish_acked(first.clone()).await;

    let mut subscribers = Vec::new();
    for (who, relay) in [("front-end a", &a), ("front-end b", &b), ("cloud a", &cloud_a), ("cloud b", &cloud_b)] {
        let mut client = Client::connect(relay).await;
        let replayed = client.subscribe(1, team, ReplayMode::CachedAndLive).await;
        subscribers.push((who, client, replayed));
    }
    let mut via_a = Client::connect(&cloud_a).await;
    let mut at_b = Client::connect(&b).await;
    let mut via_b = Client::connect(&cloud_b).await;
    let mut want: std::collections::BTreeSet<u128> = [TEAM | 0xfff].into();
    for i in 0..60u128 {
        let (client, name) = match i % 3 {
            0 => (&mut via_a, TEAM | (0x1000 + i)),
            1 => (&mut at_b, TEAM | (0x2000 + i)),
            _ => (&mut via_b, TEAM | (0x3000 + i)),
        };
        client.publish_acked(chunk(name, "spoken")).await;
        want.insert(name);
    }
    // The same chunk on both sides: both acknowledged, one stored copy.
    let both = chunk(TEAM | 0x4000, "said twice");
    via_a.publish_acked(both.clone()).await;
    at_b.publish_acked(both.clone()).await;
    want.insert(TEAM | 0x4000);
    // Other bytes at a stored name, on the other side: refused, the original kept.
    let forged = Chunk::new(first.name(), first.expiry(), b"forged".to_vec()).unwrap();
    let seq = at_b.publish(forged).await;
    assert_eq!(at_b.expect_error().await, (ErrorCode::Conflict, Some(seq)));

    for (who, client, replayed) in &mut subscribers {
        // What a subscriber got in its replay counts; the rest comes live, each once.
        let mut rest = want.clone();
        for chunk in replayed.iter() {
            assert!(rest.remove(&chunk.name().to_u128()), "{who}: replayed {} twice or unasked", chunk.name());
        }
        exactly_once(client, &rest, who).await;
    }
    // Nothing more comes: a last chunk is the next delivery everywhere.
    via_b.publish_acked(chunk(TEAM | 0x5000, "last")).await;
    for (who, client, _) in &mut subscribers {
        exactly_once(client, &[TEAM | 0x5000].into(), who).await;
    }
    assert_eq!(cluster.record_count().unwrap(), want.len() + 1, "every chunk stored once in the cluster");
    let mut reader = Client::connect(&b).await;
    let kept = reader.subscribe(2, Filter::exact(first.name()), ReplayMode::CachedOnly).await;
    assert_eq!(kept, vec![first]);
    let (ma, mb) = (a.metrics(), b.metrics());
    assert!(mb.node.shared_in > 0 && ma.node.shared_in > 0, "each front-end heard the other's chunks: {ma:?} {mb:?}");
    assert_eq!(ma.frontend.unwrap().feed_gaps + mb.frontend.unwrap().feed_gaps, 0);
    // Each front-end's metrics carry the cluster's view, the same on both: every chunk once.
    let stored = (want.len() + 1) as u64;
    let view_of = |relay: &RelayHandle| relay.metrics().frontend.and_then(|f| f.cluster);
    let settled = |relay: &RelayHandle| view_of(relay).is_some_and(|v| v.chunks == stored);
    eventually("both front-ends report the cluster's chunks", || settled(&a) && settled(&b)).await;
    let view = view_of(&a).unwrap();
    assert!(view.state_ok && view.primaries == 3 && view.replicas == 0, "{view:?}");
    // The origin id is a key too, and every bucket in use has its two index sets.
    assert!(view.keys >= stored + 3 && view.max_primary_chunks <= stored, "{view:?}");
    let text = canopy_relay::metrics::render(&a.metrics(), &[]);
    assert!(text.contains(&format!("\ncanopy_cluster_chunks {stored}\n")), "{text}");
    assert!(text.contains("\ncanopy_cluster_state_ok 1\n") && text.contains("\ncanopy_cluster_primaries 3\n"), "{text}");

    for relay in [cloud_a, cloud_b, a, b] {
        relay.shutdown().await;
    }
}

/// Issue 16: a child lists the origin's front-ends as its parent (`HOST:PORT,HOST:PORT`). When
/// the front-end it uses dies, it moves to the other, and nothing it acknowledged is lost:
/// everything reaches the cluster once and every subscriber once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_fail_over_between_frontends_and_lose_nothing_acknowledged() {
    init_tracing();
    let (cluster, dirs, a, b) = two_frontends(3).await;
    // Each front-end has its own self-signed certificate here: the child trusts both.
    let both = dirs[2].path().join("origin-ca.pem");
    std::fs::write(&both, format!("{}{}", a.cert_pem(), b.cert_pem())).unwrap();
    let cloud = spawn(RelayConfig {
        parent: Some(format!("{},{}", a.local_addr(), b.local_addr())),
        parent_ca: Some(both),
        ..config(dirs[2].path())
    })
    .await;
    let team = filter(TEAM_FILTER);
    let mut at_b = Client::connect(&b).await;
    assert!(at_b.subscribe(1, team, ReplayMode::CachedAndLive).await.is_empty());
    let mut at_cloud = Client::connect(&cloud).await;
    assert!(at_cloud.subscribe(1, team, ReplayMode::CachedAndLive).await.is_empty());
    let mut publisher = Client::connect(&cloud).await;

    let before: std::collections::BTreeSet<u128> = (0..20).map(|i| TEAM | i).collect();
    for &name in &before {
        publisher.publish_acked(chunk(name, "before")).await;
    }
    exactly_once(&mut at_b, &before, "front-end b, before").await;
    eventually("the cloud relay uses front-end a", || a.metrics().links >= 1 && cloud.metrics().parent_connected).await;

    a.kill().await;
    let after: std::collections::BTreeSet<u128> = (20..40).map(|i| TEAM | i).collect();
    for &name in &after {
        publisher.publish_acked(chunk(name, "after")).await;
    }
    exactly_once(&mut at_b, &after, "front-end b, after").await;
    let all: std::collections::BTreeSet<u128> = before.union(&after).copied().collect();
    exactly_once(&mut at_cloud, &all, "the cloud relay's subscriber").await;
    eventually("everything acknowledged is in the cluster", || cluster.record_count().unwrap() == 40).await;
    // The cloud relay resubscribed at b, whose replay brought nothing new: a last chunk is the
    // next delivery.
    publisher.publish_acked(chunk(TEAM | 99, "last")).await;
    exactly_once(&mut at_cloud, &[TEAM | 99].into(), "the cloud relay's subscriber, last").await;
    eventually("the cloud relay's outbox drains", || cloud.metrics().store.outbox == 0).await;
    assert_eq!(cluster.record_count().unwrap(), 41);
    cloud.shutdown().await;
    b.shutdown().await;
}

/// Issue 16: the front-ends present one origin identity (kept in the cluster) after their own
/// ids, so a relay presenting the origin's id below one of them is refused as a cycle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontends_share_the_origin_identity_and_cycles_are_refused() {
    init_tracing();
    let (cluster, dirs, a, b) = two_frontends(3).await;
    let key = b"{canopy}:origin";
    let origin: String = redis::cmd("GET").arg(&key[..]).query(&mut primary(&cluster, key)).unwrap();
    assert_eq!(origin.len(), 32, "one origin id, created by the first front-end");
    assert_ne!(a.id(), b.id(), "each front-end keeps its own relay id");

    // A relay claiming the origin's id, below front-end b: a cycle.
    let impostor = spawn(RelayConfig { id: Some(origin.clone()), ..child_config(dirs[2].path(), &b) }).await;
    eventually("the impostor is refused", || impostor.metrics().node.parent_refusals >= 1).await;
    assert_eq!(impostor.metrics().node.last_parent_refusal, Some(ErrorCode::Cycle));
    assert!(!impostor.metrics().parent_connected);
    impostor.shutdown().await;
    a.shutdown().await;
    b.shutdown().await;
}

/// A connection to the primary holding `key`.
fn primary(cluster: &RedisCluster, key: &[u8]) -> redis::Connection {
    cluster.connection(cluster.primary_for_key(key).unwrap()).unwrap()
}

/// Publishes `chunk` until it is acknowledged, retrying after refusals (a shard failing over,
/// or without the replica `WAIT` asks for) until `deadline`; returns how many tries it took.
async fn publish_until_acked(client: &mut Client, chunk: &Chunk, deadline: std::time::Instant) -> usize {
    for attempt in 1.. {
        let seq = client.publish(chunk.clone()).await;
        loop {
            match client.recv().await.expect("the front-end answers") {
                Frame::Ack { seq: s } if s == seq => return attempt,
                Frame::Error { about: Some(s), code, message } if s == seq => {
                    assert!(std::time::Instant::now() < deadline, "still refused at the deadline: {code} {message}");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    break;
                }
                _ => {}
            }
        }
    }
    unreachable!()
}

/// Issue 16: a Redis primary dies and its replica takes over. With `redis_min_replicas = 1`
/// (acknowledge after `WAIT 1`), every acknowledged chunk is still served afterwards;
/// publishing resumes once the shard has a replica again (until then its publishes are refused,
/// not acknowledged); a live subscriber that may have missed chunks while the feed was cut is
/// told to resubscribe, and its new replay holds everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_chunks_survive_a_redis_failover() {
    init_tracing();
    let mut cluster = RedisCluster::start(3, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let a = spawn(RelayConfig { redis_min_replicas: 1, ..frontend_config(dir.path(), &cluster) }).await;
    let team = filter(TEAM_FILTER);
    let mut reader = Client::connect(&a).await;
    assert!(reader.subscribe(1, team, ReplayMode::CachedAndLive).await.is_empty());
    let mut publisher = Client::connect(&a).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let mut acked = Vec::new();
    for i in 0..30u128 {
        let c = chunk(TEAM | i, "before the failover");
        publish_until_acked(&mut publisher, &c, deadline).await;
        acked.push(c);
    }

    // The primary of the team's bucket dies; its replica takes over.
    let victim = cluster.primary_for_slot(canopy_redis::key_slot(b"{c:0a0}")).unwrap();
    tokio::task::block_in_place(|| {
        cluster.kill(victim);
        cluster.wait_failover_default(victim).unwrap();
    });
    // Without a replica, the promoted primary's writes cannot be acknowledged: a publish now
    // is refused (the store timed out, or too few replicas answered `WAIT`), never acked.
    let during = chunk(TEAM | 100, "while the shard has no replica");
    let seq = publisher.publish(during.clone()).await;
    let answer = publisher.recv_until(|f| matches!(f, Frame::Ack { seq: s } | Frame::Error { about: Some(s), .. } if *s == seq)).await;
    assert!(matches!(answer.last(), Some(Frame::Error { code: ErrorCode::Internal, .. })), "{answer:?}");
    tokio::task::block_in_place(|| {
        cluster.restart(victim).unwrap();
        cluster.wait_ready(std::time::Duration::from_secs(30)).unwrap();
    });
    publish_until_acked(&mut publisher, &during, deadline).await;
    acked.push(during);
    for i in 30..60u128 {
        let c = chunk(TEAM | i, "after the failover");
        publish_until_acked(&mut publisher, &c, deadline).await;
        acked.push(c);
    }
    acked.sort_by_key(Chunk::name);

    // Everything acknowledged is served, from the promoted primary.
    let mut late = Client::connect(&a).await;
    assert_eq!(late.subscribe(1, team, ReplayMode::CachedOnly).await, acked);
    // The live subscriber: either it heard everything, or it was told it may have missed some
    // (the feed lost its connection to the dead primary) and its new replay has it all.
    let mut seen = std::collections::BTreeSet::new();
    let mut ended = false;
    while !ended && seen.len() < acked.len() {
        match reader.recv().await.expect("the subscriber is served") {
            Frame::Deliver { id: 1, chunk } => {
                assert!(seen.insert(chunk.name()), "{} twice", chunk.name());
            }
            Frame::Error { about: Some(1), code: ErrorCode::SlowConsumer, .. } => ended = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    if ended {
        assert_eq!(reader.subscribe(2, team, ReplayMode::CachedAndLive).await, acked);
        assert!(a.metrics().node.live_gaps >= 1);
    }
    a.shutdown().await;
}

/// Issue 16: a randomized stress run against the real cluster with two front-ends and a cloud
/// relay below each (not seed-replayable: Redis and the network are real; the seed is printed).
/// Publishers on all four relays race on a small space of names, some with other bytes
/// (conflicts) and some with the same (duplicates); subscribers of every mode open before and
/// while they publish. Afterwards: every name acknowledged anywhere is in the cluster, with
/// bytes acknowledged for it; a front-end never acknowledged two values for one name, and the
/// cluster holds the one it acknowledged (a cloud relay acknowledges once it has stored a chunk
/// itself, so a value it acknowledged can lose a conflict at the origin, which refuses it
/// upstream: the tree's documented first-write-wins); each name at most once per
/// subscription; and every subscription that was open throughout (or replayed from the cache)
/// has every acknowledged name under its filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_two_frontends_against_the_real_cluster() {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::{Arc, Mutex};

    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    init_tracing();
    let seed: u64 = std::env::var("CANOPY_STRESS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("stress seed {seed} (the run is not replayable: Redis and the network are real)");
    let rounds: usize = std::env::var("CANOPY_STRESS_PUBLISHES").ok().and_then(|s| s.parse().ok()).unwrap_or(120);
    let mut rng = SmallRng::seed_from_u64(seed);
    let (cluster, dirs, a, b) = two_frontends(4).await;
    let cloud_a = spawn(child_config(dirs[2].path(), &a)).await;
    let cloud_b = spawn(child_config(dirs[3].path(), &b)).await;
    let relays = [&a, &b, &cloud_a, &cloud_b];

    // Names under three prefixes, spread over buckets; filters of several widths over them.
    let prefixes: [u128; 3] = [0x0a0b << 112, 0x7c << 120, 0xe1 << 120];
    let names: Vec<u128> = (0..90u128).map(|i| prefixes[(i % 3) as usize] | ((i * 0x9e37_79b9) << 40) | i).collect();
    let filters = [
        Filter::ALL,
        filter("0x0a0b0000000000000000000000000000/16"),
        filter("0x7c000000000000000000000000000000/8"),
        filter("0xe0000000000000000000000000000000/4"),
    ];

    // Subscriber clients, each read by a task that records deliveries per subscription.
    type Seen = Arc<Mutex<BTreeMap<(usize, u64), Vec<u128>>>>;
    let seen: Seen = Arc::default();
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut subs: Vec<(usize, u64, Filter, ReplayMode, bool)> = Vec::new(); // (client, id, filter, mode, before publishing)
    // Connects subscriber `c` to `relay`, subscribes, and returns once every subscription's
    // `ReplayDone` is in (so a `LiveOnly` one opened before the publishing is open throughout);
    // a task then keeps reading.
    let open = |c: usize, relay: &RelayHandle, specs: Vec<(u64, Filter, ReplayMode)>, before: bool, subs: &mut Vec<_>| {
        let (seen, stop, relay_addr, pem) = (seen.clone(), stop.clone(), relay.local_addr(), relay.cert_pem().to_owned());
        for (id, f, mode) in &specs {
            subs.push((c, *id, *f, *mode, before));
        }
        async move {
            let mut client = Client::connect_with(relay_addr, &pem, None).await;
            let mut replaying: BTreeSet<u64> = specs.iter().map(|(id, _, _)| *id).collect();
            for (id, f, mode) in specs {
                client.send(&Frame::Subscribe { id, filter: f, mode, credit: u32::MAX }).await;
            }
            // What a frame means: a delivery is recorded; the id of a `ReplayDone` is returned.
            let record = move |frame: Frame, seen: &Seen| match frame {
                Frame::Deliver { id, chunk } => {
                    seen.lock().unwrap().entry((c, id)).or_default().push(chunk.name().to_u128());
                    None
                }
                Frame::ReplayDone { id } => Some(id),
                Frame::Error { about, code, message } => panic!("subscriber {c}: {about:?} {code} {message}"),
                _ => None,
            };
            while !replaying.is_empty() {
                let frame = client.recv().await.expect("the relay answers");
                if let Some(id) = record(frame, &seen) {
                    replaying.remove(&id);
                }
            }
            // Detached: it ends when told to stop, or with the connection.
            drop(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.notified() => return,
                        frame = client.recv() => match frame {
                            Some(frame) => {
                                record(frame, &seen);
                            }
                            None => return,
                        },
                    }
                }
            }));
        }
    };
    let modes = [ReplayMode::CachedAndLive, ReplayMode::LiveOnly, ReplayMode::CachedAndLive, ReplayMode::MostRecent(3)];
    let mut next_client = 0;
    for _ in 0..4 {
        let relay = relays[rng.random_range(0..4)];
        let specs = (1..=2).map(|id| (id, filters[rng.random_range(0..filters.len())], modes[rng.random_range(0..modes.len())])).collect();
        open(next_client, relay, specs, true, &mut subs).await;
        next_client += 1;
    }

    // Publishers: each its own task and client on a random relay.
    // Name → the values acknowledged for it, each with whether a front-end acknowledged it.
    type Acked = Arc<Mutex<BTreeMap<u128, BTreeSet<(Vec<u8>, bool)>>>>;
    let acked: Acked = Arc::default();
    let mut publishers = Vec::new();
    let expiry = now_ms() + 3_600_000;
    for p in 0..4usize {
        let r = rng.random_range(0..4);
        let at_frontend = r < 2;
        let relay = relays[r];
        let (addr, pem, acked) = (relay.local_addr(), relay.cert_pem().to_owned(), acked.clone());
        let mut prng = SmallRng::seed_from_u64(seed ^ (p as u64 + 1));
        let names = names.clone();
        publishers.push(tokio::spawn(async move {
            let mut client = Client::connect_with(addr, &pem, None).await;
            for _ in 0..rounds {
                let name = names[prng.random_range(0..names.len())];
                // Mostly one value per name (duplicates), now and then another (conflicts).
                let value = if prng.random_bool(0.9) { format!("v{name:x}") } else { format!("w{p}") };
                let chunk = Chunk::new(canopy::Name::new(name), expiry, value.clone().into_bytes()).unwrap();
                let seq = client.publish(chunk).await;
                let answer = client.recv_until(|f| matches!(f, Frame::Ack { seq: s } | Frame::Error { about: Some(s), .. } if *s == seq)).await;
                match answer.last() {
                    Some(Frame::Ack { .. }) => {
                        acked.lock().unwrap().entry(name).or_default().insert((value.into_bytes(), at_frontend));
                    }
                    Some(Frame::Error { code: ErrorCode::Conflict, .. }) => {}
                    other => panic!("publish of {name:#x}: {other:?}"),
                }
            }
        }));
    }
    // More subscribers while they publish (the cache-to-live race).
    for _ in 0..3 {
        tokio::time::sleep(std::time::Duration::from_millis(rng.random_range(5..40))).await;
        let relay = relays[rng.random_range(0..4)];
        let specs = vec![(1, filters[rng.random_range(0..filters.len())], ReplayMode::CachedAndLive)];
        open(next_client, relay, specs, false, &mut subs).await;
        next_client += 1;
    }
    for p in publishers {
        p.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty());

    // Every acknowledged chunk is in the cluster, with the acknowledged bytes, once.
    let mut check = Client::connect(&b).await;
    let stored: BTreeMap<u128, Vec<u8>> = check
        .subscribe(1, Filter::ALL, ReplayMode::CachedOnly)
        .await
        .into_iter()
        .map(|c| (c.name().to_u128(), c.data().to_vec()))
        .collect();
    for (name, values) in &acked {
        let stored = stored.get(name).unwrap_or_else(|| panic!("{name:#x}: acknowledged, not in the cluster"));
        assert!(values.iter().any(|(v, _)| v == stored), "{name:#x}: the cluster holds bytes nobody was acknowledged for");
        let by_frontends: BTreeSet<&Vec<u8>> = values.iter().filter(|(_, f)| *f).map(|(v, _)| v).collect();
        assert!(by_frontends.len() <= 1, "{name:#x}: the front-ends acknowledged two values");
        if let Some(v) = by_frontends.first() {
            assert_eq!(*v, stored, "{name:#x}: the cluster lost the value a front-end acknowledged");
        }
    }
    assert_eq!(cluster.record_count().unwrap(), stored.len());

    // Each subscription: no name twice; the ones that replay the cache or were open throughout
    // get every acknowledged chunk under their filter.
    let expect = |f: &Filter| -> BTreeSet<u128> { acked.keys().copied().filter(|n| f.matches(canopy::Name::new(*n))).collect() };
    for (c, id, f, mode, before) in &subs {
        let complete = matches!(mode, ReplayMode::CachedAndLive) || (*mode == ReplayMode::LiveOnly && *before);
        if complete {
            let want = expect(f);
            eventually(&format!("subscriber {c} sub {id} ({f}, {mode:?}) has every acknowledged chunk"), || {
                let seen = seen.lock().unwrap();
                let got: BTreeSet<u128> = seen.get(&(*c, *id)).map(|v| v.iter().copied().collect()).unwrap_or_default();
                want.is_subset(&got)
            })
            .await;
        }
    }
    // A last chunk everywhere, then no name twice anywhere.
    let mut last = Client::connect(&a).await;
    last.publish_acked(chunk(0x0a0b << 112 | 0xffff_ffff, "last")).await;
    let all_live = subs.iter().filter(|(_, _, f, mode, _)| *mode != ReplayMode::MostRecent(3) && f.matches(canopy::Name::new(0x0a0b << 112 | 0xffff_ffff))).count();
    eventually("the last chunk reached every covering subscription", || {
        let seen = seen.lock().unwrap();
        seen.values().filter(|v| v.contains(&(0x0a0b << 112 | 0xffff_ffff))).count() >= all_live
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    for ((c, id), names) in &seen {
        let unique: BTreeSet<&u128> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "subscriber {c} sub {id} got a name twice: {names:x?}");
    }
    stop.notify_waiters();
    for relay in [cloud_a, cloud_b, a, b] {
        relay.shutdown().await;
    }
    eprintln!("stress seed {seed}: {} names acknowledged, {} subscriptions checked", acked.len(), subs.len());
}

/// Issue 16: a `LiveOnly` subscription's `ReplayDone` from a front-end promises every chunk
/// stored afterwards, through any front-end: it comes only once the front-end hears the
/// filter's buckets. Each round opens a fresh subscription and publishes on the other
/// front-end right after its `ReplayDone`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_only_at_one_frontend_hears_the_other_right_after_replay_done() {
    init_tracing();
    let (_cluster, _dirs, a, b) = two_frontends(2).await;
    let mut publisher = Client::connect(&b).await;
    let mut flood = Client::connect(&a).await;
    for round in 0..20u128 {
        // A filter of its own each round, so the front-end subscribes to new buckets; and a
        // flood of publishes into the front-end just before, so that its store is busy and
        // subscribing to the buckets takes a while.
        let base = (round + 1) << 120;
        for i in 0..300u128 {
            flood.publish(chunk((0xf0 << 120) | (round << 16) | i, "flood")).await;
        }
        let mut reader = Client::connect(&a).await;
        let f = canopy::Filter::new(canopy::Name::new(base), 8).unwrap();
        assert!(reader.subscribe(1, f, ReplayMode::LiveOnly).await.is_empty());
        publisher.publish_acked(chunk(base | 1, "right after")).await;
        exactly_once(&mut reader, &[base | 1].into(), &format!("round {round}")).await;
    }
    a.shutdown().await;
    b.shutdown().await;
}
