//! Channel names and their namespace.
//!
//! `chat:room1` is channel `room1` in namespace `chat`; a name without a colon is in the default
//! namespace. Only the first colon splits, so `chat:a:b` is `a:b` in `chat`.

use std::fmt;
use std::sync::Arc;

/// A validated channel name. Cheap to clone: the text is shared.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName {
    full: Arc<str>,
    /// Byte length of the namespace prefix (without the colon); 0 for the default namespace.
    ns_len: usize,
}

/// Why a channel name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelNameError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is {len} bytes long, the limit is {max}")]
    TooLong { len: usize, max: usize },
    #[error("channel name contains whitespace or a control character")]
    BadCharacter,
    #[error("channel name has an empty namespace before ':'")]
    EmptyNamespace,
    #[error("channel name has nothing after the namespace '{0}:'")]
    EmptyChannel(String),
}

/// Whether a stream name (a hub or store key) is internal: an inbox, a conversation, a legacy
/// protocol's room. Such names are never shown as channels.
pub fn is_internal_name(name: &str) -> bool {
    name.starts_with('\u{1}')
}

impl ChannelName {
    /// Validates `name` against `max_len` (in bytes) and the character rules: any Unicode text
    /// without whitespace or control characters.
    pub fn parse(name: &str, max_len: usize) -> Result<Self, ChannelNameError> {
        if name.is_empty() {
            return Err(ChannelNameError::Empty);
        }
        if name.len() > max_len {
            return Err(ChannelNameError::TooLong {
                len: name.len(),
                max: max_len,
            });
        }
        if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ChannelNameError::BadCharacter);
        }
        let ns_len = match name.find(':') {
            None => 0,
            Some(0) => return Err(ChannelNameError::EmptyNamespace),
            Some(i) if i + 1 == name.len() => {
                return Err(ChannelNameError::EmptyChannel(name[..i].to_owned()));
            }
            Some(i) => i,
        };
        Ok(Self {
            full: Arc::from(name),
            ns_len,
        })
    }

    /// A stream the server keeps for itself (a user's inbox, a conversation), named `kind` and
    /// `id`. The name holds a control character, which [`ChannelName::parse`] refuses, so no
    /// client can subscribe or publish to it.
    pub fn internal(kind: &str, id: &str) -> Self {
        Self {
            full: Arc::from(format!("\u{1}{kind}\u{1}{id}")),
            ns_len: 0,
        }
    }

    /// A name that Plaza itself stored earlier (a name [`ChannelName::parse`] accepted, or an
    /// internal one), read back from a store or a broker: not validated again.
    pub fn from_stored(name: &str) -> Self {
        let ns_len = if is_internal_name(name) {
            0
        } else {
            name.find(':').unwrap_or(0)
        };
        Self {
            full: Arc::from(name),
            ns_len,
        }
    }

    /// Whether this name came from [`ChannelName::internal`].
    pub fn is_internal(&self) -> bool {
        is_internal_name(&self.full)
    }

    /// The whole name, as the client wrote it.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The shared text, for maps keyed by channel.
    pub fn as_arc(&self) -> &Arc<str> {
        &self.full
    }

    /// The users a user-limited channel is for: `dm:chat#42,57` → `["42", "57"]`. Empty when the
    /// name has no `#` part (the channel is then for nobody under the `user` policy).
    pub fn allowed_users(&self) -> impl Iterator<Item = &str> {
        let local = &self.full[self.ns_len..];
        local
            .rfind('#')
            .map(|i| &local[i + 1..])
            .unwrap_or("")
            .split(',')
            .filter(|u| !u.is_empty())
    }

    /// The namespace, or `None` for the default namespace.
    pub fn namespace(&self) -> Option<&str> {
        (self.ns_len > 0).then(|| &self.full[..self.ns_len])
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_first_colon() {
        let c = ChannelName::parse("chat:room:1", 255).unwrap();
        assert_eq!(c.namespace(), Some("chat"));
        assert_eq!(c.as_str(), "chat:room:1");
        assert_eq!(ChannelName::parse("news", 255).unwrap().namespace(), None);
    }

    #[test]
    fn refuses_bad_names() {
        assert_eq!(ChannelName::parse("", 255), Err(ChannelNameError::Empty));
        assert_eq!(
            ChannelName::parse("abcd", 3),
            Err(ChannelNameError::TooLong { len: 4, max: 3 })
        );
        assert_eq!(
            ChannelName::parse("a b", 255),
            Err(ChannelNameError::BadCharacter)
        );
        assert_eq!(
            ChannelName::parse("a\u{0}", 255),
            Err(ChannelNameError::BadCharacter)
        );
        assert_eq!(
            ChannelName::parse(":x", 255),
            Err(ChannelNameError::EmptyNamespace)
        );
        assert_eq!(
            ChannelName::parse("chat:", 255),
            Err(ChannelNameError::EmptyChannel("chat".into()))
        );
    }

    #[test]
    fn internal_names_cannot_be_written_by_clients() {
        let inbox = ChannelName::internal("inbox", "42");
        assert!(inbox.is_internal());
        assert!(ChannelName::parse(inbox.as_str(), 255).is_err());
        assert!(!ChannelName::parse("inbox:42", 255).unwrap().is_internal());
    }

    #[test]
    fn user_limited_names() {
        let users = |s: &str| {
            ChannelName::parse(s, 255)
                .unwrap()
                .allowed_users()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(users("dm:chat#42,57"), ["42", "57"]);
        assert_eq!(users("dm:a#b#42"), ["42"]);
        assert_eq!(users("dm:chat#"), Vec::<String>::new());
        assert_eq!(users("dm:chat"), Vec::<String>::new());
        assert_eq!(users("x#1,,2"), ["1", "2"]);
    }

    #[test]
    fn length_is_counted_in_bytes() {
        // 'é' is two bytes in UTF-8.
        assert!(ChannelName::parse("éé", 4).is_ok());
        assert!(ChannelName::parse("ééé", 5).is_err());
    }
}
