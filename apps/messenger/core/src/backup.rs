//! Encrypted backups: a device's history, contacts, conversation state, its user's identity
//! and settings, sealed with a key derived from a passphrase.
//!
//! **What is in one.** The user's identity key pair (so a restored device is the same user);
//! the user's Bitcoin keys for pipelines; contacts and blocks; every group's record and history, with what was processed; read
//! markers, marks and pending messages; the home's settings. **What is not:** any MLS state.
//! Restoring epoch secrets would let a copy read what was sent after the backup, with keys
//! that were meant to be gone (forward secrecy), so a restored device is a **new device** of
//! the user: it shows the old history read-only, and reads anew only once it is added again
//! (by the user's other devices and the conversations' committers automatically, by the org
//! admin for teams).
//!
//! **File format** (integers big-endian):
//!
//! | size | field |
//! |---|---|
//! | 16 | magic `canopy-msg-bkup` and version `1` |
//! | 1 | KDF: `1` Argon2id |
//! | 4 ×3 | Argon2 memory (KiB), passes, lanes |
//! | 16 | salt |
//! | 24 + 32 | nonce, then XChaCha20-Poly1305 of a fixed check value: tells a wrong passphrase from a damaged file |
//! | 24 | nonce of the payload |
//! | … | XChaCha20-Poly1305 of the payload (JSON), to the end; the header is its associated data |

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

/// The first 16 bytes of every backup: the magic and the format version.
pub const MAGIC: &[u8; 16] = b"canopy-msg-bkup\x01";
const CHECK: &[u8; 16] = b"canopy-msg-check";
/// Argon2id memory for new backups, KiB (64 MiB).
pub const MEMORY_KIB: u32 = 64 * 1024;
/// Argon2id passes for new backups.
pub const PASSES: u32 = 3;
/// The most memory a backup may ask for, KiB (1 GiB): more is refused, not attempted.
pub const MAX_MEMORY_KIB: u32 = 1024 * 1024;
const HEADER: usize = 16 + 1 + 12 + 16 + 24 + 32 + 24;

/// Why a backup could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackupError {
    /// Not a backup at all.
    #[error("not a canopy-msg backup")]
    NotABackup,
    /// A version this code does not read.
    #[error("a backup of an unknown format version {0}")]
    Version(u8),
    /// Shorter than its header.
    #[error("the backup is truncated")]
    Truncated,
    /// The passphrase does not open it.
    #[error("wrong backup passphrase")]
    WrongPassphrase,
    /// The passphrase is right but the contents fail authentication.
    #[error("the backup is damaged or was tampered with")]
    Damaged,
    /// Key derivation parameters out of bounds, or derivation failed.
    #[error("backup key derivation: {0}")]
    Kdf(String),
}

fn derive(passphrase: &[u8], salt: &[u8], memory: u32, passes: u32, lanes: u32) -> Result<XChaCha20Poly1305, BackupError> {
    if memory > MAX_MEMORY_KIB || passes > 16 || lanes > 16 {
        return Err(BackupError::Kdf(format!("parameters out of bounds: {memory} KiB, {passes} passes, {lanes} lanes")));
    }
    let params = argon2::Params::new(memory, passes, lanes, Some(32)).map_err(|e| BackupError::Kdf(e.to_string()))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = [0u8; 32];
    argon.hash_password_into(passphrase, salt, &mut key).map_err(|e| BackupError::Kdf(e.to_string()))?;
    Ok(XChaCha20Poly1305::new((&key).into()))
}

/// Seals `payload` with a key derived from `passphrase` (Argon2id, [`MEMORY_KIB`], [`PASSES`]).
pub fn seal(passphrase: &[u8], payload: &[u8]) -> Result<Vec<u8>, BackupError> {
    seal_with(passphrase, payload, MEMORY_KIB, PASSES)
}

