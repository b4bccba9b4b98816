//! Where every messenger object lives in the 128-bit name space.
//!
//! The layout is the qmsg one, [`canopy::MESSENGER_LAYOUT`]:
//! `origin:24 app:8 path:8 org:18 team:20 channel:10 device:20 msg:20`. The first four fields
//! are the same for everything an org publishes ([`Org`]); `path` says what kind of object a
//! name holds ([`Path`]), and the last 70 bits are laid out per kind:
//!
//! | path | object | `team` | `channel` | `device` | `msg` |
//! |---|---|---|---|---|---|
//! | 1 | message fragment | team | channel | sending device | message number + fragment index |
//! | 2 | key package fragment | 54 bits of hKP … | | … | low 16 bits: fragment index |
//! | 3 | welcome fragment | 54 bits of hKP … | | … | low 16 bits: fragment index |
//! | 4 | commit fragment | team | fragment index | epoch, high 20 bits | epoch, low 20 bits |
//!
//! For key packages and welcomes, the 70 bits are the first 54 bits of the hKP (the MLS
//! `KeyPackageRef`, big-endian) followed by a 16-bit fragment index, so one `/112` filter
//! covers every fragment of one object. A commit is named by the epoch it creates, so a
//! member sees a gap as a missing number.
//!
//! **Users and conversations** (direct messages, groups) are not any org's: they live in the
//! messenger's second app value, [`USERS_APP`], under the origin of a domain ([`Users`]). After
//! `origin:24 app:8 path:8` the 88 bits are laid out per kind:
//!
//! | path | object | layout of the 88 bits |
//! |---|---|---|
//! | 1 | conversation message fragment | `conv:48 device:20 msg:20` |
//! | 2 | a user's key package fragment | `user:56 hkp:24 fragment:8` |
//! | 3 | welcome fragment | `user:32 conv:32 epoch:16 fragment:8` |
//! | 4 | conversation commit fragment | `conv:48 fragment:10 epoch:30` |
//!
//! `user` is the first 56 (key packages) or 32 (welcomes) bits of the user id, so one `/96`
//! covers every key package a user's devices publish and one `/72` every welcome to them; the
//! credential inside names the whole id, and that is what is checked. Key packages in this
//! space are last-resort ones that many may use, so a welcome is named by its joiner's user,
//! the low 32 bits of the conversation and the low 16 bits of the epoch its commit creates,
//! not by hKP: one welcome per user per commit, however many of the user's devices it adds.
//! A device tells a welcome for itself by the key package references inside. A conversation's names are under
//! its creator's domain; its 48-bit `conv` number is random, and the MLS group id carries it,
//! so a collision shows as refused messages of another group.

use std::sync::OnceLock;

use canopy::{Filter, Name, Schema};

/// The `app` field value of the messenger.
pub const APP: u128 = 1;

/// The largest org number (18 bits).
pub const MAX_ORG: u32 = (1 << 18) - 1;
/// The largest team number (20 bits).
pub const MAX_TEAM: u32 = (1 << 20) - 1;
/// The largest channel number (10 bits).
pub const MAX_CHANNEL: u16 = (1 << 10) - 1;
/// The largest device number (20 bits).
pub const MAX_DEVICE: u32 = (1 << 20) - 1;
/// The largest message number (20 bits).
pub const MAX_MSG: u32 = (1 << 20) - 1;
/// The largest epoch a commit name can carry (40 bits).
pub const MAX_EPOCH: u64 = (1 << 40) - 1;
/// The largest fragment index of a commit (10 bits: at most 1,024 fragments).
pub const MAX_COMMIT_FRAGMENT: u16 = (1 << 10) - 1;
/// The `app` field value of users and conversations.
pub const USERS_APP: u128 = 2;
/// The largest conversation number (48 bits).
pub const MAX_CONV: u64 = (1 << 48) - 1;
/// The largest epoch a conversation commit name can carry (30 bits).
pub const MAX_CONV_EPOCH: u64 = (1 << 30) - 1;
/// The largest fragment index of a user's key package or of a conversation's welcome (8 bits).
pub const MAX_USER_FRAGMENT: u16 = u8::MAX as u16;

/// Team 1 of every org carries device management; users' teams start at 2.
pub const DEVICE_TEAM: u32 = 1;
/// Channel 1 of every team carries team management; users' channels start at 2.
pub const MANAGEMENT_CHANNEL: u16 = 1;

