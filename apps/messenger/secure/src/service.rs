//! Secure's requests and chunks, independent of sockets: a [`Service`] takes UI requests and
//! network chunks and says what to publish and what to subscribe to. [`crate::run`] wires it
//! to the UI socket and to Network.

use canopy::{Filter, Name};
use canopy_msg_core::contacts::Contact;
use canopy_msg_core::device::{CONV_CHANNEL, Device, Event, Shown};
use canopy_msg_core::engine::hex;
use canopy_msg_core::identity::UserId;
use canopy_msg_core::names::{ConvId, Gid, Users};
use canopy_msg_core::payload::{Control, ConvKind, MsgRef};
use canopy_msg_core::seal::Backend;
use canopy_msg_core::{Message, MlsError, Outgoing};

use canopy_msg_core::chats::Chat;

use canopy_msg_core::device::Stored;
use canopy_msg_core::payload::MailRef;

use crate::proto::{ChannelLine, ChatLine, ContactLine, ConvStatus, GroupLine, GroupMember, GroupOp, MailLine, MemberLine, MessageLine, PipelineLine, PipelineLog, Reply, Request, SavedState, SecureStatus, StepLine, TeamLine, TeamStatus};

/// Lifetime of a key package on the relays: 30 days.
pub const KEY_PACKAGE_TTL_MS: u64 = 30 * 24 * 3600 * 1000;

/// What handling a request or a batch of chunks asks the caller to do.
#[derive(Debug, Default)]
pub struct Effects {
    /// Chunks to publish through Network.
    pub publish: Vec<Outgoing>,
    /// Messages to pass to followers of their conversation.
    pub shown: Vec<MessageLine>,
    /// Set when the request was `stop`.
    pub stop: bool,
    /// Filters to replay once from Network's cache (messages dropped while held).
    pub refetch: Vec<Filter>,
    /// New filters to subscribe to (`CachedAndLive`) before publishing `publish`.
    pub subscribe: Vec<Filter>,
}

/// A conversation, as the UI addresses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// `TEAM/CHANNEL`.
    Channel(u32, u16),
    /// `dm:USER`: every direct-message conversation with the user, shown as one.
    Dm(UserId),
    /// `group:GROUP`.
    Group(ConvId),
    /// `mail`: every mail.
    Mail,
}

impl View {
    /// Whether `line` belongs to this conversation.
    pub fn shows(&self, line: &MessageLine) -> bool {
        match self {
            // Team numbers start at 1; lines outside teams carry 0.
            View::Channel(team, channel) => line.team == *team && line.channel == *channel,
            View::Dm(user) => line.conversation == format!("dm:{user}"),
            View::Group(conv) => line.conversation == format!("group:{conv}"),
            View::Mail => line.conversation == "mail",
        }
    }
}

/// Secure's state: the device's MLS state and history.
pub struct Service<B: Backend> {
    device: Device<B>,
    /// Whether the seccomp filter is installed.
    pub sandboxed: bool,
    /// Whether the link to Network is up.
    pub network_up: bool,
    /// Chunks handed to Network and not acknowledged yet (kept up to date by the caller).
    pub unacknowledged: usize,
    /// Network's latest fresh report (kept up to date by the caller).
    pub relay: Option<crate::proto::NetworkStatus>,
    /// Where the time comes from, for `status`.
    pub time_source: String,
}

/// The page of `lines` (in display order) that a `read` reply carries: the newest before
/// `before` (all, without it) that fit in [`crate::proto::READ_BUDGET`] bytes, and whether
/// older ones remain.
fn page(mut lines: Vec<MessageLine>, before: Option<&str>) -> Result<(Vec<MessageLine>, bool), MlsError> {
    let end = match before {
        Some(id) => lines.iter().position(|m| m.id == id).ok_or_else(|| MlsError::BadName(format!("no message {id} in this conversation")))?,
        None => lines.len(),
    };
    lines.truncate(end);
    let mut bytes = 0;
    let mut start = end;
    while start > 0 {
        // Its JSON size, with room for the frame's own syntax.
        let size = serde_json::to_vec(&lines[start - 1]).map_or(0, |v| v.len()) + 1;
        if bytes + size > crate::proto::READ_BUDGET {
            break;
        }
        bytes += size;
        start -= 1;
    }
    Ok((lines.split_off(start), start > 0))
}

/// 64 hex digits as 32 bytes.
fn unhex32(text: &str) -> Result<[u8; 32], MlsError> {
    canopy_msg_core::engine::unhex(text).and_then(|b| b.try_into().ok()).ok_or_else(|| MlsError::BadName(format!("{text:?} is not 64 hex digits")))
}

fn id_text(group: Gid, channel: u16, id: MsgRef) -> String {
    format!("{group}/{channel}/{}/{}", id.device, id.msg)
}

/// Reads a message id `GROUP/CHANNEL/DEVICE/MSG`, where the group is a team number or `c`
/// and a conversation id.
pub fn parse_id(text: &str) -> Option<(Gid, u16, MsgRef)> {
    let mut parts = text.split('/');
    let group = Gid::parse(parts.next()?)?;
    let channel = parts.next()?.parse().ok()?;
    let device = parts.next()?.parse().ok()?;
    let msg = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((group, channel, MsgRef { device, msg }))
}

