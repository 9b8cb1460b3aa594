//! The hub: this node's connections and who listens where, and the fan-out of publications to
//! them.
//!
//! A publication is encoded once, and the same bytes go into each subscriber's queue.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use plaza_broker::PublicationSink;
use plaza_core::{CloseCode, ConnId, Publication, SubscriptionIndex};
use plaza_protocol::native;

use crate::conn::ConnHandle;
use crate::metrics::Metrics;

pub struct Hub {
    index: SubscriptionIndex<Arc<ConnHandle>>,
    connections: DashMap<ConnId, Arc<ConnHandle>>,
    pub metrics: Metrics,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            index: SubscriptionIndex::default(),
            connections: DashMap::new(),
            metrics: Metrics::default(),
        }
    }
}

impl Hub {
    pub fn register(&self, conn: Arc<ConnHandle>) {
        self.connections.insert(conn.id, conn);
        self.metrics.connections.fetch_add(1, Relaxed);
        self.metrics.connections_total.fetch_add(1, Relaxed);
    }

    /// Forgets a connection. The caller unsubscribes its channels first.
    pub fn deregister(&self, id: ConnId) {
        if self.connections.remove(&id).is_some() {
            self.metrics.connections.fetch_sub(1, Relaxed);
        }
    }

    /// Returns whether `conn` was newly added and whether it is the channel's first local
    /// subscriber.
    pub fn subscribe(&self, channel: &Arc<str>, conn: &Arc<ConnHandle>) -> bool {
        let added = self.index.subscribe(channel, conn.id, Arc::clone(conn));
        if added {
            self.metrics.subscriptions.fetch_add(1, Relaxed);
        }
        added
    }

    pub fn unsubscribe(&self, channel: &str, conn: ConnId) -> bool {
        let removed = self.index.unsubscribe(channel, conn);
        if removed {
            self.metrics.subscriptions.fetch_sub(1, Relaxed);
        }
        removed
    }

    pub fn subscriber_count(&self, channel: &str) -> usize {
        self.index.subscriber_count(channel)
    }

    pub fn channels(&self) -> Vec<(Arc<str>, usize)> {
        self.index.channels()
    }

    pub fn channel_count(&self) -> usize {
        self.index.channel_count()
    }

    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Asks every connection to close with `code`.
    pub fn close_all(&self, code: CloseCode) {
        for conn in self.connections.iter() {
            conn.close(code);
        }
    }

    /// Calls `f` for every connection. `f` must not block.
    pub fn for_each_connection(&self, mut f: impl FnMut(&Arc<ConnHandle>)) {
        for conn in self.connections.iter() {
            f(conn.value());
        }
    }
}

impl PublicationSink for Hub {
    fn deliver(&self, publication: &Publication) {
        let frame = Utf8Bytes::from(native::encode_publication(publication));
        let mut delivered = 0u64;
        // A refused push has already closed that connection (slow consumer) or found it closing;
        // the writer counts the disconnect.
        self.index
            .for_each_subscriber(publication.channel.as_str(), |_, conn| {
                delivered += u64::from(conn.push_text(frame.clone()).is_ok());
            });
        self.metrics.deliveries_total.fetch_add(delivered, Relaxed);
    }
}