/// What kind of object a name holds: the `path` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Path {
    /// An MLS application message (a text, an edit, a management record).
    Message = 1,
    /// An MLS key package, published by a device that wants to join.
    KeyPackage = 2,
    /// An MLS welcome, for the key package whose hKP it is named after.
    Welcome = 3,
    /// An MLS commit, named by the epoch it creates.
    Commit = 4,
}

impl Path {
    /// The path for a field value, if it is one of ours.
    pub fn from_u8(v: u8) -> Option<Path> {
        Some(match v {
            1 => Path::Message,
            2 => Path::KeyPackage,
            3 => Path::Welcome,
            4 => Path::Commit,
            _ => return None,
        })
    }
}

/// A name field did not fit its width.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {value} does not fit (the largest is {max})")]
pub struct NameError {
    /// The field.
    pub field: &'static str,
    /// The value asked for.
    pub value: u64,
    /// The field's largest value.
    pub max: u64,
}

fn check(field: &'static str, value: u64, max: u64) -> Result<(), NameError> {
    if value > max { Err(NameError { field, value, max }) } else { Ok(()) }
}

fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(Schema::messenger)
}

/// What a name holds, decoded. [`Org::parse`] gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Parsed {
    /// A message fragment: `msg` is the fragment's own number (the message's first number
    /// plus the fragment index).
    Message {
        /// Team.
        team: u32,
        /// Channel.
        channel: u16,
        /// Sending device.
        device: u32,
        /// Message number of this fragment.
        msg: u32,
    },
    /// A key package fragment.
    KeyPackage {
        /// The first 54 bits of the hKP.
        hkp54: u64,
        /// Fragment index.
        fragment: u16,
    },
    /// A welcome fragment.
    Welcome {
        /// The first 54 bits of the hKP it is for.
        hkp54: u64,
        /// Fragment index.
        fragment: u16,
    },
    /// A commit fragment.
    Commit {
        /// Team.
        team: u32,
        /// The epoch the commit creates.
        epoch: u64,
        /// Fragment index.
        fragment: u16,
    },
}

/// A conversation: the origin its names are under, and its 48-bit number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct ConvId {
    /// The origin field (24 bits) of its creator's domain.
    pub origin: u32,
    /// Its number (48 bits).
    pub conv: u64,
}

impl std::fmt::Display for ConvId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:06x}{:012x}", self.origin, self.conv)
    }
}

impl ConvId {
    /// Reads the 18 hex digits [`Display`](std::fmt::Display) writes.
    pub fn parse(text: &str) -> Option<ConvId> {
        if text.len() != 18 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(ConvId { origin: u32::from_str_radix(&text[..6], 16).ok()?, conv: u64::from_str_radix(&text[6..], 16).ok()? })
    }
}

/// A group a device is in: a team of its org, or a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Gid {
    /// A team of the device's org.
    Team(u32),
    /// A conversation (a direct message or a group).
    Conv(ConvId),
}

impl std::fmt::Display for Gid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Gid::Team(t) => write!(f, "{t}"),
            Gid::Conv(c) => write!(f, "c{c}"),
        }
    }
}

impl Gid {
    /// Reads what [`Display`](std::fmt::Display) writes: a team number, or `c` and a
    /// conversation id.
    pub fn parse(text: &str) -> Option<Gid> {
        match text.strip_prefix('c') {
            Some(conv) => ConvId::parse(conv).map(Gid::Conv),
            None => text.parse().ok().map(Gid::Team),
        }
    }
}

/// What a name in the users' space holds, decoded. [`Users::parse`] gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParsedUser {
    /// A conversation message fragment.
    Message {
        /// The conversation.
        conv: ConvId,
        /// Sending device.
        device: u32,
        /// Message number of this fragment.
        msg: u32,
    },
    /// A fragment of a user's key package.
    KeyPackage {
        /// The first 56 bits of the user id.
        user56: u64,
        /// Fragment index.
        fragment: u16,
    },
    /// A welcome fragment.
    Welcome {
        /// The first 32 bits of the joiner's user id.
        user32: u32,
        /// The low 32 bits of the conversation number.
        conv32: u32,
        /// The low 16 bits of the epoch its commit creates.
        epoch16: u16,
        /// Fragment index.
        fragment: u16,
    },
    /// A conversation commit fragment.
    Commit {
        /// The conversation.
        conv: ConvId,
        /// The epoch the commit creates.
        epoch: u64,
        /// Fragment index.
        fragment: u16,
    },
}

