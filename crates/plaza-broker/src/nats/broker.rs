//! [`NatsBroker`]: publications without history, ephemeral events, presence and the node list
//! between nodes through NATS. (Publications with history travel in the write log, see
//! [`super::NatsStore`].)
//!
//! A node subscribes to a channel's core subject once, however many local subscribers it has.
//! Subscribe and unsubscribe are serialised and an unsubscribe asks the node again whether the
//! channel is still wanted, so a client joining while the last one leaves is never left deaf. A
//! subscription is confirmed by the server (a flush) before `subscribe` returns, so a
//! publication sent after a client's subscribe was acknowledged reaches it. The NATS client
//! resubscribes by itself after a reconnect; what is published meanwhile without history is
//! lost, as on one node without a connection.
//!
//! Presence entries and node entries live in one JetStream stream that keeps
//! the latest message per subject and drops messages older than the presence TTL: live nodes
//! republish theirs every third of it, a crashed node's entries age out. A removed entry is
//! overwritten by an empty message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use plaza_core::{ChannelName, ClientInfo, ConnId, Publication};

use super::{Names, NatsOptions, unavailable};
use crate::shared::{
    client_json, clients_from_json, conn_id_base, event_message, plain_message, relay,
};
use crate::{BoxFuture, Broker, BrokerError, PublicationSink};

/// How long a listing of presence or nodes waits for the entries it was promised.
const LIST_TIMEOUT: Duration = Duration::from_secs(5);

