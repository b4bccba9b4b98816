//! Ordering, with real relays and real processes: a device that was away while the team moved
//! on gets the team's chunks back in the worst order a relay tree could deliver them (messages
//! before their commits, the newest commit first with its fragments reversed, and the commit
//! before it missing), then the missing commit later; and after a restart, everything again.
//!
//! The device is moved to a relay of its own, and the test carries chunks there from the
//! team's relay by hand, as a relay would, but in the order it chooses.

mod common;

use std::collections::HashSet;

use canopy_msg_core::names::{Org, Parsed};
use canopy_sdk::Chunk;
use common::{Home, await_epoch, cached, client, device, eventually, org, relay, status, team_status, texts};

const OPS: u32 = 2;

/// Copies `chunks` to `to`, in the order given, waiting for each acknowledgement.
async fn carry(to: &canopy_relay::RelayHandle, chunks: &[Chunk]) {
    let c = client(to).await;
    for chunk in chunks {
        c.publish(chunk.clone()).await.expect("the device's relay takes the chunk");
    }
    c.close();
}

/// Points a stopped home at another relay.
fn move_home(home: &Home, from: &canopy_relay::RelayHandle, to: &canopy_relay::RelayHandle) {
    let config = home.dir.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let moved = text.replace(&from.local_addr().to_string(), &to.local_addr().to_string());
    assert_ne!(text, moved, "the config names the relay");
    std::fs::write(&config, moved).unwrap();
    std::fs::write(home.dir.join("relay-ca.pem"), to.cert_pem()).unwrap();
}

fn epoch(home: &Home) -> u64 {
    home.await_team("ops")["epoch"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commits_out_of_order_and_late_are_applied_in_epoch_order_and_nothing_shows_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let team_relay = relay(&root.join("team-relay"), "127.0.0.1:0", None).await;
    let own_relay = relay(&root.join("own-relay"), "127.0.0.1:0", None).await;
    let names = Org::new("example.com", 7).unwrap();

    let admin = org(root, &team_relay);
    let d = device(root, "d", &team_relay, &admin);
    let e = device(root, "e", &team_relay, &admin);
    await_epoch(&admin, &[&d, &e]);
    e.ok(&["send", "ops/general", "m1"]);
    d.await_text("ops/general", "m1");
    let away_at = epoch(&d);

    // d goes away; the team adds two devices (two commits) and talks in each new epoch.
    d.ok(&["down"]);
    move_home(&d, &team_relay, &own_relay);
    let f = device(root, "f", &team_relay, &admin);
    await_epoch(&admin, &[&e, &f]);
    e.ok(&["send", "ops/general", "m2"]);
    let g = device(root, "g", &team_relay, &admin);
    await_epoch(&admin, &[&e, &f, &g]);
    e.ok(&["send", "ops/general", "m3"]);
    f.await_text("ops/general", "m3");
    let (missing, newest) = (away_at + 1, away_at + 2);
    assert_eq!(epoch(&e), newest);

    // What d's relay gets first: every message (including those of epochs d has not reached),
    // then the newest commit, fragments reversed; the commit before it is held back.
    let all = cached(&team_relay).await;
    let commit_of = |c: &Chunk| match names.parse(c.name()) {
        Some(Parsed::Commit { team: OPS, epoch, fragment }) => Some((epoch, fragment)),
        _ => None,
    };
    let mut held_back: Vec<Chunk> = all.iter().filter(|c| commit_of(c).is_some_and(|(ep, _)| ep == missing)).cloned().collect();
    let mut newest_commit: Vec<Chunk> = all.iter().filter(|c| commit_of(c).is_some_and(|(ep, _)| ep == newest)).cloned().collect();
    assert!(!held_back.is_empty() && !newest_commit.is_empty(), "both commits are on the team's relay");
    newest_commit.sort_by_key(|c| std::cmp::Reverse(commit_of(c)));
    held_back.sort_by_key(|c| std::cmp::Reverse(commit_of(c)));
    let rest: Vec<Chunk> = all.iter().filter(|c| commit_of(c).is_none_or(|(ep, _)| ep < missing)).cloned().collect();
    let messages_first = {
        let mut v = rest.clone();
        v.sort_by_key(|c| !matches!(names.parse(c.name()), Some(Parsed::Message { .. })));
        v
    };
    carry(&own_relay, &messages_first).await;
    carry(&own_relay, &newest_commit).await;

    // d comes back: it sees the gap, holds the newer epochs' messages, and shows nothing out
    // of order meanwhile.
    d.ok(&["up"]);
    let gap = eventually("d reports the missing commit", || {
        let t = team_status(&d);
        t["gap"].as_array().map(|g| (g[0].as_u64().unwrap(), g[1].as_u64().unwrap()))
    });
    assert_eq!(gap, (missing, missing));
    assert_eq!(epoch(&d), away_at, "no commit is applied across a gap");
    let s = status(&d);
    assert!(s["secure"]["held"].as_u64().unwrap() >= 1, "the newer epochs' messages are held: {s}");
    assert_eq!(texts(&d), ["m1"], "nothing from a future epoch is shown early");
    assert!(d.ok(&["status"]).contains("GAP: commits"), "the plain status says so too");

    // The missing commit turns up later (fragments reversed too): both commits apply in
    // order, and the held messages show, in the same order as everywhere else.
    carry(&own_relay, &held_back).await;
    d.await_text("ops/general", "m3");
    assert_eq!(epoch(&d), newest);
    assert!(team_status(&d)["gap"].is_null());
    assert_eq!(texts(&d), ["m1", "m2", "m3"]);
    assert_eq!(d.shared_view("ops/general"), e.shared_view("ops/general"));

    // Everything again: a restart replays the whole cache into Secure, and the team's relay
    // content is carried once more. Nothing shows twice and decryption goes on.
    d.ok(&["down"]);
    d.ok(&["up"]);
    carry(&own_relay, &all).await;
    eventually("d has caught up after the restart", || (texts(&d).len() == 3).then_some(()));
    let seen: HashSet<String> = all.iter().map(|c| c.name().to_string()).collect();
    e.ok(&["send", "ops/general", "m4"]);
    let fresh: Vec<Chunk> = cached(&team_relay).await.into_iter().filter(|c| !seen.contains(&c.name().to_string())).collect();
    assert!(!fresh.is_empty());
    // Delivered twice over two subscriptions' worth of the same names: once, then again.
    carry(&own_relay, &fresh).await;
    carry(&own_relay, &fresh).await;
    d.await_text("ops/general", "m4");
    assert_eq!(texts(&d), ["m1", "m2", "m3", "m4"]);
    assert_eq!(d.shared_view("ops/general"), e.shared_view("ops/general"));
    let s = status(&d);
    assert!(s["secure"]["duplicates"].as_u64().unwrap() > 0, "the replay was seen and dropped by name: {s}");
    assert_eq!(s["secure"]["rejected"].as_u64().unwrap(), 0, "{s}");

    // And d still sends in the current epoch, which the team reads.
    let id = d.ok(&["send", "ops/general", "d is back"]);
    assert!(id.starts_with("2/2/"), "{id}");
    let from_d: Vec<Chunk> = cached(&own_relay).await.into_iter().filter(|c| !seen.contains(&c.name().to_string())).collect();
    carry(&team_relay, &from_d).await;
    e.await_text("ops/general", "d is back");
    drop((f, g));
}
