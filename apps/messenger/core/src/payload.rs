//! What travels inside MLS: message payloads, and the team record every member holds.
//!
//! Both are small hand-written binary formats, documented byte for byte so that another
//! client can interoperate. Integers are big-endian; a string is its UTF-8 bytes after a
//! length (`u16` unless said otherwise).
//!
//! **Message** (the plaintext of an MLS application message):
//!
//! | size | field |
//! |---|---|
//! | 1 | version, `1` |
//! | 1 | kind, `1` (text) |
//! | 8 | creation time, unix ms |
//! | 1 | flags: bit 0 `reply_to` present, bit 1 `replaces` present |
//! | 8 | `reply_to`: device `u32`, msg `u32` (if flagged) |
//! | 8 | `replaces`: device `u32`, msg `u32` (if flagged) |
//! | … | the text, UTF-8, to the end (at most [`MAX_TEXT`] bytes) |
//!
//! **Control message** (kind `2`: a group operation, sent by an admin's device and carried out
//! by the group's committer):
//!
//! | size | field |
//! |---|---|
//! | 1 | version, `1` |
//! | 1 | kind, `2` (control) |
//! | 8 | creation time, unix ms |
//! | 1 | operation: `1` rename, `2` describe, `3` add members, `4` remove members, `5` revoke |
//! | 2+n | rename: the new name; describe: the new description |
//! | 2, 16 × n, 2+m | add, remove: user count, the user ids, then a note |
//!
//! **Mail** (kind `3`):
//!
//! | size | field |
//! |---|---|
//! | 1 | version, `1` |
//! | 1 | kind, `3` (mail) |
//! | 8 | creation time, unix ms |
//! | 8 | `ref`: this mail's reference, random |
//! | 1 | flags: bit 0 `prev` present |
//! | 8 | `prev`: the reference of the mail it answers (if flagged) |
//! | 2+n | subject (at most 1 KiB) |
//! | … | the body, UTF-8, to the end (at most [`MAX_TEXT`] bytes) |
//!
//! A message id inside a channel is `(device, msg)`: the sending device and the message
//! number of the message's first fragment. `reply_to` and `replaces` refer to messages of
//! the same channel.
//!
//! **Team record** (the group context extension [`TEAM_EXTENSION`], so every member
//! holds the same one, authenticated by MLS, from the welcome on):
//!
//! | size | field |
//! |---|---|
//! | 1 | version, `1` |
//! | 4 | org |
//! | 4 | team |
//! | 2+n | team name |
//! | 8 ×4 | lifetimes in ms: messages, commits, welcomes, key packages |
//! | 2 | channel count, then per channel: id `u16`, name |
//! | 4 | next device id |
//! | 4 | device count, then per device: leaf index `u32`, device id `u32` |
//!
//! **Conversation record** (the group context extension [`CONV_EXTENSION`] of a direct
//! message or a group):
//!
//! | size | field |
//! |---|---|
//! | 1 | version, `1` |
//! | 1 | kind: `1` direct message, `2` group |
//! | 4 | origin (24 bits used) |
//! | 8 | conversation number (48 bits used) |
//! | 2+n | name (empty for a direct message) |
//! | 2+n | description |
//! | 8 ×4 | lifetimes in ms: messages, commits, welcomes, key packages |
//! | 16 | the creator's user id |
//! | 2 | user count, then 16 bytes per member user |
//! | 2 | admin count, then 16 bytes per admin user |
//! | 4 | next device id |
//! | 4 | device count, then per device: leaf index `u32`, device id `u32` |

use std::collections::BTreeMap;

/// The largest text a message carries, in bytes.
pub const MAX_TEXT: usize = 16 * 1024;
/// The largest group name, description or note, in bytes.
pub const MAX_LABEL_TEXT: usize = 1024;
/// The group context extension type of the [`TeamRecord`] (private-use range).
pub const TEAM_EXTENSION: u16 = 0xff0a;
/// The group context extension type of the [`ConvRecord`] (private-use range).
pub const CONV_EXTENSION: u16 = 0xff0b;
/// The most users a conversation record lists.
pub const MAX_CONV_USERS: usize = 1000;
/// Default lifetime of messages and commits: 90 days.
pub const DEFAULT_MESSAGE_TTL_MS: u64 = 90 * 24 * 3600 * 1000;
/// Default lifetime of welcomes and key packages: 30 days.
pub const DEFAULT_JOIN_TTL_MS: u64 = 30 * 24 * 3600 * 1000;

