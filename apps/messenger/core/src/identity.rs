//! Users and the binding of devices to them.
//!
//! A **user** is an Ed25519 identity key, held by Secure. Its [`UserId`] is the first 16
//! bytes of the SHA-256 of the public key, shown as 32 lowercase hex digits.
//!
//! A **device** is an MLS leaf with a signature key of its own. Its MLS credential (a
//! `BasicCredential`) carries a [`Binding`] as its identity bytes: the user's public key and
//! the user's signature over the device's signature key. Every receiver checks the binding
//! of every leaf it accepts (in a welcome, a commit's adds and updates, and a key package
//! before adding it), so a device cannot claim a user whose key did not sign for it.
//!
//! **Binding** (the credential's identity bytes, 97 bytes):
//!
//! | size | field |
//! |---|---|
//! | 1 | version, `1` |
//! | 32 | the user's Ed25519 public key |
//! | 64 | Ed25519 signature by the user key over [`BINDING_LABEL`] ‖ the device's signature public key |
//!
//! The label keeps the signature from meaning anything outside this use.

use openmls::prelude::{BasicCredential, Credential, SignatureScheme};
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::signatures::Signer;
use sha2::{Digest, Sha256};

/// What the user key signs, before the device's signature key.
pub const BINDING_LABEL: &[u8] = b"canopy-msg device binding v1\0";
/// The length of an Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// The length of an encoded [`Binding`].
pub const BINDING_LEN: usize = 1 + PUBLIC_KEY_LEN + 64;

/// Why a device's binding to its user was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    /// The credential is not a basic credential.
    #[error("the credential is not a basic credential")]
    NotBasic,
    /// The identity bytes are not a binding.
    #[error("the credential carries no user binding ({0})")]
    Malformed(&'static str),
    /// The user's signature does not verify for this device key.
    #[error("the device is not signed by its claimed user {0}")]
    BadSignature(UserId),
    /// The user key could not sign.
    #[error("the user key cannot sign: {0}")]
    Sign(String),
}

/// A user id: the first 16 bytes of the SHA-256 of the user's public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct UserId(pub [u8; 16]);

impl UserId {
    /// The id of the user whose public key is `public`.
    pub fn of(public: &[u8]) -> UserId {
        let digest = Sha256::digest(public);
        UserId(digest[..16].try_into().expect("16 bytes"))
    }

    /// Reads 32 hex digits; `None` if `text` is anything else.
    pub fn parse(text: &str) -> Option<UserId> {
        if text.len() != 32 {
            return None;
        }
        let bytes = crate::engine::unhex(text)?;
        Some(UserId(bytes.try_into().ok()?))
    }

    /// Whether `text` has the form of a user id (so it can never be a contact name).
    pub fn looks_like(text: &str) -> bool {
        text.len() == 32 && text.bytes().all(|b| b.is_ascii_hexdigit())
    }

    /// The first 8 hex digits, for narrow displays.
    pub fn short(&self) -> String {
        crate::engine::hex(&self.0[..4])
    }
}

impl std::fmt::Display for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::engine::hex(&self.0))
    }
}

impl std::fmt::Debug for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UserId({self})")
    }
}

/// A device's binding to its user, as carried in its credential.
#[derive(Clone, PartialEq, Eq)]
pub struct Binding {
    /// The user's public key.
    pub user_key: [u8; PUBLIC_KEY_LEN],
    /// The user's signature over [`BINDING_LABEL`] ‖ the device's signature key.
    pub signature: [u8; 64],
}

impl std::fmt::Debug for Binding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Binding({})", self.user())
    }
}

fn signed_bytes(device_key: &[u8]) -> Vec<u8> {
    let mut out = BINDING_LABEL.to_vec();
    out.extend_from_slice(device_key);
    out
}

impl Binding {
    /// The user key `user` signs for the device whose signature public key is `device_key`.
    pub fn sign(user: &impl Signer, user_key: &[u8], device_key: &[u8]) -> Result<Binding, BindingError> {
        let user_key: [u8; PUBLIC_KEY_LEN] = user_key.try_into().map_err(|_| BindingError::Sign("the user key is not an Ed25519 key".into()))?;
        if user.signature_scheme() != SignatureScheme::ED25519 {
            return Err(BindingError::Sign("the user key is not an Ed25519 key".into()));
        }
        let signature = user.sign(&signed_bytes(device_key)).map_err(|e| BindingError::Sign(format!("{e:?}")))?;
        let signature = signature.try_into().map_err(|_| BindingError::Sign("not a 64-byte signature".into()))?;
        Ok(Binding { user_key, signature })
    }

