//! [`RedisBroker`]: publications, ephemeral events and presence between nodes through Redis.
//!
//! A node keeps one dedicated pub/sub connection and subscribes there to each channel it has at
//! least one local subscriber on (so Redis fans out once per node, not once per client).
//! Subscribe and unsubscribe are serialised and an unsubscribe asks the node again whether the
//! channel is still wanted, so a client joining while the last one leaves is never left deaf.
//!
//! When the pub/sub connection drops, the task reconnects with backoff, subscribes again to every
//! wanted channel in one command, and then compares each channel's stream top with what its
//! subscribers have: those behind are told to resynchronise ([`PublicationSink::gap`]); a stream
//! whose epoch changed (Redis lost it) resynchronises everyone on it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use plaza_core::{ChannelName, ClientInfo, ConnId, Payload, Position, Publication};
use plaza_store::Store;
use redis::aio::{ConnectionManager, PubSubSink};
use redis::{Client, Script};

use super::{Keys, RedisOptions, RedisStore, scripts, unavailable};
use crate::shared::{
    client_json, clients_from_json, conn_id_base, event_message, now_ms, plain_message, relay,
    ttl_ms,
};
use crate::{BoxFuture, Broker, BrokerError, PublicationSink};

pub struct RedisBroker {
    conn: ConnectionManager,
    keys: Keys,
    /// `keys.channel("")`: stripped from every pub/sub message's channel, so computed once.
    channel_prefix: String,
    sink: Arc<dyn PublicationSink>,
    store: Arc<RedisStore>,
    node_id: String,
    conn_id_base: u64,
    presence_ttl: Duration,
    presence_list: Script,
    /// Channels this node wants from Redis (without the key prefix).
    wanted: Mutex<HashSet<Arc<str>>>,
    /// The pub/sub connection's command half, while connected.
    pubsub: Mutex<Option<PubSubSink>>,
    /// Serialises subscription changes (see the module doc).
    changes: tokio::sync::Mutex<()>,
    /// Per channel: its name and the stream epoch last delivered.
    seen: Mutex<HashMap<Arc<str>, Seen>>,
    /// Presence entries this node keeps alive: channel → connection → client JSON.
    present: Mutex<HashMap<Arc<str>, HashMap<ConnId, String>>>,
}

