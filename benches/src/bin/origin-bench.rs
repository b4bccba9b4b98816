//! The scaled origin (issue 16): one and two origin front-ends over a Redis Cluster, beside a
//! single origin relay with the memory store and with fjall, in alternating rounds.
//!
//! Everything is real and on 127.0.0.1: a 3-primary cluster of `redis-server` processes
//! (`canopy_redis::testing`), relays started in this process (`canopy_relay::Relay`, QUIC with
//! TLS), clients from the SDK. Each round runs every system once, in turn, each on fresh relays
//! and a flushed cluster, so the machine's drift cannot bias the ratios; the report gives the
//! medians over the rounds.
//!
//! ```text
//! cargo build --release -p canopy-benches --bin origin-bench
//! target/release/origin-bench [--chunks 20000] [--publishers 4] [--window 64] [--paced 1000]
//!                             [--rate 500] [--rounds 3] [--smoke]
//! ```
//!
//! Per round and system:
//! 1. **throughput**: `--publishers` SDK clients (spread over the system's relays: with two
//!    front-ends, half on each) publish `--chunks` chunks of 1 KiB between them, each keeping
//!    `--window` publishes in flight, under a `/4` prefix (names spread over 256 of the
//!    cluster's 4,096 buckets); one live subscriber of that prefix per relay. Chunks/s from the
//!    first publish until every chunk is acknowledged and every subscriber has every chunk.
//! 2. **latency**: `--paced` chunks published at `--rate`/s from a client of the first relay to
//!    a subscriber of the last (with two front-ends: across them, through the cluster's live
//!    fan-out): publish→delivery and publish→ack, p50 and p99.
//! 3. **replay**: a new client of the first relay reads the prefix back (`CachedOnly`):
//!    chunks/s until `ReplayDone`, the count checked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use canopy_redis::testing::RedisCluster;
use canopy_relay::{Relay, RelayConfig, RelayHandle, RelayRole, StoreKind};
use canopy_sdk::{Chunk, Client, ConnectOptions, Filter, Name, ReplayMode, SubEvent, Trust};
use clap::Parser;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

#[derive(Parser)]
#[command(about = "Origin front-ends over a Redis Cluster vs a single origin relay: throughput, latency, replay.")]
struct Cli {
    /// Chunks published per system and round (throughput phase).
    #[arg(long, default_value_t = 20_000)]
    chunks: usize,
    /// Publishing clients, spread over the system's relays.
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Publishes in flight per client.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Chunks in the latency phase.
    #[arg(long, default_value_t = 1_000)]
    paced: usize,
    /// Publishes per second in the latency phase.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Alternating rounds (every system once per round).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// A quick end-to-end run for CI: 2,000 chunks, 100 paced, one round.
    #[arg(long)]
    smoke: bool,
}

/// The names every phase publishes under: `0xa…/4`.
const PREFIX: u128 = 0xa << 124;
const PREFIX_LEN: u8 = 4;
const PAYLOAD: usize = 1024;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum System {
    Memory,
    Fjall,
    Frontends(usize),
}

impl System {
    fn label(self) -> String {
        match self {
            System::Memory => "origin, memory store".into(),
            System::Fjall => "origin, fjall store".into(),
            System::Frontends(n) => format!("{n} front-end{} + Redis", if n > 1 { "s" } else { "" }),
        }
    }
}

/// What one system did in one round.
#[derive(Default, Clone, Copy)]
struct Figures {
    throughput: f64,
    deliver_p50: f64,
    deliver_p99: f64,
    ack_p50: f64,
    replay: f64,
}

/// The `i`-th name: spread over the prefix (a multiplicative hash of `i`), so the chunks fall
/// into many of the cluster's buckets.
fn name(round: usize, i: u64) -> Name {
    let spread = u128::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835) >> PREFIX_LEN;
    // Keep the low 20 bits exactly `i` so names never collide, the round above them.
    let low = (u128::from(i) & 0xf_ffff) | ((round as u128) << 20);
    Name::new(PREFIX | (spread & !((1u128 << 40) - 1)) | low)
}

fn prefix() -> Filter {
    Filter::new(Name::new(PREFIX), PREFIX_LEN).expect("valid")
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    quantile(&values, 0.5)
}

async fn start(system: System, cluster: &RedisCluster, dirs: &[tempfile::TempDir]) -> anyhow::Result<Vec<RelayHandle>> {
    let base = |dir: &tempfile::TempDir| RelayConfig {
        listen: "127.0.0.1:0".parse().expect("valid"),
        data: dir.path().to_owned(),
        capacity_bytes: 1 << 32,
        ..RelayConfig::default()
    };
    let configs: Vec<RelayConfig> = match system {
        System::Memory => vec![RelayConfig { store: StoreKind::Memory, ..base(&dirs[0]) }],
        System::Fjall => vec![RelayConfig { store: StoreKind::Fjall, ..base(&dirs[0]) }],
        System::Frontends(n) => (0..n)
            .map(|i| RelayConfig {
                store: StoreKind::Redis { nodes: cluster.urls() },
                role: Some(RelayRole::OriginFrontend),
                ..base(&dirs[i])
            })
            .collect(),
    };
    let mut relays = Vec::new();
    for config in configs {
        relays.push(Relay::spawn(config).await.context("starting a relay")?);
    }
    Ok(relays)
}

