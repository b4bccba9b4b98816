//! A member device's side of MLS: joining by welcome, applying commits strictly in epoch
//! order, holding messages from future epochs, deduplicating by name, and keeping the
//! plaintext history, the device's own messages included (MLS senders cannot decrypt
//! their own).
//!
//! The rules, and the bugs of other messengers each one avoids:
//! - **Dedup before decrypt.** Relays replay; processing a message twice makes openmls fail
//!   with `SecretReuseError`. Every object is keyed by its name (a message by its first
//!   fragment's name) and never processed twice, across restarts too.
//! - **Commits in order.** Commit *E* (the one that creates epoch *E*) is applied only when
//!   the group is at *E − 1*; later ones wait, and the gap is visible
//!   ([`Device::missing_commits`]).
//! - **Catch-up.** In a batch, messages are processed before commits, and
//!   [`MAX_PAST_EPOCHS`](crate::engine::MAX_PAST_EPOCHS) past epochs stay decryptable for
//!   stragglers.
//! - **Future epochs.** A message from an epoch the device has not reached is held, then
//!   processed when its commit is applied.
//! - **Authorship.** Only device 0 may commit. A message's MLS sender must be the device its
//!   name says; an edit counts only from a device of the user who wrote the original.
//! - **Users.** Every leaf's credential must carry a valid binding to its user
//!   ([`crate::identity`]): checked for every member of a welcome and every leaf a commit
//!   adds or updates, before it is accepted. A message carries its sender's user from then
//!   on, and a blocked user's messages are neither shown nor kept.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use canopy::Name;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::tls_codec::Serialize as _;
use openmls::prelude::*;

use crate::committer::Outgoing;
use crate::contacts::{Contact, ContactError, Contacts};
use crate::engine::{self, Engine, MlsError, hex, join_config, mls, record_of};
use crate::identity::{self, UserId};
use crate::fragment::{self, Assembly, Fragment};
use crate::names::{MAX_MSG, Org, Parsed, Path, hkp54};
use crate::payload::{Message, MsgRef, TeamRecord};
use crate::seal::{Backend, Key};

/// The most complete messages held for future epochs, per team (by default; see
/// [`Device::set_max_held`]). More are dropped and counted, and once the team has caught up
/// [`Event::Refetch`] asks for them again from the cache.
pub const MAX_HELD: usize = 10_000;

/// A message as stored: what its sender wrote, and who sent it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stored {
    /// Its id in the channel.
    pub id: MsgRef,
    /// The message.
    pub message: Message,
    /// The sending device's user (unknown for devices of part 1, which had no users).
    #[serde(default)]
    pub user: Option<UserId>,
}

/// A message as shown: edits applied, replies attached to their thread's root.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Shown {
    /// Its id in the channel.
    pub id: MsgRef,
    /// When its sender wrote it, unix ms.
    pub sent_ms: u64,
    /// The current text, after edits.
    pub text: String,
    /// The root of the thread it answers.
    pub reply_to: Option<MsgRef>,
    /// Whether an edit replaced the text.
    pub edited: bool,
    /// The sending device's user, if known.
    pub user: Option<UserId>,
}

/// Something an ingest did that the caller shows or acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The device joined a team.
    Joined {
        /// Team.
        team: u32,
        /// This device's id in it.
        device: u32,
    },
    /// A team moved to a new epoch.
    Epoch {
        /// Team.
        team: u32,
        /// The new epoch.
        epoch: u64,
    },
    /// A message arrived (an edit arrives as the message it edits, with its new text).
    Message {
        /// Team.
        team: u32,
        /// Channel.
        channel: u16,
        /// The message's id (the original's, for an edit).
        id: MsgRef,
    },
    /// Messages of this team were dropped while too many were held for future epochs, and
    /// the team has caught up since: fetch its messages again from the cache (what was
    /// processed already is skipped by name).
    Refetch {
        /// Team.
        team: u32,
    },
    /// A chunk was refused; it is logged and counted, and nothing else changes.
    Rejected {
        /// Its name.
        name: Name,
        /// Why.
        reason: String,
    },
}

/// Counters of what ingest did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Messages shown (edits included).
    pub messages: u64,
    /// Commits applied.
    pub commits: u64,
    /// Chunks refused.
    pub rejected: u64,
    /// Chunks ignored as duplicates of something already processed.
    pub duplicates: u64,
    /// Messages held for a future epoch.
    pub held: u64,
    /// Messages dropped because too many were held.
    pub held_dropped: u64,
    /// Messages from blocked users, dropped unread.
    pub blocked: u64,
}

