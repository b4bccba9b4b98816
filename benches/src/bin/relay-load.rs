//! Load run against one real relay process: many concurrent client connections holding many
//! subscriptions, a bounded burst of publishes, every delivery checked, memory reported.
//!
//! The relay is the real `canopy-relay` binary, started as a child process (`--store memory`,
//! a temporary data directory, loopback only). Build it in the same profile first; the bench
//! looks for it next to its own executable:
//!
//! ```text
//! cargo build --release -p canopy-relay
//! cargo run --release -p canopy-benches --bin relay-load -- \
//!     [--connections 1000] [--subs-per-connection 100] [--seconds 10] [--rate 2000]
//! ```
//!
//! Every client is its own SDK [`Client`]; the clients share the SDK's QUIC endpoint (one UDP
//! socket per runtime), though each one had its own when the figures in `docs/performance.md`
//! were taken. The run checks the open-file limit before starting (raise it with `ulimit -n`
//! if it says so).
//!
//! Phases:
//! 1. start the relay; resident set `R0`;
//! 2. open the publisher and subscriber connections; `R1` once the relay counts every link;
//! 3. subscribe everything (`CachedAndLive`) and wait for each subscription's `ReplayDone`;
//!    `R2` once the relay counts every subscription;
//! 4. publish `rate × seconds` chunks, paced, from a few publisher connections, at names
//!    that hit known subscriptions (most a single distinct one, some a broad filter shared by
//!    many connections); wait for every expected delivery; `R3`.
//!
//! The expected receivers of each publish are computed with a [`SubscriptionTable`] holding
//! every subscription. Each (subscription, publish) pair must arrive exactly once; anything
//! else (missing, duplicate, unexpected, a failed publish or subscription) fails the run
//! with exit code 1. Latency is publish call → the subscriber's task receiving the chunk
//! (both ends in this process).

use std::collections::{HashMap, HashSet};
use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use canopy::SubscriptionTable;
use canopy_benches::memory::{Counting, resident_bytes, subscription_cost};
use canopy_sdk::{Chunk, Client, ConnectOptions, Filter, Name, ReplayMode, SubEvent, Subscription, Trust, now_ms};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

const USAGE: &str = "relay-load [--connections N] [--subs-per-connection N] [--seconds S] [--rate PUBLISHES_PER_S]
           [--publishers N] [--broad-filters N] [--broad-every N] [--payload BYTES] [--seed N]
           [--connect-concurrency N] [--relay PATH]";

/// Bound on waiting for the relay to start, for every link or subscription to be counted,
/// and for the last deliveries after the last ack.
const WAIT: Duration = Duration::from_secs(120);
/// How long after the expected count is reached extra (duplicate) deliveries are still
/// collected.
const GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
struct Args {
    connections: usize,
    subs_per_connection: usize,
    seconds: u64,
    rate: u64,
    publishers: usize,
    broad_filters: usize,
    broad_every: u64,
    payload: usize,
    seed: u64,
    connect_concurrency: usize,
    relay: Option<PathBuf>,
}

impl Args {
    fn parse() -> anyhow::Result<Args> {
        let mut args = Args {
            connections: 1000,
            subs_per_connection: 100,
            seconds: 10,
            rate: 2000,
            publishers: 4,
            broad_filters: 4,
            broad_every: 50,
            payload: 64,
            seed: 1,
            connect_concurrency: 32,
            relay: None,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            if flag == "--help" || flag == "-h" {
                println!("{USAGE}");
                std::process::exit(0);
            }
            let value = it.next().with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
            let num = || value.parse::<u64>().with_context(|| format!("{flag} {value}: not a number"));
            match flag.as_str() {
                "--connections" => args.connections = num()? as usize,
                "--subs-per-connection" => args.subs_per_connection = num()? as usize,
                "--seconds" => args.seconds = num()?,
                "--rate" => args.rate = num()?,
                "--publishers" => args.publishers = num()? as usize,
                "--broad-filters" => args.broad_filters = num()? as usize,
                "--broad-every" => args.broad_every = num()?,
                "--payload" => args.payload = num()? as usize,
                "--seed" => args.seed = num()?,
                "--connect-concurrency" => args.connect_concurrency = num()? as usize,
                "--relay" => args.relay = Some(PathBuf::from(value)),
                other => bail!("unknown flag {other}\n{USAGE}"),
            }
        }
        ensure!(args.connections > 0 && args.subs_per_connection > 0, "need at least one subscription");
        ensure!(args.publishers > 0 && args.rate > 0 && args.seconds > 0, "need publishers, a rate and seconds");
        ensure!(args.payload >= 12 && args.payload <= canopy_sdk::MAX_CHUNK_DATA, "--payload must be 12..=1024");
        ensure!(args.connect_concurrency > 0, "--connect-concurrency must be positive");
        ensure!(args.broad_every > 0, "--broad-every must be positive");
        Ok(args)
    }

