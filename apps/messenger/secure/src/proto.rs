//! What the UI and Secure say to each other over `HOME/secure.sock`: one JSON object per
//! frame, each frame a 4-byte big-endian length and then the bytes, at most [`MAX_FRAME`].
//!
//! A connection carries requests and their replies in turn; a `follow` request turns it into
//! a stream of message replies until the UI hangs up.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The largest frame either side sends or accepts.
pub const MAX_FRAME: usize = 4 << 20;

/// How many bytes of messages one `read` reply carries at most, well under [`MAX_FRAME`]:
/// a long history comes in pages.
pub const READ_BUDGET: usize = 3 << 20;

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, value: &impl Serialize) -> io::Result<()> {
    let bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
    if bytes.len() > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a frame of {} bytes is over the {MAX_FRAME}-byte limit", bytes.len())));
    }
    w.write_all(&(bytes.len() as u32).to_be_bytes())?;
    w.write_all(&bytes)?;
    w.flush()
}

/// Reads one frame; `None` at a clean end of stream.
pub fn read_frame<T: DeserializeOwned>(r: &mut impl Read) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a frame of {len} bytes is over the {MAX_FRAME}-byte limit")));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    serde_json::from_slice(&buf).map(Some).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Bytes as base64 in the JSON frames (a model is megabytes: as a list of numbers it would
/// not fit a frame).
mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// [`b64`] for an optional value.
mod b64_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => super::b64::serialize(b, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        use base64::Engine as _;
        Option::<String>::deserialize(d)?.map(|t| base64::engine::general_purpose::STANDARD.decode(t).map_err(serde::de::Error::custom)).transpose()
    }
}