fn bad_id(text: &str) -> MlsError {
    MlsError::BadName(format!("{text:?} is not a message id (GROUP/CHANNEL/DEVICE/MSG, as `read` prints it)"))
}

impl<B: Backend> Service<B> {
    /// Wraps an opened device.
    pub fn new(device: Device<B>) -> Self {
        Service { device, sandboxed: false, network_up: false, unacknowledged: 0, relay: None, time_source: "os".into() }
    }

    /// The device.
    pub fn device(&self) -> &Device<B> {
        &self.device
    }

    /// What to do once the link to Network is up: publish this device's key package in its
    /// users' space if it has no fresh one.
    pub fn start(&mut self, now_ms: u64) -> Result<Effects, MlsError> {
        let publish = self.device.ensure_key_package(now_ms, KEY_PACKAGE_TTL_MS)?;
        Ok(Effects { publish, subscribe: self.filters(), ..Effects::default() })
    }

    /// Every filter Secure needs from Network: the welcomes it waits for, each group's
    /// messages and commits, and the key packages of the users it follows.
    pub fn filters(&self) -> Vec<Filter> {
        let org = *self.device.org();
        let mut out = self.device.welcome_filters();
        for g in self.device.groups() {
            match g {
                Gid::Team(team) => {
                    out.push(org.team_messages(team).expect("a joined team fits"));
                    out.push(org.team_commits(team).expect("a joined team fits"));
                }
                Gid::Conv(conv) => {
                    out.push(Users::messages(conv).expect("a joined conversation fits"));
                    out.push(Users::commits(conv).expect("a joined conversation fits"));
                }
            }
        }
        // Users of other domains publish under their own; today a user is looked for under
        // this device's domain.
        for user in self.device.watched_users() {
            out.push(self.device.users().key_packages(&user));
        }
        out
    }

    /// A pipeline by `pipeline:ID`, or its group's id or name.
    fn resolve_pipeline(&self, text: &str) -> Result<ConvId, MlsError> {
        let conv = self.device.resolve_group(text.strip_prefix("pipeline:").unwrap_or(text))?;
        if !self.device.is_pipeline(conv) {
            return Err(MlsError::BadName(format!("group {conv} is no pipeline")));
        }
        Ok(conv)
    }

    /// What the UI calls a conversation.
    pub fn view(&self, text: &str) -> Result<View, MlsError> {
        if let Some(user) = text.strip_prefix("dm:") {
            return Ok(View::Dm(self.device.resolve_user(user)?));
        }
        if let Some(group) = text.strip_prefix("group:") {
            return Ok(View::Group(self.device.resolve_group(group)?));
        }
        // A pipeline is a group: `send pipeline:ID TEXT` talks in it, as in the seed.
        if text.starts_with("pipeline:") {
            return Ok(View::Group(self.resolve_pipeline(text)?));
        }
        if text == "mail" {
            return Ok(View::Mail);
        }
        match text.split_once('/') {
            Some((t, c)) if !t.is_empty() && !c.is_empty() && !c.contains('/') => {
                let team = self.device.resolve_team(t)?;
                Ok(View::Channel(team, self.device.resolve_channel(team, c)?))
            }
            _ => Err(MlsError::BadName(format!("{text:?} is not a conversation (TEAM/CHANNEL, dm:USER or group:GROUP)"))),
        }
    }

    fn line(&self, group: Gid, channel: u16, s: &Shown) -> MessageLine {
        let (team, team_name, channel_name, conversation) = match group {
            Gid::Team(team) => {
                let (team_name, channel_name) = self
                    .device
                    .teams()
                    .find(|(t, ..)| *t == team)
                    .map(|(_, r, ..)| (r.name.clone(), r.channels.get(&channel).cloned().unwrap_or_else(|| channel.to_string())))
                    .unwrap_or_default();
                let conversation = format!("{team_name}/{channel_name}");
                (team, team_name, channel_name, conversation)
            }
            Gid::Conv(conv) => {
                let conversation = match self.device.conv_record(conv).map(|r| r.kind) {
                    Some(ConvKind::Mail) => "mail".to_string(),
                    _ => self.device.dm_peer(conv).map_or_else(|| format!("group:{conv}"), |u| format!("dm:{u}")),
                };
                (0, String::new(), String::new(), conversation)
            }
        };
        MessageLine {
            id: id_text(group, channel, s.id),
            conversation,
            team,
            channel: if matches!(group, Gid::Team(_)) { channel } else { 0 },
            team_name,
            channel_name,
            device: s.id.device,
            user: s.user.map(|u| u.to_string()),
            from: self.from(s.user, s.id.device),
            sent_ms: s.sent_ms,
            text: s.text.clone(),
            reply_to: s.reply_to.map(|r| id_text(group, channel, r)),
            edited: s.edited,
            pending: false,
            control: s.control,
            marked: self.device.is_marked(group, channel, s.id),
        }
    }

    /// The chat a view shows.
    fn chat(view: View) -> Chat {
        match view {
            View::Channel(t, c) => Chat::Channel(t, c),
            View::Dm(u) => Chat::Dm(u),
            View::Group(c) => Chat::Group(c),
            View::Mail => Chat::Mail,
        }
    }