type Key3 = (u16, u32, u32);

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct TeamMeta {
    device: u32,
    next_msg: BTreeMap<u16, u32>,
}

struct Team {
    record: TeamRecord,
    epoch: u64,
    meta: TeamMeta,
    commits: BTreeMap<u64, Assembly>,
    parts: HashMap<Key3, Assembly>,
    held: BTreeMap<u64, Vec<(Name, Key3, Vec<u8>)>>,
    /// Messages were dropped because too many were held: fetch them again once caught up.
    overflowed: bool,
    /// Message keys processed or refused: never processed again.
    done: BTreeSet<Key3>,
    history: BTreeMap<u16, BTreeMap<MsgRef, Stored>>,
}

/// One device's MLS state and history.
pub struct Device<B: Backend> {
    engine: Engine<B>,
    org: Org,
    teams: BTreeMap<u32, Team>,
    /// Key packages published and not yet welcomed: first 54 bits → hKP.
    waiting: BTreeMap<u64, Vec<u8>>,
    welcomes: HashMap<u64, Assembly>,
    /// What ingest did so far.
    pub counters: Counters,
    max_held: usize,
    contacts: Contacts,
}

/// One member of a team, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its device id in the team.
    pub device: u32,
    /// Its user, if its credential carries one.
    pub user: Option<UserId>,
    /// Whether it is this device.
    pub me: bool,
}

fn team_key(team: u32) -> Vec<u8> {
    format!("t/{team}").into_bytes()
}
fn msg_key(team: u32, k: Key3) -> Vec<u8> {
    format!("h/{team}/{}/{}/{}", k.0, k.1, k.2).into_bytes()
}
fn done_key(team: u32, k: Key3) -> Vec<u8> {
    format!("d/{team}/{}/{}/{}", k.0, k.1, k.2).into_bytes()
}
fn contact_key(user: &UserId) -> Vec<u8> {
    format!("c/{user}").into_bytes()
}
fn parse_key3(rest: &str) -> Option<(u32, Key3)> {
    let mut it = rest.split('/').map(|p| p.parse::<u32>().ok());
    let (t, c, d, m) = (it.next()??, it.next()??, it.next()??, it.next()??);
    Some((t, (u16::try_from(c).ok()?, d, m)))
}

impl<B: Backend> Device<B> {
    /// Opens the device's sealed state.
    pub fn open(key: Key, backend: B, org: Org) -> Result<Device<B>, MlsError> {
        let (engine, contents) = Engine::open(key, backend, "device")?;
        let bad = |what: &str| MlsError::Malformed { what: "state", detail: what.to_string() };
        let mut device = Device { engine, org, teams: BTreeMap::new(), waiting: BTreeMap::new(), welcomes: HashMap::new(), counters: Counters::default(), max_held: MAX_HELD, contacts: Contacts::default() };
        for (k, v) in &contents.app {
            let Ok(k) = std::str::from_utf8(k) else { continue };
            if let Some(team) = k.strip_prefix("t/").and_then(|t| t.parse::<u32>().ok()) {
                let meta: TeamMeta = serde_json::from_slice(v).map_err(|_| bad("team"))?;
                let group = device.engine.group(&device.org, team)?.ok_or_else(|| bad("a team without its group"))?;
                let record = record_of(group)?;
                let epoch = group.epoch().as_u64();
                device.teams.insert(
                    team,
                    Team { record, epoch, meta, commits: BTreeMap::new(), parts: HashMap::new(), held: BTreeMap::new(), overflowed: false, done: BTreeSet::new(), history: BTreeMap::new() },
                );
            }
        }
        for (k, v) in &contents.app {
            let Ok(k) = std::str::from_utf8(k) else { continue };
            if let Some(rest) = k.strip_prefix("h/") {
                let (team, key) = parse_key3(rest).ok_or_else(|| bad("history key"))?;
                let stored: Stored = serde_json::from_slice(v).map_err(|_| bad("history"))?;
                if let Some(t) = device.teams.get_mut(&team) {
                    t.done.insert(key);
                    t.history.entry(key.0).or_default().insert(stored.id, stored);
                }
            } else if let Some(rest) = k.strip_prefix("d/") {
                let (team, key) = parse_key3(rest).ok_or_else(|| bad("done key"))?;
                if let Some(t) = device.teams.get_mut(&team) {
                    t.done.insert(key);
                }
            } else if let Some(hkp) = k.strip_prefix("w/").and_then(engine::unhex) {
                device.waiting.insert(hkp54(&hkp), hkp);
            } else if let Some(user) = k.strip_prefix("c/").and_then(UserId::parse) {
                let contact: Contact = serde_json::from_slice(v).map_err(|_| bad("contact"))?;
                device.contacts.set(user, contact);
            }
        }
        Ok(device)
    }

