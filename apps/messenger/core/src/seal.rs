//! Encryption at rest: everything Secure and the member plugin persist goes through a
//! [`Vault`], which seals each record with XChaCha20-Poly1305 under a [`Key`].
//!
//! The stock openmls storage providers keep key material in the clear, so MLS state is kept
//! in openmls' in-memory map ([`MemoryStorage`]) while a process runs, and the vault persists
//! it sealed: after each operation, [`Vault::stage_mls`] works out which entries changed and
//! [`Vault::commit`] writes them, together with the application's own records, as one batch.
//! A crash therefore never persists half an operation.
//!
//! Each record is `nonce (24 bytes) ‖ ciphertext ‖ tag (16 bytes)`; the associated data is
//! the record's key, so a sealed value cannot be moved to another key. Keys themselves are
//! stored in the clear: they are openmls storage labels with group ids, and the
//! application's own labels (team numbers, message ids), which the names on the relay
//! already reveal.

use std::collections::HashMap;

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use openmls_memory_storage::MemoryStorage;

/// Why sealed state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The key does not open the vault: a wrong passphrase or key file.
    #[error("wrong passphrase or key: the state cannot be decrypted")]
    WrongKey,
    /// A record failed authentication although the key is right: the state was tampered
    /// with or damaged.
    #[error("the sealed record {0:?} is damaged")]
    Damaged(String),
    /// The key could not be derived.
    #[error("cannot derive the key: {0}")]
    Kdf(String),
    /// The backend failed.
    #[error("storage: {0}")]
    Backend(String),
}

/// A 256-bit key that seals records. Zeroed on drop.
#[derive(Clone, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(…)")
    }
}

impl Key {
    /// A fresh random key (for a key file).
    pub fn random() -> Key {
        Key(XChaCha20Poly1305::generate_key(&mut OsRng).into())
    }

    /// The key's bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Key {
        Key(bytes)
    }

    /// The key's bytes, for writing a key file.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    /// A fresh random salt for [`Key::from_passphrase`].
    pub fn random_salt() -> [u8; 16] {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let mut salt = [0u8; 16];
        salt.copy_from_slice(&nonce[..16]);
        salt
    }

    /// Derives a key from a passphrase with Argon2id (19 MiB, 2 passes, 1 lane: OWASP's
    /// recommended minimum), so each guess costs an attacker real memory and time.
    pub fn from_passphrase(passphrase: &[u8], salt: &[u8; 16]) -> Result<Key, SealError> {
        let params = argon2::Params::new(19 * 1024, 2, 1, Some(32)).map_err(|e| SealError::Kdf(e.to_string()))?;
        let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = [0u8; 32];
        argon.hash_password_into(passphrase, salt, &mut out).map_err(|e| SealError::Kdf(e.to_string()))?;
        Ok(Key(out))
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.0).into())
    }

    /// Seals `value` for the record `key`.
    pub fn seal(&self, key: &[u8], value: &[u8]) -> Vec<u8> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ct = self.cipher().encrypt(&nonce, Payload { msg: value, aad: key }).expect("XChaCha20-Poly1305 encryption cannot fail");
        let mut out = Vec::with_capacity(24 + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Opens a record sealed for `key`; `None` if it does not authenticate.
    pub fn open(&self, key: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < 24 + 16 {
            return None;
        }
        let (nonce, ct) = sealed.split_at(24);
        self.cipher().decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: key }).ok()
    }
}

/// Key/value records, as a backend loads them.
pub type Records = Vec<(Vec<u8>, Vec<u8>)>;

/// Where sealed records are kept: a narrow key/value interface, so the same vault runs over
/// a file database in Secure and over the plugin key/value store in the member plugin.
pub trait Backend {
    /// Every record.
    fn load(&mut self) -> Result<Records, String>;
    /// Writes `puts` and removes `deletes`, all or nothing, in order after every earlier
    /// batch. Durable only once [`sync`](Backend::sync) returns.
    fn apply(&mut self, puts: Vec<(Vec<u8>, Vec<u8>)>, deletes: Vec<Vec<u8>>) -> Result<(), String>;
    /// Makes every batch applied so far durable (a backend whose batches are durable as
    /// they are applied does nothing).
    fn sync(&mut self) -> Result<(), String>;
}