    fn mail_line(&self, conv: ConvId, s: &Stored) -> MailLine {
        let header = s.message.mail.as_ref().expect("a mail");
        let to = self.device.conv_record(conv).map(|r| r.users.iter().filter(|u| Some(**u) != s.user).map(ToString::to_string).collect()).unwrap_or_default();
        MailLine {
            reference: header.reference.to_string(),
            prev: header.prev.map(|p| p.to_string()),
            subject: header.subject.clone(),
            body: s.message.text.clone(),
            from: self.from(s.user, s.id.device),
            user: s.user.map(|u| u.to_string()),
            to,
            sent_ms: s.message.created_ms,
            id: id_text(Gid::Conv(conv), CONV_CHANNEL, s.id),
        }
    }

    fn chat_line(&self, chat: Chat) -> ChatLine {
        let summary = self.device.chat_summary(chat);
        let (conversation, kind, name) = match chat {
            Chat::Channel(t, c) => {
                let (team, channel) = self
                    .device
                    .teams()
                    .find(|(id, ..)| *id == t)
                    .map(|(_, r, ..)| (r.name.clone(), r.channels.get(&c).cloned().unwrap_or_else(|| c.to_string())))
                    .unwrap_or_default();
                (format!("{team}/{channel}"), "channel", format!("{team}/{channel}"))
            }
            Chat::Dm(u) => (format!("dm:{u}"), "dm", self.device.contacts().name(&u).map_or_else(|| u.short(), str::to_string)),
            Chat::Group(c) => {
                let kind = if self.device.is_pipeline(c) { "pipeline" } else { "group" };
                (format!("group:{c}"), kind, self.device.conv_record(c).map(|r| r.name.clone()).unwrap_or_default())
            }
            Chat::Mail => ("mail".to_string(), "mail", "mail".to_string()),
        };
        ChatLine { conversation, kind: kind.into(), name, unread: summary.unread, last_ms: summary.last_ms, messages: summary.messages }
    }

    fn pending_line(&self, peer: UserId, seq: u64, m: &Message) -> MessageLine {
        MessageLine {
            id: format!("pending/{seq}"),
            conversation: format!("dm:{peer}"),
            team: 0,
            channel: 0,
            team_name: String::new(),
            channel_name: String::new(),
            device: 0,
            user: Some(self.device.user_id().to_string()),
            from: "me".into(),
            sent_ms: m.created_ms,
            text: m.text.clone(),
            reply_to: None,
            edited: false,
            pending: true,
            control: false,
            marked: false,
        }
    }

    /// Who sent something, for people.
    fn from(&self, user: Option<UserId>, device: u32) -> String {
        match user {
            Some(u) if u == self.device.user_id() => "me".into(),
            Some(u) => self.device.contacts().name(&u).map_or_else(|| u.short(), str::to_string),
            None => format!("device {device}"),
        }
    }

    fn contact_line(&self, user: UserId, contact: &Contact) -> ContactLine {
        ContactLine { user: user.to_string(), name: contact.name.clone(), blocked: contact.blocked, devices: self.device.key_packages_of(&user).count() }
    }

    /// A conversation's messages, in display order.
    pub fn read(&self, view: View) -> Vec<MessageLine> {
        match view {
            View::Channel(team, channel) => self.device.messages(team, channel).iter().map(|s| self.line(Gid::Team(team), channel, s)).collect(),
            View::Dm(peer) => {
                let mut lines: Vec<MessageLine> = self
                    .device
                    .dm_convs(&peer)
                    .into_iter()
                    .flat_map(|c| self.device.messages(c, CONV_CHANNEL).into_iter().map(move |s| (c, s)))
                    .map(|(c, s)| self.line(Gid::Conv(c), CONV_CHANNEL, &s))
                    .collect();
                lines.extend(self.device.pending_for(&peer).iter().map(|(seq, m)| self.pending_line(peer, *seq, m)));
                lines.sort_by(|a, b| (a.sent_ms, &a.id).cmp(&(b.sent_ms, &b.id)));
                lines
            }
            View::Group(conv) => self.device.messages(conv, CONV_CHANNEL).iter().map(|s| self.line(Gid::Conv(conv), CONV_CHANNEL, s)).collect(),
            View::Mail => self
                .device
                .mails()
                .into_iter()
                .filter_map(|(c, s)| {
                    let mut line = self.line(Gid::Conv(c), CONV_CHANNEL, &self.device.message(c, CONV_CHANNEL, s.id)?);
                    let subject = s.message.mail.as_ref().map(|m| m.subject.as_str()).unwrap_or_default();
                    line.text = format!("{subject}: {}", line.text);
                    Some(line)
                })
                .collect(),
        }
    }

    /// A group as `group info` shows it.
    pub fn group_line(&mut self, conv: ConvId) -> Result<GroupLine, MlsError> {
        let record = self.device.conv_record(conv).cloned().ok_or_else(|| MlsError::BadName(format!("no group {conv}")))?;
        let (epoch, device) = self.device.group_state(conv).expect("a group it has a record of");
        let removed = self.device.is_removed(conv);
        let devices = if removed { Vec::new() } else { self.device.members(conv)? };
        let me = self.device.user_id();
        Ok(GroupLine {
            id: conv.to_string(),
            name: record.name.clone(),
            description: record.description.clone(),
            epoch,
            device,
            committer: device == 0,
            admin: record.admins.contains(&me),
            removed,
            stalled: self.device.stalled(conv).map(str::to_string),
            members: record
                .users
                .iter()
                .map(|u| GroupMember {
                    user: u.to_string(),
                    name: self.device.contacts().name(u).map(str::to_string),
                    admin: record.admins.contains(u),
                    devices: devices.iter().filter(|m| m.user == Some(*u)).count(),
                })
                .collect(),
        })
    }

