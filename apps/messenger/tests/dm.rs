//! Direct messages through the CLI, with real relays and real processes: users of two
//! orgs, a peer that is offline when the conversation starts, contact names as addresses,
//! and simultaneous starts on both sides of a partition that converge on one conversation.

mod common;

use common::{Home, eventually, relay};

fn texts(home: &Home, conversation: &str) -> Vec<String> {
    home.read(conversation).iter().map(|m| m["text"].as_str().unwrap().to_string()).collect()
}

/// Waits until `home` shows `text` in `conversation`, sent (not pending).
fn await_sent(home: &Home, conversation: &str, text: &str) -> serde_json::Value {
    eventually(&format!("{} shows {text:?} in {conversation}, sent", home.dir.display()), || {
        home.read(conversation).into_iter().find(|m| m["text"] == text && m["pending"] == false)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dm_across_orgs_reaches_a_peer_that_was_offline_when_it_started() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = relay(&tmp.path().join("origin"), "127.0.0.1:0", None).await;
    let a = Home::new(tmp.path(), "a");
    let b = Home::new(tmp.path(), "b");
    a.init_org(&origin, 7);
    b.init_org(&origin, 8);
    // b is up once (which publishes its key package), then gone.
    b.ok(&["up"]);
    let idb = b.user();
    eventually("b's key package reaches the relay", || {
        let c = tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(common::cached(&origin)));
        c.iter().any(|c| canopy_msg_core::names::Users::parse(c.name()).is_some()).then_some(())
    });
    b.ok(&["down"]);

    a.ok(&["up"]);
    let ida = a.user();
    let first = a.ok(&["dm", &idb, "hello b, are you there?"]);
    assert!(first.starts_with('c') || first.starts_with("pending/"), "{first}");
    let sent = await_sent(&a, &format!("dm:{idb}"), "hello b, are you there?");
    assert!(sent["id"].as_str().unwrap().starts_with('c'), "{sent}");
    assert_eq!(sent["conversation"], format!("dm:{idb}"));

    // b comes back: the welcome and the message waited in the relay's cache.
    b.ok(&["up"]);
    b.await_text(&format!("dm:{ida}"), "hello b, are you there?");
    let got = &b.read(&format!("dm:{ida}"))[0];
    assert_eq!(got["user"], ida.as_str());
    assert_eq!(got["from"], &ida[..8]);
    b.ok(&["contact", "add", &ida, "alice"]);
    assert_eq!(b.read("dm:alice")[0]["from"], "alice", "a contact name works as the address");
    b.ok(&["send", "dm:alice", "yes, here", "--reply-to", got["id"].as_str().unwrap()]);
    a.await_text(&format!("dm:{idb}"), "yes, here");
    assert_eq!(a.shared_view(&format!("dm:{idb}")), b.shared_view(&format!("dm:{ida}")), "one conversation, the same on both");
    assert_eq!(texts(&a, &format!("dm:{idb}")), vec!["hello b, are you there?", "yes, here"]);
    let status = common::status(&a);
    assert_eq!(status["secure"]["conversations"].as_array().unwrap().len(), 1, "{status}");

    // Errors are one line.
    assert!(a.fails(&["dm", "nobody", "x"]).contains("neither a user id"));
    assert!(a.fails(&["dm", &ida, "x"]).contains("someone else"));
    assert!(a.fails(&["read", "group:x"]).contains("no group"));
    common::assert_ciphertext_only(&origin, &["hello b", "yes, here"]).await;
    origin.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simultaneous_starts_on_both_sides_of_a_partition_converge_on_one_conversation() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // a and b each behind a cloud relay of their own, both under the origin.
    let origin = relay(&root.join("origin"), "127.0.0.1:0", None).await;
    let origin_addr = origin.local_addr().to_string();
    let cloud_a = relay(&root.join("cloud-a"), "127.0.0.1:0", Some(&origin)).await;
    let cloud_b = relay(&root.join("cloud-b"), "127.0.0.1:0", Some(&origin)).await;
    let a = Home::new(root, "a");
    let b = Home::new(root, "b");
    a.init_org(&cloud_a, 7);
    b.init_org(&cloud_b, 8);
    a.ok(&["up"]);
    b.ok(&["up"]);
    let (ida, idb) = (a.user(), b.user());
    // Each names the other, so each knows the other's device before the partition.
    a.ok(&["contact", "add", &idb, "bob"]);
    b.ok(&["contact", "add", &ida, "alice"]);
    for (home, peer) in [(&a, "bob"), (&b, "alice")] {
        eventually(&format!("{} knows a device of {peer}", home.dir.display()), || {
            home.ok(&["contacts", "--json"]).lines().any(|l| l.contains(peer) && l.contains("\"devices\":1")).then_some(())
        });
    }

    // The partition: the origin is gone, and the two clouds keep what they take in their
    // outboxes. Both start, and each writes.
    origin.kill().await;
    a.ok(&["dm", "bob", "a, on my side"]);
    b.ok(&["dm", "alice", "b, on mine"]);
    await_sent(&a, "dm:bob", "a, on my side");
    await_sent(&b, "dm:alice", "b, on mine");

    // Healed: the origin is back on its address, from its store.
    let origin = relay(&root.join("origin"), &origin_addr, None).await;
    for (home, peer) in [(&a, "dm:bob"), (&b, "dm:alice")] {
        for t in ["a, on my side", "b, on mine"] {
            home.await_text(peer, t);
        }
    }
    let convs = |h: &Home| -> usize { common::status(h)["secure"]["conversations"].as_array().unwrap().len() };
    eventually("both are in both conversations", || (convs(&a) == 2 && convs(&b) == 2).then_some(()));
    // What each sends now goes to the same one.
    let next_a = a.ok(&["dm", "bob", "together now"]);
    let next_b = b.ok(&["dm", "alice", "yes, together"]);
    let conv = |id: &str| id.split('/').next().unwrap().to_string();
    assert_eq!(conv(&next_a), conv(&next_b), "{next_a} and {next_b}");
    a.await_text("dm:bob", "yes, together");
    b.await_text("dm:alice", "together now");
    assert_eq!(a.shared_view("dm:bob").len(), 4);
    assert_eq!(texts(&a, "dm:bob"), texts(&b, "dm:alice"));
    for r in [&origin, &cloud_a, &cloud_b] {
        common::assert_ciphertext_only(r, &["on my side", "on mine", "together"]).await;
    }
    origin.shutdown().await;
}

/// The fragment byte of `name` if it is in a users' key package space.
fn kp_fragment(name: canopy::Name) -> Option<u16> {
    matches!(canopy_msg_core::names::Users::parse(name), Some(canopy_msg_core::names::ParsedUser::KeyPackage { .. })).then_some((name.to_u128() & 0xff) as u16)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_users_one_time_key_packages_run_out_the_last_resort_one_serves_and_its_device_answers_the_request() {
    use canopy_msg_core::device::Device;
    use canopy_msg_core::payload::ConvKind;
    use canopy_msg_core::supply::{CLAIM_FRAGMENT, ONE_TIME, REQUEST_FRAGMENT};
    use canopy_msg_core::{Key, MemoryBackend, Org};

    let tmp = tempfile::tempdir().unwrap();
    let origin = relay(&tmp.path().join("origin"), "127.0.0.1:0", None).await;
    let b = Home::new(tmp.path(), "b");
    b.init_org(&origin, 8);
    b.ok(&["up"]);
    let idb = canopy_msg_core::UserId::parse(&b.user()).unwrap();
    let supply = |home: &Home| common::status(home)["secure"]["key_packages"].clone();
    eventually("b publishes one-time and last-resort key packages", || {
        let s = supply(&b);
        (s["one_time"] == ONE_TIME && s["last_resort"] == 1).then_some(())
    });

    // b goes offline (online, it would replace each claimed key package at once). Users
    // running the core in this process start conversations with b, one after another, each
    // after seeing the claims before it.
    b.ok(&["down"]);
    let client = common::client(&origin).await;
    let mut convs = Vec::new();
    for (i, org) in (9..).take(ONE_TIME + 1).enumerate() {
        let mut c = Device::open(Key::random(), MemoryBackend::default(), Org::new("example.com", org).unwrap()).unwrap();
        let claims_before = i;
        common::catch_up(&mut c, &origin, "b's key packages and the claims so far", |c| {
            (c.key_packages_of(&idb).next().is_some() && c.claimed_count() >= claims_before).then_some(())
        })
        .await;
        let (conv, out) = c.start_conv(ConvKind::Dm, "", &[idb].into(), canopy_sdk::now_ms()).unwrap();
        let claims = out.iter().filter(|o| kp_fragment(o.name) == Some(CLAIM_FRAGMENT)).count();
        let requests = out.iter().filter(|o| kp_fragment(o.name) == Some(REQUEST_FRAGMENT)).count();
        if i < ONE_TIME {
            assert_eq!((claims, requests), (1, 0), "start {i} takes a one-time key package");
        } else {
            assert_eq!((claims, requests), (0, 1), "all claimed: the last-resort one serves, and b is asked for more");
        }
        common::publish(&client, out).await;
        convs.push(conv.to_string());
    }

    // b comes back and answers: it joins all four, and publishes fresh one-time key packages.
    b.ok(&["up"]);
    eventually("b joins every conversation", || (common::status(&b)["secure"]["conversations"].as_array().unwrap().len() == convs.len()).then_some(()));
    let s = eventually("b answers the request", || {
        let st = common::status(&b)["secure"].clone();
        (st["requests"] == 1 && st["key_packages"]["one_time"] == ONE_TIME).then_some(st)
    });
    assert_eq!(s["key_packages"]["used"], ONE_TIME, "the welcomed ones wait out their grace period: {s}");
    let cached = common::cached(&origin).await;
    let whole: std::collections::BTreeSet<u128> = cached.iter().filter(|c| kp_fragment(c.name()) == Some(0)).map(|c| c.name().to_u128() >> 8).collect();
    assert_eq!(whole.len(), 2 * ONE_TIME + 1, "three claimed, three fresh, one last-resort");
    client.close();
    origin.shutdown().await;
}
