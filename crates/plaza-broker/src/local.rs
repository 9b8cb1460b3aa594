//! The single-node broker: a publication goes back to this node's sink, through a fan-out lane.
//!
//! A publish does not fan out in the publisher's task. It is queued to one of a few **lanes**
//! (chosen by channel, so one channel's publications keep their order), and the lane's task hands
//! everything queued at once to [`PublicationSink::deliver_batch`]. Under load a lane therefore
//! delivers many publications per pass: each subscriber's queue is locked and its writer woken
//! once per batch rather than once per publication, and each writer finds many frames to send
//! in one system call. The lane then yields, so the writers it woke run before it takes the next
//! batch. A lane holds at most [`LANE_CAPACITY`] publications: a publisher faster than the
//! fan-out waits for room (that is the backpressure), and a publication never waits behind more
//! than one lane's worth of others.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use plaza_core::{ConnId, Publication};
use tokio::sync::{mpsc, oneshot};

use crate::{BoxFuture, Broker, BrokerError, PublicationSink};

/// Lanes per broker: enough for publications of different channels to fan out on different
/// cores, few enough to cost nothing when idle (a parked task and an empty queue each).
const LANES: usize = 8;

/// Publications one lane holds, and the most one pass delivers. It bounds how long a publication
/// waits for its fan-out (one pass) and how much a pass batches.
const LANE_CAPACITY: usize = 32;

/// How many more times a lane yields after a batch while writers are still behind. Each turn
/// lets the runtime run the tasks queued ahead of the lane (a few hundred writers on one worker).
const MAX_TURNS_FOR_WRITERS: usize = 16;

pub struct LocalBroker {
    sink: Arc<dyn PublicationSink>,
    lanes: Box<[mpsc::Sender<Queued>]>,
    hasher: RandomState,
}

/// A publication waiting in a lane, and whom to tell once it is delivered.
struct Queued {
    publication: Publication,
    delivered: Option<oneshot::Sender<()>>,
}

impl LocalBroker {
    /// Starts the lanes' tasks on the current tokio runtime; they end when the broker is dropped.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn new(sink: Arc<dyn PublicationSink>) -> Self {
        let lanes = (0..LANES)
            .map(|_| {
                let (tx, rx) = mpsc::channel(LANE_CAPACITY);
                tokio::spawn(run_lane(Arc::clone(&sink), rx));
                tx
            })
            .collect();
        Self {
            sink,
            lanes,
            hasher: RandomState::new(),
        }
    }

    /// Queues `publication` in its channel's lane (waiting for room if the lane is full).
    async fn enqueue(
        &self,
        publication: Publication,
        delivered: Option<oneshot::Sender<()>>,
    ) -> Result<(), BrokerError> {
        let lane = &self.lanes
            [self.hasher.hash_one(publication.channel.as_str()) as usize % self.lanes.len()];
        lane.send(Queued {
            publication,
            delivered,
        })
        .await
        .map_err(|_| shutting_down())
    }
}

fn shutting_down() -> BrokerError {
    BrokerError::Unavailable("the node is shutting down".into())
}

/// Most payload bytes one pass delivers (a single larger publication goes alone), so that a burst
/// of large publications reaches each subscriber's queue a part at a time, with its writer's turn
/// in between, rather than all at once against the queue's byte limit.
const MAX_PASS_BYTES: usize = 256 * 1024;

