//! The Redis Cluster chunk store (`canopy-redis`) side by side with `MemoryStore` and
//! `FjallStore`: insert throughput and per-batch latency, and the replay rate of a large range
//! and of one bucket (groundwork figures for issue 16, the scaled origin).
//!
//! The cluster is real: `redis-server` processes on 127.0.0.1 started by
//! `canopy_redis::testing::RedisCluster` (3 primaries, `--replicas` replicas each) and stopped
//! when the bench ends. The three stores take turns, round by round (`--rounds`), each round on
//! fresh names and a fresh store (the cluster is flushed, fjall reopened in a new directory),
//! so the machine's drift cannot bias the ratios; the report gives medians over the rounds and
//! the medians of the per-round ratios.
//!
//! ```text
//! cargo build --release -p canopy-benches --bin redis-store
//! target/release/redis-store [--chunks 20000] [--batch 64] [--rounds 3] [--replicas 0] [--smoke]
//! ```
//!
//! Per round and store:
//! 1. **insert**: `--chunks` chunks of `--payload` bytes at random names, in batches of
//!    `--batch`: chunks/s over the whole phase, and each batch's latency. Memory inserts each
//!    chunk; fjall inserts each chunk and `sync`s (fsync) once per batch, as the relay does
//!    before it acks; Redis sends one `insert_batch` (its `Ok` means the primaries applied it
//!    in memory, plus `WAIT` with `--replicas`). A remote store's per-chunk latency is the
//!    latency of the batch the chunk travels in.
//! 2. **replay, `ALL`**: every chunk read back with `Filter::ALL` in pages of 1,000 (the next
//!    page starts after the last name of the previous one); the count is checked.
//! 3. **replay, one bucket**: `--bucket-scans` scans of random 12-bit filters (one Redis bucket
//!    each, about `chunks / 4096` chunks in it), one after the other: chunks/s and the latency
//!    of one scan.

use std::ops::ControlFlow;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail, ensure};
use canopy::{Chunk, FjallStore, Filter, InsertOutcome, MemoryStore, Name, Store};
use canopy_redis::testing::RedisCluster;
use canopy_redis::{RedisStore, RedisStoreConfig};
use clap::Parser;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[derive(Parser)]
#[command(about = "Redis Cluster chunk store vs memory and fjall: insert throughput/latency, replay rate.")]
struct Cli {
    /// Chunks inserted per store and round.
    #[arg(long, default_value_t = 20_000)]
    chunks: usize,
    /// Chunks per insert batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Payload bytes per chunk.
    #[arg(long, default_value_t = 1024)]
    payload: usize,
    /// Alternating rounds (each store once per round).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Replicas per Redis primary (3 primaries).
    #[arg(long, default_value_t = 0)]
    replicas: usize,
    /// Replicas each Redis batch must reach (`WAIT`); defaults to `min(--replicas, 1)`.
    #[arg(long)]
    min_replicas: Option<u8>,
    /// Scans of one 12-bit filter (one Redis bucket) per store and round.
    #[arg(long, default_value_t = 256)]
    bucket_scans: usize,
    /// Seed of the names and payloads.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Tiny sizes, one round: checks the bench runs, figures mean nothing.
    #[arg(long)]
    smoke: bool,
}

/// Page size of the large-range replay.
const PAGE: usize = 1_000;
/// Prefix length of the one-bucket replay (the Redis store's default bucket width).
const BUCKET_BITS: u8 = 12;
/// Names live an hour: nothing expires during the bench.
const TTL_MS: u64 = 3_600_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Memory,
    Fjall,
    Redis,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Memory, Kind::Fjall, Kind::Redis];
    fn label(self) -> &'static str {
        match self {
            Kind::Memory => "memory",
            Kind::Fjall => "fjall",
            Kind::Redis => "redis",
        }
    }
}

