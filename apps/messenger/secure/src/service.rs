//! Secure's requests and chunks, independent of sockets: a [`Service`] takes UI requests and
//! network chunks and says what to publish and what to subscribe to. [`crate::run`] wires it
//! to the UI socket and to Network.

use canopy::{Filter, Name};
use canopy_msg_core::device::{Device, Event, Shown};
use canopy_msg_core::engine::hex;
use canopy_msg_core::payload::MsgRef;
use canopy_msg_core::seal::Backend;
use canopy_msg_core::{Message, MlsError, Outgoing};

use canopy_msg_core::contacts::Contact;
use canopy_msg_core::identity::UserId;

use crate::proto::{ChannelLine, ContactLine, MemberLine, MessageLine, Reply, Request, SecureStatus, TeamLine, TeamStatus};

/// Lifetime of a key package on the relays: 30 days.
pub const KEY_PACKAGE_TTL_MS: u64 = 30 * 24 * 3600 * 1000;

/// What handling a request or a batch of chunks asks the caller to do.
#[derive(Debug, Default)]
pub struct Effects {
    /// Chunks to publish through Network.
    pub publish: Vec<Outgoing>,
    /// Messages to pass to followers of their channel.
    pub shown: Vec<MessageLine>,
    /// Set when the request was `stop`.
    pub stop: bool,
    /// Filters to replay once from Network's cache (messages dropped while held).
    pub refetch: Vec<Filter>,
    /// New filters to subscribe to (`CachedAndLive`) before publishing `publish`.
    pub subscribe: Vec<Filter>,
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
    /// Where the time comes from, for `status`.
    pub time_source: String,
}

fn id_text(team: u32, channel: u16, id: MsgRef) -> String {
    format!("{team}/{channel}/{}/{}", id.device, id.msg)
}

/// Reads a message id `TEAM/CHANNEL/DEVICE/MSG`.
pub fn parse_id(text: &str) -> Option<(u32, u16, MsgRef)> {
    let mut parts = text.split('/');
    let team = parts.next()?.parse().ok()?;
    let channel = parts.next()?.parse().ok()?;
    let device = parts.next()?.parse().ok()?;
    let msg = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((team, channel, MsgRef { device, msg }))
}

impl<B: Backend> Service<B> {
    /// Wraps an opened device.
    pub fn new(device: Device<B>) -> Self {
        Service { device, sandboxed: false, network_up: false, unacknowledged: 0, time_source: "os".into() }
    }

    /// The device.
    pub fn device(&self) -> &Device<B> {
        &self.device
    }

    /// Every filter Secure needs from Network: the welcomes it waits for, and each team's
    /// messages and commits.
    pub fn filters(&self) -> Vec<Filter> {
        let org = *self.device.org();
        let mut out: Vec<Filter> = self.device.waiting().map(|hkp| org.welcome_filter(hkp)).collect();
        for (team, ..) in self.device.teams() {
            out.push(org.team_messages(team).expect("a joined team fits"));
            out.push(org.team_commits(team).expect("a joined team fits"));
        }
        out
    }

