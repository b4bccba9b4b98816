//! Mail and blocking through the CLI, with a real relay and real processes: one mail to two
//! recipients, a reply with `prev`, a reply to that, and the same thread on every party's
//! device; a blocked user's mail, direct messages and group invitations never appear, and
//! after `unblock` new ones do.

mod common;

use common::{Home, eventually, relay, status, users};

fn mails(home: &Home, args: &[&str]) -> Vec<serde_json::Value> {
    home.ok(args).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The mails `args` lists, or `None` while the command fails (a mail not arrived yet).
fn mails_now(home: &Home, args: &[&str]) -> Option<Vec<serde_json::Value>> {
    let out = home.run(args);
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect())
}

fn refs(list: &[serde_json::Value]) -> Vec<String> {
    list.iter().map(|m| m["reference"].as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mail_thread_is_the_same_chain_on_every_partys_device() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = relay(&tmp.path().join("origin"), "127.0.0.1:0", None).await;
    let (homes, ids) = users(tmp.path(), &origin, &["alice", "bob", "carol"]);
    let [a, b, c] = [&homes[0], &homes[1], &homes[2]];

    let r1 = a.ok(&["mail", "send", "--to", "bob,carol", "--subject", "Plan", "Shall we meet?"]);
    assert_eq!(r1.len(), 16, "{r1}");
    eventually("bob gets it", || refs(&mails(b, &["mail", "list", "--json"])).contains(&r1).then_some(()));
    let got = &mails(b, &["mail", "list", "--json"])[0];
    assert_eq!((got["subject"].as_str(), got["body"].as_str(), got["from"].as_str()), (Some("Plan"), Some("Shall we meet?"), Some("alice")));
    let mut to: Vec<&str> = got["to"].as_array().unwrap().iter().map(|u| u.as_str().unwrap()).collect();
    to.sort();
    let mut want = vec![ids[1].as_str(), ids[2].as_str()];
    want.sort();
    assert_eq!(to, want, "one mail to both");
    let r2 = b.ok(&["mail", "send", "--to", "alice,carol", "--subject", "Re: Plan", "Tuesday?", "--prev", &r1]);
    eventually("carol gets the reply", || refs(&mails(c, &["mail", "list", "--json"])).contains(&r2).then_some(()));
    let r3 = c.ok(&["mail", "send", "--to", "alice,bob", "--subject", "Re: Plan", "Tuesday works", "--prev", &r2]);

    let chain = vec![r1.clone(), r2.clone(), r3.clone()];
    for h in [a, b, c] {
        // The last mail may not have reached this device yet: `thread` says "no mail" until then.
        eventually("the whole thread", || mails_now(h, &["mail", "thread", &r3, "--json"]).filter(|t| refs(t) == chain).map(|_| ()));
        assert_eq!(refs(&mails(h, &["mail", "thread", &r1, "--json"])), chain, "from any mail of it");
        let thread = mails(h, &["mail", "thread", &r2, "--json"]);
        assert_eq!(thread[1]["prev"], r1.as_str());
        assert_eq!(thread[2]["prev"], r2.as_str());
    }
    // One mailbox conversation for the three of them, on every device.
    for h in [a, b, c] {
        let convs = status(h)["secure"]["conversations"].as_array().unwrap().clone();
        assert_eq!(convs.iter().filter(|c| c["kind"] == "mail").count(), 1, "{convs:?}");
    }
    assert!(a.ok(&["chats"]).contains("mail"));
    assert!(a.fails(&["mail", "thread", "0000000000000000"]).contains("no mail"));
    assert!(a.fails(&["mail", "send", "--to", "bob", "--subject", "x", "y", "--prev", "nope"]).contains("not a mail reference"));
    assert!(a.fails(&["send", "mail", "x"]).contains("mail send"));
    common::assert_ciphertext_only(&origin, &["Shall we meet", "Tuesday", "Plan"]).await;
    origin.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocked_users_mail_dms_and_invitations_never_appear_and_new_ones_do_after_unblock() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = relay(&tmp.path().join("origin"), "127.0.0.1:0", None).await;
    let (homes, _) = users(tmp.path(), &origin, &["alice", "dave", "erin"]);
    let [a, d, e] = [&homes[0], &homes[1], &homes[2]];
    a.ok(&["block", "dave"]);
    let blocked = |h: &Home| status(h)["secure"]["blocked"].as_u64().unwrap();

    // While blocked: dave's mail (to alice and erin), his direct message and his group.
    let r = d.ok(&["mail", "send", "--to", "alice,erin", "--subject", "hi", "from dave"]);
    d.ok(&["dm", "alice", "dave here"]);
    d.ok(&["group", "create", "daves", "alice", "erin"]);
    eventually("erin gets the mail", || refs(&mails(e, &["mail", "list", "--json"])).contains(&r).then_some(()));
    eventually("erin is in dave's group", || e.ok(&["groups"]).contains("daves").then_some(()));
    eventually("alice refuses all three", || (blocked(a) >= 3).then_some(()));
    assert!(mails(a, &["mail", "list", "--json"]).is_empty());
    assert!(a.ok(&["groups"]).is_empty());
    assert!(a.read("dm:dave").is_empty());
    assert!(!a.ok(&["chats"]).contains("dave"));

    // Unblocked: what dave sends now appears, in the conversations he started meanwhile;
    // what he sent before does not.
    a.ok(&["unblock", "dave"]);
    let r2 = d.ok(&["mail", "send", "--to", "alice,erin", "--subject", "again", "still there?"]);
    d.ok(&["dm", "alice", "now?"]);
    d.ok(&["send", "group:daves", "welcome"]);
    eventually("alice gets the new mail", || refs(&mails(a, &["mail", "list", "--json"])).contains(&r2).then_some(()));
    assert_eq!(refs(&mails(a, &["mail", "list", "--json"])), vec![r2.clone()], "not the one sent while blocked");
    a.await_text("dm:dave", "now?");
    assert!(!a.read("dm:dave").iter().any(|m| m["text"] == "dave here"));
    eventually("alice is in dave's group", || a.ok(&["groups"]).contains("daves").then_some(()));
    a.await_text("group:daves", "welcome");
    origin.shutdown().await;
}