struct Seen {
    channel: ChannelName,
    epoch: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RedisBroker {
    pub(super) async fn start(
        client: Client,
        conn: ConnectionManager,
        keys: Keys,
        options: RedisOptions,
        sink: Arc<dyn PublicationSink>,
        store: Arc<RedisStore>,
    ) -> Result<Arc<Self>, BrokerError> {
        let mut numbering = conn.clone();
        let number: u64 = redis::cmd("INCR")
            .arg(keys.node_seq())
            .query_async(&mut numbering)
            .await
            .map_err(unavailable)?;
        let broker = Arc::new(Self {
            conn,
            channel_prefix: keys.channel(""),
            keys,
            sink,
            store,
            node_id: options.node_id,
            conn_id_base: conn_id_base(number),
            presence_ttl: options.presence_ttl.max(Duration::from_secs(1)),
            presence_list: Script::new(scripts::PRESENCE_LIST),
            wanted: Mutex::new(HashSet::new()),
            pubsub: Mutex::new(None),
            changes: tokio::sync::Mutex::new(()),
            seen: Mutex::new(HashMap::new()),
            present: Mutex::new(HashMap::new()),
        });
        broker.heartbeat().await?;
        let (ready, connected) = tokio::sync::oneshot::channel();
        tokio::spawn(subscriptions(Arc::downgrade(&broker), client, ready));
        tokio::spawn(keep_alive(Arc::downgrade(&broker)));
        connected
            .await
            .map_err(|_| BrokerError::Unavailable("the Redis subscription task stopped".into()))?
            .map_err(unavailable)?;
        tracing::info!(node = %broker.node_id, conn_id_base = broker.conn_id_base, "joined through Redis");
        Ok(broker)
    }

    /// Registers this node as alive and refreshes its presence entries.
    async fn heartbeat(&self) -> Result<(), BrokerError> {
        let now = now_ms(SystemTime::now());
        let expiry = now + ttl_ms(self.presence_ttl);
        let mut pipe = redis::pipe();
        pipe.cmd("ZADD")
            .arg(self.keys.nodes())
            .arg(expiry)
            .arg(&self.node_id)
            .ignore();
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(self.keys.nodes())
            .arg("-inf")
            .arg(now)
            .ignore();
        for (channel, clients) in lock(&self.present).iter() {
            for (client, info) in clients {
                self.add_presence_commands(&mut pipe, channel, *client, info, expiry);
            }
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    fn add_presence_commands(
        &self,
        pipe: &mut redis::Pipeline,
        channel: &str,
        client: ConnId,
        info: &str,
        expiry: u64,
    ) {
        let (hash, expiries) = (
            self.keys.presence(channel),
            self.keys.presence_expiry(channel),
        );
        pipe.cmd("HSET").arg(&hash).arg(client).arg(info).ignore();
        pipe.cmd("ZADD")
            .arg(&expiries)
            .arg(expiry)
            .arg(client)
            .ignore();
        // Both keys vanish if every node holding entries in them dies.
        let keep = ttl_ms(self.presence_ttl) * 2;
        pipe.cmd("PEXPIRE").arg(&hash).arg(keep).ignore();
        pipe.cmd("PEXPIRE").arg(&expiries).arg(keep).ignore();
    }

    /// Handles one pub/sub message (formats in [`scripts`]).
    fn dispatch(&self, redis_channel: &str, message: &[u8]) {
        let Some(stream) = redis_channel.strip_prefix(self.channel_prefix.as_str()) else {
            return;
        };
        let Ok(message) = std::str::from_utf8(message) else {
            tracing::warn!(channel = %stream, "non-UTF-8 message from Redis ignored");
            return;
        };
        let (kind, rest) = message.split_at(message.len().min(2));
        match kind {
            "h " => {
                let mut parts = rest.splitn(3, ' ');
                let (Some(epoch), Some(Ok(offset)), Some(data)) = (
                    parts.next(),
                    parts.next().map(str::parse::<u64>),
                    parts.next(),
                ) else {
                    tracing::warn!(channel = %stream, "malformed publication from Redis ignored");
                    return;
                };
                let channel = {
                    let mut seen = lock(&self.seen);
                    let entry = self.seen_entry(&mut seen, stream);
                    let changed = entry.epoch.as_deref().is_some_and(|e| e != epoch);
                    if entry.epoch.as_deref() != Some(epoch) {
                        entry.epoch = Some(epoch.to_owned());
                    }
                    let channel = entry.channel.clone();
                    drop(seen);
                    if changed {
                        // The stream was recreated: offsets of the old epoch mean nothing now.
                        self.sink.gap(stream, None, true);
                    }
                    channel
                };
                self.sink.deliver(&Publication {
                    channel,
                    data: Payload::from_trusted(data.to_owned()),
                    position: Some(Position {
                        epoch: epoch.to_owned(),
                        offset,
                    }),
                });
            }
            _ => {
                let channel = self
                    .seen_entry(&mut lock(&self.seen), stream)
                    .channel
                    .clone();
                relay(&*self.sink, &channel, message.as_bytes(), "Redis");
            }
        }
    }

    fn seen_entry<'a>(&self, seen: &'a mut HashMap<Arc<str>, Seen>, stream: &str) -> &'a mut Seen {
        if !seen.contains_key(stream) {
            seen.insert(
                Arc::from(stream),
                Seen {
                    channel: ChannelName::from_stored(stream),
                    epoch: None,
                },
            );
        }
        // Just inserted when missing.
        seen.get_mut(stream).unwrap_or_else(|| unreachable!())
    }

    /// After a reconnect: tells the node where its subscribers may have missed publications.
    async fn resync(&self) {
        let channels: Vec<Arc<str>> = lock(&self.wanted).iter().cloned().collect();
        for channel in channels {
            let name = ChannelName::from_stored(&channel);
            // The command connection may still be reconnecting: give it a moment.
            let mut attempt = 0;
            let top = loop {
                match self.store.top(&name).await {
                    Ok(top) => break Some(top),
                    Err(e) if attempt >= 10 => {
                        tracing::warn!(channel = %channel, error = %e, "resync: stream top unreadable");
                        break None;
                    }
                    Err(_) => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            };
            let Some(top) = top else {
                self.sink.gap(&channel, None, true);
                continue;
            };
            let changed = {
                let mut seen = lock(&self.seen);
                let entry = self.seen_entry(&mut seen, &channel);
                let changed = match (&entry.epoch, &top) {
                    (Some(last), Some(top)) => *last != top.epoch,
                    (Some(_), None) => true,
                    (None, _) => false,
                };
                // Subscribers of the old epoch are told below; whoever subscribes from now on
                // starts in the stream's current epoch.
                entry.epoch = top.as_ref().map(|t| t.epoch.clone());
                changed
            };
            if changed || top.is_some() {
                self.sink.gap(&channel, top.as_ref(), changed);
            }
        }
    }

    fn pubsub(&self) -> Result<PubSubSink, BrokerError> {
        lock(&self.pubsub)
            .clone()
            .ok_or_else(|| BrokerError::Unavailable("not connected to Redis pub/sub".into()))
    }

    async fn publish_raw(&self, channel: &str, message: String) -> Result<(), BrokerError> {
        let mut conn = self.conn.clone();
        redis::cmd("PUBLISH")
            .arg(self.keys.channel(channel))
            .arg(message)
            .query_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }
}

/// Keeps the pub/sub connection up for as long as the broker lives.
async fn subscriptions(
    broker: Weak<RedisBroker>,
    client: Client,
    ready: tokio::sync::oneshot::Sender<redis::RedisResult<()>>,
) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(this) = broker.upgrade() else { return };
        let connected = async {
            let (mut sink, stream) = client.get_async_pubsub().await?.split();
            let _changes = this.changes.lock().await;
            let wanted: Vec<String> = lock(&this.wanted)
                .iter()
                .map(|c| this.keys.channel(c))
                .collect();
            if !wanted.is_empty() {
                sink.subscribe(wanted).await?;
            }
            *lock(&this.pubsub) = Some(sink);
            redis::RedisResult::Ok(stream)
        }
        .await;
        let mut stream = match connected {
            Ok(stream) => stream,
            Err(e) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(e));
                    return;
                }
                tracing::warn!(error = %e, retry_in = ?backoff, "Redis pub/sub reconnect failed");
                drop(this);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        match ready.take() {
            Some(ready) => {
                let _ = ready.send(Ok(()));
            }
            None => {
                tracing::info!("Redis pub/sub connection restored; resynchronising subscribers");
                this.resync().await;
            }
        }
        drop(this);
        while let Some(message) = stream.next().await {
            let Some(this) = broker.upgrade() else { return };
            this.dispatch(message.get_channel_name(), message.get_payload_bytes());
        }
        if let Some(this) = broker.upgrade() {
            *lock(&this.pubsub) = None;
        }
        tracing::warn!("Redis pub/sub connection lost; reconnecting");
    }
}

