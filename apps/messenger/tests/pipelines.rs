//! Pipelines through the CLI, with a real relay and real processes: three users run a poll
//! (the model shipped inside the group and checked against its id), a member who was offline
//! catches up, every device reaches the same state hash, and steps a model refuses, or a
//! model that traps, change nothing and leave the messenger working. A 2-of-3 Bitcoin
//! multisig runs to broadcast, through a hostile member's tampered PSBT, which every other
//! device refuses with the reason.

mod common;

use common::{Home, eventually, relay, users};

fn show(home: &Home, id: &str) -> serde_json::Value {
    serde_json::from_str(&home.ok(&["pipeline", "show", id, "--json"])).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_users_run_a_poll_to_the_same_closed_state() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = relay(&tmp.path().join("origin"), "127.0.0.1:0", None).await;
    let (homes, _) = users(tmp.path(), &origin, &["alice", "bob", "carol"]);
    let [alice, bob, carol] = [&homes[0], &homes[1], &homes[2]];
    let model = common::plugin_artifacts::wasm("poll");
    let model = model.to_str().unwrap();

    // Parameters the model refuses: nothing is created.
    let err = alice.fails(&["pipeline", "create", model, "--members", "bob,carol", "--params", r#"{"question":"Lunch?","options":["only one"]}"#]);
    assert!(err.contains("two options"), "{err}");
    let id = alice.ok(&["pipeline", "create", model, "--members", "bob,carol", "--name", "lunch", "--params", r#"{"question":"Lunch?","options":["pizza","soup"]}"#]);
    for h in [alice, bob, carol] {
        eventually("the pipeline and its whole model arrive", || h.ok(&["pipeline", "list", "--json"]).contains("\"model_complete\":true").then_some(()));
    }
    // The model's parts are no messages: the chat list counts the creation alone.
    let chats = bob.ok(&["chats", "--json"]);
    let chat: serde_json::Value = serde_json::from_str(chats.lines().find(|l| l.contains(r#""kind":"pipeline""#)).unwrap()).unwrap();
    assert_eq!((chat["unread"].as_u64(), chat["messages"].as_u64()), (Some(1), Some(1)), "{chat}");
    let s = show(bob, &id);
    assert_eq!((s["title"].as_str(), s["status"].as_str(), s["model_name"].as_str()), (Some("Lunch?"), Some("0 of 3 voted"), Some("poll")));
    assert_eq!(s["actions"].as_array().unwrap().len(), 1, "bob may vote, not close: {s}");

    // carol is away while bob votes.
    carol.ok(&["down"]);
    bob.ok(&["pipeline", "act", &id, "vote", "soup"]);
    eventually("alice applies bob's vote", || (show(alice, &id)["status"] == "1 of 3 voted").then_some(()));
    // A step the model refuses is refused on the acting device, and not sent.
    let err = bob.fails(&["pipeline", "act", &id, "close"]);
    assert!(err.contains("only the creator"), "{err}");
    let err = bob.fails(&["pipeline", "act", &id, "vote", "tea"]);
    assert!(err.contains("no option"), "{err}");

    // carol comes back, catches up from the relay, and votes; then alice, which closes it.
    carol.ok(&["up"]);
    eventually("carol catches up", || (show(carol, &id)["status"] == "1 of 3 voted").then_some(()));
    carol.ok(&["pipeline", "act", &id, "vote", "0"]);
    eventually("alice sees carol's vote", || (show(alice, &id)["status"] == "2 of 3 voted").then_some(()));
    alice.ok(&["pipeline", "act", &id, "vote", "soup"]);
    let states: Vec<serde_json::Value> = [alice, bob, carol]
        .iter()
        .map(|h| eventually("every device reaches the closed state", || Some(show(h, &id)).filter(|s| s["closed"] == true)))
        .collect();
    for s in &states {
        assert_eq!(s["state_hash"], states[0]["state_hash"], "one state on every device: {s}");
        assert_eq!(s["status"], "3 of 3 voted, closed");
        assert!(s["diverged"].as_array().unwrap().is_empty() && s["refused"].as_array().unwrap().is_empty(), "{s}");
    }
    assert_eq!(states[1]["lines"], serde_json::json!(["0. pizza: 1", "1. soup: 2 (your vote)"]));
    // The steps show in the group's conversation too; the model's bytes do not.
    let texts: Vec<String> = bob.read(&format!("pipeline:{id}")).iter().map(|m| m["text"].as_str().unwrap().to_string()).collect();
    assert_eq!(texts.iter().filter(|t| t.starts_with("vote ")).count(), 3, "{texts:?}");
    assert!(!texts.iter().any(|t| t.starts_with("part ")), "{texts:?}");
    // A restart reads the sealed state and agrees.
    bob.ok(&["down"]);
    bob.ok(&["up"]);
    assert_eq!(show(bob, &id)["state_hash"], states[0]["state_hash"]);
    common::assert_ciphertext_only(&origin, &["Lunch?", "pizza", "soup"]).await;
    origin.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_that_traps_changes_nothing_and_the_messenger_keeps_working() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = relay(&tmp.path().join("origin"), "127.0.0.1:0", None).await;
    let (homes, _) = users(tmp.path(), &origin, &["alice", "bob"]);
    let [alice, bob] = [&homes[0], &homes[1]];
    let model = common::plugin_artifacts::wasm("faulty");
    let id = alice.ok(&["pipeline", "create", model.to_str().unwrap(), "--members", "bob"]);
    eventually("bob has the model", || bob.ok(&["pipeline", "list", "--json"]).contains("\"model_complete\":true").then_some(()));
    alice.ok(&["pipeline", "act", &id, "count"]);
    let before = eventually("bob counts one", || Some(show(bob, &id)).filter(|s| s["status"] == "1 "));
    for fault in ["trap", "spin", "hog"] {
        let err = alice.fails(&["pipeline", "act", &id, fault]);
        assert!(err.contains("refuses this step"), "{fault}: {err}");
    }
    assert_eq!(show(bob, &id)["state_hash"], before["state_hash"], "nothing was sent, nothing changed");
    // The messenger works on.
    alice.ok(&["send", &format!("pipeline:{id}"), "still here"]);
    bob.await_text(&format!("pipeline:{id}"), "still here");
    origin.shutdown().await;
}

/// One request to a device's Secure, as the UI sends it.
fn secure_call(home: &Home, request: &canopy_msg_secure::proto::Request) -> canopy_msg_secure::proto::Reply {
    let mut stream = std::os::unix::net::UnixStream::connect(home.dir.join("secure.sock")).unwrap();
    canopy_msg_secure::proto::write_frame(&mut stream, request).unwrap();
    canopy_msg_secure::proto::read_frame(&mut stream).unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_two_of_three_multisig_is_signed_finalized_and_broadcast_through_the_cli() {
    use canopy_msg_secure::proto::{Reply, Request};
    let tmp = tempfile::tempdir().unwrap();
    let origin = relay(&tmp.path().join("origin"), "127.0.0.1:0", None).await;
    let (homes, _) = users(tmp.path(), &origin, &["alice", "bob", "carol"]);
    let [alice, bob, carol] = [&homes[0], &homes[1], &homes[2]];
    let (descriptor, params) = common::multisig_spend(&[alice, bob, carol]);
    assert!(alice.fails(&["btc", "key", "new"]).contains("exists already"));
    let model = common::plugin_artifacts::wasm("multisig");
    let id = alice.ok(&["pipeline", "create", model.to_str().unwrap(), "--members", "bob,carol", "--name", "spend", "--params", &params]);
    for h in [alice, bob, carol] {
        eventually("the pipeline and its model arrive", || h.ok(&["pipeline", "list", "--json"]).contains("\"model_complete\":true").then_some(()));
    }
    // carol is offline through the signing.
    carol.ok(&["down"]);
    // Signing needs approval: without --yes (and no terminal) nothing is signed.
    assert!(alice.fails(&["pipeline", "act", &id, "transaction"]).contains("not approved"));
    let out = alice.run(&["pipeline", "act", &id, "transaction", "--yes"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let review = String::from_utf8_lossy(&out.stderr);
    assert!(review.contains("pay 99000 sat to") && review.contains("fee 1000 sat"), "the user is shown what is signed: {review}");
    eventually("bob sees the proposal", || (show(bob, &id)["status"] == "1 of 2 signatures").then_some(()));

    // Secure refuses to sign a PSBT other than the one the user was shown.
    let proposal = show(bob, &id);
    assert_eq!(proposal["actions"][0]["name"], "sign");
    let tampered = |amount: u64| {
        let mut p = multisig::unsigned_psbt(&serde_json::from_str(&params).unwrap()).unwrap();
        p.unsigned_tx.output[0].value = bitcoin::Amount::from_sat(amount);
        p
    };
    let psbt = |amount: u64| tampered(amount).serialize();
    let shown = match secure_call(bob, &Request::Sign { key: "btc".into(), kind: "psbt".into(), payload: psbt(99_000), approved: None, network: None }) {
        Reply::Approve { digest, .. } => digest,
        other => panic!("{other:?}"),
    };
    match secure_call(bob, &Request::Sign { key: "btc".into(), kind: "psbt".into(), payload: psbt(90_000), approved: Some(shown), network: None }) {
        Reply::Error { message } => assert!(message.contains("not the one you approved"), "{message}"),
        other => panic!("{other:?}"),
    }

    // A hostile bob sends a SIGN whose PSBT pays less, straight through his Secure (his own
    // model would have refused it): every other member's model refuses it, with the reason,
    // and nothing changes.
    let body = serde_json::json!({ "psbt": tampered(90_000).to_string() }).to_string();
    match secure_call(bob, &Request::PipelineStep { pipeline: id.clone(), kind: "SIGN".into(), body, prior: None }) {
        Reply::Sent { .. } => {}
        other => panic!("{other:?}"),
    }
    let refused = eventually("alice refuses the tampered step", || Some(show(alice, &id)).filter(|s| !s["refused"].as_array().unwrap().is_empty()));
    assert!(refused["refused"][0].as_str().unwrap().contains("output 0 pays 90000 sat"), "the reason is shown: {refused}");
    assert_eq!((refused["status"].as_str(), &refused["state_hash"]), (Some("1 of 2 signatures"), &proposal["state_hash"]), "nothing changed");
    let text = alice.ok(&["pipeline", "show", &id]);
    assert!(text.contains("refused: ") && text.contains("output 0 pays 90000 sat"), "{text}");

    bob.ok(&["pipeline", "act", &id, "sign", "--yes"]);
    eventually("alice has both signatures", || (show(alice, &id)["status"] == "2 of 2 signatures").then_some(()));
    // carol catches up from the relays and finalizes.
    carol.ok(&["up"]);
    eventually("carol catches up", || (show(carol, &id)["status"] == "2 of 2 signatures").then_some(()));
    carol.ok(&["pipeline", "act", &id, "finalize"]);
    eventually("alice sees it final", || (show(alice, &id)["status"] == "final, ready to broadcast").then_some(()));
    // The broadcast hook gets the final transaction.
    let sent = tmp.path().join("broadcast.hex");
    assert!(alice.fails(&["pipeline", "act", &id, "broadcast"]).contains("--broadcast-cmd"));
    alice.ok(&["pipeline", "act", &id, "broadcast", "--broadcast-cmd", &format!("printf %s > {}", sent.display())]);
    let states: Vec<serde_json::Value> =
        [alice, bob, carol].iter().map(|h| eventually("every device closes", || Some(show(h, &id)).filter(|s| s["closed"] == true))).collect();
    for s in &states {
        assert_eq!(s["state_hash"], states[0]["state_hash"], "{s}");
        assert!(s["diverged"].as_array().unwrap().is_empty(), "{s}");
        // Every device, carol's too (she was away), refused the tampered step and only it.
        let refused = s["refused"].as_array().unwrap();
        assert!(refused.len() == 1 && refused[0].as_str().unwrap().contains("output 0 pays 90000 sat"), "{s}");
    }
    // The broadcast transaction verifies against the funding output with miniscript's interpreter.
    let hex = std::fs::read_to_string(&sent).unwrap();
    let tx: bitcoin::Transaction = bitcoin::consensus::encode::deserialize_hex(hex.trim()).unwrap();
    let funding = bitcoin::TxOut { value: bitcoin::Amount::from_sat(100_000), script_pubkey: multisig::funding_script(&descriptor).unwrap() };
    multisig::verify(&tx, &funding).unwrap();
    let txid = states[0]["lines"].as_array().unwrap().iter().find_map(|l| l.as_str()?.strip_prefix("txid ")).unwrap().to_string();
    assert_eq!(tx.compute_txid().to_string(), txid);
    origin.shutdown().await;
}