/// A backend in memory, for tests and tools.
#[derive(Debug, Default, Clone)]
pub struct MemoryBackend {
    /// The records, sealed.
    pub records: std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Backend for MemoryBackend {
    fn load(&mut self) -> Result<Vec<(Vec<u8>, Vec<u8>)>, String> {
        Ok(self.records.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }
    fn apply(&mut self, puts: Vec<(Vec<u8>, Vec<u8>)>, deletes: Vec<Vec<u8>>) -> Result<(), String> {
        for k in deletes {
            self.records.remove(&k);
        }
        self.records.extend(puts);
        Ok(())
    }
    fn sync(&mut self) -> Result<(), String> {
        Ok(())
    }
}

const CHECK_KEY: &[u8] = b"vault-check";
const CHECK_VALUE: &[u8] = b"canopy-msg vault v1";
const MLS_PREFIX: &[u8] = b"m/";
const APP_PREFIX: &[u8] = b"a/";

/// Sealed, batched persistence of MLS state and application records.
pub struct Vault<B: Backend> {
    key: Key,
    backend: B,
    /// Every MLS entry as last written, to find what an operation changed. A copy, not a
    /// digest: comparing bytes costs a memcmp where hashing every entry after every
    /// operation cost a SHA-256 pass over the whole state, and a copy cannot collide.
    mls_saved: HashMap<Vec<u8>, Vec<u8>>,
    puts: Vec<(Vec<u8>, Vec<u8>)>,
    deletes: Vec<Vec<u8>>,
    /// Batches written since the last sync.
    unsynced: bool,
}

/// What a vault held when it was opened.
#[derive(Debug, Default)]
pub struct Contents {
    /// openmls storage entries, to load into a [`MemoryStorage`].
    pub mls: HashMap<Vec<u8>, Vec<u8>>,
    /// The application's records, by key (without the vault's prefix).
    pub app: std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
}

impl<B: Backend> Vault<B> {
    /// Opens (or, if empty, creates) the vault in `backend` with `key`. Fails with
    /// [`SealError::WrongKey`] if the key does not open it.
    pub fn open(key: Key, mut backend: B) -> Result<(Vault<B>, Contents), SealError> {
        let records = backend.load().map_err(SealError::Backend)?;
        let mut contents = Contents::default();
        let mut mls_saved = HashMap::new();
        let check = records.iter().find(|(k, _)| k == CHECK_KEY);
        match check {
            Some((_, v)) if key.open(CHECK_KEY, v).as_deref() == Some(CHECK_VALUE) => {}
            Some(_) => return Err(SealError::WrongKey),
            None if records.is_empty() => {
                backend.apply(vec![(CHECK_KEY.to_vec(), key.seal(CHECK_KEY, CHECK_VALUE))], vec![]).map_err(SealError::Backend)?;
            }
            None => return Err(SealError::Damaged("vault-check".into())),
        }
        for (k, v) in records {
            if k == CHECK_KEY {
                continue;
            }
            let value = key.open(&k, &v).ok_or_else(|| SealError::Damaged(String::from_utf8_lossy(&k).into_owned()))?;
            if let Some(rest) = k.strip_prefix(MLS_PREFIX) {
                mls_saved.insert(rest.to_vec(), value.clone());
                contents.mls.insert(rest.to_vec(), value);
            } else if let Some(rest) = k.strip_prefix(APP_PREFIX) {
                contents.app.insert(rest.to_vec(), value);
            }
        }
        Ok((Vault { key, backend, mls_saved, puts: Vec::new(), deletes: Vec::new(), unsynced: false }, contents))
    }

    /// Stages every change to the MLS entries since the last commit.
    pub fn stage_mls(&mut self, storage: &MemoryStorage) {
        let values = storage.values.read().expect("openmls storage lock");
        for (k, v) in values.iter() {
            if self.mls_saved.get(k) != Some(v) {
                let key = [MLS_PREFIX, k].concat();
                self.puts.push((key.clone(), self.key.seal(&key, v)));
                self.mls_saved.insert(k.clone(), v.clone());
            }
        }
        let gone: Vec<Vec<u8>> = self.mls_saved.keys().filter(|k| !values.contains_key(*k)).cloned().collect();
        for k in gone {
            self.mls_saved.remove(&k);
            self.deletes.push([MLS_PREFIX, &k].concat());
        }
    }

    /// Stages writing an application record.
    pub fn put(&mut self, key: &[u8], value: &[u8]) {
        let key = [APP_PREFIX, key].concat();
        let sealed = self.key.seal(&key, value);
        self.puts.push((key, sealed));
    }

    /// Stages removing an application record.
    pub fn delete(&mut self, key: &[u8]) {
        self.deletes.push([APP_PREFIX, key].concat());
    }

    /// Writes everything staged as one batch, durably.
    pub fn commit(&mut self) -> Result<(), SealError> {
        self.write()?;
        // Also syncs a batch an earlier `write` left unsynced, even if this one was empty.
        self.sync()
    }

    /// Writes everything staged as one batch, not yet durably: a crash before the next
    /// [`sync`](Self::sync) may lose it, never only part of it. Says whether there was
    /// anything to write.
    pub fn write(&mut self) -> Result<bool, SealError> {
        if self.puts.is_empty() && self.deletes.is_empty() {
            return Ok(false);
        }
        let puts = std::mem::take(&mut self.puts);
        let deletes = std::mem::take(&mut self.deletes);
        self.backend.apply(puts, deletes).map_err(SealError::Backend)?;
        self.unsynced = true;
        Ok(true)
    }

    /// Makes every batch written so far durable.
    pub fn sync(&mut self) -> Result<(), SealError> {
        if self.unsynced {
            // Cleared only once the sync succeeded, so a failed one is tried again.
            self.backend.sync().map_err(SealError::Backend)?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// Drops everything staged since the last commit. MLS entries already staged are
    /// forgotten too, so the next [`stage_mls`](Self::stage_mls) compares against what
    /// was last written.
    pub fn rollback(&mut self) {
        for (k, _) in self.puts.drain(..) {
            if let Some(rest) = k.strip_prefix(MLS_PREFIX) {
                self.mls_saved.remove(rest);
            }
        }
        self.deletes.clear();
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_sealed_and_bound_to_their_keys() {
        let key = Key::random();
        let sealed = key.seal(b"a", b"secret");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(key.open(b"a", &sealed).unwrap(), b"secret");
        assert_eq!(key.open(b"b", &sealed), None);
        assert_eq!(Key::random().open(b"a", &sealed), None);
    }

    /// A memory backend that counts syncs and fails the first `failing` of them.
    #[derive(Default)]
    struct Flaky {
        inner: MemoryBackend,
        failing: usize,
        synced: usize,
    }

    impl Backend for Flaky {
        fn load(&mut self) -> Result<Records, String> {
            self.inner.load()
        }
        fn apply(&mut self, puts: Vec<(Vec<u8>, Vec<u8>)>, deletes: Vec<Vec<u8>>) -> Result<(), String> {
            self.inner.apply(puts, deletes)
        }
        fn sync(&mut self) -> Result<(), String> {
            if self.failing > 0 {
                self.failing -= 1;
                return Err("disk gone".into());
            }
            self.synced += 1;
            Ok(())
        }
    }

    #[test]
    fn a_written_batch_is_synced_later_and_a_failed_sync_is_tried_again() {
        let (mut vault, _) = Vault::open(Key::random(), Flaky { failing: 1, ..Flaky::default() }).unwrap();
        vault.put(b"received", b"1");
        assert!(vault.write().unwrap());
        assert_eq!(vault.backend().synced, 0, "write does not sync");
        assert!(vault.sync().is_err());
        vault.sync().unwrap();
        assert_eq!(vault.backend().synced, 1, "the failed sync was tried again");
        vault.sync().unwrap();
        assert_eq!(vault.backend().synced, 1, "nothing left to sync");
        // A commit with nothing staged still syncs what an earlier write left unsynced.
        vault.put(b"received", b"2");
        vault.write().unwrap();
        vault.commit().unwrap();
        assert_eq!(vault.backend().synced, 2);
    }

    #[test]
    fn a_vault_persists_changes_and_refuses_a_wrong_key() {
        let key = Key::from_passphrase(b"correct horse", &[7; 16]).unwrap();
        let (mut vault, contents) = Vault::open(key.clone(), MemoryBackend::default()).unwrap();
        assert!(contents.mls.is_empty());
        let storage = MemoryStorage::default();
        storage.values.write().unwrap().insert(b"k1".to_vec(), b"v1".to_vec());
        storage.values.write().unwrap().insert(b"k2".to_vec(), b"v2".to_vec());
        vault.stage_mls(&storage);
        vault.put(b"history/1", b"hello there");
        vault.commit().unwrap();
        storage.values.write().unwrap().remove(b"k1".as_slice());
        storage.values.write().unwrap().insert(b"k2".to_vec(), b"v2'".to_vec());
        vault.stage_mls(&storage);
        vault.commit().unwrap();
        let backend = vault.backend().clone();
        assert!(backend.records.values().all(|v| !v.windows(5).any(|w| w == b"hello")));

        let (_, contents) = Vault::open(key, backend.clone()).unwrap();
        assert_eq!(contents.mls.len(), 1);
        assert_eq!(contents.mls[b"k2".as_slice()], b"v2'");
        assert_eq!(contents.app[b"history/1".as_slice()], b"hello there");

        let wrong = Key::from_passphrase(b"wrong", &[7; 16]).unwrap();
        assert!(matches!(Vault::open(wrong, backend), Err(SealError::WrongKey)));
    }
}
