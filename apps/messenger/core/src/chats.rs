//! The chat list: every conversation a device shows (team channels, direct messages,
//! groups), with unread counts and last activity, and marked (starred) messages.
//!
//! All of it is local to the device and sealed with the rest of its state. Unread counts
//! follow arrival order, not the senders' clocks: every stored message gets the next arrival
//! number, and a chat is read up to a number. So a message that arrives late, with an old
//! timestamp, still counts as unread.

use std::collections::BTreeMap;

use crate::device::{CONV_CHANNEL, Device, Stored};
use crate::engine::{MlsError, Record};
use crate::identity::UserId;
use crate::names::{ConvId, Gid};
use crate::payload::{ConvKind, MsgRef};
use crate::seal::Backend;

/// A chat, as the list shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Chat {
    /// A team's channel.
    Channel(u32, u16),
    /// Every direct-message conversation with a user, shown as one.
    Dm(UserId),
    /// A group.
    Group(ConvId),
    /// Every mail.
    Mail,
}

impl Chat {
    /// The key its read marker is stored under.
    fn key(&self) -> String {
        match self {
            Chat::Channel(t, c) => format!("ch/{t}/{c}"),
            Chat::Dm(u) => format!("dm/{u}"),
            Chat::Group(c) => format!("gr/{c}"),
            Chat::Mail => "mail".to_string(),
        }
    }
}

/// One line of the chat list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatSummary {
    /// The chat.
    pub chat: Chat,
    /// Messages from others that arrived after the last read, not counting edits, group
    /// operations, or blocked users' messages.
    pub unread: usize,
    /// When its latest message was written, unix ms (0 if it has none).
    pub last_ms: u64,
    /// How many messages it shows.
    pub messages: usize,
}

impl<B: Backend> Device<B> {
    /// Every stored message of a chat, with where it is.
    fn chat_messages(&self, chat: Chat) -> Vec<(Gid, u16, &Stored)> {
        let one = |g: Gid, channel: u16| -> Vec<(Gid, u16, &Stored)> {
            self.groups.get(&g).and_then(|t| t.history.get(&channel)).map(|h| h.values().map(|s| (g, channel, s)).collect()).unwrap_or_default()
        };
        match chat {
            Chat::Channel(t, c) => one(Gid::Team(t), c),
            Chat::Group(conv) => one(Gid::Conv(conv), CONV_CHANNEL),
            Chat::Dm(peer) => self.dm_convs(&peer).into_iter().flat_map(|c| one(Gid::Conv(c), CONV_CHANNEL)).collect(),
            Chat::Mail => self.mails().into_iter().map(|(c, s)| (Gid::Conv(c), CONV_CHANNEL, s)).collect(),
        }
    }

    /// Every chat this device shows: each channel of each team, each user it has a direct
    /// message with (or pending for), each group it is in.
    pub fn chat_ids(&self) -> Vec<Chat> {
        let mut out = Vec::new();
        for (g, t) in &self.groups {
            match (g, &t.record) {
                (Gid::Team(team), Record::Team(r)) => out.extend(r.channels.keys().map(|c| Chat::Channel(*team, *c))),
                (Gid::Conv(conv), Record::Conv(r)) if r.kind == ConvKind::Group => out.push(Chat::Group(*conv)),
                (Gid::Conv(_), Record::Conv(r)) if r.kind == ConvKind::Mail => out.push(Chat::Mail),
                (Gid::Conv(conv), Record::Conv(_)) => {
                    if let Some(peer) = self.dm_peer(*conv) {
                        out.push(Chat::Dm(peer));
                    }
                }
                _ => {}
            }
        }
        out.extend(self.pending.iter().filter(|(_, q)| !q.is_empty()).map(|(u, _)| Chat::Dm(*u)));
        out.sort();
        out.dedup();
        out
    }

    /// One chat's line.
    pub fn chat_summary(&self, chat: Chat) -> ChatSummary {
        let me = self.user_id();
        let read = self.read_up_to.get(&chat.key()).copied().unwrap_or(0);
        let messages = self.chat_messages(chat);
        let shown: Vec<&Stored> = messages.iter().map(|(.., s)| *s).filter(|s| s.message.replaces.is_none() && !self.hidden(s) && !crate::device::is_model_part(s)).collect();
        let unread = shown.iter().filter(|s| s.seq > read && s.user != Some(me) && s.message.control.is_none()).count();
        let mut last_ms = shown.iter().map(|s| s.message.created_ms).max().unwrap_or(0);
        if let Chat::Dm(peer) = chat {
            last_ms = last_ms.max(self.pending_for(&peer).iter().map(|(_, m)| m.created_ms).max().unwrap_or(0));
        }
        ChatSummary { chat, unread, last_ms, messages: shown.len() }
    }

    /// The chat list: most recent activity first (ties in chat order).
    pub fn chats(&self) -> Vec<ChatSummary> {
        let mut out: Vec<ChatSummary> = self.chat_ids().into_iter().map(|c| self.chat_summary(c)).collect();
        out.sort_by(|a, b| b.last_ms.cmp(&a.last_ms).then(a.chat.cmp(&b.chat)));
        out
    }

    /// Marks a chat read up to everything it holds now. Writes only if that changes anything.
    pub fn mark_read(&mut self, chat: Chat) -> Result<(), MlsError> {
        let top = self.chat_messages(chat).iter().map(|(.., s)| s.seq).max().unwrap_or(0);
        let key = chat.key();
        if self.read_up_to.get(&key).copied().unwrap_or(0) >= top {
            return Ok(());
        }
        self.engine.vault.put(format!("r/{key}").as_bytes(), top.to_string().as_bytes());
        self.engine.persist()?;
        self.read_up_to.insert(key, top);
        Ok(())
    }

    /// `mark ID` / `unmark ID`: stars a message this device holds, or takes the star away.
    pub fn set_marked(&mut self, group: Gid, channel: u16, id: MsgRef, marked: bool) -> Result<(), MlsError> {
        if self.stored(group, channel, id).is_none() {
            return Err(MlsError::BadName(format!("no message {group}/{channel}/{}/{}", id.device, id.msg)));
        }
        let key = format!("m/{group}/{channel}/{}/{}", id.device, id.msg);
        if marked {
            self.engine.vault.put(key.as_bytes(), b"");
            self.marked.insert((group, channel, id));
        } else {
            self.engine.vault.delete(key.as_bytes());
            self.marked.remove(&(group, channel, id));
        }
        self.engine.persist()
    }

    /// Marked messages, in the order they were written.
    pub fn marked(&self) -> Vec<(Gid, u16, MsgRef)> {
        let mut out: Vec<(u64, (Gid, u16, MsgRef))> =
            self.marked.iter().filter_map(|k| Some((self.stored(k.0, k.1, k.2)?.message.created_ms, *k))).collect();
        out.sort();
        out.into_iter().map(|(_, k)| k).collect()
    }

    /// Whether a message is marked.
    pub fn is_marked(&self, group: Gid, channel: u16, id: MsgRef) -> bool {
        self.marked.contains(&(group, channel, id))
    }

    /// Unread counts of every chat, by chat.
    pub fn unread(&self) -> BTreeMap<Chat, usize> {
        self.chat_ids().into_iter().map(|c| (c, self.chat_summary(c).unread)).collect()
    }
}
