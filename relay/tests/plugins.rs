//! Plugins loaded by a relay from its config: the echo plugin answers clients, and hostile
//! plugins are contained while everyone else's pub/sub keeps working.

mod common;

use std::time::Duration;

use canopy::Name;
use canopy::plugin::FaultKind;
use canopy::wire::{Frame, ReplayMode};
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
const DEAD: u128 = 0x0dea << 112;

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
        dead_letter: None,
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
    let err =
        canopy_relay::Relay::spawn(RelayConfig { plugins: vec![missing], ..config(dir.path()) }).await.err().unwrap();
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

/// Waits for the plugin's next status chunk that shows `counter` and returns its text.
async fn status_with(watcher: &mut Client, counter: u64) -> String {
    let suffix = format!(" counter={counter}");
    let got = watcher
        .recv_until(|f| matches!(f, Frame::Deliver { id: 1, chunk } if chunk.data().ends_with(suffix.as_bytes())))
        .await;
    match got.last() {
        Some(Frame::Deliver { chunk, .. }) => String::from_utf8(chunk.data().to_vec()).unwrap(),
        _ => unreachable!(),
    }
}

/// Sends `commands` as control chunks; with `coalesced`, the relay hands them to the plugin
/// in one `on-chunks` call, else they arrive as they come (one per call, or batched by
/// chance when the plugin is slower than the publisher).
async fn controls(relay: &RelayHandle, admin: &mut Client, seq: &mut u128, coalesced: bool, commands: &[&str]) {
    if coalesced {
        assert!(relay.plugin_hold_chunks("hostile", commands.len()));
    }
    for command in commands {
        control(admin, seq, command).await;
    }
}

