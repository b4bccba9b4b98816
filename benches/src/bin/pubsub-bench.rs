//! Messaging throughput and latency, side by side: Canopy's relay against nats-server (core
//! and JetStream) and mosquitto, all with TLS, all driven by Rust clients from this one
//! process.
//!
//! ```text
//! bash scripts/install-peers.sh && cargo run --release -p canopy-benches --bin pubsub-bench
//! cargo run --release -p canopy-benches --bin pubsub-bench -- --smoke   # Canopy only, 200 chunks
//! cargo run --release -p canopy-benches --bin pubsub-bench -- --mtu 1500 # lo at a 1,500-byte MTU
//! ```
//!
//! **Cases.** `P→S`: P publishers and S subscribers, each its own connection. The default
//! cases are 1→1, 1→10, 10→10 and 1→100 (`--cases 1x1,1x10,10x10,1x100`). The payloads of a
//! pass are split between the publishers (each of 10 sends a tenth, a disjoint range of
//! sequence numbers: for Canopy disjoint names under one `/8`, for NATS and MQTT the same
//! subject or topic), and every subscriber must receive every payload of every publisher
//! exactly once; what does not arrive is counted as missing, a repeat as an error.
//!
//! **Runs.** For each system and case a fresh server process is started on a free loopback
//! port; the subscribers connect, subscribe and wait until the server has confirmed the
//! subscription; the publishers connect. The publishers send a warm-up (`--warmup`, not
//! measured), the bench waits until every subscriber has it, then they send `--messages`
//! payloads of 1 KiB as fast as their system lets them (throughput pass), then, on a fresh
//! server, `--paced-messages` at `--paced-rate` per second in total (paced pass; with 10
//! publishers each sends every 10th slot of the one schedule, so the total rate stays the
//! same and evenly spaced). Each payload carries its sequence number and its send time (ns
//! since an `Instant` shared by every client), so each subscriber measures publish→receive
//! latency. Each round runs every system once per case and pass, round-robin (the starting
//! system rotates from round to round), so drift in the machine's speed cannot bias a ratio;
//! the tables show the median of each figure over the rounds.
//!
//! **Systems and semantics.** `--window` (256) is per publisher.
//!
//! - `canopy-memory`, `canopy-fjall`, `canopy-fjall-interval`: the `canopy-relay` binary with
//!   `--store memory`, the default durable fjall store, or fjall with `--sync-interval-ms 200`
//!   (`--sync-interval-ms` here). `Client::publish` resolves on the relay's `Ack`; at most
//!   `--window` publishes are outstanding. With `canopy-fjall` the `Ack` comes after the fsync
//!   that covers the chunk's batch (fsync per batch, the stronger guarantee); with
//!   `canopy-fjall-interval` it comes once the chunk is written, and the store is fsynced
//!   every 200 ms. A relay without `--sync-interval-ms` is detected before the runs: that
//!   system is then skipped with a message and the bench fails at the end (`--smoke` only
//!   notes it). The relay's per-subscriber queue bound `max_queue` is raised from its default
//!   of 1024 frames to 65 536 (`--relay-max-queue`), about nats-server's 64 MiB
//!   per-connection pending limit in 1 KiB messages: none of the systems pushes back from
//!   subscribers to the publisher, and with 1024 a subscriber that falls 1024 chunks behind a
//!   full-speed publisher is ended as a slow consumer.
//! - `canopy-tcp`: `canopy-memory` with the relay's `--tcp-listen` and the clients on
//!   `tcp://` (TLS 1.3 over TCP, the transport NATS and MQTT use here), everything else the
//!   same.
//! - `canopy-tcp-unacked`: `canopy-tcp` whose publishers use `Client::publish_unacked`: no
//!   ack is asked for (the relay answers only a refusal), so, like core NATS's, they never
//!   wait for an answer; the SDK's back-pressure (about 1 MiB unwritten) is their only limit.
//!   The like-for-like peer of `nats`.
//! - `nats`: nats-server core publish, fire and forget (the client's buffer is the only
//!   back-pressure), one `flush` (PING/PONG) at the end.
//! - `nats-flush`: the same with a `flush` after every `--window` publishes: the publisher
//!   knows the server has processed each batch before sending the next.
//! - `jetstream`: nats-server started with `-js` (`jetstream { store_dir }` in a temporary
//!   directory on the same disk as the relay's data). Before the subscribers connect, the
//!   bench creates one stream with file storage on the bench subject (every other setting
//!   default; `max_msgs` and `max_bytes` unlimited, so nothing is refused or discarded). The
//!   publishers use acknowledged JetStream publishes (`jetstream::Context::publish`, whose
//!   future resolves on the stream's `PubAck`), at most `--window` acks outstanding, as
//!   Canopy's. The subscribers are plain core NATS subscriptions on the subject: the server
//!   delivers a message published into a stream to core subscribers as it stores it, which
//!   is what Canopy's live delivery does (a JetStream consumer would add per-message acks and
//!   redelivery state that neither Canopy's subscriptions nor the other peers have). At the
//!   end the bench checks that the stream holds every payload. Debian's nats-server 2.9 acks
//!   a JetStream publish once it has written the message to its block file, before any fsync
//!   (2.9 has no `sync_interval`; the file store syncs on its own schedule), so the
//!   like-for-like Canopy system is `canopy-fjall-interval`; against `canopy-fjall` JetStream
//!   gives the weaker guarantee.
//! - `mosquitto`: MQTT 3.1.1, publish at QoS 1 (each `PUBACK`ed by the broker, at most
//!   `--window` in flight); subscribers subscribe at QoS 0, so delivery to them is, like
//!   Canopy's, a reliable stream without per-message acknowledgements. `TCP_NODELAY` is on at
//!   both ends (`set_tcp_nodelay true`), as nats-server and async-nats have it by default.
//!
//! **CPU per payload.** `srv` is the server process's user + system CPU time (from `/proc`)
//! during the measured pass ÷ payloads published; `cli` the same for this process (every
//! publisher and subscriber).
//!
//! **Threads.** `--threads N` gives every process of the run N worker threads, alike: the
//! bench's clients (its tokio runtime), the relay's network runtime (`TOKIO_WORKER_THREADS`)
//! and nats-server (`GOMAXPROCS`). Unset, each takes its own default, one per core. On a
//! quiet 2-vCPU machine, latency depends on it: idle workers woken on the idle CPU cost tens
//! of microseconds each (docs/performance.md, "Wake-ups across CPUs").
//!
//! **MTU.** Loopback's MTU (printed in the header) is 65 536 on Linux, far above the 1 500
//! bytes of most real networks, and packet sizes decide how much per-packet work TCP and QUIC
//! do. `--mtu N` re-runs the bench (the same arguments without `--mtu`) inside a network
//! namespace it creates for the run (`ip netns add canopy-bench-PID`, `lo` set to MTU N and
//! up), and deletes the namespace afterwards, also on failure, SIGINT or SIGTERM. Needs root
//! (or CAP_SYS_ADMIN) and iproute2.
//!
//! Every server process is killed when its run ends, also on error; every phase has a
//! timeout.

use std::future::{Future, IntoFuture};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use async_nats::jetstream;
use bytes::{BufMut, Bytes, BytesMut};
use canopy_sdk::{Chunk, Client, ConnectOptions, Filter, Name, ReplayMode, SubEvent, Subscription, Trust};
use futures_util::{StreamExt, TryFutureExt};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::{Notify, watch};
use tokio::task::{JoinHandle, JoinSet};

/// Size of every payload, as in the issue: 1 KiB chunks.
const PAYLOAD: usize = 1024;
/// NATS subject and MQTT topic.
const SUBJECT: &str = "bench.data";
const TOPIC: &str = "bench/data";
/// The JetStream stream that captures `SUBJECT`.
const STREAM: &str = "BENCH";
/// The names Canopy publishes under (`0x0b…/8`); the sequence number is the low bits.
const NAME_BASE: u128 = 0x0b << 120;
/// Connecting, subscribing, starting a server.
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Warm-up publish and its delivery.
const WARMUP_TIMEOUT: Duration = Duration::from_secs(60);
/// After the publishers are done: the subscribers' last deliveries.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a JetStream publish waits for its `PubAck` (async-nats's default is 5 s).
const JETSTREAM_ACK_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    CanopyMemory,
    CanopyTcp,
    CanopyTcpUnacked,
    CanopyFjall,
    CanopyFjallInterval,
    Nats,
    NatsFlush,
    JetStream,
    Mosquitto,
}

