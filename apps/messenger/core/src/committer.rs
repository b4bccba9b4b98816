//! The committer: device 0 of every team, run by the `member` plugin for the org's admin.
//!
//! It is the only member that commits, so a team's epochs form one line and never fork. It
//! creates teams, adds devices by hKP, creates channels, and numbers devices: the next
//! device id lives in the team record and only grows, so ids are never reused even though
//! MLS reuses the leaf of a removed member.

use std::collections::BTreeMap;

use canopy::Name;
use openmls::prelude::*;

use crate::engine::{self, Engine, MlsError, record_extensions, record_of};
use crate::fragment;
use crate::names::{DEVICE_TEAM, MANAGEMENT_CHANNEL, MAX_TEAM, Org, Path};
use crate::payload::{Lifetimes, TeamRecord, valid_label};
use crate::seal::{Backend, Key};

/// A chunk to publish: what the committer and devices hand to the network.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Outgoing {
    /// Its name.
    pub name: Name,
    /// When it expires, unix ms.
    pub expiry_ms: u64,
    /// Its data (a fragment).
    pub data: Vec<u8>,
}

/// One team, as `teams` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TeamSummary {
    /// Team id.
    pub id: u32,
    /// Team name.
    pub name: String,
    /// Current epoch.
    pub epoch: u64,
    /// Devices in the team, the committer included.
    pub devices: usize,
}

/// The result of adding a device.
#[derive(Debug, Clone)]
pub struct Added {
    /// The new device's id in the team.
    pub device: u32,
    /// The epoch its commit creates.
    pub epoch: u64,
    /// The commit and welcome fragments to publish.
    pub outgoing: Vec<Outgoing>,
}

const LAST: &[u8] = b"last/";
/// A team's name, by id: the index that lets `resolve` and `create_team` run without
/// loading every group, which grew an add's cost with the number of teams.
const NAME: &[u8] = b"name/";

/// The committer's state.
pub struct Committer<B: Backend> {
    engine: Engine<B>,
    org: Org,
    /// The last commit (and welcome) of each team, published again on every run until the
    /// next one replaces it, in case the run that made it ended before the relay took it.
    last: BTreeMap<u32, Vec<Outgoing>>,
    /// Every team's name, by id (teams are numbered densely from [`DEVICE_TEAM`]).
    names: BTreeMap<u32, String>,
}

impl<B: Backend> Committer<B> {
    /// Opens the committer's sealed state.
    pub fn open(key: Key, backend: B, org: Org) -> Result<Committer<B>, MlsError> {
        let (engine, contents) = Engine::open(key, backend, "device-0")?;
        let team_of = |k: &[u8], prefix: &[u8]| k.strip_prefix(prefix).and_then(|t| std::str::from_utf8(t).ok()?.parse::<u32>().ok());
        let bad = |e: String| MlsError::Malformed { what: "state", detail: e };
        let mut last = BTreeMap::new();
        let mut names = BTreeMap::new();
        for (k, v) in &contents.app {
            if let Some(team) = team_of(k, LAST) {
                let out = decode_last(v).map_err(bad)?;
                last.insert(team, out);
            } else if let Some(team) = team_of(k, NAME) {
                names.insert(team, String::from_utf8(v.clone()).map_err(|e| bad(e.to_string()))?);
            }
        }
        let mut committer = Committer { engine, org, last, names };
        if committer.names.is_empty() {
            committer.index_names()?;
        }
        Ok(committer)
    }

    /// Builds the name index from the groups themselves, for state written before the
    /// index existed (an org with no teams finds none, and writes nothing).
    fn index_names(&mut self) -> Result<(), MlsError> {
        let mut team = DEVICE_TEAM;
        while team <= MAX_TEAM {
            let Some(group) = self.engine.group(&self.org, team)? else { break };
            let name = record_of(group)?.name;
            self.engine.vault.put(&name_key(team), name.as_bytes());
            self.names.insert(team, name);
            team += 1;
        }
        self.engine.persist()
    }

