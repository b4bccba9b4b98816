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
use crate::engine::{self, Engine, MlsError, Record, hex, join_config, mls};
use crate::fragment::{self, Assembly, Fragment};
use crate::identity::{self, UserId};
use crate::names::{ConvId, Gid, MAX_MSG, Org, Parsed, ParsedUser, Path, Users, hkp54};
use crate::payload::{ConvRecord, Message, MsgRef, TeamRecord};
use crate::seal::{Backend, Key};

/// The most complete messages held for future epochs, per group (by default; see
/// [`Device::set_max_held`]). More are dropped and counted, and once the group has caught up
/// [`Event::Refetch`] asks for them again from the cache.
pub const MAX_HELD: usize = 10_000;

/// The channel a conversation's messages are on: conversations have one.
pub const CONV_CHANNEL: u16 = 0;

impl From<u32> for Gid {
    fn from(team: u32) -> Gid {
        Gid::Team(team)
    }
}

impl From<ConvId> for Gid {
    fn from(conv: ConvId) -> Gid {
        Gid::Conv(conv)
    }
}

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
    /// Where it came in this device's order of arrival (0 before arrival order was kept):
    /// what unread counts are counted against.
    #[serde(default)]
    pub seq: u64,
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
    /// Whether it is a group operation (its text says what it did).
    pub control: bool,
}

/// Something an ingest did that the caller shows or acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The device joined a group.
    Joined {
        /// The group.
        group: Gid,
        /// This device's id in it.
        device: u32,
    },
    /// A group moved to a new epoch.
    Epoch {
        /// The group.
        group: Gid,
        /// The new epoch.
        epoch: u64,
    },
    /// A message arrived (an edit arrives as the message it edits, with its new text).
    Message {
        /// The group.
        group: Gid,
        /// Channel ([`CONV_CHANNEL`] in a conversation).
        channel: u16,
        /// The message's id (the original's, for an edit).
        id: MsgRef,
    },
    /// A key package of a device of `user` that this device had not seen, checked: see
    /// [`Device::key_packages_of`].
    KeyPackage {
        /// The user.
        user: UserId,
    },
    /// Messages of this group were dropped while too many were held for future epochs, and
    /// the group has caught up since: fetch its messages again from the cache (what was
    /// processed already is skipped by name).
    Refetch {
        /// The group.
        group: Gid,
    },
    /// `by` asked this device's user for fresh key packages (the seed's `PUBLIC_KEY`
    /// request): the next supply check publishes what is missing ([`Device::ensure_key_package`]).
    KeyPackagesRequested {
        /// Who asked.
        by: UserId,
    },
    /// This device took on the identity of `user`, handed over by a device of theirs
    /// (`device link`): it is that user's device from now on.
    Linked {
        /// The user.
        user: UserId,
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
    /// Requests for this user's key packages answered.
    pub requests: u64,
}

pub(crate) type Key3 = (u16, u32, u32);

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct GroupMeta {
    pub(crate) device: u32,
    pub(crate) next_msg: BTreeMap<u16, u32>,
    /// This device was removed from the group: its history stays, nothing new is read.
    #[serde(default)]
    pub(crate) removed: bool,
    /// The commit for the next epoch could not be applied: the group is stalled (a fork,
    /// or a committer gone wrong) until the device leaves it and is added again.
    #[serde(default)]
    pub(crate) stalled: Option<String>,
}

pub(crate) struct Group {
    pub(crate) record: Record,
    pub(crate) epoch: u64,
    pub(crate) meta: GroupMeta,
    commits: BTreeMap<u64, Assembly>,
    parts: HashMap<Key3, Assembly>,
    held: BTreeMap<u64, Vec<(Name, Key3, Vec<u8>)>>,
    /// Messages were dropped because too many were held: fetch them again once caught up.
    overflowed: bool,
    /// Message keys processed or refused: never processed again.
    pub(crate) done: BTreeSet<Key3>,
    pub(crate) history: BTreeMap<u16, BTreeMap<MsgRef, Stored>>,
}

impl Group {
    pub(crate) fn new(record: Record, epoch: u64, meta: GroupMeta) -> Group {
        Group { record, epoch, meta, commits: BTreeMap::new(), parts: HashMap::new(), held: BTreeMap::new(), overflowed: false, done: BTreeSet::new(), history: BTreeMap::new() }
    }

    fn has_channel(&self, channel: u16) -> bool {
        match &self.record {
            Record::Team(r) => r.channels.contains_key(&channel) || channel == crate::names::MANAGEMENT_CHANNEL,
            Record::Conv(_) => channel == CONV_CHANNEL,
        }
    }
}

/// Which name space a key package was published in, and so where its welcome comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Space {
    /// The org's: a single-use key package for a team add.
    Org,
    /// The users' space of the device's domain: a last-resort key package anyone may use to
    /// start a conversation, kept until it is replaced.
    Users,
}

/// A key package this device published and waits for welcomes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Waiting {
    pub(crate) space: Space,
    /// When it was made, unix ms (0 if unknown).
    pub(crate) created_ms: u64,
    /// Made by `device key-package --link`: a device of another user may welcome it to their
    /// devices' group and hand it their identity.
    pub(crate) link: bool,
    /// A one-time key package of the users' space (else a last-resort one there).
    pub(crate) one_time: bool,
    /// Someone claimed it (see [`crate::supply`]).
    pub(crate) claimed: bool,
    /// When its first welcome came (`Some(0)`: time not known yet); its keys go
    /// [`crate::supply::GRACE_MS`] later.
    pub(crate) used_ms: Option<u64>,
}

/// What this device knows of another device's key packages in a users' space.
#[derive(Debug, Clone, Default)]
pub struct KnownDevice {
    /// Its latest last-resort key package.
    pub last_resort: Option<KnownKeyPackage>,
    /// Its one-time key packages, by hKP.
    pub one_time: BTreeMap<Vec<u8>, KnownKeyPackage>,
}

/// Another device's key package, checked, as published in a users' space.
#[derive(Debug, Clone)]
pub struct KnownKeyPackage {
    /// The origin of the users' space it was published in (where its welcome goes).
    pub origin: u32,
    /// Its hKP.
    pub hkp: Vec<u8>,
    /// The key package.
    pub key_package: KeyPackage,
}

