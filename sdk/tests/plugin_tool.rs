//! `canopy plugin run`: the dump plugin's round trip between two relays, the echo plugin as a
//! relay's service and as a tool, and what a plugin may see of the file system.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

use canopy_relay::{PluginConfig, PluginLimits, RelayConfig, RelayHandle, StoreKind};
use canopy_sdk::{Chunk, Client, Filter, Name, ReplayMode, SubEvent};
use common::*;

#[path = "../../framework/tests/support/plugin_artifacts.rs"]
mod plugin_artifacts;
use plugin_artifacts::wasm;

const UNDER: u128 = 0x0d0d << 112;
const FILTER: &str = "0x0d0d0000000000000000000000000000/16";
const OUTSIDE: u128 = 0x0d0e << 112;

/// Runs the `canopy` binary off the async runtime (bounded: its own `--timeout` is 2 min).
async fn canopy(mut args: Vec<String>) -> Output {
    let dashes = args.iter().position(|a| a == "--").unwrap_or(args.len());
    args.splice(dashes..dashes, ["--timeout".to_owned(), "40s".to_owned()]);
    tokio::task::spawn_blocking(move || Command::new(env!("CARGO_BIN_EXE_canopy")).args(&args).output())
        .await
        .unwrap()
        .expect("canopy runs")
}

/// `canopy plugin run FILE --relay … --ca … EXTRA… -- ARGS…`
async fn plugin_run(relay: &RelayHandle, dir: &Path, file: &Path, extra: &[&str], args: &[&str]) -> Output {
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, relay.cert_pem()).unwrap();
    let mut all = vec![
        "plugin".to_owned(),
        "run".to_owned(),
        file.display().to_string(),
        "--relay".to_owned(),
        relay.local_addr().to_string(),
        "--ca".to_owned(),
        ca.display().to_string(),
        "--cache".to_owned(),
        dir.join("cache").display().to_string(),
    ];
    all.extend(extra.iter().map(|s| s.to_string()));
    all.push("--".to_owned());
    all.extend(args.iter().map(|s| s.to_string()));
    canopy(all).await
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Publishes `chunks` with up to 500 publishes in flight.
async fn publish_all(client: &Client, chunks: &[Chunk]) {
    for batch in chunks.chunks(500) {
        let mut pending = tokio::task::JoinSet::new();
        for chunk in batch {
            let client = client.clone();
            let chunk = chunk.clone();
            pending.spawn(async move { client.publish(chunk).await });
        }
        while let Some(result) = pending.join_next().await {
            result.unwrap().unwrap();
        }
    }
}

