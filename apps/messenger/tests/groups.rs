//! Groups through the CLI, with a real relay and real processes: create, rename, describe,
//! add, remove and revoke by the admin; the same record on every member; a non-admin's
//! rename and add refused by every receiver; a removed member that cannot read what follows.

mod common;

use canopy_msg_core::fragment::Fragment;
use canopy_msg_core::names::{ConvId, Path, Users};
use common::{Home, eventually, relay, status};
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{MlsMessageIn, ProtocolMessage};

fn info(home: &Home, group: &str) -> serde_json::Value {
    serde_json::from_str(&home.ok(&["group", "info", group, "--json"])).unwrap()
}

/// What every member must agree on: name, description, and members with their admin flags.
fn record(home: &Home, group: &str) -> (String, String, Vec<(String, bool)>) {
    let g = info(home, group);
    let members = g["members"].as_array().unwrap().iter().map(|m| (m["user"].as_str().unwrap().to_string(), m["admin"].as_bool().unwrap())).collect();
    (g["name"].as_str().unwrap().into(), g["description"].as_str().unwrap().into(), members)
}

fn rejected(home: &Home) -> u64 {
    status(home)["secure"]["rejected"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_lives_its_whole_life_and_every_member_agrees() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = relay(&tmp.path().join("origin"), "127.0.0.1:0", None).await;
    let homes: Vec<Home> = ["a", "b", "c", "d"].iter().map(|n| Home::new(tmp.path(), n)).collect();
    for (i, h) in homes.iter().enumerate() {
        h.init_org(&origin, 7 + i as u32);
        h.ok(&["up"]);
    }
    let [a, b, c, d] = [&homes[0], &homes[1], &homes[2], &homes[3]];
    let ids: Vec<String> = homes.iter().map(Home::user).collect();
    for (id, name) in ids[1..].iter().zip(["bob", "carol", "dave"]) {
        a.ok(&["contact", "add", id, name]);
    }
    eventually("a knows a device of each contact", || {
        a.ok(&["contacts", "--json"]).lines().all(|l| l.contains("\"devices\":1")).then_some(())
    });

    let id = a.ok(&["group", "create", "friends", "bob", "carol"]);
    assert_eq!(id.len(), 18, "{id}");
    let conv = ConvId::parse(&id).unwrap();
    for h in [b, c] {
        eventually("the member joins", || h.ok(&["groups"]).contains("friends").then_some(()));
    }
    a.ok(&["group", "rename", "friends", "pals"]);
    a.ok(&["group", "describe", "pals", "weekend plans"]);
    a.ok(&["group", "add", "pals", "dave", "--note", "dave is in"]);
    let expected = record(a, &id);
    assert_eq!(expected.0, "pals");
    assert_eq!(expected.1, "weekend plans");
    assert_eq!(expected.2.len(), 4);
    assert_eq!(expected.2.iter().filter(|(_, admin)| *admin).map(|(u, _)| u.clone()).collect::<Vec<_>>(), vec![ids[0].clone()]);
    for h in [b, c, d] {
        eventually("every member holds the same record", || (h.run(&["group", "info", &id, "--json"]).status.success() && record(h, &id) == expected).then_some(()));
    }
    let group = format!("group:{id}");
    a.ok(&["send", &group, "hello pals"]);
    for h in [b, c, d] {
        h.await_text(&group, "hello pals");
    }
    assert!(b.read(&group).iter().any(|m| m["control"] == false && m["text"] == "hello pals"));

    // A non-admin's rename and add: refused here, and by every receiver when forced.
    assert!(b.fails(&["group", "rename", &id, "bobs"]).contains("not an admin"));
    let before: Vec<u64> = [a, c, d].iter().map(|h| rejected(h)).collect();
    b.ok(&["group", "rename", &id, "bobs", "--force"]);
    c.ok(&["group", "add", &id, &ids[0], "--force"]);
    for (h, n) in [a, c, d].iter().zip(&before) {
        // b's rename reaches all three; c's add reaches a and d (c's own is not refused).
        let want = if std::ptr::eq(*h, c) { n + 1 } else { n + 2 };
        eventually("every receiver refuses the non-admins' operations", || (rejected(h) >= want).then_some(()));
        assert_eq!(record(h, &id), expected, "nothing changed");
    }

    // Remove carol: what is sent afterwards, she cannot read.
    a.ok(&["group", "remove", "pals", "carol", "--note", "bye"]);
    eventually("carol learns she was removed", || (info(c, &id)["removed"] == true).then_some(()));
    let removed_epoch = info(c, &id)["epoch"].as_u64().unwrap();
    assert!(c.fails(&["send", &group, "still here?"]).contains("removed"));
    a.ok(&["send", &group, "after carol left"]);
    for h in [b, d] {
        h.await_text(&group, "after carol left");
        eventually("the member holds the new record", || (record(h, &id).2.len() == 3).then_some(()));
    }
    assert!(!c.read(&group).iter().any(|m| m["text"] == "after carol left"));
    // At the byte level: the chunk is on the relay, encrypted in the epoch her removal started
    // (or a later one), whose secrets the commit that removed her did not give her.
    let chunks = common::cached(&origin).await;
    let filter = Users::messages(conv).unwrap();
    let epochs: Vec<u64> = chunks
        .iter()
        .filter(|ch| filter.matches(ch.name()))
        .filter_map(|ch| {
            let f = Fragment::decode(Path::Message, ch.data()).ok()?;
            let m = MlsMessageIn::tls_deserialize_exact(&f.piece).ok()?;
            let p: ProtocolMessage = m.try_into_protocol_message().ok()?;
            Some(p.epoch().as_u64())
        })
        .collect();
    assert!(epochs.iter().any(|e| *e >= removed_epoch), "{epochs:?} vs carol's {removed_epoch}");
    common::assert_ciphertext_only(&origin, &["hello pals", "after carol left", "weekend plans", "pals"]).await;

    // Revoke: a new epoch for everyone still in.
    let epoch = info(b, &id)["epoch"].as_u64().unwrap();
    a.ok(&["group", "revoke", &id]);
    for h in [b, d] {
        eventually("the member moves to the new epoch", || (info(h, &id)["epoch"].as_u64().unwrap() > epoch).then_some(()));
    }
    let groups = b.ok(&["groups", "--json"]);
    assert_eq!(groups.lines().count(), 1, "{groups}");
    origin.shutdown().await;
}
