//! Fan-out: S subscribers on one channel, P publications through the server's publishing path
//! (Plaza's backend API, a NATS `PUB`, a Socket.IO emit, Snorky's backend, RabbitMQ for
//! High-templar).
//!
//! 1. The subscribers connect and subscribe, `--connect-concurrency` handshakes at a time; each
//!    one is then handed to one of `--reader-tasks` tasks, which read all their connections
//!    through one `SelectAll`.
//! 2. The publisher sends P numbered, time-stamped payloads (paced or windowed).
//! 3. The readers record, per subscriber, which sequence numbers arrived (duplicates,
//!    out-of-order) and, per unique delivery, its latency. The run ends when every expected
//!    delivery arrived, when deliveries stop for `--drain-idle-secs`, or at the global deadline.

use super::target::{self, PublishJob, TargetArgs};
use super::{BenchReport, MachineReport, ServerReport};
use crate::clock;
use crate::payload;
use crate::peer::{Item, SubscriberPeer};
use crate::procfs::{self, ProcSample};
use crate::progress;
use crate::publisher::http_api::PublishProgress;
use crate::publisher::{Pace, PublishReport};
use crate::stats::{LatencySummary, SeqEvent, SeqTracker};
use crate::ws::{Event, Message, WsConn, WsTarget};
use anyhow::{Result, bail};
use clap::Args;
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Most latency samples kept (8 bytes each): every delivery is kept, so runs are capped.
const MAX_SAMPLES: u64 = 100_000_000;

#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// The channel every subscriber joins.
    #[arg(long, default_value = "bench")]
    pub channel: String,
    /// Subscriber connections.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: u64,
    /// Publications.
    #[arg(long, default_value_t = 2000)]
    pub publications: u64,
    /// Publish at this many publications per second (otherwise as fast as the window allows).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Most publications awaiting their HTTP response (default 16; 1024 with --rate).
    #[arg(long)]
    pub window: Option<usize>,
    /// Size of each publication's `data`, in bytes.
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// The server's PID, to read its CPU time and memory from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Global deadline for the whole run, in seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
    /// End the run when no delivery arrived for this long after publishing.
    #[arg(long, default_value_t = 5.0)]
    pub drain_idle_secs: f64,
    /// Tasks reading the subscriber connections.
    #[arg(long, default_value_t = 4)]
    pub reader_tasks: usize,
    /// WebSocket handshakes (and subscribes) in flight at once.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Read buffer per subscriber WebSocket, in bytes (it grows for a larger message).
    #[arg(long, default_value_t = 16 * 1024)]
    pub ws_read_buffer: usize,
    /// Seconds between progress lines on stderr (0: none).
    #[arg(long, default_value_t = 1.0)]
    pub progress_secs: f64,
    /// More subscriber endpoints (other nodes of one Plaza cluster): subscribers are spread
    /// round-robin over `--ws` and these. Repeatable.
    #[arg(long = "also-ws", value_name = "URL")]
    pub also_ws: Vec<String>,
}

impl FanoutArgs {
    fn pace(&self) -> Result<Pace> {
        if let Some(w) = self.window
            && w == 0
        {
            bail!("--window must be at least 1");
        }
        Ok(match self.rate {
            Some(r) if !(r.is_finite() && r > 0.0) => bail!("--rate must be positive"),
            Some(per_sec) => Pace::Rate {
                per_sec,
                max_in_flight: self.window.unwrap_or(1024),
            },
            None => Pace::Window(self.window.unwrap_or(16)),
        })
    }

    fn validate(&self) -> Result<()> {
        if self.subscribers == 0 || self.publications == 0 {
            bail!("--subscribers and --publications must be at least 1");
        }
        if self.reader_tasks == 0 || self.connect_concurrency == 0 {
            bail!("--reader-tasks and --connect-concurrency must be at least 1");
        }
        if self.subscribers.saturating_mul(self.publications) > MAX_SAMPLES {
            bail!(
                "subscribers x publications is over {MAX_SAMPLES}: every latency sample is kept, \
                 so lower one of them"
            );
        }
        if !(self.drain_idle_secs.is_finite() && self.drain_idle_secs >= 0.0) {
            bail!("--drain-idle-secs must be a non-negative number");
        }
        if !(self.progress_secs.is_finite() && self.progress_secs >= 0.0) {
            bail!("--progress-secs must be a non-negative number");
        }
        Ok(())
    }
}