/// One device's MLS state and history.
pub struct Device<B: Backend> {
    pub(crate) engine: Engine<B>,
    pub(crate) org: Org,
    pub(crate) groups: BTreeMap<Gid, Group>,
    /// Key packages published that welcomes may come for, by hKP.
    pub(crate) waiting: BTreeMap<Vec<u8>, Waiting>,
    welcomes: HashMap<Vec<u8>, Assembly>,
    /// Welcomes in the users' space being assembled, by name without the fragment byte.
    user_welcomes: HashMap<u128, Assembly>,
    /// Welcomes in the users' space already processed (joined or refused), by name without
    /// the fragment byte: never processed again.
    welcomed: BTreeSet<u128>,
    /// Key packages of other devices, by user, then by device signature key.
    pub(crate) known: BTreeMap<UserId, BTreeMap<Vec<u8>, KnownDevice>>,
    /// Key packages claimed (see [`crate::supply`]), by name without the fragment byte.
    pub(crate) claimed: BTreeSet<u128>,
    /// Key package requests to this user already seen, by name without the fragment byte.
    pub(crate) seen_requests: BTreeSet<u128>,
    /// One-time key packages whose keys were erased (hKPs): a welcome for one is refused
    /// with a reason, not ignored.
    pub(crate) spent: BTreeSet<Vec<u8>>,
    /// The UI's sealed pipeline states, by group.
    pub(crate) pipeline_states: BTreeMap<ConvId, crate::pipeline::Saved>,
    /// Other secrets Secure keeps for the user (signing keys of pipelines), by name.
    pub(crate) secrets: BTreeMap<String, Vec<u8>>,
    /// Key package fragments being assembled, by name without the fragment byte.
    kp_parts: HashMap<u128, Assembly>,
    /// What ingest did so far.
    pub counters: Counters,
    max_held: usize,
    pub(crate) contacts: Contacts,
    /// Conversation messages written while no key package of the peer was known: per peer,
    /// in order. Sent once the conversation can be started.
    pub(crate) pending: BTreeMap<UserId, Vec<(u64, Message)>>,
    /// Group operations accepted from admins, for groups this device commits for: carried
    /// out by [`Device::run_ops`].
    pub(crate) ops: Vec<(ConvId, crate::payload::Control)>,
    /// The arrival number the next stored message gets.
    pub(crate) next_seq: u64,
    /// Per chat, the arrival number of the last message read.
    pub(crate) read_up_to: BTreeMap<String, u64>,
    /// Marked (starred) messages.
    pub(crate) marked: BTreeSet<(Gid, u16, MsgRef)>,
    /// Welcomes refused because a blocked user made the conversation: processed again if the
    /// block is lifted.
    refused_blocked: BTreeMap<u128, UserId>,
    /// Set by a refusal for a block, for the welcome being processed.
    refusal_blocked: Option<UserId>,
    /// Set while processing a welcome that holds secrets for a `--link` key package.
    joining_link: bool,
    /// `device link`: key packages asked for, by the first 54 bits of their hKP.
    pub(crate) linking: BTreeMap<u64, Vec<u8>>,
    pub(crate) link_parts: HashMap<u64, Assembly>,
    /// Key packages to link, assembled by ingest: carried out by [`Device::run_links`].
    pub(crate) link_ready: Vec<(Vec<u8>, Vec<u8>)>,
    /// hKPs linked so far (since start).
    pub(crate) linked: Vec<Vec<u8>>,
}

/// One member of a group, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its device id in the group.
    pub device: u32,
    /// Its user, if its credential carries one.
    pub user: Option<UserId>,
    /// Whether it is this device.
    pub me: bool,
}

pub(crate) fn group_key(group: Gid) -> Vec<u8> {
    format!("t/{group}").into_bytes()
}
fn msg_key(group: Gid, k: Key3) -> Vec<u8> {
    format!("h/{group}/{}/{}/{}", k.0, k.1, k.2).into_bytes()
}
fn done_key(group: Gid, k: Key3) -> Vec<u8> {
    format!("d/{group}/{}/{}/{}", k.0, k.1, k.2).into_bytes()
}
fn contact_key(user: &UserId) -> Vec<u8> {
    format!("c/{user}").into_bytes()
}
pub(crate) fn waiting_key(hkp: &[u8]) -> Vec<u8> {
    format!("w/{}", hex(hkp)).into_bytes()
}
pub(crate) fn pending_key(user: &UserId, seq: u64) -> Vec<u8> {
    format!("p/{user}/{seq:016x}").into_bytes()
}
fn parse_key3(rest: &str) -> Option<(Gid, Key3)> {
    let mut it = rest.split('/');
    let g = Gid::parse(it.next()?)?;
    let mut num = || it.next()?.parse::<u32>().ok();
    let (c, d, m) = (num()?, num()?, num()?);
    Some((g, (u16::try_from(c).ok()?, d, m)))
}

/// A waiting record's value: `o` (org space), or `u` and the creation time.
pub(crate) fn encode_waiting(w: &Waiting) -> Vec<u8> {
    match (w.space, w.link, w.one_time) {
        (Space::Org, false, _) => Vec::new(),
        (Space::Org, true, _) => b"l".to_vec(),
        (Space::Users, _, false) => format!("u{}", w.created_ms).into_bytes(),
        (Space::Users, _, true) => format!("t{}:{}:{}", w.created_ms, u8::from(w.claimed), w.used_ms.map_or_else(|| "-".to_string(), |t| t.to_string())).into_bytes(),
    }
}

fn decode_waiting(v: &[u8]) -> Waiting {
    let text = std::str::from_utf8(v).unwrap_or("");
    let org = Waiting { space: Space::Org, created_ms: 0, link: text == "l", one_time: false, claimed: false, used_ms: None };
    if let Some(ms) = text.strip_prefix('u') {
        return Waiting { space: Space::Users, created_ms: ms.parse().unwrap_or(0), ..org };
    }
    if let Some(rest) = text.strip_prefix('t') {
        let mut parts = rest.split(':');
        let created_ms = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let claimed = parts.next() == Some("1");
        let used_ms = parts.next().and_then(|p| p.parse().ok());
        return Waiting { space: Space::Users, created_ms, link: false, one_time: true, claimed, used_ms };
    }
    org
}

