//! [`RedisStore`]: Plaza's [`Store`] in Redis, shared by every node. Streams (channel history,
//! inboxes, conversations) and the key-value table live in Redis under the configured prefix
//! (layout in [`super::scripts`]); every write is one Lua script, so it is atomic and registers
//! each append exactly once.
//!
//! Writes go through one writer task in call order, and the writer sends everything waiting in
//! one pipeline: the Redis counterpart of the redb store's group commit. Appends reach the nodes'
//! subscribers through the [`super::RedisBroker`]'s subscriptions (the script publishes them),
//! not through an [`AppendListener`]: the node that appended hears of it the same way as every
//! other node.
//!
//! Durability is Redis's: with `appendonly yes` and `appendfsync always` an acknowledged write
//! survives a Redis crash; with Redis's defaults the last second may not (docs/SCALING.md).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::SystemTime;

use crate::shared::now_ms;

use plaza_core::{ChannelName, Payload, Position};
use plaza_store::{
    AppendListener, BoxFuture, KvEntries, ReadResult, Store, StoreError, StoreStats, StreamAppend,
    StreamOptions, WriteBatch, WriteOutcome,
};
use redis::aio::ConnectionManager;
use redis::{Script, Value};
use tokio::sync::{mpsc, oneshot};

use super::{Keys, scripts};

/// Most requests the writer sends in one pipeline.
const MAX_PIPELINE: usize = 256;

struct WriteRequest {
    batch: WriteBatch,
    reply: oneshot::Sender<Result<WriteOutcome, StoreError>>,
}

pub struct RedisStore {
    conn: ConnectionManager,
    keys: Keys,
    read: Script,
    trim: Script,
    writes: mpsc::UnboundedSender<WriteRequest>,
    appends: Arc<AtomicU64>,
    commits: Arc<AtomicU64>,
}

impl RedisStore {
    /// Starts the writer task on the current Tokio runtime.
    pub(crate) fn start(conn: ConnectionManager, keys: Keys) -> Self {
        let (writes, requests) = mpsc::unbounded_channel();
        let appends = Arc::new(AtomicU64::new(0));
        let commits = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            conn: conn.clone(),
            prefix: keys.prefix.clone(),
            script: Script::new(scripts::WRITE_BATCH),
            appends: Arc::clone(&appends),
            commits: Arc::clone(&commits),
        };
        tokio::spawn(writer.run(requests));
        Self {
            conn,
            keys,
            read: Script::new(scripts::READ),
            trim: Script::new(scripts::TRIM_EXPIRED),
            writes,
            appends,
            commits,
        }
    }

    fn queue(&self, batch: WriteBatch) -> BoxFuture<'static, Result<WriteOutcome, StoreError>> {
        if let Err(e) = batch.validate() {
            return Box::pin(std::future::ready(Err(e)));
        }
        let (reply, answer) = oneshot::channel();
        let queued = self.writes.send(WriteRequest { batch, reply });
        Box::pin(async move {
            queued.map_err(|_| StoreError::Closed)?;
            answer.await.map_err(|_| StoreError::Closed)?
        })
    }
}

fn backend(e: redis::RedisError) -> StoreError {
    StoreError::Backend(Arc::new(e))
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("unexpected reply from Redis for {what}"))
}

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn offset(value: &Value) -> Option<u64> {
    int(value).and_then(|i| u64::try_from(i).ok())
}

/// A payload this store wrote: JSON text already validated when it was published.
fn payload(value: Value) -> Option<Payload> {
    match value {
        Value::BulkString(b) => String::from_utf8(b).ok().map(Payload::from_trusted),
        _ => None,
    }
}

struct Writer {
    conn: ConnectionManager,
    prefix: String,
    script: Script,
    appends: Arc<AtomicU64>,
    commits: Arc<AtomicU64>,
}

impl Writer {
    async fn run(mut self, mut requests: mpsc::UnboundedReceiver<WriteRequest>) {
        let mut waiting = Vec::new();
        while let Some(first) = requests.recv().await {
            waiting.push(first);
            while waiting.len() < MAX_PIPELINE {
                match requests.try_recv() {
                    Ok(next) => waiting.push(next),
                    Err(_) => break,
                }
            }
            let answers = self.send(&waiting).await;
            for (request, answer) in waiting.drain(..).zip(answers) {
                let _ = request.reply.send(answer);
            }
        }
    }