    fn users(&self, users: &[String]) -> Result<Vec<UserId>, MlsError> {
        users.iter().map(|u| self.device.resolve_user(u)).collect()
    }

    fn group_op(&mut self, group: &str, op: GroupOp, force: bool, now_ms: u64, fx: &mut Effects) -> Result<Reply, MlsError> {
        let conv = self.device.resolve_group(group)?;
        let control = match op {
            GroupOp::Rename { name } => Control::Rename { name },
            GroupOp::Describe { description } => Control::Describe { description },
            GroupOp::Add { users, note } => Control::Add { users: self.users(&users)?, note },
            GroupOp::Remove { users, note } => Control::Remove { users: self.users(&users)?, note },
            GroupOp::Revoke => Control::Revoke,
        };
        let record = self.device.conv_record(conv).cloned().expect("resolved");
        if !record.admins.contains(&self.device.user_id()) && !force {
            return Err(MlsError::BadName(format!("you are not an admin of {}: every member would refuse it", record.name)));
        }
        let (_, device) = self.device.group_state(conv).expect("resolved");
        let requested = if device == 0 && !self.device.is_removed(conv) {
            fx.publish.extend(self.device.group_op(conv, &control, now_ms)?);
            fx.subscribe = self.filters();
            false
        } else {
            // The committer carries it out, if the members agree it comes from an admin.
            let (id, out) = self.device.send(conv, CONV_CHANNEL, Message::control(now_ms, control), now_ms)?;
            fx.publish.extend(out);
            if let Some(s) = self.device.message(conv, CONV_CHANNEL, id) {
                fx.shown.push(self.line(Gid::Conv(conv), CONV_CHANNEL, &s));
            }
            true
        };
        Ok(Reply::Group { group: self.group_line(conv)?, requested })
    }

    /// Handles one request at `now_ms`.
    pub fn handle(&mut self, request: Request, now_ms: u64) -> (Reply, Effects) {
        let mut fx = Effects::default();
        let reply = match self.try_handle(request, now_ms, &mut fx) {
            Ok(reply) => reply,
            Err(e) => Reply::Error { message: e.to_string() },
        };
        (reply, fx)
    }