    /// The org.
    pub fn org(&self) -> &Org {
        &self.org
    }

    /// Where the sealed state lives.
    pub fn backend(&self) -> &B {
        self.engine.vault.backend()
    }

    /// What to publish again: the latest commit and welcome of every team.
    pub fn republish(&self) -> Vec<Outgoing> {
        self.last.values().flatten().cloned().collect()
    }

    fn group(&mut self, team: u32) -> Result<&MlsGroup, MlsError> {
        self.engine.group(&self.org, team)?.ok_or_else(|| MlsError::UnknownTeam(team.to_string()))
    }

    fn take_group(&mut self, team: u32) -> Result<MlsGroup, MlsError> {
        self.engine.take_group(&self.org, team)?.ok_or_else(|| MlsError::UnknownTeam(team.to_string()))
    }

    /// Every team's summary, in id order.
    pub fn teams(&mut self) -> Result<Vec<TeamSummary>, MlsError> {
        let mut out = Vec::new();
        let ids: Vec<u32> = self.names.keys().copied().collect();
        for team in ids {
            let group = self.group(team)?;
            let record = record_of(group)?;
            out.push(TeamSummary { id: team, name: record.name, epoch: group.epoch().as_u64(), devices: record.devices.len() });
        }
        Ok(out)
    }

    /// Whether `org init` has run.
    pub fn initialised(&self) -> bool {
        self.names.contains_key(&DEVICE_TEAM)
    }

    /// A team's id, from its id text or its name.
    pub fn resolve(&self, which: &str) -> Result<u32, MlsError> {
        let numeric = !which.is_empty() && which.bytes().all(|b| b.is_ascii_digit());
        self.names
            .iter()
            .find(|(id, name)| if numeric { id.to_string() == which } else { *name == which })
            .map(|(id, _)| *id)
            .ok_or_else(|| MlsError::UnknownTeam(which.to_string()))
    }

    /// `org init`: creates team 1, which carries the org's device management.
    pub fn org_init(&mut self) -> Result<(), MlsError> {
        if self.initialised() {
            return Err(MlsError::BadName(format!("org {} is already initialised", self.org.org())));
        }
        self.new_team(DEVICE_TEAM, "devices", Lifetimes::default())
    }

    /// `team create NAME`: a new team with the committer as device 0. Returns its id.
    pub fn create_team(&mut self, name: &str, lifetimes: Lifetimes) -> Result<u32, MlsError> {
        if !valid_label(name) {
            return Err(MlsError::BadName(format!("{name:?} cannot name a team (not all digits, no '/', 1-64 bytes)")));
        }
        if !self.initialised() {
            return Err(MlsError::BadName("the org is not initialised: run `admin org init` first".into()));
        }
        if self.names.values().any(|n| n == name) {
            return Err(MlsError::BadName(format!("a team named {name:?} exists")));
        }
        let team = self.names.keys().next_back().map_or(DEVICE_TEAM, |t| t + 1);
        if team > MAX_TEAM {
            return Err(MlsError::BadName(format!("org {} has no team ids left", self.org.org())));
        }
        self.new_team(team, name, lifetimes)?;
        Ok(team)
    }

    fn new_team(&mut self, team: u32, name: &str, lifetimes: Lifetimes) -> Result<(), MlsError> {
        let record = TeamRecord {
            org: self.org.org(),
            team,
            name: name.to_string(),
            lifetimes,
            channels: BTreeMap::new(),
            next_device: 1,
            devices: [(0, 0)].into(),
        };
        let group = self.engine.create_group(engine::group_id(&self.org, team), record_extensions(&record)?)?;
        let e = &mut self.engine;
        e.keep_group(group);
        e.vault.put(&name_key(team), name.as_bytes());
        self.names.insert(team, name.to_string());
        e.persist()
    }

