//! Streams kept in process memory.
//!
//! Used by tests and by a server started without a data directory. It follows the same rules as
//! [`RedbStore`](crate::RedbStore) (both use `stream.rs`), and being volatile it also plays the
//! "stream lost" case for real: a new `MemoryStore` gives every stream a new epoch, so clients
//! that recover across a restart are told `recovered: false`.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::SystemTime;

use plaza_core::{ChannelName, Payload};

use crate::clock::{duration_ms, unix_ms};
use crate::stream::{self, expired, plan_append, plan_read};
use crate::{
    AppendListener, BoxFuture, Clock, KvEntries, Position, ReadResult, Store, StoreError,
    StoreStats, StreamOptions, SystemClock, WriteBatch, WriteOutcome,
};

/// An in-memory [`Store`]. Every operation completes before its future is first polled.
pub struct MemoryStore {
    state: Mutex<State>,
    clock: Arc<dyn Clock>,
    listener: OnceLock<Arc<dyn AppendListener>>,
}

#[derive(Default)]
struct State {
    streams: HashMap<Arc<str>, Stream>,
    kv: BTreeMap<String, Vec<u8>>,
    appends: u64,
}

struct Stream {
    epoch: String,
    top: u64,
    /// Kept publications, offsets `top + 1 - entries.len() ..= top`, with their stamps.
    entries: VecDeque<(u64, Payload)>,
    last_ms: u64,
    ttl_ms: Option<u64>,
}

impl Stream {
    fn new() -> Result<Self, StoreError> {
        Ok(Stream {
            epoch: stream::new_epoch()?,
            top: 0,
            entries: VecDeque::new(),
            last_ms: 0,
            ttl_ms: None,
        })
    }

    fn first(&self) -> u64 {
        // `entries.len() <= top` always holds: each entry took one offset.
        self.top + 1 - self.entries.len() as u64
    }

    fn position(&self) -> Position {
        Position {
            epoch: self.epoch.clone(),
            offset: self.top,
        }
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::with_clock(Arc::new(SystemClock))
    }

    /// A store that stamps publications with `clock` (tests use a [`ManualClock`](crate::ManualClock)).
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        Self {
            state: Mutex::new(State::default()),
            clock,
            listener: OnceLock::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while the lock is held, so a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn append_now(
        &self,
        channel: &ChannelName,
        payload: Payload,
        options: StreamOptions,
    ) -> Result<Position, StoreError> {
        let now_ms = unix_ms(self.clock.now());
        let mut state = self.lock();
        self.append_locked(&mut state, channel, payload, options, now_ms)
    }

    /// One append, under the state lock (which also keeps the listener's calls in order).
    fn append_locked(
        &self,
        state: &mut State,
        channel: &ChannelName,
        payload: Payload,
        options: StreamOptions,
        now_ms: u64,
    ) -> Result<Position, StoreError> {
        let announce = self.listener.get().map(|l| (l, payload.clone()));
        let stream = stream_entry(state, channel)?;
        let plan = plan_append(stream.top, stream.first(), options.max_len)?;
        if let Some((from, to)) = plan.drop {
            let n = usize::try_from(to - from + 1).unwrap_or(usize::MAX);
            stream.entries.drain(..n.min(stream.entries.len()));
        }
        stream.last_ms = stream::stamp(now_ms, stream.last_ms);
        stream.top = plan.offset;
        if plan.store {
            stream.entries.push_back((stream.last_ms, payload));
        }
        stream.ttl_ms = options.ttl.map(duration_ms);
        let position = stream.position();
        state.appends += 1;
        if let Some((listener, payload)) = announce {
            listener.appended(channel.as_str(), &position, &payload);
        }
        Ok(position)
    }

    fn write_now(&self, batch: WriteBatch) -> Result<WriteOutcome, StoreError> {
        batch.validate()?;
        let now_ms = unix_ms(self.clock.now());
        let mut state = self.lock();
        if let Some(value) = batch
            .unless_exists
            .as_ref()
            .and_then(|key| state.kv.get(key))
        {
            return Ok(WriteOutcome::Exists(value.clone()));
        }
        // Every stream exists before anything is written, so nothing below fails half way.
        for append in &batch.appends {
            stream_entry(&mut state, &append.stream)?;
        }
        let mut positions = Vec::with_capacity(batch.appends.len());
        for append in batch.appends {
            positions.push(self.append_locked(
                &mut state,
                &append.stream,
                append.payload,
                append.options,
                now_ms,
            )?);
        }
        for (key, value) in batch.kv {
            match value {
                Some(value) => state.kv.insert(key, value),
                None => state.kv.remove(&key),
            };
        }
        for (key, indexes) in batch.offsets {
            let value = WriteBatch::offsets_value(&positions, &indexes);
            state.kv.insert(key, value);
        }
        Ok(WriteOutcome::Written(positions))
    }

    fn read_now(
        &self,
        channel: &ChannelName,
        since: Option<&Position>,
        limit: usize,
    ) -> Result<ReadResult, StoreError> {
        let mut state = self.lock();
        let stream = stream_entry(&mut state, channel)?;
        let first = stream.first();
        let plan = plan_read(&stream.epoch, stream.top, first, since, limit);
        let publications = match plan.range {
            None => Vec::new(),
            Some((from, to)) => (from..=to)
                // `zip` stops at the range's end; `skip` cannot go out of bounds.
                .zip(stream.entries.iter().skip(index(from - first)))
                .map(|(offset, (_, payload))| (offset, payload.clone()))
                .collect(),
        };
        Ok(ReadResult {
            publications,
            top: stream.position(),
            complete: plan.complete,
        })
    }

    fn trim_now(&self, now: SystemTime) -> u64 {
        let now_ms = unix_ms(now);
        let mut removed = 0;
        for stream in self.lock().streams.values_mut() {
            let Some(ttl_ms) = stream.ttl_ms else {
                continue;
            };
            // Stamps never decrease along a stream, so the expired ones are a prefix.
            while let Some((stamp, _)) = stream.entries.front() {
                if !expired(*stamp, ttl_ms, now_ms) {
                    break;
                }
                stream.entries.pop_front();
                removed += 1;
            }
        }
        removed
    }
}

/// The channel's stream, created (with a new epoch) if it has none.
fn stream_entry<'a>(
    state: &'a mut State,
    channel: &ChannelName,
) -> Result<&'a mut Stream, StoreError> {
    Ok(match state.streams.entry(channel.as_arc().clone()) {
        Entry::Occupied(entry) => entry.into_mut(),
        Entry::Vacant(entry) => entry.insert(Stream::new()?),
    })
}