impl<B: Backend> Device<B> {
    /// Opens the device's sealed state.
    pub fn open(key: Key, backend: B, org: Org) -> Result<Device<B>, MlsError> {
        let (engine, contents) = Engine::open(key, backend, "device")?;
        let bad = |what: &str| MlsError::Malformed { what: "state", detail: what.to_string() };
        let mut device = Device {
            engine,
            org,
            groups: BTreeMap::new(),
            waiting: BTreeMap::new(),
            welcomes: HashMap::new(),
            user_welcomes: HashMap::new(),
            welcomed: BTreeSet::new(),
            known: BTreeMap::new(),
            claimed: BTreeSet::new(),
            seen_requests: BTreeSet::new(),
            spent: BTreeSet::new(),
            pipeline_states: BTreeMap::new(),
            secrets: BTreeMap::new(),
            kp_parts: HashMap::new(),
            counters: Counters::default(),
            max_held: MAX_HELD,
            contacts: Contacts::default(),
            pending: BTreeMap::new(),
            ops: Vec::new(),
            next_seq: 1,
            read_up_to: BTreeMap::new(),
            marked: BTreeSet::new(),
            refused_blocked: BTreeMap::new(),
            refusal_blocked: None,
            joining_link: false,
            linking: BTreeMap::new(),
            link_parts: HashMap::new(),
            link_ready: Vec::new(),
            linked: Vec::new(),
        };
        for (k, v) in &contents.app {
            let Ok(k) = std::str::from_utf8(k) else { continue };
            if let Some(g) = k.strip_prefix("t/").and_then(Gid::parse) {
                let meta: GroupMeta = serde_json::from_slice(v).map_err(|_| bad("group"))?;
                let id = engine::gid_group_id(&device.org, g);
                match device.engine.group_by_id(&id)? {
                    Some(group) => {
                        let record = engine::any_record_of(group)?;
                        let epoch = group.epoch().as_u64();
                        device.groups.insert(g, Group::new(record, epoch, meta));
                    }
                    // A group restored from a backup: its history, no MLS state.
                    None if meta.removed => {
                        let bytes = contents.app.get(format!("rec/{g}").as_bytes()).ok_or_else(|| bad("a restored group without its record"))?;
                        let record = Record::decode(bytes).map_err(|_| bad("a restored group's record"))?;
                        device.groups.insert(g, Group::new(record, 0, meta));
                    }
                    None => return Err(bad("a group without its MLS state")),
                }
            }
        }
        for (k, v) in &contents.app {
            let Ok(k) = std::str::from_utf8(k) else { continue };
            if let Some(rest) = k.strip_prefix("h/") {
                let (g, key) = parse_key3(rest).ok_or_else(|| bad("history key"))?;
                let stored: Stored = serde_json::from_slice(v).map_err(|_| bad("history"))?;
                device.next_seq = device.next_seq.max(stored.seq + 1);
                if let Some(t) = device.groups.get_mut(&g) {
                    t.done.insert(key);
                    t.history.entry(key.0).or_default().insert(stored.id, stored);
                }
            } else if let Some(rest) = k.strip_prefix("d/") {
                let (g, key) = parse_key3(rest).ok_or_else(|| bad("done key"))?;
                if let Some(t) = device.groups.get_mut(&g) {
                    t.done.insert(key);
                }
            } else if let Some(chat) = k.strip_prefix("r/") {
                let seq = std::str::from_utf8(v).ok().and_then(|v| v.parse().ok()).ok_or_else(|| bad("read marker"))?;
                device.read_up_to.insert(chat.to_string(), seq);
            } else if let Some(rest) = k.strip_prefix("m/") {
                let (g, key) = parse_key3(rest).ok_or_else(|| bad("mark"))?;
                device.marked.insert((g, key.0, MsgRef { device: key.1, msg: key.2 }));
            } else if let Some(whole) = k.strip_prefix("xb/").and_then(|x| u128::from_str_radix(x, 16).ok()) {
                let user = std::str::from_utf8(v).ok().and_then(UserId::parse).ok_or_else(|| bad("refused welcome"))?;
                device.refused_blocked.insert(whole, user);
            } else if let Some(whole) = k.strip_prefix("x/").and_then(|x| u128::from_str_radix(x, 16).ok()) {
                device.welcomed.insert(whole);
            } else if let Some(name) = k.strip_prefix("sk/") {
                device.secrets.insert(name.to_string(), v.to_vec());
            } else if let Some(conv) = k.strip_prefix(crate::pipeline::SAVED_PREFIX).and_then(ConvId::parse) {
                if let Ok(saved) = serde_json::from_slice(v) {
                    device.pipeline_states.insert(conv, saved);
                }
            } else if let Some(hkp) = k.strip_prefix("ws/").and_then(engine::unhex) {
                device.spent.insert(hkp);
            } else if let Some(hkp) = k.strip_prefix("w/").and_then(engine::unhex) {
                device.waiting.insert(hkp, decode_waiting(v));
            } else if let Some(user) = k.strip_prefix("c/").and_then(UserId::parse) {
                let contact: Contact = serde_json::from_slice(v).map_err(|_| bad("contact"))?;
                device.contacts.set(user, contact);
            } else if let Some(rest) = k.strip_prefix("p/") {
                let (user, seq) = rest.split_once('/').ok_or_else(|| bad("pending key"))?;
                let user = UserId::parse(user).ok_or_else(|| bad("pending key"))?;
                let seq = u64::from_str_radix(seq, 16).map_err(|_| bad("pending key"))?;
                let message: Message = serde_json::from_slice(v).map_err(|_| bad("pending message"))?;
                device.pending.entry(user).or_default().push((seq, message));
            }
        }
        Ok(device)
    }

    /// The org.
    pub fn org(&self) -> &Org {
        &self.org
    }

    /// The users' space of this device's domain.
    pub fn users(&self) -> Users {
        Users::at(self.org.origin())
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
    /// Welcomes to conversations a blocked user created are refused.
    ///
    /// Lifting a block takes again the welcomes refused because of it, so conversations the
    /// user started meanwhile appear (the caller fetches its welcomes again); what the user
    /// wrote before `now_ms` is still not shown.
    pub fn set_blocked(&mut self, user: UserId, blocked: bool, now_ms: u64) -> Result<Contact, MlsError> {
        if user == self.user_id() {
            return Err(ContactError::Yourself.into());
        }
        let old = self.contacts.get(&user).cloned().unwrap_or_default();
        let unblocked_ms = if old.blocked && !blocked { now_ms } else { old.unblocked_ms };
        if !blocked {
            let again: Vec<u128> = self.refused_blocked.iter().filter(|(_, u)| **u == user).map(|(w, _)| *w).collect();
            for whole in again {
                self.refused_blocked.remove(&whole);
                self.welcomed.remove(&whole);
                self.engine.vault.delete(format!("xb/{whole:x}").as_bytes());
                self.engine.vault.delete(format!("x/{whole:x}").as_bytes());
            }
        }
        self.set_contact(user, Contact { blocked, unblocked_ms, ..old })
    }

    /// The teams this device is in: `(team, record, epoch, own device id)`.
    pub fn teams(&self) -> impl Iterator<Item = (u32, &TeamRecord, u64, u32)> {
        self.groups.iter().filter_map(|(g, t)| match (g, &t.record) {
            (Gid::Team(id), Record::Team(r)) => Some((*id, r, t.epoch, t.meta.device)),
            _ => None,
        })
    }

    /// The conversations this device is in: `(conversation, record, epoch, own device id)`.
    pub fn convs(&self) -> impl Iterator<Item = (ConvId, &ConvRecord, u64, u32)> {
        self.groups.iter().filter_map(|(g, t)| match (g, &t.record) {
            (Gid::Conv(id), Record::Conv(r)) => Some((*id, r, t.epoch, t.meta.device)),
            _ => None,
        })
    }

    /// Every group this device is in, teams and conversations, but not those it was
    /// removed from.
    pub fn groups(&self) -> impl Iterator<Item = Gid> + '_ {
        self.groups.iter().filter(|(_, t)| !t.meta.removed).map(|(g, _)| *g)
    }

    /// Whether this device was removed from a group (or left it).
    pub fn is_removed(&self, group: impl Into<Gid>) -> bool {
        self.groups.get(&group.into()).is_some_and(|t| t.meta.removed)
    }

    /// Why a group is stalled, if it is: the commit for its next epoch was refused, so
    /// nothing newer can be read. Recovery: [`Device::leave`], then be added again.
    pub fn stalled(&self, group: impl Into<Gid>) -> Option<&str> {
        self.groups.get(&group.into())?.meta.stalled.as_deref()
    }

    /// Leaves a group on this device only: its history stays, nothing new is read, and a
    /// welcome to it is taken again (how a stalled group recovers: an admin removes and adds
    /// the user again, or the committer re-adds the device).
    pub fn leave(&mut self, group: impl Into<Gid>) -> Result<(), MlsError> {
        let g = group.into();
        let t = self.groups.get_mut(&g).ok_or_else(|| MlsError::UnknownTeam(g.to_string()))?;
        t.meta.removed = true;
        t.held.clear();
        t.commits.clear();
        self.engine.vault.put(&group_key(g), &serde_json::to_vec(&t.meta).expect("serializable"));
        // Its welcomes may be processed again.
        self.engine.persist()
    }

    /// A group's epoch and this device's id in it.
    pub fn group_state(&self, group: impl Into<Gid>) -> Option<(u64, u32)> {
        self.groups.get(&group.into()).map(|t| (t.epoch, t.meta.device))
    }

    /// The hKPs whose welcomes this device waits for.
    pub fn waiting(&self) -> impl Iterator<Item = &[u8]> {
        self.waiting.keys().map(Vec::as_slice)
    }

