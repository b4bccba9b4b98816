//! Subscribes to a messenger channel: prints the cached chunks, then live ones for 30 s.
//!
//! `cargo run -p canopy-examples --example subscriber -- 127.0.0.1:4433 <data>/cert.pem`

use std::time::Duration;

use canopy_sdk::{Client, ConnectOptions, ReplayMode, Schema, SubEvent, Trust};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(relay), Some(ca)) = (args.next(), args.next()) else {
        return Err("usage: subscriber RELAY_ADDR CA_PEM".into());
    };
    let trust = Trust::CaPem(std::fs::read_to_string(ca)?);
    let client = Client::connect(ConnectOptions::new(relay, trust)).await?;

    let schema = Schema::messenger();
    let filter = schema.parse_filter("origin=0/app=0/path=0/org=0/team=5/channel=3")?;
    let mut sub = client.subscribe(filter, ReplayMode::CachedAndLive).await?;
    let listen = async {
        while let Some(event) = sub.next().await {
            match event {
                SubEvent::Chunk(c) => println!("{}: {}", schema.render(c.name()), String::from_utf8_lossy(c.data())),
                SubEvent::ReplayDone => println!("-- caught up; live messages follow --"),
                SubEvent::Gap => println!("-- reconnected: some live messages may be missing --"),
                SubEvent::Error { code, message } => return eprintln!("ended: {code}: {message}"),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), listen).await;
    Ok(())
}