    fn line(&self, team: u32, channel: u16, s: &Shown) -> MessageLine {
        let (team_name, channel_name) = self
            .device
            .teams()
            .find(|(t, ..)| *t == team)
            .map(|(_, r, ..)| (r.name.clone(), r.channels.get(&channel).cloned().unwrap_or_else(|| channel.to_string())))
            .unwrap_or_default();
        MessageLine {
            id: id_text(team, channel, s.id),
            team,
            channel,
            team_name,
            channel_name,
            device: s.id.device,
            user: s.user.map(|u| u.to_string()),
            from: self.from(s.user, s.id.device),
            sent_ms: s.sent_ms,
            text: s.text.clone(),
            reply_to: s.reply_to.map(|r| id_text(team, channel, r)),
            edited: s.edited,
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

    fn contact_line(user: UserId, contact: &Contact) -> ContactLine {
        ContactLine { user: user.to_string(), name: contact.name.clone(), blocked: contact.blocked }
    }

    fn target(&self, team: &str, channel: &str) -> Result<(u32, u16), MlsError> {
        let team = self.device.resolve_team(team)?;
        Ok((team, self.device.resolve_channel(team, channel)?))
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
            Request::KeyPackage => {
                let (hkp, out) = self.device.key_package(now_ms, KEY_PACKAGE_TTL_MS)?;
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
            Request::Send { team, channel, text, reply_to } => {
                let (team, channel) = self.target(&team, &channel)?;
                let reply_to = match reply_to {
                    Some(text) => {
                        let (t, c, id) = parse_id(&text).ok_or_else(|| MlsError::BadName(format!("{text:?} is not a message id (TEAM/CHANNEL/DEVICE/MSG)")))?;
                        if (t, c) != (team, channel) {
                            return Err(MlsError::BadName(format!("{text} is in another channel; replies stay in their channel")));
                        }
                        if self.device.stored(team, channel, id).is_none() {
                            return Err(MlsError::BadName(format!("no message {text}")));
                        }
                        Some(id)
                    }
                    None => None,
                };
                let message = Message { created_ms: now_ms, reply_to, replaces: None, text };
                self.send(team, channel, message, now_ms, fx)?
            }
            Request::Edit { id, text } => {
                let (team, channel, target) = parse_id(&id).ok_or_else(|| MlsError::BadName(format!("{id:?} is not a message id (TEAM/CHANNEL/DEVICE/MSG)")))?;
                let own = self.device.teams().find(|(t, ..)| *t == team).map(|(.., d)| d).ok_or_else(|| MlsError::UnknownTeam(team.to_string()))?;
                let original = self.device.stored(team, channel, target).ok_or_else(|| MlsError::BadName(format!("no message {id}")))?;
                let mine = match original.user {
                    Some(user) => user == self.device.user_id(),
                    None => original.id.device == own,
                };
                if !mine {
                    return Err(MlsError::BadName(format!("{id} was sent by device {}; only its sender can edit it", original.id.device)));
                }
                let message = Message { created_ms: now_ms, reply_to: None, replaces: Some(target), text };
                match self.send(team, channel, message, now_ms, fx)? {
                    Reply::Sent { queued, .. } => Reply::Sent { id, queued },
                    other => other,
                }
            }
            Request::Read { team, channel } => {
                let (team, channel) = self.target(&team, &channel)?;
                Reply::Messages { messages: self.device.messages(team, channel).iter().map(|s| self.line(team, channel, s)).collect() }
            }
            Request::Follow { team, channel } => {
                self.target(&team, &channel)?;
                Reply::Pong
            }
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
            Request::Contacts => Reply::Contacts { contacts: self.device.contacts().iter().map(|(u, c)| Self::contact_line(*u, c)).collect() },
            Request::ContactName { user, name } => {
                let user = self.device.resolve_user(&user)?;
                let contact = self.device.name_contact(user, &name)?;
                Reply::Contact(Self::contact_line(user, &contact))
            }
            Request::ContactRemove { user } => {
                let user = self.device.resolve_user(&user)?;
                let contact = self.device.unname_contact(user)?;
                Reply::Contact(Self::contact_line(user, &contact))
            }
            Request::Block { user, blocked } => {
                let user = self.device.resolve_user(&user)?;
                let contact = self.device.set_blocked(user, blocked)?;
                Reply::Contact(Self::contact_line(user, &contact))
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

    fn send(&mut self, team: u32, channel: u16, message: Message, now_ms: u64, fx: &mut Effects) -> Result<Reply, MlsError> {
        let (id, out) = self.device.send(team, channel, message, now_ms)?;
        fx.publish = out;
        let target = self.device.stored(team, channel, id).and_then(|s| s.message.replaces).unwrap_or(id);
        if let Some(s) = self.device.message(team, channel, target) {
            fx.shown.push(self.line(team, channel, &s));
        }
        Ok(Reply::Sent { id: id_text(team, channel, id), queued: !self.network_up })
    }

    /// A publish was refused because its name is taken: this device skips past it. The
    /// message keeps its place in the device's own history; it is sent again under new
    /// numbers by the caller if it matters (today: counted and logged).
    pub fn refused(&mut self, name: Name) {
        if let Some(canopy_msg_core::names::Parsed::Message { team, channel, msg, .. }) = self.device.org().parse(name) {
            let _ = self.device.skip_taken(team, channel, msg);
        }
    }

    /// Takes chunks from Network. What changed is written, not yet durable: show it, then
    /// [`Service::sync`].
    pub fn ingest(&mut self, chunks: &[(Name, Vec<u8>)]) -> Result<(Vec<Event>, Effects), MlsError> {
        let events = self.device.ingest(chunks.iter().map(|(n, d)| (*n, d.as_slice())))?;
        let mut fx = Effects::default();
        for event in &events {
            match event {
                Event::Message { team, channel, id } => {
                    if let Some(s) = self.device.message(*team, *channel, *id) {
                        fx.shown.push(self.line(*team, *channel, &s));
                    }
                }
                Event::Rejected { name, reason } => tracing::warn!(%name, "refused: {reason}"),
                Event::Joined { team, device } => tracing::info!(team, device, "joined"),
                Event::Epoch { team, epoch } => tracing::debug!(team, epoch, "new epoch"),
                Event::Refetch { team } => {
                    tracing::info!(team, "fetching the team's messages again: some were dropped while held for future epochs");
                    fx.refetch.push(self.device.org().team_messages(*team).expect("a joined team fits"));
                }
            }
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
                .map(|(id, r, epoch, device)| TeamStatus { id, name: r.name.clone(), epoch, device, gap: self.device.missing_commits(id) })
                .collect(),
            waiting: self.device.waiting().map(hex).collect(),
            network: self.network_up,
            unacknowledged: self.unacknowledged,
            time_source: self.time_source.clone(),
            messages: c.messages,
            commits: c.commits,
            rejected: c.rejected,
            duplicates: c.duplicates,
            held: c.held,
            blocked: c.blocked,
            sandboxed: self.sandboxed,
        }
    }
}
