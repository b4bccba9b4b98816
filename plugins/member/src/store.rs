//! The committer's sealed records, kept in the plugin key/value store.
//!
//! The store caps a value at [`VALUE_CAP`] bytes (`MAX_VALUE` in
//! `framework/src/plugin/state.rs`), and a large team's MLS state (its ratchet tree above
//! all) is larger than that. [`SplitBackend`] therefore keeps each record under a small
//! *head* and, when it does not fit in one value, splits it into *pieces*:
//!
//! | kv key | kv value |
//! |---|---|
//! | `r` ‖ K | `0x00` ‖ the whole record value (it fits) |
//! | `r` ‖ K | `0x01` ‖ piece count (u32 BE) ‖ total length (u32 BE) |
//! | `p` ‖ len(K) (u16 BE) ‖ K ‖ piece index (u32 BE) | bytes `index × VALUE_CAP ..` of the record value |
//!
//! The key's length in a piece's key keeps two records' pieces apart even when one key is a
//! prefix of another. Writing a record whose new value needs fewer pieces than the old one
//! removes the surplus, and deleting a record removes its head and every piece.
//!
//! The values written here are already sealed by the vault (`canopy_msg_core::seal`): this
//! layer only splits bytes. A callback's writes are all-or-nothing (the host applies them
//! when the callback returns normally and drops them when it traps), so a batch is checked
//! before anything is written, and a write the host refuses anyway traps
//! ([`PluginKv`]), which discards the half-written batch with everything else the callback
//! did.

use std::collections::BTreeMap;

use canopy_msg_core::seal::Backend;

/// The largest value the plugin key/value store takes, in bytes.
pub const VALUE_CAP: usize = 64 * 1024;
/// The longest key it takes, in bytes.
pub const KEY_CAP: usize = 1024;
/// The longest record key this layer can keep: a piece's key adds 7 bytes.
pub const MAX_RECORD_KEY: usize = KEY_CAP - 7;
/// The largest record: its length is written in 32 bits.
pub const MAX_RECORD: usize = u32::MAX as usize;

const HEAD: u8 = b'r';
const PIECE: u8 = b'p';
const INLINE: u8 = 0;
const SPLIT: u8 = 1;

/// The narrow key/value interface the split backend needs: the plugin store's, so it can run
/// over an in-memory map in host tests.
pub trait Kv {
    /// The value of `key`.
    fn get(&self, key: &[u8]) -> Option<Vec<u8>>;
    /// Writes `key`.
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), String>;
    /// Deletes `key`.
    fn delete(&mut self, key: &[u8]);
    /// Every entry whose key starts with `prefix`, in key order.
    fn scan(&self, prefix: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)>;
}

/// The plugin's own key/value store (`canopy_plugin::kv`).
#[derive(Debug, Default, Clone, Copy)]
pub struct PluginKv;

impl Kv for PluginKv {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        canopy_plugin::kv::get(key)
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), String> {
        // Sizes are checked before a batch starts, so a refusal here is the host's own
        // failure, in the middle of a batch: trap, so the host drops every write this
        // callback made rather than keep half a batch.
        if let Err(err) = canopy_plugin::kv::put(key, value) {
            panic!("the plugin key/value store refused a write in the middle of a batch: {err}");
        }
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) {
        canopy_plugin::kv::delete(key)
    }

    fn scan(&self, prefix: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        canopy_plugin::kv::scan_all(prefix).collect()
    }
}

/// An in-memory [`Kv`] with the plugin store's caps, for tests.
#[derive(Debug, Default, Clone)]
pub struct MemoryKv {
    /// The entries.
    pub map: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Kv for MemoryKv {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.map.get(key).cloned()
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), String> {
        if key.len() > KEY_CAP {
            return Err(format!("key of {} bytes; the limit is {KEY_CAP}", key.len()));
        }
        if value.len() > VALUE_CAP {
            return Err(format!("value of {} bytes; the limit is {VALUE_CAP}", value.len()));
        }
        self.map.insert(key.to_vec(), value.to_vec());
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) {
        self.map.remove(key);
    }

    fn scan(&self, prefix: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.map
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// A [`Backend`] over a [`Kv`] whose values are capped: records larger than a value are
/// split into pieces (see the [module](self) documentation).
#[derive(Debug, Default, Clone)]
pub struct SplitBackend<K: Kv> {
    kv: K,
}

/// How a record is laid out, as its head says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Inline,
    Split { pieces: u32, total: u32 },
}

fn head_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(HEAD);
    k.extend_from_slice(key);
    k
}

