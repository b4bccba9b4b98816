//! The MLS provider, with X25519 that a host can take over.
//!
//! [`Provider`] is openmls's stock Rust provider (`openmls_rust_crypto`) with one seam: the
//! X25519 scalar multiplications inside HPKE can be handed to a function installed with
//! [`use_x25519`]. The `member` plugin installs the plugin host's native X25519 there: a
//! committer's commit into a team of *n* devices seals its path secrets to about *n* HPKE
//! recipients (only the committer ever commits, so the copath's resolutions are the leaves
//! themselves), two scalar multiplications each, and in Wasm those multiplications were most
//! of the time an add took. Every other primitive, and HPKE's key schedule and AEAD, stay the
//! stock ones, and with nothing installed the provider *is* the stock one.
//!
//! The installed function sees secret scalars. It is for a host that already holds the
//! plugin's state (the plugin host does), never for anything less trusted.

use std::sync::OnceLock;

use hpke_rs::{Hpke, HpkeError, Mode};
use hpke_rs_crypto::HpkeCrypto;
use hpke_rs_crypto::error::Error as HpkeCryptoError;
use hpke_rs_crypto::types::{AeadAlgorithm, KdfAlgorithm, KemAlgorithm};
use hpke_rs_rust_crypto::HpkeRustCrypto;
use openmls_memory_storage::MemoryStorage;
use openmls_rust_crypto::RustCrypto;
use openmls_traits::OpenMlsProvider;
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::types::{
    AeadType, Ciphersuite, CryptoError, ExporterSecret, HashType, HpkeAeadType, HpkeCiphertext, HpkeConfig,
    HpkeKdfType, HpkeKemType, HpkeKeyPair, KemOutput, SignatureScheme,
};
use openmls::prelude::SecretVLBytes;

/// X25519 (RFC 7748): `scalar` times `point`, or times the base point when `point` is
/// `None`. The scalar is clamped by the function, as RFC 7748 says.
pub type X25519 = fn(scalar: &[u8; 32], point: Option<&[u8; 32]>) -> [u8; 32];

static X25519_FN: OnceLock<X25519> = OnceLock::new();

/// Routes every X25519 of this process's HPKE through `f` from now on. The first call wins
/// (a process has one host); says whether this one did.
pub fn use_x25519(f: X25519) -> bool {
    X25519_FN.set(f).is_ok()
}

fn installed() -> Option<X25519> {
    X25519_FN.get().copied()
}

/// HPKE's primitives: the stock ones, with X25519 from [`use_x25519`].
#[derive(Debug)]
pub struct HostHpke;

fn x25519_inputs(pk: &[u8], sk: &[u8]) -> Result<([u8; 32], [u8; 32]), HpkeCryptoError> {
    let sk: [u8; 32] = sk.try_into().map_err(|_| HpkeCryptoError::KemInvalidSecretKey)?;
    let pk: [u8; 32] = pk.try_into().map_err(|_| HpkeCryptoError::KemInvalidPublicKey)?;
    Ok((pk, sk))
}

impl HpkeCrypto for HostHpke {
    type HpkePrng = <HpkeRustCrypto as HpkeCrypto>::HpkePrng;