    /// A team's devices: `(device id, leaf index)`, in device order.
    pub fn devices(&mut self, team: u32) -> Result<Vec<(u32, u32)>, MlsError> {
        let record = record_of(self.group(team)?)?;
        let mut out: Vec<(u32, u32)> = record.devices.iter().map(|(leaf, dev)| (*dev, *leaf)).collect();
        out.sort();
        Ok(out)
    }

    /// A team's record.
    pub fn record(&mut self, team: u32) -> Result<TeamRecord, MlsError> {
        record_of(self.group(team)?)
    }

    /// `team add TEAM HKP`: verifies that `key_package` hashes to `hkp`, commits its add
    /// together with the team record that numbers it, and returns the commit and the
    /// welcome to publish.
    pub fn add_device(&mut self, team: u32, key_package: &[u8], hkp: &[u8], now_ms: u64) -> Result<Added, MlsError> {
        let mut added = self.add_devices(team, &[(key_package, hkp)], now_ms)?;
        Ok(added.pop().expect("one device added"))
    }

    /// Adds several devices in one commit (one epoch): each gets its device id, in order, and
    /// a welcome of its own. The commit's chunks come with the first device's result.
    pub fn add_devices(&mut self, team: u32, devices: &[(&[u8], &[u8])], now_ms: u64) -> Result<Vec<Added>, MlsError> {
        let mut group = self.take_group(team)?;
        let mut record = record_of(&group)?;
        let mut taken: std::collections::BTreeSet<u32> = group.members().map(|m| m.index.u32()).collect();
        let mut kps = Vec::with_capacity(devices.len());
        let mut placed = Vec::with_capacity(devices.len());
        for (key_package, hkp) in devices {
            let kp = engine::verify_key_package(self.engine.provider.crypto(), key_package, hkp)?;
            let signature_key = kp.leaf_node().signature_key().as_slice().to_vec();
            if group.members().any(|m| m.signature_key == signature_key) || placed.iter().any(|(_, _, k, _): &(u32, u32, Vec<u8>, &[u8])| *k == signature_key) {
                return Err(MlsError::BadName(format!("the device of key package {} is already in team {team}", engine::hex(hkp))));
            }
            // RFC 9420 §12.1.1: each Add takes the leftmost blank leaf, or extends the tree:
            // the smallest index no member holds, in proposal order.
            let leaf = (0..).find(|i| !taken.contains(i)).expect("a free index exists");
            taken.insert(leaf);
            let device = record.next_device;
            record.next_device += 1;
            record.devices.insert(leaf, device);
            placed.push((leaf, device, signature_key, *hkp));
            kps.push(kp);
        }
        let (commit, welcome) = self.commit(&mut group, kps, &record)?;
        for (leaf, _, signature_key, _) in &placed {
            let ok = group.member_at(LeafNodeIndex::new(*leaf)).is_some_and(|m| m.signature_key == *signature_key);
            if !ok {
                return Err(MlsError::Mls(format!("a new member did not land on leaf {leaf}")));
            }
        }
        let epoch = group.epoch().as_u64();
        self.engine.keep_group(group);
        let mut all = self.commit_chunks(team, epoch, &commit, record.lifetimes.commit_ms, now_ms)?;
        let welcome = welcome.ok_or_else(|| MlsError::Mls("an add produced no welcome".into()))?;
        let pieces = fragment::split(Path::Welcome, &welcome)?;
        let mut out = Vec::with_capacity(placed.len());
        for (i, (_, device, _, hkp)) in placed.iter().enumerate() {
            // One welcome serves every device added by the commit; each finds it under its
            // own hKP.
            let mut outgoing = if i == 0 { std::mem::take(&mut all) } else { Vec::new() };
            for (f, data) in pieces.iter().enumerate() {
                outgoing.push(Outgoing { name: self.org.welcome(hkp, f as u16), expiry_ms: now_ms + record.lifetimes.welcome_ms, data: data.clone() });
            }
            out.push(Added { device: *device, epoch, outgoing });
        }
        let remembered: Vec<Outgoing> = out.iter().flat_map(|a| a.outgoing.iter().cloned()).collect();
        self.remember(team, &remembered)?;
        Ok(out)
    }

