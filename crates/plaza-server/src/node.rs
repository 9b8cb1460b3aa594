//! The node: the hub, the broker and the rules that decide what a client or the backend may do.
//! Protocol adapters and the backend API call into it; it knows nothing of frames or HTTP.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use plaza_broker::{Broker, LocalBroker};
use plaza_core::{
    ChannelName, ErrorCode, Limits, NamespaceError, NamespaceOptions, Namespaces, Payload,
    Publication, ReplyError,
};

use crate::hub::Hub;

/// The settings the node enforces, taken from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub limits: Limits,
    pub namespaces: Namespaces,
    pub ping_interval: Duration,
    pub connect_timeout: Duration,
    /// tungstenite's per-connection read buffer. Small, so idle connections stay cheap.
    pub ws_read_buffer_size: usize,
    /// Bytes buffered by the writer before a write system call is forced.
    pub ws_write_buffer_size: usize,
}

pub struct Node {
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub settings: Settings,
    pub id: String,
    pub started: Instant,
    next_conn_id: AtomicU64,
}

impl Node {
    /// A single node with the local broker.
    pub fn local(settings: Settings, id: String) -> Arc<Self> {
        let hub = Arc::new(Hub::default());
        let broker = Arc::new(LocalBroker::new(hub.clone()));
        Arc::new(Self {
            hub,
            broker,
            settings,
            id,
            started: Instant::now(),
            next_conn_id: AtomicU64::new(1),
        })
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Relaxed)
    }

    /// Validates a channel name and finds its namespace.
    pub fn resolve_channel(
        &self,
        name: &str,
    ) -> Result<(ChannelName, &NamespaceOptions), ReplyError> {
        let channel = ChannelName::parse(name, self.settings.limits.max_channel_length)
            .map_err(|e| ReplyError::new(ErrorCode::InvalidChannel, e.to_string()))?;
        let options = self.settings.namespaces.resolve(&channel).map_err(|e| {
            let code = match e {
                NamespaceError::Unknown(_) => ErrorCode::UnknownNamespace,
                NamespaceError::BadName(_) => ErrorCode::InvalidChannel,
            };
            ReplyError::new(code, e.to_string())
        })?;
        Ok((channel, options))
    }

    /// Publishes to an already validated channel.
    pub async fn publish(&self, channel: ChannelName, data: Payload) -> Result<(), ReplyError> {
        self.broker
            .publish(Publication { channel, data })
            .await
            .map_err(|e| ReplyError::new(ErrorCode::Internal, e.to_string()))?;
        self.hub.metrics.publications_total.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Counts an error that is about to be answered.
    pub fn count(&self, error: ReplyError) -> ReplyError {
        self.hub.metrics.error(error.code);
        error
    }
}
