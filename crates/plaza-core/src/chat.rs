//! Chat: the pure rules behind direct messages, groups, per-user inboxes and receipts.
//!
//! The server keeps chat in the store as plain streams and key-value records; this module says
//! how they are named and encoded, and holds the acknowledgement bookkeeping, so the native
//! protocol and the legacy adapters (Bachata, the RSocket chat, Snorky's chat) share one
//! definition:
//!
//! - every user has an **inbox**: an internal stream ([`inbox`]) holding, in order, every message
//!   sent to them and every receipt about their own messages. Its offsets are the `seq` numbers a
//!   client acknowledges. Delivery is at least once until acknowledged ([`AckState`]).
//! - every **conversation** (a pair of users, or a group) has a history stream
//!   ([`Conversation::stream`]) that members page through and that read markers point into.
//! - group records, memberships, the record that makes a retried send a no-op, and the index from
//!   a message id to its place in each recipient's inbox live in the key-value table under
//!   [`keys`].

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::channel::ChannelName;
use crate::payload::{Payload, json_string};

/// Longest user id and message id, in bytes.
pub const MAX_USER_LEN: usize = 255;
pub const MAX_MESSAGE_ID_LEN: usize = 128;

/// The internal stream kind of inboxes.
pub const INBOX_KIND: &str = "inbox";
const CONVERSATION_KIND: &str = "conv";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    #[error("{what} must be 1 to {max} bytes without control characters")]
    BadName { what: &'static str, max: usize },
}

/// Checks a user id for chat: ids are also parts of store keys, separated by NUL.
pub fn validate_user(user: &str) -> Result<(), ChatError> {
    validate_text(user, "a user id", MAX_USER_LEN)
}

/// Checks a client-supplied message id.
pub fn validate_message_id(id: &str) -> Result<(), ChatError> {
    validate_text(id, "a message id", MAX_MESSAGE_ID_LEN)
}

fn validate_text(text: &str, what: &'static str, max: usize) -> Result<(), ChatError> {
    if text.is_empty() || text.len() > max || text.chars().any(char::is_control) {
        return Err(ChatError::BadName { what, max });
    }
    Ok(())
}

/// A user's inbox stream.
pub fn inbox(user: &str) -> ChannelName {
    ChannelName::internal(INBOX_KIND, user)
}

/// Whether a stream name is an inbox (its publications are encoded as inbox entries).
pub fn is_inbox(name: &str) -> bool {
    name.strip_prefix('\u{1}')
        .and_then(|rest| rest.strip_prefix(INBOX_KIND))
        .is_some_and(|rest| rest.starts_with('\u{1}'))
}

/// Who a message goes to, as a client names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    User(String),
    Group(String),
}

impl Peer {
    /// `"to":"bob"` or `"group":"team"`, the field that names the other side in frames.
    pub fn field(&self) -> (&'static str, &str) {
        match self {
            Peer::User(u) => ("to", u),
            Peer::Group(g) => ("group", g),
        }
    }
}

/// A conversation: its history stream and the key of its read markers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conversation {
    /// Between two users, kept in sorted order so both see the same one.
    Direct(String, String),
    /// A group; `generation` changes when a group is deleted and created again, so new members of
    /// the new group never see the old one's history.
    Group { name: String, generation: String },
}

impl Conversation {
    pub fn direct(a: &str, b: &str) -> Self {
        if a <= b {
            Conversation::Direct(a.to_owned(), b.to_owned())
        } else {
            Conversation::Direct(b.to_owned(), a.to_owned())
        }
    }

    /// A stable key: `d\0alice\0bob` or `g\0team\0<generation>`.
    pub fn key(&self) -> String {
        match self {
            Conversation::Direct(a, b) => format!("d\0{a}\0{b}"),
            Conversation::Group { name, generation } => format!("g\0{name}\0{generation}"),
        }
    }

    /// The conversation's history stream.
    pub fn stream(&self) -> ChannelName {
        ChannelName::internal(CONVERSATION_KIND, &self.key())
    }
}