/// Every cached chunk under `filter`, as (name, expiry, data).
async fn cached(relay: &RelayHandle, filter: Filter) -> BTreeSet<(Name, u64, Vec<u8>)> {
    // The replay arrives in bursts larger than the default event buffer.
    let opts = canopy_sdk::ConnectOptions { subscription_buffer: 1 << 16, ..options(relay) };
    let client = within("connecting", Client::connect(opts)).await.unwrap();
    let mut sub = client.subscribe(filter, ReplayMode::CachedOnly).await.unwrap();
    let mut seen = BTreeSet::new();
    loop {
        match next(&mut sub).await {
            SubEvent::Chunk(c) => {
                seen.insert((c.name(), c.expiry(), c.data().to_vec()));
            }
            SubEvent::ReplayDone => return seen,
            SubEvent::Gap => {}
            SubEvent::Error { code, message } => panic!("{code}: {message}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_and_undump_carry_a_subtree_between_relays_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let a = relay_at(&dir.path().join("a"), "127.0.0.1:0".parse().unwrap(), StoreKind::Fjall).await;
    let now = canopy_sdk::now_ms();
    let inside: Vec<Chunk> = (0..10_000u128)
        .map(|i| {
            let data: Vec<u8> = (0..(i % 1025) as usize).map(|b| (b as u128 ^ i) as u8).collect();
            Chunk::new(Name::new(UNDER | i << 40 | i), now + 3_600_000 + i as u64, data).unwrap()
        })
        .collect();
    let outside: Vec<Chunk> = (0..100u128).map(|i| chunk(OUTSIDE | i, "not under the filter")).collect();
    let publisher = client(&a).await;
    publish_all(&publisher, &inside).await;
    publish_all(&publisher, &outside).await;

    let out_dir = dir.path().join("dump");
    std::fs::create_dir(&out_dir).unwrap();
    let grant = out_dir.display().to_string();
    let dump = wasm("dump");
    let out = plugin_run(&a, dir.path(), &dump, &["--dir", &grant], &["dump", FILTER, &grant]).await;
    assert!(out.status.success(), "dump failed: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), format!("dumped 10000 chunks under {FILTER} to {grant}"));
    assert!(text(&out.stderr).contains("10000 chunks in"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 10_000);

    // A second dump into the now non-empty directory is refused, unless forced.
    let out = plugin_run(&a, dir.path(), &dump, &["--dir", &grant], &["dump", FILTER, &grant]).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("not empty"), "{}", text(&out.stderr));
    let out = plugin_run(&a, dir.path(), &dump, &["--dir", &grant], &["dump", FILTER, &grant, "--force"]).await;
    assert!(out.status.success(), "forced dump failed: {}", text(&out.stderr));

    // One more file, already expired: undump skips it.
    let mut stale = b"CNPYCHK1".to_vec();
    stale.extend_from_slice(&(UNDER | 0xffff_ffff).to_be_bytes());
    stale.extend_from_slice(&(now - 1_000).to_be_bytes());
    stale.extend_from_slice(b"gone");
    std::fs::write(out_dir.join("0x0d0d00000000000000000000ffffffff.chunk"), stale).unwrap();

    let b = relay_at(&dir.path().join("b"), "127.0.0.1:0".parse().unwrap(), StoreKind::Fjall).await;
    let out = plugin_run(&b, dir.path(), &dump, &["--dir", &grant], &["undump", &grant]).await;
    assert!(out.status.success(), "undump failed: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "published 10000 chunks, skipped 1 expired, 0 unreadable");

    let expected: BTreeSet<_> = inside.iter().map(|c| (c.name(), c.expiry(), c.data().to_vec())).collect();
    assert_eq!(cached(&b, FILTER.parse().unwrap()).await, expected);
    assert_eq!(cached(&b, Filter::ALL).await.len(), 10_000, "nothing from outside the filter");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_sees_no_directory_it_was_not_granted() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(&dir.path().join("relay")).await;
    let secret = dir.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    std::fs::write(secret.join("file.chunk"), b"CNPYCHK1").unwrap();
    let other = dir.path().join("granted");
    std::fs::create_dir(&other).unwrap();
    let target = secret.display().to_string();
    let out =
        plugin_run(&relay, dir.path(), &wasm("dump"), &["--dir", &other.display().to_string()], &["undump", &target])
            .await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("was it granted with --dir?"), "{}", text(&out.stderr));
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_echo_wasm_serves_in_a_relay_and_asks_as_a_tool() {
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "requests": "0x0e010000000000000000000000000000/16",
        "replies": "0x0e020000000000000000000000000000/16",
    });
    let echo = PluginConfig {
        file: wasm("echo"),
        name: None,
        kind: None,
        config: config.clone(),
        limits: PluginLimits::default(),
        dirs: Vec::new(),
        token: None,
        dead_letter: None,
    };
    let relay = canopy_relay::Relay::spawn(RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data: dir.path().join("relay"),
        store: StoreKind::Memory,
        plugins: vec![echo],
        ..RelayConfig::default()
    })
    .await
    .unwrap();
    let config = config.to_string();
    let out =
        plugin_run(&relay, dir.path(), &wasm("echo"), &["--config", &config], &["request", "hello, plugin"]).await;
    assert!(out.status.success(), "echo tool failed: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "hello, plugin");
    assert_eq!(relay.plugin_command("echo", &["stats"]).await.unwrap(), Ok("answered 1".into()));

    // A tool whose plugin returns an error exits non-zero with the plugin's message.
    let out = plugin_run(&relay, dir.path(), &wasm("echo"), &["--config", &config], &["bogus"]).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("usage: request TEXT | stats"), "{}", text(&out.stderr));
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_creates_its_directory_whether_its_parent_or_itself_is_granted() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(&dir.path().join("relay")).await;
    let publisher = client(&relay).await;
    let chunks: Vec<Chunk> = (0..3u128).map(|i| chunk(UNDER | i, "to be dumped")).collect();
    publish_all(&publisher, &chunks).await;
    let dump = wasm("dump");

    // The parent is granted: the plugin creates DIR inside it.
    let parent = dir.path().join("exports");
    std::fs::create_dir(&parent).unwrap();
    let inside = parent.join("today").display().to_string();
    let out =
        plugin_run(&relay, dir.path(), &dump, &["--dir", &parent.display().to_string()], &["dump", FILTER, &inside])
            .await;
    assert!(out.status.success(), "dump into a new directory under the granted one failed: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), format!("dumped 3 chunks under {FILTER} to {inside}"));
    assert_eq!(std::fs::read_dir(&inside).unwrap().count(), 3);

    // DIR itself is granted but does not exist yet: the tool creates it before granting it.
    let granted = dir.path().join("fresh").join("export").display().to_string();
    let out = plugin_run(&relay, dir.path(), &dump, &["--dir", &granted], &["dump", FILTER, &granted]).await;
    assert!(out.status.success(), "dump into a granted directory that did not exist failed: {}", text(&out.stderr));
    assert_eq!(std::fs::read_dir(&granted).unwrap().count(), 3);

    // Still refused once it holds something, unless forced.
    let out = plugin_run(&relay, dir.path(), &dump, &["--dir", &granted], &["dump", FILTER, &granted]).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("not empty"), "{}", text(&out.stderr));
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_run_isolates_a_poison_chunk_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(&dir.path().join("relay")).await;
    let publisher = client(&relay).await;
    const CONTROL: u128 = 0x0a0a << 112;
    let commands = ["incr", "incr", "trap", "incr"];
    let chunks: Vec<Chunk> = commands.iter().zip(1u128..).map(|(c, i)| chunk(CONTROL | i, c)).collect();
    for c in &chunks {
        publisher.publish(c.clone()).await.unwrap();
    }
    let hostile = wasm("hostile");
    let state = dir.path().join("state").display().to_string();
    let config = serde_json::json!({ "control": "0x0a0a0000000000000000000000000000/16" }).to_string();
    // The replay reaches the plugin in batches formed by chance; however they fall, the
    // run ends at the poison chunk, named, after the chunks before it were taken.
    let out = plugin_run(&relay, dir.path(), &hostile, &["--config", &config, "--state", &state], &["get"]).await;
    assert!(!out.status.success());
    let poison = chunks[2].name().to_string();
    assert!(text(&out.stderr).contains(&format!("on chunk {poison}")), "{}", text(&out.stderr));
    let out = plugin_run(&relay, dir.path(), &hostile, &["--state", &state], &["get"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "2");
    relay.shutdown().await;
}
