//! Snorky compatibility: Snorky.js, the Python backend connector and the Django integration work
//! against Plaza unchanged. The wire format is `plaza_protocol::snorky`; this module routes each
//! RPC call to a service built on Plaza's own parts:
//!
//! - `pubsub` / `pubsub_backend`: hub channels named `ChannelName::internal("snorky", <channel's
//!   canonical JSON>)`, so native clients cannot address them; a publication's data is the whole
//!   Snorky frame, written once and handed verbatim to every subscriber.
//! - `datasync` / `datasync_backend`: the node's live views ([`crate::live`], dealers from
//!   `[[live.dealers]]`): `authorizeSubscription` is a grant under a Snorky-style token,
//!   `acquireSubscription` redeems it with Snorky's delta frames, `publishDeltas` routes through
//!   the same index as `POST /api/deltas`.
//! - `messaging`: participants by name, in a map of this node.
//! - `chat`: hub channels (`internal("snorky-chat", ..)`) with the core presence rule (a user
//!   joins with its first connection, leaves with its last); `cursors`: documents of this node.
//!   Both need an identity: the user of a connection token (`?token=` or the `token_cookie`
//!   cookie) or the app's answer (`auth.connect_url`); Snorky itself had none.
//!
//! `ws.rs` is the WebSocket endpoint, `backend.rs` the backend's `POST`.

mod backend;
mod chat;
pub mod config;
mod cursors;
mod datasync;
mod messaging;
mod pubsub;
mod ws;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::Utf8Bytes;
use axum::routing::get;
use dashmap::DashMap;
use plaza_core::live::SubId;
use plaza_core::{ChannelName, ConnId, ErrorCode, Payload, Publication};
use plaza_protocol::snorky::{self as proto, Call, Params};
use serde_json::value::RawValue;

pub use config::SnorkyConfig;

use crate::conn::ConnHandle;
use crate::hub::SubscriptionFrames;
use crate::node::Node;

/// What a call answers: the data (JSON text) or one of the protocol's error texts.
type Reply = Result<String, &'static str>;

/// Binds `params` to `names`; `Invalid params` when they do not fit.
fn bind<const N: usize>(
    params: Option<Params>,
    names: [&'static str; N],
) -> Result<[Box<RawValue>; N], &'static str> {
    params.ok_or(proto::INVALID_PARAMS)?.bind(names)
}

/// Hands a publication's data (a whole Snorky frame) to a subscriber as it is.
struct Verbatim;

impl SubscriptionFrames for Verbatim {
    fn offer(&self, conn: &ConnHandle, data: &Payload) -> u64 {
        u64::from(
            conn.push_text(Utf8Bytes::from(data.as_str().to_owned()))
                .is_ok(),
        )
    }
}

/// One WebSocket connection's Snorky state. Only its own reader task touches it.
pub(crate) struct Client {
    pub conn: Arc<ConnHandle>,
    /// The user behind the connection, if it authenticated.
    pub identity: Option<String>,
    /// PubSub channels by canonical key.
    pub channels: HashMap<String, ChannelName>,
    /// Acquired DataSync tokens and their live views.
    pub tokens: HashMap<String, Vec<SubId>>,
    /// Messaging names held.
    pub names: HashSet<String>,
    /// Chat channels joined, by canonical key: the hub channel and the channel's JSON.
    pub chats: HashMap<String, (ChannelName, String)>,
    /// Cursor documents joined, by canonical key.
    pub docs: HashSet<String>,
    /// Cursors by the canonical key of their private handle: the public handle and document key.
    pub cursors: HashMap<String, (u16, String)>,
}

impl Client {
    fn new(conn: Arc<ConnHandle>, identity: Option<String>) -> Self {
        Self {
            conn,
            identity,
            channels: HashMap::new(),
            tokens: HashMap::new(),
            names: HashSet::new(),
            chats: HashMap::new(),
            docs: HashSet::new(),
            cursors: HashMap::new(),
        }
    }

    fn push(&self, frame: String) {
        let _ = self.conn.push_text(Utf8Bytes::from(frame));
    }
}