/// Key-value keys. Every part is NUL-separated; user ids and message ids cannot contain NUL
/// ([`validate_user`]) and neither can channel names, so a prefix scan never strays.
pub mod keys {
    /// A user known to chat (connected once, or registered by the backend).
    pub fn user(user: &str) -> String {
        format!("chat\0user\0{user}")
    }
    pub fn group(group: &str) -> String {
        format!("chat\0group\0{group}")
    }
    pub fn groups_prefix() -> String {
        "chat\0group\0".to_owned()
    }
    pub fn member(group: &str, user: &str) -> String {
        format!("chat\0member\0{group}\0{user}")
    }
    pub fn members_prefix(group: &str) -> String {
        format!("chat\0member\0{group}\0")
    }
    pub fn my_group(user: &str, group: &str) -> String {
        format!("chat\0mygroup\0{user}\0{group}")
    }
    pub fn my_groups_prefix(user: &str) -> String {
        format!("chat\0mygroup\0{user}\0")
    }
    /// `user` has a direct conversation with `peer`.
    pub fn dm_peer(user: &str, peer: &str) -> String {
        format!("chat\0dm\0{user}\0{peer}")
    }
    pub fn dm_peers_prefix(user: &str) -> String {
        format!("chat\0dm\0{user}\0")
    }
    /// A sent message, by id then sender: makes a retried send a no-op.
    pub fn sent(id: &str, from: &str) -> String {
        format!("chat\0sent\0{id}\0{from}")
    }
    pub fn sent_prefix(id: &str) -> String {
        format!("chat\0sent\0{id}\0")
    }
    /// Where a message sits in one recipient's inbox and in its conversation.
    pub fn received(user: &str, id: &str, from: &str) -> String {
        format!("chat\0rx\0{user}\0{id}\0{from}")
    }
    pub fn received_prefix(user: &str, id: &str) -> String {
        format!("chat\0rx\0{user}\0{id}\0")
    }
    /// A user's acknowledgement state ([`super::AckState`]).
    pub fn acks(user: &str) -> String {
        format!("chat\0ack\0{user}")
    }
    /// A member's read marker in a conversation.
    pub fn read_marker(conversation: &str, user: &str) -> String {
        format!("chat\0read\0{conversation}\0{user}")
    }

    /// The last NUL-separated part of a key (the user of a member key, ...).
    pub fn last_part(key: &str) -> &str {
        key.rsplit('\0').next().unwrap_or(key)
    }
}

/// A group's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// Who created it; empty when the backend did.
    pub created_by: String,
    /// Milliseconds since the Unix epoch.
    pub ts: u64,
    pub generation: String,
}

/// Where a received message sits: the value of [`keys::received`], written by the store with
/// the message as the offsets of its appends: `[conversation offset, inbox seq]`, or `[seq]` for
/// a system message to a user (which has no conversation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Offset in the recipient's inbox.
    pub seq: u64,
    /// Offset in the conversation's history (0 for a system message, which has none).
    pub offset: u64,
}

impl Received {
    pub fn parse(value: &[u8]) -> Option<Self> {
        match serde_json::from_slice::<Vec<u64>>(value).ok()?.as_slice() {
            [offset, seq] => Some(Self {
                seq: *seq,
                offset: *offset,
            }),
            [seq] => Some(Self {
                seq: *seq,
                offset: 0,
            }),
            _ => None,
        }
    }
}

/// What the value of [`keys::sent`] holds: enough to answer a retried send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentRecord {
    pub ts: u64,
    /// The conversation key ([`Conversation::key`]), empty for a system message to a user.
    pub conversation: String,
    pub recipients: u64,
}

/// What a client acknowledged in its inbox: everything up to `cursor`, and the offsets above it
/// in `acked`. Stored per user ([`keys::acks`]); a new inbox epoch (the inbox was lost) resets it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckState {
    pub epoch: String,
    pub cursor: u64,
    pub acked: BTreeSet<u64>,
}

impl AckState {
    pub fn new(epoch: &str) -> Self {
        Self {
            epoch: epoch.to_owned(),
            cursor: 0,
            acked: BTreeSet::new(),
        }
    }

    pub fn is_acked(&self, seq: u64) -> bool {
        seq <= self.cursor || self.acked.contains(&seq)
    }

    /// Records an acknowledgement of `seq` (which the caller checked is in the inbox). Returns
    /// `false` for a duplicate, so it triggers nothing twice.
    pub fn ack(&mut self, seq: u64) -> bool {
        if self.is_acked(seq) {
            return false;
        }
        self.acked.insert(seq);
        self.compact();
        true
    }

    /// Entries before `first_kept` are gone from the inbox (trimmed by its bounds): nothing there
    /// is waiting any more. Returns how many unacknowledged entries that dropped.
    pub fn skip_to(&mut self, first_kept: u64) -> u64 {
        let last_gone = first_kept.saturating_sub(1);
        if last_gone <= self.cursor {
            return 0;
        }
        let acked_gone = self.acked.range(..=last_gone).count() as u64;
        let dropped = last_gone - self.cursor - acked_gone;
        self.acked = self.acked.split_off(&first_kept);
        self.cursor = last_gone;
        self.compact();
        dropped
    }

    fn compact(&mut self) {
        while self.acked.first() == Some(&(self.cursor + 1)) {
            self.acked.pop_first();
            self.cursor += 1;
        }
    }
}

/// An inbox entry as the server reads it back (the payload of an inbox append).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct InboxEntry {
    /// `"message"` or `"receipt"`.
    pub push: String,
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
}

/// Receipt statuses beyond `accepted` (which is the reply to the send itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptStatus {
    Delivered,
    Read,
}

impl ReceiptStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReceiptStatus::Delivered => "delivered",
            ReceiptStatus::Read => "read",
        }
    }
}

