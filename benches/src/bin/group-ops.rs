//! Group add and remove at a given size, natively and in one process: what the group's
//! committer spends to commit the change, and what a member spends to apply it.
//!
//! ```sh
//! cargo run --release -p canopy-benches --bin group-ops -- --members 100 --rounds 5
//! ```
//!
//! Each user has one device that published its last-resort key package; the creator knows
//! them all. A group of `--members` users is created, then `--rounds` times one user is
//! added and one removed. Chunks go from the committer to one member directly (no relay), so
//! the figures are the MLS and sealing work of each side, in memory.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use canopy_msg_core::payload::Control;
use canopy_msg_core::{Device, Key, MemoryBackend, Org, Outgoing};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Time for a group's committer to add or remove a member, and for a member to apply it.")]
struct Cli {
    /// Users in the group, its admin included.
    #[arg(long, default_value_t = 100)]
    members: usize,
    /// Adds and removes timed.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

const NOW: u64 = 1_800_000_000_000;
const TTL: u64 = 30 * 24 * 3600 * 1000;

fn user(org: u32) -> anyhow::Result<(Device<MemoryBackend>, Vec<Outgoing>)> {
    let mut d = Device::open(Key::random(), MemoryBackend::default(), Org::new("example.com", org)?)?;
    let out = d.ensure_key_package(NOW, TTL)?;
    Ok((d, out))
}

fn feed(d: &mut Device<MemoryBackend>, out: &[Outgoing]) -> anyhow::Result<()> {
    d.ingest(out.iter().map(|o| (o.name, o.data.as_slice())))?;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (mut admin, _) = user(1)?;
    let mut member = None;
    let mut users = BTreeSet::new();
    let mut extra = Vec::new();
    for i in 0..cli.members - 1 + cli.rounds {
        let (d, kp) = user(2 + i as u32)?;
        feed(&mut admin, &kp)?;
        if i < cli.members - 1 {
            users.insert(d.user_id());
            if member.is_none() {
                member = Some(d);
            }
        } else {
            extra.push(d.user_id());
        }
    }
    let mut member = member.context("at least two members")?;
    let t = Instant::now();
    let (conv, out) = admin.create_group("bench", &users, NOW)?;
    println!("create a group of {} users: {:.1} ms at the committer", cli.members, ms(t.elapsed()));
    let t = Instant::now();
    feed(&mut member, &out)?;
    println!("  a member joins from its welcome: {:.1} ms", ms(t.elapsed()));
    let (mut add_c, mut add_m, mut rm_c, mut rm_m) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for u in extra {
        let t = Instant::now();
        let out = admin.group_op(conv, &Control::Add { users: vec![u], note: String::new() }, NOW)?;
        add_c.push(t.elapsed());
        let t = Instant::now();
        feed(&mut member, &out)?;
        add_m.push(t.elapsed());
        let t = Instant::now();
        let out = admin.group_op(conv, &Control::Remove { users: vec![u], note: String::new() }, NOW)?;
        rm_c.push(t.elapsed());
        let t = Instant::now();
        feed(&mut member, &out)?;
        rm_m.push(t.elapsed());
    }
    let epoch = member.group_state(conv).context("the member is in")?.0;
    anyhow::ensure!(epoch == admin.group_state(conv).context("the admin is in")?.0, "the member kept up with every commit");
    println!(
        "group of {} users, median of {}: add one user {:.1} ms (committer) + {:.1} ms (member); remove one user {:.1} ms + {:.1} ms",
        cli.members,
        cli.rounds,
        ms(median(add_c)),
        ms(median(add_m)),
        ms(median(rm_c)),
        ms(median(rm_m))
    );
    Ok(())
}