/// A request from the UI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Is Secure up? Answered with [`Reply::Pong`].
    Ping,
    /// What Secure knows: teams, epochs, gaps, counters.
    Status,
    /// A fresh single-use key package; answered with its hKP.
    KeyPackage {
        /// Ask to become a new device of another user (`device link HKP` on theirs).
        #[serde(default)]
        link: bool,
    },
    /// `device link HKP`: make the device of that key package a device of this user.
    DeviceLink {
        /// The hKP, hex.
        hkp: String,
    },
    /// The teams this device is in.
    Teams,
    /// A team's channels.
    Channels {
        /// Team id or name.
        team: String,
    },
    /// Send a text.
    Send {
        /// Where: `TEAM/CHANNEL` or `dm:USER`.
        to: String,
        /// The text.
        text: String,
        /// The message id it answers (`T/C/D/M`, as `read` prints it).
        reply_to: Option<String>,
    },
    /// Replace the text of one of this device's messages.
    Edit {
        /// The message id, `T/C/D/M`.
        id: String,
        /// The new text.
        text: String,
    },
    /// A conversation's messages, as shown: the newest that fit in one frame
    /// ([`READ_BUDGET`] bytes), and whether older ones exist ([`Reply::Messages::more`]).
    Read {
        /// `TEAM/CHANNEL` or `dm:USER`.
        conversation: String,
        /// Only messages older than this one (an id, as `read` prints it): the next page back.
        #[serde(default)]
        before: Option<String>,
    },
    /// Every new or edited message of a conversation from now on, as [`Reply::Message`]s.
    Follow {
        /// `TEAM/CHANNEL` or `dm:USER`.
        conversation: String,
    },
    /// Every new or edited message of every conversation from now on, as
    /// [`Reply::Message`]s: what a UI that shows a chat list follows.
    Watch,
    /// This device's user and keys; answered with [`Reply::Whoami`].
    Whoami,
    /// A team's members: device ids and users.
    Members {
        /// Team id or name.
        team: String,
    },
    /// Every contact and blocked user.
    Contacts,
    /// Name a user (`contact add`, `contact rename`).
    ContactName {
        /// A user id, or the contact's current name.
        user: String,
        /// The new name.
        name: String,
    },
    /// Forget a contact's name (a block stays).
    ContactRemove {
        /// A user id or contact name.
        user: String,
    },
    /// Block or unblock a user.
    Block {
        /// A user id or contact name.
        user: String,
        /// `true` to block, `false` to unblock.
        blocked: bool,
    },
    /// `group create NAME USER…`.
    GroupCreate {
        /// The group's name.
        name: String,
        /// Members besides this user: user ids or contact names.
        users: Vec<String>,
    },
    /// A group operation by an admin.
    GroupOp {
        /// The group's id or name.
        group: String,
        /// The operation.
        operation: GroupOp,
        /// Send it even if this device thinks its user is no admin: the members decide.
        #[serde(default)]
        force: bool,
    },
    /// A group's record and members.
    GroupInfo {
        /// The group's id or name.
        group: String,
    },
    /// Every group this device is in.
    Groups,
    /// `mail send`: one mail to several recipients.
    MailSend {
        /// The recipients: user ids or contact names.
        to: Vec<String>,
        /// The subject.
        subject: String,
        /// The body.
        body: String,
        /// The reference of the mail it answers.
        prev: Option<String>,
    },
    /// Every mail, newest first.
    MailList,
    /// The thread of a mail, oldest first.
    MailThread {
        /// A reference in the thread.
        reference: String,
    },
    /// Write an encrypted backup to `path`.
    Backup {
        /// Where to write it.
        path: String,
        /// The passphrase its key is derived from.
        passphrase: String,
        /// The home's settings, kept in the backup.
        settings: String,
    },
    /// The chat list.
    Chats,
    /// Star a message, or take the star away.
    Mark {
        /// The message id, as `read` prints it.
        id: String,
        /// `true` to mark, `false` to unmark.
        marked: bool,
    },
    /// Marked messages, answered with [`Reply::Messages`].
    Marked,
    /// Leave a group on this device (its history stays): how a stalled group recovers.
    GroupLeave {
        /// The group's id or name.
        group: String,
    },
    /// `pipeline create`: a group bound to a model (`docs/pipelines.md`).
    PipelineCreate {
        /// The pipeline's (group's) name.
        name: String,
        /// Members besides this user: user ids or contact names.
        users: Vec<String>,
        /// The model's bytes (a `canopy:model` component), sent to every member.
        #[serde(with = "b64")]
        model: Vec<u8>,
        /// The parameters its `init` takes (JSON).
        params: String,
    },
    /// The pipelines this device is in, answered with [`Reply::Pipelines`].
    Pipelines,
    /// What this device holds of a pipeline, for the UI to run its model on.
    PipelineLog {
        /// `pipeline:ID`, or the group's id or name.
        pipeline: String,
    },
    /// Send a step (what a model's `act` built).
    PipelineStep {
        /// `pipeline:ID`, or the group's id or name.
        pipeline: String,
        /// The message type.
        kind: String,
        /// The body.
        body: String,
        /// This device's state hash before the step (hex), for members to compare.
        prior: Option<String>,
    },
    /// Seal the UI's state of a pipeline.
    PipelineSave {
        /// `pipeline:ID`, or the group's id or name.
        pipeline: String,
        /// Steps applied.
        count: usize,
        /// The digest of their ids (hex).
        digest: String,
        /// The state.
        #[serde(with = "b64")]
        state: Vec<u8>,
    },
    /// `btc key new|import|show`: a Bitcoin key for pipelines, kept in Secure.
    BtcKey {
        /// The key's name (the multisig model signs with `btc`).
        name: String,
        /// What to do.
        action: BtcKeyAction,
        /// The network its address is shown for (default regtest).
        network: Option<String>,
    },
    /// A model's `sign(key, kind, payload)`: without `approved`, Secure answers with what
    /// signing means ([`Reply::Approve`]); with the digest the user approved, it signs.
    Sign {
        /// The key's name.
        key: String,
        /// What the payload is: `psbt`.
        kind: String,
        /// The payload.
        #[serde(with = "b64")]
        payload: Vec<u8>,
        /// The digest of the review the user approved.
        approved: Option<String>,
        /// The network addresses are shown for (default regtest).
        network: Option<String>,
    },
    /// Try to open an `AF_INET` socket from inside Secure and report what happened.
    SandboxCheck,
    /// Stop Secure.
    Stop,
}

/// What `btc key` does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum BtcKeyAction {
    /// Make a fresh key (refused if the name is taken).
    New,
    /// Import a WIF key (refused if the name is taken).
    Import {
        /// The key, WIF.
        wif: String,
    },
    /// Show the public key and address.
    Show,
}

/// A Bitcoin key, as shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BtcKeyLine {
    /// Its name.
    pub name: String,
    /// Its public key (hex, compressed): what a descriptor names.
    pub public_key: String,
    /// Its P2WPKH address on `network`.
    pub address: String,
    /// The network.
    pub network: String,
}

/// A group operation, as the UI asks for it (users by id or contact name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum GroupOp {
    /// Rename.
    Rename {
        /// The new name.
        name: String,
    },
    /// Set the description.
    Describe {
        /// The new description.
        description: String,
    },
    /// Add users.
    Add {
        /// User ids or contact names.
        users: Vec<String>,
        /// A note for the members.
        note: String,
    },
    /// Remove users.
    Remove {
        /// User ids or contact names.
        users: Vec<String>,
        /// A note for the members.
        note: String,
    },
    /// New keys: a new epoch.
    Revoke,
}