    fn name() -> String {
        "canopy host X25519 over RustCrypto".into()
    }
    fn supports_kdf(alg: KdfAlgorithm) -> Result<(), HpkeCryptoError> {
        HpkeRustCrypto::supports_kdf(alg)
    }
    fn supports_kem(alg: KemAlgorithm) -> Result<(), HpkeCryptoError> {
        HpkeRustCrypto::supports_kem(alg)
    }
    fn supports_aead(alg: AeadAlgorithm) -> Result<(), HpkeCryptoError> {
        HpkeRustCrypto::supports_aead(alg)
    }
    fn prng() -> Self::HpkePrng {
        HpkeRustCrypto::prng()
    }
    fn kdf_extract(alg: KdfAlgorithm, salt: &[u8], ikm: &[u8]) -> Result<Vec<u8>, HpkeCryptoError> {
        HpkeRustCrypto::kdf_extract(alg, salt, ikm)
    }
    fn kdf_expand(alg: KdfAlgorithm, prk: &[u8], info: &[u8], output_size: usize) -> Result<Vec<u8>, HpkeCryptoError> {
        HpkeRustCrypto::kdf_expand(alg, prk, info, output_size)
    }
    fn dh(alg: KemAlgorithm, pk: &[u8], sk: &[u8]) -> Result<Vec<u8>, HpkeCryptoError> {
        match (alg, installed()) {
            (KemAlgorithm::DhKem25519, Some(f)) => {
                let (pk, sk) = x25519_inputs(pk, sk)?;
                let shared = f(&sk, Some(&pk));
                // RFC 9180 §7.1.4: an all-zero shared secret (a small-order point) is an
                // error, as the stock code has it. Compared in constant time there too.
                if subtle::ConstantTimeEq::ct_eq(&shared[..], &[0u8; 32][..]).into() {
                    return Err(HpkeCryptoError::KemInvalidPublicKey);
                }
                Ok(shared.to_vec())
            }
            _ => HpkeRustCrypto::dh(alg, pk, sk),
        }
    }
    fn secret_to_public(alg: KemAlgorithm, sk: &[u8]) -> Result<Vec<u8>, HpkeCryptoError> {
        match (alg, installed()) {
            (KemAlgorithm::DhKem25519, Some(f)) => {
                let sk: [u8; 32] = sk.try_into().map_err(|_| HpkeCryptoError::KemInvalidSecretKey)?;
                Ok(f(&sk, None).to_vec())
            }
            _ => HpkeRustCrypto::secret_to_public(alg, sk),
        }
    }
    fn kem_key_gen(alg: KemAlgorithm, prng: &mut Self::HpkePrng) -> Result<(Vec<u8>, Vec<u8>), HpkeCryptoError> {
        HpkeRustCrypto::kem_key_gen(alg, prng)
    }
    fn kem_key_gen_derand(alg: KemAlgorithm, seed: &[u8]) -> Result<(Vec<u8>, Vec<u8>), HpkeCryptoError> {
        HpkeRustCrypto::kem_key_gen_derand(alg, seed)
    }
    fn kem_encaps(alg: KemAlgorithm, pk_r: &[u8], prng: &mut Self::HpkePrng) -> Result<(Vec<u8>, Vec<u8>), HpkeCryptoError> {
        HpkeRustCrypto::kem_encaps(alg, pk_r, prng)
    }
    fn kem_decaps(alg: KemAlgorithm, ct: &[u8], sk_r: &[u8]) -> Result<Vec<u8>, HpkeCryptoError> {
        HpkeRustCrypto::kem_decaps(alg, ct, sk_r)
    }
    fn dh_validate_sk(alg: KemAlgorithm, sk: &[u8]) -> Result<Vec<u8>, HpkeCryptoError> {
        HpkeRustCrypto::dh_validate_sk(alg, sk)
    }
    fn aead_seal(alg: AeadAlgorithm, key: &[u8], nonce: &[u8], aad: &[u8], msg: &[u8]) -> Result<Vec<u8>, HpkeCryptoError> {
        HpkeRustCrypto::aead_seal(alg, key, nonce, aad, msg)
    }
    fn aead_open(alg: AeadAlgorithm, key: &[u8], nonce: &[u8], aad: &[u8], msg: &[u8]) -> Result<Vec<u8>, HpkeCryptoError> {
        HpkeRustCrypto::aead_open(alg, key, nonce, aad, msg)
    }
}

/// The DH-based KEMs, the only ones whose X25519 can be taken over; anything else (and
/// everything when nothing is installed) goes to the stock provider unchanged.
fn host_hpke(config: &HpkeConfig) -> Option<Hpke<HostHpke>> {
    installed()?;
    if config.0 != HpkeKemType::DhKem25519 {
        return None;
    }
    let kdf = match config.1 {
        HpkeKdfType::HkdfSha256 => KdfAlgorithm::HkdfSha256,
        HpkeKdfType::HkdfSha384 => KdfAlgorithm::HkdfSha384,
        HpkeKdfType::HkdfSha512 => KdfAlgorithm::HkdfSha512,
    };
    let aead = match config.2 {
        HpkeAeadType::AesGcm128 => AeadAlgorithm::Aes128Gcm,
        HpkeAeadType::AesGcm256 => AeadAlgorithm::Aes256Gcm,
        HpkeAeadType::ChaCha20Poly1305 => AeadAlgorithm::ChaCha20Poly1305,
        HpkeAeadType::Export => AeadAlgorithm::HpkeExport,
    };
    Some(Hpke::new(Mode::Base, KemAlgorithm::DhKem25519, kdf, aead))
}

fn hpke_error(e: HpkeError) -> CryptoError {
    match e {
        HpkeError::InvalidInput => CryptoError::InvalidLength,
        _ => CryptoError::CryptoLibraryError,
    }
}

/// openmls's crypto: [`RustCrypto`], with HPKE's X25519 from [`use_x25519`] when installed.
#[derive(Debug, Default)]
pub struct Crypto(RustCrypto);

