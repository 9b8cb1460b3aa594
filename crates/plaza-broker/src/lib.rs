//! The broker carries publications between Plaza nodes.
//!
//! A node hands every publication to its broker and receives, through a [`PublicationSink`], every
//! publication for which it registered interest, its own included. With one node the
//! [`LocalBroker`] hands publications straight back; the Redis and NATS brokers (behind cargo
//! features) carry them to every node. The node never needs to know which it has.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use plaza_core::Publication;

mod local;

pub use local::LocalBroker;

/// A boxed future, so brokers can be used as `dyn Broker`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

/// Receives the publications a node must deliver to its local subscribers.
pub trait PublicationSink: Send + Sync + 'static {
    /// Called once per publication. Must not block: it only queues frames.
    fn deliver(&self, publication: &Publication);
}

pub trait Broker: Send + Sync + 'static {
    /// A short name for logs and `/api/info` (`"local"`, `"redis"`, ...).
    fn name(&self) -> &'static str;

    /// Sends `publication` to every node with interest in its channel, this one included. Returns
    /// once the broker has taken it.
    fn publish(&self, publication: Publication) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// This node now has at least one subscriber on `channel`.
    fn subscribe(&self, channel: Arc<str>) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// This node has no subscriber left on `channel`.
    fn unsubscribe(&self, channel: Arc<str>) -> BoxFuture<'_, Result<(), BrokerError>>;
}
