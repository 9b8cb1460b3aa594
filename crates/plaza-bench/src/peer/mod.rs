//! Peer adapters: how a subscriber opens a session and subscribes on one server's WebSocket
//! protocol, and how its pushed frames are scanned for benchmark payloads.
//!
//! Only Plaza's native protocol exists today ([`native`]). NATS WebSocket, Socket.IO, Snorky and
//! High-templar adapters implement [`SubscriberPeer`] in their own module; a peer whose
//! publications are not sent through Plaza's backend API brings its publisher too (see
//! [`crate::publisher`]).

pub mod native;

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

    /// Calls `f` for every item in one received text message (not validated as UTF-8). This is
    /// the hot path: it must not allocate for publications.
    fn scan(&self, frame: &[u8], f: &mut dyn FnMut(Item<'_>));
}
