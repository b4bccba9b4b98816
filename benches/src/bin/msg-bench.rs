//! The messenger's MLS figures, in process: object sizes by team size, and how long the
//! committer takes to add one device to teams of growing size.
//!
//! ```sh
//! cargo run --release -p canopy-benches --bin msg-bench -- sizes
//! cargo run --release -p canopy-benches --bin msg-bench -- add --teams 10,100,1000
//! ```
//!
//! The end-to-end latency through a relay and all three processes is measured by
//! `msg-latency`.

use std::time::Instant;

use canopy_msg_core::fragment::{Assembly, Fragment};
use canopy_msg_core::names::Path;
use canopy_msg_core::payload::Lifetimes;
use canopy_msg_core::{Committer, Device, Key, MemoryBackend, Message, Org, Outgoing};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "The messenger's MLS sizes and committer times.")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Byte sizes of a key package, welcome, commit and application message.
    Sizes {
        /// Team sizes (devices, the committer included).
        #[arg(long, value_delimiter = ',', default_value = "2,10,100")]
        teams: Vec<usize>,
    },
    /// Time for the committer to add one device to a team.
    Add {
        /// Team sizes before the add.
        #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
        teams: Vec<usize>,
        /// Adds measured per size (each to a team one larger than the last).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
}

const NOW: u64 = 1_800_000_000_000;

fn org() -> Org {
    Org::new("example.com", 7).unwrap()
}

fn bytes_of(out: &[Outgoing]) -> usize {
    let mut asm = Assembly::new();
    let kind = match org().parse(out[0].name) {
        Some(canopy_msg_core::names::Parsed::Message { .. }) => Path::Message,
        Some(canopy_msg_core::names::Parsed::KeyPackage { .. }) => Path::KeyPackage,
        Some(canopy_msg_core::names::Parsed::Welcome { .. }) => Path::Welcome,
        _ => Path::Commit,
    };
    for o in out {
        asm.add(Fragment::decode(kind, &o.data).unwrap()).unwrap();
    }
    asm.finish().unwrap().unwrap().len()
}

fn new_device() -> (Device<MemoryBackend>, Vec<u8>, Vec<u8>, Vec<Outgoing>) {
    let mut d = Device::open(Key::random(), MemoryBackend::default(), org()).unwrap();
    let (hkp, out) = d.key_package(NOW, 60_000, false).unwrap();
    let mut asm = Assembly::new();
    for o in &out {
        asm.add(Fragment::decode(Path::KeyPackage, &o.data).unwrap()).unwrap();
    }
    (d, asm.finish().unwrap().unwrap(), hkp, out)
}

/// A committer with team 2 holding `size` devices (itself included), built in batches.
fn team_of(size: usize) -> Committer<MemoryBackend> {
    let mut admin = Committer::open(Key::random(), MemoryBackend::default(), org()).unwrap();
    admin.org_init().unwrap();
    admin.create_team("bench", Lifetimes::default()).unwrap();
    let mut have = 1;
    while have < size {
        let n = (size - have).min(100);
        let kps: Vec<(Vec<u8>, Vec<u8>)> = (0..n).map(|_| new_device()).map(|(_, kp, hkp, _)| (kp, hkp)).collect();
        let refs: Vec<(&[u8], &[u8])> = kps.iter().map(|(k, h)| (k.as_slice(), h.as_slice())).collect();
        admin.add_devices(2, &refs, NOW).unwrap();
        have += n;
    }
    admin
}

fn sizes(teams: &[usize]) {
    println!("| team size | key package | welcome | commit (add) | application message (100-byte text) |");
    println!("|---:|---:|---:|---:|---:|");
    for &size in teams {
        let mut admin = team_of(size - 1);
        let (mut dev, kp, hkp, kp_out) = new_device();
        let added = admin.add_device(2, &kp, &hkp, NOW).unwrap();
        let commit: Vec<Outgoing> = added.outgoing.iter().filter(|o| matches!(org().parse(o.name), Some(canopy_msg_core::names::Parsed::Commit { .. }))).cloned().collect();
        let welcome: Vec<Outgoing> = added.outgoing.iter().filter(|o| matches!(org().parse(o.name), Some(canopy_msg_core::names::Parsed::Welcome { .. }))).cloned().collect();
        dev.ingest(added.outgoing.iter().map(|o| (o.name, o.data.as_slice()))).unwrap();
        let (_, msg) = dev.send(2, 1, Message::text(NOW, "x".repeat(100)), NOW).unwrap();
        println!(
            "| {size} | {} B | {} B ({} chunks) | {} B ({} chunks) | {} B |",
            bytes_of(&kp_out),
            bytes_of(&welcome),
            welcome.len(),
            bytes_of(&commit),
            commit.len(),
            bytes_of(&msg)
        );
    }
}

fn add(teams: &[usize], rounds: usize) {
    println!("| team size | add (median of {rounds}) | min | max |");
    println!("|---:|---:|---:|---:|");
    for &size in teams {
        let mut admin = team_of(size);
        let mut times = Vec::new();
        for _ in 0..rounds {
            let (_, kp, hkp, _) = new_device();
            let t = Instant::now();
            admin.add_device(2, &kp, &hkp, NOW).unwrap();
            times.push(t.elapsed());
        }
        times.sort();
        let ms = |d: std::time::Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
        println!("| {size} | {} | {} | {} |", ms(times[times.len() / 2]), ms(times[0]), ms(times[times.len() - 1]));
    }
}

fn main() {
    match Cli::parse().command {
        Cmd::Sizes { teams } => sizes(&teams),
        Cmd::Add { teams, rounds } => add(&teams, rounds),
    }
}