/// Asks the hostile plugin for its counter until it reads `expected` (bounded).
async fn counter_reaches(relay: &RelayHandle, expected: &str) {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if relay.plugin_command("hostile", &["get"]).await.unwrap() == Ok(expected.to_owned()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the counter never read {expected}"));
}

fn hostile_plugin() -> PluginConfig {
    PluginConfig {
        file: wasm("hostile"),
        config: serde_json::json!({ "control": hex(CONTROL, 16), "status": hex(STATUS, 16) }),
        // The deadline is far above what the allocation bomb needs to hit the memory limit,
        // even on a loaded machine, so that its fault is `Memory`, never `Deadline`.
        limits: PluginLimits { deadline_ms: 1000, memory_bytes: 16 << 20, ..PluginLimits::default() },
        ..echo_plugin()
    }
}

async fn metrics_text(relay: &RelayHandle) -> String {
    let mut stream = tokio::net::TcpStream::connect(relay.metrics_addr().unwrap()).await.unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

fn assert_metrics(body: &str, lines: &[String]) {
    for line in lines {
        assert!(body.lines().any(|l| l == line), "missing {line:?} in\n{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugins_are_contained_and_everyone_else_keeps_working() {
    hostile_suite(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugins_are_contained_when_their_chunks_come_in_one_batch() {
    hostile_suite(true).await;
}

/// The hostile plugin's failures, each contained, up to its quarantine. A chunk the plugin
/// fails on alone costs one failure toward quarantine however it was batched, so the
/// failure counts are the same whether the relay batches chunks by chance (`coalesced`
/// false) or by request; only restarts differ, one more per isolated batch.
async fn hostile_suite(coalesced: bool) {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let relay = spawn(RelayConfig {
        plugins: vec![hostile_plugin()],
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
    assert_eq!(status_with(&mut watcher, 0).await, "boots=2 counter=0");
    assert_eq!(relay.plugin_stats("hostile").unwrap().last_fault, Some(FaultKind::Deadline));
    others.still_served().await;

    // An allocation bomb hits the memory limit.
    control(&mut admin, &mut seq, "bomb").await;
    assert_eq!(status_with(&mut watcher, 0).await, "boots=3 counter=0");
    assert_eq!(relay.plugin_stats("hostile").unwrap().last_fault, Some(FaultKind::Memory));
    others.still_served().await;

    // State survives a trap; the trapping callback's own write does not. Increments that
    // shared a batch with the trap are delivered again, one per call, and stick.
    controls(&relay, &mut admin, &mut seq, coalesced, &["incr", "incr", "incr", "incr-trap"]).await;
    let status = status_with(&mut watcher, 3).await;
    // Counters are updated before what the plugin published goes out.
    let stats = relay.plugin_stats("hostile").unwrap();
    let isolated = stats.batches_isolated;
    assert_eq!(status, format!("boots={} counter=3", 4 + isolated));
    assert_eq!((stats.last_fault, stats.chunks_poisoned, stats.failures), (Some(FaultKind::Trap), 3, 3));
    if coalesced {
        assert_eq!(isolated, 1);
    }
    assert_eq!(relay.plugin_command("hostile", &["get"]).await.unwrap(), Ok("3".into()));
    others.still_served().await;

    // A fourth failure restarts it once more; the fifth within the minute quarantines it.
    if coalesced {
        controls(&relay, &mut admin, &mut seq, true, &["trap", "trap"]).await;
    } else {
        control(&mut admin, &mut seq, "trap").await;
        let status = status_with(&mut watcher, 3).await;
        let isolated = relay.plugin_stats("hostile").unwrap().batches_isolated;
        assert_eq!(status, format!("boots={} counter=3", 5 + isolated));
        control(&mut admin, &mut seq, "trap").await;
    }
    eventually("quarantine", || relay.plugin_stats("hostile").unwrap().quarantined).await;
    let stats = relay.plugin_stats("hostile").unwrap();
    assert_eq!((stats.failures, stats.chunks_poisoned, stats.chunks_dropped), (5, 5, 0));
    assert_eq!(stats.restarts, 4 + stats.batches_isolated, "{stats:?}");
    if coalesced {
        assert_eq!(stats.batches_isolated, 2);
    }
    let err = relay.plugin_command("hostile", &["hello"]).await.unwrap_err();
    assert!(format!("{err:#}").contains("quarantined"), "{err:#}");
    eventually("the quarantined plugin's subscription to go", || relay.metrics().subscriptions == 2).await;
    control(&mut admin, &mut seq, "spin").await;
    others.still_served().await;

    let body = metrics_text(&relay).await;
    assert_metrics(
        &body,
        &[
            "canopy_plugin_quarantined{plugin=\"hostile\"} 1".to_owned(),
            "canopy_plugin_failures_total{plugin=\"hostile\"} 5".to_owned(),
            format!("canopy_plugin_restarts_total{{plugin=\"hostile\"}} {}", stats.restarts),
            "canopy_plugin_chunks_poisoned_total{plugin=\"hostile\"} 5".to_owned(),
            format!("canopy_plugin_batches_isolated_total{{plugin=\"hostile\"}} {}", stats.batches_isolated),
        ],
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_chunk_loses_only_itself_and_is_dead_lettered() {
    poison_chunk(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_chunk_in_a_batch_loses_only_itself_and_is_dead_lettered() {
    poison_chunk(true).await;
}

/// Good chunks around a poison one, delivered as they come or in one batch: only the poison
/// chunk is lost, and it is published under the dead-letter filter.
async fn poison_chunk(coalesced: bool) {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let dead = filter(&hex(DEAD, 16));
    let relay = spawn(RelayConfig {
        plugins: vec![PluginConfig { dead_letter: Some(hex(DEAD, 16)), ..hostile_plugin() }],
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..config(dir.path())
    })
    .await;
    let mut letters = Client::connect(&relay).await;
    letters.subscribe(1, dead, ReplayMode::LiveOnly).await;
    let mut admin = Client::connect(&relay).await;
    let mut seq = 0;
    controls(&relay, &mut admin, &mut seq, coalesced, &["incr", "incr", "trap", "incr", "incr"]).await;
    counter_reaches(&relay, "4").await;
    let stats = relay.plugin_stats("hostile").unwrap();
    assert_eq!((stats.chunks_poisoned, stats.failures, stats.chunks_dropped, stats.quarantined), (1, 1, 0, false));
    if coalesced {
        assert_eq!((stats.batches_isolated, stats.restarts), (1, 2));
    }

    let got = letters.recv_until(|f| matches!(f, Frame::Deliver { id: 1, .. })).await;
    let Some(Frame::Deliver { chunk: letter, .. }) = got.last() else { unreachable!() };
    // The poisoned chunk, as published: the dead letter keeps its expiry.
    let poison = canopy::Chunk::new(Name::new(CONTROL | 3), letter.expiry(), &b"trap"[..]).unwrap();
    assert_eq!(*letter, canopy::plugin::dead_letter(dead, &poison));
    assert_eq!(&letter.data()[..16], &poison.name().to_bytes());
    assert_eq!(&letter.data()[16..], b"trap");
    assert_metrics(
        &metrics_text(&relay).await,
        &["canopy_plugin_chunks_poisoned_total{plugin=\"hostile\"} 1".to_owned()],
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_callback_past_its_deadline_quarantines_the_plugin_and_shutdown_does_not_wait() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let sink = PluginConfig {
        file: native("sink"),
        config: serde_json::json!({ "under": hex(REQUESTS, 16) }),
        // Generous, so that a loaded machine never makes an ordinary callback overrun it.
        limits: PluginLimits { deadline_ms: 500, ..PluginLimits::default() },
        ..echo_plugin()
    };
    let relay = spawn(RelayConfig { plugins: vec![sink], ..config(dir.path()) }).await;
    let mut others = Bystanders::new(&relay).await;
    eventually("the plugin's subscription", || relay.metrics().subscriptions == 2).await;

    // `hang` sleeps forever in native code: the watchdog gives up on it, and the command
    // stuck inside it fails.
    let (answer, ()) = tokio::join!(
        relay.plugin_command("sink", &["hang"]),
        eventually("the watchdog's quarantine", || relay.plugin_stats("sink").unwrap().quarantined),
    );
    let err = answer.unwrap_err();
    assert!(format!("{err:#}").contains("quarantined"), "{err:#}");
    let stats = relay.plugin_stats("sink").unwrap();
    assert_eq!((stats.failures, stats.last_fault), (1, Some(FaultKind::Deadline)));
    eventually("the plugin's subscription to go", || relay.metrics().subscriptions == 1).await;
    let err = relay.plugin_command("sink", &["count"]).await.unwrap_err();
    assert!(format!("{err:#}").contains("quarantined"), "{err:#}");
    others.still_served().await;

    // The plugin's thread is still asleep; shutdown does not wait for it.
    tokio::time::timeout(Duration::from_secs(60), relay.shutdown()).await.expect("shutdown completes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_plugin_serves_and_one_of_another_abi_is_refused() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let stale = PluginConfig { file: native("stale_abi"), name: Some("stale".into()), ..echo_plugin() };
    let err =
        canopy_relay::Relay::spawn(RelayConfig { plugins: vec![stale], ..config(dir.path()) }).await.err().unwrap();
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
