//! High-templar compatibility: the WebSocket endpoint that `spine-high-templar` clients connect
//! to, the bootstrap call that asks the app which rooms they may join, and the triggers a
//! Django app sends with django-binder (RabbitMQ, or `POST /api/hightemplar/trigger`).
//!
//! Rooms are core channels on the hub: each room is the internal channel named after its
//! canonical JSON ([`ChannelName::internal`]), which no native client can address. A connection
//! is subscribed once per room however many requestIds it uses there; its [`RoomFrames`] encode
//! one publish frame per requestId. A trigger from RabbitMQ is delivered to this node's hub only,
//! since every node consumes the exchange with its own queue, as High-templar processes do; an
//! HTTP trigger goes through the broker like any publish.
//!
//! `status` counts are exact: a connection is counted from its hello until it is deregistered,
//! which happens before its close handshake completes.

pub mod bootstrap;
pub mod config;
mod ws;

#[cfg(feature = "amqp")]
mod amqp;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::ws::Utf8Bytes;
use axum::routing::get;
use dashmap::DashMap;
use plaza_core::{ChannelName, ConnId, ErrorCode, Payload, Publication, ReplyError};
use plaza_protocol::hightemplar::{self as proto, AllowedRoom, RequestId, Status, Trigger};

use crate::conn::ConnHandle;
use crate::hub::{Subscriber, SubscriptionFrames};
use crate::node::Node;
use bootstrap::Bootstrap;
pub use config::HighTemplarConfig;

/// The kind of the internal channels that hold High-templar rooms.
const ROOM_KIND: &str = "hightemplar";

/// This node's High-templar side.
pub struct HighTemplar {
    node: Arc<Node>,
    bootstrap: Bootstrap,
    idle_timeout: Option<Duration>,
    /// Authorized connections (what `status.open_connections` counts).
    connections: DashMap<ConnId, Arc<HtConn>>,
    /// Room channel → number of connections subscribed (`status.num_rooms` is its size).
    rooms: DashMap<Arc<str>, u32>,
    counters: Arc<Counters>,
    started: Instant,
    online_since: String,
}

/// The `status` counters that are not counts of connections or rooms.
#[derive(Default)]
struct Counters {
    rabbitmq_messages_received: AtomicU64,
    ws_messages_received: AtomicU64,
    ws_messages_send: AtomicU64,
    ws_messages_send_error: AtomicU64,
    ws_messages_send_queued: AtomicU64,
}

/// One subscription of a connection: a room and a requestId.
struct Sub {
    channel: Arc<str>,
    request_id: RequestId,
}

/// One authorized connection.
struct HtConn {
    conn: Arc<ConnHandle>,
    /// The connection's own id, sent with `non-json-message` and `message-type-not-allowed`.
    uuid: String,
    allowed: Vec<AllowedRoom>,
    state: Mutex<ConnState>,
    /// Milliseconds since [`HighTemplar::started`] of the last application frame.
    last_frame_ms: AtomicU64,
    /// Close with 1000 (High-templar's only close code) rather than a Plaza code.
    normal_close: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct ConnState {
    /// In subscription order: an unsubscribe removes the first one with its requestId.
    subs: Vec<Sub>,
    /// Room channel → the frames of this connection's subscriptions there.
    rooms: HashMap<Arc<str>, Arc<RoomFrames>>,
    /// Set when the connection is deregistered: nothing more is subscribed.
    gone: bool,
}

/// A connection's subscriptions in one room, as the hub sees them: one publish frame per
/// requestId.
struct RoomFrames {
    request_ids: Mutex<Vec<Arc<str>>>,
    counters: Arc<Counters>,
}

impl SubscriptionFrames for RoomFrames {
    fn offer(&self, conn: &ConnHandle, data: &Payload) -> u64 {
        let ids = self
            .request_ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut queued = 0;
        for id in ids.iter() {
            let frame = Utf8Bytes::from(proto::publish_frame(data.as_str(), id));
            if conn.push_text(frame).is_ok() {
                queued += 1;
            } else {
                self.counters.ws_messages_send_error.fetch_add(1, Relaxed);
            }
        }
        self.counters
            .ws_messages_send_queued
            .fetch_add(queued, Relaxed);
        queued
    }
}

impl HighTemplar {
    /// Sets up the endpoint, and starts the idle-timeout timer and (with `amqp_url`) the
    /// RabbitMQ consumer. Must run inside the runtime.
    pub fn start(config: &HighTemplarConfig, node: Arc<Node>) -> anyhow::Result<Arc<Self>> {
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid [hightemplar]: {e}"))?;
        let bootstrap =
            Bootstrap::new(config).map_err(|e| anyhow::anyhow!("hightemplar.headers: {e}"))?;
        let unix_micros = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        let ht = Arc::new(Self {
            node,
            bootstrap,
            idle_timeout: (config.idle_timeout_secs > 0)
                .then(|| Duration::from_secs(config.idle_timeout_secs)),
            connections: DashMap::new(),
            rooms: DashMap::new(),
            counters: Arc::default(),
            started: Instant::now(),
            online_since: proto::iso_datetime(unix_micros),
        });
        if let Some(idle) = ht.idle_timeout {
            tokio::spawn(idle_timer(Arc::downgrade(&ht), idle));
        }
        #[cfg(feature = "amqp")]
        if let Some(url) = &config.amqp_url {
            tokio::spawn(amqp::consume(
                Arc::downgrade(&ht),
                url.clone(),
                config.exchange.clone(),
                Duration::from_secs(config.amqp_retry_max_secs),
            ));
        }
        tracing::info!(
            paths = ?config.paths,
            api_url = %config.api_url,
            amqp = config.amqp_url.is_some(),
            "High-templar endpoint enabled"
        );
        Ok(ht)
    }