    /// Sends every request in one pipeline, in order; loads the script once if Redis lost it.
    async fn send(&mut self, requests: &[WriteRequest]) -> Vec<Result<WriteOutcome, StoreError>> {
        let epoch = match plaza_store::new_epoch() {
            Ok(epoch) => epoch,
            Err(e) => return requests.iter().map(|_| Err(e.clone())).collect(),
        };
        let now = now_ms(SystemTime::now());
        for attempt in 0..2 {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for request in requests {
                let cmd = pipe.cmd("EVALSHA").arg(self.script.get_hash()).arg(0);
                self.args(cmd, &request.batch, now, &epoch);
            }
            let replies: Vec<Value> = match pipe.query_async(&mut self.conn).await {
                Ok(replies) => replies,
                Err(e) => return requests.iter().map(|_| Err(backend(e.clone()))).collect(),
            };
            let missing = replies
                .iter()
                .any(|r| matches!(r, Value::ServerError(e) if e.code() == "NOSCRIPT"));
            if missing && attempt == 0 {
                // Redis restarted or was flushed: every request of the pipeline failed alike.
                let load = redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(scripts::WRITE_BATCH)
                    .query_async::<String>(&mut self.conn)
                    .await;
                if let Err(e) = load {
                    return requests.iter().map(|_| Err(backend(e.clone()))).collect();
                }
                continue;
            }
            self.commits.fetch_add(1, Relaxed);
            return replies
                .into_iter()
                .zip(requests)
                .map(|(reply, request)| self.outcome(reply, &request.batch))
                .collect();
        }
        requests
            .iter()
            .map(|_| {
                Err(StoreError::Runtime(
                    "Redis keeps losing the write script".into(),
                ))
            })
            .collect()
    }

    fn args(&self, cmd: &mut redis::Pipeline, batch: &WriteBatch, now: u64, epoch: &str) {
        cmd.arg(&self.prefix)
            .arg(now)
            .arg(epoch)
            .arg(batch.unless_exists.as_deref().unwrap_or(""))
            .arg(batch.appends.len());
        for StreamAppend {
            stream,
            payload,
            options,
        } in &batch.appends
        {
            let max_len = options
                .max_len
                .map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
            let ttl = options.ttl.map_or(0, |t| {
                u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)
            });
            cmd.arg(stream.as_str())
                .arg(payload.as_bytes())
                .arg(max_len)
                .arg(ttl);
        }
        cmd.arg(batch.kv.len());
        for (key, value) in &batch.kv {
            match value {
                Some(v) => cmd.arg(key).arg("s").arg(v.as_slice()),
                None => cmd.arg(key).arg("d").arg(""),
            };
        }
        cmd.arg(batch.offsets.len());
        for (key, indexes) in &batch.offsets {
            cmd.arg(key).arg(indexes.len());
            for index in indexes {
                cmd.arg(*index);
            }
        }
    }

    fn outcome(&self, reply: Value, batch: &WriteBatch) -> Result<WriteOutcome, StoreError> {
        let items = match reply {
            Value::Array(items) => items,
            Value::ServerError(e) => {
                return Err(StoreError::Backend(Arc::new(redis::RedisError::from(e))));
            }
            _ => return Err(corrupt("a write")),
        };
        match items.first().and_then(int) {
            Some(0) => {
                let value = match items.get(1) {
                    Some(Value::BulkString(b)) => b.clone(),
                    _ => return Err(corrupt("an existing key")),
                };
                Ok(WriteOutcome::Exists(value))
            }
            Some(1) => {
                let positions = items[1..]
                    .chunks(2)
                    .map(|pair| match pair {
                        [epoch, offset] => Some(Position {
                            epoch: text(epoch)?,
                            offset: self::offset(offset)?,
                        }),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| corrupt("a write's positions"))?;
                if positions.len() != batch.appends.len() {
                    return Err(corrupt("a write's positions"));
                }
                self.appends.fetch_add(positions.len() as u64, Relaxed);
                Ok(WriteOutcome::Written(positions))
            }
            _ => Err(corrupt("a write")),
        }
    }
}

