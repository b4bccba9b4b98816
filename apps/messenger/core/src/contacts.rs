//! A device's contacts: local names for users, and the users it blocks.
//!
//! Everything here is local to the device and sealed at rest with the rest of its state;
//! nothing is published. A contact name stands wherever a user id is accepted, so names
//! are checked not to look like user ids, and are unique.

use std::collections::BTreeMap;

use crate::identity::UserId;
use crate::payload::valid_label;

/// Why a contact operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContactError {
    /// Neither a user id nor a contact name.
    #[error("{0:?} is neither a user id (32 hex digits) nor a contact name")]
    Unknown(String),
    /// A name that cannot be a contact name.
    #[error("{0:?} cannot name a contact (1-64 bytes, not all digits, no '/', not 32 hex digits)")]
    BadName(String),
    /// The name is someone else's already.
    #[error("the name {name:?} is taken by {user}")]
    Taken {
        /// The name.
        name: String,
        /// The user who has it.
        user: UserId,
    },
    /// The user is this device's own.
    #[error("that is you")]
    Yourself,
}

/// What a device knows about one user.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Contact {
    /// The local name.
    pub name: Option<String>,
    /// Whether the user is blocked: nothing of theirs is shown or answered.
    pub blocked: bool,
    /// When the user was last unblocked, unix ms: what they wrote before is not shown.
    #[serde(default)]
    pub unblocked_ms: u64,
}

impl Contact {
    /// Whether there is anything to keep.
    pub fn is_empty(&self) -> bool {
        self.name.is_none() && !self.blocked && self.unblocked_ms == 0
    }
}

/// Every contact of a device, by user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contacts {
    by_user: BTreeMap<UserId, Contact>,
}

/// Whether `name` may name a contact.
pub fn valid_contact_name(name: &str) -> bool {
    valid_label(name) && !UserId::looks_like(name) && !name.contains(':')
}

impl Contacts {
    /// Every contact, in user id order.
    pub fn iter(&self) -> impl Iterator<Item = (&UserId, &Contact)> {
        self.by_user.iter()
    }

    /// The contact record of `user`, if any.
    pub fn get(&self, user: &UserId) -> Option<&Contact> {
        self.by_user.get(user)
    }

    /// The local name of `user`, if it has one.
    pub fn name(&self, user: &UserId) -> Option<&str> {
        self.by_user.get(user)?.name.as_deref()
    }

    /// Whether `user` is blocked.
    pub fn is_blocked(&self, user: &UserId) -> bool {
        self.by_user.get(user).is_some_and(|c| c.blocked)
    }

    /// The user `which` stands for: a user id, or a contact name.
    pub fn resolve(&self, which: &str) -> Result<UserId, ContactError> {
        if let Some(id) = UserId::parse(which) {
            return Ok(id);
        }
        self.by_user
            .iter()
            .find(|(_, c)| c.name.as_deref() == Some(which))
            .map(|(id, _)| *id)
            .ok_or_else(|| ContactError::Unknown(which.to_string()))
    }

    /// The record `user` would have after naming it `name`; checks the name.
    pub fn named(&self, user: UserId, name: &str) -> Result<Contact, ContactError> {
        if !valid_contact_name(name) {
            return Err(ContactError::BadName(name.to_string()));
        }
        if let Some((other, _)) = self.by_user.iter().find(|(id, c)| **id != user && c.name.as_deref() == Some(name)) {
            return Err(ContactError::Taken { name: name.to_string(), user: *other });
        }
        Ok(Contact { name: Some(name.to_string()), ..self.by_user.get(&user).cloned().unwrap_or_default() })
    }

    /// Sets `user`'s record (an empty one removes it).
    pub fn set(&mut self, user: UserId, contact: Contact) {
        if contact.is_empty() {
            self.by_user.remove(&user);
        } else {
            self.by_user.insert(user, contact);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_and_stay_unique() {
        let (a, b) = (UserId([1; 16]), UserId([2; 16]));
        let mut c = Contacts::default();
        c.set(a, c.named(a, "alice").unwrap());
        assert_eq!(c.resolve("alice"), Ok(a));
        assert_eq!(c.resolve(&b.to_string()), Ok(b));
        assert_eq!(c.named(b, "alice"), Err(ContactError::Taken { name: "alice".into(), user: a }));
        assert!(c.named(a, "alice").is_ok(), "renaming to its own name is fine");
        for bad in ["", "42", "a/b", "dm:x", &b.to_string()] {
            assert_eq!(c.named(b, bad), Err(ContactError::BadName(bad.to_string())));
        }
        assert_eq!(c.resolve("bob"), Err(ContactError::Unknown("bob".into())));
        c.set(a, Contact { blocked: true, ..c.get(&a).cloned().unwrap() });
        assert!(c.is_blocked(&a));
        c.set(a, Contact::default());
        assert_eq!(c.iter().count(), 0);
    }
}
