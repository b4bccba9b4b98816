//! `up`, `down`, and the two background processes `up` starts: Network (a leaf relay serving
//! Secure over `HOME/network.sock`) and Secure.

use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use canopy_msg_secure::proto::{Reply, Request};

use crate::home::{Home, PASSPHRASE_ENV};

pub use canopy_msg_secure::proto::NetworkStatus;

const PROCESSES: [&str; 2] = ["network", "secure"];

fn pid_of(home: &Home, name: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(home.path(&format!("run/{name}.pid"))).ok()?.trim().parse().ok()?;
    alive(pid).then_some(pid)
}

/// Whether `pid` runs: it exists and is not a zombie (a killed process whose parent has not
/// reaped it yet still has a `/proc` entry).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !matches!(rest.trim_start().chars().next(), Some('Z' | 'X'))),
        Err(_) => false,
    }
}

/// Each background process and its pid, if running.
pub fn running(home: &Home) -> Vec<(&'static str, Option<i32>)> {
    PROCESSES.iter().map(|n| (*n, pid_of(home, n))).collect()
}

/// Network's last status report.
pub fn network_status(home: &Home) -> Option<NetworkStatus> {
    serde_json::from_slice(&std::fs::read(home.path("network.json")).ok()?).ok()
}

fn ping(home: &Home) -> bool {
    crate::ui::Secure::connect(home).and_then(|mut s| s.call(&Request::Ping)).is_ok_and(|r| r == Reply::Pong)
}

fn spawn(home: &Home, name: &str, passphrase: Option<&str>) -> anyhow::Result<std::process::Child> {
    let exe = std::env::current_exe().context("locating canopy-msg")?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(home.path(&format!("logs/{name}.log")))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--home").arg(&home.dir).arg(name).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // Its own process group: a terminal's Ctrl-C to the UI does not reach it.
    cmd.process_group(0);
    if let Some(p) = passphrase {
        cmd.env(PASSPHRASE_ENV, p);
    }
    cmd.spawn().with_context(|| format!("starting {name}"))
}

fn last_log_line(home: &Home, name: &str) -> String {
    let text = std::fs::read_to_string(home.path(&format!("logs/{name}.log"))).unwrap_or_default();
    let line = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no log").trim();
    line.strip_prefix("canopy-msg: ").unwrap_or(line).to_string()
}

/// `up`: starts Network, then Secure, and returns once Secure answers.
pub fn up(home: &Home) -> anyhow::Result<()> {
    let config = home.config()?;
    if ping(home) && pid_of(home, "network").is_some() {
        println!("already up");
        return Ok(());
    }
    let passphrase = if config.key == "passphrase" { Some(crate::home::passphrase(false)?) } else { None };
    std::fs::create_dir_all(home.path("run"))?;
    std::fs::create_dir_all(home.path("logs"))?;
    let mut children = Vec::new();
    let started = start(home, passphrase.as_deref(), &mut children);
    if started.is_err() {
        // All or nothing: a half-started device (a Network whose Secure would not open, say
        // after a wrong passphrase) would look up to the next `up` and to `status`.
        stop_started(home, &mut children);
    }
    started?;
    println!("up");
    Ok(())
}

/// Stops the processes this `up` started, after it failed.
fn stop_started(home: &Home, children: &mut [(&str, std::process::Child)]) {
    for (name, child) in children.iter_mut().rev() {
        if !matches!(child.try_wait(), Ok(None)) {
            let _ = std::fs::remove_file(home.path(&format!("run/{name}.pid")));
            continue;
        }
        if let Ok(pid) = i32::try_from(child.id()) {
            terminate(pid);
        }
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(home.path(&format!("run/{name}.pid")));
    }
}