    /// The filters the welcomes this device waits for come under: one per team key package,
    /// and its user's welcomes in its users' space once it has published a key package there.
    pub fn welcome_filters(&self) -> Vec<canopy::Filter> {
        let mut out: Vec<canopy::Filter> = self.waiting.iter().filter(|(_, w)| w.space == Space::Org).map(|(hkp, _)| self.org.welcome_filter(hkp)).collect();
        if self.waiting.values().any(|w| w.space == Space::Users) {
            out.push(self.users().welcomes(&self.user_id()));
        }
        out
    }

    /// A team's id, from its id text or its name.
    pub fn resolve_team(&self, which: &str) -> Result<u32, MlsError> {
        let numeric = !which.is_empty() && which.bytes().all(|b| b.is_ascii_digit());
        self.teams()
            .find(|(id, r, ..)| if numeric { id.to_string() == which } else { r.name == which })
            .map(|(id, ..)| id)
            .ok_or_else(|| MlsError::UnknownTeam(which.to_string()))
    }

    /// A channel's id in a team, from its id text or name.
    pub fn resolve_channel(&self, team: u32, which: &str) -> Result<u16, MlsError> {
        let (_, record, ..) = self.teams().find(|(t, ..)| *t == team).ok_or_else(|| MlsError::UnknownTeam(team.to_string()))?;
        record.channel(which).ok_or_else(|| MlsError::UnknownChannel(format!("{}/{which}", record.name)))
    }

    /// Sets how many messages a group may hold for future epochs ([`MAX_HELD`] by default).
    pub fn set_max_held(&mut self, max: usize) {
        self.max_held = max;
    }

    /// Epochs missing before the commits this device holds: `(first, last)` inclusive, if
    /// any. Until they arrive, the group cannot move on.
    pub fn missing_commits(&self, group: impl Into<Gid>) -> Option<(u64, u64)> {
        let t = self.groups.get(&group.into())?;
        let (&next, _) = t.commits.iter().find(|(e, _)| **e > t.epoch)?;
        (next > t.epoch + 1).then_some((t.epoch + 1, next - 1))
    }

