//! Access rules: which token may publish to and subscribe to which filters.
//!
//! A relay's configuration maps tokens to [`Grant`]s. With no rules at all, everything is
//! allowed (a development relay on loopback); as soon as one rule exists, a connection must
//! present a known token, and every publish and subscribe is checked against its grant.

use std::collections::HashMap;

use crate::{Filter, Name};

/// What one token may do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    /// Chunks may be published under any of these filters.
    pub publish: Vec<Filter>,
    /// Subscriptions may use any filter covered by one of these.
    pub subscribe: Vec<Filter>,
}

impl Grant {
    /// A grant that allows everything.
    pub fn all() -> Self {
        Grant { publish: vec![Filter::ALL], subscribe: vec![Filter::ALL] }
    }

    /// Whether a chunk named `name` may be published.
    pub fn may_publish(&self, name: Name) -> bool {
        self.publish.iter().any(|f| f.matches(name))
    }

    /// Whether a subscription with `filter` may be made.
    pub fn may_subscribe(&self, filter: &Filter) -> bool {
        self.subscribe.iter().any(|f| f.covers(filter))
    }
}

/// The token → grant rules of a relay.
#[derive(Debug, Clone, Default)]
pub struct Access {
    rules: HashMap<String, Grant>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// Rules are configured and the connection presented no token.
    #[error("this relay requires a token")]
    MissingToken,
    /// The token is not in the rules.
    #[error("unknown token")]
    UnknownToken,
}

impl Access {
    /// No rules: every connection may do everything.
    pub fn allow_all() -> Self {
        Access::default()
    }

    /// Rules from `(token, grant)` pairs.
    pub fn with_rules(rules: impl IntoIterator<Item = (String, Grant)>) -> Self {
        Access { rules: rules.into_iter().collect() }
    }

    /// Whether any rule is configured (if not, everything is allowed).
    pub fn is_open(&self) -> bool {
        self.rules.is_empty()
    }

    /// The grant for a connection presenting `token`.
    pub fn grant(&self, token: Option<&str>) -> Result<Grant, AccessError> {
        if self.is_open() {
            return Ok(Grant::all());
        }
        let token = token.ok_or(AccessError::MissingToken)?;
        self.rules.get(token).cloned().ok_or(AccessError::UnknownToken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_relay_allows_everything() {
        let grant = Access::allow_all().grant(None).unwrap();
        assert!(grant.may_publish(Name::new(42)));
        assert!(grant.may_subscribe(&Filter::ALL));
    }

    #[test]
    fn rules_check_tokens_and_filters() {
        let team: Filter = "0x0a0b0000000000000000000000000000/16".parse().unwrap();
        let access = Access::with_rules([(
            "alice".to_owned(),
            Grant { publish: vec![team], subscribe: vec![team] },
        )]);
        assert_eq!(access.grant(None), Err(AccessError::MissingToken));
        assert_eq!(access.grant(Some("mallory")), Err(AccessError::UnknownToken));
        let grant = access.grant(Some("alice")).unwrap();
        assert!(grant.may_publish(Name::new(0x000a_0b0c << 104)));
        assert!(!grant.may_publish(Name::new(0x0a0c << 112)));
        let narrower = Filter::new(Name::new(0x000a_0b0c << 104), 24).unwrap();
        assert!(grant.may_subscribe(&narrower));
        assert!(!grant.may_subscribe(&Filter::ALL));
    }
}
