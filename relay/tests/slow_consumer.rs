//! A subscriber that stops reading, over real QUIC: the relay ends its subscription with
//! `SlowConsumer` instead of buffering without bound or holding up anyone else, and the
//! subscriber recovers everything from the cache by subscribing again.

mod common;

use std::collections::HashSet;

use canopy::wire::{ErrorCode, Frame, ReplayMode};
use canopy::{Chunk, Name};
use canopy_relay::{RelayConfig, StoreKind};
use common::*;

const TEAM: u128 = 0x0a0b << 112;
const TEAM_FILTER: &str = "0x0a0b0000000000000000000000000000/16";
/// Chunks published, each with 1 KiB of data: 5 MiB in all, far beyond what the slow
/// reader's QUIC stream window, its writer buffer and its node queue hold together.
const CHUNKS: usize = 5_000;
/// The relay's per-link queue bound in frames.
const MAX_QUEUE: usize = 16;

fn big_chunk(i: usize) -> Chunk {
    let mut data = vec![b'x'; 1024];
    data[..8].copy_from_slice(&(i as u64).to_be_bytes());
    Chunk::new(Name::new(TEAM | i as u128), now_ms() + 3_600_000, data).unwrap()
}

/// Reads `client` until `n` chunks for subscription `id` arrived; panics on any error frame.
async fn receive_all(mut client: Client, id: u64, n: usize) -> (Client, HashSet<u128>) {
    let mut names = HashSet::new();
    while names.len() < n {
        match client.recv().await.expect("the fast subscriber's stream stays open") {
            Frame::Deliver { id: i, chunk } if i == id => {
                assert!(names.insert(chunk.name().to_u128()), "delivered twice: {}", chunk.name());
            }
            other => panic!("fast subscriber got {other:?} after {} chunks", names.len()),
        }
    }
    (client, names)
}

async fn slow_reader_is_dropped_and_recovers(store: StoreKind, window: usize, max_queue: usize) {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let relay = spawn(RelayConfig { max_queue, max_backlog: max_queue, store, ..config(dir.path()) }).await;
    let team = filter(TEAM_FILTER);

    let mut slow = Client::connect(&relay).await;
    assert!(slow.subscribe(7, team, ReplayMode::LiveOnly).await.is_empty());
    // From here on nobody reads `slow` until every publish is acknowledged.
    let mut fast = Client::connect(&relay).await;
    assert!(fast.subscribe(1, team, ReplayMode::LiveOnly).await.is_empty());
    let fast = tokio::spawn(receive_all(fast, 1, CHUNKS));

    // The publisher keeps at most `window` publishes unanswered.
    let mut publisher = Client::connect(&relay).await;
    let mut acked = HashSet::new();
    let mut sent = 0;
    while acked.len() < CHUNKS {
        while sent < CHUNKS && sent - acked.len() < window {
            publisher.publish(big_chunk(sent)).await;
            sent += 1;
        }
        match publisher.recv().await.expect("acks keep coming while a subscriber is stuck") {
            Frame::Ack { seq } => assert!(acked.insert(seq), "ack {seq} twice"),
            other => panic!("publisher got {other:?}"),
        }
    }

    // The fast subscriber got everything, exactly once.
    let (fast, fast_names) = tokio::time::timeout(WAIT, fast).await.expect("fast subscriber in time").unwrap();
    assert_eq!(fast_names, (0..CHUNKS).map(|i| TEAM | i as u128).collect::<HashSet<_>>());

    // Exactly one subscription was dropped: the slow one.
    eventually("the relay counts the slow consumer", || relay.metrics().node.slow_consumers >= 1).await;
    let m = relay.metrics();
    assert_eq!(m.node.slow_consumers, 1, "only the reader that stopped is a slow consumer: {m:?}");
    assert_eq!(m.node.stored, CHUNKS as u64, "{m:?}");
    assert_eq!(m.subscriptions, 1, "the fast subscription is still open, the slow one is gone: {m:?}");
    assert_eq!(m.links, 3, "no connection was closed: {m:?}");

    // The slow reader resumes: what the relay had already handed to QUIC and its own bounded
    // buffers, then the error about its subscription, and nothing more for it.
    let mut before_error = Vec::new();
    loop {
        match slow.recv().await.expect("the slow reader's stream stays open") {
            Frame::Deliver { id: 7, chunk } => before_error.push(chunk.name().to_u128()),
            Frame::Error { code, about, message } => {
                assert_eq!((code, about), (ErrorCode::SlowConsumer, Some(7)), "{message}");
                break;
            }
            other => panic!("slow reader got {other:?}"),
        }
    }
    eprintln!("the slow reader got {} of {CHUNKS} chunks live before SlowConsumer", before_error.len());
    assert!(before_error.len() < CHUNKS, "the relay buffered everything for a reader that stopped");
    // Live deliveries arrive in publish order: a prefix of the publishes, without gaps.
    let prefix: Vec<u128> = (0..before_error.len()).map(|i| TEAM | i as u128).collect();
    assert_eq!(before_error, prefix);

    // Subscribing again recovers every chunk from the cache, in name order.
    let replayed = slow.subscribe(8, team, ReplayMode::CachedAndLive).await;
    let names: Vec<u128> = replayed.iter().map(|c| c.name().to_u128()).collect();
    assert_eq!(names, (0..CHUNKS).map(|i| TEAM | i as u128).collect::<Vec<_>>());
    assert!(replayed.iter().enumerate().all(|(i, c)| c.data()[..8] == (i as u64).to_be_bytes()));
    assert!(slow.pending.is_empty(), "nothing else arrived: {:?}", slow.pending);

    // And the recovered subscription is live again, like the fast one.
    publisher.publish_acked(big_chunk(CHUNKS)).await;
    assert_eq!(slow.delivered_until(8, TEAM | CHUNKS as u128).await.len(), 1);
    let mut fast = fast;
    assert_eq!(fast.delivered_until(1, TEAM | CHUNKS as u128).await.len(), 1);
    assert_eq!(relay.metrics().node.slow_consumers, 1);
    relay.shutdown().await;
}

/// Publishes answered a few at a time: the fast subscriber's queue never holds more than a
/// handful of frames, so only the reader that stopped overflows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_is_dropped_without_holding_up_others_memory_store() {
    slow_reader_is_dropped_and_recovers(StoreKind::Memory, 8, MAX_QUEUE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_is_dropped_without_holding_up_others_fjall_store() {
    slow_reader_is_dropped_and_recovers(StoreKind::Fjall, 8, MAX_QUEUE).await;
}

/// All publishes pipelined at once, with the default queue bound. A reader that keeps up must
/// survive a burst far larger than one actor turn: the actor hands a filling queue to its
/// writer mid-turn (`Node::take_urgent`) instead of at the end of the turn. (With a bound as
/// small as 16, a burst this fast outruns even a fast reader by more than the bound, and
/// dropping it is then the designed behaviour.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_is_dropped_without_holding_up_others_pipelined() {
    slow_reader_is_dropped_and_recovers(StoreKind::Memory, CHUNKS, 1024).await;
}