fn piece_key(key: &[u8], index: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(7 + key.len());
    k.push(PIECE);
    k.extend_from_slice(&(key.len() as u16).to_be_bytes());
    k.extend_from_slice(key);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

fn layout(head: &[u8]) -> Result<Layout, String> {
    match head.split_first() {
        Some((&INLINE, _)) => Ok(Layout::Inline),
        Some((&SPLIT, rest)) if rest.len() == 8 => Ok(Layout::Split {
            pieces: u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")),
            total: u32::from_be_bytes(rest[4..].try_into().expect("4 bytes")),
        }),
        _ => Err("a record head is malformed".to_string()),
    }
}

impl<K: Kv> SplitBackend<K> {
    /// A backend over `kv`.
    pub fn new(kv: K) -> Self {
        SplitBackend { kv }
    }

    /// The key/value store underneath.
    pub fn kv(&self) -> &K {
        &self.kv
    }

    /// How many pieces the record `key` has now (0 if it is inline or absent).
    fn pieces_of(&self, key: &[u8]) -> Result<u32, String> {
        match self.kv.get(&head_key(key)) {
            None => Ok(0),
            Some(head) => match layout(&head)? {
                Layout::Inline => Ok(0),
                Layout::Split { pieces, .. } => Ok(pieces),
            },
        }
    }

    fn remove(&mut self, key: &[u8]) -> Result<(), String> {
        for index in 0..self.pieces_of(key)? {
            self.kv.delete(&piece_key(key, index));
        }
        self.kv.delete(&head_key(key));
        Ok(())
    }

    fn write(&mut self, key: &[u8], value: &[u8]) -> Result<(), String> {
        let old = self.pieces_of(key)?;
        let new = if value.len() < VALUE_CAP {
            let mut head = Vec::with_capacity(1 + value.len());
            head.push(INLINE);
            head.extend_from_slice(value);
            self.kv.put(&head_key(key), &head)?;
            0
        } else {
            let pieces = value.len().div_ceil(VALUE_CAP) as u32;
            for (index, piece) in value.chunks(VALUE_CAP).enumerate() {
                self.kv.put(&piece_key(key, index as u32), piece)?;
            }
            let mut head = vec![SPLIT];
            head.extend_from_slice(&pieces.to_be_bytes());
            head.extend_from_slice(&(value.len() as u32).to_be_bytes());
            self.kv.put(&head_key(key), &head)?;
            pieces
        };
        for index in new..old {
            self.kv.delete(&piece_key(key, index));
        }
        Ok(())
    }

    fn read(&self, key: &[u8], head: &[u8]) -> Result<Vec<u8>, String> {
        let damaged = |what: String| format!("the state is damaged: record {:?} {what}", String::from_utf8_lossy(key));
        match layout(head).map_err(&damaged)? {
            Layout::Inline => Ok(head[1..].to_vec()),
            Layout::Split { pieces, total } => {
                let mut value = Vec::with_capacity(total as usize);
                for index in 0..pieces {
                    let piece = self
                        .kv
                        .get(&piece_key(key, index))
                        .ok_or_else(|| damaged(format!("lacks piece {index} of {pieces}")))?;
                    value.extend_from_slice(&piece);
                }
                if value.len() != total as usize {
                    return Err(damaged(format!("has {} bytes in its pieces, not {total}", value.len())));
                }
                Ok(value)
            }
        }
    }
}

impl<K: Kv> Backend for SplitBackend<K> {
    fn load(&mut self) -> Result<Vec<(Vec<u8>, Vec<u8>)>, String> {
        self.kv
            .scan(&[HEAD])
            .into_iter()
            .map(|(k, head)| {
                let key = k[1..].to_vec();
                let value = self.read(&key, &head)?;
                Ok((key, value))
            })
            .collect()
    }

    fn apply(&mut self, puts: Vec<(Vec<u8>, Vec<u8>)>, deletes: Vec<Vec<u8>>) -> Result<(), String> {
        // Check the whole batch first: nothing is written unless all of it can be.
        for key in deletes.iter().chain(puts.iter().map(|(k, _)| k)) {
            if key.len() > MAX_RECORD_KEY {
                return Err(format!(
                    "a record key of {} bytes is longer than the {MAX_RECORD_KEY}-byte limit",
                    key.len()
                ));
            }
        }
        if let Some((key, value)) = puts.iter().find(|(_, v)| u32::try_from(v.len()).is_err()) {
            return Err(format!("record {:?} of {} bytes is too large", String::from_utf8_lossy(key), value.len()));
        }
        for key in &deletes {
            self.remove(key)?;
        }
        for (key, value) in &puts {
            self.write(key, value)?;
        }
        Ok(())
    }

    /// Nothing to do here: the host commits a plugin's key/value writes, durably, when the
    /// callback that made them returns.
    fn sync(&mut self) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    fn backend() -> SplitBackend<MemoryKv> {
        SplitBackend::new(MemoryKv::default())
    }

    fn loaded(b: &mut SplitBackend<MemoryKv>) -> BTreeMap<Vec<u8>, Vec<u8>> {
        b.load().unwrap().into_iter().collect()
    }

    fn pieces(b: &SplitBackend<MemoryKv>) -> usize {
        b.kv().map.keys().filter(|k| k[0] == PIECE).count()
    }

    #[test]
    fn the_cap_is_the_hosts() {
        assert_eq!(VALUE_CAP, canopy::plugin::MAX_VALUE);
        assert_eq!(KEY_CAP, canopy::plugin::MAX_KEY);
    }

    #[test]
    fn a_200_kib_record_round_trips_in_pieces_that_fit() {
        let mut b = backend();
        let big = value(200 * 1024, 7);
        b.apply(vec![(b"m/tree".to_vec(), big.clone()), (b"small".to_vec(), b"x".to_vec())], vec![]).unwrap();
        assert!(b.kv().map.values().all(|v| v.len() <= VALUE_CAP));
        assert_eq!(pieces(&b), 4, "200 KiB in 64 KiB pieces");
        let all = loaded(&mut b);
        assert_eq!(all.len(), 2);
        assert_eq!(all[b"m/tree".as_slice()], big);
        assert_eq!(all[b"small".as_slice()], b"x");
    }

    #[test]
    fn values_at_the_edges_of_the_cap_round_trip() {
        for len in [0, 1, VALUE_CAP - 1, VALUE_CAP, VALUE_CAP + 1, 2 * VALUE_CAP, 2 * VALUE_CAP + 1] {
            let mut b = backend();
            let v = value(len, len as u8);
            b.apply(vec![(b"k".to_vec(), v.clone())], vec![]).unwrap();
            assert_eq!(loaded(&mut b)[b"k".as_slice()], v, "{len} bytes");
        }
    }

    #[test]
    fn deleting_a_record_removes_every_piece() {
        let mut b = backend();
        b.apply(vec![(b"a".to_vec(), value(200 * 1024, 1)), (b"b".to_vec(), value(10, 2))], vec![]).unwrap();
        b.apply(vec![], vec![b"a".to_vec()]).unwrap();
        assert_eq!(pieces(&b), 0);
        assert_eq!(b.kv().map.len(), 1, "only b's head is left: {:?}", b.kv().map.keys().collect::<Vec<_>>());
        assert_eq!(loaded(&mut b).keys().collect::<Vec<_>>(), vec![b"b"]);
        // Deleting what is not there is fine.
        b.apply(vec![], vec![b"nothing".to_vec()]).unwrap();
    }

    #[test]
    fn overwriting_with_a_smaller_value_leaves_no_stale_pieces() {
        let mut b = backend();
        b.apply(vec![(b"k".to_vec(), value(200 * 1024, 1))], vec![]).unwrap();
        assert_eq!(pieces(&b), 4);
        b.apply(vec![(b"k".to_vec(), value(70 * 1024, 2))], vec![]).unwrap();
        assert_eq!(pieces(&b), 2);
        assert_eq!(loaded(&mut b)[b"k".as_slice()], value(70 * 1024, 2));
        b.apply(vec![(b"k".to_vec(), value(5, 3))], vec![]).unwrap();
        assert_eq!(pieces(&b), 0);
        assert_eq!(b.kv().map.len(), 1);
        assert_eq!(loaded(&mut b)[b"k".as_slice()], value(5, 3));
        // And growing again.
        b.apply(vec![(b"k".to_vec(), value(150 * 1024, 4))], vec![]).unwrap();
        assert_eq!(pieces(&b), 3);
        assert_eq!(loaded(&mut b)[b"k".as_slice()], value(150 * 1024, 4));
    }

    #[test]
    fn keys_that_prefix_each_other_keep_their_pieces_apart() {
        let mut b = backend();
        // "k" ‖ index could read as "k\0\0\0" ‖ … without the key's length in piece keys.
        let k1 = b"k".to_vec();
        let k2 = b"k\0\0\0\0".to_vec();
        b.apply(vec![(k1.clone(), value(130 * 1024, 1)), (k2.clone(), value(130 * 1024, 2))], vec![]).unwrap();
        b.apply(vec![], vec![k1.clone()]).unwrap();
        let all = loaded(&mut b);
        assert_eq!(all.len(), 1);
        assert_eq!(all[&k2], value(130 * 1024, 2));
    }

    #[test]
    fn a_missing_piece_is_reported_not_papered_over() {
        let mut b = backend();
        b.apply(vec![(b"k".to_vec(), value(100 * 1024, 1))], vec![]).unwrap();
        b.kv.map.remove(&piece_key(b"k", 1));
        let err = b.load().unwrap_err();
        assert!(err.contains("lacks piece 1 of 2"), "{err}");
    }

    #[test]
    fn a_batch_with_an_overlong_key_writes_nothing() {
        let mut b = backend();
        let long = vec![b'x'; MAX_RECORD_KEY + 1];
        let err = b.apply(vec![(b"ok".to_vec(), b"1".to_vec()), (long, b"2".to_vec())], vec![]).unwrap_err();
        assert!(err.contains("longer than"), "{err}");
        assert!(b.kv().map.is_empty());
        // The longest allowed key works, split or not.
        let longest = vec![b'y'; MAX_RECORD_KEY];
        b.apply(vec![(longest.clone(), value(VALUE_CAP + 5, 9))], vec![]).unwrap();
        assert_eq!(loaded(&mut b)[&longest], value(VALUE_CAP + 5, 9));
    }

    #[test]
    fn a_committer_whose_team_outgrows_a_value_reopens_from_the_pieces() {
        use canopy_msg_core::payload::Lifetimes;
        use canopy_msg_core::{Committer, Device, Key, MemoryBackend, Org};
        let org = Org::new("example.com", 7).unwrap();
        let key = Key::from_bytes([9; 32]);
        let mut admin = Committer::open(key.clone(), backend(), org).unwrap();
        admin.org_init().unwrap();
        let team = admin.create_team("big", Lifetimes::default()).unwrap();
        let started = std::time::Instant::now();
        let mut added = 0;
        // Until some record (the ratchet tree, the last welcome) needs more than one value.
        while pieces(admin_backend(&admin)) == 0 {
            let mut device = Device::open(Key::random(), MemoryBackend::default(), org).unwrap();
            let (hkp, out) = device.key_package(0, u64::MAX / 2, false).unwrap();
            let kp: Vec<u8> = out.iter().flat_map(|o| o.data[canopy_msg_core::fragment::HEADER..].to_vec()).collect();
            admin.add_device(team, &kp, &hkp, 0).unwrap();
            added += 1;
            assert!(added < 2_000, "the state never outgrew a value");
        }
        let kv = admin_backend(&admin).kv().clone();
        let split: Vec<String> = kv
            .map
            .iter()
            .filter(|(k, v)| k[0] == HEAD && v[0] == SPLIT)
            .map(|(k, _)| String::from_utf8_lossy(&k[1..]).into_owned())
            .collect();
        eprintln!("{added} devices added in {:?} before a record was split: {split:?}", started.elapsed());
        assert!(kv.map.values().all(|v| v.len() <= VALUE_CAP));
        let mut again = Committer::open(key, SplitBackend::new(kv), org).unwrap();
        assert_eq!(again.teams().unwrap(), admin.teams().unwrap());
        assert_eq!(again.devices(team).unwrap().len(), added + 1);
        assert_eq!(again.republish(), admin.republish());
    }

    fn admin_backend(admin: &canopy_msg_core::Committer<SplitBackend<MemoryKv>>) -> &SplitBackend<MemoryKv> {
        admin.backend()
    }

    #[test]
    fn the_vault_runs_over_it() {
        use canopy_msg_core::seal::{Key, Vault};
        let key = Key::from_bytes([5; 32]);
        let (mut vault, _) = Vault::open(key.clone(), backend()).unwrap();
        vault.put(b"big", &value(180 * 1024, 3));
        vault.put(b"small", b"secret team name");
        vault.commit().unwrap();
        let kv = vault.backend().kv().clone();
        assert!(kv.map.values().all(|v| v.len() <= VALUE_CAP));
        assert!(!kv.map.values().any(|v| v.windows(6).any(|w| w == b"secret")), "sealed");
        let (_, contents) = Vault::open(key, SplitBackend::new(kv.clone())).unwrap();
        assert_eq!(contents.app[b"big".as_slice()], value(180 * 1024, 3));
        assert_eq!(contents.app[b"small".as_slice()], b"secret team name");
        assert!(Vault::open(Key::from_bytes([6; 32]), SplitBackend::new(kv)).is_err());
    }
}
