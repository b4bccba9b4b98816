//! The multisig model natively: a 2-of-3 spend from the creator's PSBT through a second
//! signature to a final transaction that miniscript's interpreter accepts against the funding
//! output, and every tampering refused with its reason. (Signing here is what Secure does for
//! `sign("btc", "psbt", …)`: the PSBT signs itself with the key, computing its own sighash.)

use std::collections::BTreeMap;
use std::str::FromStr;

use bitcoin::key::{PrivateKey, PublicKey};
use bitcoin::psbt::Psbt;
use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::{Address, Amount, CompressedPublicKey, Network, TxOut};
use canopy_model::{Message, Model};
use multisig::{Multisig, Params, State, finalize, unsigned_psbt, verify};

const ALICE: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const BOB: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const CAROL: &str = "cccccccccccccccccccccccccccccccc";

fn key(i: u8) -> PrivateKey {
    PrivateKey::new(SecretKey::from_slice(&[i; 32]).unwrap(), Network::Regtest)
}

fn public(i: u8) -> PublicKey {
    key(i).public_key(&Secp256k1::new())
}

fn address(i: u8) -> String {
    Address::p2wpkh(&CompressedPublicKey::try_from(public(i)).unwrap(), Network::Regtest).to_string()
}

fn params() -> Params {
    serde_json::from_value(serde_json::json!({
        "descriptor": format!("wsh(sortedmulti(2,{},{},{}))", public(1), public(2), public(3)),
        "network": "regtest",
        "funding": {"txid": "f".repeat(64), "vout": 1, "amount_sat": 100_000},
        "outputs": [{"address": address(9), "amount_sat": 60_000}, {"address": address(8), "amount_sat": 39_000}],
        "fee_sat": 1_000,
    }))
    .unwrap()
}

/// What Secure does for a `psbt` signing request with key `i`.
fn sign(psbt: &Psbt, i: u8) -> Psbt {
    let mut psbt = psbt.clone();
    let keys: BTreeMap<PublicKey, PrivateKey> = [(public(i), key(i))].into();
    psbt.sign(&keys, &Secp256k1::new()).unwrap();
    psbt
}

fn msg(kind: &str, psbt: &Psbt) -> Message {
    Message::new(kind, serde_json::json!({"psbt": psbt.to_string()}).to_string())
}

fn members() -> Vec<String> {
    [ALICE, BOB, CAROL].map(str::to_string).to_vec()
}

fn start() -> State {
    Multisig::init(&serde_json::to_string(&params()).unwrap(), ALICE, &members()).unwrap()
}

#[test]
fn a_two_of_three_spend_is_signed_finalized_verified_and_closed() {
    let state = start();
    assert_eq!(Multisig::view(&state, ALICE).actions[0].name, "transaction");
    assert!(Multisig::view(&state, BOB).actions.is_empty());
    let proposal = sign(&unsigned_psbt(&params()).unwrap(), 1);
    let state = Multisig::apply(state, ALICE, 1, &msg("TRANSACTION", &proposal)).unwrap();
    let view = Multisig::view(&state, BOB);
    assert_eq!(view.status, "1 of 2 signatures");
    assert_eq!(view.actions[0].name, "sign");
    assert!(Multisig::apply(state.clone(), BOB, 2, &Message::new("FINALIZE", "{}")).unwrap_err().contains("1 of 2 signatures: not yet"));
    let state = Multisig::apply(state, BOB, 2, &msg("SIGN", &sign(&proposal, 2))).unwrap();
    assert_eq!(Multisig::view(&state, CAROL).actions[0].name, "finalize");
    let state = Multisig::apply(state, CAROL, 3, &Message::new("FINALIZE", "{}")).unwrap();
    let view = Multisig::view(&state, CAROL);
    assert_eq!(view.status, "final, ready to broadcast");
    let txid = view.lines.iter().find_map(|l| l.strip_prefix("txid ")).unwrap().to_string();
    let hex = view.lines.iter().find_map(|l| l.strip_prefix("tx ")).unwrap().to_string();

    // The final transaction, checked independently with miniscript's interpreter against the
    // funding output; against any other output (another amount) it fails.
    let tx: bitcoin::Transaction = bitcoin::consensus::encode::deserialize_hex(&hex).unwrap();
    assert_eq!(tx.compute_txid().to_string(), txid);
    let d = miniscript::Descriptor::<PublicKey>::from_str(&params().descriptor).unwrap();
    let funding = TxOut { value: Amount::from_sat(100_000), script_pubkey: d.script_pubkey() };
    verify(&tx, &funding).unwrap();
    let wrong = TxOut { value: Amount::from_sat(100_001), ..funding.clone() };
    assert!(verify(&tx, &wrong).is_err(), "a signature commits to the amount");
    assert_eq!(tx.output.len(), 2);
    assert_eq!(tx.input[0].witness.len(), 4, "empty, two signatures, the witness script");

    let bad = Message::new("BROADCAST", serde_json::json!({"txid": "0".repeat(64)}).to_string());
    assert!(Multisig::apply(state.clone(), ALICE, 4, &bad).unwrap_err().contains("broadcast of"));
    let state = Multisig::apply(state, ALICE, 4, &Message::new("BROADCAST", serde_json::json!({"txid": txid}).to_string())).unwrap();
    let view = Multisig::view(&state, ALICE);
    assert!(view.closed && view.actions.is_empty(), "{view:?}");
    assert!(Multisig::apply(state, BOB, 5, &msg("SIGN", &proposal)).unwrap_err().contains("closed"));
}

