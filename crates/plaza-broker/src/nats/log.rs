//! The write log: what every node of a NATS cluster folds into the same state.
//!
//! Every [`WriteBatch`] (and every stream a read must create) is one [`Record`], published to one
//! JetStream stream. JetStream stores it durably and gives every record its place in one total
//! order; each node applies the records in that order to its own [`State`]. Because applying is
//! deterministic (the epoch a new stream gets and the time stamps travel in the record), every
//! node computes the same offsets, the same idempotency answers and the same key-value table,
//! with no coordination beyond the log itself. A batch is one message, so it is stored whole or
//! not at all.
//!
//! This module has no I/O: it encodes, decodes and applies records.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use plaza_core::{Payload, Position};
use plaza_store::{KvEntries, ReadResult, StreamAppend, WriteBatch, WriteOutcome};

/// Bumped when the encoding changes; a node refuses records of a version it does not know.
const VERSION: u8 = 1;

/// One entry of the log.
#[derive(Debug, Clone)]
pub struct Record {
    /// The process that published it, so that process can answer its caller.
    pub origin: u64,
    /// The publisher's number for the request.
    pub request: u64,
    /// The publisher's clock (ms since the Unix epoch): the appends' time stamps for `ttl`.
    pub now_ms: u64,
    /// The epoch a stream created by this record gets.
    pub epoch: String,
    /// Streams to create (empty) if they do not exist: a read of a new stream.
    pub creates: Vec<String>,
    pub batch: WriteBatch,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed log record: {0}")]
pub struct DecodeError(pub &'static str);

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            64 + self
                .batch
                .appends
                .iter()
                .map(|a| a.payload.len() + 32)
                .sum::<usize>(),
        );
        out.push(VERSION);
        put_u64(&mut out, self.origin);
        put_u64(&mut out, self.request);
        put_u64(&mut out, self.now_ms);
        put_bytes(&mut out, self.epoch.as_bytes());
        match &self.batch.unless_exists {
            Some(key) => {
                out.push(1);
                put_bytes(&mut out, key.as_bytes());
            }
            None => out.push(0),
        }
        put_len(&mut out, self.creates.len());
        for stream in &self.creates {
            put_bytes(&mut out, stream.as_bytes());
        }
        put_len(&mut out, self.batch.appends.len());
        for append in &self.batch.appends {
            put_bytes(&mut out, append.stream.as_str().as_bytes());
            put_bytes(&mut out, append.payload.as_bytes());
            put_u64(
                &mut out,
                append
                    .options
                    .max_len
                    .map_or(u64::MAX, |n| n.min(u64::MAX - 1)),
            );
            put_u64(&mut out, append.options.ttl.map_or(0, |t| ms(t).max(1)));
        }
        put_len(&mut out, self.batch.kv.len());
        for (key, value) in &self.batch.kv {
            put_bytes(&mut out, key.as_bytes());
            match value {
                Some(v) => {
                    out.push(1);
                    put_bytes(&mut out, v);
                }
                None => out.push(0),
            }
        }
        put_len(&mut out, self.batch.offsets.len());
        for (key, indexes) in &self.batch.offsets {
            put_bytes(&mut out, key.as_bytes());
            put_len(&mut out, indexes.len());
            for &i in indexes {
                put_len(&mut out, i);
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader(bytes);
        if r.u8()? != VERSION {
            return Err(DecodeError("unknown version"));
        }
        let origin = r.u64()?;
        let request = r.u64()?;
        let now_ms = r.u64()?;
        let epoch = r.string()?;
        let unless_exists = match r.u8()? {
            0 => None,
            1 => Some(r.string()?),
            _ => return Err(DecodeError("bad flag")),
        };
        let creates = (0..r.len()?)
            .map(|_| r.string())
            .collect::<Result<_, _>>()?;
        let appends = (0..r.len()?)
            .map(|_| {
                let stream = plaza_core::ChannelName::from_stored(&r.string()?);
                let payload = Payload::from_trusted(r.string()?);
                let max_len = match r.u64()? {
                    u64::MAX => None,
                    n => Some(n),
                };
                let ttl = match r.u64()? {
                    0 => None,
                    n => Some(std::time::Duration::from_millis(n)),
                };
                Ok(StreamAppend {
                    stream,
                    payload,
                    options: plaza_store::StreamOptions { max_len, ttl },
                })
            })
            .collect::<Result<_, DecodeError>>()?;
        let kv = (0..r.len()?)
            .map(|_| {
                let key = r.string()?;
                let value = match r.u8()? {
                    0 => None,
                    1 => Some(r.bytes()?.to_vec()),
                    _ => return Err(DecodeError("bad flag")),
                };
                Ok((key, value))
            })
            .collect::<Result<_, DecodeError>>()?;
        let offsets = (0..r.len()?)
            .map(|_| {
                let key = r.string()?;
                let indexes = (0..r.len()?).map(|_| r.index()).collect::<Result<_, _>>()?;
                Ok((key, indexes))
            })
            .collect::<Result<_, DecodeError>>()?;
        if !r.0.is_empty() {
            return Err(DecodeError("trailing bytes"));
        }
        Ok(Record {
            origin,
            request,
            now_ms,
            epoch,
            creates,
            batch: WriteBatch {
                appends,
                kv,
                unless_exists,
                offsets,
            },
        })
    }
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_len(out, b.len());
    out.extend_from_slice(b);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes(
            b.try_into().map_err(|_| DecodeError("truncated"))?,
        ))
    }
    fn index(&mut self) -> Result<usize, DecodeError> {
        let b = self.take(4)?;
        let n = u32::from_be_bytes(b.try_into().map_err(|_| DecodeError("truncated"))?);
        usize::try_from(n).map_err(|_| DecodeError("length"))
    }
    /// A length or a count: every item takes at least a byte, so none exceeds the bytes left
    /// (absurd lengths are refused before anything is allocated for them).
    fn len(&mut self) -> Result<usize, DecodeError> {
        let n = self.index()?;
        if n > self.0.len() {
            return Err(DecodeError("length"));
        }
        Ok(n)
    }
    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.len()?;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| DecodeError("not UTF-8"))
    }
}