pub struct Snorky {
    node: Arc<Node>,
    config: SnorkyConfig,
    /// Open WebSocket connections: for pings, messaging, chat read markers and cursors.
    clients: DashMap<ConnId, Arc<ConnHandle>>,
    /// `Verbatim`, shared by every subscription.
    verbatim: Arc<Verbatim>,
    /// `datasync`'s name, as live views frame it.
    datasync: Arc<str>,
    participants: DashMap<String, ConnId>,
    chats: DashMap<String, plaza_core::ChannelPresence>,
    cursors: Mutex<cursors::Documents>,
}

impl Snorky {
    /// Sets up the services and starts the ping timer. Must run inside the runtime.
    pub fn start(config: &SnorkyConfig, node: Arc<Node>) -> anyhow::Result<Arc<Self>> {
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid [snorky]: {e}"))?;
        tracing::info!(
            path = %config.path,
            backend_path = %config.backend_path,
            client_publish = config.client_publish,
            "Snorky endpoint enabled"
        );
        let snorky = Arc::new(Self {
            node,
            datasync: Arc::from(config.services.datasync.as_str()),
            config: config.clone(),
            clients: DashMap::new(),
            verbatim: Arc::new(Verbatim),
            participants: DashMap::new(),
            chats: DashMap::new(),
            cursors: Mutex::default(),
        });
        tokio::spawn(keepalive(
            Arc::downgrade(&snorky),
            config.ping_interval_secs,
        ));
        Ok(snorky)
    }

