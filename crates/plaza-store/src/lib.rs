//! Plaza's durable storage: channel streams with `(epoch, offset)` positions.
//!
//! A channel with history keeps its recent publications in a *stream*. Every publication appended
//! to a stream gets the next offset (1, 2, 3, ...), and every stream carries an *epoch*: a random
//! string chosen when the stream is created. A client that reconnects hands back the last
//! `(epoch, offset)` it saw; the store answers with exactly the publications after it, or says that
//! it cannot ([`ReadResult::complete`] is `false`) because the stream was lost and recreated (the
//! epoch differs) or the gap was trimmed away. That is how the server keeps its promise of "the
//! missing publications, or `recovered: false`, never a silent hole".
//!
//! Two implementations sit behind the object-safe [`Store`] trait, so the server holds an
//! `Arc<dyn Store>` and never knows which one it has:
//!
//! - [`RedbStore`], the default: one redb file in the data directory, nothing to install. All writes
//!   go through one writer task that commits every waiting request in one durable transaction
//!   (group commit), so a burst of publishes costs one fsync instead of one each.
//! - [`MemoryStore`], for tests and for running without a data directory. It forgets everything
//!   when dropped, which is exactly the "stream lost" case the epoch exists to detect.
//!
//! Streams are bounded two ways: by length ([`StreamOptions::max_len`], applied on every append,
//! where it costs one delete) and by age ([`StreamOptions::ttl`], applied when the server calls
//! [`Store::trim_expired`] on its periodic timer, so no per-stream timers exist).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Where a publication sits in its channel's stream (offsets compare only within one epoch).
pub use plaza_core::Position;
use plaza_core::{ChannelName, Payload};

mod clock;
mod disk;
mod memory;
mod stream;

pub use clock::{Clock, ManualClock, SystemClock};
pub use disk::RedbStore;
pub use memory::MemoryStore;
pub use stream::new_epoch;

/// A boxed future, so stores can be used as `dyn Store` (async trait methods are not object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How long a stream is kept. Given with every append, so a namespace's configuration can change
/// without a migration: the latest append's options win.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamOptions {
    /// Keep at most this many publications; older ones are dropped by the append that overflows.
    /// `None` keeps any number. `Some(0)` keeps none (offsets still advance).
    pub max_len: Option<u64>,
    /// Drop publications older than this when [`Store::trim_expired`] runs. `None` keeps them
    /// until `max_len` pushes them out.
    pub ttl: Option<Duration>,
}

/// The answer to [`Store::read`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadResult {
    /// `(offset, data)` in increasing, consecutive offset order.
    pub publications: Vec<(u64, Payload)>,
    /// The stream's latest position when it was read. A subscriber continues from here.
    pub top: Position,
    /// `true` when `publications` is everything that was asked for: with `since`, every
    /// publication after it up to `top`; without `since`, every publication still kept.
    ///
    /// `false` when the epoch differs from `since`'s (publications is then empty: offsets of
    /// another epoch mean nothing), when some publications after `since` were trimmed (what is
    /// left is returned), when `since` is ahead of the stream, or when `limit` cut the answer
    /// short. The caller then tells the client `recovered: false` rather than leave a hole.
    pub complete: bool,
}

/// One append of a [`WriteBatch`].
#[derive(Debug, Clone)]
pub struct StreamAppend {
    /// A channel, or an internal stream ([`ChannelName::internal`]) such as a user's inbox.
    pub stream: ChannelName,
    pub payload: Payload,
    pub options: StreamOptions,
}

/// Changes that are stored together or not at all, in one transaction: a message appended to
/// every recipient's inbox with the record that makes a retried send a no-op, a group membership
/// written under both its keys.
#[derive(Debug, Clone, Default)]
pub struct WriteBatch {
    /// Appends, in order.
    pub appends: Vec<StreamAppend>,
    /// Key-value writes, in order; `None` deletes the key.
    pub kv: Vec<(String, Option<Vec<u8>>)>,
    /// When this key already exists, nothing is written and its value is returned instead
    /// ([`WriteOutcome::Exists`]): put the same key in `kv` to make a retried batch a no-op.
    pub unless_exists: Option<String>,
    /// Key-value writes of positions known only once appended: the offsets of the appends at
    /// these indexes (into `appends`), stored under the key as a JSON array (`[12,5]`). How an
    /// index from a message id to its place in each inbox is written with the message itself.
    pub offsets: Vec<(String, Vec<usize>)>,
}

/// The answer to [`Store::write`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Everything was stored; the appends' positions, in order.
    Written(Vec<Position>),
    /// `unless_exists` was found: nothing was written; its value.
    Exists(Vec<u8>),
}

/// Key-value pairs, in key order.
pub type KvEntries = Vec<(String, Vec<u8>)>;

/// Longest key of the key-value table, in bytes.
pub const MAX_KV_KEY: usize = 1024;

impl WriteBatch {
    /// The value [`WriteBatch::offsets`] stores for `indexes`, given the batch's positions.
    pub fn offsets_value(positions: &[Position], indexes: &[usize]) -> Vec<u8> {
        let list: Vec<String> = indexes
            .iter()
            .map(|&i| positions.get(i).map_or(0, |p| p.offset).to_string())
            .collect();
        format!("[{}]", list.join(",")).into_bytes()
    }