impl System {
    const ALL: [System; 9] = [
        System::CanopyMemory,
        System::CanopyTcp,
        System::CanopyTcpUnacked,
        System::CanopyFjall,
        System::CanopyFjallInterval,
        System::Nats,
        System::NatsFlush,
        System::JetStream,
        System::Mosquitto,
    ];

    fn label(self) -> &'static str {
        match self {
            System::CanopyMemory => "canopy-memory",
            System::CanopyTcp => "canopy-tcp",
            System::CanopyTcpUnacked => "canopy-tcp-unacked",
            System::CanopyFjall => "canopy-fjall",
            System::CanopyFjallInterval => "canopy-fjall-interval",
            System::Nats => "nats",
            System::NatsFlush => "nats-flush",
            System::JetStream => "jetstream",
            System::Mosquitto => "mosquitto",
        }
    }

    /// When a publish counts as done, for the legend.
    fn semantics(self, sync_interval_ms: u64) -> String {
        match self {
            System::CanopyMemory => "relay Ack: stored in memory and routed".into(),
            System::CanopyTcp => "as canopy-memory, clients over TLS on TCP (tcp_listen)".into(),
            System::CanopyTcpUnacked => "as canopy-tcp, publish_unacked: no ack asked, fire and forget".into(),
            System::CanopyFjall => "relay Ack after the fsync of the chunk's batch (fsync per batch)".into(),
            System::CanopyFjallInterval => {
                format!("relay Ack once written; fsync every {sync_interval_ms} ms (--sync-interval-ms)")
            }
            System::Nats => "core publish, fire and forget; one flush at the end".into(),
            System::NatsFlush => "core publish, a flush (PING/PONG) after every window".into(),
            System::JetStream => "PubAck from a file-storage stream (written, not fsynced); core subscribers".into(),
            System::Mosquitto => "PUBACK at QoS 1; subscribers at QoS 0".into(),
        }
    }

    fn is_canopy(self) -> bool {
        matches!(
            self,
            System::CanopyMemory
                | System::CanopyTcp
                | System::CanopyTcpUnacked
                | System::CanopyFjall
                | System::CanopyFjallInterval
        )
    }

    fn is_nats(self) -> bool {
        matches!(self, System::Nats | System::NatsFlush | System::JetStream)
    }
}

/// Publishers → subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Case {
    pubs: usize,
    subs: usize,
}

impl Case {
    const DEFAULT: [Case; 4] = [
        Case { pubs: 1, subs: 1 },
        Case { pubs: 1, subs: 10 },
        Case { pubs: 10, subs: 10 },
        Case { pubs: 1, subs: 100 },
    ];

    fn label(self) -> String {
        format!("{}→{}", self.pubs, self.subs)
    }

    /// `PxS` (or `P→S`).
    fn parse(s: &str) -> anyhow::Result<Case> {
        let (p, n) = s
            .split_once('x')
            .or_else(|| s.split_once('→'))
            .ok_or_else(|| anyhow!("case {s:?}: use PUBSxSUBS, e.g. 10x10"))?;
        let case = Case { pubs: p.trim().parse()?, subs: n.trim().parse()? };
        ensure!(case.pubs > 0 && case.subs > 0, "case {s:?}: needs at least one publisher and one subscriber");
        Ok(case)
    }
}

#[derive(Debug, Clone)]
struct Args {
    messages: u64,
    warmup: u64,
    window: usize,
    cases: Vec<Case>,
    systems: Vec<System>,
    relay: Option<PathBuf>,
    /// The relay's per-link queue bound (`max_queue`, frames).
    relay_max_queue: usize,
    /// `--sync-interval-ms` of `canopy-fjall-interval`.
    sync_interval_ms: u64,
    /// `--canopy-tcp`: the fjall systems' clients over TLS on TCP too (`canopy-memory` stays
    /// on QUIC beside `canopy-tcp`).
    canopy_tcp: bool,
    publish_timeout: Duration,
    /// Payloads per second of the paced (latency) pass, all publishers together; 0 skips it.
    paced_rate: u64,
    paced_messages: u64,
    /// Each configuration runs this many times (interleaved); the table shows medians.
    rounds: usize,
    smoke: bool,
    /// Run inside a fresh network namespace whose `lo` has this MTU.
    mtu: Option<u32>,
    /// Worker threads for every process of the run (see [`THREADS`]).
    threads: Option<usize>,
}

/// `--threads N`: the worker threads of every process in the run, set alike for all: the
/// bench's clients (its tokio runtime), the relay's network runtime (`TOKIO_WORKER_THREADS`)
/// and nats-server (`GOMAXPROCS`); mosquitto has one thread anyway. Unset, each process takes
/// its own default (one per core).
static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