/// The first 64 bits of a user id.
fn user_bits(user: &crate::identity::UserId) -> u64 {
    u64::from_be_bytes(user.0[..8].try_into().expect("8 bytes"))
}

/// A number from two byte strings, to order choices differently per chooser.
pub fn mix(a: &[u8], b: &[u8]) -> u64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new().chain_update(a).chain_update(b).finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// The first 32 bits of a user id, as carried in welcome names.
pub fn user32(user: &crate::identity::UserId) -> u32 {
    (user_bits(user) >> 32) as u32
}

/// A domain's users' space: where its users publish key packages and receive welcomes, and
/// where conversations its users create live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Users {
    origin: u32,
}

impl Users {
    /// The users' space of `domain`.
    pub fn new(domain: &str) -> Users {
        Users { origin: schema().hash_text("origin", domain).expect("the messenger schema has an origin field") as u32 }
    }

    /// The users' space under an origin field value.
    pub fn at(origin: u32) -> Users {
        Users { origin: origin & 0xff_ffff }
    }

    /// The origin field.
    pub fn origin(&self) -> u32 {
        self.origin
    }

    fn head(&self, path: Path) -> u128 {
        (u128::from(self.origin) << 104) | (USERS_APP << 96) | ((path as u128) << 88)
    }

    /// The name of fragment `fragment` of a key package of `user`, with hKP `hkp`.
    pub fn key_package(&self, user: &crate::identity::UserId, hkp: &[u8], fragment: u16) -> Result<Name, NameError> {
        check("key package fragment", fragment.into(), MAX_USER_FRAGMENT.into())?;
        let user56 = u128::from(user_bits(user) >> 8);
        let mut top = [0u8; 4];
        let n = hkp.len().min(3);
        top[1..1 + n].copy_from_slice(&hkp[..n]);
        let hkp24 = u128::from(u32::from_be_bytes(top));
        Ok(Name::new(self.head(Path::KeyPackage) | (user56 << 32) | (hkp24 << 8) | u128::from(fragment)))
    }

    /// Every key package of every device of `user` (a `/96`).
    pub fn key_packages(&self, user: &crate::identity::UserId) -> Filter {
        let name = self.key_package(user, &[], 0).expect("fragment 0 fits");
        Filter::new(Name::new(name.to_u128() & !((1u128 << 32) - 1)), 96).expect("canonical")
    }

    /// Every fragment of one key package of `user` (a `/120`).
    pub fn key_package_filter(&self, user: &crate::identity::UserId, hkp: &[u8]) -> Filter {
        Filter::new(self.key_package(user, hkp, 0).expect("fragment 0 fits"), 120).expect("canonical")
    }

    /// The name of fragment `fragment` of the welcome of `user`'s devices to `conv`, by the
    /// commit that creates `epoch`.
    pub fn welcome(&self, user: &crate::identity::UserId, conv: ConvId, epoch: u64, fragment: u16) -> Result<Name, NameError> {
        check("welcome fragment", fragment.into(), MAX_USER_FRAGMENT.into())?;
        let user32 = u128::from(user32(user));
        let conv32 = u128::from(conv.conv as u32);
        let epoch16 = u128::from(epoch as u16);
        Ok(Name::new(self.head(Path::Welcome) | (user32 << 56) | (conv32 << 24) | (epoch16 << 8) | u128::from(fragment)))
    }

    /// Every welcome to `user`'s devices (a `/72`).
    pub fn welcomes(&self, user: &crate::identity::UserId) -> Filter {
        let name = self.welcome(user, ConvId { origin: self.origin, conv: 0 }, 0, 0).expect("fragment 0 fits");
        Filter::new(name, 72).expect("canonical")
    }

    fn conv_head(path: Path, conv: ConvId) -> Result<u128, NameError> {
        check("conversation", conv.conv, MAX_CONV)?;
        Ok(Users::at(conv.origin).head(path) | (u128::from(conv.conv) << 40))
    }

    /// The name of fragment `msg` of a message sent by `device` in `conv`.
    pub fn message(conv: ConvId, device: u32, msg: u32) -> Result<Name, NameError> {
        check("device", device.into(), MAX_DEVICE.into())?;
        check("msg", msg.into(), MAX_MSG.into())?;
        Ok(Name::new(Users::conv_head(Path::Message, conv)? | (u128::from(device) << 20) | u128::from(msg)))
    }

    /// Every message of a conversation (an `/88`).
    pub fn messages(conv: ConvId) -> Result<Filter, NameError> {
        Ok(Filter::new(Name::new(Users::conv_head(Path::Message, conv)?), 88).expect("canonical"))
    }

