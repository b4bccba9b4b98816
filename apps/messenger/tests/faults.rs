//! The messenger under faults, with real relays and real processes: a partition of the relay
//! tree, a relay that is down when a message is sent, and a device killed mid-conversation.

mod common;

use std::process::Command;

use common::{await_epoch, device, org, pids, relay, texts};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_keeps_the_local_pair_talking_and_heals_into_one_history() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let origin = relay(&root.join("origin"), "127.0.0.1:0", None).await;
    let cloud = relay(&root.join("cloud"), "127.0.0.1:0", Some(&origin)).await;
    let cloud_addr = cloud.local_addr().to_string();
    let local = relay(&root.join("local"), "127.0.0.1:0", Some(&cloud)).await;

    let admin = org(root, &origin);
    let a = device(root, "a", &local, &admin);
    let b = device(root, "b", &local, &admin);
    let c = device(root, "c", &origin, &admin);
    await_epoch(&admin, &[&a, &b, &c]);
    a.ok(&["send", "ops/general", "before"]);
    for h in [&b, &c] {
        h.await_text("ops/general", "before");
    }

    // The cloud relay dies: the local pair is cut off from the origin.
    cloud.kill().await;
    a.ok(&["send", "ops/general", "a during"]);
    b.await_text("ops/general", "a during");
    b.ok(&["send", "ops/general", "b during"]);
    a.await_text("ops/general", "b during");
    c.ok(&["send", "ops/general", "c during"]);

    // Heal: the cloud relay comes back on its address, from its store.
    let cloud = relay(&root.join("cloud"), &cloud_addr, Some(&origin)).await;
    for h in [&a, &b, &c] {
        for t in ["a during", "b during", "c during"] {
            h.await_text("ops/general", t);
        }
    }
    let (ta, tb, tc) = (texts(&a), texts(&b), texts(&c));
    assert_eq!(ta, tb);
    assert_eq!(ta, tc);
    assert_eq!(ta.len(), 4, "no duplicates: {ta:?}");
    assert_eq!(a.shared_view("ops/general"), c.shared_view("ops/general"));
    // Every relay on the way held and passed on ciphertext only.
    for r in [&origin, &cloud, &local] {
        common::assert_ciphertext_only(r, &["before", "a during", "b during", "c during", "general"]).await;
    }
    drop(cloud);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_sent_while_the_relay_is_down_is_queued_and_delivered_later() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let origin = relay(&root.join("origin"), "127.0.0.1:0", None).await;
    let edge = relay(&root.join("edge"), "127.0.0.1:0", Some(&origin)).await;
    let edge_addr = edge.local_addr().to_string();
    let admin = org(root, &origin);
    let a = device(root, "a", &edge, &admin);
    let b = device(root, "b", &origin, &admin);
    await_epoch(&admin, &[&a, &b]);

    edge.shutdown().await;
    // `send` says "queued" once Network knows its relay is gone (until then the message is
    // just as safe in Network's outbox, but the notice would not be given).
    common::eventually("a's Network sees the relay down", || (common::status(&a)["network"]["parent_connected"] == false).then_some(()));
    let out = a.run(&["send", "ops/general", "sent while offline"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2/2/1/1");
    assert!(String::from_utf8_lossy(&out.stderr).contains("queued"));
    assert_eq!(texts(&a), ["sent while offline"], "the sender shows it at once");

    let edge = relay(&root.join("edge"), &edge_addr, Some(&origin)).await;
    b.await_text("ops/general", "sent while offline");
    drop(edge);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_killed_mid_conversation_comes_back_with_its_history_in_the_current_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let origin = relay(&root.join("origin"), "127.0.0.1:0", None).await;
    let admin = org(root, &origin);
    let a = device(root, "a", &origin, &admin);
    let b = device(root, "b", &origin, &admin);
    await_epoch(&admin, &[&a, &b]);
    for i in 0..5 {
        a.ok(&["send", "ops/general", &format!("a {i}")]);
        b.ok(&["send", "ops/general", &format!("b {i}")]);
    }
    a.await_text("ops/general", "b 4");
    let before = a.read("ops/general");

    for pid in pids(&a) {
        Command::new("kill").arg("-9").arg(pid.to_string()).status().unwrap();
    }
    // Meanwhile the team moves on: a new epoch and new messages.
    admin.ok(&["admin", "channel", "create", "ops", "later"]);
    b.ok(&["send", "ops/general", "while a was dead"]);

    a.ok(&["up"]);
    a.await_text("ops/general", "while a was dead");
    await_epoch(&admin, &[&a, &b]);
    let after = a.read("ops/general");
    assert_eq!(&after[..before.len()], &before[..], "history intact");
    assert_eq!(a.ok(&["channels", "ops"]), "2 general\n3 later");
    a.ok(&["send", "ops/later", "back in the current epoch"]);
    b.await_text("ops/later", "back in the current epoch");
}