    /// The WebSocket routes, for the public listener.
    pub fn router<S: Clone + Send + Sync + 'static>(
        self: &Arc<Self>,
        paths: &[String],
    ) -> Router<S> {
        let mut router = Router::new();
        for path in paths {
            router = router.route(path, get(ws::upgrade));
        }
        router.with_state(Arc::clone(self))
    }

    /// The `status` reply.
    fn status(&self) -> Status {
        let c = &self.counters;
        Status {
            open_connections: self.connections.len() as u64,
            num_rooms: self.rooms.len() as u64,
            online_since: self.online_since.clone(),
            rabbitmq_messages_received: c.rabbitmq_messages_received.load(Relaxed),
            ws_messages_received: c.ws_messages_received.load(Relaxed),
            ws_messages_send: c.ws_messages_send.load(Relaxed),
            ws_messages_send_error: c.ws_messages_send_error.load(Relaxed),
            ws_messages_send_queued: c.ws_messages_send_queued.load(Relaxed),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Subscribes `c` to `room` under `request_id` (the room is already allowed). A repeated
    /// (requestId, room) pair is stored once.
    fn subscribe(&self, c: &HtConn, room: &plaza_core::Room, request_id: RequestId) {
        let channel = ChannelName::internal(ROOM_KIND, room.key());
        let channel = Arc::clone(channel.as_arc());
        let mut state = c.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.gone
            || state
                .subs
                .iter()
                .any(|s| s.channel == channel && s.request_id == request_id)
        {
            return;
        }
        let text = Arc::clone(&request_id.text);
        state.subs.push(Sub {
            channel: Arc::clone(&channel),
            request_id,
        });
        if let Some(frames) = state.rooms.get(&channel) {
            frames
                .request_ids
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(text);
            return;
        }
        let frames = Arc::new(RoomFrames {
            request_ids: Mutex::new(vec![text]),
            counters: Arc::clone(&self.counters),
        });
        state
            .rooms
            .insert(Arc::clone(&channel), Arc::clone(&frames));
        *self.rooms.entry(Arc::clone(&channel)).or_insert(0) += 1;
        self.node.hub.subscribe(
            &channel,
            Subscriber::with_frames(Arc::clone(&c.conn), frames),
        );
        if self.node.hub.subscriber_count(&channel) == 1 {
            // HTTP triggers reach other nodes' rooms through the broker. High-templar delivers
            // at most once, so the subscription is not waited for.
            let broker = Arc::clone(&self.node.broker);
            tokio::spawn(async move {
                if let Err(e) = broker.subscribe(channel).await {
                    tracing::warn!(error = %e, "room not subscribed at the broker");
                }
            });
        }
    }

    /// Removes the first subscription of `c` with `request_id`; `false` if there is none.
    fn unsubscribe(&self, c: &HtConn, request_id: &RequestId) -> bool {
        let mut state = c.state.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(i) = state.subs.iter().position(|s| s.request_id == *request_id) else {
            return false;
        };
        let sub = state.subs.remove(i);
        let still_there = state.subs.iter().any(|s| s.channel == sub.channel);
        if still_there {
            if let Some(frames) = state.rooms.get(&sub.channel) {
                let mut ids = frames
                    .request_ids
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if let Some(j) = ids.iter().position(|t| *t == sub.request_id.text) {
                    ids.remove(j);
                }
            }
        } else {
            state.rooms.remove(&sub.channel);
            self.leave_room(&sub.channel, c.conn.id);
        }
        true
    }

    fn leave_room(&self, channel: &Arc<str>, conn: ConnId) {
        self.node.hub.unsubscribe(channel, conn);
        self.rooms.remove_if_mut(channel, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
        if self.node.hub.subscriber_count(channel) == 0 {
            // The broker checks again that nobody rejoined before it lets go.
            let (broker, channel) = (Arc::clone(&self.node.broker), Arc::clone(channel));
            tokio::spawn(async move {
                if let Err(e) = broker.unsubscribe(channel).await {
                    tracing::warn!(error = %e, "room not unsubscribed at the broker");
                }
            });
        }
    }

    /// Counts `c` as open.
    fn register(&self, c: Arc<HtConn>) {
        self.connections.insert(c.conn.id, c);
    }

    /// Forgets `c` and its subscriptions. Idempotent; called as soon as the connection is known
    /// to be ending, before its close handshake completes, so `status` is exact.
    fn deregister(&self, c: &HtConn) {
        let rooms = {
            let mut state = c.state.lock().unwrap_or_else(PoisonError::into_inner);
            if state.gone {
                return;
            }
            state.gone = true;
            state.subs.clear();
            std::mem::take(&mut state.rooms)
        };
        for channel in rooms.keys() {
            self.leave_room(channel, c.conn.id);
        }
        self.connections.remove(&c.conn.id);
    }

    /// Delivers a trigger to this node's subscribers only (RabbitMQ: every node consumes the
    /// exchange itself). A room listed twice is delivered twice.
    #[cfg(feature = "amqp")]
    pub fn deliver_local(&self, trigger: &Trigger) {
        let Ok(data) = Payload::from_json_text(trigger.data.clone()) else {
            tracing::warn!("High-templar trigger data could not be re-encoded; dropped");
            return;
        };
        for room in &trigger.rooms {
            let channel = ChannelName::internal(ROOM_KIND, room.key());
            plaza_broker::PublicationSink::deliver(
                &*self.node.hub,
                &Publication {
                    channel,
                    data: data.clone(),
                    position: None,
                },
            );
        }
        self.node
            .hub
            .metrics
            .publications_total
            .fetch_add(trigger.rooms.len() as u64, Relaxed);
    }

    /// Delivers a trigger through the broker (the HTTP trigger: one node receives it, every
    /// node's subscribers get it).
    pub async fn trigger(&self, trigger: &Trigger) -> Result<(), ReplyError> {
        let data = Payload::from_json_text(trigger.data.clone())
            .map_err(|e| ReplyError::new(ErrorCode::BadRequest, e.to_string()))?;
        for room in &trigger.rooms {
            let channel = ChannelName::internal(ROOM_KIND, room.key());
            self.node
                .broker
                .publish(Publication {
                    channel,
                    data: data.clone(),
                    position: None,
                })
                .await
                .map_err(|e| ReplyError::new(ErrorCode::Internal, e.to_string()))?;
        }
        self.node
            .hub
            .metrics
            .publications_total
            .fetch_add(trigger.rooms.len() as u64, Relaxed);
        Ok(())
    }
}

/// One timer for every High-templar connection's idle timeout.
async fn idle_timer(ht: std::sync::Weak<HighTemplar>, idle: Duration) {
    let tick = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(ht) = ht.upgrade() else { return };
        let now = ht.now_ms();
        let expired: Vec<Arc<HtConn>> = ht
            .connections
            .iter()
            .filter(|c| now.saturating_sub(c.last_frame_ms.load(Relaxed)) >= idle_ms)
            .map(|c| Arc::clone(c.value()))
            .collect();
        for c in expired {
            tracing::debug!(conn = c.conn.id, "High-templar connection idle: closing");
            ht.deregister(&c);
            ws::close_normally(&c);
        }
    }
}

/// Counts a High-templar frame written to a socket.
fn count_sent(counters: &Counters) {
    counters.ws_messages_send.fetch_add(1, Relaxed);
}