    fn try_handle(&mut self, request: Request, now_ms: u64, fx: &mut Effects) -> Result<Reply, MlsError> {
        Ok(match request {
            Request::Ping => Reply::Pong,
            Request::Status => Reply::Status(self.status()),
            Request::DeviceLink { hkp } => {
                let bytes = canopy_msg_core::engine::unhex(&hkp).filter(|b| b.len() == 32).ok_or_else(|| MlsError::BadName(format!("{hkp:?} is not an hKP (64 hex digits)")))?;
                fx.subscribe.push(self.device.request_link(&bytes));
                Reply::Pong
            }
            Request::KeyPackage { link } => {
                let (hkp, out) = self.device.key_package(now_ms, KEY_PACKAGE_TTL_MS, link)?;
                fx.subscribe.push(self.device.org().welcome_filter(&hkp));
                fx.publish = out;
                Reply::KeyPackage { hkp: hex(&hkp) }
            }
            Request::Teams => Reply::Teams {
                teams: self.device.teams().map(|(id, r, epoch, device)| TeamLine { id, name: r.name.clone(), epoch, device }).collect(),
            },
            Request::Channels { team } => {
                let team = self.device.resolve_team(&team)?;
                let (_, record, ..) = self.device.teams().find(|(t, ..)| *t == team).expect("resolved");
                Reply::Channels { channels: record.channels.iter().map(|(id, name)| ChannelLine { id: *id, name: name.clone() }).collect() }
            }
            Request::Send { to, text, reply_to } => {
                let view = self.view(&to)?;
                self.send_to(view, text, reply_to, now_ms, fx)?
            }
            Request::Edit { id, text } => {
                let (group, channel, target) = parse_id(&id).ok_or_else(|| bad_id(&id))?;
                let (_, own) = self.device.group_state(group).ok_or_else(|| MlsError::UnknownTeam(group.to_string()))?;
                let original = self.device.stored(group, channel, target).ok_or_else(|| MlsError::BadName(format!("no message {id}")))?;
                let mine = match original.user {
                    Some(user) => user == self.device.user_id(),
                    None => original.id.device == own,
                };
                if !mine {
                    return Err(MlsError::BadName(format!("{id} was sent by device {}; only its sender can edit it", original.id.device)));
                }
                let message = Message { replaces: Some(target), ..Message::text(now_ms, text) };
                match self.send(group, channel, message, now_ms, fx)? {
                    Reply::Sent { queued, .. } => Reply::Sent { id, queued },
                    other => other,
                }
            }
            Request::Read { conversation, before } => {
                let view = self.view(&conversation)?;
                let (messages, more) = page(self.read(view), before.as_deref())?;
                self.device.mark_read(Self::chat(view))?;
                Reply::Messages { messages, more }
            }
            Request::MailSend { to, subject, body, prev } => {
                let to = self.users(&to)?.into_iter().collect();
                let prev = match prev {
                    Some(p) => Some(MailRef::parse(&p).ok_or_else(|| MlsError::BadName(format!("{p:?} is not a mail reference (16 hex digits)")))?),
                    None => None,
                };
                let (reference, conv, id, out) = self.device.send_mail(&to, &subject, &body, prev, now_ms)?;
                fx.publish.extend(out);
                fx.subscribe = self.filters();
                if let Some(s) = self.device.message(conv, CONV_CHANNEL, id) {
                    fx.shown.push(self.line(Gid::Conv(conv), CONV_CHANNEL, &s));
                }
                Reply::Mailed { reference: reference.to_string(), queued: !self.network_up }
            }
            Request::MailList => {
                let mut mails: Vec<MailLine> = self.device.mails().into_iter().map(|(c, s)| self.mail_line(c, s)).collect();
                mails.reverse();
                self.device.mark_read(Chat::Mail)?;
                Reply::Mails { mails }
            }
            Request::MailThread { reference } => {
                let r = MailRef::parse(&reference).ok_or_else(|| MlsError::BadName(format!("{reference:?} is not a mail reference (16 hex digits)")))?;
                Reply::Mails { mails: self.device.mail_thread(r)?.into_iter().map(|(c, s)| self.mail_line(c, s)).collect() }
            }
            Request::Backup { path, passphrase, settings } => {
                let data = self.device.export_backup(&settings);
                let groups = data.groups.len();
                let messages = data.groups.iter().map(|g| g.history.len()).sum();
                let json = serde_json::to_vec(&data).expect("a backup serializes");
                let sealed = canopy_msg_core::backup::seal(passphrase.as_bytes(), &json).map_err(|e| MlsError::BadName(e.to_string()))?;
                crate::store::write_private(std::path::Path::new(&path), &sealed).map_err(|e| MlsError::BadName(format!("writing {path}: {e}")))?;
                Reply::BackedUp { groups, messages, bytes: sealed.len() }
            }
            Request::Chats => Reply::Chats { chats: self.device.chats().into_iter().map(|c| self.chat_line(c.chat)).collect() },
            Request::Mark { id, marked } => {
                let (group, channel, target) = parse_id(&id).ok_or_else(|| bad_id(&id))?;
                self.device.set_marked(group, channel, target, marked)?;
                Reply::Pong
            }
            Request::Marked => Reply::Messages {
                messages: self
                    .device
                    .marked()
                    .into_iter()
                    .filter_map(|(g, c, id)| Some(self.line(g, c, &self.device.message(g, c, id)?)))
                    .collect(),
                more: false,
            },
            Request::Follow { conversation } => {
                self.view(&conversation)?;
                Reply::Pong
            }
            Request::Watch => Reply::Pong,
            Request::Whoami => Reply::Whoami {
                user: self.device.user_id().to_string(),
                user_key: hex(self.device.user_key()),
                device_key: hex(self.device.public_key()),
            },
            Request::Members { team } => {
                let team = self.device.resolve_team(&team)?;
                let members = self.device.members(team)?;
                Reply::Members {
                    members: members
                        .into_iter()
                        .map(|m| MemberLine {
                            device: m.device,
                            user: m.user.map(|u| u.to_string()),
                            name: m.user.and_then(|u| self.device.contacts().name(&u).map(str::to_string)),
                            me: m.me,
                        })
                        .collect(),
                }
            }
            Request::Contacts => Reply::Contacts { contacts: self.device.contacts().iter().map(|(u, c)| self.contact_line(*u, c)).collect() },
            Request::ContactName { user, name } => {
                let user = self.device.resolve_user(&user)?;
                let contact = self.device.name_contact(user, &name)?;
                fx.subscribe = self.filters();
                Reply::Contact(self.contact_line(user, &contact))
            }
            Request::ContactRemove { user } => {
                let user = self.device.resolve_user(&user)?;
                let contact = self.device.unname_contact(user)?;
                Reply::Contact(self.contact_line(user, &contact))
            }
            Request::Block { user, blocked } => {
                let user = self.device.resolve_user(&user)?;
                let contact = self.device.set_blocked(user, blocked, now_ms)?;
                fx.subscribe = self.filters();
                if !blocked {
                    // Welcomes refused during the block are taken again: fetch them once more.
                    fx.refetch.extend(self.device.welcome_filters());
                }
                Reply::Contact(self.contact_line(user, &contact))
            }
            Request::GroupCreate { name, users } => {
                let users = self.users(&users)?.into_iter().collect();
                let (conv, out) = self.device.create_group(&name, &users, now_ms)?;
                fx.publish.extend(out);
                fx.subscribe = self.filters();
                Reply::Group { group: self.group_line(conv)?, requested: false }
            }
            Request::GroupOp { group, operation, force } => self.group_op(&group, operation, force, now_ms, fx)?,
            Request::GroupInfo { group } => {
                let conv = self.device.resolve_group(&group)?;
                Reply::Group { group: self.group_line(conv)?, requested: false }
            }
            Request::GroupLeave { group } => {
                let conv = self.device.resolve_group(&group)?;
                self.device.leave(conv)?;
                Reply::Group { group: self.group_line(conv)?, requested: false }
            }
            Request::PipelineCreate { name, users, model, params } => {
                let users = self.users(&users)?.into_iter().collect();
                let (conv, out) = self.device.create_pipeline(&name, &users, &model, &params, now_ms)?;
                fx.publish.extend(out);
                fx.subscribe = self.filters();
                Reply::Group { group: self.group_line(conv)?, requested: false }
            }
            Request::Pipelines => Reply::Pipelines {
                pipelines: self
                    .device
                    .pipelines()
                    .into_iter()
                    .filter_map(|c| {
                        let log = self.device.pipeline_log(c)?;
                        Some(PipelineLine {
                            id: c.to_string(),
                            name: self.device.conv_record(c).map(|r| r.name.clone()).unwrap_or_default(),
                            model: hex(&log.model),
                            creator: log.creator.to_string(),
                            steps: log.steps.len(),
                            model_complete: log.bytes.is_some(),
                            model_mismatch: log.mismatch,
                        })
                    })
                    .collect(),
            },
            Request::PipelineLog { pipeline } => {
                let conv = self.resolve_pipeline(&pipeline)?;
                let log = self.device.pipeline_log(conv).ok_or_else(|| MlsError::BadName(format!("group {conv} is no pipeline")))?;
                Reply::Pipeline(Box::new(PipelineLog {
                    id: conv.to_string(),
                    name: self.device.conv_record(conv).map(|r| r.name.clone()).unwrap_or_default(),
                    creator: log.creator.to_string(),
                    members: log.members.iter().map(|u| u.to_string()).collect(),
                    me: self.device.user_id().to_string(),
                    model: hex(&log.model),
                    params: log.params,
                    bytes: log.bytes,
                    mismatch: log.mismatch,
                    steps: log
                        .steps
                        .into_iter()
                        .map(|s| StepLine {
                            id: id_text(Gid::Conv(conv), CONV_CHANNEL, s.id),
                            user: s.sender.map(|u| u.to_string()),
                            time_ms: s.time_ms,
                            kind: s.kind,
                            body: s.body,
                            prior: s.prior.map(|p| hex(&p)),
                        })
                        .collect(),
                    saved: self.device.pipeline_saved(conv).map(|s| SavedState { count: s.count, digest: hex(&s.digest), state: s.state.clone() }),
                }))
            }
            Request::PipelineStep { pipeline, kind, body, prior } => {
                let conv = self.resolve_pipeline(&pipeline)?;
                let prior = match prior {
                    Some(p) => Some(unhex32(&p)?),
                    None => None,
                };
                let (id, out) = self.device.pipeline_step(conv, &kind, &body, prior, now_ms)?;
                fx.publish.extend(out);
                if let Some(s) = self.device.message(conv, CONV_CHANNEL, id) {
                    fx.shown.push(self.line(Gid::Conv(conv), CONV_CHANNEL, &s));
                }
                Reply::Sent { id: id_text(Gid::Conv(conv), CONV_CHANNEL, id), queued: !self.network_up }
            }
            Request::PipelineSave { pipeline, count, digest, state } => {
                let conv = self.resolve_pipeline(&pipeline)?;
                let digest = unhex32(&digest)?;
                self.device.save_pipeline(conv, &canopy_msg_core::pipeline::Saved { count, digest, state })?;
                Reply::Pong
            }
            Request::BtcKey { name, action, network } => {
                let network = crate::btc::network_or_regtest(network.as_deref())?;
                let vault = crate::btc::vault_name(&name)?;
                match action {
                    crate::proto::BtcKeyAction::Show => {}
                    crate::proto::BtcKeyAction::New | crate::proto::BtcKeyAction::Import { .. } if self.device.secret(&vault).is_some() => {
                        return Err(MlsError::BadName(format!("a Bitcoin key named {name:?} exists already")));
                    }
                    crate::proto::BtcKeyAction::New => {
                        let (vault, secret) = crate::btc::new_key(&name)?;
                        self.device.set_secret(&vault, &secret)?;
                    }
                    crate::proto::BtcKeyAction::Import { wif } => {
                        let (vault, secret) = crate::btc::import_key(&name, &wif)?;
                        self.device.set_secret(&vault, &secret)?;
                    }
                }
                let key = crate::btc::key(self.device.secret(&vault), &name)?;
                Reply::BtcKey(crate::btc::line(&name, &key, network)?)
            }
            Request::Sign { key, kind, payload, approved, network } => {
                if kind != "psbt" {
                    return Err(MlsError::BadName(format!("Secure signs no {kind:?}: only psbt")));
                }
                let network = crate::btc::network_or_regtest(network.as_deref())?;
                let private = crate::btc::key(self.device.secret(&crate::btc::vault_name(&key)?), &key)?;
                match approved {
                    None => {
                        let (summary, digest) = crate::btc::review(&payload, network)?;
                        Reply::Approve { summary, digest }
                    }
                    Some(digest) => Reply::Signed { payload: crate::btc::sign(&payload, &private, &digest, network)? },
                }
            }
            Request::Groups => {
                let ids: Vec<ConvId> = self.device.chat_groups().map(|(c, _)| c).collect();
                Reply::Groups { groups: ids.into_iter().map(|c| self.group_line(c)).collect::<Result<_, _>>()? }
            }
            Request::SandboxCheck => {
                let (errno, error) = crate::sandbox::check();
                Reply::Sandbox { errno, error }
            }
            Request::Stop => {
                fx.stop = true;
                Reply::Stopping
            }
        })
    }