const USAGE: &str = "\
pubsub-bench [--smoke] [--messages N] [--warmup N] [--window N]
             [--cases 1x1,1x10,10x10,1x100 (PUBSxSUBS)] [--fanout 1,10 (= --cases 1x1,1x10)]
             [--systems canopy-memory,canopy-tcp,canopy-fjall,canopy-fjall-interval,nats,nats-flush,jetstream,mosquitto]
             [--relay PATH-TO-canopy-relay] [--relay-max-queue FRAMES] [--sync-interval-ms MS] [--canopy-tcp]
             [--publish-timeout SECS] [--paced-rate PER-SEC (0: skip)] [--paced-messages N] [--rounds N]
             [--mtu N (run in a fresh network namespace, lo at MTU N; needs root)]
             [--threads N (worker threads of the bench's clients, the relay's network runtime
                           and nats-server alike; default: each its own, one per core)]";

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        messages: 20_000,
        warmup: 2_000,
        window: 256,
        cases: Case::DEFAULT.to_vec(),
        systems: System::ALL.to_vec(),
        relay: None,
        relay_max_queue: 65_536,
        sync_interval_ms: 200,
        canopy_tcp: false,
        publish_timeout: Duration::from_secs(300),
        paced_rate: 1_000,
        paced_messages: 2_000,
        rounds: 3,
        smoke: false,
        mtu: None,
        threads: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--smoke" => {
                args.smoke = true;
                args.messages = 200;
                args.warmup = 50;
                args.cases = vec![Case { pubs: 1, subs: 1 }, Case { pubs: 10, subs: 10 }];
                args.systems = vec![
                    System::CanopyMemory,
                    System::CanopyTcp,
                    System::CanopyTcpUnacked,
                    System::CanopyFjall,
                    System::CanopyFjallInterval,
                ];
                args.publish_timeout = Duration::from_secs(30);
                args.paced_rate = 1_000;
                args.paced_messages = 100;
                args.rounds = 1;
            }
            "--messages" => args.messages = value()?.parse()?,
            "--warmup" => args.warmup = value()?.parse()?,
            "--window" => args.window = value()?.parse()?,
            "--cases" => args.cases = value()?.split(',').map(Case::parse).collect::<anyhow::Result<_>>()?,
            "--fanout" => {
                args.cases = value()?
                    .split(',')
                    .map(|n| Ok(Case { pubs: 1, subs: n.trim().parse()? }))
                    .collect::<anyhow::Result<_>>()?
            }
            "--systems" => {
                args.systems = value()?
                    .split(',')
                    .map(|s| {
                        System::ALL
                            .into_iter()
                            .find(|sys| sys.label() == s)
                            .ok_or_else(|| anyhow!("unknown system {s:?} (try --help)"))
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            "--relay" => args.relay = Some(value()?.into()),
            "--relay-max-queue" => args.relay_max_queue = value()?.parse()?,
            "--sync-interval-ms" => args.sync_interval_ms = value()?.parse()?,
            "--canopy-tcp" => args.canopy_tcp = true,
            "--paced-rate" => args.paced_rate = value()?.parse()?,
            "--paced-messages" => args.paced_messages = value()?.parse()?,
            "--rounds" => args.rounds = value()?.parse()?,
            "--publish-timeout" => args.publish_timeout = Duration::from_secs(value()?.parse()?),
            "--mtu" => args.mtu = Some(value()?.parse()?),
            "--threads" => args.threads = Some(value()?.parse()?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    ensure!(
        args.messages > 0 && args.window > 0 && args.rounds > 0 && args.paced_messages > 0,
        "--messages, --paced-messages, --window and --rounds must be positive"
    );
    ensure!(!args.cases.is_empty() && !args.systems.is_empty(), "no cases or no systems to run");
    let most_pubs = args.cases.iter().map(|c| c.pubs).max().unwrap_or(1) as u64;
    ensure!(
        args.messages >= most_pubs && args.paced_messages >= most_pubs,
        "--messages and --paced-messages must give every publisher at least one payload"
    );
    ensure!(args.window <= u16::MAX as usize, "--window must fit MQTT's 16-bit packet ids");
    ensure!(args.mtu.is_none_or(|m| (68..=65_536).contains(&m)), "--mtu must be 68…65536");
    Ok(args)
}

// ---------------------------------------------------------------------------------------------
// Server processes

/// A server child process, killed (and reaped) when dropped.
struct Server {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Server {
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> anyhow::Result<Server> {
        let log_file = std::fs::File::create(&log)?;
        let child = cmd.stdin(Stdio::null()).stderr(log_file).spawn().with_context(|| {
            format!("starting {name} (for nats-server and mosquitto: bash scripts/install-peers.sh)")
        })?;
        Ok(Server { name, child, log })
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("{} exited ({status}); log:\n{}", self.name, self.log_tail())),
            _ => None,
        }
    }

    /// Waits up to `within` for the process to exit; its status and log tail if it did.
    fn exited_within(&mut self, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(why) = self.exited() {
                return Some(why);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Waits until the server accepts TCP connections on `port`.
    fn wait_tcp(&mut self, port: u16) -> anyhow::Result<()> {
        let deadline = Instant::now() + SETUP_TIMEOUT;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Some(why) = self.exited() {
                bail!(why);
            }
            ensure!(Instant::now() < deadline, "{} did not listen on {addr} within {SETUP_TIMEOUT:?}", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident set of the server process, in bytes.
    fn resident_bytes(&self) -> Option<u64> {
        let statm = std::fs::read_to_string(format!("/proc/{}/statm", self.child.id())).ok()?;
        let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        Some(pages * 4096)
    }

    /// User + system CPU time the server has used so far, in seconds.
    fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        let after_comm = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(ticks as f64 / 100.0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A peer's executable: on `PATH`, else in `/usr/sbin` (where Debian installs both, and which
/// is not on every user's `PATH`).
fn peer_binary(name: &str) -> PathBuf {
    let sbin = Path::new("/usr/sbin").join(name);
    let on_path =
        std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|dir| dir.join(name).is_file()));
    if !on_path && sbin.is_file() { sbin } else { PathBuf::from(name) }
}

/// First line of a peer's version output (best effort, for the header).
fn peer_version(name: &str, arg: &str) -> String {
    match Command::new(peer_binary(name)).arg(arg).stdin(Stdio::null()).output() {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            text.lines().next().unwrap_or("").trim().to_string()
        }
        Err(_) => format!("{name} not found"),
    }
}

/// User + system CPU seconds of this process (all the clients).
fn own_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rfind(')').map_or(vec![], |i| stat[i + 2..].split_whitespace().collect());
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    (tick(11) + tick(12)) as f64 / 100.0
}

/// A free loopback TCP port (bound, then released for the server to take).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The `canopy-relay` binary: `--relay`, else next to this executable, built first when run
/// through cargo so it is never stale.
fn relay_binary(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(path) = &args.relay {
        return Ok(path.clone());
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable directory")?;
    let path = dir.join("canopy-relay");
    if let Ok(cargo) = std::env::var("CARGO") {
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "canopy-relay", "--bin", "canopy-relay"]);
        // Drop what `cargo run` set for this package: build scripts that watch these (ring
        // watches CARGO_MANIFEST_DIR) would otherwise rebuild on every alternation between
        // this build and the outer one.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("CARGO_PKG_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                ]
                .contains(&key.as_ref())
            {
                cmd.env_remove(key.as_ref());
            }
        }
        match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => {}
            Some("release") => {
                cmd.arg("--release");
            }
            Some(other) => {
                cmd.args(["--profile", other]);
            }
            None => {}
        }
        let status = cmd.status().context("building canopy-relay")?;
        ensure!(status.success(), "building canopy-relay failed");
    }
    ensure!(
        path.exists(),
        "{} not found: build it (cargo build --release -p canopy-relay) or pass --relay",
        path.display()
    );
    Ok(path)
}

/// Whether the relay's `--help` lists `flag`.
fn relay_has_flag(relay: &Path, flag: &str) -> bool {
    Command::new(relay)
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(flag))
}

struct Started {
    server: Server,
    /// `host:port` to connect to.
    addr: String,
    /// PEM of the certificate to trust.
    ca_pem: String,
}

fn start_relay(relay: &Path, store: &str, extra: &[String], max_queue: usize, dir: &Path) -> anyhow::Result<Started> {
    let data = dir.join("relay-data");
    let mut cmd = Command::new(relay);
    cmd.args(["--listen", "127.0.0.1:0", "--store", store])
        .args(extra)
        .arg("--data")
        .arg(&data)
        .env("RUST_LOG", "warn")
        .env("CANOPY_MAX_QUEUE", max_queue.to_string())
        .stdout(Stdio::piped());
    if let Some(n) = THREADS.get() {
        cmd.env("TOKIO_WORKER_THREADS", n.to_string());
    }
    let mut server = Server::spawn("canopy-relay", &mut cmd, dir.join("relay.log"))?;
    let stdout = server.child.stdout.take().context("relay stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // With --tcp-listen the relay prints its QUIC address, then `tcp://ADDR`: the
            // clients use the last one printed.
            if let Some(addr) = line.strip_prefix("listening on ") {
                let _ = tx.send(addr.trim().to_string());
            }
        }
    });
    let tcp = extra.iter().any(|a| a == "--tcp-listen");
    let mut addr = match rx.recv_timeout(SETUP_TIMEOUT) {
        Ok(addr) => addr,
        Err(_) => bail!(
            server
                .exited_within(Duration::from_secs(2))
                .unwrap_or_else(|| "canopy-relay printed no `listening on` line".into())
        ),
    };
    if tcp {
        addr = rx.recv_timeout(SETUP_TIMEOUT).context("canopy-relay printed no `listening on tcp://` line")?;
    }
    let ca_path = data.join("cert.pem");
    let ca_pem = std::fs::read_to_string(&ca_path).context("relay cert.pem")?;
    Ok(Started { server, addr, ca_pem })
}

/// The self-signed certificate nats-server and mosquitto serve (SANs localhost, 127.0.0.1).
struct PeerCert {
    cert: PathBuf,
    key: PathBuf,
    pem: String,
}

fn peer_cert(dir: &Path) -> anyhow::Result<PeerCert> {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])?;
    let cert = dir.join("peer-cert.pem");
    let key = dir.join("peer-key.pem");
    let pem = certified.cert.pem();
    std::fs::write(&cert, &pem)?;
    std::fs::write(&key, certified.signing_key.serialize_pem())?;
    Ok(PeerCert { cert, key, pem })
}

/// nats-server with TLS; with `jetstream`, also `-js` and a store directory under `dir`.
fn start_nats(dir: &Path, tls: &PeerCert, jetstream: bool) -> anyhow::Result<Started> {
    let port = free_port()?;
    let conf = dir.join("nats.conf");
    let mut f = std::fs::File::create(&conf)?;
    writeln!(f, "listen: 127.0.0.1:{port}")?;
    writeln!(f, "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n}}", tls.cert, tls.key)?;
    if jetstream {
        writeln!(f, "jetstream {{\n  store_dir: {:?}\n}}", dir.join("jetstream"))?;
    }
    drop(f);
    let mut cmd = Command::new(peer_binary("nats-server"));
    cmd.arg("-c").arg(&conf).stdout(Stdio::null());
    if let Some(n) = THREADS.get() {
        cmd.env("GOMAXPROCS", n.to_string());
    }
    if jetstream {
        cmd.arg("-js");
    }
    let mut server = Server::spawn("nats-server", &mut cmd, dir.join("nats.log"))?;
    server.wait_tcp(port)?;
    Ok(Started { server, addr: format!("tls://127.0.0.1:{port}"), ca_pem: tls.pem.clone() })
}