/// [`seal`] with chosen Argon2id memory (KiB) and passes.
pub fn seal_with(passphrase: &[u8], payload: &[u8], memory: u32, passes: u32) -> Result<Vec<u8>, BackupError> {
    let salt = crate::seal::Key::random_salt();
    let cipher = derive(passphrase, &salt, memory, passes, 1)?;
    let mut out = MAGIC.to_vec();
    out.push(1);
    for v in [memory, passes, 1] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(&salt);
    let check_nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    out.extend_from_slice(&check_nonce);
    out.extend_from_slice(&cipher.encrypt(&check_nonce, Payload { msg: CHECK, aad: MAGIC }).expect("encryption cannot fail"));
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    out.extend_from_slice(&nonce);
    debug_assert_eq!(out.len(), HEADER);
    let ct = cipher.encrypt(&nonce, Payload { msg: payload, aad: &out }).expect("encryption cannot fail");
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Opens a backup: the payload, or why not. Never panics.
pub fn open(passphrase: &[u8], bytes: &[u8]) -> Result<Vec<u8>, BackupError> {
    if bytes.len() < 16 || bytes[..15] != MAGIC[..15] {
        return Err(BackupError::NotABackup);
    }
    if bytes[15] != MAGIC[15] {
        return Err(BackupError::Version(bytes[15]));
    }
    if bytes.len() < HEADER + 16 {
        return Err(BackupError::Truncated);
    }
    if bytes[16] != 1 {
        return Err(BackupError::Kdf(format!("unknown key derivation {}", bytes[16])));
    }
    let u32_at = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    let (memory, passes, lanes) = (u32_at(17), u32_at(21), u32_at(25));
    let salt = &bytes[29..45];
    let cipher = derive(passphrase, salt, memory, passes, lanes)?;
    let check_nonce = XNonce::from_slice(&bytes[45..69]);
    match cipher.decrypt(check_nonce, Payload { msg: &bytes[69..101], aad: MAGIC }) {
        Ok(v) if v == CHECK => {}
        _ => return Err(BackupError::WrongPassphrase),
    }
    let nonce = XNonce::from_slice(&bytes[101..HEADER]);
    cipher.decrypt(nonce, Payload { msg: &bytes[HEADER..], aad: &bytes[..HEADER] }).map_err(|_| BackupError::Damaged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backup_opens_with_its_passphrase_only_and_any_damage_is_caught() {
        let sealed = seal_with(b"correct horse", b"the payload", 64, 1).unwrap();
        assert_eq!(open(b"correct horse", &sealed).unwrap(), b"the payload");
        assert_eq!(open(b"wrong", &sealed), Err(BackupError::WrongPassphrase));
        for cut in [0, 10, 16, HEADER, sealed.len() - 1] {
            assert!(open(b"correct horse", &sealed[..cut]).is_err(), "cut at {cut}");
        }
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(open(b"correct horse", &tampered), Err(BackupError::Damaged));
        let mut salt = sealed.clone();
        salt[30] ^= 1;
        assert_eq!(open(b"correct horse", &salt), Err(BackupError::WrongPassphrase), "a changed salt derives another key");
        let mut greedy = sealed.clone();
        greedy[17..21].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(open(b"correct horse", &greedy), Err(BackupError::Kdf(_))), "never attempted");
        let mut version = sealed;
        version[15] = 9;
        assert_eq!(open(b"correct horse", &version), Err(BackupError::Version(9)));
        assert_eq!(open(b"x", b"hello"), Err(BackupError::NotABackup));
    }
}

/// What a backup holds, before it is sealed.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BackupData {
    /// The org the device belonged to: `(origin, org)`.
    pub org: (u32, u32),
    /// The user's identity key pair, serialized.
    pub user_key_pair: Vec<u8>,
    /// Contacts and blocks.
    pub contacts: Vec<(crate::identity::UserId, crate::contacts::Contact)>,
    /// Every group's record, this device's id in it, its history and what was processed.
    pub groups: Vec<BackupGroup>,
    /// Read markers, by chat.
    pub read_up_to: std::collections::BTreeMap<String, u64>,
    /// Marked messages.
    pub marked: Vec<(crate::names::Gid, u16, crate::payload::MsgRef)>,
    /// Direct messages waiting for their peers' key packages.
    pub pending: Vec<(crate::identity::UserId, u64, crate::payload::Message)>,
    /// The home's settings, as the UI gave them (its configuration file).
    pub settings: String,
    /// The user's other secrets by name: the Bitcoin keys pipelines sign with. Without them
    /// a restored device could not spend what its multisig pipelines hold. (Absent from
    /// backups written before pipelines; restoring those brings none.)
    #[serde(default)]
    pub secrets: Vec<(String, Vec<u8>)>,
}

/// One group in a backup.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BackupGroup {
    /// Which group.
    pub gid: crate::names::Gid,
    /// Its record ([`crate::engine::Record::encode`]).
    pub record: Vec<u8>,
    /// This device's id in it.
    pub device: u32,
    /// Its messages, by channel.
    pub history: Vec<(u16, crate::device::Stored)>,
    /// Message keys processed or refused.
    pub done: Vec<(u16, u32, u32)>,
}

/// What a restore brought back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Restored {
    /// Groups.
    pub groups: usize,
    /// Messages.
    pub messages: usize,
    /// Contacts.
    pub contacts: usize,
}

