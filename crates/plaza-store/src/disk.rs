//! Streams in one redb file, written through one writer task with group commit.
//!
//! # Why one writer
//!
//! A durable commit costs an fsync (0.1–0.2 ms on the build VM, more on real disks), so one commit
//! per publication caps a server at a few thousand publishes per second. redb also runs one write
//! transaction at a time anyway. So every write (append, stream creation, expiry) is a message to
//! one writer task. The task takes *every* request waiting at that moment, applies them all in one
//! write transaction, commits it durably, and only then answers each waiter. While that commit's
//! fsync runs, new requests queue up and form the next batch: the busier the server, the larger
//! the batches, with no timer and no added latency when it is quiet.
//!
//! The fsync blocks, so the transaction runs on Tokio's blocking pool; the writer task itself only
//! waits, which keeps the runtime's worker threads free for connections.
//!
//! # Layout
//!
//! - `stream_meta`: channel name -> the stream's id, epoch, `first`/`top` offsets, last stamp and
//!   ttl (see [`Meta::encode`]).
//! - `stream_entries`: `(stream id, offset)` -> stamp (ms) followed by the payload's JSON text. A
//!   numeric id rather than the channel name keeps keys at 16 bytes, and a stream recreated after
//!   being lost never meets entries of the one it replaces.
//! - `counters`: the next stream id.
//!
//! Every value read back is checked: a short or malformed value is a [`StoreError::Corrupt`], not a
//! panic.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use plaza_core::{ChannelName, Payload};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::clock::{duration_ms, unix_ms};
use crate::stream::{self, expired, plan_append, plan_read};
use crate::{
    AppendListener, BoxFuture, Clock, KvEntries, Position, ReadResult, Store, StoreError,
    StoreStats, StreamOptions, SystemClock, WriteBatch, WriteOutcome,
};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("stream_meta");
const ENTRIES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("stream_entries");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// The key-value table of [`WriteBatch::kv`].
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const NEXT_STREAM_ID: &str = "next_stream_id";

/// Most requests in one transaction. Bounds the latency a single commit adds for its first waiter
/// and the memory a batch holds; at ~200k durable messages/s it is a few milliseconds of work.
const MAX_BATCH: usize = 1024;

/// A [`Store`] in a redb file; the default store.
///
/// Open it inside a Tokio runtime: it spawns its writer task there. Appends resolve once their
/// transaction is durable. Dropping an append's future does not cancel it: once queued, it is
/// written.
pub struct RedbStore {
    db: Arc<Database>,
    listener: Listener,
    /// Unbounded, so `append` can queue at call time without waiting: callers bound what they
    /// keep in flight (a connection caps its pending publishes).
    requests: mpsc::UnboundedSender<Request>,
    counters: Arc<Counters>,
    runtime: Handle,
    writer: JoinHandle<()>,
}

/// Set once, after the store is open (the listener usually needs the store's owner to exist).
type Listener = Arc<OnceLock<Arc<dyn AppendListener>>>;

#[derive(Default)]
struct Counters {
    appends: AtomicU64,
    commits: AtomicU64,
}

/// A write for the writer task, with where to send its answer.
enum Request {
    Append {
        channel: Arc<str>,
        payload: Payload,
        options: StreamOptions,
        reply: oneshot::Sender<Result<Position, StoreError>>,
    },
    /// Create the stream if it does not exist (a read found none), answer its top.
    Create {
        channel: Arc<str>,
        reply: oneshot::Sender<Result<Position, StoreError>>,
    },
    TrimExpired {
        now_ms: u64,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    Write {
        batch: WriteBatch,
        reply: oneshot::Sender<Result<WriteOutcome, StoreError>>,
    },
}

impl RedbStore {
    /// The file the store keeps in its data directory.
    pub const FILE_NAME: &'static str = "plaza.redb";

    /// Opens (or creates) the store in `dir`, creating the directory if needed.
    pub async fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with_clock(dir, Arc::new(SystemClock)).await
    }

