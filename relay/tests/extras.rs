//! The metrics endpoint, a fingerprint-pinned parent, and access tokens.

mod common;

use canopy::wire::{ErrorCode, ReplayMode};
use canopy_relay::{AccessRule, RelayConfig};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TEAM: u128 = 0x0a0b << 112;
const TEAM_FILTER: &str = "0x0a0b0000000000000000000000000000/16";

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response)).await.unwrap().unwrap();
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_prometheus_text() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let relay =
        spawn(RelayConfig { metrics_listen: Some("127.0.0.1:0".parse().unwrap()), ..config(dir.path()) }).await;
    let mut client = Client::connect(&relay).await;
    client.subscribe(1, filter(TEAM_FILTER), ReplayMode::LiveOnly).await;
    let counted = chunk(TEAM | 1, "counted");
    client.publish_acked(counted.clone()).await;
    client.publish_acked(counted).await;

    let addr = relay.metrics_addr().unwrap();
    let body = http_get(addr, "/metrics").await;
    assert!(body.starts_with("HTTP/1.1 200 OK\r\n"), "{body}");
    for line in [
        "# TYPE canopy_chunks_in_total counter",
        "canopy_chunks_in_total 2",
        "canopy_chunks_stored_total 1",
        "canopy_duplicates_total 1",
        "canopy_conflicts_total 0",
        "canopy_evicted_total{reason=\"expired\"} 0",
        "canopy_evicted_total{reason=\"capacity\"} 0",
        "canopy_subscriptions 1",
        "canopy_links 1",
        "canopy_outbox_depth 0",
        "canopy_slow_consumers_total 0",
        "# HELP canopy_store_bytes",
        "canopy_chunks_out_total 0",
    ] {
        assert!(body.lines().any(|l| l.starts_with(line)), "missing {line:?} in\n{body}");
    }
    assert!(http_get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_trusts_a_pinned_parent_fingerprint() {
    init_tracing();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let parent = spawn(config(dirs[0].path())).await;
    let child = spawn(RelayConfig {
        parent: Some(parent.local_addr().to_string()),
        parent_fingerprint: Some(parent.fingerprint().to_uppercase()),
        ..config(dirs[1].path())
    })
    .await;
    let mut up = Client::connect(&parent).await;
    up.subscribe(1, filter(TEAM_FILTER), ReplayMode::LiveOnly).await;
    let mut down = Client::connect(&child).await;
    down.publish_acked(chunk(TEAM | 1, "pinned")).await;
    assert_eq!(up.delivered_until(1, TEAM | 1).await.len(), 1);
    child.shutdown().await;
    parent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_rules_are_enforced() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let relay = spawn(RelayConfig {
        access: vec![AccessRule {
            token: "alice".into(),
            publish: vec![TEAM_FILTER.into()],
            subscribe: vec![TEAM_FILTER.into()],
        }],
        ..config(dir.path())
    })
    .await;
    // No token: refused and closed.
    let mut anonymous = Client::connect_raw(&relay).await;
    anonymous
        .send(&canopy::wire::Frame::Hello {
            version: canopy::wire::PROTOCOL_VERSION,
            role: canopy::wire::Role::Client,
            relay_path: vec![],
            token: None,
        })
        .await;
    assert_eq!(anonymous.expect_error().await, (ErrorCode::Unauthenticated, None));
    anonymous.expect_end().await;

    let mut alice = Client::connect_with(relay.local_addr(), relay.cert_pem(), Some("alice")).await;
    alice.publish_acked(chunk(TEAM | 1, "allowed")).await;
    alice.publish(chunk(0x0c << 120, "not allowed")).await;
    assert_eq!(alice.expect_error().await, (ErrorCode::PublishDenied, Some(2)));
    alice.send(&canopy::wire::Frame::Subscribe { id: 5, filter: canopy::Filter::ALL, mode: ReplayMode::LiveOnly, credit: 8 }).await;
    assert_eq!(alice.expect_error().await, (ErrorCode::SubscribeDenied, Some(5)));
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_returns_after_the_udp_port_is_released() {
    init_tracing();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    for round in 0..3 {
        let parent = spawn(config(dirs[0].path())).await;
        let child = spawn(child_config(dirs[1].path(), &parent)).await;
        // Connections of every kind are open when the relays stop: a client on each, and the
        // child's link to its parent.
        let mut up = Client::connect(&parent).await;
        up.subscribe(1, filter(TEAM_FILTER), ReplayMode::LiveOnly).await;
        let mut down = Client::connect(&child).await;
        down.publish_acked(chunk(TEAM | (round + 1), "before shutdown")).await;
        assert_eq!(up.delivered_until(1, TEAM | (round + 1)).await.len(), 1);
        for relay in [child, parent] {
            let addr = relay.local_addr();
            relay.shutdown().await;
            if let Err(err) = std::net::UdpSocket::bind(addr) {
                panic!("round {round}: {addr} is still bound after shutdown returned: {err}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_child_says_why_once_and_backs_off() {
    init_tracing();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let parent = spawn(RelayConfig {
        access: vec![AccessRule { token: "good".into(), publish: vec![TEAM_FILTER.into()], subscribe: vec![] }],
        ..config(dirs[0].path())
    })
    .await;
    let refused = |dir: &std::path::Path, backoff_ms: Option<u64>| RelayConfig {
        parent_token: Some("wrong".into()),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        parent_refused_backoff_ms: backoff_ms.unwrap_or(RelayConfig::default().parent_refused_backoff_ms),
        ..child_config(dir, &parent)
    };
    // The child under test keeps the default long backoff after a refusal.
    let child = spawn(refused(dirs[1].path(), None)).await;
    eventually("the first refusal", || child.metrics().node.parent_refusals >= 1).await;
    // A second refused child, configured to retry quickly, measures a window in which the
    // first one would have retried several times had it kept the 100 ms .. 5 s backoff.
    let witness = spawn(refused(dirs[2].path(), Some(50))).await;
    eventually("ten refusals of the quick child", || witness.metrics().node.parent_refusals >= 10).await;

    let m = child.metrics().node;
    assert_eq!((m.parent_refusals, m.last_parent_refusal), (1, Some(ErrorCode::Unauthenticated)));
    let body = http_get(child.metrics_addr().unwrap(), "/metrics").await;
    for line in ["canopy_parent_refusals_total 1", "canopy_parent_last_refusal_code 12"] {
        assert!(body.lines().any(|l| l == line), "missing {line:?} in\n{body}");
    }
    // The refused child still serves its own clients.
    let mut local = Client::connect(&child).await;
    local.publish_acked(chunk(TEAM | 1, "kept locally")).await;
    witness.shutdown().await;
    child.shutdown().await;
    parent.shutdown().await;
}
