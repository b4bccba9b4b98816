//! `device link` through the CLI, with a real relay and real processes: a second device of a
//! user gets the user's identity, then every conversation of the user adds it, so a direct
//! message reaches every device of both users.

mod common;

use common::{Home, eventually, relay, users};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_linked_device_sees_every_conversation_going_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = relay(&tmp.path().join("origin"), "127.0.0.1:0", None).await;
    // alice (org 7) and bob (org 8), each naming the other and knowing a device of the other.
    let (homes, ids) = users(tmp.path(), &origin, &["alice", "bob"]);
    let (a1, b) = (&homes[0], &homes[1]);
    let (ida, idb) = (ids[0].clone(), ids[1].clone());
    // A direct message bob started, and a group alice's first device runs.
    b.ok(&["dm", "alice", "before"]);
    a1.await_text("dm:bob", "before");
    let g = a1.ok(&["group", "create", "g", "bob"]);
    eventually("bob joins the group", || b.ok(&["groups"]).contains(&g).then_some(()));

    // A second device of alice: it asks, her first device links it.
    let a2 = Home::new(tmp.path(), "a2");
    a2.init_org(&origin, 7);
    a2.ok(&["up"]);
    let provisional = a2.user();
    assert_ne!(provisional, ida);
    let hkp = a2.ok(&["device", "key-package", "--link"]);
    assert_eq!(a1.ok(&["device", "link", &hkp]), format!("linked {hkp}"));
    eventually("a2 takes alice's identity", || (a2.user() == ida).then_some(()));

    // Every conversation of alice adds it: bob's direct message (bob commits it) and
    // alice's group (her first device commits it).
    eventually("a2 is in the direct message", || a2.ok(&["chats"]).contains(&format!("dm:{idb}")).then_some(()));
    eventually("a2 is in the group", || a2.ok(&["groups"]).contains(&g).then_some(()));
    b.ok(&["dm", "alice", "after the link"]);
    for h in [a1, &a2] {
        h.await_text(&format!("dm:{idb}"), "after the link");
    }
    assert!(!a2.read(&format!("dm:{idb}")).iter().any(|m| m["text"] == "before"), "nothing from before it joined");
    a2.ok(&["dm", &idb, "from alice's second device"]);
    b.await_text("dm:alice", "from alice's second device");
    let m = b.read("dm:alice").into_iter().find(|m| m["text"] == "from alice's second device").unwrap();
    assert_eq!((m["user"].as_str(), m["from"].as_str()), (Some(ida.as_str()), Some("alice")), "the same user, whichever device");
    a1.await_text(&format!("dm:{idb}"), "from alice's second device");
    a1.ok(&["send", &format!("group:{g}"), "group, after the link"]);
    a2.await_text(&format!("group:{g}"), "group, after the link");
    // An edit counts from any device of the message's user: a2 edits what a1 wrote.
    let first = a1.read(&format!("group:{g}")).into_iter().find(|m| m["text"] == "group, after the link").unwrap();
    a2.ok(&["edit", first["id"].as_str().unwrap(), "group, edited on the second device"]);
    b.await_text(&format!("group:{g}"), "group, edited on the second device");
    a1.await_text(&format!("group:{g}"), "group, edited on the second device");

    // A device that did not ask to be linked is not: a plain key package cannot be linked.
    let c = Home::new(tmp.path(), "c");
    c.init_org(&origin, 7);
    c.ok(&["up"]);
    let plain = c.ok(&["device", "key-package"]);
    let idc = c.user();
    a1.ok(&["device", "link", &plain]);
    eventually("c refuses the welcome", || (common::status(&c)["secure"]["rejected"].as_u64().unwrap() >= 1).then_some(()));
    assert_eq!(c.user(), idc, "c keeps its own user");
    assert!(a1.fails(&["device", "link", "xyz"]).contains("not an hKP"));
    origin.shutdown().await;
}