    /// Like [`RedbStore::open`], stamping publications with `clock` (tests use a
    /// [`ManualClock`](crate::ManualClock)).
    pub async fn open_with_clock(
        dir: impl AsRef<Path>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        // A handle rather than `tokio::spawn`, so use outside a runtime is an error, not a panic.
        let runtime = Handle::try_current().map_err(|e| StoreError::Runtime(e.to_string()))?;
        let path = dir.as_ref().join(Self::FILE_NAME);
        let dir = dir.as_ref().to_path_buf();
        let db = run_blocking(&runtime, move || {
            std::fs::create_dir_all(&dir)?;
            let db = Database::create(&path)?;
            // Create the tables up front, so read transactions always find them.
            let txn = db.begin_write()?;
            txn.open_table(META)?;
            txn.open_table(ENTRIES)?;
            txn.open_table(COUNTERS)?;
            txn.open_table(KV)?;
            txn.commit()?;
            Ok(db)
        })
        .await?;
        let db = Arc::new(db);
        let counters = Arc::new(Counters::default());
        let listener = Listener::default();
        let (requests, queue) = mpsc::unbounded_channel();
        let writer = runtime.spawn(run_writer(
            db.clone(),
            queue,
            clock,
            counters.clone(),
            listener.clone(),
            runtime.clone(),
        ));
        Ok(Self {
            db,
            listener,
            requests,
            counters,
            runtime,
            writer,
        })
    }

    /// Stops the writer after the requests already queued, and releases the file, so it can be
    /// opened again (redb locks it while open). Reads still running on the blocking pool keep the
    /// file open until they finish.
    pub async fn close(self) -> Result<(), StoreError> {
        let RedbStore {
            db,
            requests,
            writer,
            ..
        } = self;
        // The writer stops when its queue is closed and drained.
        drop(requests);
        writer
            .await
            .map_err(|e| StoreError::Runtime(format!("store writer failed: {e}")))?;
        drop(db);
        Ok(())
    }

    /// Queues a request for the writer now, and returns the future of its answer.
    fn enqueue<T: Send + 'static>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Request,
    ) -> BoxFuture<'static, Result<T, StoreError>> {
        let (reply, answer) = oneshot::channel();
        let queued = self.requests.send(request(reply)).is_ok();
        Box::pin(async move {
            if !queued {
                return Err(StoreError::Closed);
            }
            answer.await.map_err(|_| StoreError::Closed)?
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        run_blocking(&self.runtime, move || f(&db)).await
    }
}

/// Runs blocking storage work on the blocking pool, so an fsync or a cold page read never stalls
/// a runtime worker that is serving connections.
async fn run_blocking<T: Send + 'static>(
    runtime: &Handle,
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    runtime
        .spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Runtime(format!("storage task failed: {e}")))?
}

impl Store for RedbStore {
    fn name(&self) -> &'static str {
        "redb"
    }

    fn append(
        &self,
        channel: &ChannelName,
        payload: Payload,
        options: StreamOptions,
    ) -> BoxFuture<'static, Result<Position, StoreError>> {
        let channel = channel.as_arc().clone();
        self.enqueue(move |reply| Request::Append {
            channel,
            payload,
            options,
            reply,
        })
    }

    fn read(
        &self,
        channel: &ChannelName,
        since: Option<Position>,
        limit: usize,
    ) -> BoxFuture<'_, Result<ReadResult, StoreError>> {
        let channel = channel.as_arc().clone();
        Box::pin(async move {
            // A read transaction sees a snapshot and never waits for the writer; only a missing
            // stream needs the writer, to create it. The second read then finds it (streams are
            // never deleted).
            for _ in 0..2 {
                let (ch, s) = (channel.clone(), since.clone());
                let found = self
                    .blocking(move |db| read_stream(db, &ch, s.as_ref(), limit))
                    .await?;
                if let Some(result) = found {
                    return Ok(result);
                }
                let ch = channel.clone();
                self.enqueue(move |reply| Request::Create { channel: ch, reply })
                    .await?;
            }
            Err(StoreError::Corrupt(format!(
                "stream {channel:?} is missing right after it was created"
            )))
        })
    }

    fn top(&self, channel: &ChannelName) -> BoxFuture<'_, Result<Option<Position>, StoreError>> {
        let channel = channel.as_arc().clone();
        Box::pin(self.blocking(move |db| {
            let txn = db.begin_read()?;
            let meta = txn.open_table(META)?;
            let found = meta
                .get(&*channel)?
                .map(|v| Meta::decode(&channel, v.value()))
                .transpose()?;
            Ok(found.map(|m| m.position()))
        }))
    }

    fn trim_expired(&self, now: SystemTime) -> BoxFuture<'_, Result<u64, StoreError>> {
        let now_ms = unix_ms(now);
        self.enqueue(move |reply| Request::TrimExpired { now_ms, reply })
    }

    fn write(&self, batch: WriteBatch) -> BoxFuture<'static, Result<WriteOutcome, StoreError>> {
        self.enqueue(move |reply| Request::Write { batch, reply })
    }

    fn kv_get(&self, key: &str) -> BoxFuture<'_, Result<Option<Vec<u8>>, StoreError>> {
        let key = key.to_owned();
        Box::pin(self.blocking(move |db| {
            let txn = db.begin_read()?;
            let kv = txn.open_table(KV)?;
            Ok(kv.get(key.as_str())?.map(|v| v.value().to_vec()))
        }))
    }

    fn kv_scan(&self, prefix: &str, limit: usize) -> BoxFuture<'_, Result<KvEntries, StoreError>> {
        let prefix = prefix.to_owned();
        Box::pin(self.blocking(move |db| {
            let txn = db.begin_read()?;
            let kv = txn.open_table(KV)?;
            let mut found = Vec::new();
            for item in kv.range(prefix.as_str()..)? {
                let (key, value) = item?;
                if !key.value().starts_with(prefix.as_str()) || found.len() >= limit {
                    break;
                }
                found.push((key.value().to_owned(), value.value().to_vec()));
            }
            Ok(found)
        }))
    }

    fn set_listener(&self, listener: Arc<dyn AppendListener>) -> bool {
        self.listener.set(listener).is_ok()
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            appends: self.counters.appends.load(Ordering::Relaxed),
            commits: self.counters.commits.load(Ordering::Relaxed),
        }
    }
}