fn start_mosquitto(dir: &Path, tls: &PeerCert) -> anyhow::Result<Started> {
    let port = free_port()?;
    let conf = dir.join("mosquitto.conf");
    let mut f = std::fs::File::create(&conf)?;
    writeln!(f, "listener {port} 127.0.0.1")?;
    writeln!(f, "certfile {}", tls.cert.display())?;
    writeln!(f, "keyfile {}", tls.key.display())?;
    writeln!(f, "allow_anonymous true")?;
    writeln!(f, "persistence false")?;
    writeln!(f, "set_tcp_nodelay true")?;
    // When started as root, stay root: the dropped-to `mosquitto` user could not read the
    // key in this private temporary directory. (Ignored when not root.)
    writeln!(f, "user root")?;
    writeln!(f, "log_dest stderr")?;
    writeln!(f, "log_type error")?;
    writeln!(f, "log_type warning")?;
    drop(f);
    let mut cmd = Command::new(peer_binary("mosquitto"));
    cmd.arg("-c").arg(&conf).stdout(Stdio::null());
    let mut server = Server::spawn("mosquitto", &mut cmd, dir.join("mosquitto.log"))?;
    server.wait_tcp(port)?;
    Ok(Started { server, addr: format!("127.0.0.1:{port}"), ca_pem: tls.pem.clone() })
}

fn start_system(system: System, args: &Args, relay: Option<&Path>, dir: &Path) -> anyhow::Result<Started> {
    let relay = || relay.context("relay binary");
    let q = args.relay_max_queue;
    match system {
        System::CanopyMemory => start_relay(relay()?, "memory", &[], q, dir),
        System::CanopyTcp | System::CanopyTcpUnacked => {
            let extra = ["--tcp-listen".to_string(), "127.0.0.1:0".to_string()];
            start_relay(relay()?, "memory", &extra, q, dir)
        }
        System::CanopyFjall | System::CanopyFjallInterval => {
            let mut extra = Vec::new();
            if system == System::CanopyFjallInterval {
                extra.extend(["--sync-interval-ms".to_string(), args.sync_interval_ms.to_string()]);
            }
            if args.canopy_tcp {
                extra.extend(["--tcp-listen".to_string(), "127.0.0.1:0".to_string()]);
            }
            start_relay(relay()?, "fjall", &extra, q, dir)
        }
        System::Nats | System::NatsFlush => start_nats(dir, &peer_cert(dir)?, false),
        System::JetStream => start_nats(dir, &peer_cert(dir)?, true),
        System::Mosquitto => start_mosquitto(dir, &peer_cert(dir)?),
    }
}

// ---------------------------------------------------------------------------------------------
// Payloads and measurements

fn now_ns(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

/// 1 KiB: sequence number, send time (ns since `epoch`), zero filler.
fn payload(seq: u64, epoch: Instant) -> Bytes {
    let mut b = BytesMut::with_capacity(PAYLOAD);
    b.put_u64_le(seq);
    b.put_u64_le(now_ns(epoch));
    b.resize(PAYLOAD, 0);
    b.freeze()
}

/// Publisher `p` of `n`'s share of `seqs`: a contiguous, disjoint part, the parts covering
/// `seqs`.
fn share(seqs: &Range<u64>, p: usize, n: usize) -> Range<u64> {
    let len = seqs.end - seqs.start;
    let at = |i: usize| seqs.start + len * i as u64 / n as u64;
    at(p)..at(p + 1)
}

/// What one subscriber saw.
#[derive(Debug, Default)]
struct Received {
    /// Latencies of the measured (post-warm-up) deliveries, ns, each payload once.
    latencies: Vec<u64>,
    /// Time of the last measured delivery, ns since the epoch.
    last_ns: u64,
    /// Payloads that arrived again.
    duplicates: u64,
    /// Deliveries that were no payload of this run (too short, or sequence out of range).
    unexpected: u64,
    /// Why the subscription ended early, if it did.
    error: Option<String>,
}

/// Counts one subscriber's deliveries: every sequence number of `0..expected` once.
struct Recorder {
    epoch: Instant,
    warmup: u64,
    expected: u64,
    /// One bit per sequence number.
    seen: Vec<u64>,
    /// Distinct payloads so far, warm-up included.
    distinct: u64,
    progress: Arc<AtomicU64>,
    got: Received,
}

impl Recorder {
    fn new(epoch: Instant, warmup: u64, expected: u64, progress: Arc<AtomicU64>) -> Recorder {
        let seen = vec![0; expected.div_ceil(64) as usize];
        Recorder { epoch, warmup, expected, seen, distinct: 0, progress, got: Received::default() }
    }

    /// Records one delivery; true once every expected payload has arrived.
    fn on(&mut self, data: &[u8]) -> bool {
        let now = now_ns(self.epoch);
        let (Some(seq), Some(sent)) = (data.get(0..8), data.get(8..16)) else {
            self.got.unexpected += 1;
            return false;
        };
        let seq = u64::from_le_bytes(seq.try_into().expect("8 bytes"));
        let sent = u64::from_le_bytes(sent.try_into().expect("8 bytes"));
        if seq >= self.expected {
            self.got.unexpected += 1;
            return false;
        }
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if self.seen[word] & bit != 0 {
            self.got.duplicates += 1;
            return false;
        }
        self.seen[word] |= bit;
        self.distinct += 1;
        if seq >= self.warmup {
            self.got.latencies.push(now.saturating_sub(sent));
            self.got.last_ns = now;
        }
        self.progress.store(self.distinct, Ordering::Release);
        self.distinct >= self.expected
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

fn rustls_config(ca_pem: &str) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

async fn canopy_client(s: &Started) -> anyhow::Result<Client> {
    let mut opts = ConnectOptions::new(&s.addr, Trust::CaPem(s.ca_pem.clone()));
    // Like async-nats's default per-subscription capacity (64 Ki messages).
    opts.subscription_buffer = 65_536;
    Ok(Client::connect(opts).await?)
}

async fn nats_client(s: &Started) -> anyhow::Result<async_nats::Client> {
    Ok(async_nats::ConnectOptions::new()
        .require_tls(true)
        .tls_client_config(rustls_config(&s.ca_pem)?)
        .connect(s.addr.as_str())
        .await?)
}

/// Creates the stream that captures `SUBJECT`: file storage, nothing refused or discarded.
/// Returns the context for checking the stream at the end.
async fn jetstream_setup(s: &Started) -> anyhow::Result<jetstream::Context> {
    let context = jetstream::new(nats_client(s).await?);
    context
        .create_stream(jetstream::stream::Config {
            name: STREAM.into(),
            subjects: vec![SUBJECT.into()],
            storage: jetstream::stream::StorageType::File,
            max_messages: -1,
            max_bytes: -1,
            ..Default::default()
        })
        .await
        .context("creating the JetStream stream")?;
    Ok(context)
}

fn mqtt_client(s: &Started, id: String, inflight: u16) -> anyhow::Result<(rumqttc::AsyncClient, rumqttc::EventLoop)> {
    let (host, port) = s.addr.rsplit_once(':').context("mqtt address")?;
    let mut opts = rumqttc::MqttOptions::new(id, host, port.parse()?);
    opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::new(
        rustls_config(&s.ca_pem)?,
    ))));
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(64 * 1024, 64 * 1024);
    opts.set_inflight(inflight);
    opts.set_clean_session(true);
    let (client, mut events) = rumqttc::AsyncClient::new(opts, usize::from(inflight).max(64));
    // Nagle off, as async-nats and nats-server (Go's default) have it.
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    events.set_network_options(net);
    Ok((client, events))
}

/// A connected subscriber whose subscription the server has confirmed.
enum Sub {
    Canopy(Client, Subscription),
    Nats(async_nats::Client, async_nats::Subscriber),
    Mqtt(rumqttc::AsyncClient, Box<rumqttc::EventLoop>),
}

