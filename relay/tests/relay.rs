//! End-to-end tests: real QUIC on 127.0.0.1, relays in-process, a raw test client.

mod common;

use canopy::{Chunk, Filter, Name};
use canopy::wire::{ErrorCode, Frame, ReplayMode, Role};
use common::*;

/// Names under the team filter `0x0a0b…/16`.
const TEAM: u128 = 0x0a0b << 112;
const TEAM_FILTER: &str = "0x0a0b0000000000000000000000000000/16";
/// Names under `0x0c…/8`, which the team filter does not cover.
const OTHER: u128 = 0x0c << 120;
const OTHER_FILTER: &str = "0x0c000000000000000000000000000000/8";

fn names(chunks: &[canopy::Chunk]) -> Vec<u128> {
    chunks.iter().map(|c| c.name().to_u128()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_from_local_reaches_all_three_levels_once() {
    init_tracing();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let origin = spawn(config(dirs[0].path())).await;
    let cloud = spawn(child_config(dirs[1].path(), &origin)).await;
    let local = spawn(child_config(dirs[2].path(), &cloud)).await;
    let team = filter(TEAM_FILTER);

    let mut origin_sub = Client::connect(&origin).await;
    let mut origin_other = Client::connect(&origin).await;
    let mut cloud_sub = Client::connect(&cloud).await;
    let mut local_sub = Client::connect(&local).await;
    let mut publisher = Client::connect(&local).await;
    let mut sentinel = Client::connect(&local).await;
    for client in [&mut origin_sub, &mut cloud_sub, &mut local_sub, &mut publisher] {
        assert!(client.subscribe(1, team, ReplayMode::CachedAndLive).await.is_empty());
    }
    assert!(origin_other.subscribe(1, filter(OTHER_FILTER), ReplayMode::CachedAndLive).await.is_empty());

    publisher.publish_acked(chunk(TEAM | 1, "hello tree")).await;
    // A later chunk from another client: along every path frames stay in order, so when it
    // arrives, everything sent before it has arrived too.
    sentinel.publish_acked(chunk(TEAM | 2, "sentinel")).await;
    for (level, client) in [("origin", &mut origin_sub), ("cloud", &mut cloud_sub), ("local", &mut local_sub)] {
        let got = client.delivered_until(1, TEAM | 2).await;
        assert_eq!(names(&got), vec![TEAM | 1, TEAM | 2], "subscriber at {level}");
        assert_eq!(got[0].data().as_ref(), b"hello tree");
    }
    // Not echoed to its publisher: it sees only the other client's chunk.
    assert_eq!(names(&publisher.delivered_until(1, TEAM | 2).await), vec![TEAM | 2]);
    // A subscriber whose filter does not cover the chunks gets neither.
    sentinel.publish_acked(chunk(OTHER | 1, "elsewhere")).await;
    assert_eq!(names(&origin_other.delivered_until(1, OTHER | 1).await), vec![OTHER | 1]);

    let m = origin.metrics();
    assert_eq!(m.node.stored, 3, "origin caches everything published below it: {m:?}");
    assert_eq!(m.node.duplicates, 0, "{m:?}");
    local.shutdown().await;
    cloud.shutdown().await;
    origin.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_chunks_survive_an_abrupt_stop() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let relay = spawn(config(dir.path())).await;
    let mut publisher = Client::connect(&relay).await;
    for i in 0..200u128 {
        publisher.publish(chunk(TEAM | i, &format!("chunk {i}"))).await;
    }
    let mut acked = std::collections::HashSet::new();
    while acked.len() < 200 {
        match publisher.recv().await.expect("acks") {
            Frame::Ack { seq } => assert!(acked.insert(seq)),
            other => panic!("unexpected {other:?}"),
        }
    }
    // No graceful flush, no goodbyes.
    relay.kill().await;
    drop(publisher);

    let relay = spawn(config(dir.path())).await;
    let mut reader = Client::connect(&relay).await;
    let got = reader.subscribe(7, Filter::ALL, ReplayMode::CachedOnly).await;
    assert_eq!(names(&got), (0..200u128).map(|i| TEAM | i).collect::<Vec<_>>());
    assert_eq!(got[199].data().as_ref(), b"chunk 199");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_chunks_survive_sigkill_of_the_binary() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_canopy-relay"))
        .args(["--listen", "127.0.0.1:0", "--store", "fjall", "--data"])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let addr = tokio::time::timeout(
        WAIT,
        tokio::task::spawn_blocking(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let line = line.unwrap();
                if let Some(addr) = line.strip_prefix("listening on ") {
                    return addr.parse::<std::net::SocketAddr>().unwrap();
                }
            }
            panic!("the relay exited without printing its address");
        }),
    )
    .await
    .expect("address in time")
    .unwrap();
    let cert = std::fs::read_to_string(dir.path().join("cert.pem")).unwrap();
    let mut publisher = Client::connect_with(addr, &cert, None).await;
    for i in 0..200u128 {
        publisher.publish(chunk(TEAM | i, "durable")).await;
    }
    let mut acks = 0;
    while acks < 200 {
        match publisher.recv().await.expect("acks") {
            Frame::Ack { .. } => acks += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    drop(publisher);

    let relay = spawn(config(dir.path())).await;
    let mut reader = Client::connect(&relay).await;
    let got = reader.subscribe(1, Filter::ALL, ReplayMode::CachedOnly).await;
    assert_eq!(got.len(), 200);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_closes_only_the_offending_connection() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let relay = spawn(config(dir.path())).await;
    let team = filter(TEAM_FILTER);
    let mut subscriber = Client::connect(&relay).await;
    subscriber.subscribe(1, team, ReplayMode::LiveOnly).await;

    // A valid length prefix, then bytes that are no frame (unknown tag 0xf3a1…).
    let mut garbage = Client::connect(&relay).await;
    garbage.send_raw(&[0, 0, 0, 10, 0xf3, 0xa1, 0x5c, 0x07, 0x9e, 0x42, 0x11, 0xd8, 0x6b, 0x3f]).await;
    assert_eq!(garbage.expect_error().await, (ErrorCode::Malformed, None));
    assert!(garbage.expect_end().await.is_empty(), "the relay closes after the error");

    // Garbage before any hello.
    let mut early = Client::connect_raw(&relay).await;
    early.send_raw(&[0, 0, 0, 3, 1, 2, 3]).await;
    assert_eq!(early.expect_error().await, (ErrorCode::Malformed, None));
    early.expect_end().await;

    // A length prefix above the 4096-byte limit fails at once.
    let mut oversized = Client::connect(&relay).await;
    oversized.send_raw(&[0, 0, 0x10, 0x01]).await;
    assert_eq!(oversized.expect_error().await, (ErrorCode::FrameTooLarge, None));
    oversized.expect_end().await;

    // A chunk over the 1 KiB limit, crafted on the wire (the library refuses to build one):
    // a valid 1024-byte publish with its data length patched to 1025 and one byte appended.
    // The frame boundary is intact, so the relay answers about that publish and the
    // connection stays open: a later publish on it is acknowledged.
    let mut big = Client::connect(&relay).await;
    let max = Chunk::new(Name::new(TEAM | 11), now_ms() + 60_000, vec![7u8; 1024]).unwrap();
    let mut bytes = canopy::wire::encode_to_vec(&Frame::Publish { seq: 70, chunk: max }).unwrap();
    let payload = u32::from_be_bytes(bytes[..4].try_into().unwrap()) + 1;
    bytes[..4].copy_from_slice(&payload.to_be_bytes());
    // prefix 4 + tag 4 + seq 8 + name 16 + expiry 8: the data length is at 40..48.
    assert_eq!(bytes[40..48], 1024u64.to_be_bytes());
    bytes[40..48].copy_from_slice(&1025u64.to_be_bytes());
    bytes.push(7);
    big.send_raw(&bytes).await;
    match big.recv().await {
        Some(Frame::Error { code, about, message }) => {
            assert_eq!((code, about), (ErrorCode::ChunkTooLarge, Some(70)), "{message}");
            assert!(message.contains("1025 bytes") && message.contains("1024"), "{message}");
        }
        other => panic!("expected an error for an oversized chunk, got {other:?}"),
    }
    big.publish_acked(chunk(TEAM | 12, "after the oversized one")).await;
    assert_eq!(names(&subscriber.delivered_until(1, TEAM | 12).await), vec![TEAM | 12]);

    // A hello speaking an unknown protocol version.
    let mut future = Client::connect_raw(&relay).await;
    future.send(&Frame::Hello { version: 9, role: Role::Client, relay_path: vec![], token: None }).await;
    assert_eq!(future.expect_error().await, (ErrorCode::UnsupportedVersion, None));
    future.expect_end().await;

    // Everyone else is unaffected.
    let mut publisher = Client::connect(&relay).await;
    publisher.publish_acked(chunk(TEAM | 9, "still fine")).await;
    assert_eq!(names(&subscriber.delivered_until(1, TEAM | 9).await), vec![TEAM | 9]);
    subscriber.publish_acked(chunk(TEAM | 10, "both ways")).await;
    publisher.subscribe(2, team, ReplayMode::CachedAndLive).await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_heals_to_the_union_exactly_once() {
    init_tracing();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let origin = spawn(config(dirs[0].path())).await;
    let cloud = spawn(child_config(dirs[1].path(), &origin)).await;
    let cloud_addr = cloud.local_addr();
    let local = spawn(child_config(dirs[2].path(), &cloud)).await;
    let team = filter(TEAM_FILTER);

    let mut l1 = Client::connect(&local).await;
    let mut l2 = Client::connect(&local).await;
    let mut o1 = Client::connect(&origin).await;
    for client in [&mut l1, &mut l2, &mut o1] {
        client.subscribe(1, team, ReplayMode::CachedAndLive).await;
    }
    // The tree works end to end before the partition.
    l1.publish_acked(chunk(TEAM | 1, "before")).await;
    assert_eq!(names(&o1.delivered_until(1, TEAM | 1).await), vec![TEAM | 1]);
    assert_eq!(names(&l2.delivered_until(1, TEAM | 1).await), vec![TEAM | 1]);

    // Partition: the middle relay goes away.
    cloud.shutdown().await;
    eventually("local notices the lost parent", || local.metrics().links == 2).await;
    l1.publish_acked(chunk(TEAM | 2, "local during partition")).await;
    assert_eq!(names(&l2.delivered_until(1, TEAM | 2).await), vec![TEAM | 2]);
    l2.publish_acked(chunk(TEAM | 3, "local reply")).await;
    assert_eq!(names(&l1.delivered_until(1, TEAM | 3).await), vec![TEAM | 3]);
    o1.publish_acked(chunk(TEAM | 4, "origin during partition")).await;
    assert!(local.metrics().store.outbox >= 2, "local keeps what the parent has not acknowledged");

    // Heal: the cloud relay comes back on the same port with the same data.
    let cloud = spawn_on(canopy_relay::RelayConfig { listen: cloud_addr, ..child_config(dirs[1].path(), &origin) }).await;
    assert_eq!(names(&o1.delivered_until(1, TEAM | 3).await), vec![TEAM | 2, TEAM | 3]);
    assert_eq!(names(&l1.delivered_until(1, TEAM | 4).await), vec![TEAM | 4]);
    assert_eq!(names(&l2.delivered_until(1, TEAM | 4).await), vec![TEAM | 4]);

    // Nothing arrives twice: sentinels in both directions come next on each path.
    o1.publish_acked(chunk(TEAM | 5, "sentinel down")).await;
    assert_eq!(names(&l1.delivered_until(1, TEAM | 5).await), vec![TEAM | 5]);
    assert_eq!(names(&l2.delivered_until(1, TEAM | 5).await), vec![TEAM | 5]);
    l1.publish_acked(chunk(TEAM | 6, "sentinel up")).await;
    assert_eq!(names(&o1.delivered_until(1, TEAM | 6).await), vec![TEAM | 6]);
    assert_eq!(names(&l2.delivered_until(1, TEAM | 6).await), vec![TEAM | 6]);

    // Every relay holds the union.
    eventually("outboxes drained", || local.metrics().store.outbox == 0 && cloud.metrics().store.outbox == 0).await;
    for (name, relay) in [("origin", &origin), ("cloud", &cloud), ("local", &local)] {
        assert_eq!(relay.metrics().store.chunks, 6, "{name}: {:?}", relay.metrics());
    }
    local.shutdown().await;
    cloud.shutdown().await;
    origin.shutdown().await;
}

/// Issue 15, part 3: with a sync interval (here far longer than the test), a publish is
/// acknowledged once written, without waiting for a sync; a child relay still gets every
/// chunk published at its parent, because a child waiting for chunks makes the parent sync at
/// once instead of at the interval; and a relay stopped abruptly keeps what it acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_sync_interval_acks_do_not_wait_and_children_still_get_every_chunk() {
    init_tracing();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let interval = |dir: &std::path::Path| canopy_relay::RelayConfig { sync_interval_ms: Some(3_600_000), ..config(dir) };
    let origin = spawn(interval(dirs[0].path())).await;
    let cloud = spawn(child_config(dirs[1].path(), &origin)).await;
    let team = filter(TEAM_FILTER);
    let mut cloud_sub = Client::connect(&cloud).await;
    assert!(cloud_sub.subscribe(1, team, ReplayMode::CachedAndLive).await.is_empty());
    let mut publisher = Client::connect(&origin).await;
    // Acks within the client's wait (seconds), with the next timed sync an hour away.
    for i in 0..50u128 {
        publisher.publish_acked(chunk(TEAM | i, &format!("chunk {i}"))).await;
    }
    let got = cloud_sub.delivered_until(1, TEAM | 49).await;
    assert_eq!(names(&got), (0..50u128).map(|i| TEAM | i).collect::<Vec<_>>(), "the child got every chunk");

    cloud.shutdown().await;
    origin.kill().await;
    drop(publisher);
    let origin = spawn(interval(dirs[0].path())).await;
    let mut reader = Client::connect(&origin).await;
    let got = reader.subscribe(7, Filter::ALL, ReplayMode::CachedOnly).await;
    assert_eq!(names(&got), (0..50u128).map(|i| TEAM | i).collect::<Vec<_>>(), "what was acknowledged is kept");
    origin.shutdown().await;
}