/// The writer task: one batch per loop, one transaction per batch.
async fn run_writer(
    db: Arc<Database>,
    mut queue: mpsc::UnboundedReceiver<Request>,
    clock: Arc<dyn Clock>,
    counters: Arc<Counters>,
    listener: Listener,
    runtime: Handle,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // `recv_many` waits for the first request, then takes every other one already queued.
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let requests = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
        // One clock reading per batch: its publications were stored at the same moment.
        let now_ms = unix_ms(clock.now());
        let (db, counters, listener) = (db.clone(), counters.clone(), listener.clone());
        // Waiting here (rather than spawning and moving on) is what makes the next batch: while
        // this one commits, new requests queue up. If the batch panics, its reply senders are
        // dropped and every waiter gets `StoreError::Closed`.
        let committed = runtime
            .spawn_blocking(move || commit_batch(&db, requests, now_ms, &counters, &listener))
            .await;
        // Answered from this task, on a runtime thread: waking the waiters from here is a local
        // queue push, while a wake from the blocking thread costs a cross-thread unpark each.
        if let Ok(replies) = committed {
            for reply in replies {
                reply.send();
            }
        }
    }
}

/// An answer computed in the transaction, sent only after it commits.
enum Reply {
    Position(
        oneshot::Sender<Result<Position, StoreError>>,
        Result<Position, StoreError>,
        /* the appended publication, for an append */ Option<(Arc<str>, Payload)>,
    ),
    Count(
        oneshot::Sender<Result<u64, StoreError>>,
        Result<u64, StoreError>,
    ),
    Write(
        oneshot::Sender<Result<WriteOutcome, StoreError>>,
        Result<WriteOutcome, StoreError>,
        /* the appended publications, for the listener */ Vec<(Arc<str>, Payload)>,
    ),
}

impl Reply {
    fn fail(self, error: &StoreError) -> Self {
        match self {
            Reply::Position(tx, _, append) => Reply::Position(tx, Err(error.clone()), append),
            Reply::Count(tx, _) => Reply::Count(tx, Err(error.clone())),
            Reply::Write(tx, _, _) => Reply::Write(tx, Err(error.clone()), Vec::new()),
        }
    }

    /// How many publications this reply's request appended.
    fn appended(&self) -> usize {
        match self {
            Reply::Position(_, Ok(_), Some(_)) => 1,
            Reply::Write(_, Ok(WriteOutcome::Written(positions)), _) => positions.len(),
            _ => 0,
        }
    }

    /// Tells the listener about a successful append.
    fn notify(&self, listener: &dyn AppendListener) {
        match self {
            Reply::Position(_, Ok(position), Some((channel, payload))) => {
                listener.appended(channel, position, payload);
            }
            Reply::Write(_, Ok(WriteOutcome::Written(positions)), appended) => {
                for (position, (stream, payload)) in positions.iter().zip(appended) {
                    listener.appended(stream, position, payload);
                }
            }
            _ => {}
        }
    }

    fn send(self) {
        // A waiter that gave up (dropped its future) no longer needs the answer.
        match self {
            Reply::Position(tx, result, _) => drop(tx.send(result)),
            Reply::Count(tx, result) => drop(tx.send(result)),
            Reply::Write(tx, result, _) => drop(tx.send(result)),
        }
    }
}