/// The result of a fan-out run (one JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    pub scenario: &'static str,
    pub peer: &'static str,
    pub channel: String,
    /// `complete`, `idle` (deliveries stopped before all arrived) or `deadline`.
    pub outcome: &'static str,
    pub subscribers: u64,
    pub subscribers_connected: u64,
    pub connect_errors: u64,
    pub first_connect_error: Option<String>,
    /// Subscriber connections that ended before the run did (closed, reset).
    pub subscribers_dropped: u64,
    /// Close codes received by subscribers, with counts.
    pub close_codes: BTreeMap<u16, u64>,
    pub publications: u64,
    pub pace: String,
    pub payload_bytes: usize,
    pub publish: PublishReport,
    /// subscribers_connected x publications accepted.
    pub expected: u64,
    /// Publication items received, duplicates included.
    pub received: u64,
    pub unique: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Frames or items that could not be read as a benchmark publication.
    pub malformed: u64,
    pub error_frames: u64,
    pub stream_errors: u64,
    pub first_stream_error: Option<String>,
    pub subscribers_complete: u64,
    /// WebSocket text frames received by subscribers.
    pub frames: u64,
    pub publications_per_frame: f64,
    pub connect_secs: f64,
    /// First request written to last response read.
    pub publish_secs: f64,
    /// First request written to last delivery.
    pub delivery_secs: f64,
    pub publications_per_sec: f64,
    pub deliveries_per_sec: f64,
    pub latency: LatencySummary,
    pub server: Option<ServerReport>,
    pub bench: BenchReport,
    pub machine: Option<MachineReport>,
    pub elapsed_secs: f64,
    /// Why this run is not a clean measurement; empty when it is.
    pub problems: Vec<String>,
}

/// Counters the subscribers update for the main task.
#[derive(Debug, Default)]
pub(crate) struct Live {
    pub unique: AtomicU64,
    /// Messages the members' senders queued (`chat`).
    pub sent: AtomicU64,
}

/// What one subscriber received.
#[derive(Debug, Default)]
pub(crate) struct SubStats {
    pub received: u64,
    pub unique: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub malformed: u64,
    pub error_frames: u64,
    pub frames: u64,
    pub last_recv_ns: u64,
}

impl SubStats {
    pub fn add(&mut self, o: &SubStats) {
        self.received += o.received;
        self.unique += o.unique;
        self.duplicates += o.duplicates;
        self.out_of_order += o.out_of_order;
        self.malformed += o.malformed;
        self.error_frames += o.error_frames;
        self.frames += o.frames;
        self.last_recv_ns = self.last_recv_ns.max(o.last_recv_ns);
    }
}

/// How a subscriber connection ended before the run did.
#[derive(Debug)]
pub(crate) enum Ended {
    Closed(u16),
    Broken(String),
}

/// What one subscriber connection received, and what its protocol still owes the server.
pub(crate) struct Recv {
    pub tracker: SeqTracker,
    pub samples: Vec<u64>,
    pub stats: SubStats,
    /// The incomplete end of a stream protocol's last frame.
    pub carry: Vec<u8>,
    /// Keep-alive answers to send.
    pub replies: Vec<&'static [u8]>,
    pub closed: Option<u16>,
}

/// Largest incomplete message kept between frames.
const MAX_CARRY: usize = crate::ws::MAX_MESSAGE;

impl Recv {
    pub fn new(publications: u64, keep_samples: bool) -> Self {
        Recv {
            tracker: SeqTracker::new(publications),
            samples: if keep_samples {
                Vec::with_capacity(publications as usize)
            } else {
                Vec::new()
            },
            stats: SubStats::default(),
            carry: Vec::new(),
            replies: Vec::new(),
            closed: None,
        }
    }

    /// Accounts for one message received.
    pub fn on_event(&mut self, peer: &dyn SubscriberPeer, ev: Event<'_>, now: u64) {
        let frame = match ev {
            Event::Text(t) => t,
            Event::Binary(b) if peer.binary() => b,
            Event::Binary(_) => {
                self.stats.malformed += 1;
                return;
            }
            Event::Close(code) => {
                self.closed = Some(code.unwrap_or(1005));
                return;
            }
        };
        self.stats.frames += 1;
        let Recv {
            tracker,
            samples,
            stats,
            carry,
            replies,
            ..
        } = self;
        let mut on_item = |item: Item<'_>| match item {
            Item::Publication(data) => match payload::parse(data) {
                Some((seq, sent)) => {
                    stats.received += 1;
                    match tracker.record(seq) {
                        SeqEvent::InOrder => {
                            stats.unique += 1;
                            samples.push(now.saturating_sub(sent));
                        }
                        SeqEvent::OutOfOrder => {
                            stats.unique += 1;
                            stats.out_of_order += 1;
                            samples.push(now.saturating_sub(sent));
                        }
                        SeqEvent::Duplicate => stats.duplicates += 1,
                        SeqEvent::OutOfRange => stats.malformed += 1,
                    }
                }
                None => stats.malformed += 1,
            },
            Item::Control => {}
            Item::Error => stats.error_frames += 1,
            Item::Malformed => stats.malformed += 1,
            Item::Reply(r) => replies.push(r),
        };
        if !peer.stream() {
            peer.scan(frame, &mut on_item);
        } else if carry.is_empty() {
            let used = peer.scan(frame, &mut on_item);
            carry.extend_from_slice(&frame[used..]);
        } else {
            carry.extend_from_slice(frame);
            let used = peer.scan(carry, &mut on_item);
            carry.drain(..used);
        }
        if carry.len() > MAX_CARRY {
            stats.malformed += 1;
            carry.clear();
        }
    }
}

