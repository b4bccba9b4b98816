//! Backup and restore through the CLI, with a real relay and real processes: a backup of a
//! device with direct messages, a group, mail, marks and a Bitcoin key; refused with a wrong passphrase or
//! when damaged, changing nothing; restored on a fresh home with the same chat list and
//! histories; the restored device re-added by the user's other device and the peer, and
//! sending again.

mod common;

use common::{Home, eventually, relay, users};

const PASS: &str = "correct horse battery staple";

fn chats(home: &Home) -> Vec<serde_json::Value> {
    home.ok(&["chats", "--json"]).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restored_device_shows_the_same_history_and_sends_again_once_re_added() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = relay(&tmp.path().join("origin"), "127.0.0.1:0", None).await;
    // alice (org 7) and bob (org 8), each naming the other and knowing a device of the other.
    let (homes, ids) = users(tmp.path(), &origin, &["alice", "bob"]);
    let (a1, b) = (&homes[0], &homes[1]);
    let (ida, idb) = (ids[0].clone(), ids[1].clone());
    b.ok(&["dm", "alice", "hello alice"]);
    a1.await_text("dm:bob", "hello alice");
    let mine = a1.ok(&["dm", "bob", "hi bob"]);
    let g = a1.ok(&["group", "create", "g", "bob"]);
    a1.ok(&["send", &format!("group:{g}"), "in the group"]);
    let r = a1.ok(&["mail", "send", "--to", "bob", "--subject", "notes", "the notes"]);
    a1.ok(&["mark", &mine]);
    b.await_text(&format!("group:{g}"), "in the group");
    a1.ok(&["btc", "key", "new"]);
    let btc = a1.ok(&["btc", "key", "show", "--json"]);

    let file = tmp.path().join("alice.backup");
    let file_s = file.to_str().unwrap();
    let out = a1.run_env(&["backup", file_s], &[("CANOPY_MSG_BACKUP_PASSPHRASE", PASS)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&file).unwrap();
    for text in ["hello alice", "hi bob", "the notes", "bob"] {
        assert!(!bytes.windows(text.len()).any(|w| w == text.as_bytes()), "{text:?} in the backup file");
    }

    // A fresh home: wrong passphrase, damage and truncation are refused and change nothing.
    let a2 = Home::new(tmp.path(), "a2");
    a2.init_org(&origin, 7);
    let restore = |file: &str, pass: &str| a2.run_env(&["restore", file], &[("CANOPY_MSG_BACKUP_PASSPHRASE", pass)]);
    let err = restore(file_s, "wrong");
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("wrong backup passphrase"), "{}", String::from_utf8_lossy(&err.stderr));
    let mut tampered = bytes.clone();
    let n = tampered.len();
    tampered[n - 20] ^= 1;
    let damaged = tmp.path().join("damaged.backup");
    std::fs::write(&damaged, &tampered).unwrap();
    assert!(String::from_utf8_lossy(&restore(damaged.to_str().unwrap(), PASS).stderr).contains("damaged"));
    let truncated = tmp.path().join("truncated.backup");
    std::fs::write(&truncated, &bytes[..50]).unwrap();
    assert!(String::from_utf8_lossy(&restore(truncated.to_str().unwrap(), PASS).stderr).contains("truncated"));
    assert!(!a2.dir.join("secure").exists(), "nothing was written");

    // Restored: the same user, chat list and histories.
    let out = restore(file_s, PASS);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("restored"));
    a2.ok(&["up"]);
    assert_eq!(a2.user(), ida);
    assert_eq!(chats(&a2), chats(a1));
    for conv in [format!("dm:{idb}"), format!("group:{g}"), "mail".to_string()] {
        assert_eq!(a2.shared_view(&conv), a1.shared_view(&conv), "{conv}");
    }
    assert_eq!(a2.ok(&["marked"]), a1.ok(&["marked"]));
    assert!(a2.ok(&["mail", "thread", &r]).contains("the notes"));
    assert_eq!(a2.ok(&["contacts"]), a1.ok(&["contacts"]));
    assert_eq!(a2.ok(&["btc", "key", "show", "--json"]), btc, "the Bitcoin key pipelines sign with comes back");

    // Re-added as a new device (bob commits the direct message, a1 the group), it sends again.
    eventually("a2 is back in the direct message", || a2.run(&["dm", "bob", "back again"]).status.success().then_some(()));
    b.await_text("dm:alice", "back again");
    eventually("a2 is back in the group", || a2.run(&["send", &format!("group:{g}"), "back in the group"]).status.success().then_some(()));
    b.await_text(&format!("group:{g}"), "back in the group");
    assert!(a2.read(&format!("dm:{idb}")).iter().any(|m| m["text"] == "hello alice"), "the old history stays");
    origin.shutdown().await;
}
