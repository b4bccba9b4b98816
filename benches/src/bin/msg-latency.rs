//! The messenger end to end: send → displayed on another device, through one relay and all
//! three processes of each device (UI protocol → Secure → MLS → Network → relay → Network →
//! Secure → MLS → UI), with real `canopy-msg` processes.
//!
//! ```sh
//! cargo build --release -p canopy-messenger -p canopy-relay && bash scripts/build-plugins.sh --release
//! cargo run --release -p canopy-benches --bin msg-latency
//! ```
//!
//! Latency is paced (one message every `--interval-ms`), so queueing does not inflate it;
//! throughput is a burst of `--burst` messages, timed until the last is shown on the receiver.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use canopy_msg_secure::proto::{self, Reply, Request};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Messenger send → displayed latency and throughput, through real processes.")]
struct Cli {
    /// Paced messages for the latency figures.
    #[arg(long, default_value_t = 500)]
    messages: usize,
    /// Pause between paced messages, ms.
    #[arg(long, default_value_t = 10)]
    interval_ms: u64,
    /// Messages in the throughput burst.
    #[arg(long, default_value_t = 2000)]
    burst: usize,
    /// The relay's store: `fjall` (durable, as deployed) or `memory`, to show what the relay's
    /// disk writes add to the path.
    #[arg(long, default_value = "fjall")]
    relay_store: String,
    /// Where the messages go: a team `channel`, a `dm` between the two devices' users, or a
    /// `group` of the two.
    #[arg(long, value_enum, default_value_t = Conversation::Channel)]
    conversation: Conversation,
}

/// The kinds of conversation the bench can run in.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Conversation {
    /// A team channel.
    Channel,
    /// A direct message.
    Dm,
    /// A group.
    Group,
}

use canopy_benches::cli::{Down, msg};