/// Writes a member's own messages on its subscriber connection (the `chat` scenario): `count`
/// messages, one every `interval`, from a start instant the main task announces once every
/// member is connected, plus `offset` (members are staggered).
pub(crate) struct Sender {
    /// Encodes message `m` (request id `m + 2`: ids 1 and 2 went to the handshake) with its
    /// payload.
    pub encode: super::target::MemberEncoder,
    pub start: futures_util::future::Shared<tokio::sync::oneshot::Receiver<Instant>>,
    pub offset: Duration,
    pub interval: Duration,
    pub count: u64,
    /// The first sequence number of this member (its slot in the room × `count`).
    pub first_seq: u64,
    pub payload_bytes: usize,
    pub started: Option<Instant>,
    pub next: u64,
    pub sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    pub buf: Vec<u8>,
    pub data: Vec<u8>,
}

impl Sender {
    /// Queues every message that is due on `ws`; returns how many.
    fn poll_send(&mut self, ws: &mut WsConn, binary: bool, cx: &mut TaskContext<'_>) -> u64 {
        if self.next >= self.count {
            return 0;
        }
        let start = match self.started {
            Some(s) => s,
            None => match Pin::new(&mut self.start).poll(cx) {
                Poll::Ready(Ok(s)) => {
                    let s = s + self.offset;
                    self.started = Some(s);
                    self.sleep = Some(Box::pin(tokio::time::sleep_until(s)));
                    s
                }
                // The main task gave up: send nothing.
                Poll::Ready(Err(_)) => {
                    self.next = self.count;
                    return 0;
                }
                Poll::Pending => return 0,
            },
        };
        let mut sent = 0;
        // Bounded: at most `count` messages over the whole run.
        while self.next < self.count {
            let Some(sleep) = self.sleep.as_mut() else {
                break;
            };
            if sleep.as_mut().poll(cx).is_pending() {
                break;
            }
            self.data.clear();
            payload::encode(
                self.first_seq + self.next,
                clock::now_ns(),
                self.payload_bytes,
                &mut self.data,
            );
            self.buf.clear();
            (self.encode)(self.next + 2, &self.data, &mut self.buf);
            ws.queue_message(&self.buf, binary);
            self.next += 1;
            sent += 1;
            let due = start + self.interval.mul_f64(self.next as f64);
            sleep.as_mut().reset(due);
        }
        sent
    }
}

/// One subscriber connection and what it received. As a future it never completes: its reader
/// task polls it when the socket is readable, and takes it back when the run ends.
pub(crate) struct Subscriber {
    ws: WsConn,
    peer: Arc<dyn SubscriberPeer>,
    pub recv: Recv,
    live: Arc<Live>,
    pub ended: Option<Ended>,
    sender: Option<Sender>,
}

impl Subscriber {
    fn new(
        mut ws: WsConn,
        peer: Arc<dyn SubscriberPeer>,
        publications: u64,
        live: Arc<Live>,
        sender: Option<Sender>,
    ) -> Self {
        let pending = ws.take_pending();
        let mut recv = Recv::new(publications, true);
        // Anything that came with the subscribe reply.
        let now = clock::now_ns();
        for m in pending {
            let ev = match &m {
                Message::Text(t) => Event::Text(t),
                Message::Binary(b) => Event::Binary(b),
                Message::Close(c) => Event::Close(*c),
            };
            recv.on_event(&*peer, ev, now);
        }
        for r in recv.replies.drain(..) {
            ws.queue_message(r, peer.binary());
        }
        live.unique.fetch_add(recv.stats.unique, Ordering::Relaxed);
        let ended = recv.closed.map(Ended::Closed);
        Subscriber {
            ws,
            peer,
            recv,
            live,
            ended,
            sender,
        }
    }
}

