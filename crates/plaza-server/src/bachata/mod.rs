//! Bachata compatibility: the WebSocket endpoint (`/messages` by default) that Bachata 0.1
//! clients connect to, over Plaza's chat. There is no queue here: a Bachata channel is a chat
//! user, a data message is [`Chat::send_with`] with the client's `id` as the message id (so a
//! retried send is stored once) and `from` set by the server, a `200` is [`Chat::ack_id`], and the
//! `300` is the `delivered` receipt that acknowledgement stores in the sender's inbox.
//!
//! A connection subscribes to its channel's inbox with a parked subscriber whose
//! [`InboxFrames`] encoder turns inbox entries into Bachata frames
//! ([`plaza_protocol::bachata::encode_entry`]); the unacknowledged backlog is queued right after
//! `{"type": 1000}` and before any live entry, so a message not acknowledged before a disconnect
//! comes again first after the next 1000. Entries that need no client acknowledgement (the 300
//! notices, and in simple mode the messages themselves) are acknowledged once the writer has
//! written them to the socket; entries with nothing to send (read receipts, and in simple mode
//! every receipt) are acknowledged at once, so nothing piles up in an inbox.
//!
//! [`Chat::send_with`]: crate::chat::Chat::send_with
//! [`Chat::ack_id`]: crate::chat::Chat::ack_id

pub mod config;
mod ws;

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Acquire;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::ws::Utf8Bytes;
use axum::routing::get;
use plaza_core::{ErrorCode, Payload, ReplyError, chat::Peer};
use plaza_protocol::bachata::{self as proto, DataMessage, Encoded, Mode};
use tokio::sync::mpsc;

use crate::auth::app::{AppConnectDecision, AppConnectRequest, Forwarded};
use crate::auth::jwt::unix_now;
use crate::conn::ConnHandle;
use crate::hub::EntryEncoder;
use crate::node::Node;
pub use config::BachataConfig;
use config::{ModeConfig, Route};

/// This node's Bachata side.
pub struct Bachata {
    node: Arc<Node>,
    config: BachataConfig,
    mode: Mode,
}

/// Why a connection gets no channel.
#[derive(Debug)]
enum Refusal {
    /// Close 1000 with [`proto::NOT_AUTHORIZED`].
    NotAuthorized(String),
    /// The app could not be asked: close in Plaza's reconnect range.
    AppUnavailable(String),
}

/// Acknowledgement work for a connection's inbox task.
#[derive(Debug)]
enum Work {
    /// Inbox entries to acknowledge by seq (written, or nothing to write).
    Seqs(Vec<u64>),
    /// The client's `200` for a message id.
    Id(String),
}

/// A connection's inbox entries as Bachata frames.
struct InboxFrames {
    mode: Mode,
    /// Frames queued that are acknowledged once written: `(frame, seq)`. The frame is held, so
    /// its address identifies it until the writer has seen it.
    written_acks: Mutex<Vec<(Utf8Bytes, u64)>>,
    work: mpsc::UnboundedSender<Work>,
    /// Set while this connection sends to its own channel: live entries wait here so that the
    /// sender's 100 (queued once the message is stored) comes before the message itself.
    hold: Mutex<Option<Vec<Utf8Bytes>>>,
    /// Set while the backlog is sent in slices (the subscriber is parked): no holding then.
    catching_up: AtomicBool,
}

impl InboxFrames {
    /// Encodes entry `seq`; registers its acknowledgement as the mode asks.
    fn frame(&self, seq: u64, data: &Payload) -> Option<Utf8Bytes> {
        match proto::encode_entry(data.as_str(), self.mode) {
            Encoded::AwaitAck(frame) => Some(Utf8Bytes::from(frame)),
            Encoded::AckWhenWritten(frame) => {
                let frame = Utf8Bytes::from(frame);
                self.written_acks
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((frame.clone(), seq));
                Some(frame)
            }
            Encoded::Skip => {
                let _ = self.work.send(Work::Seqs(vec![seq]));
                None
            }
        }
    }

    /// The writer wrote these frames: acknowledge the ones waiting for it.
    fn written(&self, frames: &[usize]) {
        let mut seqs = Vec::new();
        {
            let mut waiting = self
                .written_acks
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if waiting.is_empty() {
                return;
            }
            waiting.retain(|(frame, seq)| {
                let hit = frames.contains(&(frame.as_str().as_ptr() as usize));
                if hit {
                    seqs.push(*seq);
                }
                !hit
            });
        }
        if !seqs.is_empty() {
            let _ = self.work.send(Work::Seqs(seqs));
        }
    }
}

impl EntryEncoder for InboxFrames {
    fn encode(&self, offset: Option<u64>, data: &Payload) -> Option<Utf8Bytes> {
        let frame = self.frame(offset.unwrap_or(0), data)?;
        let mut hold = self.hold.lock().unwrap_or_else(PoisonError::into_inner);
        match hold.as_mut() {
            Some(held) => {
                held.push(frame);
                None
            }
            None => Some(frame),
        }
    }
}

impl InboxFrames {
    /// Holds live entries back until [`InboxFrames::release`]. `false` when it cannot (the
    /// backlog is still being sent).
    fn hold(&self) -> bool {
        if self.catching_up.load(Acquire) {
            return false;
        }
        *self.hold.lock().unwrap_or_else(PoisonError::into_inner) = Some(Vec::new());
        true
    }