/// A pipeline, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineLine {
    /// Its group's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// The model's id (hex SHA-256 of its bytes).
    pub model: String,
    /// Its creator.
    pub creator: String,
    /// Steps so far.
    pub steps: usize,
    /// Whether every part of the model has arrived (and hashes right).
    pub model_complete: bool,
    /// Set when every part has arrived but they are not the model the creation message
    /// names: nothing of this pipeline is applied. Says what was found.
    #[serde(default)]
    pub model_mismatch: Option<String>,
}

/// One step of a pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepLine {
    /// Its message id.
    pub id: String,
    /// Its sender's user id.
    pub user: Option<String>,
    /// When its sender wrote it, unix ms.
    pub time_ms: u64,
    /// The message type.
    pub kind: String,
    /// The body.
    pub body: String,
    /// The sender's state hash before it (hex).
    pub prior: Option<String>,
}

/// The UI's sealed state of a pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    /// Steps applied.
    pub count: usize,
    /// The digest of their ids (hex).
    pub digest: String,
    /// The state.
    #[serde(with = "b64")]
    pub state: Vec<u8>,
}

/// What a device holds of a pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineLog {
    /// Its group's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its creator.
    pub creator: String,
    /// Its members (user ids), in id order.
    pub members: Vec<String>,
    /// This device's user.
    pub me: String,
    /// The model's id (hex).
    pub model: String,
    /// The creator's parameters.
    pub params: String,
    /// The model's bytes, once complete and checked against `model`.
    #[serde(with = "b64_opt")]
    pub bytes: Option<Vec<u8>>,
    /// Set when every part has arrived but they are not the model `model` names.
    #[serde(default)]
    pub mismatch: Option<String>,
    /// Its steps, in the order every member applies them.
    pub steps: Vec<StepLine>,
    /// The UI's sealed state, if any.
    pub saved: Option<SavedState>,
}

/// One member user of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMember {
    /// The user id.
    pub user: String,
    /// The contact name, if any.
    pub name: Option<String>,
    /// Whether the user is an admin.
    pub admin: bool,
    /// How many of the user's devices are in the group.
    pub devices: usize,
}

/// A group, as `group info` and `groups` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupLine {
    /// Its id (18 hex digits).
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// Current epoch.
    pub epoch: u64,
    /// This device's id in it.
    pub device: u32,
    /// Whether this device is its committer.
    pub committer: bool,
    /// Whether this device's user is an admin.
    pub admin: bool,
    /// Whether this device was removed from it (or left it).
    pub removed: bool,
    /// Why it is stalled, if it is: its next commit was refused. Recovery: `group leave`, and
    /// an admin removes and adds the user again.
    pub stalled: Option<String>,
    /// Its member users, in id order.
    pub members: Vec<GroupMember>,
}

/// One team, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeamLine {
    /// Team id.
    pub id: u32,
    /// Team name.
    pub name: String,
    /// Current epoch.
    pub epoch: u64,
    /// This device's id in the team.
    pub device: u32,
}

/// One channel, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelLine {
    /// Channel id.
    pub id: u16,
    /// Channel name.
    pub name: String,
}

/// One message, as shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageLine {
    /// `GROUP/CHANNEL/DEVICE/MSG`: the group is a team number, or `c` and a conversation id;
    /// `pending/N` for a direct message waiting for the peer's key packages.
    pub id: String,
    /// The conversation, as addressed: `TEAM/CHANNEL` (names) or `dm:USER` (the peer's id).
    pub conversation: String,
    /// Team id (0 outside teams).
    pub team: u32,
    /// Channel id (0 outside teams).
    pub channel: u16,
    /// Team name (empty outside teams).
    pub team_name: String,
    /// Channel name (empty outside teams).
    pub channel_name: String,
    /// Sending device.
    pub device: u32,
    /// The sending device's user id, if known (devices of part 1 had no users).
    pub user: Option<String>,
    /// Who sent it, for people: `me`, the contact name, the user id's first 8 digits, or
    /// `device N` when the user is unknown.
    pub from: String,
    /// When its sender wrote it, unix ms.
    pub sent_ms: u64,
    /// The current text, after edits.
    pub text: String,
    /// The id of the thread root it answers.
    pub reply_to: Option<String>,
    /// Whether it was edited.
    pub edited: bool,
    /// Whether it waits to be sent (no key package of the peer known yet).
    #[serde(default)]
    pub pending: bool,
    /// Whether it is a group operation; its text says what it did.
    #[serde(default)]
    pub control: bool,
    /// Whether it is marked (starred).
    #[serde(default)]
    pub marked: bool,
}

