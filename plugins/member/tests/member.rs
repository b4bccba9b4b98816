//! The member plugin end to end: a real relay on 127.0.0.1, the plugin run as a tool
//! (`canopy_sdk::tool::run`, what `canopy plugin run` does) with its state persisting across
//! runs, and real member devices (`canopy_msg_core::Device`) that publish key packages over
//! an SDK client and join from the welcomes and commits the plugin publishes.
//!
//! Needs the built plugin: `scripts/build-plugins.sh` (as `scripts/test-all.sh` runs first).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use canopy_msg_core::device::{Device, Event};
use canopy_msg_core::engine::hex;
use canopy_msg_core::{Key, MemoryBackend, Org, Outgoing};
use canopy_relay::{Relay, RelayConfig, RelayHandle, StoreKind};
use canopy_sdk::tool::{self, ToolOptions, ToolOutcome};
use canopy_sdk::{Chunk, Client, ConnectOptions, Filter, ReplayMode, SubEvent, Trust};

#[path = "../../../framework/tests/support/plugin_artifacts.rs"]
mod plugin_artifacts;

const DOMAIN: &str = "example.com";
const ORG: u32 = 7;
/// Names that must never appear in the clear in the plugin's state.
const TEAM: &str = "night-shift-operators";
const CHANNEL: &str = "general-assembly-hall";
const WAIT: Duration = Duration::from_secs(60);