impl Future for Subscriber {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.ended.is_some() {
            return Poll::Pending;
        }
        let unique_before = this.recv.stats.unique;
        let Subscriber {
            ws,
            peer,
            recv,
            sender,
            live,
            ..
        } = this;
        let r = ws.poll_events(cx, &mut |ev, now| recv.on_event(&**peer, ev, now));
        let mut flush = !recv.replies.is_empty();
        for reply in recv.replies.drain(..) {
            ws.queue_message(reply, peer.binary());
        }
        if let Some(s) = sender.as_mut() {
            let n = s.poll_send(ws, peer.binary(), cx);
            if n > 0 {
                live.sent.fetch_add(n, Ordering::Relaxed);
                flush = true;
            }
        }
        if flush {
            ws.poll_flush(cx);
        }
        if this.recv.stats.unique != unique_before {
            this.recv.stats.last_recv_ns = this.ws.last_read_ns();
            this.live
                .unique
                .fetch_add(this.recv.stats.unique - unique_before, Ordering::Relaxed);
        }
        match r {
            Poll::Pending => {}
            Poll::Ready(Ok(())) => {
                this.ended = Some(Ended::Closed(this.recv.closed.unwrap_or(1005)))
            }
            Poll::Ready(Err(e)) => this.ended = Some(Ended::Broken(e.to_string())),
        }
        // Never completes: the reader task keeps it until the end of the run.
        Poll::Pending
    }
}

/// Polls the subscribers it is given until `stop`, then hands them back.
async fn reader_task(
    mut incoming: mpsc::UnboundedReceiver<Subscriber>,
    mut stop: watch::Receiver<bool>,
) -> Vec<Subscriber> {
    let mut subs = FuturesUnordered::new();
    let mut incoming_open = true;
    let stopped = stop.changed();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            sub = incoming.recv(), if incoming_open => match sub {
                Some(sub) => subs.push(sub),
                None => incoming_open = false,
            },
            _ = subs.next(), if !subs.is_empty() => {}
        }
    }
    subs.into_iter().collect()
}

/// The reader tasks: subscribers are handed to them round-robin once subscribed.
pub(crate) struct ReaderPool {
    to_readers: Vec<mpsc::UnboundedSender<Subscriber>>,
    readers: Vec<tokio::task::JoinHandle<Vec<Subscriber>>>,
    stop_tx: watch::Sender<bool>,
    next: usize,
}

impl ReaderPool {
    pub fn new(tasks: usize) -> Self {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut to_readers = Vec::new();
        let mut readers = Vec::new();
        for _ in 0..tasks.max(1) {
            let (tx, rx) = mpsc::unbounded_channel();
            to_readers.push(tx);
            readers.push(tokio::spawn(reader_task(rx, stop_rx.clone())));
        }
        ReaderPool {
            to_readers,
            readers,
            stop_tx,
            next: 0,
        }
    }

    fn add(&mut self, sub: Subscriber) {
        // A reader only ends after `stop`, so the send cannot fail before it.
        let _ = self.to_readers[self.next % self.to_readers.len()].send(sub);
        self.next += 1;
    }

    /// Stops the readers and takes the subscribers back.
    pub async fn stop(self) -> Vec<Subscriber> {
        drop(self.to_readers);
        let _ = self.stop_tx.send(true);
        let mut subs = Vec::new();
        for r in self.readers {
            // Readers stop at once; the bound only guards against a bug.
            match tokio::time::timeout(Duration::from_secs(10), r).await {
                Ok(Ok(mut part)) => subs.append(&mut part),
                Ok(Err(e)) => eprintln!("[bench] warning: a reader task failed: {e}"),
                Err(_) => eprintln!("[bench] warning: a reader task did not stop"),
            }
        }
        subs
    }
}

/// What to connect.
pub(crate) struct ConnectSpec<'a> {
    pub peer: &'a Arc<dyn SubscriberPeer>,
    /// The i-th connection goes to `targets[i % len]` (at least one).
    pub targets: &'a [WsTarget],
    /// The channel of the i-th connection.
    pub channel: &'a (dyn Fn(u64) -> String + Sync),
    pub count: u64,
    pub concurrency: usize,
    pub read_buffer: usize,
    /// Sequence numbers each subscriber tracks.
    pub publications: u64,
    pub live: &'a Arc<Live>,
    pub deadline: Instant,
    pub progress_every: Duration,
    pub label: &'static str,
    /// The sender of the i-th connection, if it sends (`chat`).
    pub sender: Option<&'a (dyn Fn(u64) -> Option<Sender> + Sync)>,
}

/// How connecting went.
pub(crate) struct Connected {
    pub connected: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    pub deadline_hit: bool,
}

