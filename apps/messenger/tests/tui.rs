//! The terminal UI end to end: the real `canopy-msg tui` in a real terminal (tmux, on a
//! server of the test's own), against a real relay and another user's device: reading and
//! replying, and approving a pipeline's signing on screen. Keys go in
//! with `send-keys`; what the screen shows comes back with `capture-pane`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Home, WAIT, eventually, relay, users};

/// A tmux server of this test's own (its socket in the test's directory), running one
/// session with one program in it.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn start(dir: &Path, width: u16, height: u16, program: &[&str]) -> Tmux {
        let tmux = Tmux { socket: dir.join("tmux.sock") };
        let command = program.iter().map(|a| format!("'{a}'")).collect::<Vec<_>>().join(" ");
        let w = width.to_string();
        let h = height.to_string();
        tmux.run(&["new-session", "-d", "-s", "tui", "-x", &w, "-y", &h, &command]);
        // Keep the pane after the program exits, so an early exit leaves its last words.
        tmux.run(&["set-option", "-t", "tui", "remain-on-exit", "on"]);
        tmux
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .env_remove("TMUX")
            .output()
            .expect("tmux runs: it is installed by scripts/install-test-deps.sh");
        assert!(out.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The pane as it is on screen now.
    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "tui"])
    }

    /// Waits until the screen shows every one of `texts`; returns that screen.
    fn await_screen(&self, what: &str, texts: &[&str]) -> String {
        let deadline = Instant::now() + WAIT;
        let mut pause = Duration::from_millis(10);
        loop {
            let screen = self.screen();
            if texts.iter().all(|t| screen.contains(t)) {
                return screen;
            }
            assert!(Instant::now() < deadline, "the TUI never showed {what} ({texts:?}); its screen:\n{screen}");
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "tui"];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    fn type_text(&self, text: &str) {
        self.run(&["send-keys", "-t", "tui", "-l", text]);
    }

    /// The status bar's count of sends waiting for the relay, if it shows one.
    fn waiting(&self) -> Option<u64> {
        let screen = self.screen();
        let (before, _) = screen.split_once(" waiting)")?;
        before.rsplit('(').next()?.parse().ok()
    }

    /// Whether the program in the pane has exited.
    fn exited(&self) -> bool {
        self.run(&["display-message", "-p", "-t", "tui", "#{pane_dead}"]).trim() == "1"
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").arg("-S").arg(&self.socket).arg("kill-server").output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_an_incoming_message_and_reply_in_its_thread_from_the_tui() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = relay(&tmp.path().join("origin"), "127.0.0.1:0", None).await;
    let (homes, ids) = users(tmp.path(), &origin, &["alice", "bob"]);
    let [alice, bob]: [&Home; 2] = [&homes[0], &homes[1]];
    // The conversation exists before the TUI opens; the message to answer arrives while it is open.
    bob.ok(&["dm", "alice", "hi alice, a question coming"]);
    alice.await_text("dm:bob", "hi alice, a question coming");
    // A newer chat above it, so selecting it takes a move.
    bob.ok(&["mail", "send", "--to", "alice", "--subject", "agenda", "attached"]);
    eventually("alice has the mail", || alice.ok(&["mail", "list"]).contains("agenda").then_some(()));

    let exe = common::exe();
    let home = alice.dir.to_str().unwrap().to_string();
    let tui = Tmux::start(tmp.path(), 120, 30, &[exe.to_str().unwrap(), "--home", &home, "tui"]);
    let screen = tui.await_screen("the chat list", &["chats", "> ✉ mail", "  @ bob", "relay up"]);
    assert!(screen.find("✉ mail") < screen.find("@ bob"), "most recent first:\n{screen}");
    // Select the conversation and open it.
    tui.keys(&["j"]);
    tui.await_screen("the selection on bob", &["> @ bob"]);
    tui.keys(&["Enter"]);
    tui.await_screen("the open conversation", &["@ bob", "bob: hi alice, a question coming"]);

    // Read an incoming message, live.
    let question = bob.ok(&["dm", "alice", "where do we meet on Tuesday?"]);
    let screen = tui.await_screen("the incoming message", &["bob: where do we meet on Tuesday?"]);
    assert!(!screen.contains("(pending)"), "{screen}");

    // Reply in its thread: `r` on the selected (newest) message, type, Enter.
    tui.keys(&["r"]);
    tui.await_screen("the thread compose box", &["reply in thread to bob: where do we meet"]);
    tui.type_text("at the library, 10:00");
    tui.keys(&["Enter"]);
    tui.await_screen("the reply under its root", &["↳", "me: at the library, 10:00"]);

    // The other device has it, in the thread.
    let reply = eventually("bob has the reply", || bob.read(&format!("dm:{}", ids[0])).into_iter().find(|m| m["text"] == "at the library, 10:00"));
    assert_eq!(reply["reply_to"], question.as_str(), "a reply in the question's thread: {reply}");
    assert_eq!(reply["from"], "alice");

    // Help, and back.
    tui.keys(&["?"]);
    tui.await_screen("the help", &["keys", "reply in the selected message's thread"]);
    tui.keys(&["Escape"]);

    // The relay goes away: the TUI says so, and a send is queued rather than lost.
    origin.shutdown().await;
    tui.await_screen("the relay's loss", &["relay unreachable: sends are queued"]);
    tui.keys(&["Enter"]);
    tui.type_text("sent while the relay is down");
    tui.keys(&["Enter"]);
    tui.await_screen("the queued message", &["me: sent while the relay is down"]);
    eventually("the status bar counts what waits", || tui.waiting().filter(|n| *n > 0));

    tui.keys(&["q"]);
    eventually("the TUI exits on q", || tui.exited().then_some(()));
    // The screen is the shell's again: the TUI restored the terminal.
    let after = tui.screen();
    assert!(!after.contains("chats"), "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_multisig_signing_is_approved_on_screen_with_secures_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = relay(&tmp.path().join("origin"), "127.0.0.1:0", None).await;
    let (homes, _) = users(tmp.path(), &origin, &["alice", "bob"]);
    let [alice, bob]: [&Home; 2] = [&homes[0], &homes[1]];
    let (_, params) = common::multisig_spend(&[alice, bob]);
    let model = common::plugin_artifacts::wasm("multisig");
    let id = alice.ok(&["pipeline", "create", model.to_str().unwrap(), "--members", "bob", "--name", "spend", "--params", &params]);
    alice.ok(&["pipeline", "act", &id, "transaction", "--yes"]);
    let status = |h: &Home| -> String {
        let s: serde_json::Value = serde_json::from_str(&h.ok(&["pipeline", "show", &id, "--json"])).unwrap();
        s["status"].as_str().unwrap().to_string()
    };
    eventually("bob has the proposal", || bob.run(&["pipeline", "show", &id]).status.success().then(|| status(bob)).filter(|s| s == "1 of 2 signatures"));

    let exe = common::exe();
    let home = bob.dir.to_str().unwrap().to_string();
    let tui = Tmux::start(tmp.path(), 140, 36, &[exe.to_str().unwrap(), "--home", &home, "tui"]);
    tui.await_screen("the chat list", &["chats", "⚙ spend", "relay up"]);
    // Select the pipeline (a bounded walk down the list) and open it: its pane runs the model.
    for _ in 0..8 {
        let before = tui.screen();
        if before.contains("> ⚙ spend") {
            break;
        }
        tui.keys(&["j"]);
        eventually("the selection moves down", || (tui.screen() != before).then_some(()));
    }
    tui.await_screen("the selection on the pipeline", &["> ⚙ spend"]);
    tui.keys(&["Enter"]);
    tui.await_screen("the pipeline's pane", &["1 of 2 signatures", "/act sign"]);

    // Refused first: nothing is signed or sent.
    tui.keys(&["Enter"]);
    tui.type_text("/act sign");
    tui.keys(&["Enter"]);
    tui.await_screen("Secure's summary to approve", &["approve signing", "pay 99000 sat to", "fee 1000 sat", "y sign exactly this"]);
    tui.keys(&["n"]);
    tui.await_screen("the refusal", &["nothing was signed"]);
    assert_eq!(status(alice), "1 of 2 signatures");

    // Then approved: Secure signs what was shown, and the step reaches alice.
    tui.keys(&["Enter"]);
    tui.type_text("/act sign");
    tui.keys(&["Enter"]);
    tui.await_screen("Secure's summary again", &["approve signing", "pay 99000 sat to"]);
    tui.keys(&["y"]);
    tui.await_screen("the signed step", &["signed and sent"]);
    eventually("alice has both signatures", || (status(alice) == "2 of 2 signatures").then_some(()));
    tui.await_screen("bob's pane, updated", &["2 of 2 signatures", "/act finalize"]);
    tui.keys(&["q"]);
    eventually("the TUI exits on q", || tui.exited().then_some(()));
    origin.shutdown().await;
}