/// A table row: figure, its value in a round, scale for the shown value, decimals.
type Row = (&'static str, fn(&Figures) -> f64, f64, usize);

/// One store's figures in one round.
#[derive(Clone, Copy, Default)]
struct Figures {
    insert_per_s: f64,
    batch_p50_ms: f64,
    batch_p99_ms: f64,
    all_per_s: f64,
    bucket_per_s: f64,
    bucket_scan_p50_ms: f64,
}

/// The stores under test, behind one face.
enum Under<'a> {
    Sync(Box<dyn Store>),
    Redis(&'a tokio::runtime::Runtime, RedisStore),
}

impl Under<'_> {
    fn insert_batch(&mut self, batch: &[Chunk]) -> anyhow::Result<()> {
        let outcomes = match self {
            Under::Sync(store) => {
                let outcomes = batch.iter().map(|c| store.insert(c)).collect::<Result<Vec<_>, _>>()?;
                store.sync()?;
                outcomes
            }
            Under::Redis(rt, store) => rt.block_on(store.insert_batch(batch))?,
        };
        ensure!(outcomes.iter().all(|o| *o == InsertOutcome::Inserted), "an insert was not Inserted: {outcomes:?}");
        Ok(())
    }

    /// Up to `limit` chunks under `filter` after `after`, in name order.
    fn page(&self, filter: Filter, after: Option<Name>, limit: usize, now_ms: u64) -> anyhow::Result<Vec<Chunk>> {
        match self {
            Under::Sync(store) => {
                let (first, last) = filter.range();
                let first = match after {
                    Some(a) if a >= last => return Ok(Vec::new()),
                    Some(a) if a >= first => Name::new(a.to_u128() + 1),
                    _ => first,
                };
                let mut out = Vec::with_capacity(limit.min(PAGE));
                store.scan_range(first, last, now_ms, &mut |c| {
                    out.push(c);
                    if out.len() >= limit { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
                })?;
                Ok(out)
            }
            Under::Redis(rt, store) => Ok(rt.block_on(store.scan(filter, after, limit, now_ms))?),
        }
    }

    /// Every chunk under `filter`, in pages of [`PAGE`]; returns how many.
    fn replay(&self, filter: Filter, now_ms: u64) -> anyhow::Result<usize> {
        let (mut after, mut count) = (None, 0);
        loop {
            let page = self.page(filter, after, PAGE, now_ms)?;
            count += page.len();
            match page.last() {
                Some(last) if page.len() == PAGE => after = Some(last.name()),
                _ => return Ok(count),
            }
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_millis() as u64
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs the three phases on one fresh store.
fn measure(store: &mut Under, chunks: &[Chunk], batch: usize, bucket_filters: &[Filter]) -> anyhow::Result<Figures> {
    let mut lat = Vec::with_capacity(chunks.len().div_ceil(batch));
    let began = Instant::now();
    for b in chunks.chunks(batch) {
        let t = Instant::now();
        store.insert_batch(b)?;
        lat.push(t.elapsed());
    }
    let insert = began.elapsed();
    lat.sort();

    let now = now_ms();
    let began = Instant::now();
    let all = store.replay(Filter::ALL, now)?;
    let all_time = began.elapsed();
    ensure!(all == chunks.len(), "replay of ALL returned {all} chunks, {} stored", chunks.len());

    let expected: usize = bucket_filters.iter().map(|f| chunks.iter().filter(|c| f.matches(c.name())).count()).sum();
    let mut scan_lat = Vec::with_capacity(bucket_filters.len());
    let mut found = 0;
    let began = Instant::now();
    for f in bucket_filters {
        let t = Instant::now();
        found += store.replay(*f, now)?;
        scan_lat.push(t.elapsed());
    }
    let bucket_time = began.elapsed();
    ensure!(found == expected, "one-bucket replays returned {found} chunks, {expected} expected");
    scan_lat.sort();

    Ok(Figures {
        insert_per_s: chunks.len() as f64 / insert.as_secs_f64(),
        batch_p50_ms: ms(pct(&lat, 0.5)),
        batch_p99_ms: ms(pct(&lat, 0.99)),
        all_per_s: all as f64 / all_time.as_secs_f64(),
        bucket_per_s: found as f64 / bucket_time.as_secs_f64(),
        bucket_scan_p50_ms: ms(pct(&scan_lat, 0.5)),
    })
}

/// Empties the cluster between rounds (`FLUSHALL` on every primary; replicas follow).
fn flush(cluster: &RedisCluster) -> anyhow::Result<()> {
    for node in cluster.primaries().map_err(|e| anyhow::anyhow!("{e}"))? {
        let port = cluster.ports()[node].to_string();
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port, "FLUSHALL", "SYNC"])
            .output()
            .context("running redis-cli")?;
        let reply = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || reply.trim() != "OK" {
            bail!("FLUSHALL on port {port}: {reply} {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    if cli.smoke {
        (cli.chunks, cli.batch, cli.rounds, cli.bucket_scans) = (500, 16, 1, 16);
    }
    ensure!(cli.chunks > 0 && cli.batch > 0 && cli.rounds > 0 && cli.bucket_scans > 0, "sizes must be positive");
    let min_replicas = cli.min_replicas.unwrap_or(cli.replicas.min(1) as u8);
    let command_line = std::env::args().collect::<Vec<_>>().join(" ");

    eprintln!("starting a Redis Cluster: 3 primaries, {} replica(s) each…", cli.replicas);
    let cluster = RedisCluster::start(3, cli.replicas).map_err(|e| anyhow::anyhow!("{e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let config = RedisStoreConfig { min_replicas, ..RedisStoreConfig::new(cluster.urls()) };
    let redis = rt.block_on(RedisStore::connect(config))?;

    let mut rng = SmallRng::seed_from_u64(cli.seed);
    let mut rounds: Vec<[Figures; 3]> = Vec::with_capacity(cli.rounds);
    for round in 0..cli.rounds {
        // Fresh names each round; every store of the round gets the same ones.
        let expiry = now_ms() + TTL_MS;
        let chunks: Vec<Chunk> = (0..cli.chunks)
            .map(|_| {
                let mut data = vec![0u8; cli.payload];
                rng.fill(&mut data[..]);
                Chunk::new(Name::new(rng.random()), expiry, data).expect("payload within MAX_CHUNK_DATA")
            })
            .collect();
        let bucket_filters: Vec<Filter> = (0..cli.bucket_scans)
            .map(|i| Filter::new(chunks[i % chunks.len()].name(), BUCKET_BITS).expect("12 ≤ 128"))
            .collect();
        let mut figures = [Figures::default(); 3];
        // Rotate the order so no store always runs first.
        for k in 0..3 {
            let kind = Kind::ALL[(round + k) % 3];
            let dir = tempfile::tempdir()?;
            let mut store = match kind {
                Kind::Memory => Under::Sync(Box::new(MemoryStore::new(canopy::store::UNLIMITED))),
                Kind::Fjall => Under::Sync(Box::new(FjallStore::open(dir.path(), canopy::store::UNLIMITED)?)),
                Kind::Redis => {
                    flush(&cluster)?;
                    Under::Redis(&rt, redis.clone())
                }
            };
            let f = measure(&mut store, &chunks, cli.batch, &bucket_filters)
                .with_context(|| format!("round {}, {}", round + 1, kind.label()))?;
            eprintln!(
                "round {}/{} {:>6}: insert {:>9.0} chunks/s (batch p50 {:.2} ms, p99 {:.2} ms), replay ALL {:>9.0} chunks/s, one bucket {:>9.0} chunks/s ({:.3} ms/scan)",
                round + 1,
                cli.rounds,
                kind.label(),
                f.insert_per_s,
                f.batch_p50_ms,
                f.batch_p99_ms,
                f.all_per_s,
                f.bucket_per_s,
                f.bucket_scan_p50_ms
            );
            figures[kind as usize] = f;
            drop(store);
        }
        rounds.push(figures);
    }
    flush(&cluster)?;

    let per_chunk_us = 1e3 / cli.batch as f64;
    let rows: [Row; 7] = [
        ("insert, chunks/s", |f| f.insert_per_s, 1.0, 0),
        ("insert batch latency p50, ms", |f| f.batch_p50_ms, 1.0, 3),
        ("insert batch latency p99, ms", |f| f.batch_p99_ms, 1.0, 3),
        ("insert latency per chunk (p50 batch ÷ batch size), µs", |f| f.batch_p50_ms, per_chunk_us, 2),
        ("replay `ALL`, pages of 1,000, chunks/s", |f| f.all_per_s, 1.0, 0),
        ("replay one 12-bit bucket, chunks/s", |f| f.bucket_per_s, 1.0, 0),
        ("replay one 12-bit bucket, ms per scan (p50)", |f| f.bucket_scan_p50_ms, 1.0, 3),
    ];
    println!();
    println!("`{command_line}`");
    println!();
    println!(
        "{} chunks of {} B, batches of {}, {} alternating round(s), Redis Cluster 3 primaries × {} replica(s), min_replicas {}; medians over rounds, ratios are medians of per-round ratios",
        cli.chunks, cli.payload, cli.batch, cli.rounds, cli.replicas, min_replicas
    );
    println!();
    println!("| figure | memory | fjall | redis | redis ÷ memory | redis ÷ fjall |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (label, get, scale, decimals) in rows {
        let med = |k: Kind| median(rounds.iter().map(|r| get(&r[k as usize]) * scale).collect());
        let ratio = |k: Kind| median(rounds.iter().map(|r| get(&r[Kind::Redis as usize]) / get(&r[k as usize])).collect());
        println!(
            "| {label} | {:.decimals$} | {:.decimals$} | {:.decimals$} | {:.3}× | {:.3}× |",
            med(Kind::Memory),
            med(Kind::Fjall),
            med(Kind::Redis),
            ratio(Kind::Memory),
            ratio(Kind::Fjall)
        );
    }
    Ok(())
}
