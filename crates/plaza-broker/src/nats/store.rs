//! [`NatsStore`]: Plaza's [`Store`] over one JetStream stream, the write log ([`super::log`]).
//!
//! Writes are published to the log in call order by one writer task (everything waiting goes
//! out back to back, then the acknowledgements are awaited: JetStream's group commit). A write
//! is answered once this node has *folded* it: then its outcome (positions, or the value of an
//! existing idempotency key) is known, and its appends have been handed to this node's
//! subscribers. Every node folds every record, so subscribers on every node see a channel's
//! offsets in log order with no gap, and history reads are served from memory.
//!
//! Reads first wait until the fold has reached the log's end as JetStream reports it, so a node
//! never answers from behind a write another node already acknowledged.
//!
//! Durability is JetStream's: an acknowledged record is in the stream's file store (and, with
//! a replicated stream in a NATS cluster, on a quorum of servers). Each node keeps the folded
//! state in memory and refolds the log from its start when it starts (docs/SCALING.md).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use plaza_core::{ChannelName, Payload, Position};
use plaza_store::{
    AppendListener, BoxFuture, KvEntries, ReadResult, Store, StoreError, StoreStats, StreamAppend,
    StreamOptions, WriteBatch, WriteOutcome,
};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use super::Names;
use super::log::{Record, State};
use crate::{BrokerError, PublicationSink};

/// Most records the writer sends before it awaits their acknowledgements.
const MAX_PIPELINE: usize = 256;
/// How long a write waits to be folded after JetStream took it.
const FOLD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a read waits for the fold to reach the log's end.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);

type Reply = oneshot::Sender<Result<WriteOutcome, StoreError>>;

pub struct NatsStore {
    log: stream::Stream,
    shared: Arc<Shared>,
    next_request: AtomicU64,
    writes: mpsc::UnboundedSender<(u64, Vec<u8>)>,
}

/// What the writer, the fold and the callers share.
struct Shared {
    /// This process: records carrying it are answered by this node's fold.
    origin: u64,
    state: Mutex<State>,
    /// The last log sequence folded.
    applied: watch::Sender<u64>,
    pending: Mutex<HashMap<u64, Reply>>,
    listener: OnceLock<Arc<dyn AppendListener>>,
    sink: Arc<dyn PublicationSink>,
    appends: AtomicU64,
    commits: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn backend(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Backend(Arc::new(e))
}

fn random_u64() -> Result<u64, StoreError> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| StoreError::Random(e.to_string()))?;
    Ok(u64::from_le_bytes(bytes))
}

impl NatsStore {
    /// Creates the log stream if needed, starts the writer and the fold, and returns once the
    /// fold has reached the log's end.
    pub(super) async fn start(
        jetstream: jetstream::Context,
        names: Names,
        sink: Arc<dyn PublicationSink>,
        reconnected: Arc<Notify>,
    ) -> Result<Arc<Self>, BrokerError> {
        let config = stream::Config {
            name: names.log_stream(),
            description: Some("Plaza write log: history, inboxes, chat records".into()),
            subjects: vec![names.log_subject()],
            storage: stream::StorageType::File,
            ..Default::default()
        };
        let log = jetstream
            .get_or_create_stream(config.clone())
            .await
            .map_err(|e| BrokerError::Unavailable(format!("JetStream log stream: {e}")))?;
        let origin = random_u64().map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        let shared = Arc::new(Shared {
            origin,
            state: Mutex::new(State::default()),
            applied: watch::Sender::new(0),
            pending: Mutex::new(HashMap::new()),
            listener: OnceLock::new(),
            sink,
            appends: AtomicU64::new(0),
            commits: AtomicU64::new(0),
        });
        let (writes, requests) = mpsc::unbounded_channel();
        tokio::spawn(write(
            jetstream.clone(),
            names.log_subject(),
            Arc::clone(&shared),
            requests,
        ));
        let folder = Folder {
            jetstream,
            config,
            log: log.clone(),
            shared: Arc::clone(&shared),
            reconnected,
        };
        tokio::spawn(folder.run());
        let store = Arc::new(Self {
            log,
            shared,
            next_request: AtomicU64::new(1),
            writes,
        });
        let started = std::time::Instant::now();
        store
            .caught_up_within(Duration::from_secs(300))
            .await
            .map_err(|e| BrokerError::Unavailable(format!("folding the write log: {e}")))?;
        tracing::info!(
            records = *store.shared.applied.borrow(),
            took = ?started.elapsed(),
            "write log folded"
        );
        Ok(store)
    }

