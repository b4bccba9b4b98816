//! The `canopy` binary against an in-process relay.

mod common;

use std::process::{Command, Output};

use base64::Engine;
use common::*;

/// Runs the built `canopy` binary off the async runtime.
async fn canopy(args: Vec<String>) -> Output {
    within(
        "the canopy binary",
        tokio::task::spawn_blocking(move || Command::new(env!("CARGO_BIN_EXE_canopy")).args(&args).output()),
    )
    .await
    .unwrap()
    .expect("canopy runs")
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn cli_pub_then_sub_cached_json() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let ca = dir.path().join("relay-ca.pem");
    std::fs::write(&ca, relay.cert_pem()).unwrap();
    let addr = relay.local_addr().to_string();
    let ca = ca.to_str().unwrap().to_string();

    let schema = canopy_sdk::Schema::messenger();
    let by_fields = "team=5/channel=3/msg=2";
    let hex = schema.with(schema.parse_name(by_fields).unwrap(), "msg", 1).unwrap().to_string();
    for (name, data) in [(hex.as_str(), "one"), (by_fields, "two")] {
        let out = canopy(args(&["pub", "--relay", &addr, "--ca", &ca, "--ttl", "1h", name, data])).await;
        assert!(out.status.success(), "pub failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    let out = canopy(args(&[
        "sub", "--relay", &addr, "--ca", &ca, "origin=0/app=0/path=0/org=0/team=5/channel=3", "--mode", "cached", "--count", "2", "--json",
        "--timeout", "15s",
    ]))
    .await;
    assert!(out.status.success(), "sub failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let b64 = base64::engine::general_purpose::STANDARD;
    assert_eq!(lines[0]["name"], hex.as_str());
    assert_eq!(b64.decode(lines[0]["data"].as_str().unwrap()).unwrap(), b"one");
    assert_eq!(lines[1]["name"], schema.parse_name(by_fields).unwrap().to_string());
    assert_eq!(b64.decode(lines[1]["data"].as_str().unwrap()).unwrap(), b"two");
    let expiry = lines[0]["expiry"].as_u64().unwrap();
    assert!(expiry > canopy_sdk::now_ms() + 3_500_000, "{expiry}");

    // Plain output and the pinned fingerprint; `--mode cached` stops at the end of the replay.
    let out = canopy(args(&[
        "sub", "--relay", &addr, "--fingerprint", relay.fingerprint(), "origin=0/app=0/path=0/org=0/team=5/channel=3", "--mode", "cached",
    ]))
    .await;
    assert!(out.status.success(), "sub failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let words: Vec<Vec<&str>> = stdout.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(words.len(), 2, "{stdout}");
    assert_eq!((words[0][0], words[0][2]), (hex.as_str(), "one"));
    assert_eq!(words[1][2], "two");
    relay.shutdown().await;
}

#[tokio::test]
async fn cli_conflicting_pub_fails_with_the_relay_error() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let addr = relay.local_addr().to_string();
    let fp = relay.fingerprint().to_string();
    let pub_args =
        |data: &str| args(&["pub", "--relay", &addr, "--fingerprint", &fp, "0x0000000000000000000000000000002a", data]);
    let out = canopy(pub_args("first")).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = canopy(pub_args("second")).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.to_lowercase().contains("conflict"), "{stderr}");

    // A wrong fingerprint fails to connect.
    let wrong = canopy_sdk::fingerprint(b"nope");
    let out =
        canopy(args(&["pub", "--relay", &addr, "--fingerprint", &wrong, "0x0000000000000000000000000000002b", "x"]))
            .await;
    assert!(!out.status.success());
    relay.shutdown().await;
}