/// The stored form of a message: `{"push":"message","id":..,"from":..,"to"|"group":..,
/// "data":..,"ts":..}`. The same bytes go to the conversation's history and to each inbox; the
/// inbox push adds its `seq`, history adds its `offset` ([`with_number`]).
pub fn message_entry(id: &str, from: &str, peer: &Peer, data: &Payload, ts: u64) -> Payload {
    let (field, name) = peer.field();
    Payload::from_trusted(format!(
        "{{\"push\":\"message\",\"id\":{},\"from\":{},\"{field}\":{},\"data\":{},\"ts\":{ts}}}",
        json_string(id),
        json_string(from),
        json_string(name),
        data.as_str()
    ))
}

/// A receipt for the sender of message `id`: `by` acknowledged or read it.
pub fn receipt_entry(status: ReceiptStatus, id: &str, by: &str, peer: &Peer, ts: u64) -> Payload {
    let (field, name) = peer.field();
    Payload::from_trusted(format!(
        "{{\"push\":\"receipt\",\"status\":\"{}\",\"id\":{},\"by\":{},\"{field}\":{},\"ts\":{ts}}}",
        status.as_str(),
        json_string(id),
        json_string(by),
        json_string(name),
    ))
}

/// `{"<name>":N,` followed by the rest of the object `entry`: how a stored entry gets its `seq`
/// (inbox push) or `offset` (history page) without being parsed again.
pub fn with_number(name: &str, number: u64, entry: &str) -> String {
    let rest = entry.strip_prefix('{').unwrap_or(entry);
    let mut out = String::with_capacity(entry.len() + name.len() + 24);
    out.push_str("{\"");
    out.push_str(name);
    out.push_str("\":");
    out.push_str(&number.to_string());
    if rest != "}" {
        out.push(',');
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names() {
        assert!(validate_user("alice").is_ok());
        assert!(validate_user("").is_err());
        assert!(validate_user("a\0b").is_err());
        assert!(validate_user(&"x".repeat(256)).is_err());
        assert!(validate_message_id(&"x".repeat(128)).is_ok());
        assert!(validate_message_id(&"x".repeat(129)).is_err());
        assert!(is_inbox(inbox("bob").as_str()));
        assert!(!is_inbox("inbox:bob"));
        assert!(!is_inbox(ChannelName::internal("inboxx", "b").as_str()));
        assert_eq!(
            Conversation::direct("bob", "alice"),
            Conversation::direct("alice", "bob")
        );
        assert_eq!(keys::last_part(&keys::member("g", "bob")), "bob");
        assert_eq!(
            Received::parse(b"[4,9]"),
            Some(Received { seq: 9, offset: 4 })
        );
        assert_eq!(
            Received::parse(b"[9]"),
            Some(Received { seq: 9, offset: 0 })
        );
        assert_eq!(Received::parse(b"{}"), None);
    }

    #[test]
    fn entries_are_json_with_their_number_spliced_in() {
        let data = Payload::from_json_text("{\"text\":\"hi\"}").unwrap();
        let entry = message_entry("m1", "alice", &Peer::User("bob".into()), &data, 7);
        let pushed = with_number("seq", 3, entry.as_str());
        let value: serde_json::Value = serde_json::from_str(&pushed).unwrap();
        assert_eq!(value["seq"], 3);
        assert_eq!(value["to"], "bob");
        assert_eq!(value["data"]["text"], "hi");
        let parsed: InboxEntry = serde_json::from_str(entry.as_str()).unwrap();
        assert_eq!(parsed.from, "alice");
        let receipt = receipt_entry(
            ReceiptStatus::Read,
            "m1",
            "bob",
            &Peer::Group("g".into()),
            9,
        );
        let value: serde_json::Value = serde_json::from_str(receipt.as_str()).unwrap();
        assert_eq!(value["status"], "read");
        assert_eq!(value["group"], "g");
        assert_eq!(with_number("seq", 1, "{}"), "{\"seq\":1}");
    }

    #[test]
    fn acks_compact_and_ignore_duplicates() {
        let mut state = AckState::new("e");
        assert!(state.ack(2));
        assert_eq!(state.cursor, 0);
        assert!(!state.ack(2));
        assert!(state.ack(1));
        assert_eq!((state.cursor, state.acked.len()), (2, 0));
        assert!(!state.ack(1));
        assert!(state.ack(5));
        // 3 and 4 were never acknowledged: trimming them away drops two.
        assert_eq!(state.skip_to(6), 2);
        assert_eq!((state.cursor, state.acked.len()), (5, 0));
        assert_eq!(state.skip_to(3), 0);
    }

    proptest! {
        #[test]
        fn ack_state_matches_a_set(seqs in proptest::collection::vec(1u64..40, 0..60)) {
            let mut state = AckState::new("e");
            let mut seen = BTreeSet::new();
            for seq in seqs {
                prop_assert_eq!(state.ack(seq), seen.insert(seq));
                for probe in 1..41 {
                    prop_assert_eq!(state.is_acked(probe), seen.contains(&probe));
                }
                prop_assert!(state.acked.first().is_none_or(|&f| f > state.cursor + 1));
            }
        }
    }
}