    /// The name of fragment `fragment` of the commit that creates `epoch` in `conv`.
    pub fn commit(conv: ConvId, epoch: u64, fragment: u16) -> Result<Name, NameError> {
        check("epoch", epoch, MAX_CONV_EPOCH)?;
        check("commit fragment", fragment.into(), MAX_COMMIT_FRAGMENT.into())?;
        Ok(Name::new(Users::conv_head(Path::Commit, conv)? | (u128::from(fragment) << 30) | u128::from(epoch)))
    }

    /// Every commit of a conversation (an `/88`).
    pub fn commits(conv: ConvId) -> Result<Filter, NameError> {
        Ok(Filter::new(Name::new(Users::conv_head(Path::Commit, conv)?), 88).expect("canonical"))
    }

    /// What `name` holds, if it is in any domain's users' space.
    pub fn parse(name: Name) -> Option<ParsedUser> {
        let raw = name.to_u128();
        if (raw >> 96) & 0xff != USERS_APP {
            return None;
        }
        let origin = (raw >> 104) as u32;
        let path = Path::from_u8((raw >> 88) as u8)?;
        let conv = ConvId { origin, conv: ((raw >> 40) as u64) & MAX_CONV };
        Some(match path {
            Path::Message => ParsedUser::Message { conv, device: ((raw >> 20) as u32) & MAX_DEVICE, msg: (raw as u32) & MAX_MSG },
            Path::KeyPackage => ParsedUser::KeyPackage { user56: ((raw >> 32) as u64) & ((1 << 56) - 1), fragment: (raw & 0xff) as u16 },
            Path::Welcome => ParsedUser::Welcome {
                user32: (raw >> 56) as u32,
                conv32: (raw >> 24) as u32,
                epoch16: (raw >> 8) as u16,
                fragment: (raw & 0xff) as u16,
            },
            Path::Commit => ParsedUser::Commit { conv, epoch: (raw as u64) & MAX_CONV_EPOCH, fragment: ((raw >> 30) as u16) & MAX_COMMIT_FRAGMENT },
        })
    }
}

/// An organisation's corner of the name space: its origin (the hash of its domain) and org
/// number. Every name the messenger makes comes from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Org {
    origin: u32,
    org: u32,
}

/// The first 54 bits of an hKP, as carried in key package and welcome names.
pub fn hkp54(hkp: &[u8]) -> u64 {
    let mut top = [0u8; 8];
    let n = hkp.len().min(8);
    top[..n].copy_from_slice(&hkp[..n]);
    u64::from_be_bytes(top) >> 10
}

impl Org {
    /// The org `org` of the domain `domain`; the origin field is
    /// [`Schema::hash_text`]`("origin", domain)`.
    pub fn new(domain: &str, org: u32) -> Result<Org, NameError> {
        check("org", org.into(), MAX_ORG.into())?;
        let origin = schema().hash_text("origin", domain).expect("the messenger schema has an origin field") as u32;
        Ok(Org { origin, org })
    }

    /// The origin field (24 bits).
    pub fn origin(&self) -> u32 {
        self.origin
    }

    /// The org number.
    pub fn org(&self) -> u32 {
        self.org
    }

    fn head(&self, path: Path) -> u128 {
        (u128::from(self.origin) << 104) | (APP << 96) | ((path as u128) << 88) | (u128::from(self.org) << 70)
    }

    /// The name of fragment `msg` of a message sent by `device` on `team/channel`.
    pub fn message(&self, team: u32, channel: u16, device: u32, msg: u32) -> Result<Name, NameError> {
        check("team", team.into(), MAX_TEAM.into())?;
        check("channel", channel.into(), MAX_CHANNEL.into())?;
        check("device", device.into(), MAX_DEVICE.into())?;
        check("msg", msg.into(), MAX_MSG.into())?;
        Ok(Name::new(
            self.head(Path::Message)
                | (u128::from(team) << 50)
                | (u128::from(channel) << 40)
                | (u128::from(device) << 20)
                | u128::from(msg),
        ))
    }

    /// Every message of a team (a `/78`).
    pub fn team_messages(&self, team: u32) -> Result<Filter, NameError> {
        check("team", team.into(), MAX_TEAM.into())?;
        Ok(Filter::new(Name::new(self.head(Path::Message) | (u128::from(team) << 50)), 78).expect("canonical"))
    }

