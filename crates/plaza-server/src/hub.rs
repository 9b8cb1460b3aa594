//! The hub: this node's connections and who listens where, and the fan-out of publications to
//! them.
//!
//! A publication is encoded once, and the same bytes go into each subscriber's queue.

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use plaza_broker::PublicationSink;
use plaza_core::{CloseCode, ConnId, Payload, Position, Publication, SubscriptionIndex};
use plaza_protocol::native;
use plaza_store::AppendListener;

use crate::conn::{Backlog, ConnHandle};
use crate::metrics::Metrics;

/// A publication held back while a subscriber is parked: `(offset, frame)`, without a frame for
/// an entry the subscriber skips (its offset still counts).
type Parked = (u64, Option<Utf8Bytes>);

/// One connection's subscription to one channel.
pub struct Subscriber {
    pub conn: Arc<ConnHandle>,
    /// Highest history offset queued to this subscriber, so the seam between recovered and live
    /// publications carries no duplicate.
    last_offset: AtomicU64,
    /// Set while the subscription is being set up from history: live publications wait in
    /// `parked` until the recovered ones are queued ahead of them.
    parking: AtomicBool,
    parked: Mutex<Option<Vec<Parked>>>,
    /// Set for protocols whose publication frame differs per subscription (High-templar puts
    /// the subscription's requestId in it): they encode their own frames.
    frames: Option<Arc<dyn SubscriptionFrames>>,
    /// Set for a stream subscriber with its own frame per entry (a Bachata inbox): offered
    /// through the parking and offset rules like a native one. Ephemeral events skip it.
    encoder: Option<Arc<dyn EntryEncoder>>,
}

/// Encodes one stream entry for one subscriber (`None`: nothing to send). Runs under the
/// index's shard lock: it must not block.
pub trait EntryEncoder: Send + Sync {
    fn encode(&self, offset: Option<u64>, data: &Payload) -> Option<Utf8Bytes>;
}

/// Encodes and queues the frames of one publication for a subscriber whose frames depend on
/// the subscription (DESIGN §2: per subscription only where the protocol needs an id).
pub trait SubscriptionFrames: Send + Sync {
    /// Queues this subscription's frames for `data` on `conn`; returns how many were queued.
    /// Runs under the index's shard lock: it must not block.
    fn offer(&self, conn: &ConnHandle, data: &Payload) -> u64;
}

impl Subscriber {
    /// A subscriber that receives live publications at once.
    pub fn live(conn: Arc<ConnHandle>) -> Arc<Self> {
        Arc::new(Self {
            conn,
            last_offset: AtomicU64::new(0),
            parking: AtomicBool::new(false),
            parked: Mutex::new(None),
            frames: None,
            encoder: None,
        })
    }

    /// A subscriber that encodes its own frames.
    pub fn with_frames(conn: Arc<ConnHandle>, frames: Arc<dyn SubscriptionFrames>) -> Arc<Self> {
        Arc::new(Self {
            conn,
            last_offset: AtomicU64::new(0),
            parking: AtomicBool::new(false),
            parked: Mutex::new(None),
            frames: Some(frames),
            encoder: None,
        })
    }

    /// A subscriber whose live publications are held back until [`Subscriber::unpark`].
    pub fn parked(conn: Arc<ConnHandle>) -> Arc<Self> {
        Arc::new(Self {
            conn,
            last_offset: AtomicU64::new(0),
            parking: AtomicBool::new(true),
            parked: Mutex::new(Some(Vec::new())),
            frames: None,
            encoder: None,
        })
    }

    /// A parked subscriber (see [`Subscriber::parked`]) whose frames `encoder` makes.
    pub fn parked_with_encoder(conn: Arc<ConnHandle>, encoder: Arc<dyn EntryEncoder>) -> Arc<Self> {
        Arc::new(Self {
            conn,
            last_offset: AtomicU64::new(0),
            parking: AtomicBool::new(true),
            parked: Mutex::new(Some(Vec::new())),
            frames: None,
            encoder: Some(encoder),
        })
    }

