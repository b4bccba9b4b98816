//! The model host with real Wasm components built from `plugins/models/` (run
//! `scripts/build-plugins.sh` first): the poll model's whole life, determinism, the one host
//! capability, and models that trap, spin or hog memory without changing any state.

#[path = "../../../../framework/tests/support/plugin_artifacts.rs"]
mod plugin_artifacts;

use std::sync::{Arc, Mutex};

use canopy_msg_pipeline::{Limits, Message, Model, ModelError, ModelId, Runtime, Signer, State};

const ALICE: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const BOB: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const CAROL: &str = "cccccccccccccccccccccccccccccccc";
const MALLORY: &str = "dddddddddddddddddddddddddddddddd";

fn bytes(name: &str) -> Vec<u8> {
    std::fs::read(plugin_artifacts::wasm(name)).unwrap()
}

fn load(name: &str, limits: Limits) -> Model {
    Runtime::new().unwrap().load(&bytes(name), limits).unwrap()
}

fn members() -> Vec<String> {
    [ALICE, BOB, CAROL].map(str::to_string).to_vec()
}

fn msg(kind: &str, body: &str) -> Message {
    Message { kind: kind.into(), body: body.into() }
}

#[test]
fn a_poll_runs_from_question_to_result_and_refuses_what_breaks_its_rules() {
    let poll = load("poll", Limits::default());
    let d = poll.descriptor();
    assert_eq!((d.name.as_str(), d.version.as_str()), ("poll", "1"));
    assert_eq!(d.message_types.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), vec!["vote", "close"]);
    assert!(matches!(poll.init(r#"{"question":"Lunch?","options":["pizza"]}"#, ALICE, &members()), Err(ModelError::Refused(r)) if r.contains("two options")));
    assert!(matches!(poll.init("not json", ALICE, &members()), Err(ModelError::Refused(r)) if r.contains("params")));
    let state = poll.init(r#"{"question":"Lunch?","options":["pizza","soup"]}"#, ALICE, &members()).unwrap();

    // Actions build the messages; each member's device applies them in order.
    let view = poll.view(&state, BOB).unwrap();
    assert_eq!(view.title, "Lunch?");
    assert_eq!(view.actions.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(), vec!["vote"], "bob may vote, not close");
    assert_eq!(poll.view(&state, ALICE).unwrap().actions.len(), 2, "the creator may also close");
    assert!(poll.view(&state, MALLORY).unwrap().actions.is_empty());
    let vote = poll.act(&state, BOB, "vote", &["soup".into()], Box::new(canopy_msg_pipeline::NoSigner)).unwrap();
    assert_eq!(vote, msg("vote", r#"{"option":1}"#));
    let state = poll.apply(&state, BOB, 1, &vote).unwrap();
    let state = poll.apply(&state, ALICE, 2, &msg("vote", r#"{"option":0}"#)).unwrap();
    assert_eq!(poll.view(&state, ALICE).unwrap().lines, vec!["0. pizza: 1 (your vote)", "1. soup: 1"]);

    // Refusals leave the state as it was, with the model's reason.
    for (sender, m, why) in [
        (MALLORY, msg("vote", r#"{"option":0}"#), "not a member"),
        (CAROL, msg("vote", r#"{"option":7}"#), "no option 7"),
        (CAROL, msg("vote", "garbage"), "not valid"),
        (BOB, msg("close", "{}"), "only the creator"),
        (CAROL, msg("transfer", "{}"), "no \"transfer\""),
    ] {
        match poll.apply(&state, sender, 3, &m) {
            Err(ModelError::Refused(r)) => assert!(r.contains(why), "{r}"),
            other => panic!("{m:?} from {sender}: {other:?}"),
        }
    }
    assert!(matches!(poll.act(&state, CAROL, "vote", &["tea".into()], Box::new(canopy_msg_pipeline::NoSigner)), Err(ModelError::Refused(_))));
    // The last vote closes it.
    let state = poll.apply(&state, CAROL, 4, &msg("vote", r#"{"option":1}"#)).unwrap();
    let view = poll.view(&state, CAROL).unwrap();
    assert!(view.closed && view.actions.is_empty(), "{view:?}");
    assert_eq!(view.status, "3 of 3 voted, closed");
    assert!(matches!(poll.apply(&state, ALICE, 5, &msg("vote", r#"{"option":0}"#)), Err(ModelError::Refused(r)) if r.contains("closed")));
}

#[test]
fn every_device_reaches_the_same_state_and_hash_even_when_the_model_reads_a_clock_or_randomness() {
    // Two runtimes stand for two devices.
    let (a, b) = (load("poll", Limits::default()), load("poll", Limits::default()));
    let run = |m: &Model| {
        let mut s = m.init(r#"{"question":"Q","options":["x","y","z"]}"#, ALICE, &members()).unwrap();
        for (i, (who, o)) in [(BOB, 2), (ALICE, 0), (BOB, 1)].into_iter().enumerate() {
            s = m.apply(&s, who, i as u64, &msg("vote", &format!(r#"{{"option":{o}}}"#))).unwrap();
        }
        s
    };
    assert_eq!(run(&a).hash(), run(&b).hash());
    let (f1, f2) = (load("faulty", Limits::default()), load("faulty", Limits::default()));
    let s1 = f1.init("clock", ALICE, &members()).unwrap();
    let s2 = f2.init("clock", ALICE, &members()).unwrap();
    assert_eq!(s1, s2, "a stopped clock and a fixed random stream: {}", String::from_utf8_lossy(&s1.0));
    assert!(String::from_utf8_lossy(&s1.0).contains("\"0 "), "the clock reads zero: {}", String::from_utf8_lossy(&s1.0));
}

#[test]
fn traps_fuel_and_memory_overruns_change_nothing_and_the_model_keeps_working() {
    let limits = Limits { fuel: 50_000_000, memory: 16 << 20 };
    let m = load("faulty", limits);
    let state = m.init("", ALICE, &members()).unwrap();
    let state = m.apply(&state, ALICE, 1, &msg("count", "")).unwrap();
    let before = state.clone();
    assert!(matches!(m.apply(&state, ALICE, 2, &msg("trap", "")), Err(ModelError::Trap(t)) if t.contains("unreachable") || t.contains("trap")));
    assert_eq!(m.apply(&state, ALICE, 3, &msg("spin", "")), Err(ModelError::Fuel(50_000_000)));
    assert_eq!(m.apply(&state, ALICE, 4, &msg("hog", "")), Err(ModelError::Memory(16 << 20)));
    assert_eq!(state, before, "the caller's state is untouched");
    // Each call is a fresh instance: the next one works.
    let state = m.apply(&state, ALICE, 5, &msg("count", "")).unwrap();
    assert_eq!(m.view(&state, ALICE).unwrap().status, "2 ");
}

/// What a model asked to sign: key, kind, payload.
type SignRequest = (String, String, Vec<u8>);

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<SignRequest>>>);

impl Signer for Recorder {
    fn sign(&mut self, key: &str, kind: &str, payload: &[u8]) -> Result<Vec<u8>, String> {
        self.0.lock().unwrap().push((key.into(), kind.into(), payload.to_vec()));
        Ok(b"signature".to_vec())
    }
}

#[test]
fn a_model_may_ask_secure_to_sign_in_act_only() {
    let m = load("faulty", Limits::default());
    let state = m.init("", ALICE, &members()).unwrap();
    let recorder = Recorder::default();
    let out = m.act(&state, ALICE, "sign", &[], Box::new(recorder.clone())).unwrap();
    assert_eq!(out, msg("signed", "signature"));
    assert_eq!(recorder.0.lock().unwrap().as_slice(), &[("main".to_string(), "text".to_string(), b"approve this".to_vec())]);
    // In apply (every device, deterministic) the host refuses.
    match m.apply(&state, ALICE, 1, &msg("sign", "")) {
        Err(ModelError::Refused(r)) => assert!(r.contains("act only"), "{r}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn wrong_bytes_and_components_that_are_no_model_are_refused_at_load() {
    let rt = Runtime::new().unwrap();
    let poll = bytes("poll");
    let expected = ModelId::of(&poll);
    assert!(rt.load_checked(&poll, &expected, Limits::default()).is_ok());
    match rt.load_checked(&bytes("faulty"), &expected, Limits::default()) {
        Err(ModelError::Mismatch { expected: e, found }) => assert!(e == expected.to_string() && found != e),
        other => panic!("{:?}", other.err()),
    }
    assert!(matches!(rt.load(&poll[..poll.len() / 2], Limits::default()), Err(ModelError::Load(_))));
    assert!(matches!(rt.load(&bytes("echo"), Limits::default()), Err(ModelError::Load(_))), "a plugin is no model");
    assert!(matches!(rt.load(b"garbage", Limits::default()), Err(ModelError::Load(_))));
    let _ = State(Vec::new()).hash_hex();
}

#[test]
fn a_runtime_compiles_each_model_once_and_each_load_keeps_its_own_limits() {
    let rt = Runtime::new().unwrap();
    let faulty = bytes("faulty");
    let roomy = rt.load(&faulty, Limits::default()).unwrap();
    let tight = rt.load(&faulty, Limits { fuel: 20_000_000, ..Limits::default() }).unwrap();
    assert_eq!(rt.compilations(), 1, "the second load reuses the compiled model");
    // The same compiled model, each with the limits it was loaded with.
    let state = roomy.init("", ALICE, &members()).unwrap();
    assert_eq!(tight.apply(&state, ALICE, 1, &msg("spin", "")), Err(ModelError::Fuel(20_000_000)));
    assert_eq!(roomy.apply(&state, ALICE, 1, &msg("count", "")).map(|s| roomy.view(&s, ALICE).unwrap().status), Ok("1 ".to_string()));
    // Bytes that are no model are not kept: asked again, they are compiled (and refused) again.
    assert!(rt.load(b"garbage", Limits::default()).is_err());
    assert!(rt.load(b"garbage", Limits::default()).is_err());
    assert_eq!(rt.compilations(), 3);
    // A clone shares what was compiled.
    rt.clone().load(&bytes("poll"), Limits::default()).unwrap();
    rt.load(&bytes("poll"), Limits::default()).unwrap();
    assert_eq!(rt.compilations(), 4);
}

/// What Secure does for `sign("btc", "psbt", …)`: the PSBT signs itself with the user's key,
/// computing its own sighash (here with a test key per user).
struct PsbtSigner(u8);

impl Signer for PsbtSigner {
    fn sign(&mut self, key: &str, kind: &str, payload: &[u8]) -> Result<Vec<u8>, String> {
        use bitcoin::secp256k1::{Secp256k1, SecretKey};
        assert_eq!((key, kind), ("btc", "psbt"));
        let mut psbt = bitcoin::psbt::Psbt::deserialize(payload).map_err(|e| e.to_string())?;
        let sk = bitcoin::PrivateKey::new(SecretKey::from_slice(&[self.0; 32]).unwrap(), bitcoin::Network::Regtest);
        let keys: std::collections::BTreeMap<_, _> = [(sk.public_key(&Secp256k1::new()), sk)].into();
        psbt.sign(&keys, &Secp256k1::new()).map_err(|_| "signing failed".to_string())?;
        Ok(psbt.serialize())
    }
}

#[test]
fn the_multisig_model_runs_a_two_of_three_spend_in_the_host_signing_through_the_capability() {
    use bitcoin::secp256k1::{Secp256k1, SecretKey};
    let public = |i: u8| bitcoin::PrivateKey::new(SecretKey::from_slice(&[i; 32]).unwrap(), bitcoin::Network::Regtest).public_key(&Secp256k1::new());
    let address = |i: u8| bitcoin::Address::p2wpkh(&bitcoin::CompressedPublicKey::try_from(public(i)).unwrap(), bitcoin::Network::Regtest).to_string();
    let params = serde_json::json!({
        "descriptor": format!("wsh(multi(2,{},{},{}))", public(1), public(2), public(3)),
        "network": "regtest",
        "funding": {"txid": "ab".repeat(32), "vout": 0, "amount_sat": 50_000},
        "outputs": [{"address": address(9), "amount_sat": 49_000}],
        "fee_sat": 1_000,
    })
    .to_string();
    let m = load("multisig", Limits::default());
    assert_eq!(m.descriptor().name, "multisig");
    let state = m.init(&params, ALICE, &members()).unwrap();
    // The creator's act builds the PSBT and has it signed; every device applies it.
    let tx = m.act(&state, ALICE, "transaction", &[], Box::new(PsbtSigner(1))).unwrap();
    assert_eq!(tx.kind, "TRANSACTION");
    let state = m.apply(&state, ALICE, 1, &tx).unwrap();
    assert_eq!(m.view(&state, BOB).unwrap().status, "1 of 2 signatures");
    // Without a key, signing fails and nothing is sent.
    assert!(matches!(m.act(&state, BOB, "sign", &[], Box::new(canopy_msg_pipeline::NoSigner)), Err(ModelError::Refused(_))));
    let sign = m.act(&state, BOB, "sign", &[], Box::new(PsbtSigner(2))).unwrap();
    let state = m.apply(&state, BOB, 2, &sign).unwrap();
    let finalize = m.act(&state, CAROL, "finalize", &[], Box::new(canopy_msg_pipeline::NoSigner)).unwrap();
    let state = m.apply(&state, CAROL, 3, &finalize).unwrap();
    let view = m.view(&state, CAROL).unwrap();
    assert_eq!(view.status, "final, ready to broadcast");
    // The final transaction, verified natively with miniscript's interpreter.
    let hex = view.lines.iter().find_map(|l| l.strip_prefix("tx ")).unwrap();
    let final_tx: bitcoin::Transaction = bitcoin::consensus::encode::deserialize_hex(hex).unwrap();
    // The funding script, built here from the three keys: OP_2 <k1> <k2> <k3> OP_3 CHECKMULTISIG.
    let witness_script = bitcoin::script::Builder::new()
        .push_int(2)
        .push_key(&public(1))
        .push_key(&public(2))
        .push_key(&public(3))
        .push_int(3)
        .push_opcode(bitcoin::opcodes::all::OP_CHECKMULTISIG)
        .into_script();
    assert_eq!(final_tx.input[0].witness.last().unwrap(), witness_script.as_bytes());
    let script = bitcoin::ScriptBuf::new_p2wsh(&witness_script.wscript_hash());
    multisig::verify(&final_tx, &bitcoin::TxOut { value: bitcoin::Amount::from_sat(50_000), script_pubkey: script }).unwrap();
    let broadcast = m.act(&state, ALICE, "broadcast", &[], Box::new(canopy_msg_pipeline::NoSigner)).unwrap();
    let state = m.apply(&state, ALICE, 4, &broadcast).unwrap();
    assert!(m.view(&state, ALICE).unwrap().closed);
}
