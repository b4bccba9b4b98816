//! Soak run: one real relay for minutes under churn, with its resident set sampled, to show
//! that its memory stops growing once the workload is in steady state.
//!
//! What it measures: the relay's `VmRSS` (from `/proc/<pid>/status`) every `--sample`
//! seconds while, for `--seconds`:
//! - about `--connections` client connections stay open, each an SDK [`Client`] (the clients
//!   share the SDK's QUIC endpoint), while `--churn` of them per second (on average) close and
//!   are replaced by new ones;
//! - every connection holds 1..=`--max-subs` subscriptions and, every `--sub-period` seconds
//!   on average, adds or removes one. Filters: a topic (`/32`, 80%), a group of four topics
//!   (`/30`, 10%) or a topic of the echo plugin's replies (`/32`, 10%). Modes: `CachedAndLive`
//!   (50%), `LiveOnly` (30%), `CachedOnly` (20%, which ends by itself after its replay);
//! - `--publishers` connections publish `--rate` chunks per second in all, at unique names
//!   spread uniformly over `--topics` topics, with 16..=`--payload-max` data bytes and expiries
//!   `--ttl-min`..=`--ttl-max` seconds ahead, so the store reaches a steady state;
//! - one publish in `--plugin-every` is a request to the `echo` Wasm plugin loaded by the relay
//!   (`[[plugin]]`), which answers each one with a chunk of its own.
//!
//! The relay is the real `canopy-relay` binary, started as a child process with a config file
//! (`--listen 127.0.0.1:0`, the fjall store by default, a temporary data directory, the plugin).
//! Build it and the plugins in the same profile first; the bench looks for the relay next to
//! its own executable and for `echo.wasm` in `<target>/wasm32-wasip2/plugin/`:
//!
//! ```text
//! cargo build --release -p canopy-relay && bash scripts/build-plugins.sh --release
//! cargo run --release -p canopy-benches --bin soak -- [--seconds 600] [--sample 10] \
//!     [--connections 1000] [--churn 5] [--rate 1500] [--store fjall|memory]
//! ```
//!
//! Each sample prints one line: elapsed time, relay RSS and CPU, the client side's open
//! connections and subscriptions, the relay's own gauges from its Prometheus endpoint,
//! publishes, deliveries and plugin answers so far. The end prints the curve: minimum,
//! maximum, the RSS at the end of the warm-up (`--warmup`, default half the run), the
//! least-squares slope of RSS over the samples after the warm-up in MiB/min, and a chart.
//! With `--max-slope`, a steeper slope fails the run.
//!
//! The run fails (exit code 1) if the relay exits, if nothing was published, delivered or
//! answered by the plugin, if a publish fails, if a subscription is ended by the relay, or if
//! a delivery lies outside its subscription's filter.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use canopy_benches::memory::resident_bytes;
use canopy_sdk::{
    Chunk, Client, ConnectOptions, ConnectionEvent, Filter, Name, ReplayMode, SubEvent, Subscription, Trust, now_ms,
};
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, broadcast, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Soak run: one relay under connection and subscription churn, steady publishing and a Wasm
/// plugin; its resident set sampled and summarised.
#[derive(Debug, Clone, Parser)]
#[command(name = "soak")]
struct Args {
    /// How long the churn and publishing run, in seconds.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Seconds between RSS samples.
    #[arg(long, default_value_t = 10)]
    sample: u64,
    /// Client connections kept open (publishers not included).
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Connections closed and replaced per second, on average (0: none).
    #[arg(long, default_value_t = 5.0)]
    churn: f64,
    /// Most subscriptions one connection holds (it holds at least one).
    #[arg(long, default_value_t = 6)]
    max_subs: usize,
    /// Mean seconds between subscription changes (one added or removed) on one connection.
    #[arg(long, default_value_t = 15.0)]
    sub_period: f64,
    /// Chunks published per second, all publishers together.
    #[arg(long, default_value_t = 1500)]
    rate: u64,
    /// Publisher connections.
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Most publishes one publisher has waiting for their ack; a publish due while the window
    /// is full is skipped and counted.
    #[arg(long, default_value_t = 512)]
    publish_window: usize,
    /// Topics the publishes are spread over (each a /32 filter).
    #[arg(long, default_value_t = 2048)]
    topics: u32,
    /// Shortest chunk lifetime, in seconds.
    #[arg(long, default_value_t = 30)]
    ttl_min: u64,
    /// Longest chunk lifetime, in seconds.
    #[arg(long, default_value_t = 60)]
    ttl_max: u64,
    /// Largest chunk data in bytes (each chunk has 16..=this many).
    #[arg(long, default_value_t = 512)]
    payload_max: usize,
    /// One publish in this many is a request to the echo plugin.
    #[arg(long, default_value_t = 10)]
    plugin_every: u64,
    /// Each subscription's credit window (`ConnectOptions::subscription_buffer`).
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// The relay's store.
    #[arg(long, value_enum, default_value_t = StoreArg::Fjall)]
    store: StoreArg,
    /// Seconds of warm-up: the slope is fitted to the samples after it [default: half the run].
    #[arg(long)]
    warmup: Option<u64>,
    /// Fail the run if RSS grows faster than this many MiB per minute after the warm-up.
    #[arg(long)]
    max_slope: Option<f64>,
    /// Connection handshakes in flight at once.
    #[arg(long, default_value_t = 32)]
    connect_concurrency: usize,
    /// Seed of the workload's random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The relay binary [default: `canopy-relay` next to this executable].
    #[arg(long, value_name = "PATH")]
    relay: Option<PathBuf>,
    /// The echo plugin [default: `$CANOPY_PLUGIN_DIR/echo.wasm`, else
    /// `<target>/wasm32-wasip2/plugin/echo.wasm`].
    #[arg(long, value_name = "PATH")]
    plugin: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StoreArg {
    Fjall,
    Memory,
}

impl StoreArg {
    fn as_str(self) -> &'static str {
        match self {
            StoreArg::Fjall => "fjall",
            StoreArg::Memory => "memory",
        }
    }
}

