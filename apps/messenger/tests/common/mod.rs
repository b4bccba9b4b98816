//! Shared helpers: real relays (in-process, on 127.0.0.1) and real `canopy-msg` processes,
//! each device in a home of its own.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use canopy_relay::{Relay, RelayConfig, RelayHandle, StoreKind};

#[path = "../../../../framework/tests/support/plugin_artifacts.rs"]
pub mod plugin_artifacts;

/// Upper bound for anything awaited.
pub const WAIT: Duration = Duration::from_secs(60);

/// Logs to the test output when `RUST_LOG` is set.
pub fn logs() {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
}

/// A fjall relay on `listen` with its data in `data`, under `parent` if given.
pub async fn relay(data: &Path, listen: &str, parent: Option<&RelayHandle>) -> RelayHandle {
    logs();
    let mut config = RelayConfig { listen: listen.parse().unwrap(), data: data.to_path_buf(), store: StoreKind::Fjall, ..RelayConfig::default() };
    if let Some(p) = parent {
        config.parent = Some(p.local_addr().to_string());
        config.parent_fingerprint = Some(p.fingerprint().to_string());
    }
    let deadline = Instant::now() + WAIT;
    loop {
        match Relay::spawn(config.clone()).await {
            Ok(r) => return r,
            // A relay restarted on its old port may find it held for a moment.
            Err(e) if format!("{e:#}").contains("binding") && Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("relay: {e:#}"),
        }
    }
}

/// The `canopy-msg` binary.
pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_canopy-msg"))
}

/// One home: a device or the admin.
pub struct Home {
    /// The home directory.
    pub dir: PathBuf,
}

impl Home {
    /// A home in `root/name`.
    pub fn new(root: &Path, name: &str) -> Home {
        Home { dir: root.join(name) }
    }