/// Why bytes could not be read as a payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Too few bytes.
    #[error("the payload ends early")]
    Truncated,
    /// A version or kind this code does not read.
    #[error("unsupported payload version {version}, kind {kind}")]
    Unsupported {
        /// Version byte.
        version: u8,
        /// Kind byte.
        kind: u8,
    },
    /// Text that is not UTF-8.
    #[error("the text is not UTF-8")]
    Utf8,
    /// A text over [`MAX_TEXT`].
    #[error("the text is {0} bytes; the limit is {MAX_TEXT}")]
    TooLong(usize),
    /// Bytes left after the record.
    #[error("{0} bytes follow the record")]
    Trailing(usize),
}

/// A message inside a channel: `(device, msg)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct MsgRef {
    /// The sending device.
    pub device: u32,
    /// The message number of its first fragment.
    pub msg: u32,
}

/// A text message, as its sender wrote it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// When it was written, unix ms (the sender's clock).
    pub created_ms: u64,
    /// The message this one answers.
    pub reply_to: Option<MsgRef>,
    /// The message this one edits (honoured only from the same device).
    pub replaces: Option<MsgRef>,
    /// The text (empty for a control message).
    pub text: String,
    /// A group operation, for a control message.
    #[serde(default)]
    pub control: Option<Control>,
    /// The mail header, for a mail (whose body is the text).
    #[serde(default)]
    pub mail: Option<MailHeader>,
    /// The user's identity key, handed to a new device of the user (`device link`).
    #[serde(default, skip_serializing)]
    pub identity: Option<Vec<u8>>,
    /// A pipeline message: its creation, a step its model applies, or a part of its model.
    #[serde(default)]
    pub pipeline: Option<Pipeline>,
}

/// The most bytes of a model one [`Pipeline::ModelPart`] carries: its message stays a few
/// chunks.
pub const MAX_MODEL_PART: usize = 12 * 1024;
/// The largest model a pipeline may ship (3 MiB): the UI hands it to Secure, and Secure back,
/// in one frame (base64 in a 4 MiB frame).
pub const MAX_MODEL: usize = 3 << 20;

/// What a pipeline's group carries besides texts (`docs/pipelines.md`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Pipeline {
    /// The pipeline starts: which model (the SHA-256 of its bytes, which follow as
    /// [`Pipeline::ModelPart`]s), its size, and the creator's parameters (JSON).
    Create {
        /// The model's id.
        model: [u8; 32],
        /// The model's size in bytes.
        size: u32,
        /// The parameters `init` takes.
        params: String,
    },
    /// A message the model applies: one of its message types, and a body.
    Step {
        /// The message type.
        kind: String,
        /// The body.
        body: String,
        /// The hash of the pipeline's state on the sender's device before this step: every
        /// member compares it with its own, so a divergence shows.
        prior: Option<[u8; 32]>,
    },
    /// Part `index` of the model's bytes, [`MAX_MODEL_PART`] at most.
    ModelPart {
        /// The model's id.
        model: [u8; 32],
        /// Which part, from 0.
        index: u32,
        /// The bytes.
        bytes: Vec<u8>,
    },
}

/// The longest pipeline message type name.
pub const MAX_STEP_KIND: usize = 64;

/// The most bytes an identity transfer carries.
pub const MAX_IDENTITY: usize = 1024;

/// A mail's header: the seed's `ref`, `prev` and `subject`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct MailRef(pub [u8; 8]);

impl std::fmt::Display for MailRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::engine::hex(&self.0))
    }
}

impl MailRef {
    /// Reads 16 hex digits.
    pub fn parse(text: &str) -> Option<MailRef> {
        if text.len() != 16 {
            return None;
        }
        Some(MailRef(crate::engine::unhex(text)?.try_into().ok()?))
    }
}

/// What a mail carries besides its body.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MailHeader {
    /// This mail's reference.
    pub reference: MailRef,
    /// The mail it answers.
    pub prev: Option<MailRef>,
    /// Its subject.
    pub subject: String,
}

/// The most users one control message names.
pub const MAX_CONTROL_USERS: usize = 1000;

/// A group operation: what the seed calls `UP_NAME`, `UP_DESCRIPTION`, `ADD_MEMBERS`,
/// `RM_MEMBERS` and `REVOKE_KEY`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Control {
    /// Rename the group.
    Rename {
        /// The new name.
        name: String,
    },
    /// Set the group's description.
    Describe {
        /// The new description.
        description: String,
    },
    /// Add users (every device of each).
    Add {
        /// The users.
        users: Vec<crate::identity::UserId>,
        /// A note for the members.
        note: String,
    },
    /// Remove users (every device of each).
    Remove {
        /// The users.
        users: Vec<crate::identity::UserId>,
        /// A note for the members.
        note: String,
    },
    /// Start a new epoch with fresh keys.
    Revoke,
}