async fn subscriber(system: System, s: &Started, index: usize) -> anyhow::Result<Sub> {
    match system {
        System::CanopyMemory | System::CanopyTcp | System::CanopyTcpUnacked | System::CanopyFjall | System::CanopyFjallInterval => {
            let client = canopy_client(s).await?;
            let filter = Filter::new(Name::new(NAME_BASE), 8)?;
            let mut sub = client.subscribe(filter, ReplayMode::LiveOnly).await?;
            match sub.next().await {
                Some(SubEvent::ReplayDone) => Ok(Sub::Canopy(client, sub)),
                other => bail!("canopy subscription not confirmed: {other:?}"),
            }
        }
        // JetStream too: a core subscription on the stream's subject (see the module doc).
        System::Nats | System::NatsFlush | System::JetStream => {
            let client = nats_client(s).await?;
            let sub = client.subscribe(SUBJECT).await?;
            client.flush().await?; // the server has processed the SUB
            Ok(Sub::Nats(client, sub))
        }
        System::Mosquitto => {
            let (client, mut events) = mqtt_client(s, format!("bench-sub-{index}"), 100)?;
            client.subscribe(TOPIC, rumqttc::QoS::AtMostOnce).await?;
            loop {
                match events.poll().await? {
                    rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => {
                        return Ok(Sub::Mqtt(client, Box::new(events)));
                    }
                    _ => continue,
                }
            }
        }
    }
}

/// Receives until every expected payload arrived, the subscription fails, or `stop`.
async fn receive(sub: Sub, mut rec: Recorder, mut stop: watch::Receiver<bool>) -> Received {
    match sub {
        Sub::Canopy(_client, mut sub) => loop {
            tokio::select! {
                event = sub.next() => match event {
                    Some(SubEvent::Chunk(chunk)) => if rec.on(chunk.data()) { break },
                    Some(SubEvent::ReplayDone | SubEvent::Gap) => {}
                    Some(SubEvent::Error { code, message }) => { rec.got.error = Some(format!("{code}: {message}")); break }
                    None => { rec.got.error = Some("subscription closed".into()); break }
                },
                _ = stop.changed() => break,
            }
        },
        Sub::Nats(_client, mut sub) => loop {
            tokio::select! {
                msg = sub.next() => match msg {
                    Some(msg) => if rec.on(&msg.payload) { break },
                    None => { rec.got.error = Some("subscription closed".into()); break }
                },
                _ = stop.changed() => break,
            }
        },
        Sub::Mqtt(_client, mut events) => loop {
            tokio::select! {
                event = events.poll() => match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => if rec.on(&p.payload) { break },
                    Ok(_) => {}
                    Err(e) => { rec.got.error = Some(e.to_string()); break }
                },
                _ = stop.changed() => break,
            }
        },
    }
    rec.got
}

/// The paced schedule: payload `i` of a publisher's range is due at
/// `start + (i × stride + phase) / rate`, so `stride` publishers with phases `0..stride`
/// together send at `rate`, evenly spaced.
#[derive(Debug, Clone, Copy)]
struct Pace {
    start: tokio::time::Instant,
    rate: u64,
    stride: u64,
    phase: u64,
}

impl Pace {
    fn due(self, i: u64) -> tokio::time::Instant {
        self.start
            + Duration::from_nanos((i * self.stride + self.phase).saturating_mul(1_000_000_000) / self.rate.max(1))
    }
}

/// Sends `seqs` with at most `window` unacknowledged: `send` hands the payload to the client
/// and returns the future of its acknowledgement. Keeps the outstanding acks moving while
/// waiting for a paced slot.
///
/// The acks are awaited oldest first (every system here acknowledges in order) from a plain
/// queue, not a `FuturesUnordered`: that one wakes its task again whenever it has polled all
/// of its futures, which tokio takes for a yield, so it queues the task for any worker and
/// wakes an idle one, a cross-CPU hop per publish that core NATS's fire-and-forget loop never
/// pays (about a third of the acked systems' paced latency at 1→1; docs/performance.md).
async fn windowed<S, SF, A>(seqs: Range<u64>, window: usize, pace: Option<Pace>, mut send: S) -> anyhow::Result<()>
where
    S: FnMut(u64) -> SF,
    SF: Future<Output = anyhow::Result<A>>,
    A: Future<Output = anyhow::Result<()>>,
{
    let first = seqs.start;
    let mut inflight = AckQueue(std::collections::VecDeque::new());
    for seq in seqs {
        if inflight.0.len() >= window {
            inflight.oldest().await?;
        }
        if let Some(pace) = pace {
            let sleep = tokio::time::sleep_until(pace.due(seq - first));
            tokio::pin!(sleep);
            while !inflight.0.is_empty() {
                tokio::select! {
                    _ = &mut sleep => break,
                    answer = inflight.oldest() => answer?,
                }
            }
            sleep.await;
        }
        let mut ack = Box::pin(send(seq).await?);
        // Polled once now, so the publish leaves now (Canopy's `publish` sends on first poll).
        match futures_util::poll!(ack.as_mut()) {
            std::task::Poll::Ready(answer) => answer?,
            std::task::Poll::Pending => inflight.0.push_back(ack),
        }
    }
    while !inflight.0.is_empty() {
        inflight.oldest().await?;
    }
    Ok(())
}

/// Outstanding acknowledgements, oldest first.
struct AckQueue<A>(std::collections::VecDeque<std::pin::Pin<Box<A>>>);

impl<A: Future<Output = anyhow::Result<()>>> AckQueue<A> {
    /// Waits for the oldest (there must be one) and removes it.
    async fn oldest(&mut self) -> anyhow::Result<()> {
        let answer = std::future::poll_fn(|cx| self.0.front_mut().expect("non-empty").as_mut().poll(cx)).await;
        self.0.pop_front();
        answer
    }
}

/// The publishing side of one system (one connection).
enum Publisher {
    Canopy(Client),
    /// `Client::publish_unacked`: nothing to wait for but the SDK's back-pressure.
    CanopyUnacked(Client),
    Nats {
        client: async_nats::Client,
        flush_every: Option<u64>,
    },
    JetStream(jetstream::Context),
    Mqtt {
        client: rumqttc::AsyncClient,
        /// PUBACKs received (`u64::MAX`: the connection failed).
        acks: Arc<AtomicU64>,
        acked: Arc<Notify>,
        /// Payloads handed to the client.
        sent: AtomicU64,
        driver: JoinHandle<()>,
    },
}