/// An offset distance as a `VecDeque` index. Distances are bounded by the deque's length.
fn index(distance: u64) -> usize {
    usize::try_from(distance).unwrap_or(usize::MAX)
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl Store for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn append(
        &self,
        channel: &ChannelName,
        payload: Payload,
        options: StreamOptions,
    ) -> BoxFuture<'static, Result<Position, StoreError>> {
        Box::pin(std::future::ready(
            self.append_now(channel, payload, options),
        ))
    }

    fn read(
        &self,
        channel: &ChannelName,
        since: Option<Position>,
        limit: usize,
    ) -> BoxFuture<'_, Result<ReadResult, StoreError>> {
        Box::pin(std::future::ready(self.read_now(
            channel,
            since.as_ref(),
            limit,
        )))
    }

    fn top(&self, channel: &ChannelName) -> BoxFuture<'_, Result<Option<Position>, StoreError>> {
        let top = self
            .lock()
            .streams
            .get(channel.as_str())
            .map(Stream::position);
        Box::pin(std::future::ready(Ok(top)))
    }

    fn trim_expired(&self, now: SystemTime) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(std::future::ready(Ok(self.trim_now(now))))
    }

    fn write(&self, batch: WriteBatch) -> BoxFuture<'static, Result<WriteOutcome, StoreError>> {
        Box::pin(std::future::ready(self.write_now(batch)))
    }

    fn kv_get(&self, key: &str) -> BoxFuture<'_, Result<Option<Vec<u8>>, StoreError>> {
        let value = self.lock().kv.get(key).cloned();
        Box::pin(std::future::ready(Ok(value)))
    }

    fn kv_scan(&self, prefix: &str, limit: usize) -> BoxFuture<'_, Result<KvEntries, StoreError>> {
        let state = self.lock();
        let found = state
            .kv
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Box::pin(std::future::ready(Ok(found)))
    }

    fn set_listener(&self, listener: Arc<dyn AppendListener>) -> bool {
        self.listener.set(listener).is_ok()
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            appends: self.lock().appends,
            commits: 0,
        }
    }
}