    /// Queues `first` (the subscribe reply, then any recovered publications), then the live
    /// publications that arrived meanwhile with an offset above `last_offset`, then lets live
    /// publications through. All under the parking lock, so nothing overtakes.
    pub fn unpark(&self, first: impl IntoIterator<Item = Utf8Bytes>, last_offset: u64) -> usize {
        let mut parked = self.parked.lock().unwrap_or_else(PoisonError::into_inner);
        let mut queued = 0;
        for frame in first {
            queued += usize::from(self.conn.push_text(frame).is_ok());
        }
        self.last_offset.store(last_offset, Release);
        for (offset, frame) in parked.take().unwrap_or_default() {
            if offset > last_offset {
                self.last_offset.store(offset, Release);
                if let Some(frame) = frame {
                    queued += usize::from(self.conn.push_text(frame).is_ok());
                }
            }
        }
        self.parking.store(false, Release);
        queued
    }

    /// Notes an entry this subscriber has no frame for.
    fn skip(&self, offset: Option<u64>) {
        let Some(offset) = offset else { return };
        if self.parking.load(Acquire) {
            let mut parked = self.parked.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(list) = parked.as_mut() {
                list.push((offset, None));
                return;
            }
        }
        if offset > self.last_offset.load(Acquire) {
            self.advance(offset);
        }
    }

    /// Offers one publication. Returns whether it was queued now.
    fn offer(&self, offset: Option<u64>, frame: &Utf8Bytes) -> bool {
        if self.parking.load(Acquire) {
            let mut parked = self.parked.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(list) = parked.as_mut() {
                list.push((offset.unwrap_or(0), Some(frame.clone())));
                return false;
            }
        }
        if let Some(offset) = offset
            && !self.advance(offset)
        {
            return false;
        }
        self.conn.push_text(frame.clone()).is_ok()
    }

    /// Moves this subscriber's offset to `offset`; `false` when it already had it. Offsets of a
    /// stream are consecutive, so a jump means publications were missed on the way here (a
    /// broker connection lost, say): the connection is told to resynchronise rather than left
    /// with a silent hole.
    fn advance(&self, offset: u64) -> bool {
        // Deliveries of one channel come from one place in offset order, so a plain
        // compare-then-store is enough.
        let last = self.last_offset.load(Acquire);
        if offset <= last {
            return false;
        }
        self.last_offset.store(offset, Release);
        if offset > last + 1 {
            tracing::warn!(
                conn = self.conn.id,
                last,
                offset,
                "publications missed: resync"
            );
            self.conn.close(CloseCode::Resync);
            return false;
        }
        true
    }
}

pub struct Hub {
    index: SubscriptionIndex<Arc<Subscriber>>,
    connections: DashMap<ConnId, Arc<ConnHandle>>,
    pub metrics: Metrics,
    /// The connections with frames their writers have not taken yet; every [`ConnHandle`] of
    /// this node counts itself here.
    pub backlog: Backlog,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            index: SubscriptionIndex::default(),
            connections: DashMap::new(),
            metrics: Metrics::default(),
            backlog: Backlog::default(),
        }
    }
}

impl Hub {
    pub fn register(&self, conn: Arc<ConnHandle>) {
        self.connections.insert(conn.id, conn);
        self.metrics.connections.fetch_add(1, Relaxed);
        self.metrics.connections_total.fetch_add(1, Relaxed);
    }

    /// Forgets a connection. The caller unsubscribes its channels first.
    pub fn deregister(&self, id: ConnId) {
        if self.connections.remove(&id).is_some() {
            self.metrics.connections.fetch_sub(1, Relaxed);
        }
    }

    /// Adds a subscriber; returns `false` if its connection was already subscribed.
    pub fn subscribe(&self, channel: &Arc<str>, subscriber: Arc<Subscriber>) -> bool {
        let id = subscriber.conn.id;
        let added = self.index.subscribe(channel, id, subscriber);
        if added {
            self.metrics.subscriptions.fetch_add(1, Relaxed);
        }
        added
    }