pub struct NatsBroker {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    live: stream::Stream,
    /// To make the live stream again if NATS lost it.
    live_config: stream::Config,
    names: Names,
    sink: Arc<dyn PublicationSink>,
    node_id: String,
    conn_id_base: u64,
    presence_ttl: Duration,
    /// This node's channel subscriptions: the task reading each. Changes are serialised.
    subscriptions: tokio::sync::Mutex<HashMap<Arc<str>, tokio::task::JoinHandle<()>>>,
    /// Presence entries this node keeps alive: subject → client JSON.
    present: Mutex<HashMap<String, String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl NatsBroker {
    pub(super) async fn start(
        client: async_nats::Client,
        jetstream: jetstream::Context,
        names: Names,
        options: NatsOptions,
        sink: Arc<dyn PublicationSink>,
    ) -> Result<Arc<Self>, BrokerError> {
        let presence_ttl = options.presence_ttl.max(Duration::from_secs(1));
        let config = stream::Config {
            name: names.live_stream(),
            description: Some("Plaza presence and live nodes".into()),
            subjects: vec![names.live_subjects()],
            storage: stream::StorageType::File,
            max_messages_per_subject: 1,
            max_age: presence_ttl,
            ..Default::default()
        };
        let live = jetstream
            .get_or_create_stream(config.clone())
            .await
            .map_err(|e| BrokerError::Unavailable(format!("JetStream presence stream: {e}")))?;
        let counter = stream::Config {
            name: names.counter_stream(),
            description: Some("Plaza node numbers: the sequence counts starting nodes".into()),
            subjects: vec![names.node_counter()],
            storage: stream::StorageType::File,
            max_messages: 1,
            ..Default::default()
        };
        jetstream
            .get_or_create_stream(counter)
            .await
            .map_err(|e| BrokerError::Unavailable(format!("JetStream node counter: {e}")))?;
        let number = jetstream
            .publish(names.node_counter(), bytes::Bytes::new())
            .await
            .map_err(unavailable)?
            .await
            .map_err(unavailable)?
            .sequence;
        let broker = Arc::new(Self {
            client,
            jetstream,
            live,
            live_config: config,
            names,
            sink,
            node_id: options.node_id,
            conn_id_base: conn_id_base(number),
            presence_ttl,
            subscriptions: tokio::sync::Mutex::new(HashMap::new()),
            present: Mutex::new(HashMap::new()),
        });
        broker.heartbeat().await?;
        tokio::spawn(keep_alive(Arc::downgrade(&broker)));
        tracing::info!(node = %broker.node_id, conn_id_base = broker.conn_id_base, "joined through NATS");
        Ok(broker)
    }

    async fn put_live(&self, subject: String, value: String) -> Result<(), BrokerError> {
        self.jetstream
            .publish(subject, value.into())
            .await
            .map_err(unavailable)?
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Registers this node as alive and refreshes its presence entries.
    async fn heartbeat(&self) -> Result<(), BrokerError> {
        let mut entries: Vec<(String, String)> = lock(&self.present)
            .iter()
            .map(|(s, v)| (s.clone(), v.clone()))
            .collect();
        entries.push((self.names.node(&self.node_id), self.node_id.clone()));
        let mut acks = Vec::with_capacity(entries.len());
        for (subject, value) in entries {
            acks.push(
                self.jetstream
                    .publish(subject, value.into())
                    .await
                    .map_err(unavailable)?,
            );
        }
        for ack in acks {
            ack.await.map_err(unavailable)?;
        }
        Ok(())
    }

    /// The latest non-empty value of every subject matching `filter` in the live stream.
    async fn list_live(&self, filter: String) -> Result<Vec<String>, BrokerError> {
        let config = consumer::pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            ..Default::default()
        };
        let consumer = self
            .live
            .create_consumer(config)
            .await
            .map_err(unavailable)?;
        let pending = consumer.cached_info().num_pending;
        let mut values = Vec::new();
        if pending == 0 {
            return Ok(values);
        }
        let mut messages = consumer.messages().await.map_err(unavailable)?;
        for _ in 0..pending {
            let message = tokio::time::timeout(LIST_TIMEOUT, messages.next())
                .await
                .map_err(|_| BrokerError::Unavailable("a listing did not complete".into()))?
                .ok_or_else(|| BrokerError::Unavailable("a listing ended early".into()))?
                .map_err(unavailable)?;
            if !message.payload.is_empty() {
                let value = String::from_utf8(message.payload.to_vec())
                    .map_err(|_| BrokerError::Corrupt("a non-UTF-8 live entry".into()))?;
                values.push(value);
            }
        }
        Ok(values)
    }

    async fn publish_raw(&self, channel: &str, message: String) -> Result<(), BrokerError> {
        self.client
            .publish(self.names.channel(channel), message.into())
            .await
            .map_err(unavailable)
    }
}

/// Refreshes this node's place in the node list and its presence entries.
async fn keep_alive(broker: Weak<NatsBroker>) {
    loop {
        let Some(period) = broker.upgrade().map(|b| b.presence_ttl / 3) else {
            return;
        };
        tokio::time::sleep(period).await;
        let Some(this) = broker.upgrade() else { return };
        if let Err(e) = this.heartbeat().await {
            tracing::warn!(error = %e, "NATS heartbeat failed");
            // NATS may have lost the stream (restarted without its store): make it again.
            if let Err(e) = this
                .jetstream
                .get_or_create_stream(this.live_config.clone())
                .await
            {
                tracing::warn!(error = %e, "NATS presence stream unavailable");
            }
        }
    }
}

impl Broker for NatsBroker {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn publish(&self, publication: Publication) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            // Publications with a position travel in the write log, folded by every node.
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
            let mut subscriptions = self.subscriptions.lock().await;
            if subscriptions.contains_key(&channel) {
                return Ok(());
            }
            let mut subscriber = self
                .client
                .subscribe(self.names.channel(&channel))
                .await
                .map_err(unavailable)?;
            self.client.flush().await.map_err(unavailable)?;
            let sink = Arc::clone(&self.sink);
            let name = ChannelName::from_stored(&channel);
            // The task holds the sink, not the broker: it ends with its subscription.
            let task = tokio::spawn(async move {
                while let Some(message) = subscriber.next().await {
                    relay(&*sink, &name, &message.payload, "NATS");
                }
            });
            subscriptions.insert(channel, task);
            Ok(())
        })
    }

    fn unsubscribe(&self, channel: Arc<str>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let mut subscriptions = self.subscriptions.lock().await;
            if self.sink.interested(&channel) {
                return Ok(());
            }
            // Aborting the task drops its subscriber, which unsubscribes from NATS.
            if let Some(task) = subscriptions.remove(&channel) {
                task.abort();
            }
            Ok(())
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
            let subject = self.names.presence(&channel, client.client);
            let info = client_json(&client);
            lock(&self.present).insert(subject.clone(), info.clone());
            self.put_live(subject, info).await
        })
    }

    fn presence_remove(
        &self,
        channel: Arc<str>,
        client: ConnId,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let subject = self.names.presence(&channel, client);
            lock(&self.present).remove(&subject);
            self.put_live(subject, String::new()).await
        })
    }

    fn presence_list(
        &self,
        channel: Arc<str>,
    ) -> BoxFuture<'_, Result<Option<Vec<ClientInfo>>, BrokerError>> {
        Box::pin(async move {
            let values = self.list_live(self.names.presence_of(&channel)).await?;
            clients_from_json(&channel, &values).map(Some)
        })
    }

    fn nodes(&self) -> BoxFuture<'_, Result<Option<Vec<String>>, BrokerError>> {
        Box::pin(async move {
            let mut nodes = self.list_live(self.names.nodes()).await?;
            nodes.sort();
            Ok(Some(nodes))
        })
    }
}