/// One stream as folded from the log: offsets `top - entries.len() + 1 ..= top` are kept.
#[derive(Debug, Clone)]
struct StreamState {
    epoch: String,
    top: u64,
    ttl_ms: u64,
    /// `(time stamp ms, payload)`, oldest first; stamps never decrease.
    entries: VecDeque<(u64, Payload)>,
}

/// An append as applied: what the node's subscribers are handed.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub stream: Arc<str>,
    pub position: Position,
    pub payload: Payload,
}

/// Everything the log holds, folded.
#[derive(Debug, Default)]
pub struct State {
    streams: HashMap<Arc<str>, StreamState>,
    kv: BTreeMap<String, Vec<u8>>,
}

impl State {
    /// Applies one record; the same records in the same order give the same state on every node.
    pub fn apply(&mut self, record: Record) -> (WriteOutcome, Vec<Applied>) {
        for stream in &record.creates {
            self.stream_mut(stream, &record.epoch);
        }
        let batch = record.batch;
        if let Some(value) = batch.unless_exists.as_ref().and_then(|k| self.kv.get(k)) {
            return (WriteOutcome::Exists(value.clone()), Vec::new());
        }
        let mut applied = Vec::with_capacity(batch.appends.len());
        for append in batch.appends {
            let name = append.stream.as_arc().clone();
            let stream = self.stream_mut(&name, &record.epoch);
            stream.top += 1;
            stream.ttl_ms = append.options.ttl.map_or(0, |t| ms(t).max(1));
            match append.options.max_len {
                Some(0) => stream.entries.clear(),
                max_len => {
                    let stamp = stream
                        .entries
                        .back()
                        .map_or(record.now_ms, |(last, _)| (*last).max(record.now_ms));
                    stream.entries.push_back((stamp, append.payload.clone()));
                    if let Some(max) = max_len {
                        let max = usize::try_from(max).unwrap_or(usize::MAX);
                        while stream.entries.len() > max {
                            stream.entries.pop_front();
                        }
                    }
                }
            }
            let position = Position {
                epoch: stream.epoch.clone(),
                offset: stream.top,
            };
            applied.push(Applied {
                stream: name,
                position,
                payload: append.payload,
            });
        }
        for (key, value) in batch.kv {
            match value {
                Some(v) => self.kv.insert(key, v),
                None => self.kv.remove(&key),
            };
        }
        let positions: Vec<Position> = applied.iter().map(|a| a.position.clone()).collect();
        for (key, indexes) in batch.offsets {
            self.kv
                .insert(key, WriteBatch::offsets_value(&positions, &indexes));
        }
        (WriteOutcome::Written(positions), applied)
    }

    fn stream_mut(&mut self, name: &str, epoch: &str) -> &mut StreamState {
        if !self.streams.contains_key(name) {
            self.streams.insert(
                Arc::from(name),
                StreamState {
                    epoch: epoch.to_owned(),
                    top: 0,
                    ttl_ms: 0,
                    entries: VecDeque::new(),
                },
            );
        }
        // Inserted just above when missing.
        self.streams.get_mut(name).unwrap_or_else(|| unreachable!())
    }

    pub fn top(&self, stream: &str) -> Option<Position> {
        self.streams.get(stream).map(|s| Position {
            epoch: s.epoch.clone(),
            offset: s.top,
        })
    }