    /// The org.
    pub fn org(&self) -> &Org {
        &self.org
    }

    /// Where the sealed state lives.
    pub fn backend(&self) -> &B {
        self.engine.vault.backend()
    }

    /// The device's public signature key.
    pub fn public_key(&self) -> &[u8] {
        self.engine.public_key()
    }

    /// The user this device belongs to.
    pub fn user_id(&self) -> UserId {
        self.engine.user_id()
    }

    /// The user's public identity key.
    pub fn user_key(&self) -> &[u8] {
        self.engine.user_key()
    }

    /// The device's contacts.
    pub fn contacts(&self) -> &Contacts {
        &self.contacts
    }

    /// The user `which` stands for: a user id, or a contact name.
    pub fn resolve_user(&self, which: &str) -> Result<UserId, MlsError> {
        Ok(self.contacts.resolve(which)?)
    }

    fn set_contact(&mut self, user: UserId, contact: Contact) -> Result<Contact, MlsError> {
        if contact.is_empty() {
            self.engine.vault.delete(&contact_key(&user));
        } else {
            self.engine.vault.put(&contact_key(&user), &serde_json::to_vec(&contact).expect("serializable"));
        }
        self.engine.persist()?;
        self.contacts.set(user, contact.clone());
        Ok(contact)
    }

    /// `contact add USER NAME` (and `contact rename`): gives `user` the local name `name`.
    pub fn name_contact(&mut self, user: UserId, name: &str) -> Result<Contact, MlsError> {
        let contact = self.contacts.named(user, name)?;
        self.set_contact(user, contact)
    }

    /// `contact remove USER`: forgets the name (a block stays).
    pub fn unname_contact(&mut self, user: UserId) -> Result<Contact, MlsError> {
        let contact = Contact { name: None, ..self.contacts.get(&user).cloned().unwrap_or_default() };
        self.set_contact(user, contact)
    }

    /// `block USER` / `unblock USER`. A blocked user's messages that arrive while the block
    /// lasts are dropped unread; what was kept before is hidden until the block is lifted.
    pub fn set_blocked(&mut self, user: UserId, blocked: bool) -> Result<Contact, MlsError> {
        if user == self.user_id() {
            return Err(ContactError::Yourself.into());
        }
        let contact = Contact { blocked, ..self.contacts.get(&user).cloned().unwrap_or_default() };
        self.set_contact(user, contact)
    }

    /// A team's members: device id, user, and whether it is this device.
    pub fn members(&mut self, team: u32) -> Result<Vec<Member>, MlsError> {
        let record = self.teams.get(&team).map(|t| t.record.clone()).ok_or_else(|| MlsError::UnknownTeam(team.to_string()))?;
        let org = self.org;
        let group = self.engine.group(&org, team)?.ok_or_else(|| MlsError::UnknownTeam(team.to_string()))?;
        let own = group.own_leaf_index().u32();
        let mut out: Vec<Member> = group
            .members()
            .filter_map(|m| {
                let device = record.device_of(m.index.u32())?;
                Some(Member { device, user: identity::claimed_user(&m.credential), me: m.index.u32() == own })
            })
            .collect();
        out.sort_by_key(|m| m.device);
        Ok(out)
    }

    /// The teams this device is in: `(team, record, epoch, own device id)`.
    pub fn teams(&self) -> impl Iterator<Item = (u32, &TeamRecord, u64, u32)> {
        self.teams.iter().map(|(id, t)| (*id, &t.record, t.epoch, t.meta.device))
    }

    /// The hKPs whose welcomes this device waits for.
    pub fn waiting(&self) -> impl Iterator<Item = &[u8]> {
        self.waiting.values().map(Vec::as_slice)
    }

    /// A team's id, from its id text or its name.
    pub fn resolve_team(&self, which: &str) -> Result<u32, MlsError> {
        let numeric = !which.is_empty() && which.bytes().all(|b| b.is_ascii_digit());
        self.teams
            .iter()
            .find(|(id, t)| if numeric { id.to_string() == which } else { t.record.name == which })
            .map(|(id, _)| *id)
            .ok_or_else(|| MlsError::UnknownTeam(which.to_string()))
    }

