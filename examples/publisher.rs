//! Publishes a few messenger-schema chunks to a relay.
//!
//! `cargo run -p canopy-examples --example publisher -- 127.0.0.1:4433 <data>/cert.pem`

use canopy_sdk::{Chunk, Client, ConnectOptions, PublishError, Schema, Trust};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(relay), Some(ca)) = (args.next(), args.next()) else {
        return Err("usage: publisher RELAY_ADDR CA_PEM".into());
    };
    let trust = Trust::CaPem(std::fs::read_to_string(ca)?);
    let client = Client::connect(ConnectOptions::new(relay, trust)).await?;

    let schema = Schema::messenger();
    let expiry = canopy_sdk::now_ms() + 3_600_000; // one hour
    for msg in 1..=3 {
        let name = schema.parse_name(&format!("team=5/channel=3/device=1/msg={msg}"))?;
        let chunk = Chunk::new(name, expiry, format!("hello #{msg}").into_bytes())?;
        match client.publish(chunk).await {
            Ok(()) => println!("published {}", schema.render(name)),
            Err(PublishError::Conflict { name, .. }) => println!("{name} already holds other data"),
            Err(e) => return Err(e.into()),
        }
    }
    client.close();
    Ok(())
}
