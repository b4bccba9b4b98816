//! Pipelines through the CLI, with a real relay and real processes: three users run a poll
//! (the model shipped inside the group and checked against its id), a member who was offline
//! catches up, every device reaches the same state hash, and steps a model refuses, or a
//! model that traps, change nothing and leave the messenger working.

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
