//! The node: the hub, the broker, the store and the rules that decide what a client or the
//! backend may do. Protocol adapters and the backend API call into it; it knows nothing of frames
//! or HTTP.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use plaza_broker::Broker;
use plaza_core::{
    ChannelName, ChannelPresence, ClientInfo, ConnId, ErrorCode, Limits, NamespaceError,
    NamespaceOptions, Namespaces, Payload, Position, PresenceEvent, Publication, ReplyError,
};
use plaza_protocol::native;
use plaza_store::{ReadResult, Store, StreamOptions};
use tokio::sync::OnceCell;

use crate::auth::Auth;
use crate::chat::{Chat, ChatConfig};
use crate::hub::Hub;
use crate::live::Live;

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
    /// How long a publish's idempotency key is remembered.
    pub idempotency_window: Duration,
}

/// The first result of a publish with an idempotency key, shared with its retries.
struct Remembered {
    result: Arc<OnceCell<Option<Position>>>,
    created: Instant,
}

pub struct Node {
    pub hub: Arc<Hub>,
    pub auth: Auth,
    pub live: Live,
    pub chat: Chat,
    pub broker: Arc<dyn Broker>,
    pub store: Arc<dyn Store>,
    pub settings: Settings,
    pub id: String,
    pub started: Instant,
    next_conn_id: AtomicU64,
    idempotency: DashMap<(Arc<str>, Box<str>), Remembered>,
    presence: DashMap<Arc<str>, ChannelPresence>,
}

/// Longest accepted idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;

