//! A k-of-n Bitcoin multisig spend as a pipeline model: the seed's Create → Transact → sign… →
//! Broadcast → closed. Built on `bitcoin` and `miniscript`, which need no node.
//!
//! - **Params** (JSON): `descriptor` (`wsh(multi(k,…))` or `wsh(sortedmulti(k,…))` over
//!   public keys), `network` (`regtest`, `testnet`, `bitcoin`), `funding` (`txid`, `vout`,
//!   `amount_sat`), `outputs` (`address`, `amount_sat`) and `fee_sat`; `init` checks that the
//!   funding pays exactly the outputs and the fee.
//! - **`TRANSACTION`** (the creator): the PSBT spending the funding output to the outputs,
//!   with the creator's signature. **`SIGN`**: a member's signed copy, combined in.
//!   **`FINALIZE`**: once `k` signatures are in, the model finalizes the PSBT itself
//!   (miniscript's finalizer) and checks the transaction with miniscript's interpreter
//!   against the funding output. **`BROADCAST`**: the final transaction's id, once sent; the
//!   pipeline closes.
//! - Every PSBT is checked against the parameters on every member's device: the one input is
//!   the funding output with its amount and script, the outputs are exactly the parameters'
//!   (nothing added, swapped or changed), and every signature verifies for a key of the
//!   descriptor. A tampered PSBT is refused with the reason.
//! - Signing goes through the host (`sign("btc", "psbt", …)`): Secure computes the sighash
//!   from the PSBT itself and shows the user what they approve.

use std::str::FromStr;

use bitcoin::hashes::Hash as _;
use bitcoin::psbt::Psbt;
use bitcoin::secp256k1::{self, Secp256k1};
use bitcoin::sighash::{EcdsaSighashType, Prevouts, SighashCache};
use bitcoin::{Address, Amount, Network, OutPoint, PublicKey, ScriptBuf, Sequence, Transaction, TxIn, TxOut, Txid, Witness, absolute, transaction};
use canopy_model::{Descriptor as ModelDescriptor, Message, Model, Rendering};
use miniscript::psbt::PsbtExt as _;
use miniscript::{Descriptor, ForEachKey as _};
use serde::{Deserialize, Serialize};

/// The model.
pub struct Multisig;

/// The funding output being spent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Funding {
    /// Its transaction.
    pub txid: String,
    /// Its output index.
    pub vout: u32,
    /// Its amount.
    pub amount_sat: u64,
}

/// One output of the spend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    /// Where it pays.
    pub address: String,
    /// How much.
    pub amount_sat: u64,
}

/// The creator's parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Params {
    /// `wsh(multi(k,…))` or `wsh(sortedmulti(k,…))`.
    pub descriptor: String,
    /// `regtest`, `testnet` or `bitcoin`.
    pub network: String,
    /// The output spent.
    pub funding: Funding,
    /// The outputs paid.
    pub outputs: Vec<Output>,
    /// The fee.
    pub fee_sat: u64,
}

/// Where the spend stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    params: Params,
    creator: String,
    /// Signatures needed.
    k: usize,
    /// The combined PSBT (base64), once the creator sent it.
    psbt: Option<String>,
    /// Which members sent signatures.
    signed_by: Vec<String>,
    /// The final transaction (hex), once finalized.
    final_tx: Option<String>,
    /// Its id.
    txid: Option<String>,
    /// Broadcast and closed.
    closed: bool,
}

#[derive(Serialize, Deserialize)]
struct PsbtBody {
    psbt: String,
}

#[derive(Serialize, Deserialize)]
struct BroadcastBody {
    txid: String,
    /// The final transaction (hex), for the acting device's broadcast hook
    /// (`pipeline act … --broadcast-cmd`); members check only the txid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tx: Option<String>,
}

fn network(name: &str) -> Result<Network, String> {
    match name {
        "regtest" => Ok(Network::Regtest),
        "testnet" => Ok(Network::Testnet),
        "bitcoin" => Ok(Network::Bitcoin),
        other => Err(format!("network {other:?}: regtest, testnet or bitcoin")),
    }
}

fn descriptor(params: &Params) -> Result<Descriptor<PublicKey>, String> {
    let d = Descriptor::<PublicKey>::from_str(&params.descriptor).map_err(|e| format!("descriptor: {e}"))?;
    match &d {
        Descriptor::Wsh(_) => {}
        _ => return Err("the descriptor must be wsh(multi(…)) or wsh(sortedmulti(…))".into()),
    }
    d.sanity_check().map_err(|e| format!("descriptor: {e}"))?;
    Ok(d)
}