    pub fn unsubscribe(&self, channel: &str, conn: ConnId) -> bool {
        let removed = self.index.unsubscribe(channel, conn);
        if removed {
            self.metrics.subscriptions.fetch_sub(1, Relaxed);
        }
        removed
    }

    pub fn subscriber_count(&self, channel: &str) -> usize {
        self.index.subscriber_count(channel)
    }

    pub fn channels(&self) -> Vec<(Arc<str>, usize)> {
        self.index.channels()
    }

    pub fn channel_count(&self) -> usize {
        self.index.channel_count()
    }

    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Asks every connection to close with `code`.
    pub fn close_all(&self, code: CloseCode) {
        for conn in self.connections.iter() {
            conn.close(code);
        }
    }

    /// Calls `f` for every connection. `f` must not block.
    pub fn for_each_connection(&self, mut f: impl FnMut(&Arc<ConnHandle>)) {
        for conn in self.connections.iter() {
            f(conn.value());
        }
    }

    /// Pushes an event frame (join, leave) to every subscriber of `channel` but `except`.
    pub fn push_event(&self, channel: &str, except: ConnId, frame: String) {
        let frame = Utf8Bytes::from(frame);
        self.index.for_each_subscriber(channel, |id, subscriber| {
            if id != except && subscriber.encoder.is_none() {
                let _ = subscriber.conn.push_text(frame.clone());
            }
        });
    }

    /// Offers a publication to every subscriber of `channel`. The frame is encoded once, when
    /// the first subscriber is found, so a channel nobody listens to costs no encoding.
    fn fan_out(&self, channel: &str, position: Option<&Position>, data: &Payload) {
        let mut frame: Option<Utf8Bytes> = None;
        let mut delivered = 0u64;
        self.index.for_each_subscriber(channel, |_, subscriber| {
            delivered += offer(subscriber, channel, position, data, &mut frame);
        });
        self.metrics.deliveries_total.fetch_add(delivered, Relaxed);
    }

    /// Offers consecutive publications of one channel to every subscriber. A live native
    /// subscriber gets them all as one queued text, one publication per line (the wire's
    /// framing, docs/PROTOCOL.md "Frames"): one lock, one reference and one wake-up of its writer
    /// for the whole run. The others get them one by one.
    fn fan_out_run(&self, run: &[Publication]) {
        let Some(first) = run.first() else { return };
        let channel = first.channel.as_str();
        let follows_offsets = run.iter().any(|p| p.position.is_some());
        let mut lines: Option<Utf8Bytes> = None;
        // One native frame per publication, encoded by `offer` on first need, as in `fan_out`.
        let mut frames: Vec<Option<Utf8Bytes>> = Vec::new();
        let mut delivered = 0u64;
        self.index.for_each_subscriber(channel, |_, subscriber| {
            let plain = subscriber.frames.is_none() && subscriber.encoder.is_none();
            if plain && !follows_offsets && !subscriber.parking.load(Acquire) {
                let lines = lines.get_or_insert_with(|| {
                    let mut text = String::new();
                    for (i, p) in run.iter().enumerate() {
                        if i > 0 {
                            text.push('\n');
                        }
                        let frame =
                            native::encode_publication_parts(channel, p.position.as_ref(), &p.data);
                        debug_assert!(!frame.contains('\n'), "a frame is one line: {frame}");
                        text.push_str(&frame);
                    }
                    Utf8Bytes::from(text)
                });
                if subscriber.conn.push_text(lines.clone()).is_ok() {
                    delivered += run.len() as u64;
                }
                return;
            }
            frames.resize(run.len(), None);
            for (p, frame) in run.iter().zip(frames.iter_mut()) {
                delivered += offer(subscriber, channel, p.position.as_ref(), &p.data, frame);
            }
        });
        self.metrics.deliveries_total.fetch_add(delivered, Relaxed);
    }
}