/// Subscribes `client` to the prefix, live only, and waits for `ReplayDone`: from then on
/// every chunk stored anywhere in the origin reaches it.
async fn subscribe_live(client: &Client) -> anyhow::Result<canopy_sdk::Subscription> {
    let mut sub = client.subscribe(prefix(), ReplayMode::LiveOnly).await?;
    match tokio::time::timeout(Duration::from_secs(30), sub.next()).await.context("no ReplayDone")? {
        Some(SubEvent::ReplayDone) => Ok(sub),
        other => anyhow::bail!("subscribing: {other:?}"),
    }
}

async fn connect(relay: &RelayHandle) -> anyhow::Result<Client> {
    let options = ConnectOptions::new(relay.local_addr(), Trust::CaPem(relay.cert_pem().to_string()));
    Ok(Client::connect(options).await?)
}

/// Counts a subscription's chunks until it has `want`, recording when each arrived.
async fn drain(mut sub: canopy_sdk::Subscription, want: usize, arrivals: Option<Arc<Mutex<HashMap<Name, Instant>>>>) -> anyhow::Result<()> {
    let mut got = 0;
    while got < want {
        match tokio::time::timeout(Duration::from_secs(60), sub.next()).await.context("a subscriber stalled")? {
            Some(SubEvent::Chunk(chunk)) => {
                got += 1;
                if let Some(arrivals) = &arrivals {
                    arrivals.lock().expect("lock").insert(chunk.name(), Instant::now());
                }
            }
            Some(SubEvent::ReplayDone | SubEvent::Gap) => {}
            Some(SubEvent::Error { code, message }) => anyhow::bail!("subscription ended: {code} {message}"),
            None => anyhow::bail!("subscription closed"),
        }
    }
    Ok(())
}

async fn run_system(cli: &Cli, system: System, round: usize, cluster: &RedisCluster) -> anyhow::Result<Figures> {
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir()).collect::<Result<_, _>>()?;
    let relays = start(system, cluster, &dirs).await?;
    let expiry = canopy_sdk::now_ms() + 3_600_000;
    let data = vec![0x5a; PAYLOAD];
    let mut figures = Figures::default();

    // 1. Throughput.
    let mut subscribers = Vec::new();
    for relay in &relays {
        let client = connect(relay).await?;
        let sub = subscribe_live(&client).await?;
        subscribers.push((client, sub));
    }
    let mut publishers = Vec::new();
    for p in 0..cli.publishers {
        publishers.push(connect(&relays[p % relays.len()]).await?);
    }
    let started = Instant::now();
    let chunks = cli.chunks;
    let drains: Vec<_> = subscribers
        .into_iter()
        .map(|(client, sub)| {
            tokio::spawn(async move {
                let result = drain(sub, chunks, None).await;
                drop(client);
                result
            })
        })
        .collect();
    let per = cli.chunks.div_ceil(cli.publishers);
    let mut jobs = Vec::new();
    for (p, client) in publishers.iter().enumerate() {
        let (client, data, window) = (client.clone(), data.clone(), cli.window);
        let range = (p * per).min(cli.chunks)..((p + 1) * per).min(cli.chunks);
        jobs.push(tokio::spawn(async move {
            let mut in_flight = FuturesUnordered::new();
            for i in range {
                let chunk = Chunk::new(name(round, i as u64), expiry, data.clone())?;
                let client = client.clone();
                in_flight.push(async move { client.publish(chunk).await });
                if in_flight.len() >= window {
                    in_flight.next().await.expect("in flight")?;
                }
            }
            while let Some(result) = in_flight.next().await {
                result?;
            }
            anyhow::Ok(())
        }));
    }
    for job in jobs {
        job.await??;
    }
    for drain in drains {
        drain.await??;
    }
    figures.throughput = cli.chunks as f64 / started.elapsed().as_secs_f64();

    // 2. Latency, from the first relay to the last.
    let arrivals = Arc::new(Mutex::new(HashMap::new()));
    let reader = connect(relays.last().expect("a relay")).await?;
    let sub = subscribe_live(&reader).await?;
    let watch = tokio::spawn(drain(sub, cli.paced, Some(arrivals.clone())));
    let writer = connect(&relays[0]).await?;
    let mut sent = HashMap::new();
    let mut acks = Vec::new();
    let period = Duration::from_secs_f64(1.0 / cli.rate.max(1) as f64);
    let mut ticker = tokio::time::interval(period);
    let mut in_flight = FuturesUnordered::new();
    let mut i = 0;
    // The acks are awaited beside the ticker, not polled at its ticks, so an ack's time is
    // when it arrived rather than the next tick (which would round every ack up to a period).
    while i < cli.paced || !in_flight.is_empty() {
        tokio::select! {
            _ = ticker.tick(), if i < cli.paced => {
                let chunk = Chunk::new(name(round, (cli.chunks + i) as u64), expiry, data.clone())?;
                let at = Instant::now();
                sent.insert(chunk.name(), at);
                let writer = writer.clone();
                in_flight.push(async move { writer.publish(chunk).await.map(|()| at.elapsed()) });
                i += 1;
            }
            Some(result) = in_flight.next(), if !in_flight.is_empty() => acks.push(result?.as_secs_f64() * 1e6),
        }
    }
    watch.await??;
    let arrivals = std::mem::take(&mut *arrivals.lock().expect("lock"));
    let mut delays: Vec<f64> =
        sent.iter().filter_map(|(name, at)| arrivals.get(name).map(|got| got.duration_since(*at).as_secs_f64() * 1e6)).collect();
    ensure!(delays.len() == cli.paced, "{} of {} paced chunks arrived", delays.len(), cli.paced);
    delays.sort_by(f64::total_cmp);
    acks.sort_by(f64::total_cmp);
    figures.deliver_p50 = quantile(&delays, 0.5);
    figures.deliver_p99 = quantile(&delays, 0.99);
    figures.ack_p50 = quantile(&acks, 0.5);

    // 3. Replay of everything from the first relay.
    let replayer = connect(&relays[0]).await?;
    let started = Instant::now();
    let mut sub = replayer.subscribe(prefix(), ReplayMode::CachedOnly).await?;
    let mut count = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(120), sub.next()).await.context("the replay stalled")? {
            Some(SubEvent::Chunk(_)) => count += 1,
            Some(SubEvent::ReplayDone) | None => break,
            Some(other) => anyhow::bail!("replay: {other:?}"),
        }
    }
    figures.replay = count as f64 / started.elapsed().as_secs_f64();
    ensure!(count == cli.chunks + cli.paced, "replayed {count} of {}", cli.chunks + cli.paced);

    for relay in relays {
        relay.shutdown().await;
    }
    Ok(figures)
}