impl Store for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn append(
        &self,
        channel: &ChannelName,
        payload: Payload,
        options: StreamOptions,
    ) -> BoxFuture<'static, Result<Position, StoreError>> {
        let written = self.queue(WriteBatch {
            appends: vec![StreamAppend {
                stream: channel.clone(),
                payload,
                options,
            }],
            ..WriteBatch::default()
        });
        Box::pin(async move {
            match written.await? {
                WriteOutcome::Written(mut positions) => positions
                    .pop()
                    .ok_or_else(|| corrupt("an append's position")),
                WriteOutcome::Exists(_) => Err(corrupt("an append")),
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
            let epoch = plaza_store::new_epoch()?;
            let (since_epoch, since_offset) =
                since.map_or((String::new(), 0), |p| (p.epoch, p.offset));
            let mut conn = self.conn.clone();
            let reply: Vec<Value> = self
                .read
                .prepare_invoke()
                .arg(&self.keys.prefix)
                .arg(&*stream)
                .arg(epoch)
                .arg(since_epoch)
                .arg(since_offset)
                .arg(limit)
                .invoke_async(&mut conn)
                .await
                .map_err(backend)?;
            let (Some(epoch), Some(top), Some(from), Some(complete)) = (
                reply.first().and_then(text),
                reply.get(1).and_then(offset),
                reply.get(2).and_then(offset),
                reply.get(3).and_then(int),
            ) else {
                return Err(corrupt("a read"));
            };
            let publications = reply
                .into_iter()
                .skip(4)
                .zip(from..)
                .map(|(value, offset)| payload(value).map(|p| (offset, p)))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| corrupt("a read's publications"))?;
            Ok(ReadResult {
                publications,
                top: Position { epoch, offset: top },
                complete: complete == 1,
            })
        })
    }

    fn top(&self, channel: &ChannelName) -> BoxFuture<'_, Result<Option<Position>, StoreError>> {
        let meta = self.keys.meta(channel.as_str());
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let (epoch, top): (Option<String>, Option<u64>) = redis::cmd("HMGET")
                .arg(meta)
                .arg("e")
                .arg("t")
                .query_async(&mut conn)
                .await
                .map_err(backend)?;
            Ok(epoch.map(|epoch| Position {
                epoch,
                offset: top.unwrap_or(0),
            }))
        })
    }

    fn trim_expired(&self, now: SystemTime) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            self.trim
                .prepare_invoke()
                .arg(&self.keys.prefix)
                .arg(now_ms(now))
                .invoke_async(&mut conn)
                .await
                .map_err(backend)
        })
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            appends: self.appends.load(Relaxed),
            commits: self.commits.load(Relaxed),
        }
    }

    fn write(&self, batch: WriteBatch) -> BoxFuture<'static, Result<WriteOutcome, StoreError>> {
        self.queue(batch)
    }

    fn kv_get(&self, key: &str) -> BoxFuture<'_, Result<Option<Vec<u8>>, StoreError>> {
        let key = key.to_owned();
        Box::pin(async move {
            let mut conn = self.conn.clone();
            redis::cmd("HGET")
                .arg(self.keys.kv())
                .arg(key)
                .query_async(&mut conn)
                .await
                .map_err(backend)
        })
    }

    fn kv_scan(&self, prefix: &str, limit: usize) -> BoxFuture<'_, Result<KvEntries, StoreError>> {
        let prefix = prefix.to_owned();
        Box::pin(async move {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let mut conn = self.conn.clone();
            // Keys are UTF-8, which never holds the byte 0xff: `prefix` + 0xff bounds the range.
            let mut upper = format!("({prefix}").into_bytes();
            upper.push(0xff);
            let keys: Vec<String> = redis::cmd("ZRANGE")
                .arg(self.keys.kv_index())
                .arg(format!("[{prefix}"))
                .arg(upper)
                .arg("BYLEX")
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .query_async(&mut conn)
                .await
                .map_err(backend)?;
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let values: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
                .arg(self.keys.kv())
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .map_err(backend)?;
            // A key deleted between the two reads is left out.
            Ok(keys
                .into_iter()
                .zip(values)
                .filter_map(|(k, v)| v.map(|v| (k, v)))
                .collect())
        })
    }

    /// Appends reach subscribers through the broker's Redis subscriptions, on every node alike;
    /// there is nothing for a local listener to hear.
    fn set_listener(&self, _listener: Arc<dyn AppendListener>) -> bool {
        false
    }
}