impl Publisher {
    async fn connect(system: System, s: &Started, window: usize, index: usize) -> anyhow::Result<Publisher> {
        Ok(match system {
            System::CanopyTcpUnacked => Publisher::CanopyUnacked(canopy_client(s).await?),
            System::CanopyMemory | System::CanopyTcp | System::CanopyFjall | System::CanopyFjallInterval => {
                Publisher::Canopy(canopy_client(s).await?)
            }
            System::Nats => Publisher::Nats { client: nats_client(s).await?, flush_every: None },
            System::NatsFlush => Publisher::Nats { client: nats_client(s).await?, flush_every: Some(window as u64) },
            System::JetStream => Publisher::JetStream(
                // The window is the bench's (`windowed`); the context's own limit (5 000
                // unacked by default) is never reached.
                jetstream::ContextBuilder::new().timeout(JETSTREAM_ACK_TIMEOUT).build(nats_client(s).await?),
            ),
            System::Mosquitto => {
                let (client, mut events) = mqtt_client(s, format!("bench-pub-{index}"), window as u16)?;
                let acks = Arc::new(AtomicU64::new(0));
                let acked = Arc::new(Notify::new());
                let (a, n) = (acks.clone(), acked.clone());
                let (up_tx, up_rx) = tokio::sync::oneshot::channel();
                let mut up_tx = Some(up_tx);
                let driver = tokio::spawn(async move {
                    loop {
                        match events.poll().await {
                            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                                if let Some(tx) = up_tx.take() {
                                    let _ = tx.send(());
                                }
                            }
                            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                                a.fetch_add(1, Ordering::AcqRel);
                                n.notify_one();
                            }
                            Ok(_) => {}
                            Err(e) => {
                                eprintln!("mqtt publisher: {e}");
                                a.store(u64::MAX, Ordering::Release);
                                n.notify_one();
                                return;
                            }
                        }
                    }
                });
                tokio::time::timeout(SETUP_TIMEOUT, up_rx).await.context("mqtt connack")?.context("mqtt connack")?;
                Publisher::Mqtt { client, acks, acked, sent: AtomicU64::new(0), driver }
            }
        })
    }

    /// Publishes `seqs` and returns once they are acknowledged (acked systems) or flushed.
    async fn publish(&self, seqs: Range<u64>, epoch: Instant, window: usize, pace: Option<Pace>) -> anyhow::Result<()> {
        let first = seqs.start;
        match self {
            Publisher::Canopy(client) => {
                let expiry = canopy_sdk::now_ms() + 3_600_000;
                windowed(seqs, window, pace, |seq| async move {
                    let chunk = Chunk::new(Name::new(NAME_BASE | u128::from(seq)), expiry, payload(seq, epoch))?;
                    Ok(client.publish(chunk).map_err(anyhow::Error::from))
                })
                .await?;
            }
            Publisher::CanopyUnacked(client) => {
                let expiry = canopy_sdk::now_ms() + 3_600_000;
                for seq in seqs {
                    if let Some(pace) = pace {
                        tokio::time::sleep_until(pace.due(seq - first)).await;
                    }
                    let chunk = Chunk::new(Name::new(NAME_BASE | u128::from(seq)), expiry, payload(seq, epoch))?;
                    client.publish_unacked(chunk).await?;
                }
                // Nothing is acknowledged. A refusal seen by now fails the run here; one still
                // on its way leaves its chunk missing at every subscriber, which fails it too.
                let refused = client.unacked_refusals();
                ensure!(refused == 0, "the relay refused {refused} unacked publishes");
            }
            Publisher::JetStream(context) => {
                windowed(seqs, window, pace, |seq| async move {
                    let ack = context.publish(SUBJECT, payload(seq, epoch)).await?;
                    Ok(ack.into_future().map_ok(|_| ()).map_err(anyhow::Error::from))
                })
                .await?;
            }
            Publisher::Nats { client, flush_every } => {
                for seq in seqs {
                    if let Some(pace) = pace {
                        tokio::time::sleep_until(pace.due(seq - first)).await;
                    }
                    client.publish(SUBJECT, payload(seq, epoch)).await?;
                    if flush_every.is_some_and(|k| (seq - first + 1).is_multiple_of(k)) {
                        client.flush().await?;
                    }
                }
                client.flush().await?;
            }
            Publisher::Mqtt { client, acks, acked, sent, .. } => {
                let end = sent.fetch_add(seqs.end - seqs.start, Ordering::AcqRel) + (seqs.end - seqs.start);
                for seq in seqs {
                    if let Some(pace) = pace {
                        tokio::time::sleep_until(pace.due(seq - first)).await;
                    }
                    client.publish_bytes(TOPIC, rumqttc::QoS::AtLeastOnce, false, payload(seq, epoch)).await?;
                }
                loop {
                    let notified = acked.notified();
                    match acks.load(Ordering::Acquire) {
                        u64::MAX => bail!("mqtt publisher connection failed"),
                        n if n >= end => break,
                        _ => notified.await,
                    }
                }
            }
        }
        Ok(())
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if let Publisher::Mqtt { driver, .. } = self {
            driver.abort();
        }
    }
}

/// Every publisher sends its share of `seqs` (`share`), all at once, each in its own task;
/// paced at `rate` in total when given. Returns when all are done; a timeout or error
/// aborts the others (the `JoinSet` is dropped).
async fn publish_all(
    publishers: &[Arc<Publisher>],
    seqs: Range<u64>,
    epoch: Instant,
    window: usize,
    rate: Option<u64>,
) -> anyhow::Result<()> {
    let n = publishers.len();
    let start = tokio::time::Instant::now();
    let mut tasks = JoinSet::new();
    for (p, publisher) in publishers.iter().enumerate() {
        let publisher = publisher.clone();
        let range = share(&seqs, p, n);
        let pace = rate.map(|rate| Pace { start, rate, stride: n as u64, phase: p as u64 });
        tasks.spawn(async move { publisher.publish(range, epoch, window, pace).await });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// The two passes: as fast as the window allows, and paced at a fixed total rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Throughput,
    Paced(u64),
}

/// One run's figures.
#[derive(Debug, Clone)]
struct Row {
    /// Measured payloads per second the publishers got acknowledged (or flushed).
    publish_rate: f64,
    /// Measured deliveries per second, mean over subscribers.
    per_sub_rate: f64,
    /// All subscribers' measured deliveries per second.
    total_rate: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    /// Measured payloads that did not arrive, summed over subscribers.
    missing: u64,
    /// Server CPU (user + system) per measured payload published, µs.
    server_us_per_msg: f64,
    /// Client-side CPU (this process: publishers and subscribers) per measured payload, µs.
    client_us_per_msg: f64,
    /// Server resident set at the end, MiB.
    server_rss_mib: f64,
    errors: Vec<String>,
}

async fn run_one(system: System, case: Case, pass: Pass, args: &Args, relay: Option<&Path>) -> anyhow::Result<Row> {
    let (messages, rate) = match pass {
        Pass::Throughput => (args.messages, None),
        Pass::Paced(rate) => (args.paced_messages, Some(rate)),
    };
    let dir = tempfile::tempdir()?;
    let started = start_system(system, args, relay, dir.path())?;
    let stream = match system {
        System::JetStream => Some(
            tokio::time::timeout(SETUP_TIMEOUT, jetstream_setup(&started))
                .await
                .context("stream setup timed out")??,
        ),
        _ => None,
    };
    let epoch = Instant::now();
    let expected = args.warmup + messages;

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut progress = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..case.subs {
        let sub = tokio::time::timeout(SETUP_TIMEOUT, subscriber(system, &started, i))
            .await
            .context("subscribe timed out")??;
        let p = Arc::new(AtomicU64::new(0));
        progress.push(p.clone());
        let rec = Recorder::new(epoch, args.warmup, expected, p);
        tasks.push(tokio::spawn(receive(sub, rec, stop_rx.clone())));
    }
    let mut publishers = Vec::new();
    for p in 0..case.pubs {
        let publisher = tokio::time::timeout(SETUP_TIMEOUT, Publisher::connect(system, &started, args.window, p))
            .await
            .context("publisher connect timed out")??;
        publishers.push(Arc::new(publisher));
    }

    // Warm-up: connections, TLS sessions, allocators and caches; not measured.
    tokio::time::timeout(WARMUP_TIMEOUT, async {
        publish_all(&publishers, 0..args.warmup, epoch, args.window, None).await?;
        while progress.iter().any(|p| p.load(Ordering::Acquire) < args.warmup) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        anyhow::Ok(())
    })
    .await
    .context("warm-up timed out")??;

    let server_cpu_before = started.server.cpu_seconds().unwrap_or(0.0);
    let client_cpu_before = own_cpu_seconds();
    let t0 = now_ns(epoch);
    tokio::time::timeout(
        args.publish_timeout,
        publish_all(&publishers, args.warmup..expected, epoch, args.window, rate),
    )
    .await
    .context("publishing timed out")??;
    let published_ns = now_ns(epoch) - t0;

    let drain = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    while tokio::time::Instant::now() < drain && tasks.iter().any(|t| !t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let server_cpu = started.server.cpu_seconds().unwrap_or(0.0) - server_cpu_before;
    let client_cpu = own_cpu_seconds() - client_cpu_before;
    let _ = stop_tx.send(true);
    let mut received = Vec::new();
    for task in tasks {
        received.push(task.await?);
    }
    let server_rss_mib = started.server.resident_bytes().unwrap_or(0) as f64 / (1024.0 * 1024.0);
    let mut errors: Vec<String> = Vec::new();
    if let Some(context) = stream {
        // Every payload, warm-up included, must be in the stream.
        let stored = async { anyhow::Ok(context.get_stream(STREAM).await?.get_info().await?.state.messages) };
        match tokio::time::timeout(SETUP_TIMEOUT, stored).await {
            Ok(Ok(n)) if n == expected => {}
            Ok(Ok(n)) => errors.push(format!("the stream holds {n} of {expected} payloads")),
            Ok(Err(e)) => errors.push(format!("stream info: {e:#}")),
            Err(_) => errors.push("stream info timed out".into()),
        }
    }
    drop(publishers);
    drop(started); // kills the server

    let mut all: Vec<u64> = received.iter().flat_map(|r| r.latencies.iter().copied()).collect();
    all.sort_unstable();
    let pct = |q: f64| -> f64 {
        if all.is_empty() {
            return f64::NAN;
        }
        all[((all.len() as f64 * q) as usize).min(all.len() - 1)] as f64 / 1000.0
    };
    let secs = |ns: u64| ns.saturating_sub(t0).max(1) as f64 / 1e9;
    let per_sub: Vec<f64> = received.iter().map(|r| r.latencies.len() as f64 / secs(r.last_ns)).collect();
    let last = received.iter().map(|r| r.last_ns).max().unwrap_or(t0);
    let delivered: u64 = received.iter().map(|r| r.latencies.len() as u64).sum();
    for r in &received {
        if r.duplicates > 0 {
            errors.push(format!("{} duplicate deliveries at one subscriber", r.duplicates));
        }
        if r.unexpected > 0 {
            errors.push(format!("{} foreign deliveries at one subscriber", r.unexpected));
        }
    }
    errors.extend(received.into_iter().filter_map(|r| r.error));
    Ok(Row {
        publish_rate: messages as f64 / (published_ns.max(1) as f64 / 1e9),
        per_sub_rate: per_sub.iter().sum::<f64>() / per_sub.len() as f64,
        total_rate: delivered as f64 / secs(last),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
        max_us: all.last().map_or(f64::NAN, |&v| v as f64 / 1000.0),
        missing: messages * case.subs as u64 - delivered,
        server_us_per_msg: server_cpu * 1e6 / messages as f64,
        client_us_per_msg: client_cpu * 1e6 / messages as f64,
        server_rss_mib,
        errors,
    })
}

// ---------------------------------------------------------------------------------------------
// Rounds, medians, tables

/// Median of each figure over the rounds (each figure on its own).
fn median_row(rows: &[Row]) -> Row {
    let med = |f: fn(&Row) -> f64| {
        let mut v: Vec<f64> = rows.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Row {
        publish_rate: med(|r| r.publish_rate),
        per_sub_rate: med(|r| r.per_sub_rate),
        total_rate: med(|r| r.total_rate),
        p50_us: med(|r| r.p50_us),
        p99_us: med(|r| r.p99_us),
        p999_us: med(|r| r.p999_us),
        max_us: med(|r| r.max_us),
        missing: rows.iter().map(|r| r.missing).max().unwrap_or(0),
        server_us_per_msg: med(|r| r.server_us_per_msg),
        client_us_per_msg: med(|r| r.client_us_per_msg),
        server_rss_mib: med(|r| r.server_rss_mib),
        errors: rows.iter().flat_map(|r| r.errors.iter().cloned()).collect(),
    }
}

/// Prints a markdown table, columns padded: names and notes left-aligned, figures right.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let left = |i: usize| ["system", "canopy", "peer", "note"].contains(&header[i]);
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).chain([header[i].chars().count(), 3]).max().unwrap_or(3))
        .collect();
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| if left(i) { format!("{c:<w$}", w = widths[i]) } else { format!("{c:>w$}", w = widths[i]) })
            .collect();
        println!("| {} |", padded.join(" | "));
    };
    line(header.iter().map(|h| h.to_string()).collect());
    line(
        widths
            .iter()
            .enumerate()
            .map(|(i, &w)| if left(i) { "-".repeat(w) } else { format!("{}:", "-".repeat(w - 1)) })
            .collect(),
    );
    for r in rows {
        line(r.clone());
    }
}