impl Request {
    fn into_failed_reply(self, error: &StoreError) -> Reply {
        match self {
            Request::Append { reply, .. } => Reply::Position(reply, Err(error.clone()), None),
            Request::Create { reply, .. } => Reply::Position(reply, Err(error.clone()), None),
            Request::TrimExpired { reply, .. } => Reply::Count(reply, Err(error.clone())),
            Request::Write { reply, .. } => Reply::Write(reply, Err(error.clone()), Vec::new()),
        }
    }
}

/// Applies a batch in one durable transaction, tells the listener about each append in order, and
/// returns the answer to every request (sent by the writer task).
fn commit_batch(
    db: &Database,
    requests: Vec<Request>,
    now_ms: u64,
    counters: &Counters,
    listener: &Listener,
) -> Vec<Reply> {
    let mut replies = Vec::with_capacity(requests.len());
    let mut pending = requests.into_iter();
    let outcome = write_batch(db, &mut pending, now_ms, &mut replies);
    let replies: Vec<Reply> = match outcome {
        Ok(committed) => {
            if committed {
                counters.commits.fetch_add(1, Ordering::Relaxed);
            }
            let appended: usize = replies.iter().map(Reply::appended).sum();
            counters
                .appends
                .fetch_add(appended as u64, Ordering::Relaxed);
            if let Some(listener) = listener.get() {
                for reply in &replies {
                    reply.notify(listener.as_ref());
                }
            }
            replies
        }
        // Nothing of the batch is stored: every request gets the error, answered or not yet.
        Err(error) => replies
            .into_iter()
            .map(|r| r.fail(&error))
            .chain(pending.map(|r| r.into_failed_reply(&error)))
            .collect(),
    };
    replies
}

/// Applies requests until done or until the storage fails. Returns whether a transaction was
/// committed (a batch that changed nothing is aborted, costing no fsync).
///
/// The nested results separate two kinds of failure: the outer one (storage) fails the whole
/// batch; the inner one (corrupt data in one stream) fails only its request.
fn write_batch(
    db: &Database,
    requests: &mut std::vec::IntoIter<Request>,
    now_ms: u64,
    replies: &mut Vec<Reply>,
) -> Result<bool, StoreError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    // Saves the allocator state with each commit, so reopening after a crash (kill -9) takes
    // milliseconds instead of a walk of the whole file. Group commit pays this once per batch.
    txn.set_quick_repair(true);
    let mut changed = false;
    {
        let mut tables = Tables {
            meta: txn.open_table(META)?,
            entries: txn.open_table(ENTRIES)?,
            counters: txn.open_table(COUNTERS)?,
            kv: txn.open_table(KV)?,
            touched: HashMap::new(),
        };
        for request in requests.by_ref() {
            match request {
                Request::Append {
                    channel,
                    payload,
                    options,
                    reply,
                } => match tables.append(&channel, &payload, options, now_ms) {
                    Ok(result) => {
                        changed |= result.is_ok();
                        replies.push(Reply::Position(reply, result, Some((channel, payload))));
                    }
                    Err(fatal) => {
                        replies.push(Reply::Position(reply, Err(fatal.clone()), None));
                        return Err(fatal);
                    }
                },
                Request::Create { channel, reply } => match tables.create(&channel) {
                    Ok(result) => {
                        changed |= matches!(result, Ok((_, true)));
                        replies.push(Reply::Position(reply, result.map(|(p, _)| p), None));
                    }
                    Err(fatal) => {
                        replies.push(Reply::Position(reply, Err(fatal.clone()), None));
                        return Err(fatal);
                    }
                },
                Request::Write { batch, reply } => {
                    let appended: Vec<(Arc<str>, Payload)> = batch
                        .appends
                        .iter()
                        .map(|a| (a.stream.as_arc().clone(), a.payload.clone()))
                        .collect();
                    match tables.write(batch, now_ms) {
                        Ok(result) => {
                            changed |= matches!(result, Ok(WriteOutcome::Written(_)));
                            replies.push(Reply::Write(reply, result, appended));
                        }
                        Err(fatal) => {
                            replies.push(Reply::Write(reply, Err(fatal.clone()), Vec::new()));
                            return Err(fatal);
                        }
                    }
                }
                Request::TrimExpired { now_ms, reply } => {
                    match tables.flush().and_then(|()| tables.trim_expired(now_ms)) {
                        Ok((removed, damage)) => {
                            // Healthy streams are trimmed even when a damaged one is reported.
                            changed |= removed > 0;
                            replies.push(Reply::Count(reply, damage.map_or(Ok(removed), Err)));
                        }
                        Err(fatal) => {
                            replies.push(Reply::Count(reply, Err(fatal.clone())));
                            return Err(fatal);
                        }
                    }
                }
            }
        }
        tables.flush()?;
    }
    if changed {
        txn.commit()?;
    } else {
        txn.abort()?;
    }
    Ok(changed)
}

