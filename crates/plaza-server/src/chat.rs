//! Chat over the store: direct messages, groups, per-user inboxes, receipts, read markers.
//!
//! Everything durable goes through [`Store::write`], so a message is in every recipient's inbox
//! (and its conversation's history) before the sender hears `accepted`, and an acknowledgement
//! and the `delivered` receipt it causes are stored together. Inboxes are internal streams: the
//! store's listener (the hub) pushes each new entry to the user's connected sessions, which
//! subscribe to their inbox at connect. Keys and entry formats are in [`plaza_core::chat`]; this
//! module is the only place that reads or writes them, and protocol adapters call it rather than
//! the store.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use plaza_broker::Broker;
use plaza_core::chat::{
    self, AckState, Conversation, GroupRecord, InboxEntry, Peer, ReceiptStatus, Received,
    SentRecord, keys,
};
use plaza_core::{ChannelName, ErrorCode, InboxInfo, Payload, Position, ReplyError, json_string};
use plaza_store::{
    KvEntries, Store, StoreError, StreamAppend, StreamOptions, WriteBatch, WriteOutcome,
};
use serde::{Deserialize, Serialize};

use crate::hub::Hub;

mod undelivered;

use undelivered::{Watched, Webhook};

/// `[chat]` in the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatConfig {
    /// Whether chat methods are served and inboxes attached at connect.
    pub enabled: bool,
    /// Entries kept per inbox; older ones are dropped (and reported at the next connect).
    pub inbox_size: u64,
    /// Seconds an inbox entry is kept; 0 keeps it until `inbox_size` pushes it out.
    pub inbox_ttl_secs: u64,
    /// Messages kept per conversation for `chat_history` and unread counts.
    pub history_size: u64,
    /// Seconds a conversation message is kept; 0 keeps it until `history_size` pushes it out.
    pub history_ttl_secs: u64,
    /// Largest message `data`, in bytes.
    pub max_message_size: usize,
    pub max_group_members: usize,
    pub max_groups_per_user: usize,
    /// Unacknowledged inbox entries pushed to a connection before it acknowledges some.
    pub window: usize,
    /// Whether clients may list every group (`groups` with `all`).
    pub list_all_groups: bool,
    /// POSTed `{"event":"undelivered","id","from","recipient","to"|"group","ts"}` when a message
    /// is still unacknowledged by a recipient `undelivered_after_secs` after it was accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub undelivered_webhook_url: Option<String>,
    pub undelivered_after_secs: u64,
    /// Time allowed for one webhook call (connect to last byte).
    pub webhook_timeout_ms: u64,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            inbox_size: 10_000,
            inbox_ttl_secs: 7 * 24 * 3600,
            history_size: 1000,
            history_ttl_secs: 0,
            max_message_size: 16 * 1024,
            max_group_members: 1000,
            max_groups_per_user: 1000,
            window: 1000,
            list_all_groups: false,
            undelivered_webhook_url: None,
            undelivered_after_secs: 60,
            webhook_timeout_ms: 5000,
        }
    }
}

impl ChatConfig {
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("inbox_size", self.inbox_size as usize),
            ("history_size", self.history_size as usize),
            ("max_message_size", self.max_message_size),
            ("max_group_members", self.max_group_members),
            ("max_groups_per_user", self.max_groups_per_user),
            ("window", self.window),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("chat.{name} must be at least 1"));
            }
        }
        self.webhook_url()?;
        if self.undelivered_after_secs == 0 || self.webhook_timeout_ms == 0 {
            return Err(
                "chat.undelivered_after_secs and chat.webhook_timeout_ms must be at least 1".into(),
            );
        }
        Ok(())
    }

    /// The parsed `undelivered_webhook_url`, when set: an `http://` URL with a host.
    fn webhook_url(&self) -> Result<Option<hyper::http::Uri>, String> {
        let Some(url) = &self.undelivered_webhook_url else {
            return Ok(None);
        };
        let uri: hyper::http::Uri = url
            .parse()
            .map_err(|e| format!("chat.undelivered_webhook_url '{url}' is not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none_or(str::is_empty) {
            return Err(format!(
                "chat.undelivered_webhook_url '{url}' must be an http:// URL with a host"
            ));
        }
        Ok(Some(uri))
    }

    fn inbox_options(&self) -> StreamOptions {
        StreamOptions {
            max_len: Some(self.inbox_size),
            ttl: seconds(self.inbox_ttl_secs),
        }
    }

    fn history_options(&self) -> StreamOptions {
        StreamOptions {
            max_len: Some(self.history_size),
            ttl: seconds(self.history_ttl_secs),
        }
    }
}

fn seconds(secs: u64) -> Option<Duration> {
    (secs > 0).then(|| Duration::from_secs(secs))
}

/// A send queued to the store: resolves once it is durable.
pub type PendingSend = plaza_store::BoxFuture<'static, Result<Accepted, ReplyError>>;

/// Most entries read from one conversation for unread counts or one history page.
pub const MAX_HISTORY_PAGE: usize = 100;