fn call(s: &mut UnixStream, r: &Request) -> anyhow::Result<Reply> {
    proto::write_frame(s, r)?;
    proto::read_frame(s)?.context("Secure hung up")
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let store = match cli.relay_store.as_str() {
        "fjall" => canopy_relay::StoreKind::Fjall,
        "memory" => canopy_relay::StoreKind::Memory,
        other => bail!("--relay-store {other}: fjall or memory"),
    };
    let config = canopy_relay::RelayConfig { listen: "127.0.0.1:0".parse()?, data: root.join("relay"), store, ..canopy_relay::RelayConfig::default() };
    let relay = canopy_relay::Relay::spawn(config).await?;
    let ca = root.join("relay.pem");
    std::fs::write(&ca, relay.cert_pem())?;
    let addr = relay.local_addr().to_string();
    let init = |home: &Path| msg(home, &["init", "--relay", &addr, "--ca", ca.to_str().unwrap(), "--domain", "example.com", "--org", "7"]);
    let (admin, a, b) = (root.join("admin"), root.join("a"), root.join("b"));
    // Stops both devices' processes however the run ends (an error or a panic included),
    // so none outlives the bench.
    let _down = Down(vec![a.clone(), b.clone()]);
    let result = tokio::task::block_in_place(|| -> anyhow::Result<()> {
        init(&admin)?;
        msg(&admin, &["admin", "org", "init"])?;
        msg(&admin, &["admin", "team", "create", "bench"])?;
        msg(&admin, &["admin", "channel", "create", "bench", "general"])?;
        for home in [&a, &b] {
            init(home)?;
            msg(home, &["up"])?;
            let hkp = msg(home, &["device", "key-package"])?;
            // The whole `admin team add` as a user runs it: process start, the member
            // plugin (Wasm) loaded from its compile cache, its sealed state opened, the key
            // package fetched and verified, the add committed, commit and welcome published.
            let t = Instant::now();
            let id = msg(&admin, &["admin", "team", "add", "bench", &hkp])?;
            println!("admin team add (CLI, member plugin in Wasm, team of {} before): {:.0} ms", id.parse::<u32>()?, t.elapsed().as_secs_f64() * 1e3);
        }
        // Both devices at the admin's epoch.
        let deadline = Instant::now() + Duration::from_secs(60);
        while msg(&a, &["teams"])?.split_whitespace().nth(2) != msg(&b, &["teams"])?.split_whitespace().nth(2) || msg(&a, &["teams"])?.is_empty() {
            if Instant::now() > deadline {
                bail!("the devices never reached the same epoch");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Where a sends and what b follows.
        let (to, follow) = match cli.conversation {
            Conversation::Channel => ("bench/general".to_string(), "bench/general".to_string()),
            Conversation::Dm | Conversation::Group => {
                let (ida, idb) = (msg(&a, &["whoami"])?, msg(&b, &["whoami"])?);
                msg(&a, &["contact", "add", &idb, "bob"])?;
                let deadline = Instant::now() + Duration::from_secs(60);
                while !msg(&a, &["contacts", "--json"])?.contains("\"devices\":1") {
                    if Instant::now() > deadline {
                        bail!("b's key package never reached a");
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                if cli.conversation == Conversation::Dm {
                    msg(&a, &["dm", "bob", "hello"])?;
                    (format!("dm:{idb}"), format!("dm:{ida}"))
                } else {
                    let g = msg(&a, &["group", "create", "bench-group", "bob"])?;
                    (format!("group:{g}"), format!("group:{g}"))
                }
            }
        };
        if cli.conversation != Conversation::Channel {
            let deadline = Instant::now() + Duration::from_secs(60);
            // b is in once it reads the group, or a's first direct message.
            while !msg(&b, &["read", &follow]).is_ok_and(|r| cli.conversation == Conversation::Group || r.contains("hello")) {
                if Instant::now() > deadline {
                    bail!("b never joined {follow}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        println!("conversation: {to}");
        let mut sender = UnixStream::connect(a.join("secure.sock"))?;
        let mut follower = UnixStream::connect(b.join("secure.sock"))?;
        match call(&mut follower, &Request::Follow { conversation: follow.clone() })? {
            Reply::Pong => {}
            other => bail!("follow: {other:?}"),
        }
        let send = |s: &mut UnixStream, text: String| -> anyhow::Result<String> {
            match call(s, &Request::Send { to: to.clone(), text, reply_to: None })? {
                Reply::Sent { id, .. } => Ok(id),
                other => bail!("send: {other:?}"),
            }
        };
        let shown = |f: &mut UnixStream| -> anyhow::Result<String> {
            match proto::read_frame::<Reply>(f)?.context("Secure hung up")? {
                Reply::Message(m) => Ok(m.id),
                other => bail!("follow: {other:?}"),
            }
        };
        // Warm-up.
        for i in 0..20 {
            let id = send(&mut sender, format!("warm-up {i}"))?;
            while shown(&mut follower)? != id {}
        }
        let mut lat = Vec::with_capacity(cli.messages);
        // Until Secure's `Sent` reply: encrypted, sealed, durable, handed to Network.
        let mut sent_lat = Vec::with_capacity(cli.messages);
        for i in 0..cli.messages {
            let t = Instant::now();
            let id = send(&mut sender, format!("message {i} of the latency run"))?;
            sent_lat.push(t.elapsed());
            while shown(&mut follower)? != id {}
            lat.push(t.elapsed());
            std::thread::sleep(Duration::from_millis(cli.interval_ms));
        }
        lat.sort();
        sent_lat.sort();
        println!(
            "of which the sender's Secure (request → Sent reply): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms",
            pct(&sent_lat, 0.5).as_secs_f64() * 1e3,
            pct(&sent_lat, 0.9).as_secs_f64() * 1e3,
            pct(&sent_lat, 0.99).as_secs_f64() * 1e3,
        );
        println!(
            "send → displayed, {} paced messages: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            lat.len(),
            pct(&lat, 0.5).as_secs_f64() * 1e3,
            pct(&lat, 0.9).as_secs_f64() * 1e3,
            pct(&lat, 0.99).as_secs_f64() * 1e3,
            lat[lat.len() - 1].as_secs_f64() * 1e3
        );
        let t = Instant::now();
        let mut last = String::new();
        for i in 0..cli.burst {
            last = send(&mut sender, format!("burst {i}"))?;
        }
        let sent = t.elapsed();
        while shown(&mut follower)? != last {}
        let all = t.elapsed();
        println!(
            "burst of {}: sent in {:.2} s ({:.0}/s), all displayed after {:.2} s ({:.0} messages/s end to end)",
            cli.burst,
            sent.as_secs_f64(),
            cli.burst as f64 / sent.as_secs_f64(),
            all.as_secs_f64(),
            cli.burst as f64 / all.as_secs_f64()
        );
        Ok(())
    });
    relay.shutdown().await;
    result
}