    /// A channel's id in a team, from its id text or name.
    pub fn resolve_channel(&self, team: u32, which: &str) -> Result<u16, MlsError> {
        let t = self.teams.get(&team).ok_or_else(|| MlsError::UnknownTeam(team.to_string()))?;
        t.record.channel(which).ok_or_else(|| MlsError::UnknownChannel(format!("{}/{which}", t.record.name)))
    }

    /// Sets how many messages a team may hold for future epochs ([`MAX_HELD`] by default).
    pub fn set_max_held(&mut self, max: usize) {
        self.max_held = max;
    }

    /// Epochs missing before the commits this device holds: `(first, last)` inclusive, if
    /// any. Until they arrive, the team cannot move on.
    pub fn missing_commits(&self, team: u32) -> Option<(u64, u64)> {
        let t = self.teams.get(&team)?;
        let (&next, _) = t.commits.iter().find(|(e, _)| **e > t.epoch)?;
        (next > t.epoch + 1).then_some((t.epoch + 1, next - 1))
    }

    /// A fresh single-use key package: its hKP, and the chunks to publish. The device then
    /// waits for the welcome named after the hKP.
    pub fn key_package(&mut self, now_ms: u64, ttl_ms: u64) -> Result<(Vec<u8>, Vec<Outgoing>), MlsError> {
        let (bytes, hkp) = self.engine.key_package(false)?;
        let outgoing = fragment::split(Path::KeyPackage, &bytes)?
            .into_iter()
            .enumerate()
            .map(|(i, data)| Outgoing { name: self.org.key_package(&hkp, i as u16), expiry_ms: now_ms + ttl_ms, data })
            .collect();
        self.engine.vault.put(format!("w/{}", hex(&hkp)).as_bytes(), b"");
        self.engine.persist()?;
        self.waiting.insert(hkp54(&hkp), hkp.clone());
        Ok((hkp, outgoing))
    }

    /// Encrypts a message for `team/channel` and returns its id and its chunks. The device
    /// keeps the plaintext in its history.
    pub fn send(&mut self, team: u32, channel: u16, message: Message, now_ms: u64) -> Result<(MsgRef, Vec<Outgoing>), MlsError> {
        let payload = message.encode()?;
        let t = self.teams.get_mut(&team).ok_or_else(|| MlsError::UnknownTeam(team.to_string()))?;
        if !t.record.channels.contains_key(&channel) && channel != crate::names::MANAGEMENT_CHANNEL {
            return Err(MlsError::UnknownChannel(format!("{}/{channel}", t.record.name)));
        }
        let mut group = self.engine.take_group(&self.org, team)?.ok_or_else(|| MlsError::UnknownTeam(team.to_string()))?;
        let out = group.create_message(&self.engine.provider, &self.engine.signer, &payload).map_err(mls)?;
        self.engine.keep_group(group);
        let bytes = out.tls_serialize_detached().map_err(mls)?;
        let pieces = fragment::split(Path::Message, &bytes)?;
        let first = *t.meta.next_msg.get(&channel).unwrap_or(&1);
        let count = pieces.len() as u32;
        if first.checked_add(count).is_none_or(|end| end - 1 > MAX_MSG) {
            return Err(MlsError::BadName(format!("device {} has used every message number in channel {channel}", t.meta.device)));
        }
        let ttl = t.record.lifetimes.message_ms;
        let mut outgoing = Vec::with_capacity(pieces.len());
        for (i, data) in pieces.into_iter().enumerate() {
            outgoing.push(Outgoing { name: self.org.message(team, channel, t.meta.device, first + i as u32)?, expiry_ms: now_ms + ttl, data });
        }
        let id = MsgRef { device: t.meta.device, msg: first };
        t.meta.next_msg.insert(channel, first + count);
        let key = (channel, id.device, id.msg);
        let stored = Stored { id, message, user: Some(self.engine.user_id()) };
        t.done.insert(key);
        self.engine.vault.put(&msg_key(team, key), &serde_json::to_vec(&stored).expect("serializable"));
        self.engine.vault.put(&team_key(team), &serde_json::to_vec(&t.meta).expect("serializable"));
        t.history.entry(channel).or_default().insert(id, stored);
        self.engine.persist()?;
        Ok((id, outgoing))
    }