/// What `send` answers: the `accepted` receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub id: String,
    pub ts: u64,
    pub recipients: u64,
    /// A retry of a message already stored: nothing was stored again.
    pub duplicate: bool,
}

/// A slice of a user's inbox for one connection: what to push, and where the inbox stands.
#[derive(Debug, Clone)]
pub struct Backlog {
    /// `(seq, entry)`, unacknowledged, oldest first.
    pub entries: Vec<(u64, Payload)>,
    /// The inbox's position when read.
    pub top: Position,
    /// Entries after the last one of `entries` remain unread from the store: fetch them with
    /// [`Chat::backlog_after`] before letting live entries through.
    pub more: bool,
    pub dropped: u64,
    pub reset: bool,
}

impl Backlog {
    pub fn info(&self) -> InboxInfo {
        InboxInfo {
            pending: self.entries.len(),
            dropped: self.dropped,
            reset: self.reset,
        }
    }

    /// The last seq this slice covers.
    pub fn last(&self) -> u64 {
        if self.more {
            self.entries.last().map_or(0, |(seq, _)| *seq)
        } else {
            self.top.offset
        }
    }
}

pub struct Chat {
    pub config: ChatConfig,
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    /// Carries ephemeral pushes (typing, member events) to the user's connections on every node.
    broker: Arc<dyn Broker>,
    /// One lock per user with acknowledgement work in progress, so two connections of one user
    /// acknowledging at once do not overwrite each other's state.
    ack_locks: DashMap<Box<str>, Arc<tokio::sync::Mutex<()>>>,
    /// Users whose record is known to be stored, to skip the write at each connect.
    known: DashMap<Box<str>, ()>,
    /// Set by [`Chat::start_webhook`] when a webhook is configured.
    webhook: OnceLock<Webhook>,
}

fn internal(e: StoreError) -> ReplyError {
    ReplyError::new(ErrorCode::Internal, e.to_string())
}

fn corrupt(key: &str, e: serde_json::Error) -> ReplyError {
    tracing::error!(key = %key.replace('\0', "/"), error = %e, "corrupt chat record");
    ReplyError::new(ErrorCode::Internal, "a stored chat record is unreadable")
}

fn not_found(what: String) -> ReplyError {
    ReplyError::new(ErrorCode::NotFound, what)
}

fn denied(what: String) -> ReplyError {
    ReplyError::new(ErrorCode::PermissionDenied, what)
}