/// The open tables of one write transaction.
struct Tables<'txn> {
    meta: Table<'txn, &'static str, &'static [u8]>,
    entries: Table<'txn, (u64, u64), &'static [u8]>,
    counters: Table<'txn, &'static str, u64>,
    kv: Table<'txn, &'static str, &'static [u8]>,
    /// Streams appended to in this batch: their metadata is read once and written once per
    /// batch ([`Tables::flush`]), and entries pushed out by `max_len` are removed as one range,
    /// instead of a read, a write and a delete per append.
    touched: HashMap<String, Touched>,
}

/// A stream's metadata as this batch has left it.
struct Touched {
    meta: Meta,
    /// `first` as stored before the batch: entries from here up to `meta.first - 1` must go.
    first_stored: u64,
}

/// A request's result inside a transaction: outer error = storage (fails the batch), inner error
/// = this request only.
type Nested<T> = Result<Result<T, StoreError>, StoreError>;

impl Tables<'_> {
    fn load(&self, channel: &str) -> Nested<Option<Meta>> {
        Ok(self
            .meta
            .get(channel)?
            .map(|v| Meta::decode(channel, v.value()))
            .transpose())
    }

    /// A new, empty stream with a fresh id and epoch. Not stored yet.
    fn new_stream(&mut self) -> Nested<Meta> {
        let epoch = match stream::new_epoch() {
            Ok(epoch) => epoch,
            Err(e) => return Ok(Err(e)),
        };
        let id = self.counters.get(NEXT_STREAM_ID)?.map_or(1, |v| v.value());
        self.counters.insert(NEXT_STREAM_ID, id.saturating_add(1))?;
        Ok(Ok(Meta {
            id,
            top: 0,
            first: 1,
            last_ms: 0,
            ttl_ms: None,
            epoch,
        }))
    }

    fn append(
        &mut self,
        channel: &str,
        payload: &Payload,
        options: StreamOptions,
        now_ms: u64,
    ) -> Nested<Position> {
        if !self.touched.contains_key(channel) {
            let meta = match self.load(channel)? {
                Ok(Some(meta)) => meta,
                Ok(None) => match self.new_stream()? {
                    Ok(meta) => meta,
                    Err(e) => return Ok(Err(e)),
                },
                Err(e) => return Ok(Err(e)),
            };
            let first_stored = meta.first;
            self.touched
                .insert(channel.to_owned(), Touched { meta, first_stored });
        }
        let Some(Touched { meta, .. }) = self.touched.get_mut(channel) else {
            return Ok(Err(StoreError::Corrupt(format!(
                "stream {channel:?} vanished inside its batch"
            ))));
        };
        let plan = match plan_append(meta.top, meta.first, options.max_len) {
            Ok(plan) => plan,
            Err(e) => return Ok(Err(e)),
        };
        // Entries pushed out (`plan.drop`) are removed by `flush`, as one range per stream.
        meta.last_ms = stream::stamp(now_ms, meta.last_ms);
        if plan.store {
            let mut value = Vec::with_capacity(8 + payload.len());
            value.extend_from_slice(&meta.last_ms.to_be_bytes());
            value.extend_from_slice(payload.as_bytes());
            self.entries
                .insert((meta.id, plan.offset), value.as_slice())?;
        }
        meta.top = plan.offset;
        meta.first = plan.first;
        meta.ttl_ms = options.ttl.map(duration_ms);
        Ok(Ok(meta.position()))
    }

    /// One [`WriteBatch`]: checked, then every stream loaded (or created), so a damaged stream
    /// fails the request before anything of it is written; then the appends and the key-value
    /// writes.
    fn write(&mut self, batch: WriteBatch, now_ms: u64) -> Nested<WriteOutcome> {
        if let Err(e) = batch.validate() {
            return Ok(Err(e));
        }
        if let Some(key) = &batch.unless_exists
            && let Some(value) = self.kv.get(key.as_str())?
        {
            return Ok(Ok(WriteOutcome::Exists(value.value().to_vec())));
        }
        for append in &batch.appends {
            let channel = append.stream.as_str();
            if self.touched.contains_key(channel) {
                continue;
            }
            let meta = match self.load(channel)? {
                Ok(Some(meta)) => meta,
                Ok(None) => match self.new_stream()? {
                    Ok(meta) => meta,
                    Err(e) => return Ok(Err(e)),
                },
                Err(e) => return Ok(Err(e)),
            };
            let first_stored = meta.first;
            self.touched
                .insert(channel.to_owned(), Touched { meta, first_stored });
        }
        let mut positions = Vec::with_capacity(batch.appends.len());
        for append in &batch.appends {
            match self.append(
                append.stream.as_str(),
                &append.payload,
                append.options,
                now_ms,
            )? {
                Ok(position) => positions.push(position),
                // Cannot happen after the loads above; kept an error rather than a panic.
                Err(e) => return Ok(Err(e)),
            }
        }
        for (key, value) in &batch.kv {
            match value {
                Some(value) => {
                    self.kv.insert(key.as_str(), value.as_slice())?;
                }
                None => {
                    self.kv.remove(key.as_str())?;
                }
            }
        }
        for (key, indexes) in &batch.offsets {
            let value = WriteBatch::offsets_value(&positions, indexes);
            self.kv.insert(key.as_str(), value.as_slice())?;
        }
        Ok(Ok(WriteOutcome::Written(positions)))
    }

    /// Writes the metadata of every stream this batch appended to, and removes the entries its
    /// appends pushed out. Runs before the commit and before anything that reads the metadata
    /// table directly.
    fn flush(&mut self) -> Result<(), StoreError> {
        for (channel, touched) in std::mem::take(&mut self.touched) {
            let Touched { meta, first_stored } = touched;
            if meta.first > first_stored {
                self.remove_range(meta.id, first_stored, meta.first - 1)?;
            }
            self.meta
                .insert(channel.as_str(), meta.encode().as_slice())?;
        }
        Ok(())
    }

    /// The stream's top, creating the stream first if needed; also says whether it was created.
    fn create(&mut self, channel: &str) -> Nested<(Position, bool)> {
        if let Some(touched) = self.touched.get(channel) {
            return Ok(Ok((touched.meta.position(), false)));
        }
        match self.load(channel)? {
            Ok(Some(meta)) => Ok(Ok((meta.position(), false))),
            Ok(None) => match self.new_stream()? {
                Ok(meta) => {
                    self.meta.insert(channel, meta.encode().as_slice())?;
                    Ok(Ok((meta.position(), true)))
                }
                Err(e) => Ok(Err(e)),
            },
            Err(e) => Ok(Err(e)),
        }
    }

    fn remove_range(&mut self, id: u64, from: u64, to: u64) -> Result<(), StoreError> {
        // The usual case (one publication pushed out by one append) is a plain delete; a large
        // range (max_len lowered, a long-idle stream expiring) is one pass over the range.
        if to - from < 8 {
            for offset in from..=to {
                self.entries.remove((id, offset))?;
            }
        } else {
            self.entries
                .retain_in((id, from)..=(id, to), |_, _| false)?;
        }
        Ok(())
    }

    /// Drops expired publications of every stream with a ttl, and returns how many, with the
    /// first damage found. A stream with corrupt data is skipped (and reported) so it cannot stop
    /// the others from expiring.
    fn trim_expired(&mut self, now_ms: u64) -> Result<(u64, Option<StoreError>), StoreError> {
        let mut with_ttl = Vec::new();
        let mut corrupt = None;
        for item in self.meta.iter()? {
            let (channel, value) = item?;
            match Meta::decode(channel.value(), value.value()) {
                Ok(meta) if meta.ttl_ms.is_some() && meta.first <= meta.top => {
                    with_ttl.push((channel.value().to_owned(), meta));
                }
                Ok(_) => {}
                Err(e) => {
                    corrupt.get_or_insert(e);
                }
            }
        }
        let mut removed = 0;
        for (channel, mut meta) in with_ttl {
            let ttl_ms = meta.ttl_ms.unwrap_or(u64::MAX);
            // Stamps never decrease along a stream: if the newest expired, all did; otherwise
            // the expired ones are a prefix, found by reading stamps from the oldest.
            let cut = if expired(meta.last_ms, ttl_ms, now_ms) {
                Some(meta.top)
            } else {
                let mut cut = None;
                for item in self
                    .entries
                    .range((meta.id, meta.first)..=(meta.id, meta.top))?
                {
                    let (key, value) = item?;
                    match decode_stamp(&channel, value.value()) {
                        Ok(stamp) if expired(stamp, ttl_ms, now_ms) => cut = Some(key.value().1),
                        Ok(_) => break,
                        Err(e) => {
                            corrupt.get_or_insert(e);
                            cut = None;
                            break;
                        }
                    }
                }
                cut
            };
            if let Some(cut) = cut {
                self.remove_range(meta.id, meta.first, cut)?;
                removed += cut - meta.first + 1;
                meta.first = cut + 1;
                self.meta
                    .insert(channel.as_str(), meta.encode().as_slice())?;
            }
        }
        Ok((removed, corrupt))
    }
}

