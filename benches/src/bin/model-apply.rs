//! The time to apply one pipeline message through a model: the poll model as a Wasm component
//! in the messenger's model host (a fresh instance per call, fuel metered, JSON state in and
//! out), beside the same model compiled natively and called directly (the baseline: what the
//! model's own logic and its JSON cost without Wasm). The two take turns in each round, so
//! machine drift cannot bias the ratio.
//!
//! ```text
//! bash scripts/build-plugins.sh && cargo run --release -p canopy-benches --bin model-apply [-- ROUNDS CALLS]
//! ```

use std::time::Instant;

use canopy_model::Model as _;
use canopy_msg_pipeline::{Limits, Message, Runtime, State};

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map_or(15, |s| s.parse().expect("ROUNDS is a number"));
    let calls: usize = args.next().map_or(200, |s| s.parse().expect("CALLS is a number"));
    let exe = std::env::current_exe()?;
    let wasm = exe.ancestors().nth(2).expect("target dir").join("wasm32-wasip2/plugin/poll.wasm");
    let bytes = std::fs::read(&wasm).map_err(|e| anyhow::anyhow!("{}: {e} (run scripts/build-plugins.sh)", wasm.display()))?;
    let runtime = Runtime::new().map_err(|e| anyhow::anyhow!("{e}"))?;
    let load_started = Instant::now();
    let model = runtime.load(&bytes, Limits::default()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let load_ms = load_started.elapsed().as_secs_f64() * 1e3;

    // Fifty members, each vote applied to a state that already holds the others'.
    let members: Vec<String> = (0..50).map(|i| format!("{i:032x}")).collect();
    let params = r#"{"question":"Which day?","options":["mon","tue","wed","thu","fri"]}"#;
    let mut wasm_state = model.init(params, &members[0], &members).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut native_state = poll::Poll::init(params, &members[0], &members).map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, m) in members.iter().enumerate().skip(1).take(40) {
        let body = format!(r#"{{"option":{}}}"#, i % 5);
        wasm_state = model.apply(&wasm_state, m, 0, &Message { kind: "vote".into(), body: body.clone() }).map_err(|e| anyhow::anyhow!("{e}"))?;
        native_state = poll::Poll::apply(native_state, m, 0, &canopy_model::Message::new("vote", body)).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let vote = Message { kind: "vote".into(), body: r#"{"option":3}"#.into() };
    let native_vote = canopy_model::Message::new("vote", vote.body.clone());
    let voter = &members[45];

    let (mut ours, mut theirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let started = Instant::now();
        for _ in 0..calls {
            let s: State = model.apply(&wasm_state, voter, 0, &vote).map_err(|e| anyhow::anyhow!("{e}"))?;
            std::hint::black_box(s);
        }
        let w = started.elapsed().as_secs_f64() * 1e6 / calls as f64;
        let started = Instant::now();
        for _ in 0..calls {
            // The native call gets the same work: the state decoded from JSON and encoded back.
            let state: poll::State = canopy_model::decode_state(&canopy_model::encode_state(&native_state).expect("encodes")).expect("decodes");
            let s = poll::Poll::apply(state, voter, 0, &native_vote).map_err(|e| anyhow::anyhow!("{e}"))?;
            std::hint::black_box(canopy_model::encode_state(&s).expect("encodes"));
        }
        let n = started.elapsed().as_secs_f64() * 1e6 / calls as f64;
        ours.push(w);
        theirs.push(n);
        ratios.push(w / n);
    }
    println!("poll model, 50 members, 40 votes in; {rounds} alternating rounds of {calls} applies; compile and check at load: {load_ms:.0} ms");
    println!("| apply one message | µs (median) |");
    println!("| --- | ---: |");
    println!("| Wasm, model host (fresh instance, fuel) | {:.1} |", median(&mut ours));
    println!("| native, same model and JSON | {:.2} |", median(&mut theirs));
    println!("| ratio | {:.0}× |", median(&mut ratios));
    Ok(())
}