    /// Moves this device's next message number on `channel` past `msg`, because that name is
    /// taken (a publish there was refused as a conflict).
    pub fn skip_taken(&mut self, team: u32, channel: u16, msg: u32) -> Result<(), MlsError> {
        let t = self.teams.get_mut(&team).ok_or_else(|| MlsError::UnknownTeam(team.to_string()))?;
        let next = t.meta.next_msg.entry(channel).or_insert(1);
        if *next <= msg {
            *next = msg + 1;
            self.engine.vault.put(&team_key(team), &serde_json::to_vec(&t.meta).expect("serializable"));
            self.engine.persist()?;
        }
        Ok(())
    }

    /// The messages of a channel as every device shows them: ordered by creation time, ties
    /// broken by (device, msg); edits applied; replies attached to their thread's root.
    pub fn messages(&self, team: u32, channel: u16) -> Vec<Shown> {
        let Some(history) = self.teams.get(&team).and_then(|t| t.history.get(&channel)) else { return Vec::new() };
        let mut edits: BTreeMap<MsgRef, &Stored> = BTreeMap::new();
        for s in history.values() {
            if let Some(target) = s.message.replaces {
                let later = |old: &&Stored| (old.message.created_ms, old.id) < (s.message.created_ms, s.id);
                if history.get(&target).is_some_and(|original| may_edit(original, s)) && edits.get(&target).is_none_or(later) {
                    edits.insert(target, s);
                }
            }
        }
        let mut shown: Vec<Shown> = history
            .values()
            .filter(|s| s.message.replaces.is_none() && !self.hidden(s))
            .map(|s| show(history, s, edits.get(&s.id).copied()))
            .collect();
        shown.sort_by_key(|s| (s.sent_ms, s.id));
        shown
    }

    /// One message as shown, edits applied: what [`Device::messages`] has for it, without
    /// building the whole channel (a follower gets each message as it arrives).
    pub fn message(&self, team: u32, channel: u16, id: MsgRef) -> Option<Shown> {
        let history = self.teams.get(&team)?.history.get(&channel)?;
        let s = history.get(&id).filter(|s| s.message.replaces.is_none() && !self.hidden(s))?;
        let edit = history
            .values()
            .filter(|e| e.message.replaces == Some(id) && may_edit(s, e))
            .max_by_key(|e| (e.message.created_ms, e.id));
        Some(show(history, s, edit))
    }

    fn hidden(&self, s: &Stored) -> bool {
        s.user.is_some_and(|u| self.contacts.is_blocked(&u))
    }

    /// The original of a message, as stored (to check who may edit it).
    pub fn stored(&self, team: u32, channel: u16, id: MsgRef) -> Option<&Stored> {
        self.teams.get(&team)?.history.get(&channel)?.get(&id)
    }