/// Reads a stream in a read transaction; `None` if the channel has no stream.
fn read_stream(
    db: &Database,
    channel: &str,
    since: Option<&Position>,
    limit: usize,
) -> Result<Option<ReadResult>, StoreError> {
    let txn = db.begin_read()?;
    let meta = txn.open_table(META)?;
    let Some(meta) = meta
        .get(channel)?
        .map(|v| Meta::decode(channel, v.value()))
        .transpose()?
    else {
        return Ok(None);
    };
    let plan = plan_read(&meta.epoch, meta.top, meta.first, since, limit);
    let mut publications = Vec::with_capacity(usize::try_from(plan.len().min(1024)).unwrap_or(0));
    if let Some((from, to)) = plan.range {
        let entries = txn.open_table(ENTRIES)?;
        let mut expected = from;
        for item in entries.range((meta.id, from)..=(meta.id, to))? {
            let (key, value) = item?;
            let (_, offset) = key.value();
            if offset != expected {
                break;
            }
            publications.push((offset, decode_payload(channel, value.value())?));
            expected += 1;
        }
        // The meta says these offsets are kept; a hole means the file is damaged, and
        // answering without them would be the silent hole recovery must never produce.
        if expected != to + 1 {
            return Err(StoreError::Corrupt(format!(
                "stream {channel:?} is missing offset {expected}"
            )));
        }
    }
    Ok(Some(ReadResult {
        publications,
        top: meta.position(),
        complete: plan.complete,
    }))
}