/// Empties the cluster (`FLUSHALL` on every primary), so each system starts from an empty
/// store.
fn flush(cluster: &RedisCluster) -> anyhow::Result<()> {
    let ports = cluster.ports();
    for node in cluster.primaries()? {
        let port = ports[node].to_string();
        let out = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port, "FLUSHALL", "SYNC"])
            .output()
            .context("running redis-cli")?;
        let reply = String::from_utf8_lossy(&out.stdout);
        ensure!(reply.trim() == "OK", "FLUSHALL on port {port}: {reply} {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    if cli.smoke {
        (cli.chunks, cli.paced, cli.rounds) = (2_000, 100, 1);
    }
    let cluster = RedisCluster::start(3, 0).context("starting the Redis Cluster")?;
    let systems = [System::Memory, System::Fjall, System::Frontends(1), System::Frontends(2)];
    let mut results: HashMap<String, Vec<Figures>> = HashMap::new();
    for round in 0..cli.rounds {
        // Alternate the order: forwards in even rounds, backwards in odd ones.
        let order: Vec<System> = if round % 2 == 0 { systems.to_vec() } else { systems.iter().rev().copied().collect() };
        for system in order {
            flush(&cluster)?;
            let figures = run_system(&cli, system, round, &cluster).await.with_context(|| system.label())?;
            eprintln!(
                "round {round} {:<24} {:>8.0} chunks/s  deliver p50 {:>7.0} µs p99 {:>7.0} µs  ack p50 {:>7.0} µs  replay {:>8.0} chunks/s",
                system.label(),
                figures.throughput,
                figures.deliver_p50,
                figures.deliver_p99,
                figures.ack_p50,
                figures.replay
            );
            results.entry(system.label()).or_default().push(figures);
        }
    }
    println!(
        "\n{} chunks of {PAYLOAD} B, {} publishers x window {}, {} paced at {}/s, {} rounds (medians)\n",
        cli.chunks, cli.publishers, cli.window, cli.paced, cli.rate, cli.rounds
    );
    println!("| system | throughput, chunks/s | deliver p50 | deliver p99 | ack p50 | replay, chunks/s |");
    println!("|---|---|---|---|---|---|");
    for system in systems {
        let runs = &results[&system.label()];
        let m = |f: fn(&Figures) -> f64| median(runs.iter().map(f).collect());
        println!(
            "| {} | {:.0} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} |",
            system.label(),
            m(|f| f.throughput),
            m(|f| f.deliver_p50),
            m(|f| f.deliver_p99),
            m(|f| f.ack_p50),
            m(|f| f.replay)
        );
    }
    Ok(())
}