impl Control {
    /// One line for people, after the actor's name.
    pub fn describe(&self) -> String {
        let users = |u: &[crate::identity::UserId]| u.iter().map(|u| u.short()).collect::<Vec<_>>().join(", ");
        let note = |n: &str| if n.is_empty() { String::new() } else { format!(" ({n})") };
        match self {
            Control::Rename { name } => format!("renamed the group to {name:?}"),
            Control::Describe { description } => format!("set the description to {description:?}"),
            Control::Add { users: u, note: n } => format!("added {}{}", users(u), note(n)),
            Control::Remove { users: u, note: n } => format!("removed {}{}", users(u), note(n)),
            Control::Revoke => "revoked the group's keys".to_string(),
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PayloadError> {
        if self.bytes.len() < n {
            return Err(PayloadError::Truncated);
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, PayloadError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, PayloadError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, PayloadError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, PayloadError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn string(&mut self) -> Result<String, PayloadError> {
        let n = self.u16()?;
        String::from_utf8(self.take(n.into())?.to_vec()).map_err(|_| PayloadError::Utf8)
    }
    fn end(&self) -> Result<(), PayloadError> {
        if self.bytes.is_empty() { Ok(()) } else { Err(PayloadError::Trailing(self.bytes.len())) }
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// A record's lifetimes: four u64s.
fn put_lifetimes(out: &mut Vec<u8>, l: &Lifetimes) {
    for v in [l.message_ms, l.commit_ms, l.welcome_ms, l.key_package_ms] {
        out.extend_from_slice(&v.to_be_bytes());
    }
}

/// A record's device map: the next device id, a count, then (leaf, device) pairs.
fn put_devices(out: &mut Vec<u8>, next_device: u32, devices: &BTreeMap<u32, u32>) {
    out.extend_from_slice(&next_device.to_be_bytes());
    out.extend_from_slice(&(devices.len() as u32).to_be_bytes());
    for (leaf, device) in devices {
        out.extend_from_slice(&leaf.to_be_bytes());
        out.extend_from_slice(&device.to_be_bytes());
    }
}

fn put_user_list(out: &mut Vec<u8>, users: &[crate::identity::UserId]) {
    out.extend_from_slice(&(users.len() as u16).to_be_bytes());
    for u in users {
        out.extend_from_slice(&u.0);
    }
}

impl Message {
    /// A text message written at `created_ms`.
    pub fn text(created_ms: u64, text: impl Into<String>) -> Message {
        Message { created_ms, reply_to: None, replaces: None, text: text.into(), control: None, mail: None, identity: None, pipeline: None }
    }

    /// An identity transfer written at `created_ms`: the user's key pair, serialized.
    pub fn identity(created_ms: u64, key_pair: Vec<u8>) -> Message {
        Message { identity: Some(key_pair), ..Message::text(created_ms, "") }
    }

    /// A pipeline message written at `created_ms`.
    pub fn pipeline(created_ms: u64, pipeline: Pipeline) -> Message {
        Message { pipeline: Some(pipeline), ..Message::text(created_ms, "") }
    }

    /// A control message written at `created_ms`.
    pub fn control(created_ms: u64, control: Control) -> Message {
        Message { control: Some(control), ..Message::text(created_ms, "") }
    }

    /// A mail written at `created_ms`.
    pub fn mail(created_ms: u64, header: MailHeader, body: impl Into<String>) -> Message {
        Message { mail: Some(header), ..Message::text(created_ms, body) }
    }

    /// Encodes the message; fails if the text is over [`MAX_TEXT`], or a control message's
    /// fields are over theirs.
    pub fn encode(&self) -> Result<Vec<u8>, PayloadError> {
        if let Some(p) = &self.pipeline {
            let mut out = vec![1, 5];
            out.extend_from_slice(&self.created_ms.to_be_bytes());
            match p {
                Pipeline::Create { model, size, params } => {
                    if params.len() > MAX_TEXT {
                        return Err(PayloadError::TooLong(params.len()));
                    }
                    if *size as usize > MAX_MODEL {
                        return Err(PayloadError::TooLong(*size as usize));
                    }
                    out.push(1);
                    out.extend_from_slice(model);
                    out.extend_from_slice(&size.to_be_bytes());
                    out.extend_from_slice(params.as_bytes());
                }
                Pipeline::Step { kind, body, prior } => {
                    if kind.is_empty() || kind.len() > MAX_STEP_KIND {
                        return Err(PayloadError::TooLong(kind.len()));
                    }
                    if body.len() > MAX_TEXT {
                        return Err(PayloadError::TooLong(body.len()));
                    }
                    out.push(2);
                    out.push(u8::from(prior.is_some()));
                    if let Some(h) = prior {
                        out.extend_from_slice(h);
                    }
                    put_string(&mut out, kind);
                    out.extend_from_slice(body.as_bytes());
                }
                Pipeline::ModelPart { model, index, bytes } => {
                    if bytes.len() > MAX_MODEL_PART {
                        return Err(PayloadError::TooLong(bytes.len()));
                    }
                    out.push(3);
                    out.extend_from_slice(model);
                    out.extend_from_slice(&index.to_be_bytes());
                    out.extend_from_slice(bytes);
                }
            }
            return Ok(out);
        }
        if let Some(identity) = &self.identity {
            if identity.len() > MAX_IDENTITY {
                return Err(PayloadError::TooLong(identity.len()));
            }
            let mut out = vec![1, 4];
            out.extend_from_slice(&self.created_ms.to_be_bytes());
            out.extend_from_slice(identity);
            return Ok(out);
        }
        if let Some(mail) = &self.mail {
            if mail.subject.len() > MAX_LABEL_TEXT {
                return Err(PayloadError::TooLong(mail.subject.len()));
            }
            if self.text.len() > MAX_TEXT {
                return Err(PayloadError::TooLong(self.text.len()));
            }
            let mut out = vec![1, 3];
            out.extend_from_slice(&self.created_ms.to_be_bytes());
            out.extend_from_slice(&mail.reference.0);
            out.push(u8::from(mail.prev.is_some()));
            if let Some(prev) = mail.prev {
                out.extend_from_slice(&prev.0);
            }
            put_string(&mut out, &mail.subject);
            out.extend_from_slice(self.text.as_bytes());
            return Ok(out);
        }
        if let Some(control) = &self.control {
            let mut out = vec![1, 2];
            out.extend_from_slice(&self.created_ms.to_be_bytes());
            let long = |s: &str| if s.len() > MAX_LABEL_TEXT { Err(PayloadError::TooLong(s.len())) } else { Ok(()) };
            match control {
                Control::Rename { name } => {
                    long(name)?;
                    out.push(1);
                    put_string(&mut out, name);
                }
                Control::Describe { description } => {
                    long(description)?;
                    out.push(2);
                    put_string(&mut out, description);
                }
                Control::Add { users, note } | Control::Remove { users, note } => {
                    long(note)?;
                    if users.len() > MAX_CONTROL_USERS {
                        return Err(PayloadError::TooLong(users.len()));
                    }
                    out.push(if matches!(control, Control::Add { .. }) { 3 } else { 4 });
                    put_user_list(&mut out, users);
                    put_string(&mut out, note);
                }
                Control::Revoke => out.push(5),
            }
            return Ok(out);
        }
        if self.text.len() > MAX_TEXT {
            return Err(PayloadError::TooLong(self.text.len()));
        }
        let mut out = Vec::with_capacity(27 + self.text.len());
        out.extend_from_slice(&[1, 1]);
        out.extend_from_slice(&self.created_ms.to_be_bytes());
        out.push(u8::from(self.reply_to.is_some()) | (u8::from(self.replaces.is_some()) << 1));
        for r in [self.reply_to, self.replaces].into_iter().flatten() {
            out.extend_from_slice(&r.device.to_be_bytes());
            out.extend_from_slice(&r.msg.to_be_bytes());
        }
        out.extend_from_slice(self.text.as_bytes());
        Ok(out)
    }

    /// Decodes a message. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Message, PayloadError> {
        let mut r = Reader { bytes };
        let (version, kind) = (r.u8()?, r.u8()?);
        if (version, kind) == (1, 5) {
            let created_ms = r.u64()?;
            let op = r.u8()?;
            let pipeline = match op {
                1 => {
                    let model: [u8; 32] = r.take(32)?.try_into().expect("32 bytes");
                    let size = r.u32()?;
                    if size as usize > MAX_MODEL {
                        return Err(PayloadError::TooLong(size as usize));
                    }
                    if r.bytes.len() > MAX_TEXT {
                        return Err(PayloadError::TooLong(r.bytes.len()));
                    }
                    Pipeline::Create { model, size, params: String::from_utf8(r.bytes.to_vec()).map_err(|_| PayloadError::Utf8)? }
                }
                2 => {
                    let prior = match r.u8()? {
                        0 => None,
                        1 => Some(r.take(32)?.try_into().expect("32 bytes")),
                        _ => return Err(PayloadError::Unsupported { version, kind: op }),
                    };
                    let kind = r.string()?;
                    if kind.is_empty() || kind.len() > MAX_STEP_KIND {
                        return Err(PayloadError::TooLong(kind.len()));
                    }
                    if r.bytes.len() > MAX_TEXT {
                        return Err(PayloadError::TooLong(r.bytes.len()));
                    }
                    Pipeline::Step { kind, body: String::from_utf8(r.bytes.to_vec()).map_err(|_| PayloadError::Utf8)?, prior }
                }
                3 => {
                    let model: [u8; 32] = r.take(32)?.try_into().expect("32 bytes");
                    let index = r.u32()?;
                    if r.bytes.len() > MAX_MODEL_PART {
                        return Err(PayloadError::TooLong(r.bytes.len()));
                    }
                    Pipeline::ModelPart { model, index, bytes: r.bytes.to_vec() }
                }
                _ => return Err(PayloadError::Unsupported { version, kind: op }),
            };
            return Ok(Message::pipeline(created_ms, pipeline));
        }
        if (version, kind) == (1, 4) {
            let created_ms = r.u64()?;
            if r.bytes.len() > MAX_IDENTITY {
                return Err(PayloadError::TooLong(r.bytes.len()));
            }
            return Ok(Message::identity(created_ms, r.bytes.to_vec()));
        }
        if (version, kind) == (1, 3) {
            let created_ms = r.u64()?;
            let reference = MailRef(r.take(8)?.try_into().expect("8 bytes"));
            let flags = r.u8()?;
            let prev = if flags & 1 != 0 { Some(MailRef(r.take(8)?.try_into().expect("8 bytes"))) } else { None };
            let subject = r.string()?;
            if subject.len() > MAX_LABEL_TEXT {
                return Err(PayloadError::TooLong(subject.len()));
            }
            if r.bytes.len() > MAX_TEXT {
                return Err(PayloadError::TooLong(r.bytes.len()));
            }
            let body = String::from_utf8(r.bytes.to_vec()).map_err(|_| PayloadError::Utf8)?;
            return Ok(Message::mail(created_ms, MailHeader { reference, prev, subject }, body));
        }
        if (version, kind) == (1, 2) {
            let created_ms = r.u64()?;
            let op = r.u8()?;
            let text = |r: &mut Reader| -> Result<String, PayloadError> {
                let s = r.string()?;
                if s.len() > MAX_LABEL_TEXT { Err(PayloadError::TooLong(s.len())) } else { Ok(s) }
            };
            let control = match op {
                1 => Control::Rename { name: text(&mut r)? },
                2 => Control::Describe { description: text(&mut r)? },
                3 | 4 => {
                    let n = usize::from(r.u16()?);
                    if n > MAX_CONTROL_USERS {
                        return Err(PayloadError::TooLong(n));
                    }
                    let mut users = Vec::with_capacity(n);
                    for _ in 0..n {
                        users.push(crate::identity::UserId(r.take(16)?.try_into().expect("16 bytes")));
                    }
                    let note = text(&mut r)?;
                    if op == 3 { Control::Add { users, note } } else { Control::Remove { users, note } }
                }
                5 => Control::Revoke,
                _ => return Err(PayloadError::Unsupported { version, kind: op }),
            };
            r.end()?;
            return Ok(Message::control(created_ms, control));
        }
        if (version, kind) != (1, 1) {
            return Err(PayloadError::Unsupported { version, kind });
        }
        let created_ms = r.u64()?;
        let flags = r.u8()?;
        let mut refs = [None, None];
        for (bit, slot) in refs.iter_mut().enumerate() {
            if flags & (1 << bit) != 0 {
                *slot = Some(MsgRef { device: r.u32()?, msg: r.u32()? });
            }
        }
        if r.bytes.len() > MAX_TEXT {
            return Err(PayloadError::TooLong(r.bytes.len()));
        }
        let text = String::from_utf8(r.bytes.to_vec()).map_err(|_| PayloadError::Utf8)?;
        Ok(Message { reply_to: refs[0], replaces: refs[1], ..Message::text(created_ms, text) })
    }
}

/// Lifetimes of what a team publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lifetimes {
    /// Messages, ms.
    pub message_ms: u64,
    /// Commits, ms.
    pub commit_ms: u64,
    /// Welcomes, ms.
    pub welcome_ms: u64,
    /// Key packages, ms.
    pub key_package_ms: u64,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Lifetimes {
            message_ms: DEFAULT_MESSAGE_TTL_MS,
            commit_ms: DEFAULT_MESSAGE_TTL_MS,
            welcome_ms: DEFAULT_JOIN_TTL_MS,
            key_package_ms: DEFAULT_JOIN_TTL_MS,
        }
    }
}

/// What every member of a team knows about it, carried in the group context.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TeamRecord {
    /// The org.
    pub org: u32,
    /// The team.
    pub team: u32,
    /// The team's name.
    pub name: String,
    /// Lifetimes of what the team publishes.
    pub lifetimes: Lifetimes,
    /// Channel id → name.
    pub channels: BTreeMap<u16, String>,
    /// The device id the next added device gets: ids are never reused within a team.
    pub next_device: u32,
    /// MLS leaf index → device id, for every current member.
    pub devices: BTreeMap<u32, u32>,
}

impl TeamRecord {
    /// Encodes the record.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![1];
        out.extend_from_slice(&self.org.to_be_bytes());
        out.extend_from_slice(&self.team.to_be_bytes());
        put_string(&mut out, &self.name);
        put_lifetimes(&mut out, &self.lifetimes);
        out.extend_from_slice(&(self.channels.len() as u16).to_be_bytes());
        for (id, name) in &self.channels {
            out.extend_from_slice(&id.to_be_bytes());
            put_string(&mut out, name);
        }
        put_devices(&mut out, self.next_device, &self.devices);
        out
    }

    /// Decodes a record. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<TeamRecord, PayloadError> {
        let mut r = Reader { bytes };
        let version = r.u8()?;
        if version != 1 {
            return Err(PayloadError::Unsupported { version, kind: 0 });
        }
        let org = r.u32()?;
        let team = r.u32()?;
        let name = r.string()?;
        let lifetimes = r.lifetimes()?;
        let mut channels = BTreeMap::new();
        for _ in 0..r.u16()? {
            let id = r.u16()?;
            channels.insert(id, r.string()?);
        }
        let (next_device, devices) = r.devices()?;
        r.end()?;
        Ok(TeamRecord { org, team, name, lifetimes, channels, next_device, devices })
    }

