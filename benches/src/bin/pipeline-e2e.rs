//! The end-to-end time of a 2-of-3 Bitcoin multisig pipeline on loopback, through the real
//! `canopy-msg` CLI and processes of three users on one relay: create (the 2.4 MB model
//! shipped in the group), propose, sign, finalize, broadcast, and every device closed. Each
//! phase is timed until every member's device shows its result.
//!
//! ```text
//! bash scripts/build-plugins.sh && cargo build --release -p canopy-messenger -p canopy-benches
//! target/release/pipeline-e2e
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;

use canopy_benches::cli::{Down, exe_dir, msg};

/// Waits until `check` holds for every home, polling every 10 ms, for at most a minute.
fn until(homes: &[PathBuf], what: &str, check: impl Fn(&Path) -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    for h in homes {
        while !check(h)? {
            if Instant::now() > deadline {
                bail!("{} never: {what}", h.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

fn status(home: &Path, id: &str) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(&msg(home, &["pipeline", "show", id, "--json"])?)?)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let model = exe_dir().join("../wasm32-wasip2/plugin/multisig.wasm");
    anyhow::ensure!(model.is_file(), "{} is missing: run scripts/build-plugins.sh", model.display());
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let config = canopy_relay::RelayConfig { listen: "127.0.0.1:0".parse()?, data: root.join("relay"), ..canopy_relay::RelayConfig::default() };
    let relay = canopy_relay::Relay::spawn(config).await?;
    let ca = root.join("relay.pem");
    std::fs::write(&ca, relay.cert_pem())?;
    let addr = relay.local_addr().to_string();
    let homes: Vec<PathBuf> = ["alice", "bob", "carol"].iter().map(|n| root.join(n)).collect();
    let _down = Down(homes.clone());
    tokio::task::block_in_place(|| -> anyhow::Result<()> {
        let mut keys = Vec::new();
        for (i, h) in homes.iter().enumerate() {
            let org = (7 + i).to_string();
            msg(h, &["init", "--relay", &addr, "--ca", ca.to_str().unwrap(), "--domain", "example.com", "--org", &org])?;
            msg(h, &["up"])?;
            msg(h, &["btc", "key", "new"])?;
            keys.push(serde_json::from_str::<serde_json::Value>(&msg(h, &["btc", "key", "show", "--json"])?)?);
        }
        let ids: Vec<String> = homes.iter().map(|h| msg(h, &["whoami"])).collect::<Result<_, _>>()?;
        for (name, id) in ["bob", "carol"].iter().zip(&ids[1..]) {
            msg(&homes[0], &["contact", "add", id, name])?;
        }
        until(&homes[..1], "alice knows both devices", |h| Ok(msg(h, &["contacts", "--json"])?.matches("\"devices\":1").count() == 2))?;
        let pk = |i: usize| keys[i]["public_key"].as_str().unwrap_or_default().to_string();
        let params = serde_json::json!({
            "descriptor": format!("wsh(sortedmulti(2,{},{},{}))", pk(0), pk(1), pk(2)),
            "network": "regtest",
            "funding": {"txid": "ab".repeat(32), "vout": 0, "amount_sat": 100_000},
            "outputs": [{"address": keys[0]["address"], "amount_sat": 99_000}],
            "fee_sat": 1_000,
        })
        .to_string();
        let (alice, bob, carol) = (&homes[0], &homes[1], &homes[2]);
        let started = Instant::now();
        let mut phases = Vec::new();
        let mut phase = |name: &str, t: Instant| phases.push((name.to_string(), t.elapsed()));

        let t = Instant::now();
        let id = msg(alice, &["pipeline", "create", model.to_str().unwrap(), "--members", "bob,carol", "--params", &params])?;
        until(&homes, "the model arrives", |h| Ok(msg(h, &["pipeline", "list", "--json"])?.contains("\"model_complete\":true")))?;
        phase("create, 2.4 MB model at every member", t);
        let t = Instant::now();
        msg(alice, &["pipeline", "act", &id, "transaction", "--yes"])?;
        until(&homes, "the proposal", |h| Ok(status(h, &id)?["status"] == "1 of 2 signatures"))?;
        phase("propose (signed), shown everywhere", t);
        let t = Instant::now();
        msg(bob, &["pipeline", "act", &id, "sign", "--yes"])?;
        until(&homes, "the second signature", |h| Ok(status(h, &id)?["status"] == "2 of 2 signatures"))?;
        phase("second signature, shown everywhere", t);
        let t = Instant::now();
        msg(carol, &["pipeline", "act", &id, "finalize"])?;
        until(&homes, "the final transaction", |h| Ok(status(h, &id)?["status"] == "final, ready to broadcast"))?;
        phase("finalize (interpreter-checked), everywhere", t);
        let t = Instant::now();
        msg(alice, &["pipeline", "act", &id, "broadcast", "--broadcast-cmd", "true"])?;
        until(&homes, "the close", |h| Ok(status(h, &id)?["closed"] == true))?;
        phase("broadcast, closed everywhere", t);
        let total = started.elapsed();
        let t = Instant::now();
        status(bob, &id)?;
        let show = t.elapsed();
        println!("2-of-3 multisig pipeline, three users on one relay (loopback), release binaries");
        println!("| phase | ms |");
        println!("| --- | ---: |");
        for (name, d) in &phases {
            println!("| {name} | {:.0} |", d.as_secs_f64() * 1e3);
        }
        println!("| **total** | **{:.0}** |", total.as_secs_f64() * 1e3);
        println!("one `pipeline show` (process start, model compile, replay from the sealed state): {:.0} ms", show.as_secs_f64() * 1e3);
        Ok(())
    })?;
    relay.shutdown().await;
    Ok(())
}