    fn send_to(&mut self, view: View, text: String, reply_to: Option<String>, now_ms: u64, fx: &mut Effects) -> Result<Reply, MlsError> {
        let group = match view {
            View::Channel(team, channel) => return self.send_reply(Gid::Team(team), channel, text, reply_to, now_ms, fx),
            View::Group(conv) => Gid::Conv(conv),
            View::Mail => return Err(MlsError::BadName("mail takes recipients and a subject: use `mail send`".into())),
            View::Dm(peer) => {
                if peer == self.device.user_id() {
                    return Err(MlsError::BadName("a direct message goes to someone else".into()));
                }
                if self.device.contacts().is_blocked(&peer) {
                    return Err(MlsError::BadName(format!("{peer} is blocked: unblock them first")));
                }
                match self.device.dm(&peer) {
                    Some(conv) => Gid::Conv(conv),
                    None if self.device.key_packages_of(&peer).next().is_some() => {
                        let (conv, out) = self.device.start_conv(ConvKind::Dm, "", &[peer].into(), now_ms)?;
                        fx.publish.extend(out);
                        fx.subscribe = self.filters();
                        Gid::Conv(conv)
                    }
                    None => {
                        if reply_to.is_some() {
                            return Err(MlsError::BadName("nothing to reply to yet".into()));
                        }
                        // Nothing known of the peer's devices yet: kept until their key packages
                        // arrive, and the subscription that brings them is opened now.
                        let message = Message::text(now_ms, text);
                        message.encode()?;
                        let seq = self.device.queue_dm(peer, message)?;
                        fx.subscribe.push(self.device.users().key_packages(&peer));
                        // And the peer's online devices are asked to publish some.
                        let origin = self.device.users().origin();
                        fx.publish.push(self.device.request(origin, peer, now_ms)?);
                        let (_, m) = self.device.pending_for(&peer).iter().find(|(s, _)| *s == seq).expect("just queued");
                        fx.shown.push(self.pending_line(peer, seq, m));
                        return Ok(Reply::Sent { id: format!("pending/{seq}"), queued: true });
                    }
                }
            }
        };
        self.send_reply(group, CONV_CHANNEL, text, reply_to, now_ms, fx)
    }