impl OpenMlsCrypto for Crypto {
    fn supports(&self, ciphersuite: Ciphersuite) -> Result<(), CryptoError> {
        self.0.supports(ciphersuite)
    }
    fn supported_ciphersuites(&self) -> Vec<Ciphersuite> {
        self.0.supported_ciphersuites()
    }
    fn hkdf_extract(&self, hash_type: HashType, salt: &[u8], ikm: &[u8]) -> Result<SecretVLBytes, CryptoError> {
        self.0.hkdf_extract(hash_type, salt, ikm)
    }
    fn hmac(&self, hash_type: HashType, key: &[u8], message: &[u8]) -> Result<SecretVLBytes, CryptoError> {
        self.0.hmac(hash_type, key, message)
    }
    fn hkdf_expand(&self, hash_type: HashType, prk: &[u8], info: &[u8], okm_len: usize) -> Result<SecretVLBytes, CryptoError> {
        self.0.hkdf_expand(hash_type, prk, info, okm_len)
    }
    fn hash(&self, hash_type: HashType, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.0.hash(hash_type, data)
    }
    fn aead_encrypt(&self, alg: AeadType, key: &[u8], data: &[u8], nonce: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.0.aead_encrypt(alg, key, data, nonce, aad)
    }
    fn aead_decrypt(&self, alg: AeadType, key: &[u8], ct_tag: &[u8], nonce: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.0.aead_decrypt(alg, key, ct_tag, nonce, aad)
    }
    fn signature_key_gen(&self, alg: SignatureScheme) -> Result<(Vec<u8>, Vec<u8>), CryptoError> {
        self.0.signature_key_gen(alg)
    }
    fn verify_signature(&self, alg: SignatureScheme, data: &[u8], pk: &[u8], signature: &[u8]) -> Result<(), CryptoError> {
        self.0.verify_signature(alg, data, pk, signature)
    }
    fn sign(&self, alg: SignatureScheme, data: &[u8], key: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.0.sign(alg, data, key)
    }
    fn hpke_seal(&self, config: HpkeConfig, pk_r: &[u8], info: &[u8], aad: &[u8], ptxt: &[u8]) -> Result<HpkeCiphertext, CryptoError> {
        let Some(mut hpke) = host_hpke(&config) else { return self.0.hpke_seal(config, pk_r, info, aad, ptxt) };
        let (kem_output, ciphertext) = hpke.seal(&pk_r.into(), info, aad, ptxt, None, None, None).map_err(hpke_error)?;
        Ok(HpkeCiphertext { kem_output: kem_output.into(), ciphertext: ciphertext.into() })
    }
    fn hpke_open(&self, config: HpkeConfig, input: &HpkeCiphertext, sk_r: &[u8], info: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let Some(hpke) = host_hpke(&config) else { return self.0.hpke_open(config, input, sk_r, info, aad) };
        hpke.open(input.kem_output.as_slice(), &sk_r.into(), info, aad, input.ciphertext.as_slice(), None, None, None)
            .map_err(|_| CryptoError::HpkeDecryptionError)
    }
    fn hpke_setup_sender_and_export(
        &self,
        config: HpkeConfig,
        pk_r: &[u8],
        info: &[u8],
        exporter_context: &[u8],
        exporter_length: usize,
    ) -> Result<(KemOutput, ExporterSecret), CryptoError> {
        self.0.hpke_setup_sender_and_export(config, pk_r, info, exporter_context, exporter_length)
    }
    fn hpke_setup_receiver_and_export(
        &self,
        config: HpkeConfig,
        enc: &[u8],
        sk_r: &[u8],
        info: &[u8],
        exporter_context: &[u8],
        exporter_length: usize,
    ) -> Result<ExporterSecret, CryptoError> {
        self.0.hpke_setup_receiver_and_export(config, enc, sk_r, info, exporter_context, exporter_length)
    }
    fn derive_hpke_keypair(&self, config: HpkeConfig, ikm: &[u8]) -> Result<HpkeKeyPair, CryptoError> {
        let Some(hpke) = host_hpke(&config) else { return self.0.derive_hpke_keypair(config, ikm) };
        let (private, public) = hpke.derive_key_pair(ikm).map_err(hpke_error)?.into_keys();
        Ok(HpkeKeyPair { private: private.as_slice().into(), public: public.as_slice().into() })
    }
}

/// The MLS provider: [`Crypto`], its randomness, and openmls's in-memory storage (which the
/// vault seals and persists).
#[derive(Debug, Default)]
pub struct Provider {
    crypto: Crypto,
    storage: MemoryStorage,
}

impl OpenMlsProvider for Provider {
    type CryptoProvider = Crypto;
    type RandProvider = RustCrypto;
    type StorageProvider = MemoryStorage;

    fn storage(&self) -> &MemoryStorage {
        &self.storage
    }
    fn crypto(&self) -> &Crypto {
        &self.crypto
    }
    fn rand(&self) -> &RustCrypto {
        &self.crypto.0
    }
}