    /// The device id of a leaf.
    pub fn device_of(&self, leaf: u32) -> Option<u32> {
        self.devices.get(&leaf).copied()
    }

    /// A channel's id, by id text or name.
    pub fn channel(&self, which: &str) -> Option<u16> {
        if !which.is_empty() && which.bytes().all(|b| b.is_ascii_digit()) {
            let id: u16 = which.parse().ok()?;
            return self.channels.contains_key(&id).then_some(id);
        }
        self.channels.iter().find(|(_, n)| n.as_str() == which).map(|(id, _)| *id)
    }
}

/// What kind of conversation a [`ConvRecord`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ConvKind {
    /// The one conversation of a pair of users.
    Dm = 1,
    /// An ad hoc group with admins.
    Group = 2,
    /// The mailbox conversation of a set of users: every mail among exactly them.
    Mail = 3,
    /// The devices of one user: how a new device is given the user's identity.
    Link = 4,
}

/// What every member of a conversation knows about it, carried in the group context.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConvRecord {
    /// Direct message or group.
    pub kind: ConvKind,
    /// Where its names are.
    pub conv: crate::names::ConvId,
    /// Its name (empty for a direct message).
    pub name: String,
    /// Its description.
    pub description: String,
    /// Lifetimes of what it publishes.
    pub lifetimes: Lifetimes,
    /// The user who created it.
    pub creator: crate::identity::UserId,
    /// Its member users.
    pub users: std::collections::BTreeSet<crate::identity::UserId>,
    /// The users who may change membership and metadata.
    pub admins: std::collections::BTreeSet<crate::identity::UserId>,
    /// The device id the next added device gets.
    pub next_device: u32,
    /// MLS leaf index → device id, for every current member device.
    pub devices: BTreeMap<u32, u32>,
}

