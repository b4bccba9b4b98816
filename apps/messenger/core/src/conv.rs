//! Conversations: direct messages (and, built on the same machinery, groups), in the users'
//! space of [`crate::names`].
//!
//! **Starting one.** A device that starts a conversation creates its MLS group and becomes
//! its committer (device 0). In one commit it adds every device it knows of every member
//! user (its own user's other devices included), from the key packages those devices publish in
//! their users' space ([`crate::supply`]). So a conversation
//! can start while every device of the peer is offline: the welcome waits in the relays'
//! caches.
//!
//! **Devices that come later.** The committer watches the key package spaces of its
//! conversations' users and adds a device it has not seen ([`Device::adopt_devices`]): a new
//! device of either user joins every conversation whose committer is reachable.
//!
//! **One conversation per pair.** Two users may start a direct message at once, even on
//! opposite sides of a partition. Each start adds the other user's devices, so once both
//! welcomes are through, every device of both users is in both groups. All of them then pick
//! the same one to send in by a rule on what every member holds, the group records: the
//! lowest `(creator user id, conversation number)`. Both groups' messages stay readable and
//! are shown as one conversation ([`Device::dm_convs`]), so nothing sent before the two met
//! is lost.
//!
//! **Before any key package is known.** A message to a user none of whose key packages this
//! device has seen yet is kept, sealed, as pending ([`Device::queue_dm`]), and shown as such;
//! it is sent as soon as a key package arrives ([`Device::flush_pending`]).

use std::collections::BTreeSet;

use openmls::prelude::*;

use crate::committer::Outgoing;
use crate::device::{CONV_CHANNEL, Device, Group, GroupMeta, KnownKeyPackage, group_key, pending_key};
use crate::engine::{self, MlsError, Record, mls};
use crate::fragment;
use crate::identity::UserId;
use crate::names::{ConvId, Gid, MAX_CONV, Path, Users};
use crate::device::Stored;
use crate::payload::{Control, ConvKind, ConvRecord, Lifetimes, MailHeader, MailRef, Message, MsgRef};
use crate::seal::Backend;

impl<B: Backend> Device<B> {
    /// The users whose key packages this device follows: its own (its other devices), the
    /// users of its conversations, its named contacts (so a conversation with them can start
    /// at once, even offline), and those it has messages pending for. Not blocked users.
    pub fn watched_users(&self) -> BTreeSet<UserId> {
        let mut out: BTreeSet<UserId> = self.convs().flat_map(|(_, r, ..)| r.users.iter().copied()).collect();
        out.extend(self.contacts.iter().filter(|(_, c)| c.name.is_some()).map(|(u, _)| *u));
        out.extend(self.pending.keys().copied());
        out.retain(|u| !self.contacts.is_blocked(u));
        out.insert(self.user_id());
        out
    }

    /// Every direct-message conversation this device is in with `peer`, the one to send in
    /// ([`Device::dm`]) first.
    pub fn dm_convs(&self, peer: &UserId) -> Vec<ConvId> {
        let pair: BTreeSet<UserId> = [self.user_id(), *peer].into();
        let mut convs: Vec<(UserId, ConvId)> =
            self.convs().filter(|(_, r, ..)| r.kind == ConvKind::Dm && r.users == pair).map(|(c, r, ..)| (r.creator, c)).collect();
        convs.sort();
        convs.into_iter().map(|(_, c)| c).collect()
    }

    /// The direct-message conversation with `peer` that every device of both users sends
    /// in: of those it is in, the one with the lowest `(creator, conversation)`.
    pub fn dm(&self, peer: &UserId) -> Option<ConvId> {
        self.dm_convs(peer).into_iter().next()
    }

    /// The other user of a direct-message conversation.
    pub fn dm_peer(&self, conv: ConvId) -> Option<UserId> {
        let me = self.user_id();
        let (_, r, ..) = self.convs().find(|(c, ..)| *c == conv)?;
        if r.kind != ConvKind::Dm {
            return None;
        }
        r.users.iter().copied().find(|u| *u != me).or(Some(me))
    }