/// Offers one publication to one subscriber; returns how many frames were queued. `frame` is
/// the native frame, encoded here on first need and kept for the next subscriber. A refused
/// push has already closed that connection (slow consumer) or found it closing; the writer
/// counts the disconnect.
fn offer(
    subscriber: &Subscriber,
    channel: &str,
    position: Option<&Position>,
    data: &Payload,
    frame: &mut Option<Utf8Bytes>,
) -> u64 {
    let offset = position.map(|p| p.offset);
    if let Some(frames) = &subscriber.frames {
        return frames.offer(&subscriber.conn, data);
    }
    if let Some(encoder) = &subscriber.encoder {
        return match encoder.encode(offset, data) {
            Some(own) => u64::from(subscriber.offer(offset, &own)),
            // Nothing to send, but the entry counts: the next one is no gap.
            None => {
                subscriber.skip(offset);
                0
            }
        };
    }
    let frame = frame.get_or_insert_with(|| {
        Utf8Bytes::from(native::encode_publication_parts(channel, position, data))
    });
    u64::from(subscriber.offer(offset, frame))
}

impl PublicationSink for Hub {
    fn deliver(&self, publication: &Publication) {
        self.fan_out(
            publication.channel.as_str(),
            publication.position.as_ref(),
            &publication.data,
        );
    }

    fn writers_behind(&self) -> bool {
        self.backlog.connections() > 0
    }

    fn deliver_batch(&self, batch: &[Publication]) {
        for run in batch.chunk_by(|a, b| a.channel == b.channel) {
            self.fan_out_run(run);
        }
    }

    fn event(&self, channel: &str, except: ConnId, frame: &str) {
        self.push_event(channel, except, frame.to_owned());
    }

    fn interested(&self, channel: &str) -> bool {
        self.subscriber_count(channel) > 0
    }

    fn gap(&self, channel: &str, top: Option<&Position>, epoch_changed: bool) {
        let mut closed = 0u64;
        self.index.for_each_subscriber(channel, |_, subscriber| {
            // High-templar rooms follow no offsets.
            if subscriber.frames.is_some() {
                return;
            }
            let behind = match top {
                Some(top) => subscriber.last_offset.load(Acquire) < top.offset,
                None => false,
            };
            if epoch_changed || behind {
                subscriber.conn.close(CloseCode::Resync);
                closed += 1;
            }
        });
        if closed > 0 {
            tracing::warn!(
                channel,
                closed,
                epoch_changed,
                "subscribers told to resynchronise"
            );
        }
    }
}