/// A stream's record in `stream_meta`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    id: u64,
    top: u64,
    first: u64,
    last_ms: u64,
    ttl_ms: Option<u64>,
    epoch: String,
}

const META_VERSION: u8 = 1;
/// Version byte, then id, top, first, last stamp and ttl as big-endian u64s.
const META_FIXED: usize = 1 + 5 * 8;
/// Stored in place of a ttl for "no ttl". A ttl that long (585 million years) means the same.
const NO_TTL: u64 = u64::MAX;

impl Meta {
    /// `[version=1][id][top][first][last_ms][ttl_ms or u64::MAX][epoch as UTF-8]`. The version
    /// byte lets a later layout be told apart from this one.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(META_FIXED + self.epoch.len());
        out.push(META_VERSION);
        for n in [
            self.id,
            self.top,
            self.first,
            self.last_ms,
            self.ttl_ms.unwrap_or(NO_TTL),
        ] {
            out.extend_from_slice(&n.to_be_bytes());
        }
        out.extend_from_slice(self.epoch.as_bytes());
        out
    }

    fn decode(channel: &str, bytes: &[u8]) -> Result<Self, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("stream {channel:?}: {what}"));
        let Some((&version, rest)) = bytes.split_first() else {
            return Err(corrupt("empty stream record"));
        };
        if version != META_VERSION {
            return Err(corrupt(&format!("unknown stream record version {version}")));
        }
        if bytes.len() < META_FIXED {
            return Err(corrupt(&format!(
                "stream record is {} bytes, expected at least {META_FIXED}",
                bytes.len()
            )));
        }
        let (numbers, epoch) = rest.split_at(META_FIXED - 1);
        let mut n = numbers
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])));
        let mut next = || n.next().ok_or_else(|| corrupt("truncated stream record"));
        let (id, top, first, last_ms, ttl_ms) = (next()?, next()?, next()?, next()?, next()?);
        let epoch = std::str::from_utf8(epoch)
            .map_err(|_| corrupt("epoch is not UTF-8"))?
            .to_owned();
        if epoch.is_empty() {
            return Err(corrupt("empty epoch"));
        }
        if first == 0 || first > top.saturating_add(1) {
            return Err(corrupt(&format!(
                "keeps offsets from {first} but top is {top}"
            )));
        }
        Ok(Meta {
            id,
            top,
            first,
            last_ms,
            ttl_ms: (ttl_ms != NO_TTL).then_some(ttl_ms),
            epoch,
        })
    }

    fn position(&self) -> Position {
        Position {
            epoch: self.epoch.clone(),
            offset: self.top,
        }
    }
}

/// The stamp at the front of a stored publication.
fn decode_stamp(channel: &str, value: &[u8]) -> Result<u64, StoreError> {
    value
        .first_chunk::<8>()
        .map(|b| u64::from_be_bytes(*b))
        .ok_or_else(|| {
            StoreError::Corrupt(format!(
                "stream {channel:?}: publication record is {} bytes, shorter than its stamp",
                value.len()
            ))
        })
}