    /// Takes a batch of chunks from the network. Messages go before commits, so what was
    /// sent in an epoch is read in that epoch where it can be; then commits are applied in
    /// epoch order, each releasing the messages held for its epoch. Everything changed is
    /// written as one batch at the end, but not yet durably: call [`Device::sync`] before
    /// anything beyond showing the messages depends on it. A crash before then loses the
    /// batch whole, and the chunks arrive again from the relay: the MLS state written last
    /// still holds the keys to read them.
    pub fn ingest<'a>(&mut self, chunks: impl IntoIterator<Item = (Name, &'a [u8])>) -> Result<Vec<Event>, MlsError> {
        let mut events = Vec::new();
        let mut commits = Vec::new();
        let mut touched = BTreeSet::new();
        for (name, data) in chunks {
            match self.org.parse(name) {
                Some(Parsed::Message { team, channel, device, msg }) => self.on_message(name, team, channel, device, msg, data, &mut events),
                Some(Parsed::Welcome { hkp54, .. }) => self.on_welcome(name, hkp54, data, &mut events),
                Some(Parsed::Commit { team, epoch, .. }) => commits.push((name, team, epoch, data)),
                Some(Parsed::KeyPackage { .. }) | None => {}
            }
        }
        for (name, team, epoch, data) in commits {
            let Some(t) = self.teams.get_mut(&team) else { continue };
            if epoch <= t.epoch {
                self.counters.duplicates += 1;
                continue;
            }
            match Fragment::decode(Path::Commit, data) {
                Ok(f) => {
                    if let Err(e) = t.commits.entry(epoch).or_default().add(f) {
                        self.reject(name, format!("commit fragment: {e}"), &mut events);
                    }
                    touched.insert(team);
                }
                Err(e) => self.reject(name, format!("commit fragment: {e}"), &mut events),
            }
        }
        for team in touched {
            self.advance(team, &mut events);
        }
        self.engine.write()?;
        Ok(events)
    }

    /// Makes what [`Device::ingest`] wrote durable. (Every other change is durable when its
    /// call returns.)
    pub fn sync(&mut self) -> Result<(), MlsError> {
        self.engine.sync()
    }

    fn reject(&mut self, name: Name, reason: String, events: &mut Vec<Event>) {
        self.counters.rejected += 1;
        events.push(Event::Rejected { name, reason });
    }

    #[allow(clippy::too_many_arguments)]
    fn on_message(&mut self, name: Name, team: u32, channel: u16, device: u32, msg: u32, data: &[u8], events: &mut Vec<Event>) {
        let Some(t) = self.teams.get_mut(&team) else { return };
        let f = match Fragment::decode(Path::Message, data) {
            Ok(f) => f,
            Err(e) => {
                // Garbage under this device's own next name takes the name: skip past it.
                if device == t.meta.device {
                    let next = t.meta.next_msg.entry(channel).or_insert(1);
                    *next = (*next).max(msg + 1);
                    self.engine.vault.put(&team_key(team), &serde_json::to_vec(&t.meta).expect("serializable"));
                }
                return self.reject(name, format!("message fragment: {e}"), events);
            }
        };
        let Some(first) = msg.checked_sub(u32::from(f.index)) else {
            return self.reject(name, "fragment index beyond the message number".into(), events);
        };
        let key = (channel, device, first);
        if t.done.contains(&key) {
            self.counters.duplicates += 1;
            return;
        }
        if device == t.meta.device {
            // Not in this device's history, yet under its name: someone took the name.
            let next = t.meta.next_msg.entry(channel).or_insert(1);
            *next = (*next).max(first + u32::from(f.count));
            self.engine.vault.put(&team_key(team), &serde_json::to_vec(&t.meta).expect("serializable"));
        }
        let asm = t.parts.entry(key).or_default();
        if let Err(e) = asm.add(f) {
            return self.reject(name, format!("message fragment: {e}"), events);
        }
        let Some(object) = asm.finish() else { return };
        t.parts.remove(&key);
        match object {
            Ok(object) => self.process_message(team, name, key, object, events),
            Err(e) => {
                self.mark_done(team, key);
                self.reject(name, format!("message: {e}"), events)
            }
        }
    }

    fn mark_done(&mut self, team: u32, key: Key3) {
        if let Some(t) = self.teams.get_mut(&team) {
            t.done.insert(key);
            self.engine.vault.put(&done_key(team, key), b"");
        }
    }

    fn process_message(&mut self, team: u32, name: Name, key: Key3, object: Vec<u8>, events: &mut Vec<Event>) {
        let protocol = match MlsMessageIn::tls_deserialize_exact(&object).ok().and_then(|m| m.try_into_protocol_message().ok()) {
            Some(p) => p,
            None => {
                self.mark_done(team, key);
                return self.reject(name, "not an MLS protocol message".into(), events);
            }
        };
        let Some(t) = self.teams.get_mut(&team) else { return };
        let epoch = protocol.epoch().as_u64();
        if protocol.group_id() != &engine::group_id(&self.org, team) {
            self.mark_done(team, key);
            return self.reject(name, "an MLS message of another group".into(), events);
        }
        if epoch > t.epoch {
            let held: usize = t.held.values().map(Vec::len).sum();
            if held >= self.max_held {
                self.counters.held_dropped += 1;
                t.overflowed = true;
                return;
            }
            self.counters.held += 1;
            t.held.entry(epoch).or_default().push((name, key, object));
            return;
        }
        let result = self.decrypt(team, key, protocol);
        self.mark_done(team, key);
        match result {
            Ok(Some(stored)) if stored.user.is_some_and(|u| self.contacts.is_blocked(&u)) => {
                // Never shown, not even after an unblock: dropped unread, and counted.
                self.counters.blocked += 1;
            }
            Ok(Some(stored)) => {
                let t = self.teams.get_mut(&team).expect("team exists");
                let id = stored.message.replaces.unwrap_or(stored.id);
                self.engine.vault.put(&msg_key(team, key), &serde_json::to_vec(&stored).expect("serializable"));
                t.history.entry(key.0).or_default().insert(stored.id, stored);
                self.counters.messages += 1;
                events.push(Event::Message { team, channel: key.0, id });
            }
            Ok(None) => {}
            Err(reason) => self.reject(name, reason, events),
        }
    }

    fn decrypt(&mut self, team: u32, key: Key3, protocol: ProtocolMessage) -> Result<Option<Stored>, String> {
        let mut group = self.engine.take_group(&self.org, team).map_err(|e| e.to_string())?.ok_or("no group")?;
        let processed = group.process_message(&self.engine.provider, protocol).map_err(|e| format!("cannot decrypt: {e}"))?;
        self.engine.keep_group(group);
        let Sender::Member(leaf) = *processed.sender() else { return Err("not sent by a member".into()) };
        let t = &self.teams[&team];
        let sender = t.record.device_of(leaf.u32()).ok_or("sent from a leaf with no device id")?;
        // The leaf's binding was checked when it joined.
        let user = identity::claimed_user(processed.credential());
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => {
                if sender != key.1 {
                    return Err(format!("device {sender} sent a message under device {}'s name", key.1));
                }
                let message = Message::decode(&app.into_bytes()).map_err(|e| format!("payload: {e}"))?;
                let stored = Stored { id: MsgRef { device: key.1, msg: key.2 }, message, user };
                // An edit counts only from the original's user. If the original has not
                // arrived yet, that is decided when the channel is shown (`may_edit`).
                if let Some(target) = stored.message.replaces
                    && let Some(original) = t.history.get(&key.0).and_then(|h| h.get(&target))
                    && !may_edit(original, &stored)
                {
                    return Err(format!("device {sender} tried to edit device {}'s message {}, of another user", target.device, target.msg));
                }
                Ok(Some(stored))
            }
            // Our own message echoed back: dedup by name normally catches it first.
            ProcessedMessageContent::OwnPrivateMessage => Ok(None),
            _ => Err("not an application message".into()),
        }
    }

    fn on_welcome(&mut self, name: Name, hkp54: u64, data: &[u8], events: &mut Vec<Event>) {
        if !self.waiting.contains_key(&hkp54) {
            return;
        }
        let f = match Fragment::decode(Path::Welcome, data) {
            Ok(f) => f,
            Err(e) => return self.reject(name, format!("welcome fragment: {e}"), events),
        };
        let asm = self.welcomes.entry(hkp54).or_default();
        if let Err(e) = asm.add(f) {
            return self.reject(name, format!("welcome fragment: {e}"), events);
        }
        let Some(object) = asm.finish() else { return };
        self.welcomes.remove(&hkp54);
        match object.map_err(|e| e.to_string()).and_then(|o| self.join(&o)) {
            Ok((team, device)) => {
                let hkp = self.waiting.remove(&hkp54).expect("waiting");
                self.engine.vault.delete(format!("w/{}", hex(&hkp)).as_bytes());
                events.push(Event::Joined { team, device });
            }
            Err(reason) => self.reject(name, format!("welcome: {reason}"), events),
        }
    }

    fn join(&mut self, object: &[u8]) -> Result<(u32, u32), String> {
        let welcome = match MlsMessageIn::tls_deserialize_exact(object).map_err(|e| e.to_string())?.extract() {
            MlsMessageBodyIn::Welcome(w) => w,
            _ => return Err("not a welcome".into()),
        };
        let staged = StagedWelcome::new_from_welcome(&self.engine.provider, &join_config(), welcome, None).map_err(|e| e.to_string())?;
        for m in staged.members() {
            identity::check(self.engine.provider.crypto(), &m.credential, m.signature_key.as_slice())
                .map_err(|e| format!("member at leaf {}: {e}", m.index.u32()))?;
        }
        let group = staged.into_group(&self.engine.provider).map_err(|e| e.to_string())?;
        let record = record_of(&group).map_err(|e| e.to_string())?;
        let team = record.team;
        if record.org != self.org.org() || group.group_id() != &engine::group_id(&self.org, team) {
            return Err(format!("a welcome to org {} team {team}, which is not this org's", record.org));
        }
        let device = record.device_of(group.own_leaf_index().u32()).ok_or("the team record gives this device no id")?;
        if self.teams.contains_key(&team) {
            return Err(format!("already in team {team}"));
        }
        let meta = TeamMeta { device, next_msg: BTreeMap::new() };
        self.engine.vault.put(&team_key(team), &serde_json::to_vec(&meta).expect("serializable"));
        let epoch = group.epoch().as_u64();
        self.engine.keep_group(group);
        self.teams.insert(
            team,
            Team { record, epoch, meta, commits: BTreeMap::new(), parts: HashMap::new(), held: BTreeMap::new(), overflowed: false, done: BTreeSet::new(), history: BTreeMap::new() },
        );
        Ok((team, device))
    }

    /// Applies every commit that is next in line, releasing held messages after each.
    fn advance(&mut self, team: u32, events: &mut Vec<Event>) {
        loop {
            let Some(t) = self.teams.get_mut(&team) else { return };
            let next = t.epoch + 1;
            // Commits for epochs already passed are duplicates.
            t.commits.retain(|e, _| *e >= next);
            let Some(object) = t.commits.get(&next).and_then(Assembly::finish) else {
                if t.overflowed && t.held.is_empty() {
                    t.overflowed = false;
                    events.push(Event::Refetch { team });
                }
                return;
            };
            t.commits.remove(&next);
            let name = self.org.commit(team, next, 0).expect("valid commit name");
            match object.map_err(|e| e.to_string()).and_then(|o| self.apply_commit(team, &o)) {
                Ok(()) => {
                    self.counters.commits += 1;
                    events.push(Event::Epoch { team, epoch: next });
                    let t = self.teams.get_mut(&team).expect("team exists");
                    let held = t.held.remove(&next).unwrap_or_default();
                    for (name, key, object) in held {
                        self.process_message(team, name, key, object, events);
                    }
                }
                Err(reason) => {
                    self.reject(name, format!("commit for epoch {next}: {reason}"), events);
                    return;
                }
            }
        }
    }

    fn apply_commit(&mut self, team: u32, object: &[u8]) -> Result<(), String> {
        let protocol = MlsMessageIn::tls_deserialize_exact(object).ok().and_then(|m| m.try_into_protocol_message().ok()).ok_or("not an MLS protocol message")?;
        let mut group = self.engine.take_group(&self.org, team).map_err(|e| e.to_string())?.ok_or("no group")?;
        let t = &self.teams[&team];
        let processed = group.process_message(&self.engine.provider, protocol).map_err(|e| e.to_string())?;
        let Sender::Member(leaf) = *processed.sender() else { return Err("not sent by a member".into()) };
        if t.record.device_of(leaf.u32()) != Some(0) {
            return Err("only device 0, the committer, may commit".into());
        }
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            return Err("not a commit".into());
        };
        check_leaves(self.engine.provider.crypto(), &staged)?;
        group.merge_staged_commit(&self.engine.provider, *staged).map_err(|e| e.to_string())?;
        let record = record_of(&group).map_err(|e| e.to_string())?;
        let t = self.teams.get_mut(&team).expect("team exists");
        t.record = record;
        t.epoch = group.epoch().as_u64();
        self.engine.keep_group(group);
        Ok(())
    }
}

