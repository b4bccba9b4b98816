//! A client with candidate relays (`Client::connect_any`): its local relay is killed
//! mid-stream, it moves to the cloud relay and gets everything published meanwhile, exactly
//! once; the local relay comes back and the client moves back. Every move is an event.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use canopy_relay::{Relay, RelayConfig, RelayHandle, StoreKind};
use canopy_sdk::{Client, ConnectionEvent, ReplayMode, SubEvent};
use common::*;

/// A relay below `parent` on `listen`, retrying while the port is still being released.
async fn child(data: &Path, listen: SocketAddr, parent: &RelayHandle) -> RelayHandle {
    within("the local relay to start", async {
        loop {
            let config = RelayConfig {
                listen,
                data: data.to_path_buf(),
                store: StoreKind::Memory,
                parent: Some(parent.local_addr().to_string()),
                parent_ca: Some(parent.cert_path().to_path_buf()),
                ..RelayConfig::default()
            };
            match Relay::spawn(config).await {
                Ok(r) => return r,
                Err(e) if format!("{e:#}").contains("binding") => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => panic!("local relay: {e:#}"),
            }
        }
    })
    .await
}

/// Chunks until `count` distinct ones are in, failing on a repeat.
async fn take(sub: &mut canopy_sdk::Subscription, seen: &mut Vec<u128>, count: usize) {
    while seen.len() < count {
        match within("a chunk", sub.next()).await {
            Some(SubEvent::Chunk(c)) => {
                let n = u128::from(c.name());
                assert!(!seen.contains(&n), "chunk {n:#x} delivered twice");
                seen.push(n);
            }
            Some(_) => {}
            None => panic!("the subscription ended"),
        }
    }
}

/// The next `Moved` event.
async fn moved(events: &mut tokio::sync::broadcast::Receiver<ConnectionEvent>) -> (String, String) {
    loop {
        if let ConnectionEvent::Moved { from, to } = within("a move", events.recv()).await.unwrap() {
            return (from, to);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_fails_over_to_the_cloud_relay_and_moves_back_with_no_gap_or_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = relay(&dir.path().join("cloud")).await;
    let local = child(&dir.path().join("local"), "127.0.0.1:0".parse().unwrap(), &cloud).await;
    let local_addr = local.local_addr();
    within("the local relay's parent", async {
        while !local.metrics().parent_connected {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // A dead candidate is given up on after a second, not the default ten.
    let candidates: Vec<_> = [options(&local), options(&cloud)].into_iter().map(|o| canopy_sdk::ConnectOptions { connect_timeout: Duration::from_secs(1), ..o }).collect();
    let client = within("connect", Client::connect_any(candidates, Duration::from_millis(200))).await.unwrap();
    let mut events = client.connection_events();
    let mut sub = client.subscribe(canopy_sdk::Filter::ALL, ReplayMode::CachedAndLive).await.unwrap();
    let publisher = self::client(&cloud).await;
    let mut seen = Vec::new();

    for n in 1..=10 {
        publisher.publish(chunk(n, "before")).await.unwrap();
    }
    take(&mut sub, &mut seen, 10).await;

    // The local relay dies mid-stream; the client moves to the cloud relay.
    local.shutdown().await;
    for n in 11..=20 {
        publisher.publish(chunk(n, "while local is down")).await.unwrap();
    }
    assert_eq!(moved(&mut events).await, (local_addr.to_string(), cloud.local_addr().to_string()));
    take(&mut sub, &mut seen, 20).await;

    // The local relay comes back: the client moves back to it.
    let local = child(&dir.path().join("local"), local_addr, &cloud).await;
    assert_eq!(moved(&mut events).await, (cloud.local_addr().to_string(), local_addr.to_string()));
    for n in 21..=30 {
        publisher.publish(chunk(n, "after")).await.unwrap();
    }
    take(&mut sub, &mut seen, 30).await;
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(sorted, (1..=30).collect::<Vec<u128>>(), "every chunk once");
    // Nothing more arrives: no repeat trickles in after the moves.
    if let Ok(Some(SubEvent::Chunk(c))) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        panic!("a repeat after the moves: {:#x}", u128::from(c.name()));
    }
    local.shutdown().await;
    cloud.shutdown().await;
}