    /// A conversation's record.
    pub fn conv_record(&self, conv: ConvId) -> Option<&ConvRecord> {
        self.convs().find(|(c, ..)| *c == conv).map(|(_, r, ..)| r)
    }

    /// Starts a conversation of `kind` among `users` (this device's user is added), with
    /// this device as its committer, adding every device known of every user. Returns it and
    /// the chunks to publish (the commit and the welcomes).
    pub fn start_conv(&mut self, kind: ConvKind, name: &str, users: &BTreeSet<UserId>, now_ms: u64) -> Result<(ConvId, Vec<Outgoing>), MlsError> {
        let me = self.user_id();
        let mut users = users.clone();
        users.insert(me);
        if kind == ConvKind::Dm && users.len() != 2 {
            return Err(MlsError::BadName("a direct message is between two users".into()));
        }
        let conv = loop {
            let bytes = self.engine.provider.rand().random_vec(8).map_err(mls)?;
            let conv = u64::from_be_bytes(bytes.try_into().expect("8 bytes")) & MAX_CONV;
            let id = ConvId { origin: self.org.origin(), conv };
            if !self.groups.contains_key(&Gid::Conv(id)) {
                break id;
            }
        };
        let kps: Vec<KnownKeyPackage> = users.iter().flat_map(|u| self.key_packages_of(u).cloned().collect::<Vec<_>>()).collect();
        // A group adds a member's devices as their key packages arrive; a direct message and a
        // mailbox wait for them instead (what is sent before a device joins, it cannot read).
        for u in &users {
            if kind != ConvKind::Group && *u != me && !kps.iter().any(|k| crate::identity::claimed_user(k.key_package.leaf_node().credential()) == Some(*u)) {
                return Err(MlsError::BadName(format!("no key package of user {u} is known yet")));
            }
        }
        let record = ConvRecord {
            kind,
            conv,
            name: name.to_string(),
            description: String::new(),
            lifetimes: Lifetimes::default(),
            creator: me,
            admins: if kind == ConvKind::Group { [me].into() } else { BTreeSet::new() },
            users,
            next_device: 1,
            devices: [(0, 0)].into(),
        };
        let group = self.engine.create_group(engine::conv_group_id(conv), engine::conv_extensions(&record)?)?;
        let g = Gid::Conv(conv);
        let meta = GroupMeta { device: 0, ..GroupMeta::default() };
        self.engine.vault.put(&group_key(g), &serde_json::to_vec(&meta).expect("serializable"));
        self.engine.keep_group(group);
        self.groups.insert(g, Group::new(Record::Conv(record), 0, meta));
        let record = self.conv_record(conv).cloned().expect("just made");
        let outgoing = self.commit_conv(conv, record, kps, Vec::new(), now_ms)?;
        Ok((conv, outgoing))
    }

    /// Commits the adds of `kps` to a conversation this device commits for; returns the
    /// commit and the welcomes. The whole group state is persisted.
    fn add_to_conv(&mut self, conv: ConvId, kps: Vec<KnownKeyPackage>, now_ms: u64) -> Result<Vec<Outgoing>, MlsError> {
        if kps.is_empty() {
            return Ok(Vec::new());
        }
        let record = self.conv_record(conv).cloned().ok_or_else(|| MlsError::UnknownTeam(conv.to_string()))?;
        self.commit_conv(conv, record, kps, Vec::new(), now_ms)
    }