    fn send_reply(&mut self, group: Gid, channel: u16, text: String, reply_to: Option<String>, now_ms: u64, fx: &mut Effects) -> Result<Reply, MlsError> {
        let reply_to = match reply_to {
            Some(text) => {
                let (g, c, id) = parse_id(&text).ok_or_else(|| bad_id(&text))?;
                if (g, c) != (group, channel) {
                    return Err(MlsError::BadName(format!("{text} is in another conversation; replies stay in theirs")));
                }
                if self.device.stored(group, channel, id).is_none() {
                    return Err(MlsError::BadName(format!("no message {text}")));
                }
                Some(id)
            }
            None => None,
        };
        let message = Message { reply_to, ..Message::text(now_ms, text) };
        self.send(group, channel, message, now_ms, fx)
    }

    fn send(&mut self, group: Gid, channel: u16, message: Message, now_ms: u64, fx: &mut Effects) -> Result<Reply, MlsError> {
        let (id, out) = self.device.send(group, channel, message, now_ms)?;
        fx.publish.extend(out);
        let target = self.device.stored(group, channel, id).and_then(|s| s.message.replaces).unwrap_or(id);
        if let Some(s) = self.device.message(group, channel, target) {
            fx.shown.push(self.line(group, channel, &s));
        }
        Ok(Reply::Sent { id: id_text(group, channel, id), queued: !self.network_up })
    }

    /// A publish was refused because its name is taken: this device skips past it. The
    /// message keeps its place in the device's own history; it is sent again under new
    /// numbers by the caller if it matters (today: counted and logged).
    pub fn refused(&mut self, name: Name) {
        if let Some((group, channel, msg)) = self.device.parse_message_name(name) {
            let _ = self.device.skip_taken(group, channel, msg);
        }
    }