    /// `channel create TEAM NAME`: commits the team record with the new channel. Returns the
    /// channel id, the epoch, and the commit to publish.
    pub fn create_channel(&mut self, team: u32, name: &str, now_ms: u64) -> Result<(u16, u64, Vec<Outgoing>), MlsError> {
        if !valid_label(name) {
            return Err(MlsError::BadName(format!("{name:?} cannot name a channel (not all digits, no '/', 1-64 bytes)")));
        }
        let mut group = self.take_group(team)?;
        let mut record = record_of(&group)?;
        if record.channels.values().any(|n| n == name) {
            return Err(MlsError::BadName(format!("team {team} already has a channel named {name:?}")));
        }
        let channel = record.channels.keys().next_back().map_or(MANAGEMENT_CHANNEL + 1, |c| c + 1);
        if channel > crate::names::MAX_CHANNEL {
            return Err(MlsError::BadName(format!("team {team} has no channel ids left")));
        }
        record.channels.insert(channel, name.to_string());
        let (commit, _) = self.commit(&mut group, vec![], &record)?;
        let epoch = group.epoch().as_u64();
        self.engine.keep_group(group);
        let outgoing = self.commit_chunks(team, epoch, &commit, record.lifetimes.commit_ms, now_ms)?;
        self.remember(team, &outgoing)?;
        Ok((channel, epoch, outgoing))
    }

    fn commit(&mut self, group: &mut MlsGroup, adds: Vec<KeyPackage>, record: &TeamRecord) -> Result<(Vec<u8>, Option<Vec<u8>>), MlsError> {
        self.engine.commit(group, adds, Vec::new(), record_extensions(record)?)
    }

    fn commit_chunks(&self, team: u32, epoch: u64, commit: &[u8], ttl: u64, now_ms: u64) -> Result<Vec<Outgoing>, MlsError> {
        let pieces = fragment::split(Path::Commit, commit)?;
        if pieces.len() > usize::from(crate::names::MAX_COMMIT_FRAGMENT) + 1 {
            return Err(MlsError::Fragment(fragment::FragmentError::TooLarge(commit.len())));
        }
        pieces
            .into_iter()
            .enumerate()
            .map(|(i, data)| Ok(Outgoing { name: self.org.commit(team, epoch, i as u16)?, expiry_ms: now_ms + ttl, data }))
            .collect()
    }

    /// Persists the merged group together with what it must publish, in one batch: a crash
    /// can lose neither without the other.
    fn remember(&mut self, team: u32, outgoing: &[Outgoing]) -> Result<(), MlsError> {
        let key = [LAST, team.to_string().as_bytes()].concat();
        self.engine.vault.put(&key, &encode_last(outgoing));
        self.last.insert(team, outgoing.to_vec());
        self.engine.persist()
    }
}

/// The version byte of a binary `last/TEAM` record. Records written before it existed are
/// JSON arrays, which start with `[`.
const LAST_V1: u8 = 1;

/// A `last/TEAM` record: [`LAST_V1`], then per chunk `name:u128 expiry_ms:u64 len:u16 data`,
/// big-endian. Binary because it holds a whole welcome, which grows with the team (about
/// 190 KB at 1,000 devices) and which JSON wrote as an array of numbers, 3–4 bytes a byte,
/// encoded on every add and decoded on every run of the plugin.
fn encode_last(out: &[Outgoing]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(1 + out.iter().map(|o| 26 + o.data.len()).sum::<usize>());
    bytes.push(LAST_V1);
    for o in out {
        bytes.extend_from_slice(&o.name.to_bytes());
        bytes.extend_from_slice(&o.expiry_ms.to_be_bytes());
        let len = u16::try_from(o.data.len()).expect("a chunk's data is at most 1 KiB");
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(&o.data);
    }
    bytes
}

