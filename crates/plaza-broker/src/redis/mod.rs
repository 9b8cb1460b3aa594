//! Many Plaza nodes through one Redis server (cargo feature `redis`).
//!
//! [`connect`] gives the two halves a node needs: a [`RedisStore`] (history, inboxes, chat
//! records: everything the embedded store keeps, shared by every node) and a [`RedisBroker`]
//! (one Redis subscription per channel per node, ephemeral events, presence with a TTL, the list
//! of live nodes). A node whose Redis connection drops reconnects, subscribes again to everything
//! and tells its subscribers to resynchronise where they may have missed publications; nothing
//! is lost silently.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::{BrokerError, PublicationSink};

mod broker;
mod scripts;
mod store;

pub use broker::RedisBroker;
pub use store::RedisStore;

/// How a node reaches Redis.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Put in front of every key and pub/sub channel, so several Plaza clusters can share a Redis.
    pub prefix: String,
    /// This node's id, in the list of live nodes.
    pub node_id: String,
    /// How long a crashed node's presence entries and its place in the node list outlive it.
    pub presence_ttl: Duration,
}

/// Key names (the layout is in [`scripts`]).
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    pub prefix: String,
}

impl Keys {
    pub fn meta(&self, stream: &str) -> String {
        format!("{}m:{stream}", self.prefix)
    }
    pub fn channel(&self, stream: &str) -> String {
        format!("{}c:{stream}", self.prefix)
    }
    pub fn kv(&self) -> String {
        format!("{}kv", self.prefix)
    }
    pub fn kv_index(&self) -> String {
        format!("{}kvk", self.prefix)
    }
    pub fn presence(&self, channel: &str) -> String {
        format!("{}pz:{channel}", self.prefix)
    }
    pub fn presence_expiry(&self, channel: &str) -> String {
        format!("{}pzx:{channel}", self.prefix)
    }
    pub fn nodes(&self) -> String {
        format!("{}nodes", self.prefix)
    }
    pub fn node_seq(&self) -> String {
        format!("{}node-seq", self.prefix)
    }
}

fn unavailable(e: redis::RedisError) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// Connects to Redis (failing at once when it does not answer), starts the store's writer and
/// the broker's subscription task, and registers this node.
pub async fn connect(
    options: RedisOptions,
    sink: Arc<dyn PublicationSink>,
) -> Result<(Arc<RedisStore>, Arc<RedisBroker>), BrokerError> {
    let client = redis::Client::open(options.url.as_str()).map_err(unavailable)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(10)))
        .set_max_delay(Duration::from_secs(2))
        .set_number_of_retries(2);
    let conn = ConnectionManager::new_with_config(client.clone(), config)
        .await
        .map_err(unavailable)?;
    let keys = Keys {
        prefix: options.prefix.clone(),
    };
    let store = Arc::new(RedisStore::start(conn.clone(), keys.clone()));
    let broker = RedisBroker::start(client, conn, keys, options, sink, Arc::clone(&store)).await?;
    Ok((store, broker))
}

/// Checks that Redis answers at `url` (for `plaza check-config`).
pub async fn ping(url: &str) -> Result<(), BrokerError> {
    let client = redis::Client::open(url).map_err(unavailable)?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| BrokerError::Unavailable(format!("no answer from {url} within 5 s")))?
    .map_err(unavailable)?;
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .map_err(unavailable)?;
    Ok(())
}
