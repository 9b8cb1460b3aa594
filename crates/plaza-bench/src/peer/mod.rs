//! Peer adapters: how a subscriber opens a session and subscribes on one server's WebSocket
//! protocol, and how its pushed frames are scanned for benchmark payloads.
//!
//! - [`native`]: Plaza's native protocol,
//! - [`nats`]: NATS's text protocol over its WebSocket listener,
//! - [`socketio`]: Socket.IO v4 (Engine.IO 4) over a raw WebSocket,
//! - [`snorky`]: Snorky's service envelopes (`pubsub` service),
//! - [`hightemplar`]: High-templar's rooms.
//!
//! How each peer's publications are sent is in [`crate::publisher`]; [`Kind`] ties the two.

pub mod hightemplar;
pub mod native;
pub mod nats;
pub mod snorky;
pub mod socketio;

use crate::ws::WsConn;
use anyhow::Result;
use futures_util::future::BoxFuture;
use std::time::Duration;

/// One thing found in a received text frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item<'a> {
    /// A publication; the slice is its `data`, as the publisher wrote it.
    Publication(&'a [u8]),
    /// A reply to a request, or a control message of the protocol: not counted.
    Control,
    /// An error reply or an error push.
    Error,
    /// Not something this protocol sends.
    Malformed,
    /// A protocol-level keep-alive that must be answered with this message (NATS `PING`,
    /// Engine.IO ping `2`).
    Reply(&'static [u8]),
}

/// The servers the benchmark knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Plaza's native protocol; publications through the backend HTTP API.
    Plaza,
    /// nats-server's WebSocket listener; publications as `PUB` from a verbose connection.
    Nats,
    /// Socket.IO 4 (bench/peers/socketio-server.js); publications as acknowledged emits.
    Socketio,
    /// Snorky's `pubsub` service; publications through its backend HTTP handler.
    Snorky,
    /// High-templar; publications through RabbitMQ (exchange `hightemplar`, routing key `*`).
    Hightemplar,
}

impl Kind {
    /// The subscriber side of this server.
    pub fn subscriber(self) -> std::sync::Arc<dyn SubscriberPeer> {
        match self {
            Kind::Plaza => std::sync::Arc::new(native::Native),
            Kind::Nats => std::sync::Arc::new(nats::Nats),
            Kind::Socketio => std::sync::Arc::new(socketio::SocketIo),
            Kind::Snorky => std::sync::Arc::new(snorky::Snorky),
            Kind::Hightemplar => std::sync::Arc::new(hightemplar::HighTemplar),
        }
    }
}

/// The subscriber side of one server's protocol.
pub trait SubscriberPeer: Send + Sync + 'static {
    /// A short name for reports (`plaza-native`, `nats-ws`, ...).
    fn name(&self) -> &'static str;

    /// Opens the session on a fresh WebSocket and subscribes to `channel`; resolves once the
    /// server confirmed the subscription.
    fn subscribe<'a>(
        &'a self,
        ws: &'a mut WsConn,
        channel: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<()>>;

    /// Whether the server's messages are one byte stream cut anywhere into frames (NATS). Then
    /// [`Self::scan`] is given what earlier calls left unconsumed followed by the new frame.
    fn stream(&self) -> bool {
        false
    }

    /// Whether this protocol's frames are binary (NATS): both kinds are then scanned, and
    /// replies go out as binary frames.
    fn binary(&self) -> bool {
        false
    }

    /// Calls `f` for every item in one received message (not validated as UTF-8) and returns
    /// how many bytes it consumed: all of them, except for a [`Self::stream`] protocol whose
    /// last message is incomplete. This is the hot path: it must not allocate for
    /// publications.
    fn scan(&self, frame: &[u8], f: &mut dyn FnMut(Item<'_>)) -> usize;
}