#[test]
fn a_tampered_psbt_is_refused_with_the_reason() {
    let base = unsigned_psbt(&params()).unwrap();
    let started = start();
    let tamper = |f: &dyn Fn(&mut Psbt)| {
        let mut p = base.clone();
        f(&mut p);
        p
    };
    let cases: Vec<(Psbt, &str)> = vec![
        (tamper(&|p| p.unsigned_tx.output[0].value = Amount::from_sat(61_000)), "output 0 pays 61000 sat"),
        (
            tamper(&|p| p.unsigned_tx.output[1].script_pubkey = Address::from_str(&address(7)).unwrap().assume_checked().script_pubkey()),
            "output 1 pays another address",
        ),
        (
            tamper(&|p| {
                p.unsigned_tx.output.push(TxOut { value: Amount::from_sat(1), script_pubkey: p.unsigned_tx.output[0].script_pubkey.clone() });
                p.outputs.push(Default::default());
            }),
            "3 outputs",
        ),
        (tamper(&|p| p.unsigned_tx.output.swap(0, 1)), "output 0 pays another address"),
        (tamper(&|p| p.inputs[0].witness_utxo.as_mut().unwrap().value = Amount::from_sat(1_000_000)), "funding output differs"),
        (tamper(&|p| p.unsigned_tx.input[0].previous_output.vout = 0), "spends something other"),
    ];
    for (psbt, why) in cases {
        let err = Multisig::apply(started.clone(), ALICE, 1, &msg("TRANSACTION", &sign(&psbt, 1))).unwrap_err();
        assert!(err.contains(why), "{why}: {err}");
    }
    // Signatures: by a key outside the descriptor, or that do not verify.
    let mut foreign = sign(&base, 1);
    let sig = *foreign.inputs[0].partial_sigs.values().next().unwrap();
    foreign.inputs[0].partial_sigs.insert(public(5), sig);
    assert!(Multisig::apply(started.clone(), ALICE, 1, &msg("TRANSACTION", &foreign)).unwrap_err().contains("no key of the descriptor"));
    let mut forged = sign(&base, 1);
    forged.inputs[0].partial_sigs.insert(public(2), sig);
    assert!(Multisig::apply(started.clone(), ALICE, 1, &msg("TRANSACTION", &forged)).unwrap_err().contains("does not verify"));
    // Roles and order.
    assert!(Multisig::apply(started.clone(), BOB, 1, &msg("TRANSACTION", &sign(&base, 2))).unwrap_err().contains("only the creator"));
    assert!(Multisig::apply(started.clone(), BOB, 1, &msg("SIGN", &sign(&base, 2))).unwrap_err().contains("nothing to sign"));
    assert!(Multisig::apply(started.clone(), BOB, 1, &Message::new("SIGN", "not json")).is_err());
    // A SIGN whose PSBT changed an amount is refused after the proposal too.
    let state = Multisig::apply(started, ALICE, 1, &msg("TRANSACTION", &sign(&base, 1))).unwrap();
    let changed = tamper(&|p| p.unsigned_tx.output[0].value = Amount::from_sat(59_000));
    assert!(Multisig::apply(state, BOB, 2, &msg("SIGN", &sign(&changed, 2))).unwrap_err().contains("output 0 pays 59000 sat"));
}

#[test]
fn parameters_that_do_not_add_up_are_refused() {
    let mut p = params();
    p.fee_sat = 2_000;
    assert!(Multisig::init(&serde_json::to_string(&p).unwrap(), ALICE, &members()).unwrap_err().contains("must add up"));
    let mut p = params();
    p.descriptor = format!("wpkh({})", public(1));
    assert!(Multisig::init(&serde_json::to_string(&p).unwrap(), ALICE, &members()).is_err());
    let mut p = params();
    p.outputs[0].address = Address::p2wpkh(&CompressedPublicKey::try_from(public(9)).unwrap(), Network::Bitcoin).to_string();
    assert!(Multisig::init(&serde_json::to_string(&p).unwrap(), ALICE, &members()).unwrap_err().contains("address"), "a mainnet address on regtest");
    // finalize refuses a PSBT without enough signatures.
    assert!(finalize(&params(), &sign(&unsigned_psbt(&params()).unwrap(), 1)).is_err());
}