    /// Refuses keys that cannot be stored.
    pub fn validate(&self) -> Result<(), StoreError> {
        let keys = self
            .kv
            .iter()
            .map(|(k, _)| k)
            .chain(self.unless_exists.as_ref())
            .chain(self.offsets.iter().map(|(k, _)| k));
        for key in keys {
            if key.is_empty() || key.len() > MAX_KV_KEY {
                return Err(StoreError::Invalid(format!(
                    "key-value keys must be 1 to {MAX_KV_KEY} bytes, one is {}",
                    key.len()
                )));
            }
        }
        if let Some((key, _)) = self
            .offsets
            .iter()
            .find(|(_, indexes)| indexes.iter().any(|&i| i >= self.appends.len()))
        {
            return Err(StoreError::Invalid(format!(
                "offsets of '{key}' name an append the batch does not have"
            )));
        }
        Ok(())
    }
}

/// Counters for `/metrics` and for tests that check batching.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Publications appended (successfully) since the store was opened.
    pub appends: u64,
    /// Durable write transactions committed since the store was opened. With group commit this
    /// grows more slowly than `appends` under load; [`MemoryStore`] commits nothing and reports 0.
    pub commits: u64,
}

/// Why a store operation failed.
///
/// `Clone`, because the redb writer answers every request of a failed batch with the same error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The file system refused (creating the data directory, ...).
    #[error("storage I/O failed: {0}")]
    Io(#[source] Arc<std::io::Error>),
    /// The storage engine failed (disk full, I/O error during commit, ...).
    #[error("storage backend failed: {0}")]
    Backend(#[source] Arc<dyn std::error::Error + Send + Sync>),
    /// Something read back from disk does not have the shape it was written with.
    #[error("corrupt data in the store: {0}")]
    Corrupt(String),
    /// The store was closed, or its writer task stopped, before the request was answered. Whether
    /// an append that gets this error was stored is unknown.
    #[error("the store is closed")]
    Closed,
    /// The operating system gave no random bytes for a new epoch.
    #[error("no random bytes for a new stream epoch: {0}")]
    Random(String),
    /// The request itself is unusable (an empty or too long key, ...).
    #[error("invalid store request: {0}")]
    Invalid(String),
    /// The store was used outside a Tokio runtime, or one of its tasks died.
    #[error("store runtime error: {0}")]
    Runtime(String),
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Io(Arc::new(e))
    }
}

/// Sees every successful append, in offset order per channel, before the appender's future
/// resolves.
///
/// The server delivers publications of channels with history from here rather than after each
/// appender's future resolves: futures of one group commit wake in any order, but subscribers must
/// get offsets in order. Called with the store's write path held, so it must not block and must
/// not call back into the store.
pub trait AppendListener: Send + Sync + 'static {
    fn appended(&self, channel: &str, position: &Position, payload: &Payload);
}

/// Durable storage for channel streams.
///
/// Methods take `&self` and return boxed futures, so one `Arc<dyn Store>` is shared by every
/// connection task. Futures own what they need (channel names are cheap `Arc` clones), so the
/// caller's borrows end when the method returns.
pub trait Store: Send + Sync + 'static {
    /// A short name for logs and `/api/info` (`"redb"`, `"memory"`).
    fn name(&self) -> &'static str;

    /// Appends `payload` to `channel`'s stream and returns its position. Creates the stream (with a
    /// new epoch) if it does not exist, then trims it to `options.max_len`.
    ///
    /// For a durable store the future resolves only once the publication is on disk, so the
    /// publisher's acknowledgement can be sent as soon as it does.
    ///
    /// The append is queued when this method is called, not when the future is first polled:
    /// appends called one after another are stored (and announced to the listener) in call
    /// order, even when their futures are awaited concurrently. That is what lets one connection
    /// keep many publishes in flight without reordering them. The future owns what it needs.
    fn append(
        &self,
        channel: &ChannelName,
        payload: Payload,
        options: StreamOptions,
    ) -> BoxFuture<'static, Result<Position, StoreError>>;

    /// Reads up to `limit` publications: those after `since` (oldest first), or without `since`
    /// the latest ones still kept. See [`ReadResult::complete`] for when the answer is partial.
    ///
    /// A read of a channel without a stream creates an empty one, so the position handed to a
    /// subscriber of a quiet channel stays valid when its first publication arrives (otherwise
    /// that subscriber could never recover the first publications).
    fn read(
        &self,
        channel: &ChannelName,
        since: Option<Position>,
        limit: usize,
    ) -> BoxFuture<'_, Result<ReadResult, StoreError>>;

    /// The stream's latest position, or `None` if the channel has no stream. Creates nothing.
    fn top(&self, channel: &ChannelName) -> BoxFuture<'_, Result<Option<Position>, StoreError>>;

    /// Drops publications older than their stream's `ttl` at time `now`, and returns how many were
    /// dropped. The server calls this from its one shared timer; time is passed in so tests
    /// decide what "now" is. Streams keep their epoch and top offset when emptied, so offsets
    /// never repeat within an epoch.
    fn trim_expired(&self, now: SystemTime) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Counters since the store was opened.
    fn stats(&self) -> StoreStats;

    /// Stores `batch` atomically and durably (with the other requests of its group commit),
    /// queued at call time like [`Store::append`]. The listener hears of its appends in order.
    /// A batch touching a damaged stream fails whole, before anything of it is written.
    fn write(&self, batch: WriteBatch) -> BoxFuture<'static, Result<WriteOutcome, StoreError>>;

    /// The value of a key of the key-value table.
    fn kv_get(&self, key: &str) -> BoxFuture<'_, Result<Option<Vec<u8>>, StoreError>>;

    /// Up to `limit` entries whose key starts with `prefix`, in key order.
    fn kv_scan(&self, prefix: &str, limit: usize) -> BoxFuture<'_, Result<KvEntries, StoreError>>;

    /// Installs the [`AppendListener`]. Only the first call takes effect; returns whether it did.
    fn set_listener(&self, listener: Arc<dyn AppendListener>) -> bool;
}