impl Node {
    /// A node over `store` and `broker` (see [`crate::engine::open`]); `hub` must be the sink
    /// the broker delivers to.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: Settings,
        id: String,
        hub: Arc<Hub>,
        store: Arc<dyn Store>,
        broker: Arc<dyn Broker>,
        auth: Auth,
        live: Live,
        chat: ChatConfig,
    ) -> Arc<Self> {
        let chat = Chat::new(
            chat,
            Arc::clone(&store),
            Arc::clone(&hub),
            Arc::clone(&broker),
        );
        // Connection ids are unique across the nodes sharing a broker.
        let first_conn_id = broker.conn_id_base() + 1;
        Arc::new(Self {
            hub,
            auth,
            live,
            chat,
            broker,
            store,
            settings,
            id,
            started: Instant::now(),
            next_conn_id: AtomicU64::new(first_conn_id),
            idempotency: DashMap::new(),
            presence: DashMap::new(),
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

    /// Publishes to an already validated channel. With history, returns the publication's
    /// position once it is durably stored. With an idempotency key, a retry within the window
    /// returns the first result instead of publishing again.
    pub async fn publish(
        &self,
        channel: ChannelName,
        options: &NamespaceOptions,
        data: Payload,
        idempotency_key: Option<&str>,
    ) -> Result<Option<Position>, ReplyError> {
        let Some(key) = idempotency_key else {
            return self.publish_once(channel, options, data).await;
        };
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
            return Err(ReplyError::new(
                ErrorCode::BadRequest,
                format!("idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY} bytes"),
            ));
        }
        let cell = {
            let entry = self
                .idempotency
                .entry((Arc::clone(channel.as_arc()), key.into()))
                .or_insert_with(|| Remembered {
                    result: Arc::new(OnceCell::new()),
                    created: Instant::now(),
                });
            Arc::clone(&entry.result)
        };
        // Concurrent retries wait for the first attempt; a failed attempt leaves the cell empty,
        // so a later retry publishes.
        cell.get_or_try_init(|| self.publish_once(channel, options, data))
            .await
            .cloned()
    }

    async fn publish_once(
        &self,
        channel: ChannelName,
        options: &NamespaceOptions,
        data: Payload,
    ) -> Result<Option<Position>, ReplyError> {
        match self.start_publish(channel, options, data).await? {
            Published::Now(position) => Ok(position),
            Published::Later(durable) => durable.await.map(Some),
        }
    }

    /// Publishes, without waiting for durability: a publication to a channel with history is
    /// queued to the store now (so a connection's publications keep their order) and
    /// [`Published::Later`] resolves once it is on disk. This lets one connection keep many
    /// publishes in flight, which is what group commit needs to batch them.
    pub async fn start_publish(
        &self,
        channel: ChannelName,
        options: &NamespaceOptions,
        data: Payload,
    ) -> Result<Published, ReplyError> {
        if options.has_history() {
            // The store's listener (the hub) delivers it once it is durable.
            let durable = self.store.append(&channel, data, stream_options(options));
            let hub = Arc::clone(&self.hub);
            return Ok(Published::Later(Box::pin(async move {
                let position = durable
                    .await
                    .map_err(|e| ReplyError::new(ErrorCode::Internal, e.to_string()))?;
                hub.metrics.publications_total.fetch_add(1, Relaxed);
                Ok(position)
            })));
        }
        self.broker
            .publish(Publication {
                channel,
                data,
                position: None,
            })
            .await
            .map_err(|e| ReplyError::new(ErrorCode::Internal, e.to_string()))?;
        self.hub.metrics.publications_total.fetch_add(1, Relaxed);
        Ok(Published::Now(None))
    }

    /// Reads a channel's history (which must have history enabled).
    pub async fn history(
        &self,
        channel: &ChannelName,
        since: Option<Position>,
        limit: usize,
    ) -> Result<ReadResult, ReplyError> {
        self.store
            .read(channel, since, limit)
            .await
            .map_err(|e| ReplyError::new(ErrorCode::Internal, e.to_string()))
    }

    /// Forgets idempotency keys older than the window. Called from the maintenance timer.
    pub fn expire_idempotency_keys(&self, now: Instant) {
        let window = self.settings.idempotency_window;
        self.idempotency
            .retain(|_, r| now.duration_since(r.created) < window);
    }

    /// Records a connection in a channel's presence (here and, through the broker, for every
    /// node); with `join_leave`, tells the other subscribers when its user arrives.
    pub async fn presence_join(
        &self,
        channel: &Arc<str>,
        options: &NamespaceOptions,
        client: ClientInfo,
    ) {
        if !options.presence {
            return;
        }
        let event = self
            .presence
            .entry(Arc::clone(channel))
            .or_default()
            .join(client.clone());
        if let Err(e) = self.broker.presence_add(Arc::clone(channel), client).await {
            tracing::warn!(channel = %channel, error = %e, "presence not shared with the broker");
        }
        if let (Some(event), true) = (event, options.join_leave) {
            self.announce(channel, &event).await;
        }
    }

    /// Removes a connection from a channel's presence; with `join_leave`, tells the remaining
    /// subscribers when its user's last connection went.
    pub async fn presence_leave(
        &self,
        channel: &Arc<str>,
        options: &NamespaceOptions,
        client: ConnId,
    ) {
        if !options.presence {
            return;
        }
        let event = match self.presence.get_mut(channel) {
            None => None,
            Some(mut present) => present.leave(client),
        };
        self.presence.remove_if(channel, |_, p| p.is_empty());
        if let Err(e) = self
            .broker
            .presence_remove(Arc::clone(channel), client)
            .await
        {
            tracing::warn!(channel = %channel, error = %e, "presence removal not shared with the broker");
        }
        if let (Some(event), true) = (event, options.join_leave) {
            self.announce(channel, &event).await;
        }
    }

    async fn announce(&self, channel: &Arc<str>, event: &PresenceEvent) {
        let except = match event {
            PresenceEvent::Join(c) | PresenceEvent::Leave(c) => c.client,
        };
        let frame = native::encode_presence_event(channel, event);
        if let Err(e) = self
            .broker
            .publish_event(Arc::clone(channel), except, frame)
            .await
        {
            tracing::warn!(channel = %channel, error = %e, "presence event not sent");
        }
    }

    /// The connections present in a channel on every node, or `None` when its namespace keeps
    /// no presence.
    pub async fn presence(
        &self,
        options: &NamespaceOptions,
        channel: &str,
    ) -> Result<Option<Vec<ClientInfo>>, ReplyError> {
        if !options.presence {
            return Ok(None);
        }
        let shared = self
            .broker
            .presence_list(Arc::from(channel))
            .await
            .map_err(|e| ReplyError::new(ErrorCode::Internal, e.to_string()))?;
        Ok(Some(shared.unwrap_or_else(|| {
            self.presence
                .get(channel)
                .map(|p| p.clients())
                .unwrap_or_default()
        })))
    }

    /// `(connections, users)` present in a channel, or `None` without presence.
    pub async fn presence_stats(
        &self,
        options: &NamespaceOptions,
        channel: &str,
    ) -> Result<Option<(usize, usize)>, ReplyError> {
        Ok(self
            .presence(options, channel)
            .await?
            .map(|clients| plaza_core::presence_stats_of(&clients)))
    }

    /// Counts an error that is about to be answered.
    pub fn count(&self, error: ReplyError) -> ReplyError {
        self.hub.metrics.error(error.code);
        error
    }
}

/// What [`Node::start_publish`] produced.
pub enum Published {
    /// Done: delivered to the broker (no history), nothing to wait for.
    Now(Option<Position>),
    /// Queued to the store; resolves with the position once durable.
    Later(plaza_store::BoxFuture<'static, Result<Position, ReplyError>>),
}

/// The store's bounds for a namespace.
pub fn stream_options(options: &NamespaceOptions) -> StreamOptions {
    StreamOptions {
        max_len: Some(options.history_size),
        ttl: (options.history_ttl_secs > 0).then(|| Duration::from_secs(options.history_ttl_secs)),
    }
}
