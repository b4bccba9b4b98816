//! Device setup, with real relays and real processes: time by subscription (`init --clock`),
//! and state sealed with a passphrase (right, wrong, missing).

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use canopy_sdk::{Chunk, Filter, Name};
use common::{Home, await_epoch, client, device, org, relay, status};

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

const CLOCK: &str = "0xc10c0000000000000000000000000000/64";
const HOUR: u64 = 3_600_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_with_a_clock_takes_its_time_from_the_subscription() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let origin = relay(&root.join("origin"), "127.0.0.1:0", None).await;
    let admin = org(root, &origin);

    // A tick as the `clock` plugin publishes it (its name ends in the time, its data is the
    // time as 8 big-endian bytes), an hour ahead of this machine's clock.
    let clock: Filter = CLOCK.parse().unwrap();
    let ahead = now_ms() + HOUR;
    let tick = Chunk::new(Name::new(clock.name().to_u128() | (u128::from(ahead) & !clock.mask())), now_ms() + 10 * 60_000, ahead.to_be_bytes().to_vec()).unwrap();
    let c = client(&origin).await;
    c.publish(tick).await.unwrap();

    assert!(Home::new(root, "bad").run(&["init", "--relay", "127.0.0.1:1", "--fingerprint", "00", "--domain", "example.com", "--org", "7", "--clock", "0xc10c/64"]).status.code() != Some(0));
    // A pinned fingerprint that is not one is refused at init, in one line, before anything is written.
    let typo = Home::new(root, "typo");
    let out = typo.run(&["init", "--relay", "127.0.0.1:1", "--fingerprint", "ab:cd", "--domain", "example.com", "--org", "7"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--fingerprint") && err.contains("64 hex digits") && err.trim().lines().count() == 1, "{err}");
    assert!(!root.join("typo").join("config.toml").exists());
    let a = Home::new(root, "a");
    a.init_with(&origin, &["--clock", CLOCK]);
    a.ok(&["up"]);
    let hkp = a.ok(&["device", "key-package"]);
    admin.ok(&["admin", "team", "add", "ops", &hkp]);
    let b = device(root, "b", &origin, &admin);
    await_epoch(&admin, &[&a, &b]);

    let source = common::eventually("a takes the clock's time", || {
        let s = status(&a)["secure"]["time_source"].as_str().unwrap_or_default().to_string();
        s.starts_with("clock").then_some(s)
    });
    assert_eq!(source, format!("clock {CLOCK}"));
    assert!(a.ok(&["status"]).contains(&format!("time source: clock {CLOCK}")));
    assert_eq!(status(&b)["secure"]["time_source"], "os");

    let before = now_ms();
    a.ok(&["send", "ops/general", "stamped by the clock"]);
    b.ok(&["send", "ops/general", "stamped by the os"]);
    a.await_text("ops/general", "stamped by the os");
    let after = now_ms();
    let sent = |text: &str| a.read("ops/general").into_iter().find(|m| m["text"] == text).unwrap()["sent_ms"].as_u64().unwrap();
    let by_clock = sent("stamped by the clock");
    // The clock's time is the tick's plus the time elapsed since it was received; the tick
    // waited in the relay's cache for a few seconds, which the clock does not see.
    assert!(by_clock > before + HOUR - 60_000 && by_clock <= after + HOUR, "{by_clock} not an hour after {before}..{after}");
    let by_os = sent("stamped by the os");
    assert!(by_os >= before && by_os <= after, "{by_os} not in {before}..{after}");
    // Channels are ordered by creation time: the clock's hour puts a's message last.
    let order: Vec<String> = a.read("ops/general").iter().map(|m| m["text"].as_str().unwrap().to_owned()).collect();
    assert_eq!(order, ["stamped by the os", "stamped by the clock"]);
    c.close();
}

/// The one line a failed command printed.
fn one_line(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "succeeded: {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_passphrase_seals_the_state_and_a_wrong_one_is_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let origin = relay(&root.join("origin"), "127.0.0.1:0", None).await;
    let admin = org(root, &origin);

    let a = Home::new(root, "a");
    std::fs::write(root.join("a.ca.pem"), origin.cert_pem()).unwrap();
    let addr = origin.local_addr().to_string();
    let a_ca = root.join("a.ca.pem");
    let init = ["init", "--relay", &addr, "--ca", a_ca.to_str().unwrap(), "--domain", "example.com", "--org", "7"];
    let out = a.run_with(&init, Some("correct horse"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("passphrase"));
    assert!(!a.dir.join("key").exists(), "no key file beside a passphrase");

    assert!(a.run_with(&["up"], Some("correct horse")).status.success());
    let out = a.run_with(&["device", "key-package"], Some("correct horse"));
    let hkp = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    admin.ok(&["admin", "team", "add", "ops", &hkp]);
    common::eventually("a joins ops", || a.ok(&["teams"]).contains("ops").then_some(()));
    a.ok(&["send", "ops/general", "sealed"]);
    a.ok(&["down"]);

    // Without a passphrase and without a terminal to ask on.
    let err = one_line(&a.run_with(&["up"], None));
    assert!(err.contains("CANOPY_MSG_PASSPHRASE"), "{err}");
    // The wrong one.
    let err = one_line(&a.run_with(&["up"], Some("wrong horse")));
    assert!(err.contains("wrong passphrase"), "{err}");
    assert!(common::pids(&a).iter().all(|p| std::fs::metadata(format!("/proc/{p}")).is_err()), "nothing left running");
    // The right one again: everything is there.
    assert!(a.run_with(&["up"], Some("correct horse")).status.success());
    assert_eq!(common::texts(&a), ["sealed"]);
    a.ok(&["down"]);

    // The admin's state (the member plugin's) is sealed the same way.
    let boss = Home::new(root, "boss");
    std::fs::write(root.join("boss.ca.pem"), origin.cert_pem()).unwrap();
    let mut init = init.to_vec();
    let ca = root.join("boss.ca.pem");
    init[4] = ca.to_str().unwrap();
    init[8] = "8";
    assert!(boss.run_with(&init, Some("admin pass")).status.success());
    assert!(boss.run_with(&["admin", "org", "init"], Some("admin pass")).status.success());
    let err = one_line(&boss.run_with(&["admin", "teams"], Some("not the admin pass")));
    assert!(err.contains("wrong passphrase"), "{err}");
    assert!(boss.run_with(&["admin", "teams"], Some("admin pass")).status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_team_keeps_the_lifetimes_its_admin_gave_it() {
    common::logs();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let origin = relay(&root.join("origin"), "127.0.0.1:0", None).await;
    let admin = org(root, &origin);

    for bad in [["--message-ttl", "10ms"], ["--commit-ttl", "soon"]] {
        let err = String::from_utf8(admin.run(&["admin", "team", "create", "brief", bad[0], bad[1]]).stderr).unwrap();
        assert!(err.contains(bad[0]) && err.trim().lines().count() <= 3, "{err}");
    }
    let started = now_ms();
    assert_eq!(admin.ok(&["admin", "team", "create", "brief", "--message-ttl", "2h", "--commit-ttl", "3h", "--welcome-ttl", "90m"]), "3");
    assert_eq!(admin.ok(&["admin", "channel", "create", "brief", "talk"]), "2");
    let a = Home::new(root, "a");
    a.init(&origin);
    a.ok(&["up"]);
    let hkp = a.ok(&["device", "key-package"]);
    admin.ok(&["admin", "team", "add", "brief", &hkp]);
    a.await_team("brief");
    a.ok(&["send", "brief/talk", "short-lived"]);

    // What the relay holds of team 3 expires as its record says, counted from when it was made.
    let org = canopy_msg_core::Org::new("example.com", 7).unwrap();
    let within = |c: &Chunk, ttl: u64| c.expiry() >= started + ttl && c.expiry() <= now_ms() + ttl;
    let lifetimes = common::eventually("a's message reaches the relay", || {
        let chunks = futures_block(common::cached(&origin));
        let of = |parsed: fn(&canopy_msg_core::names::Parsed) -> bool| -> Vec<Chunk> {
            chunks.iter().filter(|c| org.parse(c.name()).as_ref().is_some_and(parsed)).cloned().collect()
        };
        use canopy_msg_core::names::Parsed;
        let messages = of(|p| matches!(p, Parsed::Message { team: 3, .. }));
        let commits = of(|p| matches!(p, Parsed::Commit { team: 3, .. }));
        let welcomes = of(|p| matches!(p, Parsed::Welcome { .. }));
        (!messages.is_empty()).then_some((messages, commits, welcomes))
    });
    let (messages, commits, welcomes) = lifetimes;
    assert!(messages.iter().all(|c| within(c, 2 * HOUR)), "messages live 2h");
    assert!(!commits.is_empty() && commits.iter().all(|c| within(c, 3 * HOUR)), "commits live 3h");
    // Welcomes of team 3 live 90 minutes; team 2's (from `org`) have the 30-day default.
    assert!(welcomes.iter().any(|c| within(c, 90 * 60_000)), "a welcome lives 90m");
    a.ok(&["down"]);
}

/// Runs a future to completion from synchronous code inside the test's runtime.
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}