    /// Runs `canopy-msg --home DIR args…`.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, None)
    }

    /// Runs `canopy-msg --home DIR args…` with `CANOPY_MSG_PASSPHRASE` set to `passphrase`
    /// (unset when `None`), and no terminal to prompt on.
    pub fn run_with(&self, args: &[&str], passphrase: Option<&str>) -> Output {
        let mut cmd = Command::new(exe());
        cmd.stdin(std::process::Stdio::null());
        cmd.arg("--home").arg(&self.dir).args(args);
        cmd.env("CANOPY_MSG_MEMBER_PLUGIN", plugin_artifacts::wasm("member"));
        // One compiled plugin for every test's admin.
        cmd.env("CANOPY_MSG_PLUGIN_CACHE", plugin_artifacts::target_dir().join("msg-test-plugin-cache"));
        match passphrase {
            Some(p) => cmd.env("CANOPY_MSG_PASSPHRASE", p),
            None => cmd.env_remove("CANOPY_MSG_PASSPHRASE"),
        };
        cmd.output().expect("canopy-msg runs")
    }

    /// Runs `canopy-msg --home DIR args…` with extra environment variables.
    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(exe());
        cmd.stdin(std::process::Stdio::null());
        cmd.arg("--home").arg(&self.dir).args(args);
        cmd.env("CANOPY_MSG_MEMBER_PLUGIN", plugin_artifacts::wasm("member"));
        cmd.env("CANOPY_MSG_PLUGIN_CACHE", plugin_artifacts::target_dir().join("msg-test-plugin-cache"));
        cmd.env_remove("CANOPY_MSG_PASSPHRASE");
        cmd.envs(env.iter().copied());
        cmd.output().expect("canopy-msg runs")
    }

    /// Runs a command that must succeed; returns its stdout, trimmed.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "canopy-msg {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Runs a command that must fail; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "canopy-msg {args:?} succeeded: {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8(out.stderr).unwrap()
    }

    /// `init` against `relay`.
    pub fn init(&self, relay: &RelayHandle) {
        self.init_with(relay, &[]);
    }

    /// `init` against `relay`, with more options.
    pub fn init_with(&self, relay: &RelayHandle, extra: &[&str]) {
        let ca = self.dir.with_extension("ca.pem");
        std::fs::create_dir_all(self.dir.parent().unwrap()).unwrap();
        std::fs::write(&ca, relay.cert_pem()).unwrap();
        let addr = relay.local_addr().to_string();
        let mut args = vec!["init", "--relay", &addr, "--ca", ca.to_str().unwrap(), "--domain", "example.com", "--org", "7"];
        args.extend_from_slice(extra);
        self.ok(&args);
    }

    /// `init` against `relay` as a device of org `org` of example.com.
    pub fn init_org(&self, relay: &RelayHandle, org: u32) {
        let ca = self.dir.with_extension("ca.pem");
        std::fs::create_dir_all(self.dir.parent().unwrap()).unwrap();
        std::fs::write(&ca, relay.cert_pem()).unwrap();
        let addr = relay.local_addr().to_string();
        let org = org.to_string();
        self.ok(&["init", "--relay", &addr, "--ca", ca.to_str().unwrap(), "--domain", "example.com", "--org", &org]);
    }

    /// This home's user id.
    pub fn user(&self) -> String {
        self.ok(&["whoami"])
    }

    /// Reads `read TEAM/CHANNEL --json` as JSON values.
    pub fn read(&self, target: &str) -> Vec<serde_json::Value> {
        self.ok(&["read", target, "--json"]).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// What every device of a conversation agrees on: `read --json` without `from`,
    /// `conversation` and `marked`, which say it as this device sees it (`me`, a contact
    /// name, `dm:` and the other user, its own stars).
    pub fn shared_view(&self, target: &str) -> Vec<serde_json::Value> {
        let mut view = self.read(target);
        for m in &mut view {
            let m = m.as_object_mut().expect("a message is an object");
            m.remove("from");
            m.remove("conversation");
            m.remove("marked");
        }
        view
    }

    /// Waits until `teams --json` lists `team`.
    pub fn await_team(&self, team: &str) -> serde_json::Value {
        let deadline = Instant::now() + WAIT;
        let mut pause = Duration::from_millis(10);
        loop {
            let out = self.ok(&["teams", "--json"]);
            if let Some(t) = out.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).find(|t| t["name"] == team || t["id"].as_u64().is_some_and(|id| id.to_string() == team)) {
                return t;
            }
            assert!(Instant::now() < deadline, "{} never joined {team}", self.dir.display());
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// Waits until `read` shows a message whose text is `text`.
    pub fn await_text(&self, target: &str, text: &str) {
        let deadline = Instant::now() + WAIT;
        let mut pause = Duration::from_millis(5);
        loop {
            if self.read(target).iter().any(|m| m["text"] == text) {
                return;
            }
            if Instant::now() >= deadline {
                let status = self.run(&["status", "--json"]);
                panic!(
                    "{} never showed {text:?} in {target}; it shows {:?}; its status: {}",
                    self.dir.display(),
                    self.read(target).iter().map(|m| m["text"].clone()).collect::<Vec<_>>(),
                    String::from_utf8_lossy(&status.stdout)
                );
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        if self.dir.join("config.toml").exists() {
            let _ = Command::new(exe()).arg("--home").arg(&self.dir).arg("down").output();
        }
    }
}

/// Every file under `dir`, recursively.
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The files under `dir` that contain `needle`.
pub fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    files(dir).into_iter().filter(|p| std::fs::read(p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))).collect()
}

/// An org with a team `ops` and a channel `general`, administered from `root/admin`.
pub fn org(root: &Path, relay: &RelayHandle) -> Home {
    let admin = Home::new(root, "admin");
    admin.init(relay);
    admin.ok(&["admin", "org", "init"]);
    assert_eq!(admin.ok(&["admin", "team", "create", "ops"]), "2");
    assert_eq!(admin.ok(&["admin", "channel", "create", "ops", "general"]), "2");
    admin
}

/// A device of `name` on `relay`, up, added to `ops` by `admin`.
pub fn device(root: &Path, name: &str, relay: &RelayHandle, admin: &Home) -> Home {
    let home = Home::new(root, name);
    home.init(relay);
    home.ok(&["up"]);
    let hkp = home.ok(&["device", "key-package"]);
    admin.ok(&["admin", "team", "add", "ops", &hkp]);
    home.await_team("ops");
    home
}

/// Waits until every home shows the same epoch of `ops` as the admin.
pub fn await_epoch(admin: &Home, homes: &[&Home]) {
    let teams = admin.ok(&["admin", "teams", "--json"]);
    let epoch = teams.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).find(|t| t["name"] == "ops").unwrap()["epoch"].as_u64().unwrap();
    let deadline = Instant::now() + WAIT;
    for h in homes {
        while h.await_team("ops")["epoch"].as_u64().unwrap() != epoch {
            assert!(Instant::now() < deadline, "{} never reached epoch {epoch}", h.dir.display());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The texts a home shows in `ops/general`, in order.
pub fn texts(home: &Home) -> Vec<String> {
    home.read("ops/general").iter().map(|m| m["text"].as_str().unwrap().to_string()).collect()
}

/// Pids of a home's background processes.
pub fn pids(home: &Home) -> Vec<i32> {
    ["network", "secure"].iter().filter_map(|n| std::fs::read_to_string(home.dir.join(format!("run/{n}.pid"))).ok()?.trim().parse().ok()).collect()
}

/// An SDK client of `relay`, as any subscriber on the network would be.
pub async fn client(relay: &RelayHandle) -> canopy_sdk::Client {
    let trust = canopy_sdk::Trust::CaPem(relay.cert_pem().to_owned());
    canopy_sdk::Client::connect(canopy_sdk::ConnectOptions::new(relay.local_addr(), trust)).await.expect("client connects")
}

/// Every chunk `relay` holds, as a `/0` subscription (`CachedOnly`) returns them.
pub async fn cached(relay: &RelayHandle) -> Vec<canopy_sdk::Chunk> {
    use canopy_sdk::{Filter, ReplayMode, SubEvent};
    let client = client(relay).await;
    let mut sub = client.subscribe(Filter::ALL, ReplayMode::CachedOnly).await.expect("subscribe /0");
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, sub.next()).await.expect("the replay ends") {
            Some(SubEvent::Chunk(c)) => out.push(c),
            Some(SubEvent::ReplayDone) | None => break,
            Some(SubEvent::Gap) => {}
            Some(SubEvent::Error { code, message }) => panic!("/0 on {}: {code}: {message}", relay.local_addr()),
        }
    }
    client.close();
    out
}

/// Asserts that no chunk a `/0` subscription on `relay` returns contains any of `texts`.
pub async fn assert_ciphertext_only(relay: &RelayHandle, texts: &[&str]) -> usize {
    let chunks = cached(relay).await;
    assert!(!chunks.is_empty(), "{} holds nothing", relay.local_addr());
    for c in &chunks {
        for t in texts {
            assert!(!c.data().windows(t.len()).any(|w| w == t.as_bytes()), "{t:?} in chunk {} on {}", c.name(), relay.local_addr());
        }
    }
    chunks.len()
}

/// `status --json` of a running home.
pub fn status(home: &Home) -> serde_json::Value {
    serde_json::from_str(&home.ok(&["status", "--json"])).expect("status is JSON")
}

/// The `ops` team's entry in `status --json`, once Secure answers.
pub fn team_status(home: &Home) -> serde_json::Value {
    let s = status(home);
    s["secure"]["teams"].as_array().into_iter().flatten().find(|t| t["name"] == "ops").cloned().unwrap_or(serde_json::Value::Null)
}

/// Polls `check` until it returns `Some`, backing off up to 100 ms, for at most [`WAIT`].
pub fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Homes `names`, in orgs 7, 8, …, up, each naming every other, and knowing a device of each.
pub fn users(root: &std::path::Path, origin: &canopy_relay::RelayHandle, names: &[&str]) -> (Vec<Home>, Vec<String>) {
    let homes: Vec<Home> = names.iter().map(|n| Home::new(root, n)).collect();
    for (i, h) in homes.iter().enumerate() {
        h.init_org(origin, 7 + i as u32);
        h.ok(&["up"]);
    }
    let ids: Vec<String> = homes.iter().map(Home::user).collect();
    for (i, h) in homes.iter().enumerate() {
        for (j, id) in ids.iter().enumerate() {
            if i != j {
                h.ok(&["contact", "add", id, names[j]]);
            }
        }
        eventually("a device of every contact is known", || {
            let c = h.ok(&["contacts", "--json"]);
            (c.lines().count() == names.len() - 1 && c.lines().all(|l| l.contains("\"devices\":1"))).then_some(())
        });
    }
    (homes, ids)
}

/// Publishes a core device's chunks through an SDK client, each acknowledged.
pub async fn publish(client: &canopy_sdk::Client, out: Vec<canopy_msg_core::Outgoing>) {
    for o in out {
        client.publish(canopy::Chunk::new(o.name, o.expiry_ms, o.data).unwrap()).await.expect("the relay takes it");
    }
}

/// Feeds an in-process device (a user running the core in the test) everything `relay` holds
/// until `done` finds what it waits for.
pub async fn catch_up<T>(
    m: &mut canopy_msg_core::Device<canopy_msg_core::MemoryBackend>,
    relay: &RelayHandle,
    what: &str,
    done: impl Fn(&canopy_msg_core::Device<canopy_msg_core::MemoryBackend>) -> Option<T>,
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        let chunks = cached(relay).await;
        m.ingest(chunks.iter().map(|c| (c.name(), c.data().as_ref()))).unwrap();
        if let Some(v) = done(m) {
            return v;
        }
        assert!(Instant::now() < deadline, "the in-process device never got {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A 2-of-n Bitcoin multisig spend among `homes`: each gets a new `btc` key; returns the
/// descriptor and the model's parameters (regtest; 100 000 sat in, 99 000 to the first
/// user's address, 1 000 fee).
pub fn multisig_spend(homes: &[&Home]) -> (String, String) {
    let keys: Vec<serde_json::Value> = homes
        .iter()
        .map(|h| {
            h.ok(&["btc", "key", "new"]);
            serde_json::from_str(&h.ok(&["btc", "key", "show", "--json"])).unwrap()
        })
        .collect();
    let publics: Vec<&str> = keys.iter().map(|k| k["public_key"].as_str().unwrap()).collect();
    let descriptor = format!("wsh(sortedmulti(2,{}))", publics.join(","));
    let params = serde_json::json!({
        "descriptor": descriptor,
        "network": "regtest",
        "funding": {"txid": "ab".repeat(32), "vout": 0, "amount_sat": 100_000},
        "outputs": [{"address": keys[0]["address"], "amount_sat": 99_000}],
        "fee_sat": 1_000,
    });
    (descriptor, params.to_string())
}