    /// Waits until this node has folded everything the log held when called.
    async fn caught_up(&self) -> Result<(), StoreError> {
        self.caught_up_within(CATCH_UP_TIMEOUT).await
    }

    async fn caught_up_within(&self, limit: Duration) -> Result<(), StoreError> {
        let info = self.log.get_info().await.map_err(backend)?;
        let end = info.state.last_sequence;
        let mut applied = self.shared.applied.subscribe();
        match tokio::time::timeout(limit, applied.wait_for(|a| *a >= end)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(StoreError::Closed),
            Err(_) => Err(StoreError::Runtime(format!(
                "the write log was not folded up to {end} within {limit:?}"
            ))),
        }
    }

    /// Queues a record; answered once folded. Queued at call time, so calls keep their order.
    fn submit(
        &self,
        creates: Vec<String>,
        batch: WriteBatch,
    ) -> BoxFuture<'static, Result<WriteOutcome, StoreError>> {
        if let Err(e) = batch.validate() {
            return Box::pin(std::future::ready(Err(e)));
        }
        // Every record carries a fresh epoch, used if it creates a stream. (Skipping it for
        // streams this node knows would be wrong after NATS lost the log: the record would
        // create its stream again with no epoch.)
        let epoch = match plaza_store::new_epoch() {
            Ok(epoch) => epoch,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let request = self.next_request.fetch_add(1, Relaxed);
        let record = Record {
            origin: self.shared.origin,
            request,
            now_ms: crate::shared::now_ms(SystemTime::now()),
            epoch,
            creates,
            batch,
        };
        let (reply, answer) = oneshot::channel();
        lock(&self.shared.pending).insert(request, reply);
        let queued = self.writes.send((request, record.encode()));
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            if queued.is_err() {
                lock(&shared.pending).remove(&request);
                return Err(StoreError::Closed);
            }
            match tokio::time::timeout(FOLD_TIMEOUT, answer).await {
                Ok(answer) => answer.map_err(|_| StoreError::Closed)?,
                Err(_) => {
                    lock(&shared.pending).remove(&request);
                    Err(StoreError::Runtime(format!(
                        "the write was not folded within {FOLD_TIMEOUT:?}; whether it was stored is unknown"
                    )))
                }
            }
        })
    }
}

/// Publishes queued records in order, back to back, then awaits their acknowledgements.
async fn write(
    jetstream: jetstream::Context,
    subject: String,
    shared: Arc<Shared>,
    mut requests: mpsc::UnboundedReceiver<(u64, Vec<u8>)>,
) {
    let mut waiting = Vec::new();
    while let Some(first) = requests.recv().await {
        waiting.push(first);
        while waiting.len() < MAX_PIPELINE {
            match requests.try_recv() {
                Ok(next) => waiting.push(next),
                Err(_) => break,
            }
        }
        let mut acks = Vec::with_capacity(waiting.len());
        for (request, record) in waiting.drain(..) {
            match jetstream
                .publish(subject.clone(), bytes::Bytes::from(record))
                .await
            {
                Ok(ack) => acks.push((request, ack)),
                Err(e) => fail(&shared, request, backend(e)),
            }
        }
        let mut stored = false;
        for (request, ack) in acks {
            match ack.await {
                Ok(_) => stored = true,
                // Not stored, or unknown (a timeout): the caller hears so unless the fold has
                // answered already.
                Err(e) => fail(&shared, request, backend(e)),
            }
        }
        if stored {
            shared.commits.fetch_add(1, Relaxed);
        }
    }
}