fn bad(what: impl Into<String>) -> ReplyError {
    ReplyError::new(ErrorCode::BadRequest, what)
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A message id the server makes: 128 random bits in hex.
fn new_message_id() -> Result<String, ReplyError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| ReplyError::new(ErrorCode::Internal, format!("no random bytes: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn user_checked(user: &str) -> Result<(), ReplyError> {
    chat::validate_user(user).map_err(|e| bad(e.to_string()))
}

impl Chat {
    pub fn new(
        config: ChatConfig,
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        broker: Arc<dyn Broker>,
    ) -> Self {
        Self {
            config,
            store,
            broker,
            hub,
            ack_locks: DashMap::new(),
            known: DashMap::new(),
            webhook: OnceLock::new(),
        }
    }

    /// Starts watching for undelivered messages when a webhook is configured. Needs a runtime.
    pub fn start_webhook(&self) {
        let Ok(Some(url)) = self.config.webhook_url() else {
            return;
        };
        let after = Duration::from_secs(self.config.undelivered_after_secs);
        let timeout = Duration::from_millis(self.config.webhook_timeout_ms);
        tracing::info!(url = %url, after_secs = after.as_secs(), "undelivered-message webhook on");
        let _ = self
            .webhook
            .set(Webhook::start(url, after, timeout, Arc::clone(&self.store)));
    }

    // ----- users -----

    /// Records that `user` exists, so others may message it. Called at connect and by the
    /// backend.
    pub async fn register_user(&self, user: &str) -> Result<(), ReplyError> {
        user_checked(user)?;
        if self.known.contains_key(user) {
            return Ok(());
        }
        let key = keys::user(user);
        let record = to_json(&serde_json::json!({ "ts": now_ms() }));
        let batch = WriteBatch {
            kv: vec![(key.clone(), Some(record))],
            unless_exists: Some(key),
            ..WriteBatch::default()
        };
        self.store.write(batch).await.map_err(internal)?;
        self.known.insert(user.into(), ());
        Ok(())
    }

    async fn user_exists(&self, user: &str) -> Result<bool, ReplyError> {
        if self.known.contains_key(user) {
            return Ok(true);
        }
        let found = self
            .store
            .kv_get(&keys::user(user))
            .await
            .map_err(internal)?
            .is_some();
        if found {
            self.known.insert(user.into(), ());
        }
        Ok(found)
    }

    /// Whether any connection of `user` has its inbox attached on this node.
    pub fn is_online(&self, user: &str) -> bool {
        self.hub.subscriber_count(chat::inbox(user).as_str()) > 0
    }

    /// Whether any connection of `user` has its inbox attached on any node.
    pub async fn is_online_anywhere(&self, user: &str) -> bool {
        if self.is_online(user) {
            return true;
        }
        let inbox = chat::inbox(user);
        match self.broker.presence_list(Arc::clone(inbox.as_arc())).await {
            Ok(shared) => shared.is_some_and(|clients| !clients.is_empty()),
            Err(e) => {
                tracing::warn!(user, error = %e, "online state unknown: the broker failed");
                false
            }
        }
    }

    /// Records (or, with `attached == false`, removes) a connection's inbox in the broker's
    /// shared presence, so other nodes see the user online.
    pub async fn share_inbox_presence(&self, user: &str, conn: plaza_core::ConnId, attached: bool) {
        let inbox = Arc::clone(chat::inbox(user).as_arc());
        let shared = if attached {
            let client = plaza_core::ClientInfo {
                user: user.to_owned(),
                client: conn,
                info: None,
            };
            self.broker.presence_add(inbox, client).await
        } else {
            self.broker.presence_remove(inbox, conn).await
        };
        if let Err(e) = shared {
            tracing::warn!(user, error = %e, "inbox presence not shared with the broker");
        }
    }

    /// Pushes an ephemeral frame to every connection of `user`, on every node.
    async fn push_to_user(&self, user: &str, frame: &str) {
        let inbox = Arc::clone(chat::inbox(user).as_arc());
        if let Err(e) = self.broker.publish_event(inbox, 0, frame.to_owned()).await {
            tracing::warn!(user, error = %e, "push to user not sent");
        }
    }

    // ----- groups -----

    async fn group_record(&self, group: &str) -> Result<Option<GroupRecord>, ReplyError> {
        let key = keys::group(group);
        match self.store.kv_get(&key).await.map_err(internal)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| corrupt(&key, e)),
        }
    }

    async fn existing_group(&self, group: &str) -> Result<GroupRecord, ReplyError> {
        self.group_record(group)
            .await?
            .ok_or_else(|| not_found(format!("no group '{group}'")))
    }

    pub async fn is_member(&self, group: &str, user: &str) -> Result<bool, ReplyError> {
        Ok(self
            .store
            .kv_get(&keys::member(group, user))
            .await
            .map_err(internal)?
            .is_some())
    }

    async fn scan(&self, prefix: &str, limit: usize) -> Result<KvEntries, ReplyError> {
        self.store.kv_scan(prefix, limit).await.map_err(internal)
    }

    /// A group's members, in id order.
    pub async fn member_ids(&self, group: &str) -> Result<Vec<String>, ReplyError> {
        let entries = self
            .scan(&keys::members_prefix(group), self.config.max_group_members)
            .await?;
        Ok(entries
            .iter()
            .map(|(k, _)| keys::last_part(k).to_owned())
            .collect())
    }

    /// Adds `user` to `group`, creating the group when it does not exist. Returns whether the
    /// group was created. The caller checked that `user` may join (namespace policy).
    pub async fn join(&self, group: &str, user: &str) -> Result<bool, ReplyError> {
        user_checked(user)?;
        if self.is_member(group, user).await? {
            return Err(ReplyError::new(
                ErrorCode::AlreadySubscribed,
                format!("'{user}' is already a member of '{group}'"),
            ));
        }
        let max_groups = self.config.max_groups_per_user;
        if self
            .scan(&keys::my_groups_prefix(user), max_groups)
            .await?
            .len()
            >= max_groups
        {
            return Err(ReplyError::new(
                ErrorCode::LimitExceeded,
                format!("a user may be in at most {max_groups} groups"),
            ));
        }
        let max_members = self.config.max_group_members;
        if self.member_ids(group).await?.len() >= max_members {
            return Err(ReplyError::new(
                ErrorCode::LimitExceeded,
                format!("a group may have at most {max_members} members"),
            ));
        }
        let mut batch = WriteBatch::default();
        let created = self.group_record(group).await?.is_none();
        if created {
            let record = GroupRecord {
                created_by: user.to_owned(),
                ts: now_ms(),
                generation: new_message_id()?,
            };
            batch.kv.push((keys::group(group), Some(to_json(&record))));
        }
        let member = keys::member(group, user);
        let value = to_json(&serde_json::json!({ "ts": now_ms() }));
        batch.kv.push((member.clone(), Some(value)));
        batch
            .kv
            .push((keys::my_group(user, group), Some(Vec::new())));
        batch.unless_exists = Some(member);
        if let WriteOutcome::Exists(_) = self.store.write(batch).await.map_err(internal)? {
            return Err(ReplyError::new(
                ErrorCode::AlreadySubscribed,
                format!("'{user}' is already a member of '{group}'"),
            ));
        }
        self.announce_member(group, user, "joined").await?;
        Ok(created)
    }

    /// Creates a group for the backend (`created_by` empty). Returns whether it was created.
    pub async fn create_group(&self, group: &str) -> Result<bool, ReplyError> {
        let key = keys::group(group);
        let record = GroupRecord {
            created_by: String::new(),
            ts: now_ms(),
            generation: new_message_id()?,
        };
        let batch = WriteBatch {
            kv: vec![(key.clone(), Some(to_json(&record)))],
            unless_exists: Some(key),
            ..WriteBatch::default()
        };
        let outcome = self.store.write(batch).await.map_err(internal)?;
        Ok(matches!(outcome, WriteOutcome::Written(_)))
    }

    pub async fn leave(&self, group: &str, user: &str) -> Result<(), ReplyError> {
        if !self.is_member(group, user).await? {
            return Err(ReplyError::new(
                ErrorCode::NotSubscribed,
                format!("'{user}' is not a member of '{group}'"),
            ));
        }
        let batch = WriteBatch {
            kv: vec![
                (keys::member(group, user), None),
                (keys::my_group(user, group), None),
            ],
            ..WriteBatch::default()
        };
        self.store.write(batch).await.map_err(internal)?;
        self.announce_member(group, user, "left").await?;
        // The one who left is told too: its other connections learn it is out.
        self.push_to_user(user, &member_event(group, user, "left"))
            .await;
        Ok(())
    }

    /// Deletes a group and its memberships. Its history is kept in the store until trimmed, but
    /// a group created again under the same name starts a new conversation.
    pub async fn delete_group(&self, group: &str) -> Result<(), ReplyError> {
        self.existing_group(group).await?;
        let members = self.member_ids(group).await?;
        let mut batch = WriteBatch::default();
        for user in &members {
            batch.kv.push((keys::member(group, user), None));
            batch.kv.push((keys::my_group(user, group), None));
        }
        batch.kv.push((keys::group(group), None));
        self.store.write(batch).await.map_err(internal)?;
        let frame = format!(
            "{{\"push\":\"group_deleted\",\"group\":{}}}",
            json_string(group)
        );
        for user in &members {
            self.push_to_user(user, &frame).await;
        }
        Ok(())
    }

    async fn announce_member(
        &self,
        group: &str,
        user: &str,
        event: &str,
    ) -> Result<(), ReplyError> {
        let frame = member_event(group, user, event);
        for member in self.member_ids(group).await? {
            if member != user {
                self.push_to_user(&member, &frame).await;
            }
        }
        Ok(())
    }

    /// Tells the members of `user`'s groups that it came online or went offline (its first
    /// inbox connection on this node opened, or its last closed).
    pub async fn announce_presence(&self, user: &str, online: bool) -> Result<(), ReplyError> {
        let event = if online { "online" } else { "offline" };
        for group in self.groups_of(user).await? {
            self.announce_member(&group, user, event).await?;
        }
        Ok(())
    }

    pub async fn groups_of(&self, user: &str) -> Result<Vec<String>, ReplyError> {
        let entries = self
            .scan(
                &keys::my_groups_prefix(user),
                self.config.max_groups_per_user,
            )
            .await?;
        Ok(entries
            .iter()
            .map(|(k, _)| keys::last_part(k).to_owned())
            .collect())
    }

    /// Every group, up to `limit`.
    pub async fn all_groups(&self, limit: usize) -> Result<Vec<String>, ReplyError> {
        let entries = self.scan(&keys::groups_prefix(), limit).await?;
        Ok(entries
            .iter()
            .map(|(k, _)| keys::last_part(k).to_owned())
            .collect())
    }

    /// `(user, online)` for each member.
    pub async fn members(&self, group: &str) -> Result<Vec<(String, bool)>, ReplyError> {
        self.existing_group(group).await?;
        let mut members = Vec::new();
        for user in self.member_ids(group).await? {
            let online = self.is_online_anywhere(&user).await;
            members.push((user, online));
        }
        Ok(members)
    }

    // ----- messages -----

    /// Resolves who receives a message from `from` (empty: the system) and in which
    /// conversation (none for a system message to a user).
    async fn route(
        &self,
        from: &str,
        to: &Peer,
        allow_self: bool,
    ) -> Result<(Vec<String>, Option<Conversation>), ReplyError> {
        match to {
            Peer::User(user) => {
                user_checked(user)?;
                if user == from && !allow_self {
                    return Err(bad("a direct message needs another user than yourself"));
                }
                if !self.user_exists(user).await? {
                    return Err(not_found(format!("no user '{user}'")));
                }
                let conversation = (!from.is_empty()).then(|| Conversation::direct(from, user));
                Ok((vec![user.clone()], conversation))
            }
            Peer::Group(group) => {
                let record = self.existing_group(group).await?;
                let members = self.member_ids(group).await?;
                if !from.is_empty() && !members.iter().any(|m| m == from) {
                    return Err(denied(format!("'{from}' is not a member of '{group}'")));
                }
                let recipients = members.into_iter().filter(|m| m != from).collect();
                let conversation = Conversation::Group {
                    name: group.clone(),
                    generation: record.generation,
                };
                Ok((recipients, Some(conversation)))
            }
        }
    }

    /// Stores a message in every recipient's inbox and its conversation's history, then
    /// answers `accepted`. `from` is the authenticated sender, or empty for the system. A retry
    /// with the same `id` from the same sender stores nothing and answers the first result.
    pub async fn send(
        &self,
        from: &str,
        to: &Peer,
        id: Option<String>,
        data: Payload,
    ) -> Result<Accepted, ReplyError> {
        self.start_send(from, to, id, data, false).await?.await
    }

    /// [`Chat::send`], where `allow_self` lets a user message itself (Bachata routes allow it).
    pub async fn send_with(
        &self,
        from: &str,
        to: &Peer,
        id: Option<String>,
        data: Payload,
        allow_self: bool,
    ) -> Result<Accepted, ReplyError> {
        self.start_send(from, to, id, data, allow_self).await?.await
    }

    /// [`Chat::send`] in two steps: checks and routing now, then the write is queued to the store
    /// before this returns, and the future resolves once it is durable. Sends started one after
    /// another are stored in that order however their futures are awaited, so a connection can
    /// keep many in flight (and group commit can batch them) without reordering its messages.
    pub async fn start_send(
        &self,
        from: &str,
        to: &Peer,
        id: Option<String>,
        data: Payload,
        allow_self: bool,
    ) -> Result<PendingSend, ReplyError> {
        let max = self.config.max_message_size;
        if data.len() > max {
            return Err(ReplyError::new(
                ErrorCode::LimitExceeded,
                format!("message data is {} bytes; the limit is {max}", data.len()),
            ));
        }
        let id = match id {
            Some(id) => {
                chat::validate_message_id(&id).map_err(|e| bad(e.to_string()))?;
                id
            }
            None => new_message_id()?,
        };
        let (recipients, conversation) = self.route(from, to, allow_self).await?;
        let ts = now_ms();
        let entry = chat::message_entry(&id, from, to, &data, ts);
        let sent_key = keys::sent(&id, from);
        let record = SentRecord {
            ts,
            conversation: conversation
                .as_ref()
                .map(Conversation::key)
                .unwrap_or_default(),
            recipients: recipients.len() as u64,
        };
        let mut batch = WriteBatch {
            unless_exists: Some(sent_key.clone()),
            ..WriteBatch::default()
        };
        batch.kv.push((sent_key, Some(to_json(&record))));
        if let (Peer::User(user), Some(_)) = (to, &conversation) {
            batch.kv.push((keys::dm_peer(from, user), Some(Vec::new())));
            batch.kv.push((keys::dm_peer(user, from), Some(Vec::new())));
        }
        if let Some(conversation) = &conversation {
            batch.appends.push(StreamAppend {
                stream: conversation.stream(),
                payload: entry.clone(),
                options: self.config.history_options(),
            });
        }
        for user in &recipients {
            // Where the message lands in this inbox (and in the conversation), for
            // acknowledgements and read markers by id, stored with the message itself.
            let inbox_index = batch.appends.len();
            let indexes = match conversation {
                Some(_) => vec![0, inbox_index],
                None => vec![inbox_index],
            };
            batch
                .offsets
                .push((keys::received(user, &id, from), indexes));
            batch.appends.push(StreamAppend {
                stream: chat::inbox(user),
                payload: entry.clone(),
                options: self.config.inbox_options(),
            });
        }
        let written = self.store.write(batch);
        let count = recipients.len() as u64;
        let watch = self.webhook.get().cloned().map(|webhook| {
            let (field, name) = to.field();
            (webhook, recipients, from.to_owned(), field, name.to_owned())
        });
        Ok(Box::pin(async move {
            match written.await.map_err(internal)? {
                WriteOutcome::Written(_) => {
                    if let Some((webhook, recipients, from, field, name)) = watch {
                        let due = tokio::time::Instant::now() + webhook.after;
                        for recipient in recipients {
                            webhook.watch(Watched {
                                due,
                                recipient,
                                id: id.clone(),
                                from: from.clone(),
                                field,
                                name: name.clone(),
                                ts,
                            });
                        }
                    }
                    Ok(Accepted {
                        id,
                        ts,
                        recipients: count,
                        duplicate: false,
                    })
                }
                WriteOutcome::Exists(bytes) => {
                    let first: SentRecord =
                        serde_json::from_slice(&bytes).map_err(|e| corrupt("sent", e))?;
                    Ok(Accepted {
                        id,
                        ts: first.ts,
                        recipients: first.recipients,
                        duplicate: true,
                    })
                }
            }
        }))
    }

    /// An ephemeral notice to the other side, stored nowhere.
    pub async fn typing(&self, from: &str, to: &Peer) -> Result<(), ReplyError> {
        let (recipients, _) = self.route(from, to, false).await?;
        let (field, name) = to.field();
        let name = match to {
            Peer::User(_) => from,
            Peer::Group(_) => name,
        };
        let frame = format!(
            "{{\"push\":\"typing\",\"from\":{},\"{field}\":{}}}",
            json_string(from),
            json_string(name)
        );
        for user in recipients {
            self.push_to_user(&user, &frame).await;
        }
        Ok(())
    }

    fn ack_lock(&self, user: &str) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(
            self.ack_locks
                .entry(user.into())
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
                .value(),
        )
    }

    /// Forgets locks nobody holds. Called from the maintenance timer.
    pub fn prune_locks(&self) {
        self.ack_locks.retain(|_, lock| Arc::strong_count(lock) > 1);
    }

    async fn ack_state(&self, user: &str) -> Result<AckState, ReplyError> {
        let key = keys::acks(user);
        match self.store.kv_get(&key).await.map_err(internal)? {
            None => Ok(AckState::default()),
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| corrupt(&key, e)),
        }
    }

    /// Finds the inbox places of message `id` (from `from`, or any sender) for `user`. Refuses
    /// a message that exists but was not sent to `user`; an unknown id finds nothing.
    async fn received(
        &self,
        user: &str,
        id: &str,
        from: Option<&str>,
    ) -> Result<Vec<(String, Received)>, ReplyError> {
        let prefix = keys::received_prefix(user, id);
        let entries = self.scan(&prefix, 64).await?;
        let mut found = Vec::new();
        for (key, value) in entries {
            let sender = &key[prefix.len()..];
            if from.is_some_and(|f| f != sender) {
                continue;
            }
            let received = Received::parse(&value).ok_or_else(|| {
                tracing::error!(key = %key.replace('\0', "/"), "corrupt chat record");
                ReplyError::new(ErrorCode::Internal, "a stored chat record is unreadable")
            })?;
            found.push((sender.to_owned(), received));
        }
        if found.is_empty() {
            let sent = self.scan(&keys::sent_prefix(id), 64).await?;
            let exists = sent
                .iter()
                .any(|(k, _)| from.is_none_or(|f| keys::last_part(k) == f));
            let own = sent.iter().any(|(k, _)| keys::last_part(k) == user);
            if exists && !own {
                return Err(denied(format!("message '{id}' was not sent to you")));
            }
        }
        Ok(found)
    }

    /// Acknowledges inbox entries by seq. Each message acknowledged for the first time sends a
    /// `delivered` receipt to its sender. Unknown or repeated seqs are no-ops. Returns how many
    /// entries were newly acknowledged.
    pub async fn ack_seqs(&self, user: &str, seqs: &[u64]) -> Result<usize, ReplyError> {
        let lock = self.ack_lock(user);
        let _guard = lock.lock().await;
        let inbox = chat::inbox(user);
        let Some(top) = self.store.top(&inbox).await.map_err(internal)? else {
            return Ok(0);
        };
        let mut state = self.ack_state(user).await?;
        if state.epoch != top.epoch {
            state = AckState::new(&top.epoch);
        }
        let mut batch = WriteBatch::default();
        let mut acked = 0;
        for &seq in seqs {
            if seq == 0 || seq > top.offset || !state.ack(seq) {
                continue;
            }
            acked += 1;
            let entry = self.inbox_entry(&inbox, &top.epoch, seq).await?;
            if let Some(entry) = entry.filter(|e| e.push == "message" && !e.from.is_empty()) {
                let peer = receipt_peer(&entry, user);
                batch.appends.push(StreamAppend {
                    stream: chat::inbox(&entry.from),
                    payload: chat::receipt_entry(
                        ReceiptStatus::Delivered,
                        &entry.id,
                        user,
                        &peer,
                        now_ms(),
                    ),
                    options: self.config.inbox_options(),
                });
            }
        }
        if acked > 0 {
            batch.kv.push((keys::acks(user), Some(to_json(&state))));
            self.store.write(batch).await.map_err(internal)?;
        }
        Ok(acked)
    }

    /// Acknowledges message `id` (from `from`, when given) in `user`'s inbox.
    pub async fn ack_id(
        &self,
        user: &str,
        id: &str,
        from: Option<&str>,
    ) -> Result<usize, ReplyError> {
        let seqs: Vec<u64> = self
            .received(user, id, from)
            .await?
            .iter()
            .map(|(_, r)| r.seq)
            .collect();
        self.ack_seqs(user, &seqs).await
    }

    async fn inbox_entry(
        &self,
        inbox: &ChannelName,
        epoch: &str,
        seq: u64,
    ) -> Result<Option<InboxEntry>, ReplyError> {
        let since = Position {
            epoch: epoch.to_owned(),
            offset: seq - 1,
        };
        let read = self
            .store
            .read(inbox, Some(since), 1)
            .await
            .map_err(internal)?;
        Ok(read
            .publications
            .first()
            .filter(|(offset, _)| *offset == seq)
            .and_then(|(_, data)| serde_json::from_str(data.as_str()).ok()))
    }

    /// Marks message `id` read: `user`'s read marker in its conversation moves up to it, and its
    /// sender gets a `read` receipt. Returns how many markers moved (0 for a repeat).
    pub async fn read(
        &self,
        user: &str,
        id: &str,
        from: Option<&str>,
    ) -> Result<usize, ReplyError> {
        let found = self.received(user, id, from).await?;
        let mut moved = 0;
        for (sender, received) in found {
            // A system message belongs to no conversation and has nobody to tell.
            if sender.is_empty() || received.offset == 0 {
                continue;
            }
            let Some(record) = self.sent_record(id, &sender).await? else {
                continue;
            };
            let conversation = &record.conversation;
            if self
                .advance_marker(user, id, &sender, conversation, received.offset)
                .await?
            {
                moved += 1;
            }
        }
        Ok(moved)
    }

    async fn sent_record(&self, id: &str, from: &str) -> Result<Option<SentRecord>, ReplyError> {
        let key = keys::sent(id, from);
        match self.store.kv_get(&key).await.map_err(internal)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| corrupt(&key, e)),
        }
    }

    async fn advance_marker(
        &self,
        user: &str,
        id: &str,
        sender: &str,
        conversation: &str,
        offset: u64,
    ) -> Result<bool, ReplyError> {
        let lock = self.ack_lock(user);
        let _guard = lock.lock().await;
        let key = keys::read_marker(conversation, user);
        let current = self.marker(&key).await?;
        if offset <= current {
            return Ok(false);
        }
        let peer = match conversation.split('\0').collect::<Vec<_>>().as_slice() {
            ["g", name, _] => Peer::Group((*name).to_owned()),
            _ => Peer::User(user.to_owned()),
        };
        let batch = WriteBatch {
            appends: vec![StreamAppend {
                stream: chat::inbox(sender),
                payload: chat::receipt_entry(ReceiptStatus::Read, id, user, &peer, now_ms()),
                options: self.config.inbox_options(),
            }],
            kv: vec![(key, Some(offset.to_string().into_bytes()))],
            ..WriteBatch::default()
        };
        self.store.write(batch).await.map_err(internal)?;
        Ok(true)
    }

    async fn marker(&self, key: &str) -> Result<u64, ReplyError> {
        Ok(self
            .store
            .kv_get(key)
            .await
            .map_err(internal)?
            .and_then(|v| String::from_utf8(v).ok()?.parse().ok())
            .unwrap_or(0))
    }

    // ----- history and unread -----

    /// The conversation `user` has with `with`; for a group, `user` must be a member unless
    /// `as_backend`.
    pub async fn conversation(
        &self,
        user: &str,
        with: &Peer,
        as_backend: bool,
    ) -> Result<Conversation, ReplyError> {
        match with {
            Peer::User(peer) => {
                user_checked(peer)?;
                Ok(Conversation::direct(user, peer))
            }
            Peer::Group(group) => {
                let record = self.existing_group(group).await?;
                if !as_backend && !self.is_member(group, user).await? {
                    return Err(denied(format!("'{user}' is not a member of '{group}'")));
                }
                Ok(Conversation::Group {
                    name: group.clone(),
                    generation: record.generation,
                })
            }
        }
    }

    /// A page of history: `{"epoch", "messages": [{"offset", ...}], "more"}`, oldest first.
    pub async fn history(
        &self,
        conversation: &Conversation,
        before: Option<u64>,
        limit: Option<usize>,
    ) -> Result<Payload, ReplyError> {
        let limit = limit.unwrap_or(50).clamp(1, MAX_HISTORY_PAGE);
        let stream = conversation.stream();
        let Some(top) = self.store.top(&stream).await.map_err(internal)? else {
            return Ok(Payload::from_trusted(
                "{\"epoch\":\"\",\"messages\":[],\"more\":false}".into(),
            ));
        };
        let read = match before {
            None => self.store.read(&stream, None, limit).await,
            Some(before) => {
                let end = before.min(top.offset + 1).saturating_sub(1);
                let start = end.saturating_sub(limit as u64);
                let since = Position {
                    epoch: top.epoch.clone(),
                    offset: start,
                };
                self.store
                    .read(&stream, Some(since), (end - start) as usize)
                    .await
            }
        }
        .map_err(internal)?;
        // Older messages may exist (or may have been trimmed: the next page is then empty).
        let more = read
            .publications
            .first()
            .is_some_and(|(offset, _)| *offset > 1);
        let messages: Vec<String> = read
            .publications
            .iter()
            .map(|(offset, data)| chat::with_number("offset", *offset, data.as_str()))
            .collect();
        Ok(Payload::from_trusted(format!(
            "{{\"epoch\":{},\"messages\":[{}],\"more\":{more}}}",
            json_string(&read.top.epoch),
            messages.join(",")
        )))
    }

    /// Unread messages per conversation of `user` (messages of others after its read marker).
    pub async fn unread(&self, user: &str) -> Result<Vec<(Peer, u64)>, ReplyError> {
        let mut conversations = Vec::new();
        for group in self.groups_of(user).await? {
            if let Ok(c) = self
                .conversation(user, &Peer::Group(group.clone()), true)
                .await
            {
                conversations.push((Peer::Group(group), c));
            }
        }
        let peers = self
            .scan(
                &keys::dm_peers_prefix(user),
                self.config.max_groups_per_user,
            )
            .await?;
        for (key, _) in peers {
            let peer = keys::last_part(&key).to_owned();
            let c = Conversation::direct(user, &peer);
            conversations.push((Peer::User(peer), c));
        }
        let mut counts = Vec::new();
        for (peer, conversation) in conversations {
            let marker = self
                .marker(&keys::read_marker(&conversation.key(), user))
                .await?;
            let stream = conversation.stream();
            let Some(top) = self.store.top(&stream).await.map_err(internal)? else {
                continue;
            };
            let since = Position {
                epoch: top.epoch,
                offset: marker,
            };
            let limit = self.config.history_size as usize;
            let read = self
                .store
                .read(&stream, Some(since), limit)
                .await
                .map_err(internal)?;
            let unread = read
                .publications
                .iter()
                .filter_map(|(_, data)| serde_json::from_str::<InboxEntry>(data.as_str()).ok())
                .filter(|e| e.from != user)
                .count() as u64;
            counts.push((peer, unread));
        }
        Ok(counts)
    }

    // ----- the inbox of a connection -----

    /// The first slice of `user`'s unacknowledged entries for a new connection, at most
    /// `window` entries and `max_bytes` of them. Reports entries the inbox's bounds dropped
    /// since they were pushed (once: the acknowledgement state skips past them).
    pub async fn backlog(&self, user: &str, max_bytes: usize) -> Result<Backlog, ReplyError> {
        let lock = self.ack_lock(user);
        let _guard = lock.lock().await;
        let inbox = chat::inbox(user);
        let mut state = self.ack_state(user).await?;
        let window = self.config.window;
        let since = Position {
            epoch: state.epoch.clone(),
            offset: state.cursor,
        };
        let mut read = self
            .store
            .read(&inbox, Some(since), window)
            .await
            .map_err(internal)?;
        let mut reset = false;
        let mut changed = false;
        if read.top.epoch != state.epoch {
            // A first inbox, or one that was lost and started again.
            reset = !state.epoch.is_empty();
            state = AckState::new(&read.top.epoch);
            changed = true;
            let since = Position {
                epoch: state.epoch.clone(),
                offset: 0,
            };
            read = self
                .store
                .read(&inbox, Some(since), window)
                .await
                .map_err(internal)?;
        }
        let first_kept = read
            .publications
            .first()
            .map_or(read.top.offset + 1, |(offset, _)| *offset);
        let dropped = state.skip_to(first_kept);
        if dropped > 0 || changed {
            let batch = WriteBatch {
                kv: vec![(keys::acks(user), Some(to_json(&state)))],
                ..WriteBatch::default()
            };
            self.store.write(batch).await.map_err(internal)?;
        }
        let mut backlog = self.slice(read.publications, read.top, &state, max_bytes);
        backlog.dropped = dropped;
        backlog.reset = reset;
        Ok(backlog)
    }

    /// The next slice after seq `after`, for a connection still catching up.
    pub async fn backlog_after(
        &self,
        user: &str,
        epoch: &str,
        after: u64,
        max_bytes: usize,
    ) -> Result<Backlog, ReplyError> {
        let inbox = chat::inbox(user);
        let state = self.ack_state(user).await?;
        let since = Position {
            epoch: epoch.to_owned(),
            offset: after,
        };
        let read = self
            .store
            .read(&inbox, Some(since), self.config.window)
            .await
            .map_err(internal)?;
        Ok(self.slice(read.publications, read.top, &state, max_bytes))
    }

    /// Keeps the unacknowledged entries that fit in `max_bytes`.
    fn slice(
        &self,
        publications: Vec<(u64, Payload)>,
        top: Position,
        state: &AckState,
        max_bytes: usize,
    ) -> Backlog {
        let mut more = publications
            .last()
            .is_some_and(|(offset, _)| *offset < top.offset);
        let mut entries = Vec::new();
        let mut bytes = 0;
        for (seq, data) in publications {
            if state.is_acked(seq) {
                continue;
            }
            bytes += data.len() + 16;
            if bytes > max_bytes && !entries.is_empty() {
                more = true;
                break;
            }
            entries.push((seq, data));
        }
        Backlog {
            entries,
            top,
            more,
            dropped: 0,
            reset: false,
        }
    }

    /// The acknowledgement cursor of `user`: every seq up to it is acknowledged.
    pub async fn ack_cursor(&self, user: &str) -> Result<u64, ReplyError> {
        Ok(self.ack_state(user).await?.cursor)
    }
}

