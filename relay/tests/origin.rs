//! Origin front-ends over a Redis Cluster (issue 16): relays with `store = "redis://…"` and role
//! `origin-frontend`, against a real cluster of `redis-server` processes on 127.0.0.1
//! (`canopy_redis::testing`), with real QUIC clients.

mod common;

use canopy::wire::{ErrorCode, ReplayMode};
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

/// Every chunk record on the cluster's primaries (keys `{c:xyz}:` + 16 name bytes).
fn records_in(cluster: &RedisCluster) -> usize {
    let mut count = 0;
    for node in cluster.primaries().unwrap() {
        let mut con = cluster.connection(node).unwrap();
        let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(&mut con).unwrap();
        count += keys.iter().filter(|k| k.len() == 8 + 16).count();
    }
    count
}

async fn frontend(dir: &std::path::Path, cluster: &RedisCluster) -> RelayHandle {
    spawn(frontend_config(dir, cluster)).await
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
    assert_eq!(records_in(&cluster), 300 + spread.len(), "every chunk stored once");

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
    eventually("the cloud relay's publish is in the cluster", || records_in(&cluster) == 302 + spread.len()).await;

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
}