    /// The WebSocket route, for the public listener.
    pub fn router<S: Clone + Send + Sync + 'static>(self: &Arc<Self>) -> Router<S> {
        Router::new()
            .route(&self.config.path, get(ws::upgrade))
            .with_state(Arc::clone(self))
    }

    /// `POST {backend_path}`, for the backend listener.
    pub fn backend_router(self: &Arc<Self>, key: Arc<str>) -> Router {
        backend::router(Arc::clone(self), key)
    }

    /// Asks every connection to close (shutdown).
    pub fn close_all(&self, code: plaza_core::CloseCode) {
        for conn in self.clients.iter() {
            conn.close(code);
        }
    }

    /// Open WebSocket connections.
    pub fn connection_count(&self) -> usize {
        self.clients.len()
    }

    fn cursors(&self) -> std::sync::MutexGuard<'_, cursors::Documents> {
        self.cursors.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `frame` on connection `id`, if it is still open.
    fn push_to(&self, id: ConnId, frame: &Utf8Bytes) {
        let conn = self.clients.get(&id).map(|c| Arc::clone(c.value()));
        if let Some(conn) = conn {
            let _ = conn.push_text(frame.clone());
        }
    }

    /// Publishes a whole frame to a hub channel (through the broker, so every node's
    /// subscribers get it). With one node, the subscribers have it queued before this returns:
    /// Snorky sends the publisher's own notification before the response to its publish.
    async fn publish_frame(&self, channel: ChannelName, frame: String) -> Result<(), &'static str> {
        let publication = Publication {
            channel,
            data: Payload::from_trusted(frame),
            position: None,
        };
        self.node
            .broker
            .publish_delivered(publication)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "Snorky publish: broker failed");
                proto::INTERNAL_ERROR
            })?;
        self.node
            .hub
            .metrics
            .publications_total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Subscribes a connection to a hub channel whose publications are whole frames.
    async fn subscribe_frames(&self, conn: &Arc<ConnHandle>, channel: &ChannelName) {
        let key = Arc::clone(channel.as_arc());
        let subscriber = crate::hub::Subscriber::with_frames(
            Arc::clone(conn),
            Arc::clone(&self.verbatim) as Arc<dyn SubscriptionFrames>,
        );
        self.node.hub.subscribe(&key, subscriber);
        if self.node.hub.subscriber_count(&key) == 1
            && let Err(e) = self.node.broker.subscribe(key).await
        {
            tracing::warn!(error = %e, "Snorky subscribe: broker failed");
        }
    }

    async fn unsubscribe_frames(&self, conn: ConnId, channel: &ChannelName) {
        let hub = &self.node.hub;
        hub.unsubscribe(channel.as_str(), conn);
        if hub.subscriber_count(channel.as_str()) == 0
            && let Err(e) = self
                .node
                .broker
                .unsubscribe(Arc::clone(channel.as_arc()))
                .await
        {
            tracing::warn!(error = %e, "Snorky unsubscribe: broker failed");
        }
    }

    /// Handles one frame from a WebSocket client: the answer to queue, or `None` (ignored).
    async fn handle(&self, client: &mut Client, frame: &[u8]) -> Option<String> {
        let call = match proto::decode(frame) {
            Ok(call) => call,
            Err(why) => {
                self.node.hub.metrics.error(ErrorCode::BadRequest);
                tracing::debug!(conn = client.conn.id, reason = %why, "Snorky frame ignored");
                return None;
            }
        };
        let Call {
            service,
            call_id,
            command,
            params,
        } = call;
        let names = &self.config.services;
        let command = command.as_deref();
        let reply = if service.is_empty() {
            return None;
        } else if service == names.pubsub {
            self.pubsub(client, command, params).await
        } else if service == names.datasync {
            self.datasync(client, command, params)
        } else if service == names.messaging {
            self.messaging(client, command, params)
        } else if service == names.chat {
            self.chat(client, command, params).await
        } else if service == names.cursors {
            self.cursor_call(client, command, params)
        } else {
            // An unknown service gets no reply, as in the reference.
            tracing::debug!(conn = client.conn.id, service, "Snorky: unknown service");
            return None;
        };
        Some(self.answer(&service, call_id.as_deref(), reply))
    }

    /// Handles one backend request: always an answer (an unknown service or a malformed
    /// message is an error reply, never a request left hanging as in the reference).
    async fn handle_backend(&self, body: &[u8]) -> String {
        let call = match proto::decode(body) {
            Ok(call) => call,
            Err(why) => {
                self.node.hub.metrics.error(ErrorCode::BadRequest);
                return proto::error_without_service(&format!("Invalid message: {why}"));
            }
        };
        let names = &self.config.services;
        let command = call.command.as_deref();
        let reply = if call.service.is_empty() {
            Err(proto::UNKNOWN_SERVICE)
        } else if call.service == names.pubsub_backend {
            self.pubsub_backend(command, call.params).await
        } else if call.service == names.datasync_backend {
            self.datasync_backend(command, call.params)
        } else {
            Err(proto::UNKNOWN_SERVICE)
        };
        self.answer(&call.service, call.call_id.as_deref(), reply)
    }

    fn answer(&self, service: &str, call_id: Option<&RawValue>, reply: Reply) -> String {
        match reply {
            Ok(data) => proto::response(service, call_id, &data),
            Err(text) => {
                self.node.hub.metrics.error(ErrorCode::BadRequest);
                proto::error(service, call_id, text)
            }
        }
    }

    /// Everything a closing connection held: subscriptions, live views, names, chat
    /// memberships (with `left` presence), cursors (with `cursorRemoved`).
    async fn disconnected(&self, client: &mut Client) {
        let id = client.conn.id;
        for (_, channel) in std::mem::take(&mut client.channels) {
            self.unsubscribe_frames(id, &channel).await;
        }
        for (_, ids) in std::mem::take(&mut client.tokens) {
            for sub in ids {
                self.node.live.cancel(sub);
            }
        }
        for name in std::mem::take(&mut client.names) {
            self.participants.remove_if(&name, |_, owner| *owner == id);
        }
        let chats: Vec<String> = client.chats.keys().cloned().collect();
        for key in chats {
            self.leave_chat(client, &key).await;
        }
        let docs: Vec<String> = client.docs.iter().cloned().collect();
        for key in docs {
            self.leave_document(client, &key);
        }
    }
}

/// Ticks between two visits of a connection to free its idle queue buffer.
const RELEASE_EVERY: u64 = 10;

/// One timer for every Snorky connection: each gets an empty WebSocket ping once per
/// `every` seconds (0: never; connections spread over the interval by id), and the queue
/// buffer a connection kept after a burst is freed once it is quiet.
async fn keepalive(snorky: Weak<Snorky>, every: u64) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tick: u64 = 0;
    loop {
        ticker.tick().await;
        tick = tick.wrapping_add(1);
        let Some(snorky) = snorky.upgrade() else {
            return;
        };
        for conn in snorky.clients.iter() {
            if conn.is_closing() {
                continue;
            }
            if conn.id % RELEASE_EVERY == tick % RELEASE_EVERY {
                conn.release_idle_buffer();
            }
            if every > 0 && conn.id % every == tick % every {
                conn.push_ping();
            }
        }
    }
}

/// Microseconds since the Unix epoch, for chat timestamps.
fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}