fn fail(shared: &Shared, request: u64, error: StoreError) {
    if let Some(reply) = lock(&shared.pending).remove(&request) {
        let _ = reply.send(Err(error));
    }
}

/// Folds the log into the shared state, for as long as the store lives.
struct Folder {
    jetstream: jetstream::Context,
    config: stream::Config,
    log: stream::Stream,
    shared: Arc<Shared>,
    reconnected: Arc<Notify>,
}

impl Folder {
    async fn run(mut self) {
        let mut identity = self.log.cached_info().created;
        let mut backoff = Duration::from_millis(100);
        // Records up to here are refolded after a reset: their subscribers were told to resync.
        let mut quiet_until = 0;
        loop {
            let mut messages = match self.messages().await {
                Ok(messages) => messages,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot read the write log");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    // NATS may have lost the stream (restarted without its store): make it again.
                    if let Ok(log) = self
                        .jetstream
                        .get_or_create_stream(self.config.clone())
                        .await
                    {
                        self.log = log;
                    }
                    let info = self.log.cached_info();
                    if info.created != identity {
                        identity = info.created;
                        quiet_until = info.state.last_sequence;
                        reset(&self.shared);
                    }
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            loop {
                tokio::select! {
                    message = messages.next() => match message {
                        Some(Ok(message)) => {
                            let seq = match message.info() {
                                Ok(info) => info.stream_sequence,
                                Err(e) => {
                                    tracing::warn!(error = %e, "write log message without metadata");
                                    continue;
                                }
                            };
                            apply(&self.shared, seq, &message.payload, seq > quiet_until);
                        }
                        // The ordered consumer does not survive every server restart ("consumer
                        // not found"): read on with a new one from where the fold stands.
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "reading the write log failed; reading again");
                            tokio::time::sleep(backoff).await;
                            break;
                        }
                        None => break,
                    },
                    () = self.reconnected.notified() => {
                        match self.log.get_info().await {
                            Ok(info) if info.created != identity
                                || info.state.last_sequence < *self.shared.applied.borrow() =>
                            {
                                identity = info.created;
                                quiet_until = info.state.last_sequence;
                                reset(&self.shared);
                            }
                            Ok(_) => {}
                            Err(e) => tracing::warn!(error = %e, "write log unreadable after a reconnect"),
                        }
                        break;
                    }
                }
            }
        }
    }

    /// A new ordered consumer from the record after the last one folded.
    async fn messages(&self) -> Result<consumer::pull::Ordered, BrokerError> {
        let start = *self.shared.applied.borrow() + 1;
        let deliver_policy = if start == 1 {
            consumer::DeliverPolicy::All
        } else {
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            }
        };
        let config = consumer::pull::OrderedConfig {
            deliver_policy,
            ..Default::default()
        };
        let consumer = self
            .log
            .create_consumer(config)
            .await
            .map_err(super::unavailable)?;
        consumer.messages().await.map_err(super::unavailable)
    }
}

/// Folds one record. `deliver`: hand its appends to this node's subscribers.
fn apply(shared: &Shared, seq: u64, payload: &[u8], deliver: bool) {
    if seq <= *shared.applied.borrow() {
        return;
    }
    match Record::decode(payload) {
        Ok(record) => {
            let (origin, request) = (record.origin, record.request);
            let mut state = lock(&shared.state);
            let (outcome, appended) = state.apply(record);
            if deliver && let Some(listener) = shared.listener.get() {
                for a in &appended {
                    listener.appended(&a.stream, &a.position, &a.payload);
                }
            }
            drop(state);
            if origin == shared.origin {
                shared.appends.fetch_add(appended.len() as u64, Relaxed);
                if let Some(reply) = lock(&shared.pending).remove(&request) {
                    let _ = reply.send(Ok(outcome));
                }
            }
        }
        Err(e) => tracing::error!(seq, error = %e, "write log record skipped"),
    }
    shared.applied.send_replace(seq);
}

