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
    fn overflow_is_an_error() {
        let org = Org::new("example.com", 7).unwrap();
        assert!(Org::new("example.com", MAX_ORG + 1).is_err());
        assert_eq!(org.message(1 << 20, 0, 0, 0).unwrap_err().field, "team");
        assert!(org.message(2, 1 << 10, 0, 0).is_err());
        assert!(org.commit(2, 1 << 40, 0).is_err());
    }
}