    /// A group's members: device id, user, and whether it is this device.
    pub fn members(&mut self, group: impl Into<Gid>) -> Result<Vec<Member>, MlsError> {
        let g = group.into();
        let record = self.groups.get(&g).map(|t| t.record.clone()).ok_or_else(|| MlsError::UnknownTeam(g.to_string()))?;
        let id = engine::gid_group_id(&self.org, g);
        let group = self.engine.group_by_id(&id)?.ok_or_else(|| MlsError::UnknownTeam(g.to_string()))?;
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

    /// A fresh single-use key package for a team add: its hKP, and the chunks to publish.
    /// The device then waits for the welcome named after the hKP.
    /// With `link`, the key package asks to become a new device of another user, whose
    /// device runs `device link HKP`.
    pub fn key_package(&mut self, now_ms: u64, ttl_ms: u64, link: bool) -> Result<(Vec<u8>, Vec<Outgoing>), MlsError> {
        let (bytes, hkp) = self.engine.key_package(false)?;
        let outgoing = fragment::split(Path::KeyPackage, &bytes)?
            .into_iter()
            .enumerate()
            .map(|(i, data)| Outgoing { name: self.org.key_package(&hkp, i as u16), expiry_ms: now_ms + ttl_ms, data })
            .collect();
        let w = Waiting { space: Space::Org, created_ms: now_ms, link, one_time: false, claimed: false, used_ms: None };
        self.engine.vault.put(&waiting_key(&hkp), &encode_waiting(&w));
        self.engine.persist()?;
        self.waiting.insert(hkp.clone(), w);
        Ok((hkp, outgoing))
    }

    /// The name of fragment `msg` of a message of `device` in a group.
    fn message_name(&self, g: Gid, channel: u16, device: u32, msg: u32) -> Result<Name, MlsError> {
        Ok(match g {
            Gid::Team(team) => self.org.message(team, channel, device, msg)?,
            Gid::Conv(conv) => Users::message(conv, device, msg)?,
        })
    }

    /// Encrypts a message for a group's channel and returns its id and its chunks. The
    /// device keeps the plaintext in its history.
    pub fn send(&mut self, group: impl Into<Gid>, channel: u16, message: Message, now_ms: u64) -> Result<(MsgRef, Vec<Outgoing>), MlsError> {
        let payload = message.encode()?;
        self.send_payload(group.into(), channel, &payload, Some(message), now_ms)
    }

    /// Encrypts arbitrary plaintext bytes as a message of a group's channel, the way a member
    /// running its own code could: what the hostile-member tests send to see receivers
    /// refuse it. The history keeps nothing of it.
    #[cfg(feature = "testing")]
    pub fn send_raw(&mut self, group: impl Into<Gid>, channel: u16, payload: &[u8], now_ms: u64) -> Result<(MsgRef, Vec<Outgoing>), MlsError> {
        self.send_payload(group.into(), channel, payload, None, now_ms)
    }

    fn send_payload(&mut self, g: Gid, channel: u16, payload: &[u8], message: Option<Message>, now_ms: u64) -> Result<(MsgRef, Vec<Outgoing>), MlsError> {
        let t = self.groups.get(&g).ok_or_else(|| MlsError::UnknownTeam(g.to_string()))?;
        if t.meta.removed {
            return Err(MlsError::BadName(format!("this device was removed from {}", t.record.name())));
        }
        if !t.has_channel(channel) {
            return Err(MlsError::UnknownChannel(format!("{}/{channel}", t.record.name())));
        }
        let (device, ttl) = (t.meta.device, t.record.lifetimes().message_ms);
        let first = *t.meta.next_msg.get(&channel).unwrap_or(&1);
        let id = engine::gid_group_id(&self.org, g);
        let mut group = self.engine.take_group_by_id(&id)?.ok_or_else(|| MlsError::UnknownTeam(g.to_string()))?;
        let out = group.create_message(&self.engine.provider, &self.engine.signer, payload).map_err(mls)?;
        self.engine.keep_group(group);
        let bytes = out.tls_serialize_detached().map_err(mls)?;
        let pieces = fragment::split(Path::Message, &bytes)?;
        let count = pieces.len() as u32;
        if first.checked_add(count).is_none_or(|end| end - 1 > MAX_MSG) {
            return Err(MlsError::BadName(format!("device {device} has used every message number in channel {channel}")));
        }
        let mut outgoing = Vec::with_capacity(pieces.len());
        for (i, data) in pieces.into_iter().enumerate() {
            outgoing.push(Outgoing { name: self.message_name(g, channel, device, first + i as u32)?, expiry_ms: now_ms + ttl, data });
        }
        let id = MsgRef { device, msg: first };
        let key = (channel, id.device, id.msg);
        let stored = message.map(|message| Stored { id, message, user: Some(self.engine.user_id()), seq: self.take_seq() });
        if let Some(stored) = &stored {
            self.engine.vault.put(&msg_key(g, key), &serde_json::to_vec(stored).expect("serializable"));
        }
        let t = self.groups.get_mut(&g).expect("checked above");
        t.meta.next_msg.insert(channel, first + count);
        t.done.insert(key);
        self.engine.vault.put(&group_key(g), &serde_json::to_vec(&t.meta).expect("serializable"));
        if let Some(stored) = stored {
            t.history.entry(channel).or_default().insert(id, stored);
        }
        self.engine.persist()?;
        Ok((id, outgoing))
    }

    /// A secret kept for the user under `name` (a pipeline signing key), sealed like the rest.
    pub fn secret(&self, name: &str) -> Option<&[u8]> {
        self.secrets.get(name).map(Vec::as_slice)
    }

    /// Keeps a secret under `name`, replacing any.
    pub fn set_secret(&mut self, name: &str, value: &[u8]) -> Result<(), MlsError> {
        self.engine.vault.put(format!("sk/{name}").as_bytes(), value);
        self.secrets.insert(name.to_string(), value.to_vec());
        self.engine.persist()
    }

    /// Moves this device's next message number on a channel past `msg`, because that name is
    /// taken (a publish there was refused as a conflict).
    pub fn skip_taken(&mut self, group: impl Into<Gid>, channel: u16, msg: u32) -> Result<(), MlsError> {
        let g = group.into();
        let t = self.groups.get_mut(&g).ok_or_else(|| MlsError::UnknownTeam(g.to_string()))?;
        let next = t.meta.next_msg.entry(channel).or_insert(1);
        if *next <= msg {
            *next = msg + 1;
            self.engine.vault.put(&group_key(g), &serde_json::to_vec(&t.meta).expect("serializable"));
            self.engine.persist()?;
        }
        Ok(())
    }

    /// A refused publish, by name: which group, channel and message number it was.
    pub fn parse_message_name(&self, name: Name) -> Option<(Gid, u16, u32)> {
        match self.org.parse(name) {
            Some(Parsed::Message { team, channel, msg, .. }) => Some((Gid::Team(team), channel, msg)),
            _ => match Users::parse(name) {
                Some(ParsedUser::Message { conv, msg, .. }) => Some((Gid::Conv(conv), CONV_CHANNEL, msg)),
                _ => None,
            },
        }
    }

    /// The messages of a channel as every device shows them: ordered by creation time, ties
    /// broken by (device, msg); edits applied; replies attached to their thread's root.
    pub fn messages(&self, group: impl Into<Gid>, channel: u16) -> Vec<Shown> {
        let Some(history) = self.groups.get(&group.into()).and_then(|t| t.history.get(&channel)) else { return Vec::new() };
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
            .filter(|s| s.message.replaces.is_none() && !self.hidden(s) && !is_model_part(s))
            .map(|s| show(history, s, edits.get(&s.id).copied()))
            .collect();
        shown.sort_by_key(|s| (s.sent_ms, s.id));
        shown
    }

    /// One message as shown, edits applied: what [`Device::messages`] has for it, without
    /// building the whole channel (a follower gets each message as it arrives).
    pub fn message(&self, group: impl Into<Gid>, channel: u16, id: MsgRef) -> Option<Shown> {
        let history = self.groups.get(&group.into())?.history.get(&channel)?;
        let s = history.get(&id).filter(|s| s.message.replaces.is_none() && !self.hidden(s) && !is_model_part(s))?;
        let edit = history
            .values()
            .filter(|e| e.message.replaces == Some(id) && may_edit(s, e))
            .max_by_key(|e| (e.message.created_ms, e.id));
        Some(show(history, s, edit))
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    pub(crate) fn hidden(&self, s: &Stored) -> bool {
        s.user.is_some_and(|u| self.contacts.is_blocked(&u))
    }

    /// The original of a message, as stored (to check who may edit it).
    pub fn stored(&self, group: impl Into<Gid>, channel: u16, id: MsgRef) -> Option<&Stored> {
        self.groups.get(&group.into())?.history.get(&channel)?.get(&id)
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
                Some(Parsed::Message { team, channel, device, msg }) => self.on_message(name, Gid::Team(team), channel, device, msg, data, &mut events),
                Some(Parsed::Welcome { hkp54: top, .. }) => {
                    let hkp = self.waiting.iter().find(|(h, w)| w.space == Space::Org && hkp54(h) == top).map(|(h, _)| h.clone());
                    if let Some(hkp) = hkp {
                        self.on_welcome(name, hkp, data, &mut events);
                    }
                }
                Some(Parsed::Commit { team, epoch, .. }) => commits.push((name, Gid::Team(team), epoch, data)),
                Some(Parsed::KeyPackage { hkp54: top, .. }) => self.on_link_key_package(name, top, data, &mut events),
                None => match Users::parse(name) {
                    Some(ParsedUser::Message { conv, device, msg }) => self.on_message(name, Gid::Conv(conv), CONV_CHANNEL, device, msg, data, &mut events),
                    Some(ParsedUser::Welcome { user32, .. }) if user32 == crate::names::user32(&self.user_id()) => self.on_user_welcome(name, data, &mut events),
                    Some(ParsedUser::Welcome { .. }) => {}
                    Some(ParsedUser::Commit { conv, epoch, .. }) => commits.push((name, Gid::Conv(conv), epoch, data)),
                    Some(ParsedUser::KeyPackage { .. }) => self.on_key_package(name, data, &mut events),
                    None => {}
                },
            }
        }
        for (name, g, epoch, data) in commits {
            let Some(t) = self.groups.get_mut(&g) else { continue };
            if epoch <= t.epoch {
                self.counters.duplicates += 1;
                continue;
            }
            match Fragment::decode(Path::Commit, data) {
                Ok(f) => {
                    if let Err(e) = t.commits.entry(epoch).or_default().add(f) {
                        self.reject(name, format!("commit fragment: {e}"), &mut events);
                    }
                    touched.insert(g);
                }
                Err(e) => self.reject(name, format!("commit fragment: {e}"), &mut events),
            }
        }
        for g in touched {
            self.advance(g, &mut events);
        }
        self.engine.write()?;
        Ok(events)
    }

    /// Makes what [`Device::ingest`] wrote durable. (Every other change is durable when its
    /// call returns.)
    pub fn sync(&mut self) -> Result<(), MlsError> {
        self.engine.sync()
    }

    pub(crate) fn reject(&mut self, name: Name, reason: String, events: &mut Vec<Event>) {
        self.counters.rejected += 1;
        events.push(Event::Rejected { name, reason });
    }