impl Args {
    fn check(&self) -> anyhow::Result<()> {
        ensure!(self.seconds > 0 && self.sample > 0, "--seconds and --sample must be positive");
        ensure!(self.connections > 0 && self.max_subs > 0, "need connections and subscriptions");
        ensure!(self.churn >= 0.0 && self.churn.is_finite(), "--churn must be >= 0");
        ensure!(self.sub_period > 0.0 && self.sub_period.is_finite(), "--sub-period must be positive");
        ensure!(self.rate > 0 && self.publishers > 0 && self.publish_window > 0, "need a rate and publishers");
        ensure!((1..=65_536).contains(&self.topics), "--topics must be 1..=65536");
        ensure!(self.ttl_min > 0 && self.ttl_min <= self.ttl_max, "need 0 < --ttl-min <= --ttl-max");
        ensure!(
            (16..=canopy_sdk::MAX_CHUNK_DATA).contains(&self.payload_max),
            "--payload-max must be 16..={}",
            canopy_sdk::MAX_CHUNK_DATA
        );
        ensure!(self.plugin_every > 0 && self.window > 0, "--plugin-every and --window must be positive");
        ensure!(self.connect_concurrency > 0, "--connect-concurrency must be positive");
        Ok(())
    }

    fn warmup(&self) -> u64 {
        self.warmup.unwrap_or(self.seconds / 2).min(self.seconds)
    }

    /// A connection's mean lifetime, if connections churn at all.
    fn mean_lifetime(&self) -> Option<Duration> {
        (self.churn > 0.0).then(|| Duration::from_secs_f64(self.connections as f64 / self.churn))
    }
}

/// Bound on waiting for the relay to start (it compiles the plugin first).
const START_WAIT: Duration = Duration::from_secs(120);
/// Bound on the connection tasks' and publishers' wind-down after the run.
const STOP_WAIT: Duration = Duration::from_secs(30);
/// How many of each kind of unexpected event are logged in full (all are counted).
const LOG_FIRST: u64 = 5;

// ---------------------------------------------------------------------------------------
// Names and filters
//
// Byte 0 is 0x5c, byte 1 the region (data, echo requests, echo replies), bytes 2..4 the topic,
// byte 4 the publisher, bytes 5..13 its sequence number, bytes 13..16 random. The echo plugin
// keeps the low 112 bits of a request in its reply, so a reply has the request's topic.

const SOAK: u128 = 0x5c;
const DATA: u128 = 0;
const REQUESTS: u128 = 1;
const REPLIES: u128 = 2;

fn region_filter(region: u128) -> Filter {
    Filter::new(Name::new(SOAK << 120 | region << 112), 16).expect("valid filter")
}

fn topic_filter(region: u128, topic: u32, len: u8) -> Filter {
    Filter::new(Name::new(SOAK << 120 | region << 112 | u128::from(topic) << 96), len).expect("valid filter")
}

fn chunk_name(region: u128, topic: u32, publisher: u8, seq: u64, low: u32) -> Name {
    Name::new(
        SOAK << 120
            | region << 112
            | u128::from(topic) << 96
            | u128::from(publisher) << 88
            | u128::from(seq) << 24
            | u128::from(low & 0xff_ffff),
    )
}

fn pick_filter(rng: &mut SmallRng, topics: u32) -> Filter {
    let topic = rng.random_range(0..topics);
    match rng.random_range(0..10) {
        0..8 => topic_filter(DATA, topic, 32),
        8 => topic_filter(DATA, topic & !3, 30),
        _ => topic_filter(REPLIES, topic, 32),
    }
}

