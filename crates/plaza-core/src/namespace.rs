//! Namespaces: the options a group of channels shares.
//!
//! Configured as `[default_namespace]` for channels without a colon and `[namespaces.NAME]` for
//! `NAME:channel`. A channel whose namespace is not configured is refused, so a typo in a client
//! cannot create channels nobody configured.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::channel::ChannelName;

/// Who may subscribe to (or, with `client_publish`, publish to) a namespace's channels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessPolicy {
    /// Every connected client.
    #[default]
    Public,
    /// Only the users the channel name lists after `#`: `dm:chat#42,57` is for users 42 and 57.
    User,
    /// Only with a token the app signed for that channel and user.
    Token,
    /// Plaza asks the app (`auth.subscribe_url`) each time.
    App,
}

/// Options of one namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceOptions {
    /// Whether connected clients may publish to channels of this namespace. The backend API may
    /// always publish.
    pub client_publish: bool,
    /// Publications kept per channel for history and recovery; 0 turns history off. With history,
    /// every publication gets an `(epoch, offset)` and is acknowledged only once durably stored.
    pub history_size: u64,
    /// Seconds a publication stays in history; 0 keeps it until `history_size` pushes it out.
    pub history_ttl_secs: u64,
    /// Whether channels keep who is subscribed (`presence` and `presence_stats` requests).
    pub presence: bool,
    /// Whether subscribers get `join` and `leave` pushes when users come and go. Needs
    /// `presence`.
    pub join_leave: bool,
    /// Who may subscribe.
    pub subscribe: AccessPolicy,
    /// Who may publish, when `client_publish` is on.
    pub publish: AccessPolicy,
    /// Whether connected clients may join (and so create) chat groups named in this namespace,
    /// subject to the `subscribe` policy. The backend API may always add members.
    pub client_join: bool,
}

impl NamespaceOptions {
    pub fn has_history(&self) -> bool {
        self.history_size > 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamespaceError {
    #[error("unknown namespace '{0}'")]
    Unknown(String),
    #[error("invalid namespace name '{0}': use 1 to 64 characters from A-Z a-z 0-9 _ - .")]
    BadName(String),
}

/// The default namespace and every named one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespaces {
    pub default: NamespaceOptions,
    pub named: BTreeMap<String, NamespaceOptions>,
}

impl Namespaces {
    /// Checks every configured namespace name.
    pub fn validate(&self) -> Result<(), NamespaceError> {
        for name in self.named.keys() {
            let ok = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if !ok {
                return Err(NamespaceError::BadName(name.clone()));
            }
        }
        Ok(())
    }

    /// The options that apply to `channel`.
    pub fn resolve(&self, channel: &ChannelName) -> Result<&NamespaceOptions, NamespaceError> {
        match channel.namespace() {
            None => Ok(&self.default),
            Some(ns) => self
                .named
                .get(ns)
                .ok_or_else(|| NamespaceError::Unknown(ns.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chan(s: &str) -> ChannelName {
        ChannelName::parse(s, 255).unwrap()
    }

    #[test]
    fn resolves_default_and_named() {
        let mut ns = Namespaces::default();
        ns.named.insert(
            "chat".into(),
            NamespaceOptions {
                client_publish: true,
                ..Default::default()
            },
        );
        assert!(!ns.resolve(&chan("news")).unwrap().client_publish);
        assert!(ns.resolve(&chan("chat:room1")).unwrap().client_publish);
        assert_eq!(
            ns.resolve(&chan("nope:x")),
            Err(NamespaceError::Unknown("nope".into()))
        );
    }

    #[test]
    fn validates_names() {
        let mut ns = Namespaces::default();
        ns.named.insert("ok_name-1.x".into(), Default::default());
        assert!(ns.validate().is_ok());
        ns.named.insert("bad name".into(), Default::default());
        assert_eq!(
            ns.validate(),
            Err(NamespaceError::BadName("bad name".into()))
        );
    }
}