fn put_users(out: &mut Vec<u8>, users: &std::collections::BTreeSet<crate::identity::UserId>) {
    out.extend_from_slice(&(users.len() as u16).to_be_bytes());
    for u in users {
        out.extend_from_slice(&u.0);
    }
}

impl Reader<'_> {
    fn lifetimes(&mut self) -> Result<Lifetimes, PayloadError> {
        Ok(Lifetimes { message_ms: self.u64()?, commit_ms: self.u64()?, welcome_ms: self.u64()?, key_package_ms: self.u64()? })
    }

    /// What [`put_devices`] wrote. The count is not trusted for an allocation: each pair is
    /// read (and a short record fails) before it is kept.
    fn devices(&mut self) -> Result<(u32, BTreeMap<u32, u32>), PayloadError> {
        let next_device = self.u32()?;
        let mut devices = BTreeMap::new();
        for _ in 0..self.u32()? {
            let leaf = self.u32()?;
            devices.insert(leaf, self.u32()?);
        }
        Ok((next_device, devices))
    }

    fn users(&mut self) -> Result<std::collections::BTreeSet<crate::identity::UserId>, PayloadError> {
        let n = usize::from(self.u16()?);
        if n > MAX_CONV_USERS {
            return Err(PayloadError::TooLong(n));
        }
        let mut out = std::collections::BTreeSet::new();
        for _ in 0..n {
            out.insert(crate::identity::UserId(self.take(16)?.try_into().expect("16 bytes")));
        }
        Ok(out)
    }
}

