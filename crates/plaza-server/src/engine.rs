//! Where a node's state lives and how it reaches the other nodes: the embedded store with the
//! local broker (one node, the default), or Redis or NATS for both (many nodes,
//! docs/SCALING.md).

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
    /// Many nodes through NATS with JetStream: core subjects for fan-out, one JetStream log for
    /// history, inboxes and chat records, presence in a JetStream stream.
    Nats,
}

impl std::str::FromStr for BrokerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(Self::Local),
            "redis" => Ok(Self::Redis),
            "nats" => Ok(Self::Nats),
            _ => Err(format!("unknown broker '{s}' (local, redis, nats)")),
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

/// `[nats]`: used with `broker = "nats"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// `nats://[user:password@]host:port`. The server must run JetStream (`nats-server -js`).
    pub url: String,
    /// First token of every subject and, upper-cased, of every JetStream stream name: clusters
    /// sharing one NATS need their own. Letters, digits, `-` and `_`.
    pub prefix: String,
    /// Seconds a crashed node's presence entries (and its place in `/api/info` nodes) outlive
    /// it. Live nodes refresh theirs every third of it.
    pub presence_ttl_secs: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            prefix: "plaza".into(),
            presence_ttl_secs: 15,
        }
    }
}

/// Checks the broker settings (without connecting).
pub fn validate(kind: BrokerKind, redis: &RedisConfig, nats: &NatsConfig) -> Result<(), String> {
    match kind {
        BrokerKind::Local => Ok(()),
        BrokerKind::Nats => {
            if !cfg!(feature = "nats") {
                return Err(
                    "broker = \"nats\" needs a plaza built with the nats feature \
                            (cargo build --release --features nats)"
                        .into(),
                );
            }
            if !(nats.url.starts_with("nats://") || nats.url.starts_with("tls://")) {
                return Err(format!(
                    "nats.url '{}' must start with nats:// or tls://",
                    redacted(&nats.url)
                ));
            }
            #[cfg(feature = "nats")]
            if !plaza_broker::nats::valid_prefix(&nats.prefix) {
                return Err("nats.prefix must be 1 to 32 letters, digits, '-' or '_'".into());
            }
            if !(2..=3600).contains(&nats.presence_ttl_secs) {
                return Err("nats.presence_ttl_secs must be between 2 and 3600".into());
            }
            Ok(())
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
    /// The embedded store again, to be closed cleanly at shutdown (`None` with Redis or NATS).
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
        BrokerKind::Nats => {
            let (store, broker) = open_nats(&config.nats, node_id, Arc::clone(&hub)).await?;
            // Every node folds the write log and delivers its appends, in log order.
            store.set_listener(hub as Arc<dyn AppendListener>);
            Ok(Engine {
                store,
                broker,
                embedded: None,
            })
        }
    }
}

#[cfg(feature = "nats")]
async fn open_nats(
    nats: &NatsConfig,
    node_id: &str,
    hub: Arc<Hub>,
) -> anyhow::Result<(Arc<dyn Store>, Arc<dyn Broker>)> {
    let options = plaza_broker::nats::NatsOptions {
        url: nats.url.clone(),
        prefix: nats.prefix.clone(),
        node_id: node_id.to_owned(),
        presence_ttl: std::time::Duration::from_secs(nats.presence_ttl_secs),
    };
    let (store, broker) = plaza_broker::nats::connect(options, hub)
        .await
        .with_context(|| format!("cannot use NATS at {}", redacted(&nats.url)))?;
    tracing::info!(url = %redacted(&nats.url), prefix = %nats.prefix, "state shared through NATS");
    Ok((store, broker))
}

#[cfg(not(feature = "nats"))]
async fn open_nats(
    _nats: &NatsConfig,
    _node_id: &str,
    _hub: Arc<Hub>,
) -> anyhow::Result<(Arc<dyn Store>, Arc<dyn Broker>)> {
    anyhow::bail!("this plaza was built without the nats feature")
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
        BrokerKind::Local => Ok(()),
        #[cfg(feature = "nats")]
        BrokerKind::Nats => plaza_broker::nats::ping(&config.nats.url)
            .await
            .map_err(|e| format!("NATS at {}: {e}", redacted(&config.nats.url))),
        #[cfg(not(feature = "nats"))]
        BrokerKind::Nats => Err("this plaza was built without the nats feature".into()),
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
        let nats = NatsConfig::default();
        assert!(validate(BrokerKind::Local, &redis, &nats).is_ok());
        assert_eq!(
            validate(BrokerKind::Nats, &redis, &nats).is_ok(),
            cfg!(feature = "nats")
        );
        for bad in [
            NatsConfig {
                url: "redis://x".into(),
                ..NatsConfig::default()
            },
            NatsConfig {
                prefix: "a.b".into(),
                ..NatsConfig::default()
            },
            NatsConfig {
                presence_ttl_secs: 1,
                ..NatsConfig::default()
            },
        ] {
            assert!(validate(BrokerKind::Nats, &redis, &bad).is_err(), "{bad:?}");
        }
        let bad_url = RedisConfig {
            url: "http://x".into(),
            ..RedisConfig::default()
        };
        assert!(validate(BrokerKind::Redis, &bad_url, &nats).is_err());
        let no_prefix = RedisConfig {
            prefix: String::new(),
            ..RedisConfig::default()
        };
        assert!(validate(BrokerKind::Redis, &no_prefix, &nats).is_err());
        assert_eq!(
            validate(BrokerKind::Redis, &redis, &nats).is_ok(),
            cfg!(feature = "redis")
        );
    }
}