fn pick_mode(rng: &mut SmallRng) -> ReplayMode {
    match rng.random_range(0..10) {
        0..5 => ReplayMode::CachedAndLive,
        5..8 => ReplayMode::LiveOnly,
        _ => ReplayMode::CachedOnly,
    }
}

// ---------------------------------------------------------------------------------------
// The relay child process

/// The relay child; killed when dropped, so a failing run never leaves it behind.
struct RelayProcess {
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
    cert_pem: String,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `path` as a TOML basic string.
fn toml_str(path: &Path) -> String {
    let mut out = String::from("\"");
    for c in path.to_string_lossy().chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl RelayProcess {
    fn start(binary: &Path, plugin: &Path, store: StoreArg) -> anyhow::Result<RelayProcess> {
        let dir = tempfile::tempdir().context("creating the relay's directory")?;
        let config = format!(
            "listen = \"127.0.0.1:0\"\n\
             metrics_listen = \"127.0.0.1:0\"\n\
             data = {data}\n\
             store = \"{store}\"\n\
             \n\
             [[plugin]]\n\
             file = {plugin}\n\
             name = \"echo\"\n\
             [plugin.config]\n\
             requests = \"{requests}\"\n\
             replies = \"{replies}\"\n",
            data = toml_str(&dir.path().join("data")),
            store = store.as_str(),
            plugin = toml_str(plugin),
            requests = region_filter(REQUESTS),
            replies = region_filter(REPLIES),
        );
        let config_path = dir.path().join("relay.toml");
        std::fs::write(&config_path, config).context("writing the relay's config")?;
        let log = dir.path().join("relay.log");
        let log_file = std::fs::File::create(&log).context("creating the relay's log")?;
        let mut child = Command::new(binary)
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        // Read stdout on a thread until it closes, so the relay never blocks writing it.
        let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if lines_tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut process = RelayProcess {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            metrics: SocketAddr::from(([0, 0, 0, 0], 0)),
            cert_pem: String::new(),
            log,
            dir,
        };
        let deadline = std::time::Instant::now() + START_WAIT;
        let (mut addr, mut metrics) = (None, None);
        while addr.is_none() || metrics.is_none() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Ok(line) = lines_rx.recv_timeout(left) else {
                bail!(
                    "the relay exited or did not print `listening on` and `metrics on` within {START_WAIT:?}; \
                     its log:\n{}",
                    process.log_tail(20)
                );
            };
            if let Some(rest) = line.strip_prefix("listening on ") {
                addr = Some(rest.trim().parse::<SocketAddr>().context("relay listen address")?);
            } else if let Some(rest) = line.strip_prefix("metrics on http://") {
                let rest = rest.trim().trim_end_matches("/metrics");
                metrics = Some(rest.parse::<SocketAddr>().context("relay metrics address")?);
            }
        }
        process.addr = addr.expect("set");
        process.metrics = metrics.expect("set");
        process.cert_pem = std::fs::read_to_string(process.dir.path().join("data/cert.pem"))
            .context("reading the relay's cert.pem")?;
        Ok(process)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the relay is still running.
    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The relay's resident set in bytes (`VmRSS`), and its peak (`VmHWM`).
    fn rss(&self) -> anyhow::Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .context("reading the relay's /proc/PID/status")?;
        let field = |key: &str| -> anyhow::Result<u64> {
            let line = status.lines().find(|l| l.starts_with(key)).with_context(|| format!("no {key}"))?;
            let kb: u64 = line.split_whitespace().nth(1).context("value")?.parse()?;
            Ok(kb * 1024)
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// The relay's CPU time so far (user + system), in seconds, assuming 100 ticks per second.
    fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
        let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(ticks as f64 / 100.0)
    }

    /// One sample of the relay's Prometheus endpoint, as name (with labels) → value.
    async fn metrics(&self) -> anyhow::Result<HashMap<String, u64>> {
        let mut stream = tokio::net::TcpStream::connect(self.metrics).await?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await?;
        let mut body = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut body))
            .await
            .context("metrics endpoint timed out")??;
        Ok(body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (key, value) = l.rsplit_once(' ')?;
                Some((key.to_owned(), value.parse().ok()?))
            })
            .collect())
    }

    /// The last `n` lines of the relay's log.
    fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Lines of the relay's log at WARN or ERROR.
    fn log_warnings(&self) -> usize {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).count()
    }
}

