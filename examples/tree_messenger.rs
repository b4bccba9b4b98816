//! The demo's second half: the messenger on the relay tree of the first. An admin and two
//! devices, each a home of real `canopy-msg` processes on the local relay, hold a threaded,
//! edited conversation; then every relay's cache is read through a `/0` subscription, as
//! anyone allowed to subscribe could, to show it holds ciphertext only.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use canopy_relay::RelayHandle;
use canopy_sdk::{Filter, ReplayMode, SubEvent};

const WAIT: Duration = Duration::from_secs(60);

/// `canopy-msg`: `$CANOPY_MSG_BIN`, else beside this example (`target/<profile>/canopy-msg`),
/// where `scripts/demo.sh` builds it.
fn canopy_msg() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("CANOPY_MSG_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(Path::parent).context("locating the target directory")?;
    let bin = profile_dir.join("canopy-msg");
    if !bin.is_file() {
        bail!("{} is missing: run the demo with `bash scripts/demo.sh`, which builds it and the member plugin", bin.display());
    }
    Ok(bin)
}

/// One home of `canopy-msg` processes.
struct Home {
    name: &'static str,
    dir: PathBuf,
    exe: PathBuf,
    plugin_cache: PathBuf,
}

impl Home {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--home").arg(&self.dir).args(args);
        // The member plugin, compiled once for every run of the demo.
        cmd.env("CANOPY_MSG_PLUGIN_CACHE", &self.plugin_cache);
        // No passphrase: each home's state is sealed with a key file of its own.
        cmd.env_remove("CANOPY_MSG_PASSPHRASE").stdin(Stdio::null());
        cmd
    }

    /// Runs a command that must succeed; returns its stdout, trimmed.
    fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let Output { status, stdout, stderr } = self.command(args).output().with_context(|| format!("running {}", self.exe.display()))?;
        if !status.success() {
            bail!("{}: canopy-msg {}: {}", self.name, args.join(" "), String::from_utf8_lossy(&stderr).trim());
        }
        Ok(String::from_utf8(stdout)?.trim().to_owned())
    }

    /// Waits until `read TARGET` shows a line containing `text`.
    fn await_text(&self, target: &str, text: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        let mut pause = Duration::from_millis(5);
        while !self.ok(&["read", target])?.contains(text) {
            if Instant::now() > deadline {
                bail!("{} never showed {text:?}", self.name);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Waits until this device has joined `team`.
    fn await_team(&self, team: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        let mut pause = Duration::from_millis(10);
        while !self.ok(&["teams"])?.lines().any(|l| l.split_whitespace().nth(1) == Some(team)) {
            if Instant::now() > deadline {
                bail!("{} never joined {team}", self.name);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(200));
        }
        Ok(())
    }
}

/// Every chunk a `/0` subscription on `relay` returns.
async fn cached(relay: &RelayHandle) -> anyhow::Result<Vec<canopy_sdk::Chunk>> {
    let trust = canopy_sdk::Trust::CaPem(relay.cert_pem().to_owned());
    let client = canopy_sdk::Client::connect(canopy_sdk::ConnectOptions::new(relay.local_addr(), trust)).await?;
    let mut sub = client.subscribe(Filter::ALL, ReplayMode::CachedOnly).await?;
    let mut chunks = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, sub.next()).await? {
            Some(SubEvent::Chunk(c)) => chunks.push(c),
            Some(SubEvent::Gap) => {}
            Some(SubEvent::ReplayDone) | None => break,
            Some(SubEvent::Error { code, message }) => bail!("/0: {code}: {message}"),
        }
    }
    client.close();
    Ok(chunks)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The messenger part of the demo, on the tree `origin ← cloud ← local`.
pub async fn run(root: &Path, relays: [(&str, &RelayHandle); 3]) -> anyhow::Result<()> {
    let exe = canopy_msg()?;
    let plugin_cache = exe.parent().context("target directory")?.join("demo-plugin-cache");
    let local = relays[2].1;
    let ca = root.join("local-ca.pem");
    std::fs::write(&ca, local.cert_pem())?;
    let addr = local.local_addr().to_string();
    let home = |name: &'static str| Home { name, dir: root.join(name), exe: exe.clone(), plugin_cache: plugin_cache.clone() };
    let (admin, alice, bob) = (home("admin"), home("alice"), home("bob"));
    let init = |h: &Home| h.ok(&["init", "--relay", &addr, "--ca", ca.to_str().expect("utf-8 path"), "--domain", "example.com", "--org", "7"]);

    println!("\n== The messenger on the same tree: an admin and two devices on the local relay ==");
    init(&admin)?;
    admin.ok(&["admin", "org", "init"])?;
    let team = admin.ok(&["admin", "team", "create", "ops"])?;
    let channel = admin.ok(&["admin", "channel", "create", "ops", "general"])?;
    println!("  admin   org 7 of example.com; team ops = {team}, channel general = {channel}  (the member plugin, device 0)");
    for device in [&alice, &bob] {
        init(device)?;
        device.ok(&["up"])?;
        let hkp = device.ok(&["device", "key-package"])?;
        let id = admin.ok(&["admin", "team", "add", "ops", &hkp])?;
        device.await_team("ops")?;
        println!("  {:<7} Network and Secure up; key package {}…; added to ops as device {id}", device.name, &hkp[..16]);
    }

    println!("\n== A threaded, edited conversation in ops/general ==");
    let texts = ["is the 2.0 release out?", "yes, the mirrors are in sync", "is the 2.0.1 release out?"];
    let first = alice.ok(&["send", "ops/general", texts[0]])?;
    println!("  alice   send {:?}  -> {first}", texts[0]);
    bob.await_text("ops/general", texts[0])?;
    let reply = bob.ok(&["send", "ops/general", texts[1], "--reply-to", &first])?;
    println!("  bob     reply to {first}: {:?}  -> {reply}", texts[1]);
    alice.await_text("ops/general", texts[1])?;
    alice.ok(&["edit", &first, texts[2]])?;
    println!("  alice   edit {first}: {:?}", texts[2]);
    bob.await_text("ops/general", texts[2])?;
    for device in [&alice, &bob] {
        println!("  {} reads ops/general:", device.name);
        for line in device.ok(&["read", "ops/general"])?.lines() {
            println!("    {line}");
        }
    }

    println!("\n== What the relays hold: ciphertext only ==");
    for (name, relay) in relays {
        let chunks = cached(relay).await?;
        let plain = chunks.iter().filter(|c| texts.iter().chain(&["general"]).any(|t| c.data().windows(t.len()).any(|w| w == t.as_bytes()))).count();
        let bytes: usize = chunks.iter().map(|c| c.data().len()).sum();
        println!("  {name:<7} {} chunks, {bytes} bytes; {plain} contain any message text or channel name", chunks.len());
        if plain > 0 {
            bail!("plaintext on the {name} relay");
        }
    }
    let sample = cached(local).await?;
    let schema = canopy_sdk::Schema::messenger();
    println!("  for example, on the local relay:");
    for c in sample.iter().filter(|c| c.data().len() > 64).take(4) {
        println!("    {}  {:>4} bytes  {}…", schema.render(c.name()), c.data().len(), hex(&c.data()[..24]));
    }

    for device in [&alice, &bob] {
        device.ok(&["down"])?;
    }
    println!("  alice and bob: down");
    Ok(())
}
