//! Many Plaza nodes through one NATS server (or cluster) with JetStream (cargo feature `nats`).
//!
//! [`connect`] gives the two halves a node needs:
//!
//! - a [`NatsStore`]: history, inboxes and chat records. Every write is one record of one
//!   JetStream stream (the *log*, see [`log`]); every node folds the log, in its order, into the
//!   same state, and delivers the appends it folds to its own subscribers. So a batch is atomic
//!   (one message), every publication gets its `(epoch, offset)` exactly once, and subscribers on
//!   every node see a channel's offsets in order.
//! - a [`NatsBroker`]: publications without history and ephemeral events on core NATS subjects
//!   (one subscription per channel per node), presence and the node list in a JetStream stream
//!   that keeps the latest entry per subject and forgets entries a crashed node stops refreshing.
//!
//! Only what nats-server 2.9 offers is used (no 2.10+ stream or consumer features).

use std::sync::Arc;
use std::time::Duration;

use crate::{BrokerError, PublicationSink};

mod broker;
pub mod log;
mod store;

pub use broker::NatsBroker;
pub use store::NatsStore;

/// How a node reaches NATS.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// `nats://[user:password@]host:port`.
    pub url: String,
    /// First token of every subject and (upper-cased) of every stream name, so several Plaza
    /// clusters can share a NATS server. Letters, digits, `-` and `_`.
    pub prefix: String,
    /// This node's id, in the list of live nodes.
    pub node_id: String,
    /// How long a crashed node's presence entries and its place in the node list outlive it.
    pub presence_ttl: Duration,
}

/// Whether `prefix` can start subjects and stream names.
pub fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.len() <= 32
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Subject and stream names under the configured prefix.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    subject: String,
    stream: String,
}

impl Names {
    fn new(prefix: &str) -> Self {
        Self {
            subject: prefix.to_owned(),
            stream: prefix.to_ascii_uppercase(),
        }
    }
    /// The JetStream stream holding the write log.
    pub fn log_stream(&self) -> String {
        format!("{}_LOG", self.stream)
    }
    pub fn log_subject(&self) -> String {
        format!("{}.log", self.subject)
    }
    /// The JetStream stream holding presence entries, node entries and the node counter.
    pub fn live_stream(&self) -> String {
        format!("{}_LIVE", self.stream)
    }
    pub fn live_subjects(&self) -> String {
        format!("{}.live.>", self.subject)
    }
    /// Core subject of a channel's publications without history and its events.
    pub fn channel(&self, channel: &str) -> String {
        format!("{}.c.{}", self.subject, token(channel))
    }
    pub fn presence(&self, channel: &str, client: u64) -> String {
        format!("{}.live.pz.{}.{client}", self.subject, token(channel))
    }
    pub fn presence_of(&self, channel: &str) -> String {
        format!("{}.live.pz.{}.*", self.subject, token(channel))
    }
    pub fn node(&self, node_id: &str) -> String {
        format!("{}.live.node.{}", self.subject, token(node_id))
    }
    pub fn nodes(&self) -> String {
        format!("{}.live.node.*", self.subject)
    }
    /// The stream whose sequence numbers starting nodes (one message per start, only the last
    /// kept): apart from the live stream, whose sequence every heartbeat advances.
    pub fn counter_stream(&self) -> String {
        format!("{}_NODES", self.stream)
    }
    pub fn node_counter(&self) -> String {
        format!("{}.nodes", self.subject)
    }
}

/// A name as one subject token: lower-case hex, so no byte of it can be `.`, `*`, `>` or white
/// space whatever the channel's name holds. `_` stands for the empty name.
pub(crate) fn token(name: &str) -> String {
    if name.is_empty() {
        return "_".into();
    }
    let mut out = String::with_capacity(name.len() * 2);
    for b in name.bytes() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

async fn client(
    url: &str,
    name: &str,
    events: Option<Arc<tokio::sync::Notify>>,
) -> Result<async_nats::Client, BrokerError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        // Reconnect for ever, at most every 2 s: a NATS restart must not need a Plaza restart.
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis(100 * (1 << attempts.min(4) as u64)).min(Duration::from_secs(2))
        });
    if let Some(notify) = events {
        options = options.event_callback(move |event| {
            let notify = Arc::clone(&notify);
            async move {
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!("NATS connection restored");
                        notify.notify_one();
                    }
                    async_nats::Event::Disconnected => tracing::warn!("NATS connection lost"),
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            }
        });
    }
    tokio::time::timeout(Duration::from_secs(5), options.connect(url))
        .await
        .map_err(|_| BrokerError::Unavailable("no answer within 5 s".into()))?
        .map_err(unavailable)
}

/// Connects to NATS (failing at once when it does not answer), creates the streams if they do
/// not exist, folds the write log up to its end, starts the broker's tasks and registers this
/// node.
pub async fn connect(
    options: NatsOptions,
    sink: Arc<dyn PublicationSink>,
) -> Result<(Arc<NatsStore>, Arc<NatsBroker>), BrokerError> {
    if !valid_prefix(&options.prefix) {
        return Err(BrokerError::Unavailable(format!(
            "prefix '{}' must be 1 to 32 letters, digits, '-' or '_'",
            options.prefix
        )));
    }
    let reconnected = Arc::new(tokio::sync::Notify::new());
    let client = client(
        &options.url,
        &format!("plaza {}", options.node_id),
        Some(Arc::clone(&reconnected)),
    )
    .await?;
    let names = Names::new(&options.prefix);
    let jetstream = async_nats::jetstream::new(client.clone());
    let store = NatsStore::start(
        jetstream.clone(),
        names.clone(),
        Arc::clone(&sink),
        reconnected,
    )
    .await?;
    let broker = NatsBroker::start(client, jetstream, names, options, sink).await?;
    Ok((store, broker))
}

/// Checks that NATS answers at `url` and has JetStream enabled (for `plaza check-config`).
pub async fn ping(url: &str) -> Result<(), BrokerError> {
    let client = client(url, "plaza check-config", None).await?;
    let jetstream = async_nats::jetstream::new(client);
    tokio::time::timeout(Duration::from_secs(5), jetstream.query_account())
        .await
        .map_err(|_| BrokerError::Unavailable("JetStream did not answer within 5 s".into()))?
        .map_err(|e| {
            BrokerError::Unavailable(format!(
                "JetStream is not available ({e}); start nats-server with -js"
            ))
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_single_safe_subject_tokens() {
        assert_eq!(token("a.b"), "612e62");
        assert_eq!(token(""), "_");
        for name in ["news", "a.b", "*", ">", "x y", "$inbox:ann", "é"] {
            let t = token(name);
            assert!(
                t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                "{t}"
            );
        }
        let names = Names::new("plaza");
        assert_eq!(names.channel("a.b"), "plaza.c.612e62");
        assert_eq!(names.log_stream(), "PLAZA_LOG");
        assert_eq!(names.presence("ab", 5), "plaza.live.pz.6162.5");
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(valid_prefix("plaza"));
        assert!(valid_prefix("plaza-test_1"));
        assert!(!valid_prefix(""));
        assert!(!valid_prefix("a.b"));
        assert!(!valid_prefix("a b"));
        assert!(!valid_prefix(&"x".repeat(33)));
    }
}