async fn run_lane(sink: Arc<dyn PublicationSink>, mut lane: mpsc::Receiver<Queued>) {
    let mut queued = Vec::with_capacity(LANE_CAPACITY);
    let mut batch = Vec::with_capacity(LANE_CAPACITY);
    let mut waiting = Vec::new();
    while lane.recv_many(&mut queued, LANE_CAPACITY).await > 0 {
        let mut rest = queued.drain(..).peekable();
        while rest.peek().is_some() {
            let mut bytes = 0;
            while let Some(q) = rest
                .next_if(|q| batch.is_empty() || bytes + q.publication.data.len() <= MAX_PASS_BYTES)
            {
                bytes += q.publication.data.len();
                waiting.extend(q.delivered);
                batch.push(q.publication);
            }
            sink.deliver_batch(&batch);
            batch.clear();
            for publisher in waiting.drain(..) {
                // A publisher that stopped waiting needs no answer.
                let _ = publisher.send(());
            }
            // Behind the writers this batch woke (a few turns at most: a writer stuck on a slow
            // socket must not stall the lane): what arrives meanwhile goes out as the next batch.
            tokio::task::yield_now().await;
            for _ in 0..MAX_TURNS_FOR_WRITERS {
                if !sink.writers_behind() {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
    }
}

impl Broker for LocalBroker {
    fn name(&self) -> &'static str {
        "local"
    }

    fn publish(&self, publication: Publication) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(self.enqueue(publication, None))
    }

    fn publish_delivered(
        &self,
        publication: Publication,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            self.enqueue(publication, Some(tx)).await?;
            rx.await.map_err(|_| shutting_down())
        })
    }

    fn subscribe(&self, _channel: Arc<str>) -> BoxFuture<'_, Result<(), BrokerError>> {
        // One node: every local subscriber already receives every local publication.
        Box::pin(std::future::ready(Ok(())))
    }

    fn unsubscribe(&self, _channel: Arc<str>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn publish_event(
        &self,
        channel: Arc<str>,
        except: ConnId,
        frame: String,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.sink.event(&channel, except, &frame);
        Box::pin(std::future::ready(Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plaza_core::{ChannelName, Payload};
    use std::sync::Mutex;

    /// Records every publication, and the size of every batch.
    #[derive(Default)]
    struct Recorder {
        delivered: Mutex<Vec<String>>,
        batches: Mutex<Vec<usize>>,
        /// What `writers_behind` answers, and how often it was asked.
        stuck_writers: bool,
        asked: std::sync::atomic::AtomicUsize,
    }

    impl PublicationSink for Recorder {
        fn deliver(&self, p: &Publication) {
            self.delivered
                .lock()
                .unwrap()
                .push(format!("{}={}", p.channel, p.data.as_str()));
        }
        fn deliver_batch(&self, batch: &[Publication]) {
            self.batches.lock().unwrap().push(batch.len());
            batch.iter().for_each(|p| self.deliver(p));
        }
        fn writers_behind(&self) -> bool {
            self.asked
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.stuck_writers
        }
        fn event(&self, _: &str, _: ConnId, _: &str) {}
        fn interested(&self, _: &str) -> bool {
            true
        }
        fn gap(&self, _: &str, _: Option<&plaza_core::Position>, _: bool) {}
    }

    fn publication(channel: &str, i: usize) -> Publication {
        Publication {
            channel: ChannelName::parse(channel, 10).unwrap(),
            data: Payload::from_json_text(i.to_string()).unwrap(),
            position: None,
        }
    }

    /// Waits (bounded) until the recorder holds `n` publications.
    async fn delivered(rec: &Recorder, n: usize) -> Vec<String> {
        for _ in 0..1000 {
            if rec.delivered.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        rec.delivered.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn publications_reach_the_sink_in_order_per_channel() {
        let rec = Arc::new(Recorder::default());
        let broker = LocalBroker::new(rec.clone());
        for i in 0..200 {
            for channel in ["a", "b", "c"] {
                broker.publish(publication(channel, i)).await.unwrap();
            }
        }
        let all = delivered(&rec, 600).await;
        assert_eq!(all.len(), 600);
        for channel in ["a", "b", "c"] {
            let mine: Vec<&String> = all
                .iter()
                .filter(|d| d.starts_with(&format!("{channel}=")))
                .collect();
            let expected: Vec<String> = (0..200).map(|i| format!("{channel}={i}")).collect();
            assert_eq!(mine, expected.iter().collect::<Vec<_>>());
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_lane_delivers_what_queued_up_as_one_batch() {
        let rec = Arc::new(Recorder::default());
        let broker = LocalBroker::new(rec.clone());
        // One thread: the lane cannot run until this task awaits, so all of these wait in it.
        for i in 0..LANE_CAPACITY {
            broker.publish(publication("a", i)).await.unwrap();
        }
        assert_eq!(delivered(&rec, LANE_CAPACITY).await.len(), LANE_CAPACITY);
        assert_eq!(*rec.batches.lock().unwrap(), vec![LANE_CAPACITY]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_pass_delivers_at_most_its_bytes() {
        let rec = Arc::new(Recorder::default());
        let broker = LocalBroker::new(rec.clone());
        // Five publications of 100 KiB: 2 + 2 + 1 per pass under the 256 KiB bound.
        let big = format!("\"{}\"", "x".repeat(100 * 1024));
        for _ in 0..5 {
            let p = Publication {
                channel: ChannelName::parse("a", 10).unwrap(),
                data: Payload::from_json_text(big.clone()).unwrap(),
                position: None,
            };
            broker.publish(p).await.unwrap();
        }
        assert_eq!(delivered(&rec, 5).await.len(), 5);
        assert_eq!(*rec.batches.lock().unwrap(), vec![2, 2, 1]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn publish_delivered_resolves_after_the_sink_has_it() {
        let rec = Arc::new(Recorder::default());
        let broker = LocalBroker::new(rec.clone());
        broker.publish(publication("a", 0)).await.unwrap();
        broker.publish_delivered(publication("a", 1)).await.unwrap();
        // No wait: both are already delivered, in order.
        assert_eq!(*rec.delivered.lock().unwrap(), ["a=0", "a=1"]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn writers_that_stay_behind_do_not_stall_a_lane() {
        let rec = Arc::new(Recorder {
            stuck_writers: true,
            ..Recorder::default()
        });
        let broker = LocalBroker::new(rec.clone());
        broker.publish_delivered(publication("a", 0)).await.unwrap();
        broker.publish_delivered(publication("a", 1)).await.unwrap();
        assert_eq!(*rec.delivered.lock().unwrap(), ["a=0", "a=1"]);
        // The lane gave the writers its bounded number of turns after the first batch.
        assert!(rec.asked.load(std::sync::atomic::Ordering::Relaxed) >= MAX_TURNS_FOR_WRITERS);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_lane_makes_the_publisher_wait() {
        let rec = Arc::new(Recorder::default());
        let broker = LocalBroker::new(rec.clone());
        for i in 0..LANE_CAPACITY {
            broker.publish(publication("a", i)).await.unwrap();
        }
        // The lane is full and has not run: one more publish cannot complete yet.
        let mut one_more = broker.publish(publication("a", LANE_CAPACITY));
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(one_more.as_mut().poll(&mut cx).is_pending());
        one_more.await.unwrap();
        assert_eq!(
            delivered(&rec, LANE_CAPACITY + 1).await.len(),
            LANE_CAPACITY + 1
        );
    }
}