    /// Commits `record` with the adds of `kps` and the removal of the devices at `removes`,
    /// as this conversation's committer; returns the commit and the welcomes to publish. The
    /// record's device map follows the adds and removes. The whole group state is persisted.
    pub(crate) fn commit_conv(&mut self, conv: ConvId, mut record: ConvRecord, kps: Vec<KnownKeyPackage>, removes: Vec<u32>, now_ms: u64) -> Result<Vec<Outgoing>, MlsError> {
        let g = Gid::Conv(conv);
        let id = engine::conv_group_id(conv);
        let mut group = self.engine.take_group_by_id(&id)?.ok_or_else(|| MlsError::UnknownTeam(g.to_string()))?;
        for leaf in &removes {
            record.devices.remove(leaf);
        }
        let mut taken: BTreeSet<u32> = group.members().map(|m| m.index.u32()).filter(|l| !removes.contains(l)).collect();
        let mut placed = Vec::new();
        for kp in &kps {
            // RFC 9420 §12.1.1: each Add takes the leftmost blank leaf, in proposal order.
            let leaf = (0..).find(|i| !taken.contains(i)).expect("a free index exists");
            taken.insert(leaf);
            record.devices.insert(leaf, record.next_device);
            record.next_device += 1;
            placed.push((leaf, kp.key_package.leaf_node().signature_key().as_slice().to_vec()));
        }
        let adds = kps.iter().map(|k| k.key_package.clone()).collect();
        let removes = removes.into_iter().map(LeafNodeIndex::new).collect();
        let (commit, welcome) = self.engine.commit(&mut group, adds, removes, engine::conv_extensions(&record)?)?;
        for (leaf, key) in &placed {
            if group.member_at(LeafNodeIndex::new(*leaf)).is_none_or(|m| m.signature_key != *key) {
                return Err(MlsError::Mls(format!("a new member did not land on leaf {leaf}")));
            }
        }
        let epoch = group.epoch().as_u64();
        self.engine.keep_group(group);
        let mut outgoing = Vec::new();
        for (i, data) in fragment::split(Path::Commit, &commit)?.into_iter().enumerate() {
            let i = u16::try_from(i).map_err(|_| MlsError::Mls("a commit of too many fragments".into()))?;
            outgoing.push(Outgoing { name: Users::commit(conv, epoch, i)?, expiry_ms: now_ms + record.lifetimes.commit_ms, data });
        }
        let pieces = match welcome {
            Some(w) => fragment::split(Path::Welcome, &w)?,
            None if kps.is_empty() => Vec::new(),
            None => return Err(MlsError::Mls("an add produced no welcome".into())),
        };
        // One welcome serves every device the commit adds: it goes once to each user, in that
        // user's users' space, and each device finds its own secrets in it.
        let to: BTreeSet<(u32, UserId)> = kps.iter().filter_map(|k| Some((k.origin, crate::identity::claimed_user(k.key_package.leaf_node().credential())?))).collect();
        for (origin, user) in to {
            for (i, data) in pieces.iter().enumerate() {
                let i = u16::try_from(i).map_err(|_| MlsError::Mls("a welcome of too many fragments".into()))?;
                outgoing.push(Outgoing { name: Users::at(origin).welcome(&user, conv, epoch, i)?, expiry_ms: now_ms + record.lifetimes.welcome_ms, data: data.clone() });
            }
        }
        outgoing.extend(self.claims_for(&kps, now_ms)?);
        let t = self.groups.get_mut(&g).expect("checked above");
        t.record = Record::Conv(record);
        t.epoch = epoch;
        self.engine.persist()?;
        Ok(outgoing)
    }

    /// In every conversation this device commits for whose users include `user`, adds the
    /// devices of `user` known from their key packages and not in it yet. Returns the chunks
    /// to publish.
    pub fn adopt_devices(&mut self, user: &UserId, now_ms: u64) -> Result<Vec<Outgoing>, MlsError> {
        let mine: Vec<ConvId> =
            self.convs().filter(|(c, r, _, device)| *device == 0 && r.users.contains(user) && !self.is_removed(*c)).map(|(c, ..)| c).collect();
        let mut outgoing = Vec::new();
        for conv in mine {
            let id = engine::conv_group_id(conv);
            let Some(group) = self.engine.group_by_id(&id)? else { continue };
            let present: BTreeSet<Vec<u8>> = group.members().map(|m| m.signature_key).collect();
            let new: Vec<KnownKeyPackage> =
                self.key_packages_of(user).filter(|k| !present.contains(k.key_package.leaf_node().signature_key().as_slice())).cloned().collect();
            outgoing.extend(self.add_to_conv(conv, new, now_ms)?);
        }
        Ok(outgoing)
    }