    /// [`plaza_store::Store::read`] of an existing stream; `None` when it does not exist.
    pub fn read(&self, stream: &str, since: Option<&Position>, limit: usize) -> Option<ReadResult> {
        let s = self.streams.get(stream)?;
        let top = Position {
            epoch: s.epoch.clone(),
            offset: s.top,
        };
        let len = s.entries.len() as u64;
        let first = s.top + 1 - len;
        let limit = limit as u64;
        let (from, count, complete) = match since {
            Some(since) if since.epoch != s.epoch || since.offset > s.top => {
                return Some(ReadResult {
                    publications: Vec::new(),
                    top,
                    complete: false,
                });
            }
            Some(since) => {
                let (from, mut complete) = if since.offset + 1 < first {
                    (first, false)
                } else {
                    (since.offset + 1, true)
                };
                let mut count = s.top + 1 - from;
                if count > limit {
                    count = limit;
                    complete = false;
                }
                (from, count, complete)
            }
            None => {
                let count = len.min(limit);
                (s.top + 1 - count, count, count == len)
            }
        };
        let start = usize::try_from(from - first).unwrap_or(usize::MAX);
        let publications = s
            .entries
            .iter()
            .skip(start)
            .take(usize::try_from(count).unwrap_or(usize::MAX))
            .zip(from..)
            .map(|((_, payload), offset)| (offset, payload.clone()))
            .collect();
        Some(ReadResult {
            publications,
            top,
            complete,
        })
    }

    /// Drops entries older than their stream's ttl at `now_ms`; returns how many.
    pub fn trim_expired(&mut self, now_ms: u64) -> u64 {
        let mut dropped = 0;
        for stream in self.streams.values_mut().filter(|s| s.ttl_ms > 0) {
            while stream
                .entries
                .front()
                .is_some_and(|(stamp, _)| stamp.saturating_add(stream.ttl_ms) <= now_ms)
            {
                stream.entries.pop_front();
                dropped += 1;
            }
        }
        dropped
    }

    pub fn kv_get(&self, key: &str) -> Option<Vec<u8>> {
        self.kv.get(key).cloned()
    }

