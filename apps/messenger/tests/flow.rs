//! The `canopy-msg` flow through the CLI only, with real relays and real processes: an admin,
//! two devices added by hKP, a thread and an edit, the same view on both devices, and no
//! plaintext outside Secure and the UI.

mod common;

use std::os::unix::net::UnixStream;

use canopy_msg_secure::proto::{self, Reply, Request};
use common::{Home, files_containing, relay};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_and_two_devices_talk_in_a_thread_with_an_edit() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = relay(&tmp.path().join("origin"), "127.0.0.1:0", None).await;

    let admin = Home::new(tmp.path(), "admin");
    admin.init(&origin);
    admin.ok(&["admin", "org", "init"]);
    assert_eq!(admin.ok(&["admin", "team", "create", "ops"]), "2");
    assert_eq!(admin.ok(&["admin", "channel", "create", "ops", "general"]), "2");
    assert!(admin.fails(&["admin", "team", "create", "ops"]).contains("exists"));
    assert!(admin.fails(&["admin", "team", "create", "42"]).contains("digits"));

    let a = Home::new(tmp.path(), "a");
    let b = Home::new(tmp.path(), "b");
    for (home, expected) in [(&a, "1"), (&b, "2")] {
        home.init(&origin);
        assert!(home.fails(&["teams"]).contains("not running"));
        home.ok(&["up"]);
        assert_eq!(home.ok(&["up"]), "already up");
        let hkp = home.ok(&["device", "key-package"]);
        assert_eq!(hkp.len(), 64, "{hkp}");
        assert_eq!(admin.ok(&["admin", "team", "add", "ops", &hkp]), expected);
        let team = home.await_team("ops");
        assert_eq!(team["device"].to_string(), expected);
    }
    // a learns of b's add before the epochs match.
    let epoch = |h: &Home| h.await_team("ops")["epoch"].as_u64().unwrap();
    let deadline = std::time::Instant::now() + common::WAIT;
    while epoch(&a) != epoch(&b) {
        assert!(std::time::Instant::now() < deadline, "a never caught up with b's add");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(a.ok(&["channels", "ops"]), "2 general");
    let devices = admin.ok(&["admin", "team", "devices", "ops"]);
    assert_eq!(devices.lines().count(), 3, "{devices}");

    let hello = a.ok(&["send", "ops/general", "hello from a"]);
    assert_eq!(hello, "2/2/1/1");
    b.await_text("ops/general", "hello from a");
    let reply = b.ok(&["send", "ops/general", "hi a, b here", "--reply-to", &hello]);
    a.await_text("ops/general", "hi a, b here");
    let nested = a.ok(&["send", "ops/general", "a reply to the reply", "--reply-to", &reply]);
    a.ok(&["edit", &hello, "hello from a, edited"]);
    assert!(b.fails(&["edit", &hello, "not yours"]).contains("only its sender"));
    b.await_text("ops/general", "hello from a, edited");
    b.await_text("ops/general", "a reply to the reply");

    let va = a.shared_view("ops/general");
    let vb = b.shared_view("ops/general");
    assert_eq!(va, vb, "both devices show the same messages in the same order");
    assert_eq!(va.len(), 3);
    assert_eq!(va[0]["id"], hello.as_str());
    assert_eq!(va[0]["text"], "hello from a, edited");
    assert_eq!(va[0]["edited"], true);
    assert_eq!(va[0]["team_name"], "ops");
    assert_eq!(va[0]["channel_name"], "general");
    assert_eq!(va[1]["id"], reply.as_str());
    assert_eq!(va[1]["reply_to"], hello.as_str());
    assert_eq!(va[2]["id"], nested.as_str());
    assert_eq!(va[2]["reply_to"], hello.as_str(), "threads are one level deep");

    // Errors are one clear line.
    assert!(a.fails(&["send", "ops/nope", "x"]).contains("unknown channel"));
    assert!(a.fails(&["send", "nope/general", "x"]).contains("unknown team"));
    let long = "x".repeat(16 * 1024 + 1);
    assert!(a.fails(&["send", "ops/general", &long]).contains("16384"));

    // The sandbox, proven from inside the running Secure.
    let mut s = UnixStream::connect(a.dir.join("secure.sock")).unwrap();
    proto::write_frame(&mut s, &Request::SandboxCheck).unwrap();
    match proto::read_frame::<Reply>(&mut s).unwrap().unwrap() {
        Reply::Sandbox { errno, error } => assert_eq!(errno, libc::EPERM, "{error}"),
        other => panic!("{other:?}"),
    }

    // No plaintext outside Secure and the UI: not in any chunk the relay hands a `/0`
    // subscriber, not in its store files, nor in any home.
    let texts = ["hello from a", "hi a, b here", "a reply to the reply", "general"];
    assert!(common::assert_ciphertext_only(&origin, &texts).await > 10);
    a.ok(&["down"]);
    b.ok(&["down"]);
    origin.shutdown().await;
    for text in texts {
        let found = files_containing(tmp.path(), text);
        assert!(found.is_empty(), "{text:?} found in {found:?}");
    }
}