/// Opens `count` connections, `concurrency` handshakes at a time, each subscribed to its
/// channel, and hands them to the pool's readers (which answer keep-alives from then on).
pub(crate) async fn connect_subscribers(pool: &mut ReaderPool, spec: ConnectSpec<'_>) -> Connected {
    let connected = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let connect_progress = {
        let (c, f, total) = (connected.clone(), failed.clone(), spec.count);
        progress::spawn(spec.label, spec.progress_every, move || {
            let n = c.load(Ordering::Relaxed);
            format!(
                "subscribed {n}/{total} ({:.0}/s), failed {}",
                n as f64 / started.elapsed().as_secs_f64().max(1e-9),
                f.load(Ordering::Relaxed)
            )
        })
    };
    let mut first_error = None;
    let handshake_timeout = Duration::from_secs(10);
    let mut handshakes = futures_util::stream::iter(0..spec.count)
        .map(|i| {
            let target = &spec.targets[usize::try_from(i).unwrap_or(0) % spec.targets.len().max(1)];
            let (peer, channel) = (spec.peer.clone(), (spec.channel)(i));
            let (live, publications, read_buffer) =
                (spec.live.clone(), spec.publications, spec.read_buffer);
            let sender = spec.sender.and_then(|f| f(i));
            async move {
                let mut ws = WsConn::connect(target, read_buffer, handshake_timeout).await?;
                peer.subscribe(&mut ws, &channel, handshake_timeout).await?;
                Ok::<_, anyhow::Error>(Subscriber::new(ws, peer, publications, live, sender))
            }
        })
        .buffer_unordered(spec.concurrency.max(1));
    let mut n_ok = 0u64;
    let mut deadline_hit = false;
    loop {
        match tokio::time::timeout_at(spec.deadline, handshakes.next()).await {
            Err(_) => {
                deadline_hit = true;
                break;
            }
            Ok(None) => break,
            Ok(Some(Ok(sub))) => {
                pool.add(sub);
                n_ok += 1;
                connected.store(n_ok, Ordering::Relaxed);
            }
            Ok(Some(Err(e))) => {
                failed.fetch_add(1, Ordering::Relaxed);
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    drop(handshakes);
    drop(connect_progress);
    let failed = failed.load(Ordering::Relaxed);
    eprintln!(
        "[{}] {n_ok} connections in {:.2}s ({failed} failed{})",
        spec.label,
        started.elapsed().as_secs_f64(),
        first_error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default()
    );
    Connected {
        connected: n_ok,
        failed,
        first_error,
        deadline_hit,
    }
}

/// `x` rounded to `decimals` decimals, for a readable JSON line.
pub(crate) fn round(x: f64, decimals: i32) -> f64 {
    let m = 10f64.powi(decimals);
    (x * m).round() / m
}

pub(crate) fn sample_server(pid: Option<u32>) -> Option<ProcSample> {
    let pid = pid?;
    match procfs::sample(pid) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("[fanout] warning: server pid {pid}: {e:#}");
            None
        }
    }
}

pub(crate) fn sample_self() -> ProcSample {
    procfs::sample_self().unwrap_or_default()
}

/// Runs the scenario.
pub async fn run(args: FanoutArgs, threads: usize) -> Result<FanoutReport> {
    args.validate()?;
    let pace = args.pace()?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let progress_every = Duration::from_secs_f64(args.progress_secs);
    let _ = clock::base();
    let peer = args.target.peer.subscriber();

    // The server must answer before we open a thousand connections.
    args.target.check().await?;

    let server_start = sample_server(args.server_pid);
    let live = Arc::new(Live::default());
    let mut pool = ReaderPool::new(args.reader_tasks);

    // 1. Connect and subscribe.
    let mut targets = vec![WsTarget::parse(&args.target.ws)?];
    for url in &args.also_ws {
        targets.push(WsTarget::parse(url)?);
    }
    let channel = args.channel.clone();
    let conn = connect_subscribers(
        &mut pool,
        ConnectSpec {
            peer: &peer,
            targets: &targets,
            channel: &move |_| channel.clone(),
            count: args.subscribers,
            concurrency: args.connect_concurrency,
            read_buffer: args.ws_read_buffer,
            publications: args.publications,
            live: &live,
            deadline,
            progress_every,
            label: "fanout",
            sender: None,
        },
    )
    .await;
    let (n_ok, connect_errors, first_connect_error, deadline_hit) = (
        conn.connected,
        conn.failed,
        conn.first_error,
        conn.deadline_hit,
    );
    let connect_secs = started.elapsed().as_secs_f64();
    if n_ok == 0 {
        pool.stop().await;
        bail!(
            "no subscriber could connect: {}",
            first_connect_error.unwrap_or_default()
        );
    }

    // Let the server settle (the last subscribe replies are out, its buffers are idle).
    if !deadline_hit {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(Duration::from_millis(200).min(left)).await;
    }
    let server_subscribed = sample_server(args.server_pid);
    let bench_before = sample_self();
    let machine_before = procfs::sample_machine().ok();
    let sampled_start = Instant::now();

    // 2. Publish.
    let job = PublishJob {
        target: &args.target,
        channel: &args.channel,
        rooms: Vec::new(),
        count: args.publications,
        payload_bytes: args.payload_bytes,
        pace,
        deadline,
    };
    let pub_progress = Arc::new(PublishProgress::default());
    let expected_max = n_ok * args.publications;
    let publish_progress = {
        let (p, l, total) = (pub_progress.clone(), live.clone(), args.publications);
        let t0 = Instant::now();
        progress::spawn("fanout", progress_every, move || {
            let u = l.unique.load(Ordering::Relaxed);
            format!(
                "published {}/{total} (acked {}), delivered {u}/{expected_max} ({:.0}/s)",
                p.sent.load(Ordering::Relaxed),
                p.acked.load(Ordering::Relaxed),
                u as f64 / t0.elapsed().as_secs_f64().max(1e-9),
            )
        })
    };
    let report = if deadline_hit {
        PublishReport {
            aborted: Some("global deadline reached while connecting".into()),
            ..Default::default()
        }
    } else {
        target::publish(&job, &pub_progress).await
    };
    if let Some(why) = &report.aborted {
        eprintln!("[fanout] publishing stopped: {why}");
    }

    // 3. Wait for the deliveries.
    let expected = n_ok * report.ok;
    let idle = Duration::from_secs_f64(args.drain_idle_secs);
    let mut last_seen = live.unique.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    let outcome = loop {
        let now = Instant::now();
        if deadline_hit || (report.aborted.is_some() && now >= deadline) {
            break "deadline";
        }
        let unique = live.unique.load(Ordering::Relaxed);
        if unique >= expected {
            break "complete";
        }
        if now >= deadline {
            break "deadline";
        }
        if unique != last_seen {
            last_seen = unique;
            last_change = now;
        } else if now - last_change >= idle {
            break "idle";
        }
        tokio::time::sleep(Duration::from_millis(2).min(deadline.saturating_duration_since(now)))
            .await;
    };
    let server_end = sample_server(args.server_pid);
    let bench_after = sample_self();
    let machine_after = procfs::sample_machine().ok();
    let sampled_end = Instant::now();
    drop(publish_progress);

    let mut subs = pool.stop().await;

    // Merge.
    let mut samples = Vec::with_capacity(subs.iter().map(|s| s.recv.samples.len()).sum());
    let mut m = SubStats::default();
    let (mut close_codes, mut dropped, mut complete) = (BTreeMap::new(), 0u64, 0u64);
    let (mut stream_errors, mut first_stream_error) = (0u64, None);
    for sub in &mut subs {
        samples.append(&mut sub.recv.samples);
        m.add(&sub.recv.stats);
        complete += u64::from(sub.recv.tracker.complete());
        match sub.ended.take() {
            None => {}
            Some(Ended::Closed(code)) => {
                dropped += 1;
                *close_codes.entry(code).or_insert(0u64) += 1;
            }
            Some(Ended::Broken(e)) => {
                dropped += 1;
                stream_errors += 1;
                first_stream_error.get_or_insert(e);
            }
        }
    }
    let subscribers_seen = subs.len() as u64;
    drop(subs);
    let latency = LatencySummary::from_ns(&mut samples);
    drop(samples);

    let publish_secs = clock::secs_between(report.first_send_ns, report.last_ack_ns);
    let delivery_secs = clock::secs_between(report.first_send_ns, m.last_recv_ns);
    let per_sec = |n: u64, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    // Over the window the CPU samples cover: end of subscribing to the last delivery (or the
    // end of the wait).
    let cpu_window_secs = (sampled_end - sampled_start).as_secs_f64();
    let cores = |cpu: f64| {
        if cpu_window_secs > 0.0 {
            cpu / cpu_window_secs
        } else {
            0.0
        }
    };
    let per_delivery_us = |cpu: f64| {
        if m.unique > 0 {
            cpu * 1e6 / m.unique as f64
        } else {
            0.0
        }
    };
    let server = match (args.server_pid, server_start, server_subscribed, server_end) {
        (Some(pid), Some(s0), Some(s1), Some(s2)) => Some(ServerReport {
            pid,
            cpu_secs_connect: round(s1.cpu_secs - s0.cpu_secs, 2),
            cpu_secs_publish: round(s2.cpu_secs - s1.cpu_secs, 2),
            cpu_us_per_delivery: round(per_delivery_us(s2.cpu_secs - s1.cpu_secs), 4),
            cores_publish: round(cores(s2.cpu_secs - s1.cpu_secs), 3),
            rss_kib_start: s0.rss_kib,
            rss_kib_subscribed: s1.rss_kib,
            rss_kib_end: s2.rss_kib,
            hwm_kib: s2.hwm_kib,
            rss_bytes_per_connection: round(
                (s1.rss_kib as f64 - s0.rss_kib as f64) * 1024.0 / n_ok as f64,
                0,
            ),
            threads: s2.threads,
        }),
        _ => None,
    };
    let bench = BenchReport {
        threads,
        reader_tasks: args.reader_tasks,
        cpu_secs_total: round(bench_after.cpu_secs, 2),
        cpu_secs_publish: round(bench_after.cpu_secs - bench_before.cpu_secs, 2),
        cpu_us_per_delivery: round(
            per_delivery_us(bench_after.cpu_secs - bench_before.cpu_secs),
            4,
        ),
        cores_publish: round(cores(bench_after.cpu_secs - bench_before.cpu_secs), 3),
        rss_kib_end: bench_after.rss_kib,
    };
    let machine = match (machine_before, machine_after) {
        (Some(a), Some(b)) => {
            let busy = cores(b.busy_secs - a.busy_secs);
            let ours = bench.cores_publish + server.as_ref().map_or(0.0, |s| s.cores_publish);
            Some(MachineReport {
                cpus: b.cpus,
                busy_cores_publish: round(busy, 3),
                other_cores_publish: round((busy - ours).max(0.0), 3),
            })
        }
        _ => None,
    };
    let mut report = FanoutReport {
        scenario: "fanout",
        peer: peer.name(),
        channel: args.channel.clone(),
        outcome,
        subscribers: args.subscribers,
        subscribers_connected: n_ok,
        connect_errors,
        first_connect_error,
        subscribers_dropped: dropped + n_ok.saturating_sub(subscribers_seen),
        close_codes,
        publications: args.publications,
        pace: match pace {
            Pace::Window(w) => format!("window {w}"),
            Pace::Rate {
                per_sec,
                max_in_flight,
            } => format!("rate {per_sec}/s, window {max_in_flight}"),
        },
        payload_bytes: args.payload_bytes,
        publications_per_sec: round(per_sec(report.ok, publish_secs), 1),
        publish: report,
        expected,
        received: m.received,
        unique: m.unique,
        lost: expected.saturating_sub(m.unique),
        duplicates: m.duplicates,
        out_of_order: m.out_of_order,
        malformed: m.malformed,
        error_frames: m.error_frames,
        stream_errors,
        first_stream_error,
        subscribers_complete: complete,
        frames: m.frames,
        publications_per_frame: if m.frames > 0 {
            m.received as f64 / m.frames as f64
        } else {
            0.0
        },
        connect_secs,
        publish_secs,
        delivery_secs,
        deliveries_per_sec: round(per_sec(m.unique, delivery_secs), 1),
        latency,
        server,
        bench,
        machine,
        elapsed_secs: round(started.elapsed().as_secs_f64(), 3),
        problems: Vec::new(),
    };
    report.problems = report.find_problems();
    Ok(report)
}

impl FanoutReport {
    /// What makes this run not a clean measurement (empty when it is one).
    pub fn find_problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.outcome != "complete" {
            p.push(format!("run ended by {}", self.outcome));
        }
        if self.connect_errors > 0 {
            p.push(format!(
                "{} subscribers failed to connect",
                self.connect_errors
            ));
        }
        if self.subscribers_dropped > 0 {
            p.push(format!("{} subscribers dropped", self.subscribers_dropped));
        }
        if let Some(a) = &self.publish.aborted {
            p.push(format!("publishing aborted: {a}"));
        }
        if self.publish.refused > 0 {
            p.push(format!("{} publications refused", self.publish.refused));
        }
        for (n, what) in [
            (self.lost, "deliveries lost"),
            (self.duplicates, "duplicate deliveries"),
            (self.out_of_order, "deliveries out of order"),
            (self.malformed, "malformed frames"),
            (self.error_frames, "error frames"),
        ] {
            if n > 0 {
                p.push(format!("{n} {what}"));
            }
        }
        p
    }

    /// A table for humans.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(t, "  {k:<26} {v}");
        };
        row(
            "scenario",
            format!(
                "fanout ({}) on {:?}: {}",
                self.peer, self.channel, self.outcome
            ),
        );
        row(
            "subscribers",
            format!(
                "{} connected of {} ({} failed, {} dropped{})",
                self.subscribers_connected,
                self.subscribers,
                self.connect_errors,
                self.subscribers_dropped,
                if self.close_codes.is_empty() {
                    String::new()
                } else {
                    format!(", close codes {:?}", self.close_codes)
                }
            ),
        );
        row(
            "publications",
            format!(
                "{} sent, {} accepted, {} refused ({}, {} B payload){}",
                self.publish.sent,
                self.publish.ok,
                self.publish.refused,
                self.pace,
                self.payload_bytes,
                self.publish
                    .aborted
                    .as_deref()
                    .map(|a| format!(", aborted: {a}"))
                    .unwrap_or_default()
            ),
        );
        if let Some(r) = &self.publish.first_refusal {
            row("first refusal", r.clone());
        }
        row(
            "deliveries",
            format!(
                "{} unique of {} expected: lost {}, duplicates {}, out of order {}",
                self.unique, self.expected, self.lost, self.duplicates, self.out_of_order
            ),
        );
        row(
            "errors",
            format!(
                "malformed {}, error frames {}, stream errors {}{}",
                self.malformed,
                self.error_frames,
                self.stream_errors,
                self.first_stream_error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            ),
        );
        row(
            "frames",
            format!(
                "{} ({:.2} publications per frame)",
                self.frames, self.publications_per_frame
            ),
        );
        row(
            "time",
            format!(
                "connect {:.2}s, publish {:.3}s, deliver {:.3}s, total {:.2}s",
                self.connect_secs, self.publish_secs, self.delivery_secs, self.elapsed_secs
            ),
        );
        row(
            "throughput",
            format!(
                "{:.0} publications/s, {:.0} deliveries/s",
                self.publications_per_sec, self.deliveries_per_sec
            ),
        );
        let l = &self.latency;
        row(
            "latency (µs)",
            format!(
                "p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}  mean {:.0}",
                l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us, l.mean_us
            ),
        );
        if let Some(s) = &self.server {
            row(
                "server CPU",
                format!(
                    "{:.2}s publishing = {:.3} µs/delivery, {:.2} cores ({:.2}s connecting)",
                    s.cpu_secs_publish, s.cpu_us_per_delivery, s.cores_publish, s.cpu_secs_connect
                ),
            );
            row(
                "server memory",
                format!(
                    "RSS {} → {} → {} KiB (peak {}), {:.0} B/connection, {} threads",
                    s.rss_kib_start,
                    s.rss_kib_subscribed,
                    s.rss_kib_end,
                    s.hwm_kib,
                    s.rss_bytes_per_connection,
                    s.threads
                ),
            );
        }
        let b = &self.bench;
        row(
            "load generator",
            format!(
                "{:.2}s CPU publishing = {:.3} µs/delivery, {:.2} cores ({} threads, {} reader tasks)",
                b.cpu_secs_publish,
                b.cpu_us_per_delivery,
                b.cores_publish,
                b.threads,
                b.reader_tasks
            ),
        );
        if !self.problems.is_empty() {
            row("PROBLEMS", self.problems.join("; "));
        }
        if let Some(m) = &self.machine {
            row(
                "machine",
                format!(
                    "{} CPUs, {:.2} cores busy while publishing, {:.2} of them by other processes{}",
                    m.cpus,
                    m.busy_cores_publish,
                    m.other_cores_publish,
                    if self.server.is_none() {
                        " (the server among them: no --server-pid)"
                    } else {
                        ""
                    }
                ),
            );
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::{native::Native, nats::Nats, socketio::SocketIo};

    fn payload(seq: u64, t: u64) -> Vec<u8> {
        let mut v = Vec::new();
        payload::encode(seq, t, 40, &mut v);
        v
    }

    #[test]
    fn stream_messages_are_reassembled_across_frames() {
        let mut all = Vec::new();
        for seq in 0..3 {
            let p = payload(seq, 100);
            all.extend_from_slice(format!("MSG bench 1 {}\r\n", p.len()).as_bytes());
            all.extend_from_slice(&p);
            all.extend_from_slice(b"\r\n");
        }
        all.extend_from_slice(b"PING\r\n");
        // Every way of cutting the stream in two frames gives the same result.
        for cut in 0..=all.len() {
            let mut r = Recv::new(3, true);
            r.on_event(&Nats, Event::Binary(&all[..cut]), 1000);
            r.on_event(&Nats, Event::Binary(&all[cut..]), 1000);
            assert_eq!(
                (r.stats.unique, r.stats.malformed, r.stats.duplicates),
                (3, 0, 0),
                "cut {cut}"
            );
            assert!(r.carry.is_empty(), "cut {cut}");
            assert_eq!(r.replies, [b"PONG\r\n"], "cut {cut}");
            assert_eq!(r.samples, [900, 900, 900]);
            assert!(r.tracker.complete());
        }
    }

    #[test]
    fn frames_are_counted_by_kind() {
        // A text protocol refuses binary frames; keep-alives are answered; close codes kept.
        let mut r = Recv::new(2, true);
        r.on_event(&Native, Event::Binary(b"x"), 0);
        assert_eq!(r.stats.malformed, 1);
        let mut frame = b"42[\"m\",".to_vec();
        frame.extend_from_slice(&payload(1, 5));
        frame.push(b']');
        r.on_event(&SocketIo, Event::Text(&frame), 10);
        r.on_event(&SocketIo, Event::Text(&frame), 10);
        r.on_event(&SocketIo, Event::Text(b"2"), 10);
        r.on_event(&SocketIo, Event::Close(Some(1001)), 10);
        assert_eq!(
            (r.stats.unique, r.stats.duplicates, r.stats.frames),
            (1, 1, 3)
        );
        assert_eq!(r.replies, [b"3"]);
        assert_eq!(r.closed, Some(1001));
        // Sequence numbers beyond the run's are malformed, not counted.
        let mut frame = b"42[\"m\",".to_vec();
        frame.extend_from_slice(&payload(7, 5));
        frame.push(b']');
        r.on_event(&SocketIo, Event::Text(&frame), 10);
        assert_eq!((r.stats.unique, r.stats.malformed), (1, 2));
    }
}
