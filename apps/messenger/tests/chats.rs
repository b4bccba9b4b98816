//! The chat list through the CLI, with a real relay and real processes: unread counts and
//! the order of a burst across a team channel, a direct message and a group, the same after
//! a restart; `read` marks a chat read; marked messages.

mod common;

use common::{Home, device, eventually, org, relay};

fn chats(home: &Home) -> Vec<(String, usize)> {
    home.ok(&["chats", "--json"])
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|c| (c["kind"].as_str().unwrap().to_string(), c["unread"].as_u64().unwrap() as usize))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unread_counts_and_order_follow_a_burst_and_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = relay(&tmp.path().join("origin"), "127.0.0.1:0", None).await;
    let admin = org(tmp.path(), &origin);
    let a = device(tmp.path(), "a", &origin, &admin);
    let b = device(tmp.path(), "b", &origin, &admin);
    common::await_epoch(&admin, &[&a, &b]);
    let c = Home::new(tmp.path(), "c");
    c.init_org(&origin, 8);
    c.ok(&["up"]);
    let (ida, idb) = (a.user(), b.user());
    for h in [&b, &c] {
        h.ok(&["contact", "add", &ida, "alice"]);
    }
    a.ok(&["contact", "add", &idb, "bob"]);
    for h in [&b, &c] {
        eventually("a's device is known", || h.ok(&["contacts", "--json"]).contains("\"devices\":1").then_some(()));
    }

    // The burst: two in the channel, then one direct message, then three in a group, in
    // that order of writing.
    let t1 = b.ok(&["send", "ops/general", "t1"]);
    b.ok(&["send", "ops/general", "t2"]);
    b.ok(&["dm", "alice", "d1"]);
    let g = c.ok(&["group", "create", "g", "alice"]);
    for t in ["g1", "g2", "g3"] {
        c.ok(&["send", &format!("group:{g}"), t]);
    }
    let want = vec![("group".to_string(), 3), ("dm".to_string(), 1), ("channel".to_string(), 2)];
    eventually("a counts the burst", || (chats(&a) == want).then_some(()));
    let list = a.ok(&["chats"]);
    assert!(list.lines().next().unwrap().contains(&format!("group:{g} g")), "{list}");
    assert!(list.contains(&format!("dm:{idb} bob")), "{list}");

    // The same after a restart.
    a.ok(&["down"]);
    a.ok(&["up"]);
    assert_eq!(chats(&a), want);

    // Reading one marks it read, and only it.
    assert_eq!(a.read("dm:bob").len(), 1);
    assert_eq!(chats(&a), vec![("group".to_string(), 3), ("dm".to_string(), 0), ("channel".to_string(), 2)]);
    // What a writes itself is never unread, and moves its chat to the top.
    a.ok(&["send", "ops/general", "mine"]);
    assert_eq!(chats(&a)[0], ("channel".to_string(), 2));

    // Marked messages.
    a.ok(&["mark", &t1]);
    let marked: Vec<serde_json::Value> = a.ok(&["marked", "--json"]).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(marked.len(), 1);
    assert_eq!(marked[0]["text"], "t1");
    assert_eq!(marked[0]["marked"], true);
    assert!(a.fails(&["mark", "2/2/9/999"]).contains("no message"));
    a.ok(&["down"]);
    a.ok(&["up"]);
    assert_eq!(a.ok(&["marked"]).lines().count(), 1, "marks survive a restart");
    a.ok(&["unmark", &t1]);
    assert_eq!(a.ok(&["marked"]), "");
    origin.shutdown().await;
}