fn relay_binary(args: &Args) -> anyhow::Result<PathBuf> {
    let path = match &args.relay {
        Some(path) => path.clone(),
        None => {
            let exe = std::env::current_exe().context("locating this executable")?;
            exe.parent().context("this executable has no directory")?.join("canopy-relay")
        }
    };
    ensure!(
        path.is_file(),
        "relay binary not found at {}: build it first in the same profile as this bench \
         (`cargo build --release -p canopy-relay`), or pass --relay PATH",
        path.display()
    );
    Ok(path)
}

fn plugin_file(args: &Args) -> anyhow::Result<PathBuf> {
    let path = match (&args.plugin, std::env::var_os("CANOPY_PLUGIN_DIR")) {
        (Some(path), _) => path.clone(),
        (None, Some(dir)) => PathBuf::from(dir).join("echo.wasm"),
        (None, None) => {
            // <target>/<profile>/soak → <target>/wasm32-wasip2/plugin/echo.wasm
            let exe = std::env::current_exe().context("locating this executable")?;
            let target = exe.ancestors().nth(2).context("this executable is not in <target>/<profile>/")?;
            target.join("wasm32-wasip2/plugin/echo.wasm")
        }
    };
    ensure!(
        path.is_file(),
        "echo plugin not found at {}: build it first (`bash scripts/build-plugins.sh --release`), \
         or pass --plugin PATH",
        path.display()
    );
    Ok(path)
}

/// The soft and hard open-file limits of this process.
fn open_file_limits() -> Option<(u64, String)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    let soft = fields.next()?.parse().ok()?;
    let hard = fields.next()?.to_owned();
    Some((soft, hard))
}

// ---------------------------------------------------------------------------------------
// Counters shared by every task

#[derive(Default)]
struct Stats {
    connections_open: AtomicU64,
    connections_opened: AtomicU64,
    connect_failures: AtomicU64,
    disconnects: AtomicU64,
    subs_open: AtomicU64,
    subs_opened: AtomicU64,
    subs_removed: AtomicU64,
    subs_finished: AtomicU64,
    sub_errors: AtomicU64,
    replays_done: AtomicU64,
    gaps: AtomicU64,
    delivered: AtomicU64,
    outside_filter: AtomicU64,
    expired_on_arrival: AtomicU64,
    published: AtomicU64,
    publish_failures: AtomicU64,
    publish_skipped: AtomicU64,
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

fn bump(counter: &AtomicU64) -> u64 {
    counter.fetch_add(1, Ordering::Relaxed)
}

/// Counts one open thing for as long as it lives (a task that is aborted drops it too).
struct Open<'a>(&'a AtomicU64);

