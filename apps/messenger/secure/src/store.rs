//! Secure's sealed records on disk: a fjall keyspace whose batches are atomic, and durable
//! once synced.

use std::path::Path;

use canopy_msg_core::seal::Backend;

/// A [`Backend`] in a fjall database.
pub struct FjallBackend {
    db: fjall::Database,
    records: fjall::Keyspace,
}

impl FjallBackend {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<FjallBackend, String> {
        let db = fjall::Database::builder(dir).open().map_err(|e| format!("opening {}: {e}", dir.display()))?;
        let records = db.keyspace("sealed", fjall::KeyspaceCreateOptions::default).map_err(|e| e.to_string())?;
        Ok(FjallBackend { db, records })
    }
}

impl Backend for FjallBackend {
    fn load(&mut self) -> Result<Vec<(Vec<u8>, Vec<u8>)>, String> {
        let mut out = Vec::new();
        for kv in self.records.iter() {
            let (k, v) = kv.into_inner().map_err(|e| e.to_string())?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn apply(&mut self, puts: Vec<(Vec<u8>, Vec<u8>)>, deletes: Vec<Vec<u8>>) -> Result<(), String> {
        let mut batch = self.db.batch();
        for k in deletes {
            batch.remove(&self.records, k);
        }
        for (k, v) in puts {
            batch.insert(&self.records, k, v);
        }
        batch.commit().map_err(|e| e.to_string())
    }

    fn sync(&mut self) -> Result<(), String> {
        self.db.persist(fjall::PersistMode::SyncAll).map_err(|e| e.to_string())
    }
}

/// Writes `bytes` to a new file at `path` that only its owner can read (a backup), through a
/// temporary file and a rename, so a crash never leaves half a file under the name.
pub fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("partial");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// `restore`: opens the (fresh) state in `dir` with `key`, restores the backup `bytes` sealed
/// with `passphrase` into it, and closes it. A wrong passphrase or a damaged backup changes
/// nothing. Run while Secure is not.
pub fn restore(
    dir: &std::path::Path,
    key: canopy_msg_core::Key,
    org: canopy_msg_core::Org,
    bytes: &[u8],
    passphrase: &[u8],
) -> Result<(canopy_msg_core::backup::Restored, String), String> {
    let payload = canopy_msg_core::backup::open(passphrase, bytes).map_err(|e| e.to_string())?;
    let data: canopy_msg_core::backup::BackupData = serde_json::from_slice(&payload).map_err(|e| format!("the backup's contents: {e}"))?;
    let settings = data.settings.clone();
    let backend = FjallBackend::open(dir)?;
    let mut device = canopy_msg_core::Device::open(key, backend, org).map_err(|e| e.to_string())?;
    let restored = device.import_backup(data).map_err(|e| e.to_string())?;
    Ok((restored, settings))
}