fn org() -> Org {
    Org::new(DOMAIN, ORG).unwrap()
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

async fn client(relay: &RelayHandle) -> Client {
    let mut opts = ConnectOptions::new(relay.local_addr(), Trust::CaPem(relay.cert_pem().to_string()));
    opts.subscription_buffer = 1 << 16;
    within("connecting", Client::connect(opts)).await.unwrap()
}

/// The admin: the plugin file, its state directory and its state key.
struct Admin {
    wasm: PathBuf,
    state: PathBuf,
    cache: PathBuf,
    key: String,
}

impl Admin {
    /// One `canopy plugin run member.wasm -- ARGS…`, with `key` as the state key.
    async fn run_with_key(&self, relay: &RelayHandle, key: &str, args: &[&str]) -> Result<ToolOutcome, String> {
        let client = client(relay).await;
        let mut options = ToolOptions::new(&self.wasm, args.iter().map(|s| s.to_string()).collect());
        options.config = canopy_msg_core::committer::config::base(DOMAIN, ORG, key);
        options.state = Some(self.state.clone());
        options.cache_dir = Some(self.cache.clone());
        // The first run compiles the plugin (≈ 1.8 MB of Wasm), slow on a loaded machine.
        options.timeout = Duration::from_secs(900);
        let started = Instant::now();
        let outcome = tool::run(&client, options, |_| {}).await.map_err(|e| e.to_string());
        eprintln!("member {}: {:?} in {:?}", args.join(" "), outcome.as_ref().map(|o| &o.answer), started.elapsed());
        client.close();
        outcome
    }

    /// A run that must succeed, with its answer; the relay must refuse none of its publishes.
    async fn ok(&self, relay: &RelayHandle, args: &[&str]) -> String {
        let outcome = self.run_with_key(relay, &self.key, args).await.unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert_eq!(outcome.refused, 0, "{args:?}: the relay refused a publish");
        outcome.answer.unwrap_or_else(|e| panic!("{args:?} failed: {e}"))
    }

    /// A run whose command must fail: its one-line error.
    async fn fails(&self, relay: &RelayHandle, args: &[&str]) -> String {
        let outcome = self.run_with_key(relay, &self.key, args).await.unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let err = outcome.answer.expect_err("the command must fail");
        assert!(!err.contains('\n'), "one line: {err}");
        err
    }
}

async fn publish(client: &Client, out: &[Outgoing]) {
    for o in out {
        within("publishing", client.publish(Chunk::new(o.name, o.expiry_ms, o.data.clone()).unwrap())).await.unwrap();
    }
}

/// Every chunk cached under `filters`, in name order.
async fn cached(client: &Client, filters: &[Filter]) -> Vec<Chunk> {
    let mut all = Vec::new();
    for filter in filters {
        let mut sub = within("subscribing", client.subscribe(*filter, ReplayMode::CachedOnly)).await.unwrap();
        loop {
            match within("the replay", sub.next()).await.expect("subscription open") {
                SubEvent::Chunk(c) => all.push(c),
                SubEvent::ReplayDone => break,
                SubEvent::Gap => {}
                SubEvent::Error { code, message } => panic!("{code}: {message}"),
            }
        }
    }
    all.sort_by_key(|c| c.name());
    all
}

fn ingest(device: &mut Device<MemoryBackend>, chunks: &[Chunk]) -> Vec<Event> {
    device.ingest(chunks.iter().map(|c| (c.name(), c.data().as_ref()))).unwrap()
}

/// Everything a member of `team` reads: its welcome, the team's commits and messages.
fn member_filters(team: u32, hkp: &[u8]) -> Vec<Filter> {
    vec![org().welcome_filter(hkp), org().team_commits(team).unwrap(), org().team_messages(team).unwrap()]
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { out.extend(files_under(&path)) } else { out.push(path) }
    }
    out
}

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_creates_a_team_and_a_channel_and_adds_devices_by_hkp() {
    let dir = tempfile::tempdir().unwrap();
    let config = RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data: dir.path().join("relay"),
        store: StoreKind::Memory,
        ..RelayConfig::default()
    };
    let relay = Relay::spawn(config).await.expect("relay starts");
    let admin = Admin {
        wasm: plugin_artifacts::wasm("member"),
        state: dir.path().join("member-state"),
        // Compiling the plugin takes a while with a debug build of wasmtime: compile it once
        // for every run of this test, in the target directory.
        cache: plugin_artifacts::target_dir().join("member-test-plugin-cache"),
        key: hex(&[0x42; 32]),
    };

    // Before `org init`, nothing works but `org init`.
    let err = admin.fails(&relay, &["team", "create", TEAM]).await;
    assert!(err.contains("not initialised"), "{err}");
    assert_eq!(admin.ok(&relay, &["org", "init"]).await, format!("org {ORG} initialised"));
    let err = admin.fails(&relay, &["org", "init"]).await;
    assert!(err.contains("already initialised"), "{err}");
    let team = admin.ok(&relay, &["team", "create", TEAM]).await;
    assert_eq!(team, "2", "team 1 carries device management");
    let team: u32 = team.parse().unwrap();
    let err = admin.fails(&relay, &["team", "create", TEAM]).await;
    assert!(err.contains("exists"), "{err}");
    assert_eq!(admin.ok(&relay, &["channel", "create", TEAM, CHANNEL]).await, "2", "channel 1 carries team management");
    let err = admin.fails(&relay, &["channel", "create", "nope", "x"]).await;
    assert_eq!(err, "unknown team nope");

    // Two devices publish key packages and are added by hKP; they get ids 1 and 2 and join.
    let net = client(&relay).await;
    let mut devices = Vec::new();
    for expected in [1u32, 2] {
        let mut device = Device::open(Key::random(), MemoryBackend::default(), org()).unwrap();
        let (hkp, out) = device.key_package(canopy_sdk::now_ms(), 3_600_000, false).unwrap();
        publish(&net, &out).await;
        let started = Instant::now();
        let which = if expected == 1 { TEAM.to_string() } else { team.to_string() };
        let id = admin.ok(&relay, &["team", "add", &which, &hex(&hkp)]).await;
        eprintln!("team add (a whole tool run) took {:?}", started.elapsed());
        assert_eq!(id, expected.to_string());
        let events = ingest(&mut device, &cached(&net, &member_filters(team, &hkp)).await);
        assert!(events.contains(&Event::Joined { group: team.into(), device: expected }), "{events:?}");
        assert_eq!(device.resolve_channel(team, CHANNEL).unwrap(), 2);
        devices.push(device);
    }
    // The first device catches up on the commit that added the second; both are at the
    // committer's epoch.
    let all = cached(&net, &[org().team_commits(team).unwrap()]).await;
    ingest(&mut devices[0], &all);
    let epoch = |d: &Device<MemoryBackend>| d.teams().find(|t| t.0 == team).unwrap().2;
    assert_eq!(epoch(&devices[0]), 3);
    assert_eq!(epoch(&devices[1]), 3);

    // Listings.
    let teams = json_lines(&admin.ok(&relay, &["teams", "--json"]).await);
    assert_eq!(
        teams,
        vec![
            serde_json::json!({"id": 1, "name": "devices", "epoch": 0, "devices": 1}),
            serde_json::json!({"id": team, "name": TEAM, "epoch": 3, "devices": 3}),
        ]
    );
    assert_eq!(
        admin.ok(&relay, &["teams"]).await,
        format!("1 devices epoch=0 devices=1\n{team} {TEAM} epoch=3 devices=3")
    );
    assert_eq!(admin.ok(&relay, &["team", "devices", TEAM]).await, "0 leaf=0\n1 leaf=1\n2 leaf=2");
    let listed = json_lines(&admin.ok(&relay, &["team", "devices", "2", "--json"]).await);
    assert_eq!(listed[2], serde_json::json!({"device": 2, "leaf": 2}));

    // A device already in the team is refused, even with a fresh key package.
    let (hkp0, out) = devices[0].key_package(canopy_sdk::now_ms(), 3_600_000, false).unwrap();
    publish(&net, &out).await;
    let err = admin.fails(&relay, &["team", "add", TEAM, &hex(&hkp0)]).await;
    assert!(err.contains("is already in team"), "{err}");

    // Failures that change nothing.
    let mut again = Device::open(Key::random(), MemoryBackend::default(), org()).unwrap();
    let (hkp, out) = again.key_package(canopy_sdk::now_ms(), 3_600_000, false).unwrap();
    publish(&net, &out).await;
    // An hKP nobody published; one that is not hex; and one whose name (its first 54 bits)
    // holds a key package that is not it.
    let mut unknown = hkp.clone();
    unknown[0] ^= 0xff;
    let err = admin.fails(&relay, &["team", "add", TEAM, &hex(&unknown)]).await;
    assert!(err.starts_with(&format!("no key package for hKP {} on the relay", hex(&unknown))), "{err}");
    let err = admin.fails(&relay, &["team", "add", TEAM, "zz-not-hex"]).await;
    assert!(err.contains("is not an hKP"), "{err}");
    let mut lookalike = hkp.clone();
    lookalike[31] ^= 1;
    let err = admin.fails(&relay, &["team", "add", TEAM, &hex(&lookalike)]).await;
    assert!(err.contains("what is published under its name is not it"), "{err}");
    assert!(err.contains(&hex(&hkp)), "names the hKP it found: {err}");
    let err = admin.fails(&relay, &["team", "add", "99", &hex(&hkp)]).await;
    assert_eq!(err, "unknown team 99");
    assert!(admin.ok(&relay, &["teams"]).await.contains("epoch=3 devices=3"), "no failed command moved the team");

    // A wrong key fails cleanly, in init, and leaves the state as it was.
    let wrong = admin.run_with_key(&relay, &hex(&[0x43; 32]), &["teams"]).await.expect_err("a wrong key fails");
    assert!(wrong.contains("wrong passphrase or key"), "{wrong}");
    assert!(!wrong.contains('\n'), "{wrong}");
    let bad = admin.run_with_key(&relay, "abcd", &["teams"]).await.expect_err("a malformed key fails");
    assert!(bad.contains("64 hex digits"), "{bad}");
    assert_eq!(json_lines(&admin.ok(&relay, &["teams", "--json"]).await), teams);

    // Nothing in the plugin's state names a team or a channel in the clear.
    let files = files_under(&admin.state);
    assert!(!files.is_empty());
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        for secret in [TEAM, CHANNEL] {
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "{secret:?} in {}", file.display());
        }
    }
    net.close();
    relay.shutdown().await;
}
