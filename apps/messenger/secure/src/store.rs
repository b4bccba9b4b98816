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