impl<'a> Open<'a> {
    fn new(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Open(gauge)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves once `stop` reads true (at once if it already does).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

// ---------------------------------------------------------------------------------------
// Subscribers

/// Reads one subscription until it ends or its connection task aborts it (which drops the
/// subscription, and so unsubscribes).
async fn read_sub(mut sub: Subscription, filter: Filter, stats: Arc<Stats>) {
    let _open = Open::new(&stats.subs_open);
    while let Some(event) = sub.next().await {
        match event {
            SubEvent::Chunk(chunk) => {
                bump(&stats.delivered);
                if !filter.matches(chunk.name()) && bump(&stats.outside_filter) < LOG_FIRST {
                    tracing::warn!("subscription {filter} got {}, outside its filter", chunk.name());
                }
                // Allow for delivery in flight and the relay's 1 s eviction tick.
                if chunk.expiry() + 5_000 < now_ms() {
                    bump(&stats.expired_on_arrival);
                }
            }
            SubEvent::ReplayDone => {
                bump(&stats.replays_done);
            }
            SubEvent::Gap => {
                bump(&stats.gaps);
            }
            SubEvent::Error { code, message } => {
                if bump(&stats.sub_errors) < LOG_FIRST {
                    tracing::warn!("subscription {filter} ended by the relay: {code}: {message}");
                }
                return;
            }
        }
    }
    // Ended without an error: a CachedOnly subscription after its replay.
    bump(&stats.subs_finished);
}

struct Shared {
    args: Args,
    addr: SocketAddr,
    cert_pem: String,
    stats: Arc<Stats>,
    connect_limit: Semaphore,
}

fn connect_options(shared: &Shared) -> ConnectOptions {
    let mut opts = ConnectOptions::new(shared.addr, Trust::CaPem(shared.cert_pem.clone()));
    opts.connect_timeout = Duration::from_secs(30);
    opts.subscription_buffer = shared.args.window;
    opts
}

/// Opens one random subscription on `client` and starts its reader.
async fn open_sub(client: &Client, rng: &mut SmallRng, shared: &Shared) -> Option<JoinHandle<()>> {
    let filter = pick_filter(rng, shared.args.topics);
    let sub = client.subscribe(filter, pick_mode(rng)).await.ok()?;
    bump(&shared.stats.subs_opened);
    Some(tokio::spawn(read_sub(sub, filter, shared.stats.clone())))
}

/// One connection slot: connects, holds a changing set of subscriptions for a random
/// lifetime, closes, and starts over with a new connection, until `stop`.
async fn connection_slot(slot: usize, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let args = &shared.args;
    let stats = &shared.stats;
    let mut rng = SmallRng::seed_from_u64(args.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ slot as u64);
    let mut first = true;
    while !*stop.borrow() {
        // Connect, a bounded number of handshakes at a time.
        let connected = {
            let _permit = tokio::select! {
                _ = stopped(&mut stop) => break,
                permit = shared.connect_limit.acquire() => permit.expect("open semaphore"),
            };
            tokio::select! {
                _ = stopped(&mut stop) => break,
                client = Client::connect(connect_options(&shared)) => client,
            }
        };
        let client = match connected {
            Ok(client) => client,
            Err(err) => {
                if bump(&stats.connect_failures) < LOG_FIRST {
                    tracing::warn!("connection slot {slot}: {err}");
                }
                tokio::select! {
                    _ = stopped(&mut stop) => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let _open = Open::new(&stats.connections_open);
        bump(&stats.connections_opened);
        let mut events = client.connection_events();
        // The first lifetimes are spread over [0, 2 × mean) so that churn is steady from the
        // start; later ones over [mean / 2, 3 × mean / 2).
        let close_at = args.mean_lifetime().map(|mean| {
            let factor = if first { rng.random_range(0.0..2.0) } else { rng.random_range(0.5..1.5) };
            Instant::now() + mean.mul_f64(factor)
        });
        first = false;

        let mut subs: Vec<JoinHandle<()>> = Vec::new();
        for _ in 0..rng.random_range(1..=args.max_subs) {
            subs.extend(open_sub(&client, &mut rng, &shared).await);
        }
        loop {
            let change_at = Instant::now() + Duration::from_secs_f64(args.sub_period * rng.random_range(0.5..1.5));
            let wake = close_at.map_or(change_at, |close| close.min(change_at));
            tokio::select! {
                _ = stopped(&mut stop) => break,
                event = events.recv() => match event {
                    Ok(ConnectionEvent::Disconnected { reason }) => {
                        if bump(&stats.disconnects) < LOG_FIRST {
                            tracing::warn!("connection slot {slot} lost its connection: {reason}");
                        }
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    // The client's driver stopped: start over with a new connection.
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                _ = tokio::time::sleep_until(wake) => {
                    if close_at.is_some_and(|close| Instant::now() >= close) {
                        break;
                    }
                    // Finished CachedOnly subscriptions (and ended ones) leave their slot.
                    subs.retain(|reader| !reader.is_finished());
                    if subs.len() < args.max_subs && (subs.is_empty() || rng.random_bool(0.5)) {
                        subs.extend(open_sub(&client, &mut rng, &shared).await);
                    } else if !subs.is_empty() {
                        let reader = subs.swap_remove(rng.random_range(0..subs.len()));
                        reader.abort();
                        let _ = reader.await;
                        bump(&stats.subs_removed);
                    }
                }
            }
        }
        for reader in &subs {
            reader.abort();
        }
        for reader in subs {
            let _ = reader.await;
        }
        client.close();
    }
}

// ---------------------------------------------------------------------------------------
// Publishers

/// Publishes `rate / publishers` chunks per second until `stop`, never more than
/// `publish_window` waiting for their ack (a publish due while the window is full is
/// skipped and counted).
async fn publisher(index: usize, client: Client, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let args = &shared.args;
    let stats = &shared.stats;
    let mut rng = SmallRng::seed_from_u64(args.seed.wrapping_add(0x5eed_0000 + index as u64));
    let rate = args.rate as f64 / args.publishers as f64;
    let window = Arc::new(Semaphore::new(args.publish_window));
    let mut inflight = JoinSet::new();
    let start = Instant::now();
    let mut seq = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            _ = tick.tick() => {}
        }
        while inflight.try_join_next().is_some() {}
        let due = (start.elapsed().as_secs_f64() * rate) as u64;
        while seq < due {
            seq += 1;
            let Ok(permit) = window.clone().try_acquire_owned() else {
                bump(&stats.publish_skipped);
                continue;
            };
            let topic = rng.random_range(0..args.topics);
            let region = if seq.is_multiple_of(args.plugin_every) { REQUESTS } else { DATA };
            let name = chunk_name(region, topic, index as u8, seq, rng.random());
            let ttl_ms = rng.random_range(args.ttl_min * 1000..=args.ttl_max * 1000);
            let mut data = vec![0u8; rng.random_range(16..=args.payload_max)];
            data[..8].copy_from_slice(&seq.to_be_bytes());
            let chunk = Chunk::new(name, now_ms() + ttl_ms, data).expect("valid chunk");
            let client = client.clone();
            let stats = shared.stats.clone();
            inflight.spawn(async move {
                match client.publish(chunk).await {
                    Ok(()) => {
                        bump(&stats.published);
                    }
                    Err(err) => {
                        if bump(&stats.publish_failures) < LOG_FIRST {
                            tracing::warn!("publish failed: {err}");
                        }
                    }
                }
                drop(permit);
            });
        }
    }
    // Let the last publishes be answered, within a bound.
    let _ = tokio::time::timeout(STOP_WAIT, async { while inflight.join_next().await.is_some() {} }).await;
    inflight.abort_all();
    client.close();
}

// ---------------------------------------------------------------------------------------
// Samples and the curve

const MIB: f64 = 1024.0 * 1024.0;

struct Sample {
    t: f64,
    rss: u64,
    relay_cpu: Option<f64>,
    connections: u64,
    subs: u64,
    relay_links: u64,
    relay_subs: u64,
    store_chunks: u64,
    store_bytes: u64,
    published: u64,
    delivered: u64,
    echoed: u64,
    load1: String,
    generator_rss: u64,
}

impl Sample {
    fn line(&self, cpu_percent: Option<f64>) -> String {
        format!(
            "[{:>5.0} s] relay RSS {:>7.1} MiB cpu {:>4} | clients {:>5} conns {:>6} subs | relay {:>5} links {:>6} subs \
             {:>7} chunks {:>6.1} MiB | published {:>8} delivered {:>9} echoed {:>7} | load {} | generator RSS {:.0} MiB",
            self.t,
            self.rss as f64 / MIB,
            cpu_percent.map_or("-".to_owned(), |p| format!("{p:.0}%")),
            self.connections,
            self.subs,
            self.relay_links,
            self.relay_subs,
            self.store_chunks,
            self.store_bytes as f64 / MIB,
            self.published,
            self.delivered,
            self.echoed,
            self.load1,
            self.generator_rss as f64 / MIB,
        )
    }
}

async fn take_sample(relay: &RelayProcess, stats: &Stats, t: f64) -> anyhow::Result<(Sample, HashMap<String, u64>)> {
    let (rss, _) = relay.rss()?;
    let m = relay.metrics().await.context("reading the relay's metrics")?;
    let get = |key: &str| m.get(key).copied().unwrap_or(0);
    let sample = Sample {
        t,
        rss,
        relay_cpu: relay.cpu_seconds(),
        connections: load(&stats.connections_open),
        subs: load(&stats.subs_open),
        relay_links: get("canopy_links"),
        relay_subs: get("canopy_subscriptions"),
        store_chunks: get("canopy_store_chunks"),
        store_bytes: get("canopy_store_bytes"),
        published: load(&stats.published),
        delivered: load(&stats.delivered),
        echoed: get("canopy_plugin_published_total{plugin=\"echo\"}"),
        load1: std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().map(str::to_owned))
            .unwrap_or_default(),
        generator_rss: resident_bytes().unwrap_or(0) as u64,
    };
    Ok((sample, m))
}

/// Least-squares slope of `(seconds, bytes)` points, in MiB per minute.
fn slope_mib_per_min(points: &[(f64, u64)]) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1 as f64 / MIB).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for &(t, y) in points {
        num += (t - mean_t) * (y as f64 / MIB - mean_y);
        den += (t - mean_t) * (t - mean_t);
    }
    (den > 0.0).then(|| num / den * 60.0)
}

/// The RSS curve as one chart row per sample, bars from 0 to the maximum.
fn chart(samples: &[Sample], warmup: u64) -> String {
    const WIDTH: f64 = 50.0;
    let max = samples.iter().map(|s| s.rss).max().unwrap_or(1).max(1) as f64;
    let mut out = String::new();
    let mut marked = false;
    for s in samples {
        if !marked && s.t >= warmup as f64 && warmup > 0 {
            let _ = writeln!(out, "        ------------- end of warm-up ({warmup} s)");
            marked = true;
        }
        let bar = "#".repeat((s.rss as f64 / max * WIDTH).round() as usize);
        let _ = writeln!(out, "{:>5.0} s {:>7.1} MiB |{bar}", s.t, s.rss as f64 / MIB);
    }
    out
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB)
}

// ---------------------------------------------------------------------------------------

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    args.check()?;
    // One UDP socket per client (connections close and open, so allow for overlap).
    let needed = (args.connections + args.publishers) as u64 * 2 + 64;
    if let Some((soft, hard)) = open_file_limits()
        && soft < needed
    {
        bail!(
            "the open-file limit is {soft} (hard {hard}) but this run needs about {needed}: every client \
             connection has its own UDP socket. Raise it first, e.g. `ulimit -n {}`",
            needed.max(4096)
        );
    }
    let binary = relay_binary(&args)?;
    let plugin = plugin_file(&args)?;
    let warmup = args.warmup();