/// How many signatures the descriptor needs (its `k`).
fn threshold(d: &Descriptor<PublicKey>) -> Result<usize, String> {
    let text = d.to_string();
    let inner = text.split_once("multi(").map(|(_, rest)| rest).ok_or("the descriptor is no multisig")?;
    inner.split(',').next().and_then(|k| k.parse().ok()).ok_or_else(|| "the descriptor has no threshold".into())
}

/// The spend the parameters describe: one input, the outputs in order.
fn unsigned_tx(params: &Params) -> Result<Transaction, String> {
    let net = network(&params.network)?;
    let txid = Txid::from_str(&params.funding.txid).map_err(|e| format!("funding txid: {e}"))?;
    let mut output = Vec::new();
    for o in &params.outputs {
        let address = Address::from_str(&o.address).map_err(|e| format!("address {}: {e}", o.address))?.require_network(net).map_err(|e| format!("address {}: {e}", o.address))?;
        output.push(TxOut { value: Amount::from_sat(o.amount_sat), script_pubkey: address.script_pubkey() });
    }
    Ok(Transaction {
        version: transaction::Version::TWO,
        lock_time: absolute::LockTime::ZERO,
        input: vec![TxIn { previous_output: OutPoint { txid, vout: params.funding.vout }, script_sig: ScriptBuf::new(), sequence: Sequence::ENABLE_RBF_NO_LOCKTIME, witness: Witness::new() }],
        output,
    })
}

/// The funding output, as the descriptor and parameters say it is.
fn funding_txout(params: &Params, d: &Descriptor<PublicKey>) -> TxOut {
    TxOut { value: Amount::from_sat(params.funding.amount_sat), script_pubkey: d.script_pubkey() }
}

/// The unsigned PSBT of the spend, ready for signers: the funding output, the witness script,
/// and every key of the descriptor (so a signer finds its own).
pub fn unsigned_psbt(params: &Params) -> Result<Psbt, String> {
    let d = descriptor(params)?;
    let mut psbt = Psbt::from_unsigned_tx(unsigned_tx(params)?).map_err(|e| format!("psbt: {e}"))?;
    let input = &mut psbt.inputs[0];
    input.witness_utxo = Some(funding_txout(params, &d));
    input.witness_script = Some(d.explicit_script().map_err(|e| format!("descriptor: {e}"))?);
    input.sighash_type = Some(EcdsaSighashType::All.into());
    d.for_each_key(|pk| {
        input.bip32_derivation.insert(pk.inner, (Default::default(), Default::default()));
        true
    });
    Ok(psbt)
}

fn decode_psbt(text: &str) -> Result<Psbt, String> {
    Psbt::from_str(text).map_err(|e| format!("a PSBT that does not decode: {e}"))
}

/// Checks a PSBT against the parameters: the same spend, and only valid signatures by keys
/// of the descriptor. Returns how many signatures it holds.
fn check_psbt(params: &Params, psbt: &Psbt) -> Result<usize, String> {
    let d = descriptor(params)?;
    let want = unsigned_tx(params)?;
    let tx = &psbt.unsigned_tx;
    if tx.input.len() != 1 || tx.input[0].previous_output != want.input[0].previous_output {
        return Err("the PSBT spends something other than the funding output".into());
    }
    if tx.output.len() != want.output.len() {
        return Err(format!("the PSBT has {} outputs, the pipeline {}", tx.output.len(), want.output.len()));
    }
    for (i, (got, exp)) in tx.output.iter().zip(&want.output).enumerate() {
        if got.script_pubkey != exp.script_pubkey {
            return Err(format!("output {i} pays another address than the pipeline says"));
        }
        if got.value != exp.value {
            return Err(format!("output {i} pays {} sat, the pipeline says {}", got.value.to_sat(), exp.value.to_sat()));
        }
    }
    if *tx != want {
        return Err("the PSBT's transaction differs from the pipeline's (version, lock time or sequence)".into());
    }
    let input = &psbt.inputs[0];
    let funding = funding_txout(params, &d);
    if input.witness_utxo.as_ref() != Some(&funding) {
        return Err("the PSBT's funding output differs from the pipeline's (amount or script)".into());
    }
    let script = d.explicit_script().map_err(|e| format!("descriptor: {e}"))?;
    if input.witness_script.as_ref() != Some(&script) {
        return Err("the PSBT's witness script is not the descriptor's".into());
    }
    let mut keys = Vec::new();
    d.for_each_key(|pk| {
        keys.push(*pk);
        true
    });
    let secp = Secp256k1::verification_only();
    let mut cache = SighashCache::new(tx);
    for (pk, sig) in &input.partial_sigs {
        if !keys.contains(pk) {
            return Err(format!("a signature by {pk}, which is no key of the descriptor"));
        }
        if sig.sighash_type != EcdsaSighashType::All {
            return Err("a signature that does not commit to the whole transaction (SIGHASH_ALL)".into());
        }
        let sighash = cache.p2wsh_signature_hash(0, &script, funding.value, sig.sighash_type).map_err(|e| format!("sighash: {e}"))?;
        let msg = secp256k1::Message::from_digest(sighash.to_byte_array());
        secp.verify_ecdsa(&msg, &sig.signature, &pk.inner).map_err(|_| format!("the signature by {pk} does not verify"))?;
    }
    Ok(input.partial_sigs.len())
}