/// Publications of channels with history reach subscribers from the store, in offset order.
impl AppendListener for Hub {
    fn appended(&self, channel: &str, position: &Position, payload: &Payload) {
        self.fan_out(channel, Some(position), payload);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::time::Instant;

    /// Sends odd offsets, skips even ones (an inbox entry for someone else, say).
    struct OddOnly;

    impl EntryEncoder for OddOnly {
        fn encode(&self, offset: Option<u64>, _: &Payload) -> Option<Utf8Bytes> {
            offset
                .filter(|o| o % 2 == 1)
                .map(|o| Utf8Bytes::from(o.to_string()))
        }
    }

    /// A connection, and its queue (kept, unread, for as long as the test runs).
    fn conn(hub: &Hub, id: ConnId) -> (Arc<ConnHandle>, crate::conn::Queue) {
        let (handle, queue) = ConnHandle::new(id, 1 << 20, Instant::now(), &hub.backlog);
        (Arc::new(handle), queue)
    }

    fn append(hub: &Hub, offset: u64) {
        let position = Position {
            epoch: "e".into(),
            offset,
        };
        hub.appended("s", &position, &Payload::from_json_text("1").unwrap());
    }

    #[test]
    fn an_entry_skipped_while_parked_is_no_gap_later() {
        let hub = Hub::default();
        let (c, _queue) = conn(&hub, 1);
        let sub = Subscriber::parked_with_encoder(Arc::clone(&c), Arc::new(OddOnly));
        hub.subscribe(&Arc::from("s"), Arc::clone(&sub));
        append(&hub, 1);
        append(&hub, 2);
        sub.unpark(Vec::new(), 0);
        append(&hub, 3);
        append(&hub, 4);
        append(&hub, 5);
        assert_eq!(c.close_code(), None);
    }

    #[test]
    fn a_jump_in_offsets_closes_with_resync() {
        let hub = Hub::default();
        let (c, _queue) = conn(&hub, 1);
        let sub = Subscriber::parked(Arc::clone(&c));
        hub.subscribe(&Arc::from("s"), Arc::clone(&sub));
        sub.unpark(Vec::new(), 0);
        append(&hub, 1);
        assert_eq!(c.close_code(), None);
        append(&hub, 3);
        assert_eq!(c.close_code(), Some(CloseCode::Resync));
    }

    fn publication(data: &str, offset: Option<u64>) -> Publication {
        Publication {
            channel: plaza_core::ChannelName::parse("s", 10).unwrap(),
            data: Payload::from_json_text(data.to_owned()).unwrap(),
            position: offset.map(|offset| Position {
                epoch: "e".into(),
                offset,
            }),
        }
    }

    /// The texts queued on `queue`.
    fn queued(queue: &mut crate::conn::Queue) -> Vec<String> {
        std::iter::from_fn(|| queue.try_recv())
            .map(|item| match item {
                crate::conn::Outgoing::Text(t) => t.as_str().to_owned(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_batch_reaches_a_live_subscriber_as_one_text() {
        let hub = Hub::default();
        let (live, mut queue) = conn(&hub, 1);
        hub.subscribe(&Arc::from("s"), Subscriber::live(Arc::clone(&live)));
        hub.deliver_batch(&[1, 2, 3].map(|n| publication(&n.to_string(), None)));
        let frame = |n| format!(r#"{{"push":"publication","channel":"s","data":{n}}}"#);
        assert_eq!(
            queued(&mut queue),
            [[frame(1), frame(2), frame(3)].join("\n")]
        );
        assert_eq!(hub.metrics.deliveries_total.load(Relaxed), 3);
    }

    #[test]
    fn a_batch_with_offsets_goes_frame_by_frame_through_the_parking() {
        let hub = Hub::default();
        let (parked, mut queue) = conn(&hub, 1);
        let subscriber = Subscriber::parked(Arc::clone(&parked));
        hub.subscribe(&Arc::from("s"), Arc::clone(&subscriber));
        hub.deliver_batch(&[1, 2, 3].map(|n| publication(&n.to_string(), Some(n))));
        assert!(queued(&mut queue).is_empty());
        // Offset 1 was recovered from history: only 2 and 3 follow, one frame each.
        subscriber.unpark(Vec::new(), 1);
        let frame = |n| {
            format!(r#"{{"push":"publication","channel":"s","epoch":"e","offset":{n},"data":{n}}}"#)
        };
        assert_eq!(queued(&mut queue), [frame(2), frame(3)]);
    }

    #[test]
    fn a_gap_closes_the_subscribers_behind_the_top() {
        let hub = Hub::default();
        let ((ahead, _q1), (behind, _q2)) = (conn(&hub, 1), conn(&hub, 2));
        let channel: Arc<str> = Arc::from("s");
        for (c, last) in [(&ahead, 5), (&behind, 3)] {
            let sub = Subscriber::parked(Arc::clone(c));
            hub.subscribe(&channel, Arc::clone(&sub));
            sub.unpark(Vec::new(), last);
        }
        let top = Position {
            epoch: "e".into(),
            offset: 5,
        };
        hub.gap("s", Some(&top), false);
        assert_eq!(ahead.close_code(), None);
        assert_eq!(behind.close_code(), Some(CloseCode::Resync));
        hub.gap("s", Some(&top), true);
        assert_eq!(ahead.close_code(), Some(CloseCode::Resync));
    }
}