/// Reads a `last/TEAM` record, binary or (as written before) JSON.
fn decode_last(bytes: &[u8]) -> Result<Vec<Outgoing>, String> {
    match bytes.first() {
        Some(b'[') => return serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        Some(&LAST_V1) => {}
        other => return Err(format!("a last-published record of unknown version {other:?}")),
    }
    let mut rest = &bytes[1..];
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (head, tail) = rest.split_at_checked(26).ok_or("a last-published record is truncated")?;
        let name: [u8; 16] = head[..16].try_into().expect("16 bytes");
        let expiry_ms = u64::from_be_bytes(head[16..24].try_into().expect("8 bytes"));
        let len = usize::from(u16::from_be_bytes(head[24..26].try_into().expect("2 bytes")));
        let (data, tail) = tail.split_at_checked(len).ok_or("a last-published record is truncated")?;
        out.push(Outgoing { name: Name::from_bytes(name), expiry_ms, data: data.to_vec() });
        rest = tail;
    }
    Ok(out)
}

fn name_key(team: u32) -> Vec<u8> {
    [NAME, team.to_string().as_bytes()].concat()
}

/// The `member` plugin's configuration keys: what a tool run (`canopy-msg admin`, `canopy
/// plugin run`) or a relay's `[[plugin]]` table gives the committer. One place, so the
/// plugin that reads them and the tools that write them cannot drift apart.
pub mod config {
    /// The org's DNS domain (its hash is the names' origin field).
    pub const DOMAIN: &str = "domain";
    /// The org number.
    pub const ORG: &str = "org";
    /// The key the committer's state is sealed with: 64 hex digits.
    pub const KEY: &str = "key";
    /// Lifetime of a new team's messages, ms.
    pub const MESSAGE_TTL_MS: &str = "message_ttl_ms";
    /// Lifetime of a new team's commits, ms.
    pub const COMMIT_TTL_MS: &str = "commit_ttl_ms";
    /// Lifetime of a new team's welcomes, ms.
    pub const WELCOME_TTL_MS: &str = "welcome_ttl_ms";
    /// Lifetime of a new team's key packages, ms.
    pub const KEY_PACKAGE_TTL_MS: &str = "key_package_ttl_ms";

    /// The config every run needs: the org, and the state key as hex text (given as text, so
    /// a test can pass a malformed one).
    pub fn base(domain: &str, org: u32, key_hex: &str) -> serde_json::Map<String, serde_json::Value> {
        let mut map = serde_json::Map::new();
        map.insert(DOMAIN.into(), domain.into());
        map.insert(ORG.into(), org.into());
        map.insert(KEY.into(), key_hex.into());
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Outgoing> {
        vec![
            Outgoing { name: Name::new(u128::MAX - 7), expiry_ms: 1_800_000_000_000, data: vec![1, 2, 3] },
            Outgoing { name: Name::new(42), expiry_ms: 5, data: vec![0xab; 1024] },
            Outgoing { name: Name::new(43), expiry_ms: 6, data: Vec::new() },
        ]
    }

    #[test]
    fn last_published_records_round_trip_and_old_json_ones_still_read() {
        let out = sample();
        assert_eq!(decode_last(&encode_last(&out)).unwrap(), out);
        assert_eq!(decode_last(&encode_last(&[])).unwrap(), Vec::new());
        // As written before the binary form.
        assert_eq!(decode_last(&serde_json::to_vec(&out).unwrap()).unwrap(), out);
    }

    #[test]
    fn a_damaged_last_published_record_is_an_error_not_a_panic() {
        let bytes = encode_last(&sample());
        for cut in 0..bytes.len() {
            let r = decode_last(&bytes[..cut]);
            // Cutting between two chunks leaves a valid shorter record; anywhere else fails.
            if let Ok(got) = r {
                assert!(got.len() < 3 && (cut == 1 || cut == 1 + 26 + 3 || cut == 1 + 26 + 3 + 26 + 1024));
            }
        }
        assert!(decode_last(&[9, 1, 2]).is_err());
    }
}