type Results = Vec<((Pass, Case, System), Row)>;

fn find(results: &Results, key: (Pass, Case, System)) -> Option<&Row> {
    results.iter().find(|(k, _)| *k == key).map(|(_, r)| r)
}

fn print_pass(pass: Pass, args: &Args, results: &Results) {
    let throughput = pass == Pass::Throughput;
    let header: &[&str] = if throughput {
        &[
            "system",
            "case",
            "publish/s",
            "per-sub/s",
            "total/s",
            "p50 µs",
            "p99 µs",
            "missing",
            "srv µs/msg",
            "cli µs/msg",
            "srv MiB",
        ]
    } else {
        &["system", "case", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "missing", "srv µs/msg", "cli µs/msg", "srv MiB"]
    };
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for &case in &args.cases {
        for &system in &args.systems {
            let Some(r) = find(results, (pass, case, system)) else { continue };
            let mut row = vec![system.label().to_string(), case.label()];
            if throughput {
                row.extend([
                    format!("{:.0}", r.publish_rate),
                    format!("{:.0}", r.per_sub_rate),
                    format!("{:.0}", r.total_rate),
                ]);
                row.extend([format!("{:.0}", r.p50_us), format!("{:.0}", r.p99_us)]);
            } else {
                row.extend([r.p50_us, r.p99_us, r.p999_us, r.max_us].map(|v| format!("{v:.0}")));
            }
            row.extend([
                r.missing.to_string(),
                format!("{:.1}", r.server_us_per_msg),
                format!("{:.1}", r.client_us_per_msg),
                format!("{:.1}", r.server_rss_mib),
            ]);
            rows.push(row);
            if !r.errors.is_empty() {
                notes.push(format!("- {} {}: errors: {}", system.label(), case.label(), error_summary(&r.errors)));
            }
        }
    }
    print_table(header, &rows);
    for note in notes {
        println!("{note}");
    }
}

/// "3× why; 1× other".
fn error_summary(errors: &[String]) -> String {
    let mut counted: Vec<(&String, usize)> = Vec::new();
    for e in errors {
        match counted.iter_mut().find(|(seen, _)| *seen == e) {
            Some((_, n)) => *n += 1,
            None => counted.push((e, 1)),
        }
    }
    let parts: Vec<String> = counted.iter().map(|(e, n)| format!("{n}× {e}")).collect();
    parts.join("; ")
}

/// The comparisons of the ratio table: Canopy system, peer, what the pair means.
const PAIRS: [(System, System, &str); 8] = [
    (System::CanopyMemory, System::Nats, "core NATS, fire and forget"),
    (System::CanopyTcp, System::Nats, "core NATS; Canopy's clients over TLS/TCP too"),
    (System::CanopyTcpUnacked, System::Nats, "like for like: both fire and forget over TLS/TCP"),
    (System::CanopyTcp, System::NatsFlush, "core NATS, flush per window; both over TLS/TCP"),
    (System::CanopyMemory, System::NatsFlush, "core NATS, flush per window"),
    (System::CanopyMemory, System::Mosquitto, "MQTT QoS 1 publish"),
    (System::CanopyFjallInterval, System::JetStream, "like for like: ack on write, fsync later"),
    (System::CanopyFjall, System::JetStream, "Canopy stronger: fsync per batch before the ack"),
];