impl<B: crate::seal::Backend> crate::device::Device<B> {
    /// Everything a backup holds of this device, with `settings` (the home's configuration).
    pub fn export_backup(&self, settings: &str) -> BackupData {
        let groups = self
            .groups
            .iter()
            .map(|(g, t)| BackupGroup {
                gid: *g,
                record: t.record.encode(),
                device: t.meta.device,
                history: t.history.iter().flat_map(|(c, h)| h.values().map(move |s| (*c, s.clone()))).collect(),
                done: t.done.iter().copied().collect(),
            })
            .collect();
        BackupData {
            org: (self.org.origin(), self.org.org()),
            user_key_pair: self.engine.user_key_pair(),
            contacts: self.contacts.iter().map(|(u, c)| (*u, c.clone())).collect(),
            groups,
            read_up_to: self.read_up_to.clone(),
            marked: self.marked.iter().copied().collect(),
            pending: self.pending.iter().flat_map(|(u, q)| q.iter().map(move |(s, m)| (*u, *s, m.clone()))).collect(),
            settings: settings.to_string(),
            secrets: self.secrets.iter().map(|(n, v)| (n.clone(), v.clone())).collect(),
        }
    }

    /// Restores a backup into this device, which must be fresh (no groups, no contacts): it
    /// takes on the backup's user, and keeps every group's history read-only until it is
    /// added again. Everything is written as one batch.
    pub fn import_backup(&mut self, data: BackupData) -> Result<Restored, crate::MlsError> {
        use crate::MlsError;
        if !self.groups.is_empty() || self.contacts.iter().next().is_some() {
            return Err(MlsError::BadName("restore needs a fresh home: this device has conversations or contacts already".into()));
        }
        if data.org != (self.org.origin(), self.org.org()) {
            return Err(MlsError::BadName(format!(
                "this backup is of org {} (origin {:06x}); init the home with the same --domain and --org",
                data.org.1, data.org.0
            )));
        }
        let bad = |what: &str| MlsError::Malformed { what: "backup", detail: what.to_string() };
        // Everything is checked before anything is written.
        let mut records = Vec::with_capacity(data.groups.len());
        for bg in &data.groups {
            let record = crate::engine::Record::decode(&bg.record).map_err(|_| bad("a group record"))?;
            if record.gid() != bg.gid {
                return Err(bad("a group record of another group"));
            }
            records.push(record);
        }
        self.engine.adopt_user(&data.user_key_pair)?;
        let mut restored = Restored { contacts: data.contacts.len(), ..Restored::default() };
        for (user, contact) in data.contacts {
            self.engine.vault.put(format!("c/{user}").as_bytes(), &serde_json::to_vec(&contact).expect("serializable"));
            self.contacts.set(user, contact);
        }
        for (bg, record) in data.groups.into_iter().zip(records) {
            let meta = crate::device::GroupMeta { device: bg.device, removed: true, ..Default::default() };
            self.engine.vault.put(&crate::device::group_key(bg.gid), &serde_json::to_vec(&meta).expect("serializable"));
            self.engine.vault.put(format!("rec/{}", bg.gid).as_bytes(), &bg.record);
            let mut group = crate::device::Group::new(record, 0, meta);
            for (c, d, m) in bg.done {
                self.engine.vault.put(format!("d/{}/{c}/{d}/{m}", bg.gid).as_bytes(), b"");
                group.done.insert((c, d, m));
            }
            for (c, stored) in bg.history {
                self.next_seq = self.next_seq.max(stored.seq + 1);
                let key = format!("h/{}/{c}/{}/{}", bg.gid, stored.id.device, stored.id.msg);
                self.engine.vault.put(key.as_bytes(), &serde_json::to_vec(&stored).expect("serializable"));
                group.done.insert((c, stored.id.device, stored.id.msg));
                group.history.entry(c).or_default().insert(stored.id, stored);
                restored.messages += 1;
            }
            self.groups.insert(bg.gid, group);
            restored.groups += 1;
        }
        for (chat, seq) in data.read_up_to {
            self.engine.vault.put(format!("r/{chat}").as_bytes(), seq.to_string().as_bytes());
            self.read_up_to.insert(chat, seq);
        }
        for (g, c, id) in data.marked {
            self.engine.vault.put(format!("m/{g}/{c}/{}/{}", id.device, id.msg).as_bytes(), b"");
            self.marked.insert((g, c, id));
        }
        for (user, seq, message) in data.pending {
            self.engine.vault.put(&crate::device::pending_key(&user, seq), &serde_json::to_vec(&message).expect("serializable"));
            self.pending.entry(user).or_default().push((seq, message));
        }
        for (name, value) in data.secrets {
            self.engine.vault.put(format!("sk/{name}").as_bytes(), &value);
            self.secrets.insert(name, value);
        }
        self.engine.persist()?;
        Ok(restored)
    }
}