    /// Every message of one channel (a `/88`).
    pub fn channel_messages(&self, team: u32, channel: u16) -> Result<Filter, NameError> {
        let name = self.message(team, channel, 0, 0)?;
        Ok(Filter::new(name, 88).expect("canonical"))
    }

    /// Every message one device sent on one channel (a `/108`).
    pub fn device_messages(&self, team: u32, channel: u16, device: u32) -> Result<Filter, NameError> {
        let name = self.message(team, channel, device, 0)?;
        Ok(Filter::new(name, 108).expect("canonical"))
    }

    /// The name of fragment `fragment` of the commit that creates `epoch` in `team`.
    pub fn commit(&self, team: u32, epoch: u64, fragment: u16) -> Result<Name, NameError> {
        check("team", team.into(), MAX_TEAM.into())?;
        check("epoch", epoch, MAX_EPOCH)?;
        check("commit fragment", fragment.into(), MAX_COMMIT_FRAGMENT.into())?;
        Ok(Name::new(
            self.head(Path::Commit) | (u128::from(team) << 50) | (u128::from(fragment) << 40) | u128::from(epoch),
        ))
    }

    /// Every commit of a team (a `/78`).
    pub fn team_commits(&self, team: u32) -> Result<Filter, NameError> {
        check("team", team.into(), MAX_TEAM.into())?;
        Ok(Filter::new(Name::new(self.head(Path::Commit) | (u128::from(team) << 50)), 78).expect("canonical"))
    }

    /// Every commit of the whole org (a `/58`): what the org's access rules reserve for the
    /// committer.
    pub fn all(&self, path: Path) -> Filter {
        Filter::new(Name::new(self.head(path)), 58).expect("canonical")
    }

    fn by_hkp(&self, path: Path, hkp: &[u8], fragment: u16) -> Name {
        Name::new(self.head(path) | (u128::from(hkp54(hkp)) << 16) | u128::from(fragment))
    }

    /// The name of fragment `fragment` of the key package whose hKP is `hkp`.
    pub fn key_package(&self, hkp: &[u8], fragment: u16) -> Name {
        self.by_hkp(Path::KeyPackage, hkp, fragment)
    }

    /// Every fragment of the key package `hkp` (a `/112`).
    pub fn key_package_filter(&self, hkp: &[u8]) -> Filter {
        Filter::new(self.key_package(hkp, 0), 112).expect("canonical")
    }

    /// The name of fragment `fragment` of the welcome for the key package `hkp`.
    pub fn welcome(&self, hkp: &[u8], fragment: u16) -> Name {
        self.by_hkp(Path::Welcome, hkp, fragment)
    }

    /// Every fragment of the welcome for `hkp` (a `/112`).
    pub fn welcome_filter(&self, hkp: &[u8]) -> Filter {
        Filter::new(self.welcome(hkp, 0), 112).expect("canonical")
    }

