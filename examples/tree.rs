//! The README's demo: a relay tree on loopback — origin ← cloud ← local — with a client on
//! each relay, showing chunks cross the tree in both directions; then the messenger on the
//! same tree (real `canopy-msg` processes), and what the relays' caches hold; then exiting.
//!
//! `bash scripts/demo.sh` (which builds `canopy-msg` and the member plugin, then runs
//! `cargo run --release -p canopy-examples --example tree`)
//!
//! The relays run in this process over real QUIC with TLS 1.3 on 127.0.0.1, each with its
//! own fjall store in a temporary directory.

#[path = "tree_messenger.rs"]
mod messenger;

use std::time::Duration;

use canopy_relay::{Relay, RelayConfig, RelayHandle};
use canopy_sdk::{Chunk, Client, ConnectOptions, ReplayMode, Schema, SubEvent, Subscription, Trust, now_ms};

const WAIT: Duration = Duration::from_secs(10);

async fn relay(name: &str, dir: &tempfile::TempDir, parent: Option<&RelayHandle>) -> anyhow::Result<RelayHandle> {
    let config = RelayConfig {
        listen: "127.0.0.1:0".parse()?,
        data: dir.path().join(name),
        parent: parent.map(|p| p.local_addr().to_string()),
        parent_ca: parent.map(|p| p.cert_path().to_owned()),
        ..RelayConfig::default()
    };
    let relay = Relay::spawn(config).await?;
    let up = parent.map_or("(root)".to_owned(), |p| format!("child of {}", p.local_addr()));
    println!("  {name:<7} relay on {}  {up}", relay.local_addr());
    Ok(relay)
}

async fn client(relay: &RelayHandle) -> anyhow::Result<Client> {
    let trust = Trust::CaPem(relay.cert_pem().to_owned());
    Ok(Client::connect(ConnectOptions::new(relay.local_addr(), trust)).await?)
}

/// Waits for the next chunk on `sub` (skipping the replay marker) and prints it.
async fn expect(who: &str, sub: &mut Subscription, schema: &Schema) -> anyhow::Result<()> {
    loop {
        match tokio::time::timeout(WAIT, sub.next()).await? {
            Some(SubEvent::Chunk(c)) => {
                let text = String::from_utf8_lossy(c.data());
                println!("  {who:<6} received {:?}  [{}]", text, schema.render(c.name()));
                return Ok(());
            }
            Some(SubEvent::ReplayDone | SubEvent::Gap) => continue,
            Some(SubEvent::Error { code, message }) => anyhow::bail!("{who}: {code}: {message}"),
            None => anyhow::bail!("{who}: subscription ended"),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    println!("== A relay tree on loopback ==");
    let origin = relay("origin", &dir, None).await?;
    let cloud = relay("cloud", &dir, Some(&origin)).await?;
    let local = relay("local", &dir, Some(&cloud)).await?;

    let schema = Schema::messenger();
    let site = schema.hash_text("origin", "example.com")?;
    let channel = schema.filter(&[site, 1, 1, 7, 5, 3])?;
    let message = |device, msg| schema.pack(&[site, 1, 1, 7, 5, 3, device, msg]);
    println!("\n== Everyone subscribes to team 5, channel 3 ==\n  {}", schema.render_filter(channel));
    let (alice, bob, carol) = (client(&local).await?, client(&cloud).await?, client(&origin).await?);
    let mut subs = Vec::new();
    for (who, c) in [("alice", &alice), ("bob", &bob), ("carol", &carol)] {
        subs.push((who, c.subscribe(channel, ReplayMode::CachedAndLive).await?));
    }

    let expiry = now_ms() + 3_600_000;
    println!("\n== alice (on local) publishes; it travels up the tree ==");
    alice.publish(Chunk::new(message(1, 1)?, expiry, &b"hello from the local relay"[..])?).await?;
    for (who, sub) in subs.iter_mut().filter(|(w, _)| *w != "alice") {
        expect(who, sub, &schema).await?;
    }
    println!("\n== carol (on the origin) publishes; it travels down to where it is wanted ==");
    carol.publish(Chunk::new(message(2, 1)?, expiry, &b"hello from the origin"[..])?).await?;
    for (who, sub) in subs.iter_mut().filter(|(w, _)| *w != "carol") {
        expect(who, sub, &schema).await?;
    }

    println!("\n== Every relay on the path cached both ==");
    for (name, r) in [("origin", &origin), ("cloud", &cloud), ("local", &local)] {
        let m = r.metrics();
        println!("  {name:<7} stores {} chunks, outbox {}, {} subscriptions", m.store.chunks, m.store.outbox, m.subscriptions);
    }
    drop(subs);
    for c in [alice, bob, carol] {
        c.close();
    }

    let homes = dir.path().join("homes");
    std::fs::create_dir_all(&homes)?;
    messenger::run(&homes, [("origin", &origin), ("cloud", &cloud), ("local", &local)]).await?;

    for r in [local, cloud, origin] {
        r.shutdown().await;
    }
    println!("\ndone.");
    Ok(())
}