/// Checks the binding of every leaf a staged commit brings in or changes: its adds, its
/// updates, and the committer's own path.
fn check_leaves(crypto: &impl openmls_traits::crypto::OpenMlsCrypto, staged: &StagedCommit) -> Result<(), String> {
    let mut leaves: Vec<&LeafNode> = staged.update_path_leaf_node().into_iter().collect();
    for p in staged.queued_proposals() {
        match p.proposal() {
            Proposal::Add(add) => leaves.push(add.key_package().leaf_node()),
            Proposal::Update(update) => leaves.push(update.leaf_node()),
            _ => {}
        }
    }
    for leaf in leaves {
        identity::check(crypto, leaf.credential(), leaf.signature_key().as_slice()).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Whether `edit` may replace the text of `original`: it comes from a device of the same
/// user, or (for devices without users) from the same device.
fn may_edit(original: &Stored, edit: &Stored) -> bool {
    match (original.user, edit.user) {
        (Some(a), Some(b)) => a == b,
        _ => original.id.device == edit.id.device,
    }
}

/// A stored message as shown, with its latest edit (if any) applied.
fn show(history: &BTreeMap<MsgRef, Stored>, s: &Stored, edit: Option<&Stored>) -> Shown {
    Shown {
        user: s.user,
        id: s.id,
        sent_ms: s.message.created_ms,
        text: edit.map_or(&s.message.text, |e| &e.message.text).clone(),
        reply_to: s.message.reply_to.map(|r| thread_root(history, r)),
        edited: edit.is_some(),
    }
}

/// The message a reply's thread hangs from: threads are one level deep, so follow reply_to to
/// the message that has none (at most 64 steps, against loops).
fn thread_root(history: &BTreeMap<MsgRef, Stored>, mut r: MsgRef) -> MsgRef {
    for _ in 0..64 {
        match history.get(&r).and_then(|s| s.message.reply_to) {
            Some(up) if up != r => r = up,
            _ => break,
        }
    }
    r
}
