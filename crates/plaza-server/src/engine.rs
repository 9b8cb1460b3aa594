//! Where a node's state lives and how it reaches the other nodes: the embedded store with the
//! local broker (one node, the default), or Redis for both (many nodes, docs/SCALING.md).

use std::sync::Arc;

use anyhow::Context as _;
use plaza_broker::{Broker, LocalBroker};
use plaza_store::{AppendListener, RedbStore, Store};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::hub::Hub;

/// `broker = "..."` in the configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    /// One node: the embedded redb store in `data_dir`, nothing to install.
    #[default]
    Local,
    /// Many nodes sharing one Redis server for fan-out, history, inboxes and presence.
    Redis,
    /// Many nodes through NATS with JetStream: not built yet (refused by `validate`).
    Nats,
}

impl std::str::FromStr for BrokerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(Self::Local),
            "redis" => Ok(Self::Redis),
            "nats" => Ok(Self::Nats),
            _ => Err(format!("unknown broker '{s}' (local, redis)")),
        }
    }
}

/// `[redis]`: used with `broker = "redis"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Put before every key and pub/sub channel: clusters sharing one Redis need their own.
    pub prefix: String,
    /// Seconds a crashed node's presence entries (and its place in `/api/info` nodes) outlive
    /// it. Live nodes refresh theirs every third of it.
    pub presence_ttl_secs: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            prefix: "plaza:".into(),
            presence_ttl_secs: 15,
        }
    }
}

/// Checks the broker settings (without connecting).
pub fn validate(kind: BrokerKind, redis: &RedisConfig) -> Result<(), String> {
    match kind {
        BrokerKind::Local => Ok(()),
        BrokerKind::Nats => {
            Err("broker = \"nats\" is not available yet; use \"redis\" to run several nodes".into())
        }
        BrokerKind::Redis => {
            if !cfg!(feature = "redis") {
                return Err(
                    "broker = \"redis\" needs a plaza built with the redis feature \
                            (cargo build --release --features redis)"
                        .into(),
                );
            }
            if !(redis.url.starts_with("redis://") || redis.url.starts_with("rediss://")) {
                return Err(format!(
                    "redis.url '{}' must start with redis:// or rediss://",
                    redis.url
                ));
            }
            if redis.prefix.is_empty() || redis.prefix.len() > 64 {
                return Err("redis.prefix must be 1 to 64 bytes".into());
            }
            if !(2..=3600).contains(&redis.presence_ttl_secs) {
                return Err("redis.presence_ttl_secs must be between 2 and 3600".into());
            }
            Ok(())
        }
    }
}

/// What [`open`] gives a node.
pub struct Engine {
    pub store: Arc<dyn Store>,
    pub broker: Arc<dyn Broker>,
    /// The embedded store again, to be closed cleanly at shutdown (`None` with Redis).
    pub embedded: Option<Arc<RedbStore>>,
}

/// Opens the store and the broker the configuration asks for, delivering to `hub`.
pub async fn open(config: &Config, node_id: &str, hub: Arc<Hub>) -> anyhow::Result<Engine> {
    match config.broker {
        BrokerKind::Local => {
            let redb = RedbStore::open(&config.data_dir).await.with_context(|| {
                format!(
                    "cannot open the store {}",
                    config.data_dir.join(RedbStore::FILE_NAME).display()
                )
            })?;
            let redb = Arc::new(redb);
            // Publications of channels with history are delivered by the store, in offset order.
            redb.set_listener(Arc::clone(&hub) as Arc<dyn AppendListener>);
            Ok(Engine {
                store: Arc::clone(&redb) as Arc<dyn Store>,
                broker: Arc::new(LocalBroker::new(hub)),
                embedded: Some(redb),
            })
        }
        BrokerKind::Redis => {
            let (store, broker) = open_redis(&config.redis, node_id, hub).await?;
            Ok(Engine {
                store,
                broker,
                embedded: None,
            })
        }
        BrokerKind::Nats => anyhow::bail!("broker = \"nats\" is not available yet"),
    }
}

#[cfg(feature = "redis")]
async fn open_redis(
    redis: &RedisConfig,
    node_id: &str,
    hub: Arc<Hub>,
) -> anyhow::Result<(Arc<dyn Store>, Arc<dyn Broker>)> {
    let options = plaza_broker::redis::RedisOptions {
        url: redis.url.clone(),
        prefix: redis.prefix.clone(),
        node_id: node_id.to_owned(),
        presence_ttl: std::time::Duration::from_secs(redis.presence_ttl_secs),
    };
    let (store, broker) = plaza_broker::redis::connect(options, hub)
        .await
        .with_context(|| format!("cannot use Redis at {}", redacted(&redis.url)))?;
    tracing::info!(url = %redacted(&redis.url), prefix = %redis.prefix, "state shared through Redis");
    Ok((store, broker))
}

#[cfg(not(feature = "redis"))]
async fn open_redis(
    _redis: &RedisConfig,
    _node_id: &str,
    _hub: Arc<Hub>,
) -> anyhow::Result<(Arc<dyn Store>, Arc<dyn Broker>)> {
    anyhow::bail!("this plaza was built without the redis feature")
}

/// Checks that the configured broker answers (`plaza check-config`).
pub async fn ping(config: &Config) -> Result<(), String> {
    match config.broker {
        BrokerKind::Local | BrokerKind::Nats => Ok(()),
        #[cfg(feature = "redis")]
        BrokerKind::Redis => plaza_broker::redis::ping(&config.redis.url)
            .await
            .map_err(|e| format!("Redis at {}: {e}", redacted(&config.redis.url))),
        #[cfg(not(feature = "redis"))]
        BrokerKind::Redis => Err("this plaza was built without the redis feature".into()),
    }
}

/// The URL without its password, for logs.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redacted("redis://user:secret@127.0.0.1:6379/0"),
            "redis://***@127.0.0.1:6379/0"
        );
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    #[test]
    fn bad_settings_are_refused() {
        let redis = RedisConfig::default();
        assert!(validate(BrokerKind::Local, &redis).is_ok());
        assert!(validate(BrokerKind::Nats, &redis).is_err());
        let bad_url = RedisConfig {
            url: "http://x".into(),
            ..RedisConfig::default()
        };
        assert!(validate(BrokerKind::Redis, &bad_url).is_err());
        let no_prefix = RedisConfig {
            prefix: String::new(),
            ..RedisConfig::default()
        };
        assert!(validate(BrokerKind::Redis, &no_prefix).is_err());
        assert_eq!(
            validate(BrokerKind::Redis, &redis).is_ok(),
            cfg!(feature = "redis")
        );
    }
}