    /// The mailbox conversation among exactly `users` (this device's user among them) that
    /// every member sends in: of those this device is in, the lowest `(creator, conv)`, as
    /// for direct messages.
    pub fn mail_conv(&self, users: &BTreeSet<UserId>) -> Option<ConvId> {
        self.convs().filter(|(_, r, ..)| r.kind == ConvKind::Mail && r.users == *users).map(|(c, r, ..)| (r.creator, c)).min().map(|(_, c)| c)
    }

    /// `mail send`: one mail to every recipient, as one message in the mailbox conversation
    /// of exactly the sender and the recipients (started if it does not exist; every
    /// recipient's key packages must be known). Returns the mail's reference, where it went,
    /// and the chunks to publish.
    #[allow(clippy::type_complexity)]
    pub fn send_mail(
        &mut self,
        to: &BTreeSet<UserId>,
        subject: &str,
        body: &str,
        prev: Option<MailRef>,
        now_ms: u64,
    ) -> Result<(MailRef, ConvId, MsgRef, Vec<Outgoing>), MlsError> {
        let me = self.user_id();
        let mut users = to.clone();
        users.insert(me);
        if users.len() < 2 {
            return Err(MlsError::BadName("mail needs a recipient other than you".into()));
        }
        if let Some(u) = to.iter().find(|u| self.contacts.is_blocked(u)) {
            return Err(MlsError::BadName(format!("{u} is blocked: unblock them first")));
        }
        let bytes = self.engine.provider.rand().random_vec(8).map_err(mls)?;
        let reference = MailRef(bytes.try_into().expect("8 bytes"));
        let message = Message::mail(now_ms, MailHeader { reference, prev, subject: subject.to_string() }, body);
        message.encode()?;
        let mut outgoing = Vec::new();
        let conv = match self.mail_conv(&users) {
            Some(conv) => conv,
            None => {
                let (conv, out) = self.start_conv(ConvKind::Mail, "", to, now_ms)?;
                outgoing.extend(out);
                conv
            }
        };
        let (id, out) = self.send(conv, CONV_CHANNEL, message, now_ms)?;
        outgoing.extend(out);
        Ok((reference, conv, id, outgoing))
    }

    /// Every mail this device holds, sent and received, oldest first; not a blocked user's.
    pub fn mails(&self) -> Vec<(ConvId, &Stored)> {
        let mut out: Vec<(ConvId, &Stored)> = self
            .convs()
            .filter(|(_, r, ..)| r.kind == ConvKind::Mail)
            .flat_map(|(c, ..)| {
                self.groups[&Gid::Conv(c)].history.get(&CONV_CHANNEL).into_iter().flat_map(|h| h.values()).map(move |s| (c, s))
            })
            .filter(|(_, s)| s.message.mail.is_some() && !self.hidden(s))
            .collect();
        out.sort_by_key(|(_, s)| (s.message.created_ms, s.seq));
        out
    }

