//! The broker carries publications between Plaza nodes.
//!
//! A node hands every publication to its broker and receives, through a [`PublicationSink`], every
//! publication for which it registered interest, its own included. With one node the
//! [`LocalBroker`] hands publications straight back; the Redis and NATS brokers (behind cargo
//! features) carry them to every node. The node never needs to know which it has.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use plaza_core::{ClientInfo, ConnId, Publication};

mod local;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(any(feature = "redis", feature = "nats"))]
mod shared;

pub use local::LocalBroker;

/// A boxed future, so brokers can be used as `dyn Broker`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// Something read back from the broker does not have the shape Plaza wrote it in.
    #[error("unexpected data from the broker: {0}")]
    Corrupt(String),
}

/// Receives the publications a node must deliver to its local subscribers.
pub trait PublicationSink: Send + Sync + 'static {
    /// Called once per publication. Must not block: it only queues frames.
    fn deliver(&self, publication: &Publication);

    /// Several publications at once, in order (a [`LocalBroker`] lane's batch). A sink that
    /// can queue a subscriber's frames for the whole batch at once does so. Must not block.
    fn deliver_batch(&self, batch: &[Publication]) {
        for publication in batch {
            self.deliver(publication);
        }
    }

    /// Whether some connections still have frames queued that their writers have not taken: a
    /// [`LocalBroker`] lane then gives them a few turns before it delivers its next batch, so
    /// that no subscriber falls more than about one batch behind the others.
    fn writers_behind(&self) -> bool {
        false
    }

    /// An ephemeral frame (presence join/leave, typing, ...) for every local subscriber of
    /// `channel` but the connection `except`. Must not block.
    fn event(&self, channel: &str, except: ConnId, frame: &str);

    /// Whether this node still has a subscriber on `channel`: a broker asks before it drops its
    /// upstream subscription, so a subscribe racing an unsubscribe never loses.
    fn interested(&self, channel: &str) -> bool;

    /// Publications of `channel` may have been missed: the broker's subscription was down, or
    /// the channel's stream was recreated (`epoch_changed`). Subscribers that follow offsets and
    /// are behind `top` (every one of them when the epoch changed) must resynchronise. Must not
    /// block.
    fn gap(&self, channel: &str, top: Option<&plaza_core::Position>, epoch_changed: bool);
}

pub trait Broker: Send + Sync + 'static {
    /// A short name for logs and `/api/info` (`"local"`, `"redis"`, ...).
    fn name(&self) -> &'static str;

    /// Sends `publication` to every node with interest in its channel, this one included. Returns
    /// once the broker has taken it.
    fn publish(&self, publication: Publication) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// [`Broker::publish`], resolving only once this node's own subscribers have the publication
    /// queued, for protocols that must answer a publish after its fan-out (Snorky). A broker
    /// that relays through a server cannot promise that; it keeps this default.
    fn publish_delivered(
        &self,
        publication: Publication,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.publish(publication)
    }

    /// This node now has at least one subscriber on `channel`.
    fn subscribe(&self, channel: Arc<str>) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// This node has no subscriber left on `channel` (the broker checks
    /// [`PublicationSink::interested`] again before it lets go).
    fn unsubscribe(&self, channel: Arc<str>) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Sends an ephemeral frame to every node's subscribers of `channel` but `except` (connection
    /// ids are unique across nodes, see [`Broker::conn_id_base`]).
    fn publish_event(
        &self,
        channel: Arc<str>,
        except: ConnId,
        frame: String,
    ) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Where this node's connection ids start, so that ids are unique across nodes. 0 alone.
    fn conn_id_base(&self) -> u64 {
        0
    }

    /// Records a connection as present in `channel`, for every node to see. A broker without
    /// shared presence does nothing: the node's own record is the truth.
    fn presence_add(
        &self,
        _channel: Arc<str>,
        _client: ClientInfo,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// Removes a connection recorded by [`Broker::presence_add`].
    fn presence_remove(
        &self,
        _channel: Arc<str>,
        _client: ConnId,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// The connections present in `channel` on every node that is alive, or `None` when the
    /// broker keeps no shared presence (one node: ask the node).
    fn presence_list(
        &self,
        _channel: Arc<str>,
    ) -> BoxFuture<'_, Result<Option<Vec<ClientInfo>>, BrokerError>> {
        Box::pin(std::future::ready(Ok(None)))
    }

    /// The ids of the nodes that are alive, or `None` with one node.
    fn nodes(&self) -> BoxFuture<'_, Result<Option<Vec<String>>, BrokerError>> {
        Box::pin(std::future::ready(Ok(None)))
    }
}
