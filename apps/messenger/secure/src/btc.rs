//! Bitcoin keys for pipelines (`btc key new|import|show`) and the `psbt` signer behind the
//! model capability `sign("btc", "psbt", …)`.
//!
//! Secure never signs an opaque digest: it reads the PSBT itself, describes what it spends and
//! pays ([`review`]), and signs only a PSBT whose review the user approved — the approval names
//! the SHA-256 of the exact bytes, so a PSBT whose outputs differ from what the user was shown
//! is refused. The sighash is computed from the PSBT, here.

use std::collections::BTreeMap;

use bitcoin::psbt::Psbt;
use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::{Address, CompressedPublicKey, Network, PrivateKey};
use canopy_msg_core::MlsError;
use sha2::{Digest, Sha256};

use crate::proto::BtcKeyLine;

fn bad(text: impl Into<String>) -> MlsError {
    MlsError::BadName(text.into())
}

/// A network by name.
pub fn network(name: &str) -> Result<Network, MlsError> {
    match name {
        "regtest" => Ok(Network::Regtest),
        "testnet" => Ok(Network::Testnet),
        "bitcoin" => Ok(Network::Bitcoin),
        other => Err(bad(format!("network {other:?}: regtest, testnet or bitcoin"))),
    }
}

fn secret_name(name: &str) -> Result<String, MlsError> {
    if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(bad(format!("key name {name:?}: 1–64 letters, digits, - or _")));
    }
    Ok(format!("btc:{name}"))
}

/// The key named `name`, from what Secure keeps.
pub fn key(secret: Option<&[u8]>, name: &str) -> Result<PrivateKey, MlsError> {
    let bytes = secret.ok_or_else(|| bad(format!("no Bitcoin key named {name:?}: `canopy-msg btc key new {name}`")))?;
    let sk = SecretKey::from_slice(bytes).map_err(|_| bad(format!("the Bitcoin key {name:?} is damaged")))?;
    Ok(PrivateKey::new(sk, Network::Regtest))
}

/// What `btc key show` prints.
pub fn line(name: &str, key: &PrivateKey, network: Network) -> Result<BtcKeyLine, MlsError> {
    let public = key.public_key(&Secp256k1::new());
    let compressed = CompressedPublicKey::try_from(public).map_err(|e| bad(e.to_string()))?;
    Ok(BtcKeyLine { name: name.into(), public_key: public.to_string(), address: Address::p2wpkh(&compressed, network).to_string(), network: network.to_string() })
}

/// The vault name of key `name`, and a fresh secret for it.
pub fn new_key(name: &str) -> Result<(String, [u8; 32]), MlsError> {
    let (sk, _) = Secp256k1::new().generate_keypair(&mut bitcoin::secp256k1::rand::thread_rng());
    Ok((secret_name(name)?, sk.secret_bytes()))
}

/// The vault name of key `name`, and the secret of a WIF.
pub fn import_key(name: &str, wif: &str) -> Result<(String, [u8; 32]), MlsError> {
    let key = PrivateKey::from_wif(wif).map_err(|e| bad(format!("not a WIF key: {e}")))?;
    Ok((secret_name(name)?, key.inner.secret_bytes()))
}

/// The vault name of key `name`.
pub fn vault_name(name: &str) -> Result<String, MlsError> {
    secret_name(name)
}

/// What signing `payload` (a PSBT) means, for the user to approve, and the digest an
/// approval names.
pub fn review(payload: &[u8], network: Network) -> Result<(Vec<String>, String), MlsError> {
    let psbt = Psbt::deserialize(payload).map_err(|e| bad(format!("not a PSBT: {e}")))?;
    let mut lines = Vec::new();
    let mut spent = 0u64;
    for (i, (txin, input)) in psbt.unsigned_tx.input.iter().zip(&psbt.inputs).enumerate() {
        let utxo = input.witness_utxo.as_ref().ok_or_else(|| bad(format!("input {i} does not say what it spends: refusing to sign blind")))?;
        spent += utxo.value.to_sat();
        lines.push(format!("spend {} ({} sat)", txin.previous_output, utxo.value.to_sat()));
    }
    let mut paid = 0u64;
    for o in &psbt.unsigned_tx.output {
        paid += o.value.to_sat();
        let to = Address::from_script(&o.script_pubkey, network).map_or_else(|_| format!("script {}", o.script_pubkey.to_hex_string()), |a| a.to_string());
        lines.push(format!("pay {} sat to {to}", o.value.to_sat()));
    }
    let fee = spent.checked_sub(paid).ok_or_else(|| bad("the PSBT pays out more than it spends"))?;
    lines.push(format!("fee {fee} sat"));
    let digest: String = Sha256::digest(payload).iter().map(|b| format!("{b:02x}")).collect();
    Ok((lines, digest))
}

/// Signs the PSBT `payload` with `key`, computing the sighash from it; only if `approved` is
/// the digest of these very bytes (what the user was shown).
pub fn sign(payload: &[u8], key: &PrivateKey, approved: &str, network: Network) -> Result<Vec<u8>, MlsError> {
    let (_, digest) = review(payload, network)?;
    if approved != digest {
        return Err(bad("this PSBT is not the one you approved: nothing was signed"));
    }
    let mut psbt = Psbt::deserialize(payload).map_err(|e| bad(format!("not a PSBT: {e}")))?;
    let secp = Secp256k1::new();
    let keys: BTreeMap<_, _> = [(key.public_key(&secp), *key)].into();
    let signed = psbt.sign(&keys, &secp).map_err(|(_, errors)| bad(format!("signing failed: {errors:?}")))?;
    if signed.is_empty() {
        return Err(bad("this key is no signer of the PSBT: nothing was signed"));
    }
    Ok(psbt.serialize())
}

/// Parses a network, defaulting to regtest.
pub fn network_or_regtest(name: Option<&str>) -> Result<Network, MlsError> {
    name.map_or(Ok(Network::Regtest), network)
}