    pub fn kv_scan(&self, prefix: &str, limit: usize) -> KvEntries {
        self.kv
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Every stream's name, for telling their subscribers to resynchronise.
    pub fn stream_names(&self) -> Vec<Arc<str>> {
        self.streams.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use plaza_core::ChannelName;
    use plaza_store::StreamOptions;
    use std::time::Duration;

    fn append(stream: &str, data: &str, max_len: Option<u64>) -> StreamAppend {
        StreamAppend {
            stream: ChannelName::from_stored(stream),
            payload: Payload::from_json_text(data.to_owned()).unwrap(),
            options: StreamOptions { max_len, ttl: None },
        }
    }

    fn record(request: u64, now_ms: u64, batch: WriteBatch) -> Record {
        Record {
            origin: 7,
            request,
            now_ms,
            epoch: format!("e{request}"),
            creates: Vec::new(),
            batch,
        }
    }

    fn data(result: &ReadResult) -> Vec<(u64, String)> {
        result
            .publications
            .iter()
            .map(|(o, p)| (*o, p.as_str().to_owned()))
            .collect()
    }

    #[test]
    fn records_round_trip() {
        let r = Record {
            origin: u64::MAX,
            request: 3,
            now_ms: 1_700_000_000_000,
            epoch: "abc".into(),
            creates: vec!["news".into()],
            batch: WriteBatch {
                appends: vec![
                    append("news", r#"{"a":1}"#, Some(10)),
                    StreamAppend {
                        options: StreamOptions {
                            max_len: None,
                            ttl: Some(Duration::from_secs(5)),
                        },
                        ..append("$inbox:ann", "2", None)
                    },
                ],
                kv: vec![("k".into(), Some(vec![0, 255])), ("gone".into(), None)],
                unless_exists: Some("idem".into()),
                offsets: vec![("ix".into(), vec![1, 0])],
            },
        };
        let back = Record::decode(&r.encode()).unwrap();
        assert_eq!(back.encode(), r.encode());
        assert_eq!(
            back.batch.appends[1].options.ttl,
            Some(Duration::from_secs(5))
        );
        assert_eq!(back.batch.kv, r.batch.kv);
        assert_eq!(back.batch.unless_exists.as_deref(), Some("idem"));
        let bytes = r.encode();
        for cut in 0..bytes.len() {
            assert!(Record::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Record::decode(&longer).is_err());
    }

    #[test]
    fn offsets_epochs_and_bounds_follow_the_store_rules() {
        let mut s = State::default();
        for i in 1..=5u64 {
            let batch = WriteBatch {
                appends: vec![append("c", &i.to_string(), Some(3))],
                ..WriteBatch::default()
            };
            let (outcome, applied) = s.apply(record(i, 1000, batch));
            // The first record created the stream: its epoch stays.
            let position = Position {
                epoch: "e1".into(),
                offset: i,
            };
            assert_eq!(outcome, WriteOutcome::Written(vec![position.clone()]));
            assert_eq!(applied[0].position, position);
        }
        let all = s.read("c", None, 100).unwrap();
        assert_eq!(
            data(&all),
            vec![(3, "3".into()), (4, "4".into()), (5, "5".into())]
        );
        assert!(all.complete);
        let latest = s.read("c", None, 2).unwrap();
        assert_eq!(data(&latest), vec![(4, "4".into()), (5, "5".into())]);
        assert!(!latest.complete);
        let since = |offset| Position {
            epoch: "e1".into(),
            offset,
        };
        let after_3 = s.read("c", Some(&since(3)), 100).unwrap();
        assert_eq!(data(&after_3), vec![(4, "4".into()), (5, "5".into())]);
        assert!(after_3.complete);
        let trimmed = s.read("c", Some(&since(1)), 100).unwrap();
        assert_eq!(data(&trimmed).len(), 3);
        assert!(!trimmed.complete);
        let limited = s.read("c", Some(&since(2)), 1).unwrap();
        assert_eq!(data(&limited), vec![(3, "3".into())]);
        assert!(!limited.complete);
        let at_top = s.read("c", Some(&since(5)), 100).unwrap();
        assert!(at_top.publications.is_empty() && at_top.complete);
        let ahead = s.read("c", Some(&since(6)), 100).unwrap();
        assert!(!ahead.complete);
        let other_epoch = Position {
            epoch: "x".into(),
            offset: 1,
        };
        assert!(!s.read("c", Some(&other_epoch), 100).unwrap().complete);
        assert!(s.read("missing", None, 10).is_none());
    }

    #[test]
    fn a_batch_is_all_or_nothing_and_idempotent() {
        let mut s = State::default();
        let batch = WriteBatch {
            appends: vec![append("$inbox:a", "1", None), append("$inbox:b", "1", None)],
            kv: vec![("msg:1".into(), Some(b"sent".to_vec()))],
            unless_exists: Some("msg:1".into()),
            offsets: vec![("ix:1".into(), vec![1, 0])],
        };
        let (first, applied) = s.apply(record(1, 0, batch.clone()));
        assert!(matches!(first, WriteOutcome::Written(ref p) if p.len() == 2));
        assert_eq!(applied.len(), 2);
        assert_eq!(s.kv_get("ix:1").unwrap(), b"[1,1]");
        let (again, applied) = s.apply(record(2, 0, batch));
        assert_eq!(again, WriteOutcome::Exists(b"sent".to_vec()));
        assert!(applied.is_empty());
        assert_eq!(s.top("$inbox:a").unwrap().offset, 1);
    }

    #[test]
    fn reads_create_streams_and_ttl_trims_by_stamp() {
        let mut s = State::default();
        let create = Record {
            creates: vec!["quiet".into()],
            ..record(1, 0, WriteBatch::default())
        };
        s.apply(create);
        let quiet = s.read("quiet", None, 10).unwrap();
        assert_eq!(quiet.top.offset, 0);
        assert_eq!(quiet.top.epoch, "e1");
        let timed = |data: &str| WriteBatch {
            appends: vec![StreamAppend {
                options: StreamOptions {
                    max_len: None,
                    ttl: Some(Duration::from_millis(100)),
                },
                ..append("t", data, None)
            }],
            ..WriteBatch::default()
        };
        s.apply(record(2, 1000, timed("1")));
        s.apply(record(3, 1050, timed("2")));
        assert_eq!(s.trim_expired(1099), 0);
        assert_eq!(s.trim_expired(1100), 1);
        let left = s.read("t", None, 10).unwrap();
        assert_eq!(data(&left), vec![(2, "2".into())]);
        assert_eq!(s.trim_expired(2000), 1);
        assert_eq!(s.top("t").unwrap().offset, 2);
    }

    #[test]
    fn kv_scans_by_prefix_in_key_order() {
        let mut s = State::default();
        let batch = WriteBatch {
            kv: vec![
                ("g:b".into(), Some(b"2".to_vec())),
                ("g:a".into(), Some(b"1".to_vec())),
                ("h:a".into(), Some(b"3".to_vec())),
                ("g".into(), Some(b"0".to_vec())),
            ],
            ..WriteBatch::default()
        };
        s.apply(record(1, 0, batch));
        let keys: Vec<String> = s.kv_scan("g:", 10).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec!["g:a", "g:b"]);
        assert_eq!(s.kv_scan("g:", 1).len(), 1);
        s.apply(record(
            2,
            0,
            WriteBatch {
                kv: vec![("g:a".into(), None)],
                ..WriteBatch::default()
            },
        ));
        assert_eq!(s.kv_get("g:a"), None);
    }
}