    /// The thread `reference` belongs to: its root (followed up by `prev`), and every mail
    /// whose `prev` chain reaches that root, oldest first.
    pub fn mail_thread(&self, reference: MailRef) -> Result<Vec<(ConvId, &Stored)>, MlsError> {
        let mails = self.mails();
        let by_ref: std::collections::BTreeMap<MailRef, &Stored> = mails.iter().filter_map(|(_, s)| Some((s.message.mail.as_ref()?.reference, *s))).collect();
        if !by_ref.contains_key(&reference) {
            return Err(MlsError::BadName(format!("no mail {reference}")));
        }
        let root = |mut r: MailRef| {
            // At most 1,000 steps: a chain through mails that are missing or loop stops.
            for _ in 0..1000 {
                match by_ref.get(&r).and_then(|s| s.message.mail.as_ref()?.prev) {
                    Some(p) if by_ref.contains_key(&p) && p != r => r = p,
                    _ => break,
                }
            }
            r
        };
        let top = root(reference);
        Ok(mails.into_iter().filter(|(_, s)| s.message.mail.as_ref().is_some_and(|m| root(m.reference) == top)).collect())
    }

    /// The groups (not direct messages) this device is in: `(id, record)`.
    pub fn chat_groups(&self) -> impl Iterator<Item = (ConvId, &ConvRecord)> {
        self.convs().filter(|(_, r, ..)| r.kind == ConvKind::Group).map(|(c, r, ..)| (c, r))
    }