    /// Queues `first`, then the entries held meanwhile, and stops holding.
    fn release(&self, conn: &ConnHandle, first: Option<Utf8Bytes>) {
        let mut hold = self.hold.lock().unwrap_or_else(PoisonError::into_inner);
        for frame in first.into_iter().chain(hold.take().unwrap_or_default()) {
            let _ = conn.push_text(frame);
        }
    }
}

pub(crate) fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    // Tornado's get_argument: the last value, whitespace stripped.
    form_urlencoded::parse(query?.as_bytes())
        .filter(|(k, _)| k == name)
        .last()
        .map(|(_, v)| v.trim().to_owned())
}

impl Bachata {
    pub fn start(config: &BachataConfig, node: Arc<Node>) -> anyhow::Result<Arc<Self>> {
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid [bachata]: {e}"))?;
        if !node.chat.config.enabled {
            anyhow::bail!("[bachata] needs chat: set chat.enabled = true");
        }
        let mode = match config.mode {
            ModeConfig::Reliable => Mode::Reliable,
            ModeConfig::Simple => Mode::Simple,
        };
        tracing::info!(path = %config.path, mode = ?mode, query_channel = config.allow_query_channel, "Bachata endpoint enabled");
        if config.allow_query_channel {
            tracing::warn!(
                "bachata.allow_query_channel: clients choose their channel with ?channel= (trusted, as in the Bachata example)"
            );
        }
        Ok(Arc::new(Self {
            node,
            config: config.clone(),
            mode,
        }))
    }

    /// The WebSocket route, for the public listener.
    pub fn router<S: Clone + Send + Sync + 'static>(self: &Arc<Self>) -> Router<S> {
        Router::new()
            .route(&self.config.path, get(ws::upgrade))
            .with_state(Arc::clone(self))
    }

    /// The connection's channel: `?channel=` where allowed, else the user of `?token=`, else the
    /// app's answer.
    async fn identify(
        &self,
        query: Option<&str>,
        forwarded: &Forwarded,
        conn: u64,
    ) -> Result<String, Refusal> {
        let refuse = |m: &str| Err(Refusal::NotAuthorized(m.to_owned()));
        if self.config.allow_query_channel
            && let Some(channel) = query_param(query, "channel")
        {
            return self.checked(channel);
        }
        let auth = &self.node.auth;
        if let Some(token) = query_param(query, "token") {
            let Some(jwt) = &auth.jwt else {
                return refuse("this server accepts no connection tokens");
            };
            return match jwt.verify_connect(&token, unix_now()) {
                Ok(claims) => self.checked(claims.user),
                Err(e) => Err(Refusal::NotAuthorized(e.to_string())),
            };
        }
        if let Some(app) = auth.app.as_ref().filter(|a| a.has_connect()) {
            let client = conn.to_string();
            let request = AppConnectRequest {
                client: &client,
                protocol: "bachata",
                forwarded,
                data: None,
            };
            return match app.connect(request).await {
                Ok(AppConnectDecision::Allow { user, .. }) => self.checked(user),
                Ok(AppConnectDecision::Deny { reason }) => Err(Refusal::NotAuthorized(reason)),
                Err(e) => Err(Refusal::AppUnavailable(e.to_string())),
            };
        }
        refuse("no channel: no ?channel= (or not allowed), no token, no app")
    }

    fn checked(&self, channel: String) -> Result<String, Refusal> {
        match plaza_core::chat::validate_user(&channel) {
            Ok(()) => Ok(channel),
            Err(e) => Err(Refusal::NotAuthorized(format!("channel: {e}"))),
        }
    }

    /// Stores `message` from `channel` for its destination. `Ok(true)`: stored (or nothing to
    /// store: no routable destination), send the 100; `Err`: the store failed, no 100.
    async fn send(&self, channel: &str, message: &DataMessage) -> Result<(), ReplyError> {
        let node = &self.node;
        let Some(dest) = &message.dest else {
            return Ok(());
        };
        let peer = match self.config.route(&message.kind) {
            Route::Direct => {
                // Any channel may be written to, as in the reference: the user exists from now.
                if let Err(e) = node.chat.register_user(dest).await {
                    return self.undelivered(channel, message, e);
                }
                Peer::User(dest.clone())
            }
            Route::Group => match node.resolve_channel(dest) {
                Ok((group, _)) => Peer::Group(group.as_str().to_owned()),
                Err(e) => return self.undelivered(channel, message, e),
            },
        };
        let stored = match Payload::from_json_text(message.stored(channel)) {
            Ok(stored) => stored,
            Err(e) => {
                let e = ReplyError::new(ErrorCode::BadRequest, e.to_string());
                return self.undelivered(channel, message, e);
            }
        };
        match node
            .chat
            .send_with(channel, &peer, Some(message.id.clone()), stored, true)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => self.undelivered(channel, message, e),
        }
    }

    /// A message that cannot be delivered (unknown group, not a member, too large, ...): it still
    /// gets its 100, as in the reference, and the reason is logged and counted. A store failure
    /// gets no 100, so the client may retry.
    fn undelivered(
        &self,
        channel: &str,
        message: &DataMessage,
        e: ReplyError,
    ) -> Result<(), ReplyError> {
        self.node.hub.metrics.error(e.code);
        if e.code == ErrorCode::Internal {
            tracing::error!(channel, id = %message.id, error = %e, "Bachata message not stored");
            return Err(e);
        }
        tracing::warn!(channel, id = %message.id, dest = ?message.dest, error = %e, "Bachata message not delivered");
        Ok(())
    }
}
