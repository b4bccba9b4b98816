//! The committer as an admin runs it: the `member` Wasm plugin adding one device to a team,
//! one `canopy plugin run` per add (what `canopy-msg admin team add` does), against a real
//! relay on 127.0.0.1. The team grows one device per add up to the largest size asked for;
//! the adds at each checkpoint size are timed.
//!
//! ```sh
//! cargo build --release -p canopy-benches --bin member-add && bash scripts/build-plugins.sh --release
//! cargo run --release -p canopy-benches --bin member-add -- --teams 10,100,1000
//! ```
//!
//! Each timed add is the whole tool run: the plugin instantiated from its compile cache, its
//! sealed state read and decrypted, the key package fetched from the relay and verified, the
//! add committed, the state sealed and written back, commit and welcome published and
//! acknowledged. `msg-bench add` times the same add natively, without the plugin around it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use canopy_msg_core::engine::hex;
use canopy_msg_core::{Device, Key, MemoryBackend, Org};
use canopy_relay::{Relay, RelayConfig, StoreKind};
use canopy_sdk::tool::{self, ToolOptions};
use canopy_sdk::{Chunk, Client, ConnectOptions, Trust};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Time for the member plugin (Wasm) to add one device to teams of the given sizes.")]
struct Cli {
    /// Team sizes (devices before the add, the committer included) at which adds are timed.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    teams: Vec<usize>,
    /// Timed adds at each size (the team grows by one with each).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// The member plugin [default: `<target>/wasm32-wasip2/plugin/member.wasm`].
    #[arg(long)]
    plugin: Option<PathBuf>,
    /// Adds into teams of at least this size compile the plugin afresh instead of taking it
    /// from the compile cache, so that `perf` (with `CANOPY_WASM_PROFILE=perfmap`) can name
    /// the plugin's functions: a cached module is mapped from its file, which perf cannot
    /// symbolize. Their timings then include the compile (about a second).
    #[arg(long)]
    compile_from: Option<usize>,
}

fn plugin_path(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(p) => p,
        None => std::env::current_exe()?.parent().context("target directory")?.join("../wasm32-wasip2/plugin/member.wasm"),
    };
    if !path.is_file() {
        bail!("{} not found: run `bash scripts/build-plugins.sh --release` first, or pass --plugin", path.display());
    }
    Ok(path)
}

fn org() -> Org {
    Org::new("example.com", 7).expect("valid org")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // RUST_LOG=canopy_sdk::tool=debug shows where each tool run's time goes.
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_writer(std::io::stderr).init();
    let wasm = plugin_path(cli.plugin)?;
    let largest = cli.teams.iter().max().copied().context("--teams is empty")? + cli.rounds;
    let tmp = tempfile::tempdir()?;
    let config = RelayConfig {
        listen: "127.0.0.1:0".parse()?,
        data: tmp.path().join("relay"),
        store: StoreKind::Memory,
        ..RelayConfig::default()
    };
    let relay = Relay::spawn(config).await?;
    let mut opts = ConnectOptions::new(relay.local_addr(), Trust::CaPem(relay.cert_pem().to_string()));
    opts.subscription_buffer = 1 << 16;
    let client = Client::connect(opts).await?;
    let key = hex(&Key::random().to_bytes());
    let state = tmp.path().join("member-state");
    let cache = tmp.path().join("plugin-cache");
    let run = |args: Vec<String>, cached: bool| {
        let mut options = ToolOptions::new(&wasm, args);
        options.config = canopy_msg_core::committer::config::base("example.com", 7, &key);
        options.state = Some(state.clone());
        options.cache_dir = cached.then(|| cache.clone());
        options.timeout = Duration::from_secs(600);
        options
    };
    let admin = |args: &[&str], cached: bool| {
        let options = run(args.iter().map(|s| s.to_string()).collect(), cached);
        let client = &client;
        async move {
            let outcome = tool::run(client, options, |_| {}).await?;
            if outcome.refused > 0 {
                bail!("the relay refused {} publishes", outcome.refused);
            }
            outcome.answer.map_err(|e| anyhow::anyhow!("member: {e}"))
        }
    };

    let t = Instant::now();
    admin(&["org", "init"], true).await?;
    println!("org init (first run compiles the plugin): {:.1} s", t.elapsed().as_secs_f64());
    admin(&["team", "create", "bench"], true).await?;

    let progress = indicatif::ProgressBar::new(largest as u64 - 1);
    progress.set_style(indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} adds, {elapsed} (eta {eta})")?);
    progress.set_message("growing the team");
    let mut timed: Vec<(usize, Vec<Duration>)> = cli.teams.iter().map(|&n| (n, Vec::new())).collect();
    // The team holds the committer alone; each add brings one more device.
    for size in 1..largest {
        let mut device = Device::open(Key::random(), MemoryBackend::default(), org())?;
        let (hkp, out) = device.key_package(canopy_sdk::now_ms(), 3_600_000, false)?;
        for o in out {
            client.publish(Chunk::new(o.name, o.expiry_ms, o.data)?).await?;
        }
        let t = Instant::now();
        let cached = cli.compile_from.is_none_or(|from| size < from);
        let id = admin(&["team", "add", "bench", &hex(&hkp)], cached).await?;
        let took = t.elapsed();
        if id != size.to_string() {
            bail!("the add into a team of {size} gave device id {id}");
        }
        for (n, times) in &mut timed {
            if size >= *n && size < *n + cli.rounds {
                times.push(took);
            }
        }
        progress.inc(1);
    }
    progress.finish_and_clear();

    println!("| team size before the add | add, median of {} | min | max |", cli.rounds);
    println!("|---:|---:|---:|---:|");
    for (n, mut times) in timed {
        times.sort();
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
        println!("| {n} | {} | {} | {} |", ms(times[times.len() / 2]), ms(times[0]), ms(times[times.len() - 1]));
    }
    client.close();
    relay.shutdown().await;
    Ok(())
}