    /// A group by its id (18 hex digits) or its name; a name two groups share is refused.
    pub fn resolve_group(&self, which: &str) -> Result<ConvId, MlsError> {
        if let Some(conv) = crate::names::ConvId::parse(which)
            && self.chat_groups().any(|(c, _)| c == conv)
        {
            return Ok(conv);
        }
        let found: Vec<ConvId> = self.chat_groups().filter(|(_, r)| r.name == which).map(|(c, _)| c).collect();
        match found.as_slice() {
            [one] => Ok(*one),
            [] => Err(MlsError::BadName(format!("no group {which:?}"))),
            many => Err(MlsError::BadName(format!(
                "{} groups are called {which:?}: use an id ({})",
                many.len(),
                many.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// `group create NAME USER…`: a group of this user (its admin) and `users`, with this
    /// device as its committer. Devices of users whose key packages are not known yet are
    /// added when they arrive.
    pub fn create_group(&mut self, name: &str, users: &BTreeSet<UserId>, now_ms: u64) -> Result<(ConvId, Vec<Outgoing>), MlsError> {
        check_group_name(name)?;
        self.start_conv(ConvKind::Group, name, users, now_ms)
    }

    /// Carries out a group operation as the group's committer: a commit with the changed
    /// record, adds and removes. Returns the chunks to publish.
    pub fn group_op(&mut self, conv: ConvId, control: &Control, now_ms: u64) -> Result<Vec<Outgoing>, MlsError> {
        let g = Gid::Conv(conv);
        let (_, own) = self.group_state(g).ok_or_else(|| MlsError::BadName(format!("no group {conv}")))?;
        let mut record = self.conv_record(conv).cloned().ok_or_else(|| MlsError::BadName(format!("no group {conv}")))?;
        if record.kind != ConvKind::Group {
            return Err(MlsError::BadName("only a group has members to change, a name and a description".into()));
        }
        if own != 0 || self.is_removed(g) {
            return Err(MlsError::BadName("this device is not the group's committer".into()));
        }
        let mut adds = Vec::new();
        let mut removes = Vec::new();
        match control {
            Control::Rename { name } => {
                check_group_name(name)?;
                record.name = name.clone();
            }
            Control::Describe { description } => {
                if description.len() > crate::payload::MAX_LABEL_TEXT {
                    return Err(MlsError::BadName(format!("a description of {} bytes; the limit is {}", description.len(), crate::payload::MAX_LABEL_TEXT)));
                }
                record.description = description.clone();
            }
            Control::Add { users, .. } => {
                let id = engine::conv_group_id(conv);
                let present: BTreeSet<Vec<u8>> = self.engine.group_by_id(&id)?.map(|gr| gr.members().map(|m| m.signature_key).collect()).unwrap_or_default();
                for u in users {
                    record.users.insert(*u);
                    adds.extend(self.key_packages_of(u).filter(|k| !present.contains(k.key_package.leaf_node().signature_key().as_slice())).cloned());
                }
            }
            Control::Remove { users, .. } => {
                if users.iter().any(|u| record.admins.contains(u)) {
                    return Err(MlsError::BadName("an admin cannot be removed".into()));
                }
                let id = engine::conv_group_id(conv);
                let group = self.engine.group_by_id(&id)?.ok_or_else(|| MlsError::BadName(format!("no group {conv}")))?;
                for m in group.members() {
                    if crate::identity::claimed_user(&m.credential).is_some_and(|u| users.contains(&u)) {
                        removes.push(m.index.u32());
                    }
                }
                for u in users {
                    record.users.remove(u);
                }
            }
            Control::Revoke => {}
        }
        self.commit_conv(conv, record, adds, removes, now_ms)
    }

    /// Carries out the group operations admins asked for that ingest accepted, in groups
    /// this device commits for. Returns the chunks to publish, and what could not be done.
    pub fn run_ops(&mut self, now_ms: u64) -> (Vec<Outgoing>, Vec<String>) {
        let mut out = Vec::new();
        let mut failed = Vec::new();
        for (conv, control) in std::mem::take(&mut self.ops) {
            match self.group_op(conv, &control, now_ms) {
                Ok(o) => out.extend(o),
                Err(e) => failed.push(format!("group {conv}: {}: {e}", control.describe())),
            }
        }
        (out, failed)
    }

    /// Keeps a message for `peer` until a direct message with them can start; returns its
    /// place in the queue.
    pub fn queue_dm(&mut self, peer: UserId, message: Message) -> Result<u64, MlsError> {
        let queue = self.pending.entry(peer).or_default();
        let seq = queue.last().map_or(1, |(s, _)| s + 1);
        queue.push((seq, message.clone()));
        self.engine.vault.put(&pending_key(&peer, seq), &serde_json::to_vec(&message).expect("serializable"));
        self.engine.persist()?;
        Ok(seq)
    }

    /// Messages waiting for `peer`, in order.
    pub fn pending_for(&self, peer: &UserId) -> &[(u64, Message)] {
        self.pending.get(peer).map_or(&[], Vec::as_slice)
    }

    /// Sends what waits for `peer` if a direct message with them exists or can start now.
    /// Returns the conversation, the ids of the messages sent, and the chunks to publish.
    #[allow(clippy::type_complexity)]
    pub fn flush_pending(&mut self, peer: &UserId, now_ms: u64) -> Result<Option<(ConvId, Vec<MsgRef>, Vec<Outgoing>)>, MlsError> {
        if self.pending_for(peer).is_empty() || self.contacts.is_blocked(peer) {
            return Ok(None);
        }
        let mut outgoing = Vec::new();
        let conv = match self.dm(peer) {
            Some(conv) => conv,
            None if self.key_packages_of(peer).next().is_some() => {
                let (conv, out) = self.start_conv(ConvKind::Dm, "", &[*peer].into(), now_ms)?;
                outgoing.extend(out);
                conv
            }
            None => return Ok(None),
        };
        let queue = self.pending.remove(peer).unwrap_or_default();
        let mut ids = Vec::new();
        for (seq, message) in queue {
            let (id, out) = self.send(conv, CONV_CHANNEL, message, now_ms)?;
            self.engine.vault.delete(&pending_key(peer, seq));
            ids.push(id);
            outgoing.extend(out);
        }
        self.engine.persist()?;
        Ok(Some((conv, ids, outgoing)))
    }
}

/// Whether `name` may name a group: a label (1-64 bytes, not all digits, no `/`, no control
/// characters) that is not a conversation id.
fn check_group_name(name: &str) -> Result<(), MlsError> {
    if !crate::payload::valid_label(name) || crate::names::ConvId::parse(name).is_some() || name.contains(':') {
        return Err(MlsError::BadName(format!("{name:?} cannot name a group (1-64 bytes; not all digits, no '/' or ':', not 18 hex digits)")));
    }
    Ok(())
}