/// Whether `user` acknowledged message `id` from `from` (or it left the inbox, or cannot be
/// found: nothing to report then).
async fn is_acknowledged(
    store: &dyn Store,
    user: &str,
    id: &str,
    from: &str,
) -> Result<bool, StoreError> {
    let Some(received) = store
        .kv_get(&keys::received(user, id, from))
        .await?
        .and_then(|v| Received::parse(&v))
    else {
        return Ok(true);
    };
    let Some(top) = store.top(&chat::inbox(user)).await? else {
        return Ok(true);
    };
    let state: AckState = store
        .kv_get(&keys::acks(user))
        .await?
        .and_then(|v| serde_json::from_slice(&v).ok())
        .unwrap_or_default();
    Ok(state.epoch == top.epoch && state.is_acked(received.seq))
}

/// The conversation a receipt about `entry` names, from its sender's side: the recipient for a
/// direct message, the group otherwise.
fn receipt_peer(entry: &InboxEntry, recipient: &str) -> Peer {
    match &entry.group {
        Some(group) => Peer::Group(group.clone()),
        None => Peer::User(entry.to.clone().unwrap_or_else(|| recipient.to_owned())),
    }
}

fn member_event(group: &str, user: &str, event: &str) -> String {
    format!(
        "{{\"push\":\"member\",\"event\":\"{event}\",\"group\":{},\"user\":{}}}",
        json_string(group),
        json_string(user)
    )
}