impl ConvRecord {
    /// Encodes the record.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![1, self.kind as u8];
        out.extend_from_slice(&self.conv.origin.to_be_bytes());
        out.extend_from_slice(&self.conv.conv.to_be_bytes());
        put_string(&mut out, &self.name);
        put_string(&mut out, &self.description);
        put_lifetimes(&mut out, &self.lifetimes);
        out.extend_from_slice(&self.creator.0);
        put_users(&mut out, &self.users);
        put_users(&mut out, &self.admins);
        put_devices(&mut out, self.next_device, &self.devices);
        out
    }

    /// Decodes a record. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<ConvRecord, PayloadError> {
        let mut r = Reader { bytes };
        let (version, kind) = (r.u8()?, r.u8()?);
        let kind = match (version, kind) {
            (1, 1) => ConvKind::Dm,
            (1, 2) => ConvKind::Group,
            (1, 3) => ConvKind::Mail,
            (1, 4) => ConvKind::Link,
            _ => return Err(PayloadError::Unsupported { version, kind }),
        };
        let origin = r.u32()?;
        let conv = r.u64()?;
        if origin > 0xff_ffff || conv > crate::names::MAX_CONV {
            return Err(PayloadError::Unsupported { version, kind: kind as u8 });
        }
        let name = r.string()?;
        let description = r.string()?;
        let lifetimes = r.lifetimes()?;
        let creator = crate::identity::UserId(r.take(16)?.try_into().expect("16 bytes"));
        let users = r.users()?;
        let admins = r.users()?;
        let (next_device, devices) = r.devices()?;
        r.end()?;
        Ok(ConvRecord {
            kind,
            conv: crate::names::ConvId { origin, conv },
            name,
            description,
            lifetimes,
            creator,
            users,
            admins,
            next_device,
            devices,
        })
    }
}