/// One mail, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailLine {
    /// Its reference (16 hex digits): what `--prev` and `mail thread` take.
    pub reference: String,
    /// The reference of the mail it answers.
    pub prev: Option<String>,
    /// The subject.
    pub subject: String,
    /// The body.
    pub body: String,
    /// Who sent it, for people (`me`, a contact name, a short id).
    pub from: String,
    /// The sender's user id.
    pub user: Option<String>,
    /// Everyone it went to besides the sender: user ids.
    pub to: Vec<String>,
    /// When it was written, unix ms.
    pub sent_ms: u64,
    /// Its message id.
    pub id: String,
}

/// One line of the chat list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatLine {
    /// How to address it: `TEAM/CHANNEL`, `dm:USER` or `group:ID`.
    pub conversation: String,
    /// `channel`, `dm`, `group`, `pipeline` (a group bound to a model) or `mail`.
    pub kind: String,
    /// Its name for people: `team/channel`, the contact's name (or short id), the group's name.
    pub name: String,
    /// Messages from others that arrived since it was last read.
    pub unread: usize,
    /// When its latest message was written, unix ms.
    pub last_ms: u64,
    /// How many messages it shows.
    pub messages: usize,
}

/// One contact, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactLine {
    /// The user id.
    pub user: String,
    /// The local name.
    pub name: Option<String>,
    /// Whether the user is blocked.
    pub blocked: bool,
    /// How many of the user's devices this device knows from their key packages.
    #[serde(default)]
    pub devices: usize,
}

/// One member of a team, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberLine {
    /// Its device id in the team.
    pub device: u32,
    /// Its user id, if its credential carries one.
    pub user: Option<String>,
    /// The user's contact name on this device.
    pub name: Option<String>,
    /// Whether it is this device.
    pub me: bool,
}

/// A team's state in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeamStatus {
    /// Team id.
    pub id: u32,
    /// Team name.
    pub name: String,
    /// Current epoch.
    pub epoch: u64,
    /// This device's id.
    pub device: u32,
    /// Commits missing before the ones held, `[first, last]`: the team cannot move on until
    /// they arrive, and if they expired the device must be re-added.
    pub gap: Option<(u64, u64)>,
    /// Why the team is stalled, if it is (its next commit was refused).
    #[serde(default)]
    pub stalled: Option<String>,
}

/// A conversation's state in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvStatus {
    /// Its id (18 hex digits).
    pub id: String,
    /// `dm` or `group`.
    pub kind: String,
    /// `dm:USER` for a direct message, else its name.
    pub name: String,
    /// Current epoch.
    pub epoch: u64,
    /// This device's id in it.
    pub device: u32,
    /// Commits missing before the ones held.
    pub gap: Option<(u64, u64)>,
    /// Why it is stalled, if it is (its next commit was refused).
    #[serde(default)]
    pub stalled: Option<String>,
}

/// What Network reports in `HOME/network.json`, rewritten five times a second. Secure reads
/// it for `status`, so a UI learns whether the relay is reachable from Secure alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkStatus {
    /// Whether the link to the parent relay is up.
    pub parent_connected: bool,
    /// Chunks waiting to be acknowledged by the parent (the durable outbox).
    pub outbox: u64,
    /// Chunks in the local cache.
    pub chunks: u64,
    /// When this was written, unix ms.
    pub written_ms: u64,
}

/// This device's key packages in its users' space, for `status` (see `canopy_msg_core::supply`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPackageSupply {
    /// One-time key packages published and not claimed.
    pub one_time: usize,
    /// One-time key packages claimed, not welcomed yet.
    pub claimed: usize,
    /// One-time key packages welcomed, whose keys are kept for the grace period.
    pub used: usize,
    /// Last-resort key packages.
    pub last_resort: usize,
}