fn start(home: &Home, passphrase: Option<&str>, children: &mut Vec<(&str, std::process::Child)>) -> anyhow::Result<()> {
    if pid_of(home, "network").is_none() {
        // What a killed Network left behind would look like a live one.
        let _ = std::fs::remove_file(home.path("network.json"));
        let _ = std::fs::remove_file(home.path("network.sock"));
        children.push(("network", spawn(home, "network", None)?));
        wait_for(children, || home.path("network.sock").exists() && network_status(home).is_some(), home)?;
    }
    if !ping(home) {
        if let Some(pid) = pid_of(home, "secure") {
            // A Secure that does not answer is stuck: replace it.
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
        children.push(("secure", spawn(home, "secure", passphrase)?));
        wait_for(children, || ping(home), home)?;
    }
    Ok(())
}

fn wait_for(children: &mut [(&str, std::process::Child)], ready: impl Fn() -> bool, home: &Home) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut pause = Duration::from_millis(5);
    loop {
        if ready() {
            return Ok(());
        }
        for (name, child) in children.iter_mut() {
            if let Some(status) = child.try_wait()? {
                bail!("{name} exited ({status}): {}", last_log_line(home, name));
            }
        }
        if Instant::now() > deadline {
            bail!("the processes did not come up within 60 s; see {}", home.path("logs").display());
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Sends `pid` SIGTERM and waits (up to 20 s) until it has exited or is a zombie.
fn terminate(pid: i32) {
    // `kill(1)` rather than libc: this crate stays free of unsafe code.
    let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).stderr(Stdio::null()).status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `down`: stops Secure (cleanly) and Network.
pub fn down(home: &Home) -> anyhow::Result<()> {
    home.config()?;
    if let Ok(mut s) = crate::ui::Secure::connect(home) {
        let _ = s.call(&Request::Stop);
    }
    for name in PROCESSES {
        if let Some(pid) = pid_of(home, name) {
            terminate(pid);
        }
        let _ = std::fs::remove_file(home.path(&format!("run/{name}.pid")));
    }
    println!("down");
    Ok(())
}

/// The Network process: a leaf relay with a fjall cache and a durable outbox, whose parent is
/// the configured relay, serving Secure on `HOME/network.sock` and listening on nothing else.
pub fn network(home: &Home) -> anyhow::Result<()> {
    let config = home.config()?;
    std::fs::write(home.path("run/network.pid"), std::process::id().to_string())?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let mut relay = canopy_relay::RelayConfig::default();
        relay.data = home.path("network");
        relay.parent = Some(config.relay.clone());
        relay.parent_ca = config.ca.clone();
        relay.parent_fingerprint = config.fingerprint.clone();
        relay.parent_token = config.token.clone();
        relay.unix_listen = Some(home.path("network.sock"));
        relay.quic_listen = false;
        // A lost parent is retried often: the device wants its messages out as soon as the
        // relay is back.
        relay.parent_refused_backoff_ms = 30_000;
        let handle = canopy_relay::Relay::spawn(relay).await?;
        tracing::info!("network up: {}", home.path("network.sock").display());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                _ = tick.tick() => {
                    let m = handle.metrics();
                    let status = NetworkStatus {
                        parent_connected: m.parent_connected,
                        outbox: m.store.outbox,
                        chunks: m.store.chunks,
                        written_ms: canopy_sdk::now_ms(),
                    };
                    let tmp = home.path("network.json.tmp");
                    if std::fs::write(&tmp, serde_json::to_vec(&status)?).is_ok() {
                        let _ = std::fs::rename(&tmp, home.path("network.json"));
                    }
                }
            }
        }
        handle.shutdown().await;
        let _ = std::fs::remove_file(home.path("network.json"));
        anyhow::Ok(())
    })
}

/// The Secure process.
pub fn secure(home: &Home) -> anyhow::Result<()> {
    let config = home.config()?;
    let key = home.key(&config)?;
    std::fs::write(home.path("run/secure.pid"), std::process::id().to_string())?;
    let org = canopy_msg_core::Org::new(&config.domain, config.org)?;
    let clock = config.clock.as_deref().map(str::parse::<canopy::Filter>).transpose().map_err(|e| anyhow::anyhow!("clock: {e}"))?;
    canopy_msg_secure::run(canopy_msg_secure::Options {
        state: home.path("secure"),
        ui_socket: home.path("secure.sock"),
        network_socket: home.path("network.sock"),
        key,
        org,
        clock,
        token: config.token.clone(),
        network_status: Some(home.path("network.json")),
    })?;
    let _ = std::fs::remove_file(home.path("run/secure.pid"));
    Ok(())
}

/// `restore FILE`: into this home's state, while its processes are down. Runs the restore
/// as Secure would (this process holds the keys for the moment it takes).
pub fn restore(home: &Home, file: &std::path::Path) -> anyhow::Result<()> {
    let config = home.config()?;
    if running(home).iter().any(|(_, pid)| pid.is_some()) {
        anyhow::bail!("this device's processes are running: `canopy-msg down` first");
    }
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let passphrase = crate::home::backup_passphrase(false)?;
    let key = home.key(&config)?;
    let org = canopy_msg_core::Org::new(&config.domain, config.org)?;
    let (restored, _settings) = canopy_msg_secure::store::restore(&home.path("secure"), key, org, &bytes, passphrase.as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "restored {} conversations, {} messages and {} contacts; run `canopy-msg up`: your other devices add this one to your conversations again, and in teams the admin adds it (`admin team add`)",
        restored.groups, restored.messages, restored.contacts
    );
    Ok(())
}