    /// What `name` holds, if it is one of this org's names.
    pub fn parse(&self, name: Name) -> Option<Parsed> {
        let raw = name.to_u128();
        let path = Path::from_u8((raw >> 88) as u8)?;
        if raw >> 70 != self.head(path) >> 70 {
            return None;
        }
        let team = ((raw >> 50) & u128::from(MAX_TEAM)) as u32;
        Some(match path {
            Path::Message => Parsed::Message {
                team,
                channel: ((raw >> 40) & u128::from(MAX_CHANNEL)) as u16,
                device: ((raw >> 20) & u128::from(MAX_DEVICE)) as u32,
                msg: (raw & u128::from(MAX_MSG)) as u32,
            },
            Path::KeyPackage => {
                Parsed::KeyPackage { hkp54: ((raw >> 16) as u64) & ((1 << 54) - 1), fragment: raw as u16 }
            }
            Path::Welcome => Parsed::Welcome { hkp54: ((raw >> 16) as u64) & ((1 << 54) - 1), fragment: raw as u16 },
            Path::Commit => Parsed::Commit {
                team,
                epoch: (raw as u64) & MAX_EPOCH,
                fragment: ((raw >> 40) & u128::from(MAX_COMMIT_FRAGMENT)) as u16,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_agree_with_the_schema() {
        let org = Org::new("example.com", 7).unwrap();
        assert_eq!(org.origin(), 0xa379a6);
        let name = org.message(5, 3, 7, 42).unwrap();
        assert_eq!(
            schema().render(name),
            "origin=10713510/app=1/path=1/org=7/team=5/channel=3/device=7/msg=42"
        );
        assert!(org.team_messages(5).unwrap().matches(name));
        assert!(org.channel_messages(5, 3).unwrap().matches(name));
        assert!(!org.channel_messages(5, 4).unwrap().matches(name));
        assert_eq!(org.parse(name), Some(Parsed::Message { team: 5, channel: 3, device: 7, msg: 42 }));
        let commit = org.commit(5, 9, 2).unwrap();
        assert_eq!(schema().get(commit, "path").unwrap(), 4);
        assert_eq!(schema().get(commit, "team").unwrap(), 5);
        assert!(org.team_commits(5).unwrap().matches(commit));
        assert!(!org.team_messages(5).unwrap().matches(commit));
        assert_eq!(org.parse(commit), Some(Parsed::Commit { team: 5, epoch: 9, fragment: 2 }));
        assert!(org.all(Path::Commit).matches(commit));
    }

    #[test]
    fn key_packages_and_welcomes_are_named_by_hkp() {
        let org = Org::new("example.com", 7).unwrap();
        let hkp = [0xffu8; 32];
        let kp = org.key_package(&hkp, 3);
        assert!(org.key_package_filter(&hkp).matches(kp));
        assert!(!org.welcome_filter(&hkp).matches(kp));
        assert_eq!(org.parse(kp), Some(Parsed::KeyPackage { hkp54: (1 << 54) - 1, fragment: 3 }));
        assert_eq!(org.parse(org.welcome(&hkp, 0)), Some(Parsed::Welcome { hkp54: hkp54(&hkp), fragment: 0 }));
        let other = Org::new("example.org", 7).unwrap();
        assert_eq!(other.parse(kp), None);
    }

    #[test]
    fn the_users_space_is_apart_from_every_org() {
        let users = Users::new("example.com");
        let org = Org::new("example.com", 7).unwrap();
        assert_eq!(users.origin(), org.origin());
        let user = crate::identity::UserId([0xab; 16]);
        let hkp = [0x5a; 32];
        let kp = users.key_package(&user, &hkp, 3).unwrap();
        assert_eq!(schema().get(kp, "app").unwrap(), 2);
        assert!(users.key_packages(&user).matches(kp));
        assert!(users.key_package_filter(&user, &hkp).matches(kp));
        assert!(!users.key_packages(&crate::identity::UserId([0xac; 16])).matches(kp));
        assert_eq!(org.parse(kp), None, "no org reads the users' space");
        assert_eq!(Users::parse(kp), Some(ParsedUser::KeyPackage { user56: 0x00ab_abab_abab_abab, fragment: 3 }));
        let conv = ConvId { origin: users.origin(), conv: MAX_CONV };
        let w = users.welcome(&user, conv, 0x1_0005, 1).unwrap();
        assert!(users.welcomes(&user).matches(w));
        assert!(!users.welcomes(&crate::identity::UserId([0xac; 16])).matches(w));
        assert_eq!(Users::parse(w), Some(ParsedUser::Welcome { user32: 0xabab_abab, conv32: u32::MAX, epoch16: 5, fragment: 1 }));
        let m = Users::message(conv, 5, 9).unwrap();
        assert!(Users::messages(conv).unwrap().matches(m));
        assert!(!Users::commits(conv).unwrap().matches(m));
        assert_eq!(Users::parse(m), Some(ParsedUser::Message { conv, device: 5, msg: 9 }));
        let c = Users::commit(conv, MAX_CONV_EPOCH, 7).unwrap();
        assert_eq!(Users::parse(c), Some(ParsedUser::Commit { conv, epoch: MAX_CONV_EPOCH, fragment: 7 }));
        assert!(Users::commit(conv, MAX_CONV_EPOCH + 1, 0).is_err());
        assert!(Users::parse(org.message(2, 2, 1, 1).unwrap()).is_none());
        assert_eq!(ConvId::parse(&conv.to_string()), Some(conv));
        for g in [Gid::Team(42), Gid::Conv(conv)] {
            assert_eq!(Gid::parse(&g.to_string()), Some(g));
        }
    }

    #[test]
    fn overflow_is_an_error() {
        let org = Org::new("example.com", 7).unwrap();
        assert!(Org::new("example.com", MAX_ORG + 1).is_err());
        assert_eq!(org.message(1 << 20, 0, 0, 0).unwrap_err().field, "team");
        assert!(org.message(2, 1 << 10, 0, 0).is_err());
        assert!(org.commit(2, 1 << 40, 0).is_err());
    }
}