    /// Takes chunks from Network at `now_ms`. What changed is written, not yet durable: show
    /// it, then [`Service::sync`].
    pub fn ingest(&mut self, chunks: &[(Name, Vec<u8>)], now_ms: u64) -> Result<(Vec<Event>, Effects), MlsError> {
        let events = self.device.ingest(chunks.iter().map(|(n, d)| (*n, d.as_slice())))?;
        let mut fx = Effects::default();
        for event in &events {
            match event {
                Event::Message { group, channel, id } => {
                    if let Some(s) = self.device.message(*group, *channel, *id) {
                        fx.shown.push(self.line(*group, *channel, &s));
                    }
                }
                Event::Rejected { name, reason } => tracing::warn!(%name, "refused: {reason}"),
                Event::Linked { user } => tracing::info!(%user, "this device is now a device of the user"),
                // Answered by the supply check at the end of this batch.
                Event::KeyPackagesRequested { by } => tracing::info!(%by, "asked for fresh key packages"),
                Event::Joined { group, device } => tracing::info!(%group, device, "joined"),
                Event::Epoch { group, epoch } => tracing::debug!(%group, epoch, "new epoch"),
                Event::KeyPackage { user } => {
                    // A device of a user this device follows: add it where this device commits,
                    // and send what waited for the user.
                    match self.device.adopt_devices(user, now_ms) {
                        Ok(out) => fx.publish.extend(out),
                        Err(e) => tracing::warn!(%user, "adding a new device of the user failed: {e}"),
                    }
                    match self.device.flush_pending(user, now_ms) {
                        Ok(Some((conv, ids, out))) => {
                            fx.publish.extend(out);
                            for id in ids {
                                if let Some(s) = self.device.message(conv, CONV_CHANNEL, id) {
                                    fx.shown.push(self.line(Gid::Conv(conv), CONV_CHANNEL, &s));
                                }
                            }
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!(%user, "sending what waited for the user failed: {e}"),
                    }
                }
                Event::Refetch { group } => {
                    tracing::info!(%group, "fetching the group's messages again: some were dropped while held for future epochs");
                    fx.refetch.push(match group {
                        Gid::Team(team) => self.device.org().team_messages(*team).expect("a joined team fits"),
                        Gid::Conv(conv) => Users::messages(*conv).expect("a joined conversation fits"),
                    });
                }
            }
        }
        let (out, failed) = self.device.run_ops(now_ms);
        fx.publish.extend(out);
        for f in failed {
            tracing::warn!("a group operation an admin asked for failed: {f}");
        }
        let (out, failed) = self.device.run_links(now_ms);
        fx.publish.extend(out);
        for f in failed {
            tracing::warn!("linking a device failed: {f}");
        }
        match self.device.ensure_key_package(now_ms, KEY_PACKAGE_TTL_MS) {
            Ok(out) => fx.publish.extend(out),
            Err(e) => tracing::warn!("publishing a fresh key package failed: {e}"),
        }
        Ok((events, fx))
    }

    /// Makes what [`Service::ingest`] took durable.
    pub fn sync(&mut self) -> Result<(), MlsError> {
        self.device.sync()
    }

    /// Secure's status.
    pub fn status(&self) -> SecureStatus {
        let c = &self.device.counters;
        SecureStatus {
            user: self.device.user_id().to_string(),
            teams: self
                .device
                .teams()
                .map(|(id, r, epoch, device)| TeamStatus {
                    id,
                    name: r.name.clone(),
                    epoch,
                    device,
                    gap: self.device.missing_commits(id),
                    stalled: self.device.stalled(id).map(str::to_string),
                })
                .collect(),
            conversations: self
                .device
                .convs()
                .map(|(id, r, epoch, device)| ConvStatus {
                    id: id.to_string(),
                    kind: match r.kind {
                        ConvKind::Dm => "dm".into(),
                        ConvKind::Group => "group".into(),
                        ConvKind::Mail => "mail".into(),
                        ConvKind::Link => "devices".into(),
                    },
                    name: self.device.dm_peer(id).map_or_else(|| r.name.clone(), |u| format!("dm:{u}")),
                    epoch,
                    device,
                    gap: self.device.missing_commits(id),
                    stalled: self.device.stalled(id).map(str::to_string),
                })
                .collect(),
            pending: self.device.watched_users().iter().map(|u| self.device.pending_for(u).len()).sum(),
            waiting: self.device.waiting().map(hex).collect(),
            network: self.network_up,
            relay: self.relay.clone(),
            unacknowledged: self.unacknowledged,
            time_source: self.time_source.clone(),
            messages: c.messages,
            commits: c.commits,
            rejected: c.rejected,
            duplicates: c.duplicates,
            held: c.held,
            blocked: c.blocked,
            requests: c.requests,
            key_packages: {
                let k = self.device.supply();
                crate::proto::KeyPackageSupply { one_time: k.one_time, claimed: k.claimed, used: k.used, last_resort: k.last_resort }
            },
            linking: self.device.links().0.into_iter().map(hex).collect(),
            linked: self.device.links().1.into_iter().map(hex).collect(),
            sandboxed: self.sandboxed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::page;
    use crate::proto::{MAX_FRAME, MessageLine, READ_BUDGET, Reply};

    fn line(i: usize) -> MessageLine {
        MessageLine {
            id: format!("c1/0/1/{i}"),
            conversation: "dm:x".into(),
            team: 0,
            channel: 0,
            team_name: String::new(),
            channel_name: String::new(),
            device: 1,
            user: None,
            from: "bob".into(),
            sent_ms: i as u64,
            text: "x".repeat(16 * 1024),
            reply_to: None,
            edited: false,
            pending: false,
            control: false,
            marked: false,
        }
    }

    #[test]
    fn a_long_history_is_read_in_pages_that_fit_a_frame_and_add_up_to_all_of_it() {
        let all: Vec<MessageLine> = (0..1000).map(line).collect();
        let mut got: Vec<MessageLine> = Vec::new();
        let mut before: Option<String> = None;
        let mut pages = 0;
        loop {
            let (messages, more) = page(all.clone(), before.as_deref()).unwrap();
            let frame = serde_json::to_vec(&Reply::Messages { messages: messages.clone(), more }).unwrap();
            assert!(frame.len() <= READ_BUDGET + 64 && frame.len() < MAX_FRAME, "{}", frame.len());
            assert!(!messages.is_empty());
            pages += 1;
            before = messages.first().map(|m| m.id.clone());
            got.splice(0..0, messages);
            if !more {
                break;
            }
        }
        assert!(pages > 3, "16 MiB of messages take several pages: {pages}");
        assert_eq!(got, all, "every message once, in order");
        // A short history is one page; an unknown `before` is a clear error.
        assert_eq!(page(all[..3].to_vec(), None).unwrap(), (all[..3].to_vec(), false));
        assert!(page(all[..3].to_vec(), Some("c9/9/9/9")).unwrap_err().to_string().contains("no message c9/9/9/9"));
    }
}
