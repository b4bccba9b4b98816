//! Plugins loaded by a relay from its config: the echo plugin answers clients, and hostile
//! plugins are contained while everyone else's pub/sub keeps working.

mod common;


use canopy::Name;
use canopy::plugin::FaultKind;
use canopy::wire::ReplayMode;
use canopy_relay::{PluginConfig, PluginLimits, RelayConfig, RelayHandle};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "../../framework/tests/support/plugin_artifacts.rs"]
mod plugin_artifacts;
use plugin_artifacts::{native, wasm};

const REQUESTS: u128 = 0x0e01 << 112;
const REPLIES: u128 = 0x0e02 << 112;
const CONTROL: u128 = 0x0b01 << 112;
const STATUS: u128 = 0x0b02 << 112;
const OTHERS: u128 = 0x0c00 << 112;

fn hex(name: u128, len: u8) -> String {
    format!("{}/{len}", Name::new(name))
}

fn echo_plugin() -> PluginConfig {
    PluginConfig {
        file: wasm("echo"),
        name: None,
        kind: None,
        config: serde_json::json!({ "requests": hex(REQUESTS, 16), "replies": hex(REPLIES, 16) }),
        limits: PluginLimits::default(),
        dirs: Vec::new(),
        token: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_plugin_loaded_from_config_answers_a_client() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let relay = spawn(RelayConfig { plugins: vec![echo_plugin()], ..config(dir.path()) }).await;
    let mut client = Client::connect(&relay).await;
    client.subscribe(1, filter(&hex(REPLIES, 16)), ReplayMode::LiveOnly).await;
    client.publish_acked(chunk(REQUESTS | 7, "are you there?")).await;
    let answer = client.delivered_until(1, REPLIES | 7).await;
    assert_eq!(answer.last().unwrap().data().as_ref(), b"are you there?");
    assert_eq!(relay.plugin_command("echo", &["stats"]).await.unwrap(), Ok("answered 1".into()));
    assert_eq!(relay.plugin_stats("echo").unwrap().chunks_in, 1);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_with_a_broken_plugin_refuses_to_start() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let bad_config = PluginConfig { config: serde_json::json!({}), ..echo_plugin() };
    let err = canopy_relay::Relay::spawn(RelayConfig { plugins: vec![bad_config], ..config(dir.path()) })
        .await
        .err()
        .expect("echo without its filters cannot start");
    assert!(format!("{err:#}").contains("refused its configuration"), "{err:#}");
    let missing = PluginConfig { file: dir.path().join("nope.wasm"), ..echo_plugin() };
    let err = canopy_relay::Relay::spawn(RelayConfig { plugins: vec![missing], ..config(dir.path()) }).await.err().unwrap();
    assert!(format!("{err:#}").contains("nope.wasm"), "{err:#}");
}

/// A publisher and a subscriber with nothing to do with the plugin.
struct Bystanders {
    publisher: Client,
    subscriber: Client,
    next: u128,
}

impl Bystanders {
    async fn new(relay: &RelayHandle) -> Self {
        let mut subscriber = Client::connect(relay).await;
        subscriber.subscribe(1, filter(&hex(OTHERS, 16)), ReplayMode::LiveOnly).await;
        Bystanders { publisher: Client::connect(relay).await, subscriber, next: 0 }
    }

    /// One message through the relay, end to end.
    async fn still_served(&mut self) {
        self.next += 1;
        self.publisher.publish_acked(chunk(OTHERS | self.next, "business as usual")).await;
        let got = self.subscriber.delivered_until(1, OTHERS | self.next).await;
        assert_eq!(got.last().unwrap().name(), Name::new(OTHERS | self.next));
    }
}

/// Sends a command to the hostile plugin as a control chunk.
async fn control(client: &mut Client, seq: &mut u128, command: &str) {
    *seq += 1;
    client.publish_acked(chunk(CONTROL | *seq, command)).await;
}

/// Waits for the plugin's status chunk of boot `boots` and returns its text.
async fn status(watcher: &mut Client, boots: u128) -> String {
    let got = watcher.delivered_until(1, STATUS | boots).await;
    String::from_utf8(got.last().unwrap().data().to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugins_are_contained_and_everyone_else_keeps_working() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let hostile = PluginConfig {
        file: wasm("hostile"),
        config: serde_json::json!({ "control": hex(CONTROL, 16), "status": hex(STATUS, 16) }),
        limits: PluginLimits { deadline_ms: 50, memory_bytes: 16 << 20, ..PluginLimits::default() },
        ..echo_plugin()
    };
    let relay = spawn(RelayConfig {
        plugins: vec![hostile],
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..config(dir.path())
    })
    .await;
    let mut others = Bystanders::new(&relay).await;
    let mut watcher = Client::connect(&relay).await;
    // The first boot's status is published during `init`, before the relay serves anyone.
    let replayed = watcher.subscribe(1, filter(&hex(STATUS, 16)), ReplayMode::CachedAndLive).await;
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0].data().as_ref(), b"boots=1 counter=0");
    let mut admin = Client::connect(&relay).await;
    let mut seq = 0;
    others.still_served().await;

    // An infinite loop is interrupted at its deadline; the plugin comes back.
    control(&mut admin, &mut seq, "spin").await;
    assert_eq!(status(&mut watcher, 2).await, "boots=2 counter=0");
    assert_eq!(relay.plugin_stats("hostile").unwrap().last_fault, Some(FaultKind::Deadline));
    others.still_served().await;

    // An allocation bomb hits the memory limit.
    control(&mut admin, &mut seq, "bomb").await;
    assert_eq!(status(&mut watcher, 3).await, "boots=3 counter=0");
    assert_eq!(relay.plugin_stats("hostile").unwrap().last_fault, Some(FaultKind::Memory));
    others.still_served().await;

    // State survives a trap; the trapping callback's own write does not.
    for _ in 0..3 {
        control(&mut admin, &mut seq, "incr").await;
    }
    control(&mut admin, &mut seq, "incr-trap").await;
    assert_eq!(status(&mut watcher, 4).await, "boots=4 counter=3");
    assert_eq!(relay.plugin_stats("hostile").unwrap().last_fault, Some(FaultKind::Trap));
    assert_eq!(relay.plugin_command("hostile", &["get"]).await.unwrap(), Ok("3".into()));
    others.still_served().await;

    // A fourth failure restarts it once more; the fifth within the minute quarantines it.
    control(&mut admin, &mut seq, "trap").await;
    assert_eq!(status(&mut watcher, 5).await, "boots=5 counter=3");
    control(&mut admin, &mut seq, "trap").await;
    eventually("quarantine", || relay.plugin_stats("hostile").unwrap().quarantined).await;
    let stats = relay.plugin_stats("hostile").unwrap();
    assert_eq!((stats.failures, stats.restarts), (5, 4));
    let err = relay.plugin_command("hostile", &["hello"]).await.unwrap_err();
    assert!(format!("{err:#}").contains("quarantined"), "{err:#}");
    eventually("the quarantined plugin's subscription to go", || relay.metrics().subscriptions == 2).await;
    control(&mut admin, &mut seq, "spin").await;
    others.still_served().await;

    let mut stream = tokio::net::TcpStream::connect(relay.metrics_addr().unwrap()).await.unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    for line in [
        "canopy_plugin_quarantined{plugin=\"hostile\"} 1",
        "canopy_plugin_failures_total{plugin=\"hostile\"} 5",
        "canopy_plugin_restarts_total{plugin=\"hostile\"} 4",
    ] {
        assert!(body.lines().any(|l| l == line), "missing {line:?} in\n{body}");
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_plugin_serves_and_one_of_another_abi_is_refused() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let stale = PluginConfig { file: native("stale_abi"), name: Some("stale".into()), ..echo_plugin() };
    let err = canopy_relay::Relay::spawn(RelayConfig { plugins: vec![stale], ..config(dir.path()) }).await.err().unwrap();
    let text = format!("{err:#}");
    assert!(text.contains("ABI version 0") && text.contains("speaks version 1"), "{text}");

    let echo = PluginConfig { file: native("echo"), ..echo_plugin() };
    let relay = spawn(RelayConfig { plugins: vec![echo], ..config(dir.path()) }).await;
    let mut client = Client::connect(&relay).await;
    client.subscribe(1, filter(&hex(REPLIES, 16)), ReplayMode::LiveOnly).await;
    client.publish_acked(chunk(REQUESTS | 8, "native?")).await;
    let answer = client.delivered_until(1, REPLIES | 8).await;
    assert_eq!(answer.last().unwrap().data().as_ref(), b"native?");
    relay.shutdown().await;
}