/// The final transaction of a fully signed PSBT, checked with miniscript's interpreter
/// against the funding output.
pub fn finalize(params: &Params, psbt: &Psbt) -> Result<Transaction, String> {
    let d = descriptor(params)?;
    let secp = Secp256k1::verification_only();
    let mut psbt = psbt.clone();
    psbt.finalize_mut(&secp).map_err(|errors| format!("cannot finalize: {}", errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")))?;
    let tx = psbt.extract_tx_unchecked_fee_rate();
    verify(&tx, &funding_txout(params, &d))?;
    Ok(tx)
}

/// The script a descriptor's funding output pays to.
pub fn funding_script(descriptor_text: &str) -> Result<ScriptBuf, String> {
    let d = Descriptor::<PublicKey>::from_str(descriptor_text).map_err(|e| format!("descriptor: {e}"))?;
    Ok(d.script_pubkey())
}

/// Checks that `tx`'s first input satisfies the script of `funding`, with miniscript's
/// interpreter: every signature verified against the transaction.
pub fn verify(tx: &Transaction, funding: &TxOut) -> Result<(), String> {
    let secp = Secp256k1::verification_only();
    let input = tx.input.first().ok_or("a transaction without inputs")?;
    let interpreter = miniscript::Interpreter::from_txdata(&funding.script_pubkey, &input.script_sig, &input.witness, input.sequence, tx.lock_time).map_err(|e| format!("interpreter: {e}"))?;
    let prevouts = [funding.clone()];
    let prevouts = Prevouts::All(&prevouts);
    let mut satisfied = 0;
    for step in interpreter.iter(&secp, tx, 0, &prevouts) {
        step.map_err(|e| format!("the transaction does not satisfy the funding script: {e}"))?;
        satisfied += 1;
    }
    if satisfied == 0 {
        return Err("the interpreter saw no satisfied condition".into());
    }
    Ok(())
}

impl Model for Multisig {
    type State = State;

    fn describe() -> ModelDescriptor {
        ModelDescriptor::new("multisig", "1")
            .message("TRANSACTION", "the creator's PSBT of the spend, signed by the creator")
            .message("SIGN", "a member's signed copy of the PSBT")
            .message("FINALIZE", "k signatures are in: the final transaction")
            .message("BROADCAST", "the final transaction was sent: its txid")
            .role("creator", "proposes the spend")
            .role("signer", "signs it with a key of the descriptor")
    }

    fn init(params: &str, creator: &str, _members: &[String]) -> Result<State, String> {
        let params: Params = serde_json::from_str(params).map_err(|e| format!("params: {e}"))?;
        let d = descriptor(&params)?;
        let k = threshold(&d)?;
        let paid: u64 = params.outputs.iter().map(|o| o.amount_sat).sum();
        if params.outputs.is_empty() || paid.checked_add(params.fee_sat) != Some(params.funding.amount_sat) {
            return Err(format!("the outputs ({paid} sat) and the fee ({} sat) must add up to the funding ({} sat)", params.fee_sat, params.funding.amount_sat));
        }
        unsigned_psbt(&params)?;
        Ok(State { params, creator: creator.into(), k, psbt: None, signed_by: Vec::new(), final_tx: None, txid: None, closed: false })
    }

    fn apply(mut state: State, sender: &str, _time_ms: u64, message: &Message) -> Result<State, String> {
        if state.closed {
            return Err("the spend is closed".into());
        }
        match message.kind.as_str() {
            "TRANSACTION" => {
                if sender != state.creator {
                    return Err("only the creator proposes the transaction".into());
                }
                if state.psbt.is_some() {
                    return Err("the transaction was proposed already".into());
                }
                let body: PsbtBody = message.json()?;
                let psbt = decode_psbt(&body.psbt)?;
                check_psbt(&state.params, &psbt)?;
                state.psbt = Some(psbt.to_string());
                state.signed_by.push(sender.into());
            }
            "SIGN" => {
                let mut current = decode_psbt(state.psbt.as_deref().ok_or("nothing to sign yet")?)?;
                if state.final_tx.is_some() {
                    return Err("the transaction is final already".into());
                }
                let body: PsbtBody = message.json()?;
                let theirs = decode_psbt(&body.psbt)?;
                check_psbt(&state.params, &theirs)?;
                current.combine(theirs).map_err(|e| format!("cannot combine: {e}"))?;
                check_psbt(&state.params, &current)?;
                state.psbt = Some(current.to_string());
                if !state.signed_by.iter().any(|s| s == sender) {
                    state.signed_by.push(sender.into());
                }
            }
            "FINALIZE" => {
                let psbt = decode_psbt(state.psbt.as_deref().ok_or("nothing to finalize yet")?)?;
                if state.final_tx.is_some() {
                    return Err("the transaction is final already".into());
                }
                let sigs = check_psbt(&state.params, &psbt)?;
                if sigs < state.k {
                    return Err(format!("{sigs} of {} signatures: not yet", state.k));
                }
                let tx = finalize(&state.params, &psbt)?;
                state.txid = Some(tx.compute_txid().to_string());
                state.final_tx = Some(bitcoin::consensus::encode::serialize_hex(&tx));
            }
            "BROADCAST" => {
                let body: BroadcastBody = message.json()?;
                match &state.txid {
                    Some(txid) if *txid == body.txid => state.closed = true,
                    Some(txid) => return Err(format!("broadcast of {}, but the final transaction is {txid}", body.txid)),
                    None => return Err("nothing final to broadcast yet".into()),
                }
            }
            other => return Err(format!("a multisig takes no {other:?} message")),
        }
        Ok(state)
    }

    fn view(state: &State, viewer: &str) -> Rendering {
        let sigs = state.psbt.as_deref().and_then(|p| decode_psbt(p).ok()).map_or(0, |p| p.inputs[0].partial_sigs.len());
        let status = match (&state.psbt, &state.final_tx, state.closed) {
            (_, _, true) => "broadcast, closed".to_string(),
            (_, Some(_), _) => "final, ready to broadcast".to_string(),
            (Some(_), None, _) => format!("{sigs} of {} signatures", state.k),
            (None, ..) => "waiting for the creator's transaction".to_string(),
        };
        let mut r = Rendering::new(format!("{}-of-n spend of {} sat", state.k, state.params.funding.amount_sat), status);
        for o in &state.params.outputs {
            r = r.line(format!("pay {} sat to {}", o.amount_sat, o.address));
        }
        r = r.line(format!("fee {} sat", state.params.fee_sat));
        if let Some(txid) = &state.txid {
            r = r.line(format!("txid {txid}"));
        }
        if let Some(tx) = &state.final_tx {
            r = r.line(format!("tx {tx}"));
        }
        r.closed = state.closed;
        if state.closed {
            return r;
        }
        match (&state.psbt, &state.final_tx) {
            (None, _) if viewer == state.creator => r.action("transaction", "build the PSBT and sign it", &[]),
            (Some(_), None) if sigs >= state.k => r.action("finalize", "finalize the transaction", &[]),
            (Some(_), None) if !state.signed_by.iter().any(|s| s == viewer) => r.action("sign", "sign the transaction", &[]),
            (_, Some(_)) => r.action("broadcast", "record that the transaction was broadcast", &["TXID"]),
            _ => r,
        }
    }

    fn act(state: &State, _viewer: &str, action: &str, args: &[String]) -> Result<Message, String> {
        let body = |psbt: String| serde_json::to_string(&PsbtBody { psbt }).map_err(|e| e.to_string());
        match action {
            "transaction" => {
                let psbt = unsigned_psbt(&state.params)?;
                let signed = canopy_model::sign("btc", "psbt", &psbt.serialize())?;
                let signed = Psbt::deserialize(&signed).map_err(|e| format!("Secure's PSBT: {e}"))?;
                Ok(Message::new("TRANSACTION", body(signed.to_string())?))
            }
            "sign" => {
                let psbt = decode_psbt(state.psbt.as_deref().ok_or("nothing to sign yet")?)?;
                let signed = canopy_model::sign("btc", "psbt", &psbt.serialize())?;
                let signed = Psbt::deserialize(&signed).map_err(|e| format!("Secure's PSBT: {e}"))?;
                Ok(Message::new("SIGN", body(signed.to_string())?))
            }
            "finalize" => Ok(Message::new("FINALIZE", "{}")),
            "broadcast" => {
                let txid = match (args.first(), &state.txid) {
                    (Some(t), _) => t.clone(),
                    (None, Some(t)) => t.clone(),
                    (None, None) => return Err("nothing final to broadcast yet".into()),
                };
                Ok(Message::new("BROADCAST", serde_json::to_string(&BroadcastBody { txid, tx: state.final_tx.clone() }).map_err(|e| e.to_string())?))
            }
            other => Err(format!("no action {other:?}: transaction, sign, finalize or broadcast")),
        }
    }
}

canopy_model::export_model!(Multisig);