fn print_ratios(pass: Pass, args: &Args, results: &Results) {
    let throughput = pass == Pass::Throughput;
    println!(
        "\nratios, canopy ÷ peer ({}latency and CPU below 1 favour Canopy)",
        if throughput { "total/s above 1, " } else { "" }
    );
    let header: &[&str] = if throughput {
        &["canopy", "peer", "case", "total/s", "p50", "p99", "srv µs/msg", "srv+cli µs/msg", "note"]
    } else {
        &["canopy", "peer", "case", "p50", "p99", "p99.9", "srv µs/msg", "srv+cli µs/msg", "note"]
    };
    // CPU comes in 10 ms ticks: a short run can measure 0 for a peer.
    let ratio = |a: f64, b: f64| if (a / b).is_finite() { format!("{:.2}×", a / b) } else { "n/a".into() };
    let mut rows = Vec::new();
    for &case in &args.cases {
        for (canopy, peer, note) in PAIRS {
            let (Some(c), Some(p)) = (find(results, (pass, case, canopy)), find(results, (pass, case, peer))) else {
                continue;
            };
            let mut row = vec![canopy.label().to_string(), peer.label().to_string(), case.label()];
            if throughput {
                row.extend([ratio(c.total_rate, p.total_rate), ratio(c.p50_us, p.p50_us), ratio(c.p99_us, p.p99_us)]);
            } else {
                row.extend([ratio(c.p50_us, p.p50_us), ratio(c.p99_us, p.p99_us), ratio(c.p999_us, p.p999_us)]);
            }
            row.extend([
                ratio(c.server_us_per_msg, p.server_us_per_msg),
                ratio(c.server_us_per_msg + c.client_us_per_msg, p.server_us_per_msg + p.client_us_per_msg),
                note.to_string(),
            ]);
            rows.push(row);
        }
    }
    if rows.is_empty() {
        println!("(no pair of systems to compare in this run)");
    } else {
        print_table(header, &rows);
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn lo_mtu() -> String {
    std::fs::read_to_string("/sys/class/net/lo/mtu").map_or_else(|_| "unknown".into(), |s| s.trim().to_string())
}

async fn bench(mut args: Args) -> anyhow::Result<()> {
    let relay = if args.systems.iter().any(|s| s.is_canopy()) { Some(relay_binary(&args)?) } else { None };
    // A relay from before `--sync-interval-ms` refuses the flag: say so once, run the rest.
    let mut skipped = None;
    if let Some(relay) = &relay
        && args.systems.contains(&System::CanopyFjallInterval)
        && !relay_has_flag(relay, "--sync-interval-ms")
    {
        let why = format!(
            "canopy-fjall-interval SKIPPED: {} has no --sync-interval-ms (its --help does not list it); rebuild the relay",
            relay.display()
        );
        println!("{why}");
        args.systems.retain(|&s| s != System::CanopyFjallInterval);
        skipped = Some(why);
    }
    // Likewise a relay from before `--tcp-listen`, for canopy-tcp and --canopy-tcp.
    if let Some(relay) = &relay
        && (args.canopy_tcp || args.systems.iter().any(|s| matches!(s, System::CanopyTcp | System::CanopyTcpUnacked)))
        && !relay_has_flag(relay, "--tcp-listen")
    {
        let why = format!("TLS over TCP SKIPPED: {} has no --tcp-listen (its --help does not list it); rebuild the relay", relay.display());
        println!("{why}");
        let over_tcp = |s: System| {
            matches!(s, System::CanopyTcp | System::CanopyTcpUnacked)
                || (args.canopy_tcp && matches!(s, System::CanopyFjall | System::CanopyFjallInterval))
        };
        args.systems.retain(|&s| !over_tcp(s));
        skipped = Some(why);
    }
    let mut passes = vec![Pass::Throughput];
    if args.paced_rate > 0 {
        passes.push(Pass::Paced(args.paced_rate));
    }
    let cases: Vec<String> = args.cases.iter().map(|c| c.label()).collect();
    let paced = match args.paced_rate {
        0 => "no paced pass".to_string(),
        rate => format!("paced pass {} at {rate}/s in total", args.paced_messages),
    };
    println!(
        "pubsub-bench: payloads of {PAYLOAD} B; throughput pass {} + {} warm-up, window {} per publisher; \
         {paced}; cases (publishers→subscribers) {}; relay max_queue {}; \
         {} round(s), medians shown; loopback MTU {}; worker threads {}; load average {}",
        args.messages,
        args.warmup,
        args.window,
        cases.join(", "),
        args.relay_max_queue,
        args.rounds,
        lo_mtu(),
        args.threads.map_or("each process's default".to_string(), |n| format!("{n} in every process")),
        loadavg()
    );
    if args.canopy_tcp {
        println!("--canopy-tcp: canopy-fjall and canopy-fjall-interval clients over TLS on TCP");
    }
    if args.systems.iter().any(|s| s.is_nats()) {
        println!("peer: {}", peer_version("nats-server", "--version"));
    }
    if args.systems.contains(&System::Mosquitto) {
        println!("peer: {}", peer_version("mosquitto", "-h"));
    }
    for &system in &args.systems {
        println!("  {:<21} {}", system.label(), system.semantics(args.sync_interval_ms));
    }
    let mut runs: Vec<((Pass, Case, System), Vec<Row>)> = Vec::new();
    let mut failures = 0;
    for round in 0..args.rounds {
        for &pass in &passes {
            for &case in &args.cases {
                // Round-robin over the systems, starting one further each round.
                let n = args.systems.len();
                for i in 0..n {
                    let system = args.systems[(i + round) % n];
                    match run_one(system, case, pass, &args, relay.as_deref()).await {
                        Ok(row) => {
                            let key = (pass, case, system);
                            match runs.iter_mut().find(|(k, _)| *k == key) {
                                Some((_, rows)) => rows.push(row),
                                None => runs.push((key, vec![row])),
                            }
                        }
                        Err(e) => {
                            failures += 1;
                            println!("round {round}: {} {} {pass:?} FAILED: {e:#}", system.label(), case.label());
                        }
                    }
                }
            }
        }
        eprintln!("round {} of {} done (load average {})", round + 1, args.rounds, loadavg());
    }
    let results: Results = runs.iter().map(|(k, rows)| (*k, median_row(rows))).collect();
    for &pass in &passes {
        match pass {
            Pass::Throughput => println!(
                "\nthroughput pass: {} payloads in total, up to {} outstanding per publisher",
                args.messages, args.window
            ),
            Pass::Paced(rate) => println!("\npaced pass: {} payloads at {rate}/s in total", args.paced_messages),
        }
        print_pass(pass, &args, &results);
        print_ratios(pass, &args, &results);
    }
    println!("\nload average at the end: {}", loadavg());
    let incomplete = results.iter().filter(|(_, r)| r.missing > 0 || !r.errors.is_empty()).count();
    if let Some(why) = &skipped {
        println!("{why}");
    }
    ensure!(failures == 0 && incomplete == 0, "{failures} run(s) failed, {incomplete} incomplete");
    ensure!(skipped.is_none() || args.smoke, "canopy-fjall-interval was skipped");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// --mtu: the same run in a network namespace of its own

/// A network namespace, deleted when dropped.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        match Command::new("ip").args(["netns", "del", &self.0]).status() {
            Ok(s) if s.success() => {}
            other => eprintln!("pubsub-bench: could not delete network namespace {} ({other:?})", self.0),
        }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().context("running ip (iproute2)")?;
    ensure!(
        out.status.success(),
        "ip {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// This program's arguments without `--mtu N`.
fn argv_without_mtu() -> Vec<String> {
    let mut out = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--mtu" {
            it.next();
        } else {
            out.push(a);
        }
    }
    out
}

/// Runs this bench again (without `--mtu`) in a fresh network namespace whose loopback has
/// MTU `mtu`; deletes the namespace afterwards, whatever happened. SIGINT and SIGTERM are
/// passed on to the bench, which ends, and the namespace is still deleted.
fn in_netns(mtu: u32) -> anyhow::Result<()> {
    let name = format!("canopy-bench-{}", std::process::id());
    ip(&["netns", "add", &name])?;
    let netns = Netns(name.clone());
    ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "mtu", &mtu.to_string(), "up"])?;
    let exe = std::env::current_exe()?;
    eprintln!("pubsub-bench: running in network namespace {name} (lo mtu {mtu})");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &name])
        .arg(&exe)
        .args(argv_without_mtu())
        .spawn()
        .context("starting the bench in the namespace")?;
    let pid = child.id().to_string();
    let status = tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let mut wait = tokio::task::spawn_blocking(move || child.wait());
        loop {
            let sig = tokio::select! {
                status = &mut wait => return anyhow::Ok(status??),
                _ = interrupt.recv() => "-INT",
                _ = terminate.recv() => "-TERM",
            };
            let _ = Command::new("kill").args([sig, &pid]).status();
        }
    })?;
    drop(netns);
    ensure!(status.success(), "the bench in network namespace {name} failed ({status})");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    if let Some(mtu) = args.mtu {
        return in_netns(mtu);
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        ensure!(n > 0, "--threads must be positive");
        let _ = THREADS.set(n);
        runtime.worker_threads(n);
    }
    runtime.enable_all().build()?.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        // On SIGINT or SIGTERM the run is dropped, which kills its server process and
        // removes its temporary directory.
        tokio::select! {
            result = bench(args) => result,
            _ = interrupt.recv() => bail!("interrupted (SIGINT)"),
            _ = terminate.recv() => bail!("terminated (SIGTERM)"),
        }
    })
}