#[tokio::test]
async fn cli_pub_and_sub_over_tls_on_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let any = "127.0.0.1:0".parse().unwrap();
    let relay = relay_with_tcp(dir.path(), any, any, canopy_relay::StoreKind::Memory).await;
    let tcp = format!("tcp://{}", relay.tcp_addr().unwrap());
    let fp = relay.fingerprint().to_string();
    let name = "0x0000000000000000000000000000002c";
    let out = canopy(args(&["pub", "--relay", &tcp, "--fingerprint", &fp, name, "over tcp"])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = canopy(args(&["pub", "--relay", &tcp, "--fingerprint", &fp, name, "different"])).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).to_lowercase().contains("conflict"));
    let out = canopy(args(&["sub", "--relay", &tcp, "--fingerprint", &fp, &format!("{name}/128"), "--mode", "cached"])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().map(|l| l.split(' ').nth(2)).collect::<Vec<_>>(), vec![Some("over")], "{stdout}");
    // tcp:// to the QUIC port: nothing listens on TCP there; the error names the address as given.
    let wrong = format!("tcp://{}", relay.local_addr());
    let out = canopy(args(&["pub", "--relay", &wrong, "--fingerprint", &fp, name, "x"])).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&wrong), "{}", String::from_utf8_lossy(&out.stderr));
    relay.shutdown().await;
}

#[tokio::test]
async fn cli_stat_prints_the_relays_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let config = canopy_relay::RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        data: dir.path().to_path_buf(),
        store: canopy_relay::StoreKind::Memory,
        ..canopy_relay::RelayConfig::default()
    };
    let relay = canopy_relay::Relay::spawn(config).await.unwrap();
    let url = format!("http://{}/metrics", relay.metrics_addr().expect("metrics enabled"));
    let out = canopy(args(&["stat", "--metrics", &url])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(!stdout.trim().is_empty() && !stdout.contains("# "), "{stdout}");
    relay.shutdown().await;
}

#[tokio::test]
async fn cli_refuses_filter_and_name_text_it_would_have_to_guess() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let addr = relay.local_addr().to_string();
    let fp = relay.fingerprint().to_string();
    let team = "0x0a0b0000000000000000000000000000/16";
    // (text, what the one-line error must suggest)
    let cases = [
        ("sub", "0x0a0b/16", vec![team]),
        ("sub", "0x0a0b0000000000000000000000000000/8", vec![team, "0x0a000000000000000000000000000000/8"]),
        ("pub", "0x2a", vec!["0x0000000000000000000000000000002a", "0x2a000000000000000000000000000000"]),
    ];
    for (command, text, suggestions) in cases {
        let mut list = vec![command, "--relay", &addr, "--fingerprint", &fp, text];
        list.extend(if command == "sub" { ["--mode", "cached"] } else { ["--ttl", "1h"] });
        if command == "pub" {
            list.push("data");
        }
        let out = canopy(args(&list)).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command} {text} was accepted: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        for s in suggestions {
            assert!(stderr.contains(s), "{command} {text}: {stderr:?} should suggest {s}");
        }
    }
    // The 32-digit forms work.
    let out = canopy(args(&["sub", "--relay", &addr, "--fingerprint", &fp, team, "--mode", "cached"])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    relay.shutdown().await;
}

/// The first thing a new user tried: `canopy sub --mode cached` of a 20,000-chunk range. It
/// used to stop after about 2,300 chunks with `SlowConsumer`, however fast stdout was read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_sub_cached_prints_a_20000_chunk_range_whole() {
    const N: u128 = 20_000;
    let team: u128 = 0x0a0b << 112;
    let dir = tempfile::tempdir().unwrap();
    {
        use canopy::Store;
        let mut store = canopy::FjallStore::open(&dir.path().join("store"), u64::MAX).unwrap();
        let expiry = canopy_sdk::now_ms() + 3_600_000;
        for n in 0..N {
            let chunk = canopy_sdk::Chunk::new(canopy_sdk::Name::new(team | n), expiry, &b"x"[..]).unwrap();
            store.insert(&chunk).unwrap();
        }
        store.sync().unwrap();
    }
    let relay = relay_at(dir.path(), "127.0.0.1:0".parse().unwrap(), canopy_relay::StoreKind::Fjall).await;
    let ca = dir.path().join("relay-ca.pem");
    std::fs::write(&ca, relay.cert_pem()).unwrap();
    let out = canopy(args(&[
        "sub",
        "--relay",
        &relay.local_addr().to_string(),
        "--ca",
        ca.to_str().unwrap(),
        "0x0a0b0000000000000000000000000000/16",
        "--mode",
        "cached",
    ]))
    .await;
    assert!(out.status.success(), "sub failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), N as usize);
    relay.shutdown().await;
}