/// What `status` reports from Secure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecureStatus {
    /// This device's user id.
    pub user: String,
    /// Teams.
    pub teams: Vec<TeamStatus>,
    /// Conversations.
    #[serde(default)]
    pub conversations: Vec<ConvStatus>,
    /// Messages waiting for a peer's key packages.
    #[serde(default)]
    pub pending: usize,
    /// Key packages published and still waiting for a welcome (hKPs).
    pub waiting: Vec<String>,
    /// Whether Secure's link to Network is up.
    pub network: bool,
    /// Network's latest report, if it is fresh (written in the last two seconds): whether
    /// the relay is reachable, and how much waits in the outbox.
    #[serde(default)]
    pub relay: Option<NetworkStatus>,
    /// Chunks handed to Network and not acknowledged yet.
    pub unacknowledged: usize,
    /// Where Secure's time comes from.
    pub time_source: String,
    /// Messages shown since start.
    pub messages: u64,
    /// Commits applied since start.
    pub commits: u64,
    /// Chunks refused since start (garbage, forgeries, bad fragments).
    pub rejected: u64,
    /// Duplicates ignored since start.
    pub duplicates: u64,
    /// Messages held for a future epoch since start.
    pub held: u64,
    /// Messages from blocked users dropped unread since start.
    pub blocked: u64,
    /// Requests for this user's key packages answered since start.
    #[serde(default)]
    pub requests: u64,
    /// This device's key packages in its users' space.
    #[serde(default)]
    pub key_packages: KeyPackageSupply,
    /// `device link`: hKPs whose key packages are awaited.
    #[serde(default)]
    pub linking: Vec<String>,
    /// `device link`: hKPs linked since start.
    #[serde(default)]
    pub linked: Vec<String>,
    /// Whether the seccomp sandbox is on.
    pub sandboxed: bool,
}

/// A reply from Secure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    /// The request failed; `message` is one line for the user.
    Error {
        /// What went wrong.
        message: String,
    },
    /// Secure is up.
    Pong,
    /// Status.
    Status(SecureStatus),
    /// A key package was published.
    KeyPackage {
        /// Its hKP, lowercase hex.
        hkp: String,
    },
    /// Teams.
    Teams {
        /// One per team.
        teams: Vec<TeamLine>,
    },
    /// Channels.
    Channels {
        /// One per channel.
        channels: Vec<ChannelLine>,
    },
    /// A message was sent (or edited).
    Sent {
        /// Its id.
        id: String,
        /// Whether it only reached the local cache so far (the relay is unreachable).
        queued: bool,
    },
    /// A conversation's messages.
    Messages {
        /// In display order.
        messages: Vec<MessageLine>,
        /// Whether older messages exist than the first one here (ask again with `before`).
        #[serde(default)]
        more: bool,
    },
    /// One new or edited message (while following).
    Message(MessageLine),
    /// Who this device is.
    Whoami {
        /// The user id: the first 16 bytes of the SHA-256 of the user key, hex.
        user: String,
        /// The user's Ed25519 public key, hex.
        user_key: String,
        /// This device's MLS signature public key, hex.
        device_key: String,
    },
    /// A team's members.
    Members {
        /// In device order.
        members: Vec<MemberLine>,
    },
    /// Contacts.
    Contacts {
        /// In user id order.
        contacts: Vec<ContactLine>,
    },
    /// One contact, as it is after the change.
    Contact(ContactLine),
    /// A group, as it is now (after a change this device committed), or as it will be once
    /// the committer carries out what was asked (`requested`).
    Group {
        /// The group.
        group: GroupLine,
        /// Whether the operation was sent to the group's committer rather than done here.
        requested: bool,
    },
    /// Groups.
    Groups {
        /// One per group.
        groups: Vec<GroupLine>,
    },
    /// A mail was sent.
    Mailed {
        /// Its reference.
        reference: String,
        /// Whether it only reached the local cache so far.
        queued: bool,
    },
    /// Mails.
    Mails {
        /// In the order asked for.
        mails: Vec<MailLine>,
    },
    /// A backup was written.
    BackedUp {
        /// Groups in it.
        groups: usize,
        /// Messages in it.
        messages: usize,
        /// Its size.
        bytes: usize,
    },
    /// The chat list, most recent activity first.
    Chats {
        /// One per chat.
        chats: Vec<ChatLine>,
    },
    /// Pipelines.
    Pipelines {
        /// One per pipeline.
        pipelines: Vec<PipelineLine>,
    },
    /// A pipeline's log.
    Pipeline(Box<PipelineLog>),
    /// A Bitcoin key.
    BtcKey(BtcKeyLine),
    /// What signing means: the user approves this, then asks again with the digest.
    Approve {
        /// What is spent, paid and left as fee, one line each.
        summary: Vec<String>,
        /// The digest an approval names.
        digest: String,
    },
    /// The signed payload.
    Signed {
        /// The payload, signed.
        #[serde(with = "b64")]
        payload: Vec<u8>,
    },
    /// The sandbox check.
    Sandbox {
        /// The errno of `socket(AF_INET, …)`, or 0 if it succeeded.
        errno: i32,
        /// Its text.
        error: String,
    },
    /// Secure is stopping.
    Stopping,
}