    fn on_key_package(&mut self, name: Name, data: &[u8], events: &mut Vec<Event>) {
        let fragment = (name.to_u128() & 0xff) as u16;
        if fragment >= crate::supply::REQUEST_FRAGMENT {
            return self.on_kp_control(name, data, events);
        }
        let f = match Fragment::decode(Path::KeyPackage, data) {
            Ok(f) => f,
            Err(e) => return self.reject(name, format!("key package fragment: {e}"), events),
        };
        let whole = name.to_u128() >> 8;
        let asm = self.kp_parts.entry(whole).or_default();
        if let Err(e) = asm.add(f) {
            return self.reject(name, format!("key package fragment: {e}"), events);
        }
        let Some(object) = asm.finish() else { return };
        self.kp_parts.remove(&whole);
        let checked = match object.map_err(|e| MlsError::Malformed { what: "key package", detail: e.to_string() }).and_then(|o| engine::read_key_package(self.engine.provider.crypto(), &o)) {
            Ok(c) => c,
            Err(e) => return self.reject(name, format!("key package: {e}"), events),
        };
        // Published where its user and hKP say, or not at all.
        let origin = (name.to_u128() >> 104) as u32;
        if Users::at(origin).key_package(&checked.user, &checked.hkp, 0).ok().map(|n| n.to_u128() >> 8) != Some(whole) {
            return self.reject(name, format!("a key package of user {} published under another user's or hKP's name", checked.user), events);
        }
        let device_key = checked.key_package.leaf_node().signature_key().as_slice().to_vec();
        if device_key == self.public_key() {
            return;
        }
        let devices = self.known.entry(checked.user).or_default();
        let fresh = !devices.contains_key(&device_key);
        let device = devices.entry(device_key).or_default();
        let known = KnownKeyPackage { origin, hkp: checked.hkp.clone(), key_package: checked.key_package };
        if known.key_package.last_resort() {
            device.last_resort = Some(known);
        } else {
            device.one_time.insert(checked.hkp, known);
        }
        if fresh {
            events.push(Event::KeyPackage { user: checked.user });
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_message(&mut self, name: Name, g: Gid, channel: u16, device: u32, msg: u32, data: &[u8], events: &mut Vec<Event>) {
        let Some(t) = self.groups.get_mut(&g) else { return };
        if t.meta.removed {
            // No keys for what comes after the removal: nothing to hold it for.
            return;
        }
        let f = match Fragment::decode(Path::Message, data) {
            Ok(f) => f,
            Err(e) => {
                // Garbage under this device's own next name takes the name: skip past it.
                if device == t.meta.device {
                    let next = t.meta.next_msg.entry(channel).or_insert(1);
                    *next = (*next).max(msg + 1);
                    self.engine.vault.put(&group_key(g), &serde_json::to_vec(&t.meta).expect("serializable"));
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
            self.engine.vault.put(&group_key(g), &serde_json::to_vec(&t.meta).expect("serializable"));
        }
        let asm = t.parts.entry(key).or_default();
        if let Err(e) = asm.add(f) {
            return self.reject(name, format!("message fragment: {e}"), events);
        }
        let Some(object) = asm.finish() else { return };
        t.parts.remove(&key);
        match object {
            Ok(object) => self.process_message(g, name, key, object, events),
            Err(e) => {
                self.mark_done(g, key);
                self.reject(name, format!("message: {e}"), events)
            }
        }
    }

    fn mark_done(&mut self, g: Gid, key: Key3) {
        if let Some(t) = self.groups.get_mut(&g) {
            t.done.insert(key);
            self.engine.vault.put(&done_key(g, key), b"");
        }
    }

    fn process_message(&mut self, g: Gid, name: Name, key: Key3, object: Vec<u8>, events: &mut Vec<Event>) {
        let protocol = match MlsMessageIn::tls_deserialize_exact(&object).ok().and_then(|m| m.try_into_protocol_message().ok()) {
            Some(p) => p,
            None => {
                self.mark_done(g, key);
                return self.reject(name, "not an MLS protocol message".into(), events);
            }
        };
        let group_id = engine::gid_group_id(&self.org, g);
        let Some(t) = self.groups.get_mut(&g) else { return };
        let epoch = protocol.epoch().as_u64();
        if protocol.group_id() != &group_id {
            self.mark_done(g, key);
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
        let result = self.decrypt(g, key, protocol);
        self.mark_done(g, key);
        match result {
            Ok(Some(stored)) if stored.user.is_some_and(|u| self.contacts.is_blocked(&u) || self.contacts.get(&u).is_some_and(|c| stored.message.created_ms < c.unblocked_ms)) => {
                // Never shown, not even after an unblock: dropped unread, and counted.
                self.counters.blocked += 1;
            }
            Ok(Some(stored)) if stored.message.identity.is_some() => {
                let result = self.take_identity(g, &stored);
                match result {
                    Ok(user) => events.push(Event::Linked { user }),
                    Err(reason) => self.reject(name, reason, events),
                }
            }
            Ok(Some(mut stored)) if stored.message.control.is_some() => {
                stored.seq = self.take_seq();
                // A group operation: only from an admin, and carried out by the committer.
                let t = &self.groups[&g];
                let admin = match (&t.record, stored.user) {
                    (Record::Conv(r), Some(u)) if r.kind == crate::payload::ConvKind::Group => r.admins.contains(&u),
                    _ => false,
                };
                if !admin {
                    let who = stored.user.map_or_else(|| format!("device {}", stored.id.device), |u| u.to_string());
                    return self.reject(name, format!("a group operation from {who}, who is not an admin of the group"), events);
                }
                let (Gid::Conv(conv), Some(control)) = (g, stored.message.control.clone()) else { return };
                if t.meta.device == 0 {
                    self.ops.push((conv, control));
                }
                let t = self.groups.get_mut(&g).expect("group exists");
                self.engine.vault.put(&msg_key(g, key), &serde_json::to_vec(&stored).expect("serializable"));
                let id = stored.id;
                t.history.entry(key.0).or_default().insert(id, stored);
                self.counters.messages += 1;
                events.push(Event::Message { group: g, channel: key.0, id });
            }
            Ok(Some(mut stored)) => {
                stored.seq = self.take_seq();
                let t = self.groups.get_mut(&g).expect("group exists");
                let id = stored.message.replaces.unwrap_or(stored.id);
                self.engine.vault.put(&msg_key(g, key), &serde_json::to_vec(&stored).expect("serializable"));
                t.history.entry(key.0).or_default().insert(stored.id, stored);
                self.counters.messages += 1;
                events.push(Event::Message { group: g, channel: key.0, id });
            }
            Ok(None) => {}
            Err(reason) => self.reject(name, reason, events),
        }
    }

    fn decrypt(&mut self, g: Gid, key: Key3, protocol: ProtocolMessage) -> Result<Option<Stored>, String> {
        let id = engine::gid_group_id(&self.org, g);
        let mut group = self.engine.take_group_by_id(&id).map_err(|e| e.to_string())?.ok_or("no group")?;
        let processed = group.process_message(&self.engine.provider, protocol).map_err(|e| format!("cannot decrypt: {e}"))?;
        self.engine.keep_group(group);
        let Sender::Member(leaf) = *processed.sender() else { return Err("not sent by a member".into()) };
        let t = &self.groups[&g];
        let sender = t.record.device_of(leaf.u32()).ok_or("sent from a leaf with no device id")?;
        // The leaf's binding was checked when it joined.
        let user = identity::claimed_user(processed.credential());
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => {
                if sender != key.1 {
                    return Err(format!("device {sender} sent a message under device {}'s name", key.1));
                }
                let message = Message::decode(&app.into_bytes()).map_err(|e| format!("payload: {e}"))?;
                let stored = Stored { id: MsgRef { device: key.1, msg: key.2 }, message, user, seq: 0 };
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

    fn on_welcome(&mut self, name: Name, hkp: Vec<u8>, data: &[u8], events: &mut Vec<Event>) {
        let f = match Fragment::decode(Path::Welcome, data) {
            Ok(f) => f,
            Err(e) => return self.reject(name, format!("welcome fragment: {e}"), events),
        };
        let asm = self.welcomes.entry(hkp.clone()).or_default();
        if let Err(e) = asm.add(f) {
            return self.reject(name, format!("welcome fragment: {e}"), events);
        }
        let Some(object) = asm.finish() else { return };
        self.welcomes.remove(&hkp);
        match object.map_err(|e| e.to_string()).and_then(|o| self.join(&o)) {
            Ok((group, device)) => {
                // A team's key package is single-use.
                self.waiting.remove(&hkp);
                self.engine.vault.delete(&waiting_key(&hkp));
                events.push(Event::Joined { group, device });
            }
            Err(reason) => self.reject(name, format!("welcome: {reason}"), events),
        }
    }

    /// A welcome to this device's user in the users' space: for one of this device's
    /// last-resort key packages (which stay), or for another device of the user (ignored).
    /// Processed once, joined or refused.
    fn on_user_welcome(&mut self, name: Name, data: &[u8], events: &mut Vec<Event>) {
        let whole = name.to_u128() >> 8;
        if self.welcomed.contains(&whole) {
            self.counters.duplicates += 1;
            return;
        }
        let f = match Fragment::decode(Path::Welcome, data) {
            Ok(f) => f,
            Err(e) => return self.reject(name, format!("welcome fragment: {e}"), events),
        };
        let asm = self.user_welcomes.entry(whole).or_default();
        if let Err(e) = asm.add(f) {
            return self.reject(name, format!("welcome fragment: {e}"), events);
        }
        let Some(object) = asm.finish() else { return };
        self.user_welcomes.remove(&whole);
        let Ok(object) = object else {
            self.mark_welcomed(whole);
            return self.reject(name, "welcome: fragments that do not add up".into(), events);
        };
        // Only a welcome that holds secrets for one of this device's key packages is for it.
        let mine = match MlsMessageIn::tls_deserialize_exact(&object).map(MlsMessageIn::extract) {
            Ok(MlsMessageBodyIn::Welcome(w)) => {
                let ours: Vec<(Vec<u8>, Waiting)> = w.secrets().iter().filter_map(|s| Some((s.new_member().as_slice().to_vec(), *self.waiting.get(s.new_member().as_slice())?))).collect();
                self.joining_link = ours.iter().any(|(_, w)| w.link);
                if self.joining_link {
                    // A link key package is single-use.
                    for (hkp, _) in ours.iter().filter(|(_, w)| w.link) {
                        self.waiting.remove(hkp);
                        self.engine.vault.delete(&waiting_key(hkp));
                    }
                }
                if ours.is_empty() && w.secrets().iter().any(|s| self.spent.contains(s.new_member().as_slice())) {
                    self.mark_welcomed(whole);
                    return self.reject(
                        name,
                        "welcome: for a one-time key package of this device already used, whose keys were erased after their grace period; its sender must add this device again".into(),
                        events,
                    );
                }
                !ours.is_empty()
            }
            _ => {
                self.mark_welcomed(whole);
                return self.reject(name, "welcome: not an MLS welcome".into(), events);
            }
        };
        if !mine {
            return;
        }
        self.mark_welcomed(whole);
        self.refusal_blocked = None;
        // openmls erases a one-time key package's keys when a welcome uses it; they are put
        // back for the grace period, so a racing second welcome joins too (`crate::supply`).
        let one_time: Vec<Vec<u8>> = match MlsMessageIn::tls_deserialize_exact(&object).map(MlsMessageIn::extract) {
            Ok(MlsMessageBodyIn::Welcome(w)) => w
                .secrets()
                .iter()
                .map(|s| s.new_member().as_slice().to_vec())
                .filter(|h| self.waiting.get(h).is_some_and(|w| w.one_time))
                .collect(),
            _ => Vec::new(),
        };
        let kept = self.keep_one_time(&one_time);
        let joined = self.join(&object);
        if let Err(e) = self.restore_one_time(kept) {
            self.reject(name, format!("keeping a one-time key package for its grace period: {e}"), events);
        }
        match joined {
            Ok((group, device)) => events.push(Event::Joined { group, device }),
            Err(reason) => {
                if let Some(user) = self.refusal_blocked.take() {
                    self.refused_blocked.insert(whole, user);
                    self.engine.vault.put(format!("xb/{whole:x}").as_bytes(), user.to_string().as_bytes());
                }
                self.reject(name, format!("welcome: {reason}"), events)
            }
        }
    }

    fn mark_welcomed(&mut self, whole: u128) {
        self.welcomed.insert(whole);
        self.engine.vault.put(format!("x/{whole:x}").as_bytes(), b"");
    }

    fn join(&mut self, object: &[u8]) -> Result<(Gid, u32), String> {
        let welcome = match MlsMessageIn::tls_deserialize_exact(object).map_err(|e| e.to_string())?.extract() {
            MlsMessageBodyIn::Welcome(w) => w,
            _ => return Err("not a welcome".into()),
        };
        let staged = StagedWelcome::new_from_welcome(&self.engine.provider, &join_config(), welcome, None).map_err(|e| e.to_string())?;
        for m in staged.members() {
            identity::check(self.engine.provider.crypto(), &m.credential, m.signature_key.as_slice())
                .map_err(|e| format!("member at leaf {}: {e}", m.index.u32()))?;
        }
        // Decide on the record before the group is stored.
        let context = staged.group_context();
        let record = match context.extensions().unknown(crate::payload::CONV_EXTENSION) {
            Some(ext) => Record::Conv(ConvRecord::decode(&ext.0).map_err(|e| format!("conversation record: {e}"))?),
            None => Record::Team(TeamRecord::decode(&context.extensions().unknown(crate::payload::TEAM_EXTENSION).ok_or("no team or conversation record")?.0).map_err(|e| format!("team record: {e}"))?),
        };
        let g = record.gid();
        if context.group_id() != &engine::gid_group_id(&self.org, g) {
            return Err(format!("a welcome to group {g} under another group's id"));
        }
        match &record {
            Record::Team(r) if r.org != self.org.org() => return Err(format!("a welcome to org {} team {}, which is not this org's", r.org, r.team)),
            Record::Team(_) => {}
            Record::Conv(r) if r.kind == crate::payload::ConvKind::Link => {
                if !self.joining_link {
                    return Err(format!("a welcome to the devices of user {}, which this device did not ask for (`device key-package --link`)", r.creator));
                }
            }
            Record::Conv(r) => {
                let me = self.user_id();
                if !r.users.contains(&me) {
                    return Err(format!("a welcome to conversation {} whose users do not include this device's", r.conv));
                }
                let blocker = Some(r.creator).filter(|c| self.contacts.is_blocked(c)).or_else(|| {
                    r.users.iter().copied().find(|u| *u != me && self.contacts.is_blocked(u) && r.kind == crate::payload::ConvKind::Dm)
                });
                if let Some(user) = blocker {
                    self.counters.blocked += 1;
                    self.refusal_blocked = Some(user);
                    return Err(format!("a welcome to conversation {} from a blocked user", r.conv));
                }
            }
        }
        match self.groups.get(&g) {
            Some(t) if !t.meta.removed => return Err(format!("already in group {g}")),
            // Added again after a removal or a `leave`: the old MLS state goes, the history
            // stays.
            Some(_) => {
                if let Some(mut old) = self.engine.take_group_by_id(context.group_id()).map_err(|e| e.to_string())? {
                    old.delete(self.engine.provider.storage()).map_err(|e| e.to_string())?;
                }
            }
            None => {}
        }
        let own = staged.members().find(|m| m.signature_key.as_slice() == self.public_key()).map(|m| m.index.u32()).ok_or("the welcome does not hold this device")?;
        let device = record.device_of(own).ok_or("the record gives this device no id")?;
        let group = staged.into_group(&self.engine.provider).map_err(|e| e.to_string())?;
        let meta = GroupMeta { device, ..GroupMeta::default() };
        self.engine.vault.put(&group_key(g), &serde_json::to_vec(&meta).expect("serializable"));
        let epoch = group.epoch().as_u64();
        self.engine.keep_group(group);
        let history = self.groups.remove(&g).map(|old| old.history).unwrap_or_default();
        let mut fresh = Group::new(record, epoch, meta);
        fresh.history = history;
        self.groups.insert(g, fresh);
        Ok((g, device))
    }

    /// The name of fragment 0 of the commit that creates `epoch` in a group.
    pub(crate) fn commit_name(&self, g: Gid, epoch: u64, fragment: u16) -> Result<Name, MlsError> {
        Ok(match g {
            Gid::Team(team) => self.org.commit(team, epoch, fragment)?,
            Gid::Conv(conv) => Users::commit(conv, epoch, fragment)?,
        })
    }

    /// Applies every commit that is next in line, releasing held messages after each.
    fn advance(&mut self, g: Gid, events: &mut Vec<Event>) {
        loop {
            let Some(t) = self.groups.get_mut(&g) else { return };
            let next = t.epoch + 1;
            // Commits for epochs already passed are duplicates.
            t.commits.retain(|e, _| *e >= next);
            let Some(object) = t.commits.get(&next).and_then(Assembly::finish) else {
                if t.overflowed && t.held.is_empty() {
                    t.overflowed = false;
                    events.push(Event::Refetch { group: g });
                }
                return;
            };
            t.commits.remove(&next);
            let Ok(name) = self.commit_name(g, next, 0) else { return };
            match object.map_err(|e| e.to_string()).and_then(|o| self.apply_commit(g, &o)) {
                Ok(()) => {
                    self.counters.commits += 1;
                    events.push(Event::Epoch { group: g, epoch: next });
                    let t = self.groups.get_mut(&g).expect("group exists");
                    let held = t.held.remove(&next).unwrap_or_default();
                    for (name, key, object) in held {
                        self.process_message(g, name, key, object, events);
                    }
                }
                Err(reason) => {
                    // Nothing after this epoch can be read until this commit applies, and it
                    // never will: the group is stalled, and says so.
                    if let Some(t) = self.groups.get_mut(&g) {
                        t.meta.stalled = Some(format!("the commit for epoch {next} was refused: {reason}"));
                        self.engine.vault.put(&group_key(g), &serde_json::to_vec(&t.meta).expect("serializable"));
                    }
                    self.reject(name, format!("commit for epoch {next}: {reason}"), events);
                    return;
                }
            }
        }
    }

    fn apply_commit(&mut self, g: Gid, object: &[u8]) -> Result<(), String> {
        let protocol = MlsMessageIn::tls_deserialize_exact(object).ok().and_then(|m| m.try_into_protocol_message().ok()).ok_or("not an MLS protocol message")?;
        let id = engine::gid_group_id(&self.org, g);
        let mut group = self.engine.take_group_by_id(&id).map_err(|e| e.to_string())?.ok_or("no group")?;
        let t = &self.groups[&g];
        let processed = group.process_message(&self.engine.provider, protocol).map_err(|e| e.to_string())?;
        let Sender::Member(leaf) = *processed.sender() else { return Err("not sent by a member".into()) };
        if t.record.device_of(leaf.u32()) != Some(0) {
            return Err("only device 0, the committer, may commit".into());
        }
        let committer = identity::claimed_user(processed.credential());
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            return Err("not a commit".into());
        };
        check_leaves(self.engine.provider.crypto(), &staged)?;
        if let Record::Conv(old) = &t.record {
            check_conv_commit(old, committer, &group, &staged)?;
        }
        let removed = staged.self_removed();
        group.merge_staged_commit(&self.engine.provider, *staged).map_err(|e| e.to_string())?;
        let record = engine::any_record_of(&group).map_err(|e| e.to_string())?;
        let t = self.groups.get_mut(&g).expect("group exists");
        t.record = record;
        t.epoch = group.epoch().as_u64();
        if removed {
            t.meta.removed = true;
            t.held.clear();
            self.engine.vault.put(&group_key(g), &serde_json::to_vec(&t.meta).expect("serializable"));
        }
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

/// What every member checks of a conversation's commit before merging it: the committer is
/// an admin (a member, for a direct message), the record keeps its identity, its kind, its
/// creator and its admins, a direct message keeps its two users, every device added belongs
/// to a member user, and every device of a user the record drops is removed.
fn check_conv_commit(old: &ConvRecord, committer: Option<UserId>, group: &MlsGroup, staged: &StagedCommit) -> Result<(), String> {
    let committer = committer.ok_or("a commit from a device without a user")?;
    let new = match staged.group_context().extensions().unknown(crate::payload::CONV_EXTENSION) {
        Some(ext) => ConvRecord::decode(&ext.0).map_err(|e| format!("conversation record: {e}"))?,
        None => return Err("a commit that drops the conversation record".into()),
    };
    match old.kind {
        crate::payload::ConvKind::Group if !old.admins.contains(&committer) => {
            return Err(format!("a commit by {committer}, who is not an admin of the group"));
        }
        crate::payload::ConvKind::Dm | crate::payload::ConvKind::Mail | crate::payload::ConvKind::Link if !old.users.contains(&committer) || new.users != old.users => {
            return Err("the users of a direct message or a mailbox cannot change".into());
        }
        _ => {}
    }
    if (new.kind, new.conv, new.creator, &new.admins) != (old.kind, old.conv, old.creator, &old.admins) {
        return Err("a commit that changes the conversation's kind, id, creator or admins".into());
    }
    // A user's devices' group adds new devices before they hold the user's identity.
    for add in staged.add_proposals().filter(|_| old.kind != crate::payload::ConvKind::Link) {
        let user = identity::claimed_user(add.add_proposal().key_package().leaf_node().credential());
        if !user.is_some_and(|u| new.users.contains(&u)) {
            return Err("a commit that adds a device of a user who is not a member".into());
        }
    }
    let removed: BTreeSet<u32> = staged.remove_proposals().map(|r| r.remove_proposal().removed().u32()).collect();
    for m in group.members() {
        let user = identity::claimed_user(&m.credential);
        if !user.is_some_and(|u| new.users.contains(&u)) && !removed.contains(&m.index.u32()) {
            return Err("a commit that drops a user but keeps their devices".into());
        }
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

/// A part of a pipeline's model: kept for the model, not shown or counted as a message.
pub(crate) fn is_model_part(s: &Stored) -> bool {
    matches!(s.message.pipeline, Some(crate::payload::Pipeline::ModelPart { .. }))
}

/// A stored message as shown, with its latest edit (if any) applied.
fn show(history: &BTreeMap<MsgRef, Stored>, s: &Stored, edit: Option<&Stored>) -> Shown {
    Shown {
        user: s.user,
        id: s.id,
        sent_ms: s.message.created_ms,
        control: s.message.control.is_some() || s.message.pipeline.is_some(),
        text: match (&s.message.control, &s.message.pipeline) {
            (Some(control), _) => control.describe(),
            (_, Some(crate::payload::Pipeline::Create { size, .. })) => format!("started the pipeline (a model of {size} bytes)"),
            (_, Some(crate::payload::Pipeline::Step { kind, body, .. })) => format!("{kind} {body}"),
            (_, Some(crate::payload::Pipeline::ModelPart { index, .. })) => format!("part {index} of the model"),
            _ => edit.map_or(&s.message.text, |e| &e.message.text).clone(),
        },
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