    /// The user.
    pub fn user(&self) -> UserId {
        UserId::of(&self.user_key)
    }

    /// The identity bytes of a credential.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(BINDING_LEN);
        out.push(1);
        out.extend_from_slice(&self.user_key);
        out.extend_from_slice(&self.signature);
        out
    }

    /// Reads identity bytes. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Binding, BindingError> {
        match bytes.first() {
            None => return Err(BindingError::Malformed("empty")),
            Some(1) => {}
            Some(_) => return Err(BindingError::Malformed("unknown version")),
        }
        if bytes.len() != BINDING_LEN {
            return Err(BindingError::Malformed("wrong length"));
        }
        Ok(Binding {
            user_key: bytes[1..1 + PUBLIC_KEY_LEN].try_into().expect("32 bytes"),
            signature: bytes[1 + PUBLIC_KEY_LEN..].try_into().expect("64 bytes"),
        })
    }

    /// Checks that the user signed for the device whose signature key is `device_key`, and
    /// returns the user.
    pub fn verify(&self, crypto: &impl OpenMlsCrypto, device_key: &[u8]) -> Result<UserId, BindingError> {
        crypto
            .verify_signature(SignatureScheme::ED25519, &signed_bytes(device_key), &self.user_key, &self.signature)
            .map_err(|_| BindingError::BadSignature(self.user()))?;
        Ok(self.user())
    }

    /// A credential carrying this binding.
    pub fn credential(&self) -> Credential {
        BasicCredential::new(self.encode()).into()
    }
}

/// Checks a leaf's credential: it must carry a binding whose user signed `device_key`, the
/// leaf's signature key. Returns the user.
pub fn check(crypto: &impl OpenMlsCrypto, credential: &Credential, device_key: &[u8]) -> Result<UserId, BindingError> {
    let basic = BasicCredential::try_from(credential.clone()).map_err(|_| BindingError::NotBasic)?;
    Binding::decode(basic.identity())?.verify(crypto, device_key)
}

/// The user a credential claims, without checking it (for leaves checked when they joined).
pub fn claimed_user(credential: &Credential) -> Option<UserId> {
    let basic = BasicCredential::try_from(credential.clone()).ok()?;
    Some(Binding::decode(basic.identity()).ok()?.user())
}

#[cfg(test)]
mod tests {
    use super::*;
    use openmls_basic_credential::SignatureKeyPair;
    use openmls_rust_crypto::OpenMlsRustCrypto;
    use openmls_traits::OpenMlsProvider as _;

    #[test]
    fn a_binding_verifies_for_its_device_only() {
        let provider = OpenMlsRustCrypto::default();
        let user = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
        let device = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
        let other = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
        let binding = Binding::sign(&user, user.public(), device.public()).unwrap();
        let id = binding.verify(provider.crypto(), device.public()).unwrap();
        assert_eq!(id, UserId::of(user.public()));
        assert_eq!(id.to_string().len(), 32);
        assert_eq!(UserId::parse(&id.to_string()), Some(id));
        assert!(UserId::looks_like(&id.to_string()));
        assert_eq!(binding.verify(provider.crypto(), other.public()), Err(BindingError::BadSignature(id)));
        let decoded = Binding::decode(&binding.encode()).unwrap();
        assert_eq!(decoded, binding);
        assert_eq!(check(provider.crypto(), &binding.credential(), device.public()), Ok(id));

        // A binding that claims the user but was signed by someone else.
        let forged = Binding { user_key: binding.user_key, signature: Binding::sign(&other, other.public(), device.public()).unwrap().signature };
        assert_eq!(check(provider.crypto(), &forged.credential(), device.public()), Err(BindingError::BadSignature(id)));
        // Not a binding at all.
        let plain: Credential = BasicCredential::new(b"device".to_vec()).into();
        assert!(matches!(check(provider.crypto(), &plain, device.public()), Err(BindingError::Malformed(_))));
    }

    #[test]
    fn decoding_never_panics() {
        let bytes = Binding { user_key: [7; 32], signature: [9; 64] }.encode();
        for cut in 0..bytes.len() {
            assert!(Binding::decode(&bytes[..cut]).is_err());
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(Binding::decode(&long).is_err());
        let mut version = bytes;
        version[0] = 2;
        assert_eq!(Binding::decode(&version), Err(BindingError::Malformed("unknown version")));
        assert_eq!(UserId::parse("xyz"), None);
        assert_eq!(UserId::parse(&"g".repeat(32)), None);
    }
}
