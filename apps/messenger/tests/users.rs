//! Users, contacts and blocking through the CLI, with a real relay and real processes:
//! `whoami`, senders' users on messages, `members`, `contact add|rename|remove`,
//! `contacts`, `block` and `unblock`, all surviving a restart.

mod common;

use common::{Home, device, eventually, org, relay, status, texts};

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn whoami(home: &Home) -> String {
    let id = home.ok(&["whoami"]);
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{id}");
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_are_shown_named_and_blocked() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = relay(&tmp.path().join("origin"), "127.0.0.1:0", None).await;
    let admin = org(tmp.path(), &origin);
    let a = device(tmp.path(), "a", &origin, &admin);
    let b = device(tmp.path(), "b", &origin, &admin);
    common::await_epoch(&admin, &[&a, &b]);

    // whoami: a user id, and the keys behind it.
    let (ida, idb) = (whoami(&a), whoami(&b));
    assert_ne!(ida, idb);
    let keys: serde_json::Value = serde_json::from_str(&a.ok(&["whoami", "--json"])).unwrap();
    assert_eq!(keys["user"], ida.as_str());
    assert_eq!(keys["user_key"].as_str().unwrap().len(), 64);
    assert_eq!(keys["device_key"].as_str().unwrap().len(), 64);
    assert_eq!(status(&a)["secure"]["user"], ida.as_str());

    // A message carries its sender's user; `from` is the short id until b names a.
    a.ok(&["send", "ops/general", "hello from a"]);
    b.await_text("ops/general", "hello from a");
    let m = &b.read("ops/general")[0];
    assert_eq!(m["user"], ida.as_str());
    assert_eq!(m["from"], &ida[..8]);
    assert_eq!(a.read("ops/general")[0]["from"], "me");
    let members = json_lines(&b.ok(&["members", "ops", "--json"]));
    assert_eq!(members.len(), 3, "the committer and two devices: {members:?}");
    assert!(members.iter().any(|m| m["user"] == ida.as_str() && m["me"] == false));
    assert!(members.iter().any(|m| m["user"] == idb.as_str() && m["me"] == true));

    // Contacts: a name stands for the user id everywhere.
    assert_eq!(b.ok(&["contact", "add", &ida, "alice"]), format!("{ida} alice"));
    assert_eq!(b.read("ops/general")[0]["from"], "alice");
    assert!(b.ok(&["members", "ops"]).lines().any(|l| l == format!("1 {ida} alice")), "{}", b.ok(&["members", "ops"]));
    assert_eq!(b.ok(&["contact", "rename", "alice", "al"]), format!("{ida} al"));
    assert_eq!(b.read("ops/general")[0]["from"], "al");
    assert!(b.ok(&["read", "ops/general"]).contains("] al: hello from a"));
    let other = "0123456789abcdef0123456789abcdef";
    assert!(b.fails(&["contact", "add", other, "al"]).contains("taken"), "names are unique");
    assert!(b.fails(&["contact", "add", "not-a-user", "x"]).contains("not a user id"));
    assert!(b.fails(&["contact", "add", other, "42"]).contains("cannot name a contact"));
    assert!(b.fails(&["contact", "rename", "nobody", "x"]).contains("neither a user id"));
    assert_eq!(b.ok(&["contact", "add", other, "olga"]), format!("{other} olga"));
    assert_eq!(b.ok(&["contact", "remove", "olga"]), format!("{other} -"));

    // Blocking: what a sends while blocked never appears, not even after the unblock.
    assert!(b.fails(&["block", &idb]).contains("that is you"));
    assert_eq!(b.ok(&["block", "al"]), format!("{ida} al blocked"));
    assert!(b.read("ops/general").is_empty(), "a's earlier messages are hidden");
    a.ok(&["send", "ops/general", "while blocked"]);
    eventually("b drops the blocked message", || (status(&b)["secure"]["blocked"] == 1).then_some(()));
    assert!(texts(&b).is_empty());
    let contacts = json_lines(&b.ok(&["contacts", "--json"]));
    assert_eq!(contacts.len(), 1, "{contacts:?}");
    assert_eq!((&contacts[0]["user"], &contacts[0]["name"], &contacts[0]["blocked"]), (&serde_json::json!(ida), &serde_json::json!("al"), &serde_json::json!(true)));
    assert_eq!(b.ok(&["unblock", &ida]), format!("{ida} al"));
    a.ok(&["send", "ops/general", "after"]);
    b.await_text("ops/general", "after");
    assert_eq!(texts(&b), vec!["hello from a", "after"]);

    // Everything survives a restart.
    b.ok(&["down"]);
    b.ok(&["up"]);
    assert_eq!(whoami(&b), idb);
    assert_eq!(b.ok(&["contacts"]), format!("{ida} al"));
    assert_eq!(texts(&b), vec!["hello from a", "after"]);
    assert_eq!(b.read("ops/general")[0]["from"], "al");
    origin.shutdown().await;
}
