//! Flow control end to end, over real QUIC with a real relay: credit per subscription keeps
//! every buffer bounded without ever cutting off a reader that keeps up, a stalled
//! subscription holds back only itself, and one stalled past its bound recovers from the cache.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use canopy::{FjallStore, Store};
use canopy_relay::{Relay, RelayConfig, RelayHandle, StoreKind};
use canopy_sdk::{Chunk, Client, ErrorCode, Filter, Name, ReplayMode, SubEvent, Subscription};
use common::*;

const TEAM: u128 = 0x0a0b << 112;
const OTHER: u128 = 0x0c0d << 112;

fn team() -> Filter {
    Filter::new(Name::new(TEAM), 16).unwrap()
}

fn other() -> Filter {
    Filter::new(Name::new(OTHER), 16).unwrap()
}

async fn relay_with(data: &std::path::Path, store: StoreKind, max_backlog: usize) -> RelayHandle {
    logs();
    let config = RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data: data.to_path_buf(),
        store,
        max_backlog,
        ..RelayConfig::default()
    };
    Relay::spawn(config).await.expect("relay starts")
}

/// Reads chunks until `ReplayDone`, checking the buffer bound after every event.
async fn read_replay(sub: &mut Subscription) -> Vec<u128> {
    let mut names = Vec::new();
    loop {
        assert!(sub.buffered() <= sub.buffer_bound(), "{} buffered, bound {}", sub.buffered(), sub.buffer_bound());
        match next(sub).await {
            SubEvent::Chunk(c) => names.push(c.name().to_u128()),
            SubEvent::ReplayDone => return names,
            other => panic!("after {} chunks: {other:?}", names.len()),
        }
    }
}

/// A 100,000-chunk replay into a subscription with a 1,000-event buffer, read at full speed,
/// arrives whole and in order, and the buffer never holds more than its bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100k_chunk_replay_into_a_1000_event_buffer_arrives_whole_and_in_order() {
    const N: u128 = 100_000;
    let dir = tempfile::tempdir().unwrap();
    // Fill the relay's own durable store before it starts: the replay is what is tested.
    {
        let mut store = FjallStore::open(&dir.path().join("store"), u64::MAX).unwrap();
        let expiry = canopy_sdk::now_ms() + 3_600_000;
        for n in 0..N {
            store.insert(&Chunk::new(Name::new(TEAM | n), expiry, n.to_be_bytes().to_vec()).unwrap()).unwrap();
        }
        store.sync().unwrap();
    }
    let relay = relay_with(dir.path(), StoreKind::Fjall, 4096).await;
    let mut opts = options(&relay);
    opts.subscription_buffer = 1_000;
    let client = within("connect", Client::connect(opts)).await.unwrap();
    let mut sub = client.subscribe(team(), ReplayMode::CachedAndLive).await.unwrap();
    let names = read_replay(&mut sub).await;
    assert_eq!(names.len(), N as usize);
    assert!(names.iter().copied().eq((0..N).map(|n| TEAM | n)), "out of order or with gaps");
    assert!(sub.peak_buffered() <= sub.buffer_bound(), "peak {} > bound {}", sub.peak_buffered(), sub.buffer_bound());
    assert!(sub.peak_buffered() > 0);
    assert_eq!(relay.metrics().node.slow_consumers, 0);
    relay.shutdown().await;
}

/// While one subscription on a connection is stalled, another on the same connection keeps
/// receiving and the connection's publishes keep being acknowledged; the stalled one then
/// gets everything it was sent, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscription_holds_back_only_itself() {
    const N: u128 = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_with(dir.path(), StoreKind::Memory, 4096).await;
    let mut opts = options(&relay);
    opts.subscription_buffer = 64;
    let client = within("connect", Client::connect(opts)).await.unwrap();
    let mut stalled = client.subscribe(team(), ReplayMode::LiveOnly).await.unwrap();
    let mut reading = client.subscribe(other(), ReplayMode::LiveOnly).await.unwrap();
    assert_eq!(next(&mut stalled).await, SubEvent::ReplayDone);
    assert_eq!(next(&mut reading).await, SubEvent::ReplayDone);
    let publisher = common::client(&relay).await;
    for n in 0..N {
        // Far more than the stalled subscription's window goes to it ...
        within("publish to the stalled subscription", publisher.publish(chunk(TEAM | n, "t"))).await.unwrap();
        // ... while the other subscription gets each of its chunks as it is published ...
        within("publish to the reading subscription", publisher.publish(chunk(OTHER | n, "o"))).await.unwrap();
        assert_eq!(next_chunk(&mut reading).await.name(), Name::new(OTHER | n));
        // ... and the stalled connection's own publishes are acknowledged.
        if n % 100 == 0 {
            within("ack on the stalled connection", client.publish(chunk(OTHER | (1 << 100) | n, "own")))
                .await
                .unwrap();
        }
        assert!(stalled.buffered() <= stalled.buffer_bound(), "{} buffered", stalled.buffered());
    }
    assert_eq!(stalled.buffered(), 64, "exactly one window went out ahead of the reader");
    let mut names = Vec::new();
    while names.len() < N as usize {
        names.push(next_chunk(&mut stalled).await.name().to_u128());
    }
    assert!(names.iter().copied().eq((0..N).map(|n| TEAM | n)));
    assert_eq!(relay.metrics().node.slow_consumers, 0);
    assert!(stalled.peak_buffered() <= stalled.buffer_bound());
    relay.shutdown().await;
}

/// A reader stalled for 10 s while chunks keep coming is ended with `SlowConsumer` (its
/// backlog bound is small here), and recovers everything by subscribing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_stalled_for_10_s_recovers_everything_by_resubscribing() {
    const N: u128 = 1_000;
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_with(dir.path(), StoreKind::Fjall, 100).await;
    let mut opts = options(&relay);
    opts.subscription_buffer = 16;
    let client = within("connect", Client::connect(opts)).await.unwrap();
    let mut sub = client.subscribe(team(), ReplayMode::CachedAndLive).await.unwrap();
    assert_eq!(next(&mut sub).await, SubEvent::ReplayDone);

    // The stall: 10 s of steady publishing that nobody reads.
    let publisher = common::client(&relay).await;
    let stall = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut tick = tokio::time::interval(Duration::from_secs(10) / N as u32);
    for n in 0..N {
        tick.tick().await;
        within("ack", publisher.publish(chunk(TEAM | n, "x"))).await.unwrap();
        assert!(sub.buffered() <= sub.buffer_bound());
    }
    tokio::time::sleep_until(stall).await;

    // Waking up: a window's worth of chunks, then the end of the subscription.
    let mut before = BTreeSet::new();
    let message = loop {
        match next(&mut sub).await {
            SubEvent::Chunk(c) => assert!(before.insert(c.name().to_u128())),
            SubEvent::Error { code: ErrorCode::SlowConsumer, message } => break message,
            other => panic!("{other:?}"),
        }
    };
    assert!(message.contains("resubscribe"), "{message}");
    assert!(before.len() <= 16, "{} chunks buffered with a window of 16", before.len());
    assert_eq!(within("end", sub.next()).await, None);
    assert!(sub.peak_buffered() <= sub.buffer_bound());

    // Subscribing again recovers every chunk, in order, from the cache.
    let mut again = client.subscribe(team(), ReplayMode::CachedAndLive).await.unwrap();
    let names = read_replay(&mut again).await;
    assert!(names.iter().copied().eq((0..N).map(|n| TEAM | n)), "{} chunks recovered", names.len());
    assert_eq!(relay.metrics().node.slow_consumers, 1);
    relay.shutdown().await;
}