/// Refreshes this node's place in the node list and its presence entries.
async fn keep_alive(broker: Weak<RedisBroker>) {
    loop {
        let Some(period) = broker.upgrade().map(|b| b.presence_ttl / 3) else {
            return;
        };
        tokio::time::sleep(period).await;
        let Some(this) = broker.upgrade() else { return };
        if let Err(e) = this.heartbeat().await {
            tracing::warn!(error = %e, "Redis heartbeat failed");
        }
    }
}

impl Broker for RedisBroker {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn publish(&self, publication: Publication) -> BoxFuture<'_, Result<(), BrokerError>> {
        // Publications with a position were published by the store's write script already.
        Box::pin(async move {
            if publication.position.is_some() {
                return Ok(());
            }
            let message = plain_message(&publication.data);
            self.publish_raw(publication.channel.as_str(), message)
                .await
        })
    }

    fn subscribe(&self, channel: Arc<str>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let _changes = self.changes.lock().await;
            if !lock(&self.wanted).insert(Arc::clone(&channel)) {
                return Ok(());
            }
            let subscribed = match self.pubsub() {
                Ok(mut sink) => sink
                    .subscribe(self.keys.channel(&channel))
                    .await
                    .map_err(unavailable),
                Err(e) => Err(e),
            };
            if subscribed.is_err() {
                lock(&self.wanted).remove(&channel);
            }
            subscribed
        })
    }

    fn unsubscribe(&self, channel: Arc<str>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let _changes = self.changes.lock().await;
            if self.sink.interested(&channel) || !lock(&self.wanted).remove(&channel) {
                return Ok(());
            }
            lock(&self.seen).remove(&channel);
            match self.pubsub() {
                Ok(mut sink) => sink
                    .unsubscribe(self.keys.channel(&channel))
                    .await
                    .map_err(unavailable),
                // Not connected: the reconnect subscribes only to what is still wanted.
                Err(_) => Ok(()),
            }
        })
    }

    fn publish_event(
        &self,
        channel: Arc<str>,
        except: ConnId,
        frame: String,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            self.publish_raw(&channel, event_message(except, &frame))
                .await
        })
    }

    fn conn_id_base(&self) -> u64 {
        self.conn_id_base
    }

    fn presence_add(
        &self,
        channel: Arc<str>,
        client: ClientInfo,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let info = client_json(&client);
            let expiry = now_ms(SystemTime::now()) + ttl_ms(self.presence_ttl);
            let mut pipe = redis::pipe();
            self.add_presence_commands(&mut pipe, &channel, client.client, &info, expiry);
            lock(&self.present)
                .entry(Arc::clone(&channel))
                .or_default()
                .insert(client.client, info);
            let mut conn = self.conn.clone();
            pipe.query_async::<()>(&mut conn).await.map_err(unavailable)
        })
    }

    fn presence_remove(
        &self,
        channel: Arc<str>,
        client: ConnId,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            {
                let mut present = lock(&self.present);
                if let Some(clients) = present.get_mut(&channel) {
                    clients.remove(&client);
                    if clients.is_empty() {
                        present.remove(&channel);
                    }
                }
            }
            let mut pipe = redis::pipe();
            pipe.cmd("HDEL")
                .arg(self.keys.presence(&channel))
                .arg(client)
                .ignore();
            pipe.cmd("ZREM")
                .arg(self.keys.presence_expiry(&channel))
                .arg(client)
                .ignore();
            let mut conn = self.conn.clone();
            pipe.query_async::<()>(&mut conn).await.map_err(unavailable)
        })
    }

    fn presence_list(
        &self,
        channel: Arc<str>,
    ) -> BoxFuture<'_, Result<Option<Vec<ClientInfo>>, BrokerError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let values: Vec<String> = self
                .presence_list
                .prepare_invoke()
                .arg(&self.keys.prefix)
                .arg(&*channel)
                .arg(now_ms(SystemTime::now()))
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            clients_from_json(&channel, &values).map(Some)
        })
    }

    fn nodes(&self) -> BoxFuture<'_, Result<Option<Vec<String>>, BrokerError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let nodes: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(self.keys.nodes())
                .arg(now_ms(SystemTime::now()))
                .arg("+inf")
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            Ok(Some(nodes))
        })
    }
}
