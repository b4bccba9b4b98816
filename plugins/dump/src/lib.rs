//! `dump`: export a subtree of the chunk space to files, and import it again.
//!
//! ```text
//! canopy plugin run dump.wasm --relay … --ca … --dir DIR -- dump FILTER DIR [--force]
//! canopy plugin run dump.wasm --relay … --ca … --dir DIR -- undump DIR
//! ```
//!
//! `dump` writes every chunk under FILTER to `DIR/<name>.chunk`, one file per chunk: the
//! 8-byte magic `CNPYCHK1`, the 16-byte name, the 8-byte expiry (unix ms, big-endian), then
//! the data. It creates DIR if it does not exist (its parent must be granted, or DIR itself)
//! and refuses a non-empty DIR unless given `--force`. `undump` publishes every
//! chunk file in DIR back, skipping expired ones, and reports what it did.

use std::collections::HashSet;
use std::fs;
use std::path::PathBuf;

use canopy_plugin::{Chunk, Config, Filter, Level, Name, Plugin};

const MAGIC: &[u8; 8] = b"CNPYCHK1";
const HEADER: usize = 8 + 16 + 8;
const NEXT_BATCH: u64 = 0;
/// Files published per timer callback, well inside the per-callback publish allowance.
const BATCH: usize = 256;

enum Dump {
    Export { filter: Filter, dir: PathBuf, written: HashSet<Name>, failed: u64 },
    Import { pending: Vec<PathBuf>, published: u64, expired: u64, unreadable: u64 },
}

fn encode(chunk: &Chunk) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER + chunk.data.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&chunk.name.0.to_be_bytes());
    bytes.extend_from_slice(&chunk.expiry_ms.to_be_bytes());
    bytes.extend_from_slice(&chunk.data);
    bytes
}

fn decode(bytes: &[u8]) -> Result<Chunk, String> {
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err("not a chunk file".into());
    }
    let name = Name(u128::from_be_bytes(bytes[8..24].try_into().expect("16 bytes")));
    let expiry_ms = u64::from_be_bytes(bytes[24..32].try_into().expect("8 bytes"));
    Ok(Chunk { name, expiry_ms, data: bytes[HEADER..].to_vec() })
}

fn entries(dir: &PathBuf) -> Result<Vec<PathBuf>, String> {
    let read = fs::read_dir(dir).map_err(|e| format!("cannot read {} (was it granted with --dir?): {e}", dir.display()))?;
    let mut paths: Vec<PathBuf> = read.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    Ok(paths)
}

impl Plugin for Dump {
    fn init(config: Config) -> Result<Self, String> {
        let args = config.args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match args.as_slice() {
            ["dump", filter, dir, rest @ ..] => {
                let force = match rest {
                    [] => false,
                    ["--force"] => true,
                    other => return Err(format!("unexpected {other:?}; usage: dump FILTER DIR [--force]")),
                };
                let filter: Filter = filter.parse()?;
                let dir = PathBuf::from(dir);
                if fs::metadata(&dir).is_err() {
                    fs::create_dir_all(&dir).map_err(|e| {
                        format!("cannot create {} (was it or its parent granted with --dir?): {e}", dir.display())
                    })?;
                }
                let present = entries(&dir)?;
                if !present.is_empty() && !force {
                    return Err(format!(
                        "{} is not empty ({} entries); dump into an empty directory or pass --force",
                        dir.display(),
                        present.len()
                    ));
                }
                canopy_plugin::subscribe(filter)?;
                Ok(Dump::Export { filter, dir, written: HashSet::new(), failed: 0 })
            }
            ["undump", dir] => {
                let mut pending = entries(&PathBuf::from(dir))?;
                pending.retain(|p| p.extension().is_some_and(|e| e == "chunk"));
                pending.reverse();
                canopy_plugin::set_timer(NEXT_BATCH, 0);
                Ok(Dump::Import { pending, published: 0, expired: 0, unreadable: 0 })
            }
            _ => Err("usage: dump FILTER DIR [--force] | undump DIR".into()),
        }
    }

    fn on_chunks(&mut self, chunks: Vec<Chunk>) {
        let Dump::Export { filter, dir, written, failed } = self else { return };
        // A chunk delivered twice (the tool resubscribed after falling behind) is written once.
        for chunk in &chunks {
            if !filter.matches(chunk.name) || written.contains(&chunk.name) {
                continue;
            }
            let path = dir.join(format!("{}.chunk", chunk.name));
            match fs::write(&path, encode(chunk)) {
                Ok(()) => {
                    written.insert(chunk.name);
                }
                Err(err) => {
                    *failed += 1;
                    canopy_plugin::log(Level::Error, &format!("writing {}: {err}", path.display()));
                }
            }
        }
    }

    fn on_timer(&mut self, _id: u64) {
        let Dump::Import { pending, published, expired, unreadable } = self else { return };
        let now = canopy_plugin::now_ms();
        for _ in 0..BATCH {
            let Some(path) = pending.pop() else { break };
            let chunk = fs::read(&path).map_err(|e| e.to_string()).and_then(|b| decode(&b));
            match chunk {
                Ok(chunk) if chunk.expiry_ms <= now => *expired += 1,
                Ok(chunk) => match canopy_plugin::publish(&chunk) {
                    Ok(()) => *published += 1,
                    Err(err) => {
                        *unreadable += 1;
                        canopy_plugin::log(Level::Warn, &format!("{}: {err}", path.display()));
                    }
                },
                Err(err) => {
                    *unreadable += 1;
                    canopy_plugin::log(Level::Warn, &format!("{}: {err}", path.display()));
                }
            }
        }
        if !pending.is_empty() {
            canopy_plugin::set_timer(NEXT_BATCH, 0);
        }
    }

    fn on_command(&mut self, _args: Vec<String>) -> Result<String, String> {
        match self {
            Dump::Export { filter, dir, written, failed: 0 } => {
                Ok(format!("dumped {} chunks under {filter} to {}", written.len(), dir.display()))
            }
            Dump::Export { written, failed, .. } => {
                Err(format!("dumped {} chunks, {failed} could not be written", written.len()))
            }
            Dump::Import { published, expired, unreadable, .. } => Ok(format!(
                "published {published} chunks, skipped {expired} expired, {unreadable} unreadable"
            )),
        }
    }
}

canopy_plugin::export!(Dump);