/// The payload after the stamp, checked to still be one JSON value.
fn decode_payload(channel: &str, value: &[u8]) -> Result<Payload, StoreError> {
    decode_stamp(channel, value)?;
    Payload::from_json_text(value[8..].to_vec())
        .map_err(|e| StoreError::Corrupt(format!("stream {channel:?}: stored publication: {e}")))
}

macro_rules! backend_errors {
    ($($t:ty),* $(,)?) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Backend(Arc::new(e))
            }
        }
    )*};
}

backend_errors!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError,
);

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            id: 7,
            top: 10,
            first: 4,
            last_ms: 1_700_000_000_000,
            ttl_ms: Some(60_000),
            epoch: "0123456789abcdef".into(),
        }
    }

    #[test]
    fn meta_round_trips() {
        let m = meta();
        assert_eq!(Meta::decode("c", &m.encode()).unwrap(), m);
        let m = Meta {
            ttl_ms: None,
            ..meta()
        };
        assert_eq!(Meta::decode("c", &m.encode()).unwrap(), m);
    }

    #[test]
    fn damaged_records_are_errors_not_panics() {
        let good = meta().encode();
        // Every truncation, including empty.
        for len in 0..META_FIXED + 1 {
            assert!(
                matches!(Meta::decode("c", &good[..len]), Err(StoreError::Corrupt(_))),
                "{len}"
            );
        }
        let mut bad = good.clone();
        bad[0] = 9;
        assert!(Meta::decode("c", &bad).is_err());
        let mut bad = good.clone();
        bad.push(0xff);
        assert!(Meta::decode("c", &bad).is_err(), "epoch not UTF-8");
        let bad = Meta {
            first: 20,
            ..meta()
        }
        .encode();
        assert!(Meta::decode("c", &bad).is_err(), "first beyond top");
        for short in [&[][..], &[1, 2, 3][..]] {
            assert!(decode_stamp("c", short).is_err());
            assert!(decode_payload("c", short).is_err());
        }
        let mut not_json = 5u64.to_be_bytes().to_vec();
        not_json.extend_from_slice(b"{oops");
        assert!(decode_payload("c", &not_json).is_err());
        let mut ok = 5u64.to_be_bytes().to_vec();
        ok.extend_from_slice(b"{\"a\":1}");
        assert_eq!(decode_payload("c", &ok).unwrap().as_str(), "{\"a\":1}");
    }

    /// Damage written straight into the file surfaces as `Corrupt` through the store's API.
    #[tokio::test]
    async fn corrupt_file_contents_give_errors() {
        let dir = tempfile::tempdir().unwrap();
        let channel = ChannelName::parse("news", 255).unwrap();
        let other = ChannelName::parse("other", 255).unwrap();
        let store = RedbStore::open(dir.path()).await.unwrap();
        let data = Payload::from_json_text("1").unwrap();
        let options = StreamOptions {
            ttl: Some(std::time::Duration::from_secs(1)),
            ..Default::default()
        };
        store.append(&channel, data.clone(), options).await.unwrap();
        store.append(&other, data.clone(), options).await.unwrap();
        store.close().await.unwrap();

        {
            let db = Database::create(dir.path().join(RedbStore::FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut meta = txn.open_table(META).unwrap();
                meta.insert("news", &[1u8, 2, 3][..]).unwrap();
                // `other` is stream 2; its publication 1 loses its JSON.
                let mut entries = txn.open_table(ENTRIES).unwrap();
                entries
                    .insert((2, 1), &[0u8, 0, 0, 0, 0, 0, 0, 0, b'{'][..])
                    .unwrap();
            }
            txn.commit().unwrap();
        }

        let store = RedbStore::open(dir.path()).await.unwrap();
        fn err<T>(r: Result<T, StoreError>) -> bool {
            matches!(r, Err(StoreError::Corrupt(_)))
        }
        assert!(err(store.top(&channel).await));
        assert!(err(store.read(&channel, None, 10).await));
        assert!(err(store.append(&channel, data.clone(), options).await));
        assert!(err(store.read(&other, None, 10).await));
        // A damaged stream does not stop other streams from being written.
        let third = ChannelName::parse("third", 255).unwrap();
        assert_eq!(store.append(&third, data, options).await.unwrap().offset, 1);
        // Expiry reports the damage but still trims the healthy streams.
        let later = SystemTime::now() + std::time::Duration::from_secs(3600);
        assert!(err(store.trim_expired(later).await));
        assert_eq!(
            store
                .read(&third, None, 10)
                .await
                .unwrap()
                .publications
                .len(),
            0
        );
        store.close().await.unwrap();
    }
}