/// Whether `name` may name a team or channel: not empty, not all digits, no `/`, at most
/// 64 bytes, no control characters.
pub fn valid_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.bytes().all(|b| b.is_ascii_digit())
        && !name.contains('/')
        && !name.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let m = Message {
            created_ms: 1_700_000_000_123,
            reply_to: Some(MsgRef { device: 3, msg: 9 }),
            replaces: None,
            text: "héllo".into(),
            control: None,
            mail: None,
            identity: None,
            pipeline: None,
        };
        assert_eq!(Message::decode(&m.encode().unwrap()).unwrap(), m);
        let long = Message { text: "x".repeat(MAX_TEXT + 1), ..m.clone() };
        assert_eq!(long.encode(), Err(PayloadError::TooLong(MAX_TEXT + 1)));
        assert_eq!(Message::decode(&[1]), Err(PayloadError::Truncated));
        assert!(matches!(Message::decode(&[2, 1]), Err(PayloadError::Unsupported { .. })));
    }

    #[test]
    fn control_messages_round_trip_and_refuse_what_is_too_long() {
        use crate::identity::UserId;
        for control in [
            Control::Rename { name: "friends".into() },
            Control::Describe { description: "weekend plans".into() },
            Control::Add { users: vec![UserId([1; 16]), UserId([2; 16])], note: "welcome".into() },
            Control::Remove { users: vec![UserId([3; 16])], note: String::new() },
            Control::Revoke,
        ] {
            let m = Message::control(42, control);
            let bytes = m.encode().unwrap();
            assert_eq!(Message::decode(&bytes).unwrap(), m);
            for cut in 0..bytes.len() {
                assert!(Message::decode(&bytes[..cut]).is_err(), "{m:?} cut at {cut}");
            }
        }
        let long = Message::control(1, Control::Rename { name: "x".repeat(MAX_LABEL_TEXT + 1) });
        assert_eq!(long.encode(), Err(PayloadError::TooLong(MAX_LABEL_TEXT + 1)));
        let many = Message::control(1, Control::Add { users: vec![UserId([0; 16]); MAX_CONTROL_USERS + 1], note: String::new() });
        assert!(many.encode().is_err());
        assert!(matches!(Message::decode(&[1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 9]), Err(PayloadError::Unsupported { .. })));
    }

    #[test]
    fn pipeline_messages_round_trip_and_refuse_what_is_malformed_or_too_long() {
        for p in [
            Pipeline::Create { model: [7; 32], size: 190_000, params: r#"{"question":"?"}"#.into() },
            Pipeline::Step { kind: "vote".into(), body: r#"{"option":1}"#.into(), prior: Some([3; 32]) },
            Pipeline::Step { kind: "close".into(), body: String::new(), prior: None },
            Pipeline::ModelPart { model: [7; 32], index: 3, bytes: vec![0, 1, 2, 255] },
            Pipeline::ModelPart { model: [7; 32], index: 0, bytes: vec![9; MAX_MODEL_PART] },
        ] {
            let m = Message::pipeline(42, p);
            let bytes = m.encode().unwrap();
            assert_eq!(Message::decode(&bytes).unwrap(), m);
        }
        let too_long = [
            Pipeline::Create { model: [0; 32], size: MAX_MODEL as u32 + 1, params: String::new() },
            Pipeline::Create { model: [0; 32], size: 1, params: "p".repeat(MAX_TEXT + 1) },
            Pipeline::Step { kind: "k".repeat(MAX_STEP_KIND + 1), body: String::new(), prior: None },
            Pipeline::Step { kind: String::new(), body: String::new(), prior: None },
            Pipeline::Step { kind: "k".into(), body: "b".repeat(MAX_TEXT + 1), prior: None },
            Pipeline::ModelPart { model: [0; 32], index: 0, bytes: vec![0; MAX_MODEL_PART + 1] },
        ];
        for p in too_long {
            assert!(Message::pipeline(1, p.clone()).encode().is_err(), "{p:?}");
        }
        // Hand-made bytes the encoder would not write are refused by the decoder.
        let head = |op: u8| [vec![1, 5], 42u64.to_be_bytes().to_vec(), vec![op]].concat();
        assert!(matches!(Message::decode(&head(9)), Err(PayloadError::Unsupported { .. })));
        assert_eq!(Message::decode(&[head(1), vec![0; 10]].concat()), Err(PayloadError::Truncated));
        assert!(Message::decode(&[head(1), vec![0; 32], u32::MAX.to_be_bytes().to_vec()].concat()).is_err(), "a model over 16 MiB");
        assert!(Message::decode(&[head(2), vec![0, 0, 0]].concat()).is_err(), "an empty step kind");
        assert!(Message::decode(&[head(2), vec![0, 0, 1, b'k', 0xff]].concat()).is_err(), "a body that is not UTF-8");
        assert!(Message::decode(&[head(2), vec![2, 0, 1, b'k']].concat()).is_err(), "a prior flag that is not 0 or 1");
        assert!(Message::decode(&[head(3), vec![0; 36], vec![0; MAX_MODEL_PART + 1]].concat()).is_err());
        for cut in 0..11 {
            assert!(Message::decode(&head(3)[..cut.min(11)]).is_err());
        }
    }

    #[test]
    fn mails_round_trip_and_refuse_what_is_too_long() {
        let header = MailHeader { reference: MailRef([1; 8]), prev: Some(MailRef([2; 8])), subject: "lunch?".into() };
        let m = Message::mail(7, header.clone(), "at noon");
        let bytes = m.encode().unwrap();
        assert_eq!(Message::decode(&bytes).unwrap(), m);
        for cut in 0..19 {
            assert!(Message::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let first = Message::mail(7, MailHeader { prev: None, ..header.clone() }, "");
        assert_eq!(Message::decode(&first.encode().unwrap()).unwrap(), first);
        let long = Message::mail(7, MailHeader { subject: "s".repeat(MAX_LABEL_TEXT + 1), ..header.clone() }, "");
        assert!(long.encode().is_err());
        assert!(Message::mail(7, header, "b".repeat(MAX_TEXT + 1)).encode().is_err());
        assert_eq!(MailRef::parse(&MailRef([0xab; 8]).to_string()), Some(MailRef([0xab; 8])));
        assert_eq!(MailRef::parse("xyz"), None);
    }

    #[test]
    fn team_records_round_trip() {
        let rec = TeamRecord {
            org: 7,
            team: 5,
            name: "ops".into(),
            lifetimes: Lifetimes::default(),
            channels: [(1, "team".to_string()), (2, "general".to_string())].into(),
            next_device: 3,
            devices: [(0, 0), (1, 1), (2, 2)].into(),
        };
        let bytes = rec.encode();
        assert_eq!(TeamRecord::decode(&bytes).unwrap(), rec);
        for cut in 0..bytes.len() {
            assert!(TeamRecord::decode(&bytes[..cut]).is_err());
        }
        assert_eq!(rec.channel("general"), Some(2));
        assert_eq!(rec.channel("2"), Some(2));
        assert_eq!(rec.channel("9"), None);
    }

    #[test]
    fn conv_records_round_trip() {
        use crate::identity::UserId;
        let rec = ConvRecord {
            kind: ConvKind::Group,
            conv: crate::names::ConvId { origin: 0xabcdef, conv: 0x1234_5678_9abc },
            name: "friends".into(),
            description: "weekend plans".into(),
            lifetimes: Lifetimes::default(),
            creator: UserId([1; 16]),
            users: [UserId([1; 16]), UserId([2; 16])].into(),
            admins: [UserId([1; 16])].into(),
            next_device: 3,
            devices: [(0, 0), (1, 1), (2, 2)].into(),
        };
        let bytes = rec.encode();
        assert_eq!(ConvRecord::decode(&bytes).unwrap(), rec);
        for cut in 0..bytes.len() {
            assert!(ConvRecord::decode(&bytes[..cut]).is_err());
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(ConvRecord::decode(&trailing), Err(PayloadError::Trailing(1)));
    }

    #[test]
    fn labels() {
        assert!(valid_label("general"));
        assert!(!valid_label("42"));
        assert!(!valid_label("a/b"));
        assert!(!valid_label(""));
    }
}