/// The log was lost (NATS restarted without its store, or the stream was deleted): forget the
/// folded state, tell every subscriber of a stream to resynchronise, and fail the writes still
/// waiting (whether they were stored is unknown).
fn reset(shared: &Shared) {
    tracing::error!("the write log was recreated; history is lost and subscribers resynchronise");
    let names = {
        let mut state = lock(&shared.state);
        let names = state.stream_names();
        *state = State::default();
        names
    };
    shared.applied.send_replace(0);
    for name in names {
        shared.sink.gap(&name, None, true);
    }
    for (_, reply) in lock(&shared.pending).drain() {
        let _ = reply.send(Err(StoreError::Runtime(
            "the NATS write log was lost; the write may not have been stored".into(),
        )));
    }
}

impl Store for NatsStore {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn append(
        &self,
        channel: &ChannelName,
        payload: Payload,
        options: StreamOptions,
    ) -> BoxFuture<'static, Result<Position, StoreError>> {
        let written = self.submit(
            Vec::new(),
            WriteBatch {
                appends: vec![StreamAppend {
                    stream: channel.clone(),
                    payload,
                    options,
                }],
                ..WriteBatch::default()
            },
        );
        Box::pin(async move {
            match written.await? {
                WriteOutcome::Written(mut positions) => positions.pop().ok_or_else(|| {
                    StoreError::Corrupt("an append folded without a position".into())
                }),
                WriteOutcome::Exists(_) => Err(StoreError::Corrupt(
                    "an append folded as an existing key".into(),
                )),
            }
        })
    }

    fn read(
        &self,
        channel: &ChannelName,
        since: Option<Position>,
        limit: usize,
    ) -> BoxFuture<'_, Result<ReadResult, StoreError>> {
        let stream = channel.as_arc().clone();
        Box::pin(async move {
            self.caught_up().await?;
            if let Some(result) = lock(&self.shared.state).read(&stream, since.as_ref(), limit) {
                return Ok(result);
            }
            self.submit(vec![stream.to_string()], WriteBatch::default())
                .await?;
            lock(&self.shared.state)
                .read(&stream, since.as_ref(), limit)
                .ok_or_else(|| StoreError::Corrupt("a created stream is missing".into()))
        })
    }

    fn top(&self, channel: &ChannelName) -> BoxFuture<'_, Result<Option<Position>, StoreError>> {
        let stream = channel.as_arc().clone();
        Box::pin(async move {
            self.caught_up().await?;
            Ok(lock(&self.shared.state).top(&stream))
        })
    }

    /// Each node trims its own folded copy; offsets and epochs are untouched, so nodes agree on
    /// everything but which expired entries are still kept for a moment.
    fn trim_expired(&self, now: SystemTime) -> BoxFuture<'_, Result<u64, StoreError>> {
        let dropped = lock(&self.shared.state).trim_expired(crate::shared::now_ms(now));
        Box::pin(std::future::ready(Ok(dropped)))
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            appends: self.shared.appends.load(Relaxed),
            commits: self.shared.commits.load(Relaxed),
        }
    }

    fn write(&self, batch: WriteBatch) -> BoxFuture<'static, Result<WriteOutcome, StoreError>> {
        self.submit(Vec::new(), batch)
    }

    fn kv_get(&self, key: &str) -> BoxFuture<'_, Result<Option<Vec<u8>>, StoreError>> {
        let key = key.to_owned();
        Box::pin(async move {
            self.caught_up().await?;
            Ok(lock(&self.shared.state).kv_get(&key))
        })
    }

    fn kv_scan(&self, prefix: &str, limit: usize) -> BoxFuture<'_, Result<KvEntries, StoreError>> {
        let prefix = prefix.to_owned();
        Box::pin(async move {
            self.caught_up().await?;
            Ok(lock(&self.shared.state).kv_scan(&prefix, limit))
        })
    }

    /// The fold hands every append to the listener, in log order, on every node.
    fn set_listener(&self, listener: Arc<dyn AppendListener>) -> bool {
        self.shared.listener.set(listener).is_ok()
    }
}
