//! A relay whose parent is found by DNS (`parent = "dns:DOMAIN"`), against an authoritative
//! DNS server started by the test on 127.0.0.1: it reaches the first origin front-end SRV
//! names, and when that one dies it moves to the second, renews its subscriptions there and
//! drains what it took meanwhile into it. Untrusted candidates are never used.

mod common;
#[path = "../../sdk/tests/support/dns.rs"]
mod dns;

use canopy::wire::ReplayMode;
use canopy_relay::RelayConfig;
use canopy_sdk::{Client, ConnectOptions, SubEvent, Trust};
use common::*;

async fn client(relay: &canopy_relay::RelayHandle) -> Client {
    Client::connect(ConnectOptions::new(relay.local_addr(), Trust::CaPem(relay.cert_pem().to_string()))).await.expect("a client connects")
}

/// The next chunk's data on `sub`, bounded.
async fn next_data(sub: &mut canopy_sdk::Subscription) -> String {
    loop {
        match tokio::time::timeout(WAIT, sub.next()).await.expect("a chunk in time") {
            Some(SubEvent::Chunk(c)) => return String::from_utf8(c.data().to_vec()).unwrap(),
            Some(_) => continue,
            None => panic!("the subscription ended"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_finds_its_parent_by_dns_and_moves_to_the_next_when_it_dies() {
    let dir = tempfile::tempdir().unwrap();
    let first = spawn(config(&dir.path().join("first"))).await;
    let second = spawn(config(&dir.path().join("second"))).await;
    let records = vec![
        dns::srv("_canopy-origin._udp.example.test.", 10, 0, first.local_addr().port(), "first.example.test."),
        dns::srv("_canopy-origin._udp.example.test.", 20, 0, second.local_addr().port(), "second.example.test."),
        dns::a("first.example.test."),
        dns::a("second.example.test."),
        dns::txt("first.example.test.", &format!("canopy-fp={}", first.fingerprint())),
        dns::txt("second.example.test.", &format!("canopy-fp={}", second.fingerprint())),
        // A cloud relay (this one) is listed too: a parent is looked for among the origin's
        // front-ends only, never here.
        dns::srv("_canopy-cloud._udp.example.test.", 0, 0, 1, "first.example.test."),
    ];
    let (server, _dns) = dns::dns("example.test.", records).await;

    // Without anything to trust the candidates by, the configuration is refused.
    let untrusted = RelayConfig { parent: Some("dns:example.test".into()), dns_server: Some(server), ..config(&dir.path().join("x")) };
    let err = canopy_relay::Relay::spawn(untrusted).await.err().expect("refused");
    assert!(format!("{err:#}").contains("parent_trust_dns"), "{err:#}");

    let cloud_config = RelayConfig { parent: Some("dns:example.test".into()), parent_trust_dns: true, dns_server: Some(server), ..config(&dir.path().join("cloud")) };
    let cloud = spawn(cloud_config).await;
    eventually("the cloud relay reaches the first origin", || cloud.metrics().parent_connected && first.metrics().links == 1).await;

    // A subscriber below, a publisher above: chunks flow down from the first origin.
    let below = client(&cloud).await;
    let mut sub = below.subscribe(canopy::Filter::ALL, ReplayMode::CachedAndLive).await.unwrap();
    let above_first = client(&first).await;
    above_first.publish(chunk(1, "from the first")).await.unwrap();
    assert_eq!(next_data(&mut sub).await, "from the first");

    // The first dies: the cloud relay moves to the second, and renews the subscription there.
    above_first.close();
    first.shutdown().await;
    // Published below while no parent is up: it waits in the cloud relay's outbox.
    below.publish(chunk(3, "while the parent was away")).await.unwrap();
    eventually("the cloud relay reaches the second origin", || cloud.metrics().parent_connected && second.metrics().subscriptions >= 1).await;
    let above_second = client(&second).await;
    above_second.publish(chunk(2, "from the second")).await.unwrap();
    assert_eq!(next_data(&mut sub).await, "from the second");
    // The outbox drained into the second, and what is published below now goes there too.
    below.publish(chunk(4, "from below")).await.unwrap();
    let mut up = above_second.subscribe(canopy::Filter::ALL, ReplayMode::CachedAndLive).await.unwrap();
    let mut seen = Vec::new();
    while !(seen.contains(&"from below".to_string()) && seen.contains(&"while the parent was away".to_string())) {
        seen.push(next_data(&mut up).await);
    }
    cloud.shutdown().await;
    second.shutdown().await;
}