    println!(
        "soak: {} s, sample every {} s, warm-up {} s; {} connections, churn {}/s (mean lifetime {}), 1..={} \
         subscriptions each changing every ~{} s, window {}; {} publishes/s from {} publishers over {} topics, \
         ttl {}..={} s, data 16..={} B, 1 in {} to the echo plugin; store {}; seed {}",
        args.seconds,
        args.sample,
        warmup,
        args.connections,
        args.churn,
        args.mean_lifetime().map_or("∞".to_owned(), |d| format!("{:.0} s", d.as_secs_f64())),
        args.max_subs,
        args.sub_period,
        args.window,
        args.rate,
        args.publishers,
        args.topics,
        args.ttl_min,
        args.ttl_max,
        args.payload_max,
        args.plugin_every,
        args.store.as_str(),
        args.seed,
    );

    let mut relay = RelayProcess::start(&binary, &plugin, args.store)?;
    println!(
        "relay: {} pid {} listening on {}, plugin {}",
        binary.display(),
        relay.pid(),
        relay.addr,
        plugin.display()
    );

    let stats = Arc::new(Stats::default());
    let shared = Arc::new(Shared {
        args: args.clone(),
        addr: relay.addr,
        cert_pem: relay.cert_pem.clone(),
        stats: stats.clone(),
        connect_limit: Semaphore::new(args.connect_concurrency),
    });
    let (stop_tx, stop_rx) = watch::channel(false);