    fn subscriptions(&self) -> usize {
        self.connections * self.subs_per_connection
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
    _data: tempfile::TempDir,
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

impl RelayProcess {
    fn start(binary: &Path) -> anyhow::Result<RelayProcess> {
        let data = tempfile::tempdir().context("creating the relay's data directory")?;
        let mut child = Command::new(binary)
            .args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--store", "memory", "--data"])
            .arg(data.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
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
            _data: data,
        };
        let deadline = Instant::now() + WAIT;
        let (mut addr, mut metrics) = (None, None);
        while addr.is_none() || metrics.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines_rx
                .recv_timeout(left)
                .context("the relay exited or did not print `listening on` and `metrics on` in time")?;
            if let Some(rest) = line.strip_prefix("listening on ") {
                addr = Some(rest.trim().parse::<SocketAddr>().context("relay listen address")?);
            } else if let Some(rest) = line.strip_prefix("metrics on http://") {
                let rest = rest.trim().trim_end_matches("/metrics");
                metrics = Some(rest.parse::<SocketAddr>().context("relay metrics address")?);
            }
        }
        process.addr = addr.expect("set");
        process.metrics = metrics.expect("set");
        process.cert_pem =
            std::fs::read_to_string(process._data.path().join("cert.pem")).context("reading the relay's cert.pem")?;
        Ok(process)
    }

    fn pid(&self) -> u32 {
        self.child.id()
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

    /// One sample of the relay's Prometheus endpoint, as name → value.
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

    /// Waits (bounded) until the relay's gauge `name` reaches `want`.
    async fn wait_gauge(&self, name: &str, want: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.metrics().await?.get(name).copied().unwrap_or(0);
            if got >= want {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "relay's {name} stayed at {got}, expected {want}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
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
// Workload

/// The subscriptions (index = connection × subs_per_connection + slot) and the publishes.
struct Workload {
    filters: Vec<Filter>,
    /// Per publish: its name and the subscriptions expected to receive it.
    publishes: Vec<(Name, Vec<u32>)>,
    expected_deliveries: usize,
}

fn broad_filter(k: usize) -> Filter {
    // /24 prefixes 0xb0_00_00, 0xb0_00_01, …: disjoint from each other.
    Filter::new(Name::new((0x00b0_0000u128 | k as u128) << 104), 24).expect("valid filter")
}

fn workload(args: &Args) -> Workload {
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let spc = args.subs_per_connection;
    let broad = args.broad_filters.min(spc);
    let mut filters = Vec::with_capacity(args.subscriptions());
    let mut distinct = Vec::new();
    for c in 0..args.connections {
        for slot in 0..spc {
            if slot == 0 && broad > 0 {
                filters.push(broad_filter(c % broad));
            } else {
                let len = rng.random_range(64..=128u8);
                distinct.push(filters.len() as u32);
                filters.push(Filter::new(Name::new(rng.random::<u128>()), len).expect("valid filter"));
            }
        }
    }
    let mut table = SubscriptionTable::new();
    for (i, f) in filters.iter().enumerate() {
        table.insert(*f, i as u32);
    }
    let total = args.rate * args.seconds;
    let mut used = HashSet::new();
    let mut publishes = Vec::with_capacity(total as usize);
    let mut expected_deliveries = 0;
    for i in 0..total {
        // A name nobody published yet (a /128 filter has only one), inside the target filter.
        let name = loop {
            let target = if broad > 0 && (i % args.broad_every == 0 || distinct.is_empty()) {
                broad_filter(rng.random_range(0..broad))
            } else {
                filters[distinct[rng.random_range(0..distinct.len())] as usize]
            };
            let name = target.name().to_u128() | (rng.random::<u128>() & !target.mask());
            if used.insert(name) {
                break Name::new(name);
            }
        };
        let mut targets = Vec::new();
        table.for_each_match(name, |s| targets.push(s));
        expected_deliveries += targets.len();
        publishes.push((name, targets));
    }
    Workload { filters, publishes, expected_deliveries }
}

// ---------------------------------------------------------------------------------------
// Clients

enum Ev {
    Delivery { sub: u32, publish: u32, latency_us: u64 },
    Error { sub: u32, message: String },
}

/// Reads one subscription until it ends or the run aborts the task.
async fn read_sub(
    sub: u32,
    mut s: Subscription,
    confirmed: Arc<AtomicUsize>,
    events: mpsc::UnboundedSender<Ev>,
    base: Instant,
) {
    while let Some(event) = s.next().await {
        match event {
            SubEvent::ReplayDone => {
                confirmed.fetch_add(1, Ordering::Relaxed);
            }
            SubEvent::Gap => {}
            SubEvent::Chunk(chunk) => {
                let now_us = base.elapsed().as_micros() as u64;
                let data = chunk.data();
                let publish = u32::from_be_bytes(data[0..4].try_into().expect("4 bytes"));
                let sent_us = u64::from_be_bytes(data[4..12].try_into().expect("8 bytes"));
                let _ = events.send(Ev::Delivery { sub, publish, latency_us: now_us.saturating_sub(sent_us) });
            }
            SubEvent::Error { code, message } => {
                let _ = events.send(Ev::Error { sub, message: format!("{code}: {message}") });
                return;
            }
        }
    }
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} ({per_sec}, {elapsed})")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    pb
}

async fn connect_all(relay: &RelayProcess, n: usize, concurrency: usize) -> anyhow::Result<Vec<Client>> {
    let pb = bar(n as u64, "connecting");
    let limit = Arc::new(Semaphore::new(concurrency));
    let mut set = JoinSet::new();
    for i in 0..n {
        let mut opts = ConnectOptions::new(relay.addr, Trust::CaPem(relay.cert_pem.clone()));
        opts.connect_timeout = Duration::from_secs(30);
        let limit = limit.clone();
        set.spawn(async move {
            let _permit = limit.acquire_owned().await.expect("open semaphore");
            (i, Client::connect(opts).await)
        });
    }
    let mut clients: Vec<Option<Client>> = (0..n).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        let (i, client) = joined.context("connect task")?;
        clients[i] = Some(client.with_context(|| format!("connection {i}"))?);
        pb.inc(1);
    }
    pb.finish();
    Ok(clients.into_iter().map(|c| c.expect("every connection")).collect())
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Counts heap bytes, for the routing core's cost per subscription printed first.
#[global_allocator]
static ALLOC: Counting = Counting;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let total_conns = args.connections + args.publishers;
    // One UDP socket per client, plus the runtime's own descriptors.
    let needed = total_conns as u64 + 64;
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

    println!(
        "relay-load: {} connections × {} subscriptions = {} subscriptions; {} publishers, {} publishes/s for {} s, \
         {}-byte payloads, seed {}",
        args.connections,
        args.subs_per_connection,
        args.subscriptions(),
        args.publishers,
        args.rate,
        args.seconds,
        args.payload,
        args.seed
    );
    // The routing core's heap per subscription, counted by the allocator for the same number
    // of links and subscriptions (`sub-memory`); the relay process's resident set follows.
    let cost = subscription_cost(args.connections as u64, args.subs_per_connection as u64, args.seed);
    println!(
        "routing core heap  {:.1} B per subscription in {:.2} blocks (counted, `sub-memory`); the subscription table alone {:.1} B",
        cost.node_bytes, cost.node_blocks, cost.table_bytes
    );
    let t = Instant::now();
    let work = workload(&args);
    println!(
        "workload: {} publishes, {} expected deliveries (computed in {:.1?})",
        work.publishes.len(),
        work.expected_deliveries,
        t.elapsed()
    );

    let relay = RelayProcess::start(&binary)?;
    println!("relay: {} pid {} listening on {} (store memory)", binary.display(), relay.pid(), relay.addr);
    relay.wait_gauge("canopy_links", 0).await?;
    let (r0, _) = relay.rss()?;

    // Phase 2: connections.
    let t = Instant::now();
    let clients = connect_all(&relay, total_conns, args.connect_concurrency).await?;
    relay.wait_gauge("canopy_links", total_conns as u64).await?;
    let connect_time = t.elapsed();
    let (r1, _) = relay.rss()?;
    let (publishers, subscribers) = clients.split_at(args.publishers);

    // Phase 3: subscriptions.
    let base = Instant::now();
    let confirmed = Arc::new(AtomicUsize::new(0));
    let (events_tx, mut events_rx) = mpsc::unbounded_channel::<Ev>();
    let received = Arc::new(AtomicU64::new(0));
    let collector = {
        let received = received.clone();
        tokio::spawn(async move {
            let mut counts: HashMap<(u32, u32), u32> = HashMap::new();
            let mut latencies = Vec::new();
            let mut errors = Vec::new();
            while let Some(ev) = events_rx.recv().await {
                match ev {
                    Ev::Delivery { sub, publish, latency_us } => {
                        *counts.entry((sub, publish)).or_default() += 1;
                        latencies.push(latency_us);
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    Ev::Error { sub, message } => errors.push((sub, message)),
                }
            }
            (counts, latencies, errors)
        })
    };
    let t = Instant::now();
    let total_subs = args.subscriptions();
    let pb = bar(total_subs as u64, "subscribing");
    let mut readers = JoinSet::new();
    for (c, client) in subscribers.iter().enumerate() {
        for slot in 0..args.subs_per_connection {
            let idx = c * args.subs_per_connection + slot;
            let s = client.subscribe(work.filters[idx], ReplayMode::CachedAndLive).await?;
            readers.spawn(read_sub(idx as u32, s, confirmed.clone(), events_tx.clone(), base));
        }
        pb.set_position(confirmed.load(Ordering::Relaxed) as u64);
    }
    drop(events_tx);
    let deadline = Instant::now() + WAIT;
    loop {
        let done = confirmed.load(Ordering::Relaxed);
        pb.set_position(done as u64);
        if done >= total_subs {
            break;
        }
        ensure!(Instant::now() < deadline, "only {done} of {total_subs} subscriptions confirmed in {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pb.finish();
    relay.wait_gauge("canopy_subscriptions", total_subs as u64).await?;
    let subscribe_time = t.elapsed();
    let (r2, _) = relay.rss()?;

    // Phase 4: publishes, paced at `rate` over `seconds`, round-robin over the publishers.
    let pb = bar(work.publishes.len() as u64, "publishing");
    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let payload = args.payload;
    let start = tokio::time::Instant::now();
    let hard_stop = start + Duration::from_secs(args.seconds) + WAIT;
    let mut publish_tasks = JoinSet::new();
    for (p, client) in publishers.iter().enumerate() {
        let client = client.clone();
        let names: Vec<(u32, Name)> = work
            .publishes
            .iter()
            .enumerate()
            .filter(|(i, _)| i % args.publishers == p)
            .map(|(i, (name, _))| (i as u32, *name))
            .collect();
        let (acked, failed, pb) = (acked.clone(), failed.clone(), pb.clone());
        let rate = args.rate;
        publish_tasks.spawn(async move {
            // At most this many of one publisher's publishes wait for their ack at once.
            let window = Arc::new(Semaphore::new(512));
            let mut inflight = JoinSet::new();
            for (i, name) in names {
                tokio::time::sleep_until(start + Duration::from_micros(u64::from(i) * 1_000_000 / rate)).await;
                let permit = window.clone().acquire_owned().await.expect("open semaphore");
                let mut data = vec![0u8; payload];
                data[0..4].copy_from_slice(&i.to_be_bytes());
                data[4..12].copy_from_slice(&(base.elapsed().as_micros() as u64).to_be_bytes());
                let chunk = Chunk::new(name, now_ms() + 600_000, data).expect("valid chunk");
                let client = client.clone();
                let (acked, failed, pb) = (acked.clone(), failed.clone(), pb.clone());
                inflight.spawn(async move {
                    match client.publish(chunk).await {
                        Ok(()) => acked.fetch_add(1, Ordering::Relaxed),
                        Err(err) => {
                            eprintln!("publish {i} failed: {err}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    pb.inc(1);
                    drop(permit);
                });
            }
            while inflight.join_next().await.is_some() {}
        });
    }
    let all_acked =
        tokio::time::timeout_at(hard_stop, async { while publish_tasks.join_next().await.is_some() {} }).await;
    let publish_time = start.elapsed();
    pb.finish();
    ensure!(all_acked.is_ok(), "publishes not all answered within {:?}", hard_stop - start);

    // Wait (bounded) for the expected deliveries, then a grace period for extra ones.
    let expected = work.expected_deliveries as u64;
    let deadline = Instant::now() + WAIT;
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain_time = start.elapsed();
    tokio::time::sleep(GRACE).await;
    let (r3, hwm) = relay.rss()?;
    let m = relay.metrics().await?;
    readers.abort_all();
    while readers.join_next().await.is_some() {}
    let (counts, mut latencies, errors) = collector.await.context("collector")?;

    // Check: every expected (subscription, publish) pair exactly once, nothing else.
    let (mut missing, mut duplicates, mut matched) = (0u64, 0u64, 0usize);
    for (i, (_, targets)) in work.publishes.iter().enumerate() {
        for &s in targets {
            match counts.get(&(s, i as u32)).copied().unwrap_or(0) {
                0 => missing += 1,
                1 => matched += 1,
                _ => {
                    matched += 1;
                    duplicates += 1;
                }
            }
        }
    }
    let unexpected = counts.len() - matched;
    latencies.sort_unstable();
    let per_sub = (r2.saturating_sub(r1)) as f64 / total_subs as f64;
    let per_conn = (r1.saturating_sub(r0)) as f64 / total_conns as f64;

    println!();
    println!(
        "connections        {} ({} subscribers + {} publishers), opened in {:.1?}",
        total_conns, args.connections, args.publishers, connect_time
    );
    println!(
        "subscriptions      {} confirmed (ReplayDone) in {:.1?}; relay counts {}",
        total_subs,
        subscribe_time,
        m.get("canopy_subscriptions").copied().unwrap_or(0)
    );
    println!(
        "relay RSS          start {} | connected {} | subscribed {} | end {} (peak {})",
        mib(r0),
        mib(r1),
        mib(r2),
        mib(r3),
        mib(hwm)
    );
    println!(
        "relay memory       {:.0} B per connection, {:.0} B per subscription, {:.0} B per subscription all-in ((subscribed - start) / subscriptions)",
        per_conn,
        per_sub,
        (r2.saturating_sub(r0)) as f64 / total_subs as f64
    );
    println!(
        "publishes          {} sent in {:.1?}, {} acked, {} failed",
        work.publishes.len(),
        publish_time,
        acked.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    println!(
        "deliveries         {} expected, {} received (all in by {:.1?} after the first publish); relay chunks_out {}",
        expected,
        latencies.len(),
        drain_time,
        m.get("canopy_chunks_out_total").copied().unwrap_or(0)
    );
    println!(
        "exactly once       missing {missing}, duplicated {duplicates}, unexpected {unexpected}; subscription errors {}; relay slow_consumers {}",
        errors.len(),
        m.get("canopy_slow_consumers_total").copied().unwrap_or(0)
    );
    println!(
        "latency            p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (publish call → subscriber task)",
        percentile(&latencies, 50.0) as f64 / 1000.0,
        percentile(&latencies, 99.0) as f64 / 1000.0,
        latencies.last().copied().unwrap_or(0) as f64 / 1000.0
    );
    println!("load generator RSS {}", mib(resident_bytes().unwrap_or(0) as u64));
    for (sub, message) in errors.iter().take(5) {
        eprintln!("subscription {sub} ended: {message}");
    }

    for client in &clients {
        client.close();
    }
    drop(relay);
    let ok = missing == 0
        && duplicates == 0
        && unexpected == 0
        && errors.is_empty()
        && failed.load(Ordering::Relaxed) == 0
        && acked.load(Ordering::Relaxed) == work.publishes.len() as u64;
    if !ok {
        bail!("the run did not deliver every expected chunk exactly once");
    }
    println!("ok");
    Ok(())
}