    let pb = ProgressBar::new(args.seconds);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} s ({elapsed})")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_message("soak");

    // Sample 0: the relay before any client.
    let start = Instant::now();
    let mut samples = Vec::new();
    let (first, _) = take_sample(&relay, &stats, 0.0).await?;
    pb.suspend(|| println!("{}", first.line(None)));
    samples.push(first);

    // Publishers first (their connections are not churned), then the connection slots.
    let mut tasks = JoinSet::new();
    for p in 0..args.publishers {
        let client = Client::connect(connect_options(&shared)).await.context("connecting a publisher")?;
        tasks.spawn(publisher(p, client, shared.clone(), stop_rx.clone()));
    }
    for slot in 0..args.connections {
        tasks.spawn(connection_slot(slot, shared.clone(), stop_rx.clone()));
    }

    let end = start + Duration::from_secs(args.seconds);
    let sample_every = Duration::from_secs(args.sample);
    let mut next_sample = start + sample_every;
    let mut last_metrics = HashMap::new();
    let mut relay_died = None;
    loop {
        let now = Instant::now();
        tokio::time::sleep_until(next_sample.min(end).min(now + Duration::from_secs(1))).await;
        let now = Instant::now();
        pb.set_position(now.duration_since(start).as_secs().min(args.seconds));
        if !relay.alive() {
            relay_died = Some(now.duration_since(start));
            break;
        }
        if now >= next_sample || now >= end {
            let t = now.duration_since(start).as_secs_f64();
            let (sample, m) = take_sample(&relay, &stats, t).await?;
            let prev = samples.last().expect("sample 0");
            let cpu = match (sample.relay_cpu, prev.relay_cpu) {
                (Some(a), Some(b)) if sample.t > prev.t => Some((a - b) / (sample.t - prev.t) * 100.0),
                _ => None,
            };
            pb.suspend(|| println!("{}", sample.line(cpu)));
            pb.set_message(format!("RSS {}", mib(sample.rss)));
            samples.push(sample);
            last_metrics = m;
            next_sample += sample_every;
        }
        if now >= end {
            break;
        }
    }
    pb.finish_and_clear();

    // Wind down: every task stops by itself on `stop`, within a bound.
    stop_tx.send_replace(true);
    let wound_down = tokio::time::timeout(STOP_WAIT, async { while tasks.join_next().await.is_some() {} }).await;
    if wound_down.is_err() {
        tracing::warn!("{} tasks did not stop within {STOP_WAIT:?}; aborting them", tasks.len());
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    if let Some(at) = relay_died {
        bail!("the relay exited after {at:.1?}; its log:\n{}", relay.log_tail(30));
    }
    let (_, hwm) = relay.rss()?;
    if let Ok(m) = relay.metrics().await {
        last_metrics = m;
    }
    let get = |key: &str| last_metrics.get(key).copied().unwrap_or(0);

    // The curve.
    let after: Vec<(f64, u64)> = samples.iter().filter(|s| s.t >= warmup as f64).map(|s| (s.t, s.rss)).collect();
    let slope = slope_mib_per_min(&after);
    let min = samples.iter().min_by_key(|s| s.rss).expect("samples");
    let max = samples.iter().max_by_key(|s| s.rss).expect("samples");
    let at_warmup = samples.iter().find(|s| s.t >= warmup as f64).unwrap_or(samples.last().expect("samples"));
    let last = samples.last().expect("samples");
    let after_min = after.iter().map(|p| p.1).min().unwrap_or(0);
    let after_max = after.iter().map(|p| p.1).max().unwrap_or(0);

    println!();
    println!("relay RSS curve ({} samples, every {} s):", samples.len(), args.sample);
    print!("{}", chart(&samples, warmup));
    println!();
    println!(
        "RSS                min {} (at {:.0} s), max {} (at {:.0} s), peak VmHWM {}",
        mib(min.rss),
        min.t,
        mib(max.rss),
        max.t,
        mib(hwm)
    );
    println!(
        "after warm-up      {} at {:.0} s → {} at {:.0} s; range {} .. {} over {} samples",
        mib(at_warmup.rss),
        at_warmup.t,
        mib(last.rss),
        last.t,
        mib(after_min),
        mib(after_max),
        after.len()
    );
    match slope {
        Some(slope) => println!(
            "slope after warm-up {slope:+.3} MiB/min (least squares), {:+.1} MiB over that {:.0} s",
            slope * (last.t - at_warmup.t) / 60.0,
            last.t - at_warmup.t
        ),
        None => println!("slope after warm-up: too few samples"),
    }
    println!(
        "connections        {} opened ({} failed to connect), {} lost unexpectedly",
        load(&stats.connections_opened),
        load(&stats.connect_failures),
        load(&stats.disconnects)
    );
    println!(
        "subscriptions      {} opened, {} removed, {} CachedOnly finished, {} ended by the relay; {} ReplayDone, {} Gap",
        load(&stats.subs_opened),
        load(&stats.subs_removed),
        load(&stats.subs_finished),
        load(&stats.sub_errors),
        load(&stats.replays_done),
        load(&stats.gaps)
    );
    println!(
        "publishes          {} acked, {} failed, {} skipped (window full)",
        load(&stats.published),
        load(&stats.publish_failures),
        load(&stats.publish_skipped)
    );
    println!(
        "deliveries         {} ({} outside their filter, {} expired > 5 s before arrival)",
        load(&stats.delivered),
        load(&stats.outside_filter),
        load(&stats.expired_on_arrival)
    );
    println!(
        "relay              chunks in {}, out {}, stored {}, evicted expired {} / capacity {}, slow consumers {}, \
         store {} chunks {}",
        get("canopy_chunks_in_total"),
        get("canopy_chunks_out_total"),
        get("canopy_chunks_stored_total"),
        get("canopy_evicted_total{reason=\"expired\"}"),
        get("canopy_evicted_total{reason=\"capacity\"}"),
        get("canopy_slow_consumers_total"),
        get("canopy_store_chunks"),
        mib(get("canopy_store_bytes"))
    );
    println!(
        "echo plugin        {} chunks in, {} published, {} failures, {} restarts, quarantined {}",
        get("canopy_plugin_chunks_in_total{plugin=\"echo\"}"),
        get("canopy_plugin_published_total{plugin=\"echo\"}"),
        get("canopy_plugin_failures_total{plugin=\"echo\"}"),
        get("canopy_plugin_restarts_total{plugin=\"echo\"}"),
        get("canopy_plugin_quarantined{plugin=\"echo\"}")
    );
    println!("relay log          {} WARN/ERROR lines", relay.log_warnings());
    println!("load generator RSS {}", mib(resident_bytes().unwrap_or(0) as u64));
    drop(relay);

    let mut problems = Vec::new();
    if load(&stats.published) == 0 || load(&stats.delivered) == 0 {
        problems.push("nothing was published or delivered".to_owned());
    }
    if get("canopy_plugin_published_total{plugin=\"echo\"}") == 0 {
        problems.push("the echo plugin answered nothing".to_owned());
    }
    if load(&stats.publish_failures) > 0 {
        problems.push(format!("{} publishes failed", load(&stats.publish_failures)));
    }
    if load(&stats.sub_errors) > 0 {
        problems.push(format!("{} subscriptions were ended by the relay", load(&stats.sub_errors)));
    }
    if load(&stats.outside_filter) > 0 {
        problems.push(format!("{} deliveries outside their filter", load(&stats.outside_filter)));
    }
    if let (Some(limit), Some(slope)) = (args.max_slope, slope)
        && slope > limit
    {
        problems.push(format!("RSS grew {slope:.3} MiB/min after warm-up (limit {limit})"));
    }
    if !problems.is_empty() {
        bail!("soak failed: {}", problems.join("; "));
    }
    println!("ok");
    Ok(())
}
