//! Publish: acknowledged publishes per second.
//!
//! P publishers each keep W publish requests in flight (send up to W, then one more per reply)
//! until N publications in all (split over the publishers) are answered, to one channel or one
//! channel per publisher:
//!
//! - `--via native`: WebSocket clients of the native protocol (`connect`, then pipelined
//!   `publish` requests with increasing ids),
//! - `--via api`: keep-alive connections to the backend API (`POST /api/publish`), pipelined.
//!
//! Only replies with a result count as acknowledged. Every acknowledged position is checked: the
//! offsets of a channel are unique across its publishers, increase strictly in the order each
//! publisher receives its replies, and stay in one epoch. The rate is acknowledged publications
//! over the time from the first request written to the last reply read. Every publisher stops at
//! the global deadline, and a native publisher also when nothing arrives for `--idle-secs` while
//! it awaits replies.

use super::MachineReport;
use crate::clock;
use crate::http::{HttpTarget, request};
use crate::payload;
use crate::peer::native;
use crate::procfs::{self, ProcSample};
use crate::progress;
use crate::publisher::Pace;
use crate::publisher::http_api::{self, HttpPublish, PublishProgress};
use crate::reply::{self, Position, Reply};
use crate::stats::LatencySummary;
use crate::ws::{Event, WsConn, WsTarget};
use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use futures_util::stream::StreamExt;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;
use tokio::time::Instant;

/// Most latency samples kept (8 bytes each, one per acknowledged publication).
const MAX_PUBLICATIONS: u64 = 100_000_000;
/// The first publish request's id on a native connection (`connect` is 1).
const FIRST_ID: u64 = 2;
/// Longest error text kept for the report.
const MAX_ERROR_TEXT: usize = 300;

/// How publications reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// Native WebSocket clients (`publish` requests; the namespace needs `client_publish`).
    Native,
    /// The backend HTTP API (`POST /api/publish` with the key).
    Api,
}

/// Which channels the publishers publish to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Channels {
    /// All to `--channel`.
    One,
    /// Publisher i to `--channel` followed by `-i`.
    PerPublisher,
}

#[derive(Debug, Clone, Args)]
pub struct PublishArgs {
    /// How to publish.
    #[arg(long, value_enum, default_value_t = Via::Native)]
    pub via: Via,
    /// The native WebSocket endpoint.
    #[arg(long, default_value = "ws://127.0.0.1:7700/plaza/ws")]
    pub ws: String,
    /// The backend API base URL.
    #[arg(long, default_value = "http://127.0.0.1:7701")]
    pub api: String,
    /// The backend key (sent as `X-Plaza-Key`; needed with --via api).
    #[arg(long, env = "PLAZA_BACKEND_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// The channel (with --channels per-publisher, the prefix of each publisher's channel).
    #[arg(long, default_value = "durable:bench")]
    pub channel: String,
    /// One channel for all publishers, or one per publisher.
    #[arg(long, value_enum, default_value_t = Channels::PerPublisher)]
    pub channels: Channels,
    /// Publisher connections.
    #[arg(long, default_value_t = 1)]
    pub publishers: u64,
    /// Publish requests each publisher keeps in flight.
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// Publications in all, split over the publishers.
    #[arg(long, default_value_t = 100_000)]
    pub publications: u64,
    /// Size of each publication's `data`, in bytes.
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// The server's PID, to read its CPU time and memory from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Global deadline for the whole run, in seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
    /// A native publisher stops when no reply came for this long while it awaited some.
    #[arg(long, default_value_t = 10.0)]
    pub idle_secs: f64,
    /// WebSocket handshakes (and connects) in flight at once.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// A name for this run, copied into the report.
    #[arg(long)]
    pub label: Option<String>,
    /// Seconds between progress lines on stderr (0: none).
    #[arg(long, default_value_t = 1.0)]
    pub progress_secs: f64,
}

impl PublishArgs {
    fn validate(&self) -> Result<()> {
        if self.publishers == 0 || self.publications == 0 || self.window == 0 {
            bail!("--publishers, --publications and --window must be at least 1");
        }
        if self.publications > MAX_PUBLICATIONS {
            bail!("--publications is over {MAX_PUBLICATIONS} (every latency sample is kept)");
        }
        if self.connect_concurrency == 0 {
            bail!("--connect-concurrency must be at least 1");
        }
        if !(self.idle_secs.is_finite() && self.idle_secs > 0.0) {
            bail!("--idle-secs must be a positive number");
        }
        if !(self.progress_secs.is_finite() && self.progress_secs >= 0.0) {
            bail!("--progress-secs must be a non-negative number");
        }
        if self.via == Via::Api && self.key.as_deref().is_none_or(str::is_empty) {
            bail!("--via api needs the backend key (--key or PLAZA_BACKEND_KEY)");
        }
        Ok(())
    }

    /// How many publications publisher `i` sends.
    fn quota(&self, i: u64) -> u64 {
        self.publications / self.publishers + u64::from(i < self.publications % self.publishers)
    }

    /// The channel index of publisher `i`.
    fn channel_index(&self, i: u64) -> u64 {
        match self.channels {
            Channels::One => 0,
            Channels::PerPublisher => i,
        }
    }

    fn channel_name(&self, index: u64) -> String {
        match self.channels {
            Channels::One => self.channel.clone(),
            Channels::PerPublisher => format!("{}-{index}", self.channel),
        }
    }
}

/// Server process figures over the publishing phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerFigures {
    pub pid: u32,
    /// CPU seconds the server spent while the publishers connected.
    pub cpu_secs_connect: f64,
    /// CPU seconds from just before the first request to the last publisher's end.
    pub cpu_secs_publish: f64,
    /// `cpu_secs_publish` per acknowledged publication, in microseconds.
    pub cpu_us_per_ack: f64,
    /// Average cores busy over the same window.
    pub cores_publish: f64,
    pub rss_kib_start: u64,
    pub rss_kib_connected: u64,
    pub rss_kib_end: u64,
    pub hwm_kib: u64,
    pub threads: u64,
}

/// The load generator's own cost over the publishing phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BenchFigures {
    pub threads: usize,
    pub cpu_secs_publish: f64,
    pub cpu_us_per_ack: f64,
    pub cores_publish: f64,
    pub rss_kib_end: u64,
}

/// The result of a publish run (one JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct PublishBenchReport {
    pub scenario: &'static str,
    pub label: Option<String>,
    pub via: Via,
    /// `complete` (every request answered), `deadline`, or `stopped` (a publisher stopped early:
    /// connection lost, idle; see `first_stop`).
    pub outcome: &'static str,
    pub channel: String,
    pub channels: Channels,
    pub channel_count: u64,
    pub publishers: u64,
    pub publishers_connected: u64,
    pub connect_errors: u64,
    pub first_connect_error: Option<String>,
    /// Publishers that stopped before all their requests were answered, and the first reason.
    pub publishers_stopped: u64,
    pub first_stop: Option<String>,
    pub close_codes: BTreeMap<u16, u64>,
    pub window: usize,
    pub payload_bytes: usize,
    pub publications: u64,
    /// Requests written.
    pub sent: u64,
    /// Replies with a result.
    pub acked: u64,
    /// Error replies (HTTP non-2xx with --via api), matched to a request or not.
    pub errors: u64,
    /// Error replies whose id is not one of a request awaiting its reply (`"id":null`).
    pub errors_unmatched: u64,
    pub first_error: Option<String>,
    /// sent - acked - errors: requests never answered.
    pub lost: u64,
    /// Lines that are not a reply, results that cannot be read, binary messages.
    pub malformed: u64,
    /// Results for an id that was not awaiting its reply (unknown or answered twice).
    pub unexpected_replies: u64,
    /// Pushes received (a publisher subscribes to nothing).
    pub pushes: u64,
    /// Replies that came before the reply of an earlier request of the same publisher.
    pub replies_out_of_order: u64,
    /// Whether the acknowledgements carry a position (the namespace keeps history).
    pub history: bool,
    pub acks_with_position: u64,
    pub acks_without_position: u64,
    /// Offsets acknowledged more than once on one channel.
    pub duplicate_offsets: u64,
    /// Acknowledgements whose offset was not above the previous one its publisher received.
    pub offset_regressions: u64,
    /// Acknowledgements in an epoch other than the first one their publisher saw, plus
    /// publishers of a channel whose first epoch differs from the channel's first publisher's.
    pub epoch_changes: u64,
    /// Offsets missing between a channel's lowest and highest acknowledged ones (not a fault in
    /// itself: others may publish to the channel too).
    pub offset_holes: u64,
    pub connect_secs: f64,
    /// First request written to last reply read.
    pub publish_secs: f64,
    pub acked_per_sec: f64,
    /// Request written to its reply read.
    pub latency: LatencySummary,
    pub server: Option<ServerFigures>,
    pub bench: BenchFigures,
    pub machine: Option<MachineReport>,
    pub elapsed_secs: f64,
    /// Why this run is not a clean measurement; empty when it is.
    pub problems: Vec<String>,
}

/// What one publisher did.
#[derive(Debug, Default)]
struct PubOutcome {
    channel: u64,
    quota: u64,
    sent: u64,
    acked: u64,
    errors: u64,
    errors_unmatched: u64,
    first_error: Option<String>,
    malformed: u64,
    unexpected_replies: u64,
    pushes: u64,
    replies_out_of_order: u64,
    first_send_ns: u64,
    last_ack_ns: u64,
    samples: Vec<u64>,
    /// `(request sequence, offset)`: replies may arrive in any order (the server answers a
    /// publish once it is durable), but offsets must grow in the order the requests were sent.
    offsets: Vec<(u64, u64)>,
    epoch: Option<Vec<u8>>,
    epoch_changes: u64,
    acks_without_position: u64,
    /// Why it stopped before every request was answered.
    stopped: Option<String>,
    close_code: Option<u16>,
}

impl PubOutcome {
    fn new(channel: u64, quota: u64) -> Self {
        Self {
            channel,
            quota,
            samples: Vec::with_capacity(quota as usize),
            ..Default::default()
        }
    }

    /// Offsets that do not grow with the request sequence (a publisher's publications stored out
    /// of the order it sent them, or a duplicate).
    fn offset_regressions(&self) -> u64 {
        let mut by_seq = self.offsets.clone();
        by_seq.sort_unstable_by_key(|(seq, _)| *seq);
        by_seq.windows(2).filter(|w| w[1].1 <= w[0].1).count() as u64
    }

    fn on_ack(&mut self, seq: u64, sent_ns: u64, now_ns: u64, position: Option<Position<'_>>) {
        self.acked += 1;
        self.last_ack_ns = self.last_ack_ns.max(now_ns);
        self.samples.push(now_ns.saturating_sub(sent_ns));
        let Some(p) = position else {
            self.acks_without_position += 1;
            return;
        };
        match &self.epoch {
            None => self.epoch = Some(p.epoch.to_vec()),
            Some(e) if e.as_slice() != p.epoch => self.epoch_changes += 1,
            Some(_) => {}
        }
        self.offsets.push((seq, p.offset));
    }

    fn on_error(&mut self, matched: bool, text: impl FnOnce() -> String) {
        self.errors += 1;
        if !matched {
            self.errors_unmatched += 1;
        }
        if self.first_error.is_none() {
            self.first_error = Some(truncate(text()));
        }
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_ERROR_TEXT {
        let mut end = MAX_ERROR_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// The requests of one native connection awaiting their replies, by id.
#[derive(Debug)]
struct InFlight {
    /// Send time of ids `base..base + len`; [`InFlight::DONE`] once answered.
    sent_at: VecDeque<u64>,
    base: u64,
    count: usize,
}

impl InFlight {
    const DONE: u64 = u64::MAX;

    fn new(first_id: u64, window: usize) -> Self {
        Self {
            sent_at: VecDeque::with_capacity(window),
            base: first_id,
            count: 0,
        }
    }

    /// The id the next request gets.
    fn next_id(&self) -> u64 {
        self.base + self.sent_at.len() as u64
    }

    fn push(&mut self, sent_ns: u64) {
        self.sent_at.push_back(sent_ns.min(Self::DONE - 1));
        self.count += 1;
    }

    /// Marks `id` answered: its send time and whether an earlier request still awaits its
    /// reply; `None` when `id` was not awaiting one.
    fn complete(&mut self, id: u64) -> Option<(u64, bool)> {
        let idx = usize::try_from(id.checked_sub(self.base)?).ok()?;
        let slot = self.sent_at.get_mut(idx)?;
        if *slot == Self::DONE {
            return None;
        }
        let sent = std::mem::replace(slot, Self::DONE);
        while self.sent_at.front() == Some(&Self::DONE) {
            self.sent_at.pop_front();
            self.base += 1;
        }
        self.count = self.count.saturating_sub(1);
        Some((sent, idx != 0))
    }

    /// An answer that names no request (an error with `"id":null`): one request fewer in flight,
    /// though which one is unknown.
    fn complete_unknown(&mut self) {
        self.count = self.count.saturating_sub(1);
    }
}

/// Appends a native publish request.
fn publish_request(id: u64, channel_json: &str, data: &[u8], out: &mut Vec<u8>) {
    use std::io::Write;
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "{{\"id\":{id},\"method\":\"publish\",\"params\":{{\"channel\":{channel_json},\"data\":"
    );
    out.extend_from_slice(data);
    out.extend_from_slice(b"}}");
}

/// Accounts for one line received by a native publisher.
fn on_line(line: &[u8], now: u64, flight: &mut InFlight, out: &mut PubOutcome) {
    match reply::parse_reply(line) {
        Reply::Ok { id, position } => match flight.complete(id) {
            Some((sent, early)) => {
                out.replies_out_of_order += u64::from(early);
                out.on_ack(id, sent, now, position);
            }
            None => out.unexpected_replies += 1,
        },
        Reply::Error { id } => {
            let matched = id.and_then(|id| flight.complete(id)).is_some();
            if !matched {
                flight.complete_unknown();
            }
            out.on_error(matched, || String::from_utf8_lossy(line).into_owned());
        }
        Reply::Push => out.pushes += 1,
        Reply::Malformed => out.malformed += 1,
    }
}

/// Accounts for one message received by a native publisher.
fn on_event(ev: Event<'_>, now: u64, flight: &mut InFlight, out: &mut PubOutcome) {
    match ev {
        Event::Text(text) => {
            // Several replies may share a frame, one per line.
            let mut rest = text;
            while !rest.is_empty() {
                let (line, next) = match native::find_byte(rest, b'\n') {
                    Some(i) => (&rest[..i], &rest[i + 1..]),
                    None => (rest, &[][..]),
                };
                if !line.is_empty() {
                    on_line(line, now, flight, out);
                }
                rest = next;
            }
        }
        Event::Binary(_) => out.malformed += 1,
        Event::Close(code) => out.close_code = Some(code.unwrap_or(1005)),
    }
}

/// One native publisher.
struct NativePublisher {
    ws: WsConn,
    channel_json: String,
    window: usize,
    payload_bytes: usize,
    deadline: Instant,
    idle: Duration,
    progress: Arc<PublishProgress>,
}

impl NativePublisher {
    async fn run(mut self, mut out: PubOutcome) -> PubOutcome {
        let mut flight = InFlight::new(FIRST_ID, self.window);
        let (mut frames, mut req, mut data) = (Vec::new(), Vec::new(), Vec::new());
        let mut last_reply = Instant::now();
        loop {
            let answered = out.acked + out.errors;
            if answered >= out.quota || (out.sent >= out.quota && flight.count == 0) {
                break;
            }
            // Fill the window.
            let room = self.window.saturating_sub(flight.count) as u64;
            let n = room.min(out.quota - out.sent);
            if n > 0 {
                frames.clear();
                let t = clock::now_ns();
                for k in 0..n {
                    data.clear();
                    payload::encode(out.sent + k, t, self.payload_bytes, &mut data);
                    req.clear();
                    publish_request(flight.next_id(), &self.channel_json, &data, &mut req);
                    self.ws.encode_text(&req, &mut frames);
                    flight.push(t);
                }
                if out.sent == 0 {
                    out.first_send_ns = t;
                    last_reply = Instant::now();
                }
                out.sent += n;
                self.progress.sent.store(out.sent, Ordering::Relaxed);
                match tokio::time::timeout_at(self.deadline, self.ws.write_all(&frames)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        out.stopped = Some(format!("{e:#}"));
                        break;
                    }
                    Err(_) => {
                        out.stopped = Some("global deadline".into());
                        break;
                    }
                }
            }
            // Read at least one message.
            let until = self.deadline.min(last_reply + self.idle);
            let ws = &mut self.ws;
            let read = poll_fn(|cx| {
                let mut handled = 0u64;
                let r = ws.poll_events(cx, &mut |ev, now| {
                    handled += 1;
                    on_event(ev, now, &mut flight, &mut out);
                });
                match r {
                    Poll::Pending if handled == 0 => Poll::Pending,
                    Poll::Pending => Poll::Ready(Ok(true)),
                    Poll::Ready(Ok(())) => Poll::Ready(Ok(false)),
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                }
            });
            match tokio::time::timeout_at(until, read).await {
                Ok(Ok(true)) => {
                    last_reply = Instant::now();
                    self.progress.acked.store(out.acked, Ordering::Relaxed);
                }
                Ok(Ok(false)) => {
                    self.progress.acked.store(out.acked, Ordering::Relaxed);
                    out.stopped = Some(format!(
                        "the server closed the connection (code {})",
                        out.close_code.unwrap_or(1005)
                    ));
                    break;
                }
                Ok(Err(e)) => {
                    out.stopped = Some(e.to_string());
                    break;
                }
                Err(_) if until >= self.deadline => {
                    out.stopped = Some("global deadline".into());
                    break;
                }
                Err(_) => {
                    out.stopped = Some(format!(
                        "no reply for {:.1}s with {} requests in flight",
                        self.idle.as_secs_f64(),
                        flight.count
                    ));
                    break;
                }
            }
        }
        out
    }
}

/// One backend API publisher.
struct ApiPublisher {
    target: Arc<HttpTarget>,
    key: Arc<str>,
    channel_json: String,
    window: usize,
    payload_bytes: usize,
    deadline: Instant,
    progress: Arc<PublishProgress>,
}

impl ApiPublisher {
    async fn run(self, mut out: PubOutcome) -> PubOutcome {
        let channel_json = self.channel_json;
        let body = move |data: &[u8], buf: &mut Vec<u8>| {
            native::api_publish_body(&channel_json, data, buf)
        };
        let headers = [("X-Plaza-Key", &*self.key)];
        let p = HttpPublish {
            target: &self.target,
            path: "/api/publish",
            headers: &headers,
            body: &body,
            count: out.quota,
            payload_bytes: self.payload_bytes,
            pace: Pace::Window(self.window),
            deadline: self.deadline,
        };
        let report = {
            let out = &mut out;
            http_api::run_with(&p, &self.progress, &mut |resp, sent, now| {
                if (200..300).contains(&resp.status) {
                    match reply::parse_api_result(&resp.body) {
                        // HTTP/1.1 answers one connection's requests in order.
                        Some(position) => out.on_ack(out.acked, sent, now, position),
                        None => out.malformed += 1,
                    }
                } else {
                    out.on_error(true, || {
                        format!(
                            "HTTP {} {}",
                            resp.status,
                            String::from_utf8_lossy(&resp.body)
                        )
                    });
                }
            })
            .await
        };
        out.sent = report.sent;
        out.first_send_ns = report.first_send_ns;
        out.stopped = report.aborted;
        out
    }
}

/// `x` rounded to `decimals` decimals, for a readable JSON line.
fn round(x: f64, decimals: i32) -> f64 {
    let m = 10f64.powi(decimals);
    (x * m).round() / m
}

fn sample_server(pid: Option<u32>) -> Option<ProcSample> {
    let pid = pid?;
    match procfs::sample(pid) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("[publish] warning: server pid {pid}: {e:#}");
            None
        }
    }
}

/// Per-channel checks over every publisher's acknowledged offsets: (duplicates, holes, publishers
/// whose first epoch differs from the channel's first publisher's).
fn check_channels(outcomes: &[PubOutcome]) -> (u64, u64, u64) {
    let mut by_channel: BTreeMap<u64, Vec<&PubOutcome>> = BTreeMap::new();
    for o in outcomes {
        by_channel.entry(o.channel).or_default().push(o);
    }
    let (mut dups, mut holes, mut epochs) = (0u64, 0u64, 0u64);
    for pubs in by_channel.values() {
        let mut offsets: Vec<u64> = pubs
            .iter()
            .flat_map(|o| o.offsets.iter().map(|(_, offset)| *offset))
            .collect();
        offsets.sort_unstable();
        let before = offsets.len() as u64;
        offsets.dedup();
        dups += before - offsets.len() as u64;
        if let (Some(&lo), Some(&hi)) = (offsets.first(), offsets.last()) {
            holes += (hi - lo + 1).saturating_sub(offsets.len() as u64);
        }
        let mut first = None;
        for e in pubs.iter().filter_map(|o| o.epoch.as_deref()) {
            match first {
                None => first = Some(e),
                Some(f) if f != e => epochs += 1,
                Some(_) => {}
            }
        }
    }
    (dups, holes, epochs)
}

/// Runs the scenario.
pub async fn run(args: PublishArgs, threads: usize) -> Result<PublishBenchReport> {
    args.validate()?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let progress_every = Duration::from_secs_f64(args.progress_secs);
    let idle = Duration::from_secs_f64(args.idle_secs);
    let _ = clock::base();
    let active: Vec<u64> = (0..args.publishers)
        .filter(|&i| args.quota(i) > 0)
        .collect();
    let server_start = sample_server(args.server_pid);

    // 1. Connect (native) or check the backend (api).
    let mut connect_errors = 0u64;
    let mut first_connect_error = None;
    let mut conns: Vec<(u64, WsConn)> = Vec::new();
    let api_target = match args.via {
        Via::Api => {
            let target = HttpTarget::parse(&args.api)?;
            let health = request(&target, "GET", "/healthz", &[], b"", Duration::from_secs(5))
                .await
                .context("GET /healthz on the backend")?;
            if health.status != 200 {
                bail!("GET /healthz answered {}", health.status);
            }
            Some(Arc::new(target))
        }
        Via::Native => {
            let target = WsTarget::parse(&args.ws)?;
            let timeout = Duration::from_secs(10);
            let mut handshakes = futures_util::stream::iter(active.iter().copied())
                .map(|i| {
                    let target = &target;
                    async move {
                        let mut ws = WsConn::connect(target, 16 * 1024, timeout).await?;
                        native::connect(&mut ws, timeout).await?;
                        Ok::<_, anyhow::Error>((i, ws))
                    }
                })
                .buffer_unordered(args.connect_concurrency);
            loop {
                match tokio::time::timeout_at(deadline, handshakes.next()).await {
                    Err(_) => {
                        connect_errors += active.len() as u64 - conns.len() as u64;
                        first_connect_error
                            .get_or_insert_with(|| "global deadline reached".to_string());
                        break;
                    }
                    Ok(None) => break,
                    Ok(Some(Ok(c))) => conns.push(c),
                    Ok(Some(Err(e))) => {
                        connect_errors += 1;
                        first_connect_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
            if conns.is_empty() {
                bail!(
                    "no publisher could connect: {}",
                    first_connect_error.unwrap_or_default()
                );
            }
            conns.sort_by_key(|(i, _)| *i);
            None
        }
    };
    let connect_secs = started.elapsed().as_secs_f64();

    // 2. Publish.
    let server_connected = sample_server(args.server_pid);
    let bench_before = procfs::sample_self().unwrap_or_default();
    let machine_before = procfs::sample_machine().ok();
    let sampled_start = Instant::now();
    let mut tasks = Vec::new();
    let mut progresses = Vec::new();
    let mut spawn = |i: u64, ws: Option<WsConn>| -> Result<()> {
        let channel = args.channel_index(i);
        let channel_json = serde_json::to_string(&args.channel_name(channel))?;
        let out = PubOutcome::new(channel, args.quota(i));
        let progress = Arc::new(PublishProgress::default());
        progresses.push(progress.clone());
        let (window, payload_bytes) = (args.window, args.payload_bytes);
        tasks.push(match (ws, &api_target) {
            (Some(ws), _) => tokio::spawn(
                NativePublisher {
                    ws,
                    channel_json,
                    window,
                    payload_bytes,
                    deadline,
                    idle,
                    progress,
                }
                .run(out),
            ),
            (None, Some(target)) => tokio::spawn(
                ApiPublisher {
                    target: target.clone(),
                    key: Arc::from(args.key.as_deref().unwrap_or_default()),
                    channel_json,
                    window,
                    payload_bytes,
                    deadline,
                    progress,
                }
                .run(out),
            ),
            (None, None) => bail!("no connection for publisher {i}"),
        });
        Ok(())
    };
    match args.via {
        Via::Native => {
            for (i, ws) in conns {
                spawn(i, Some(ws))?;
            }
        }
        Via::Api => {
            for &i in &active {
                spawn(i, None)?;
            }
        }
    }
    let publish_progress = {
        let (total, t0) = (args.publications, Instant::now());
        progress::spawn("publish", progress_every, move || {
            let sum = |f: fn(&PublishProgress) -> u64| progresses.iter().map(|p| f(p)).sum::<u64>();
            let sent = sum(|p| p.sent.load(Ordering::Relaxed));
            let acked = sum(|p| p.acked.load(Ordering::Relaxed));
            format!(
                "sent {sent}/{total}, acked {acked} ({:.0}/s)",
                acked as f64 / t0.elapsed().as_secs_f64().max(1e-9)
            )
        })
    };
    let mut outcomes = Vec::new();
    let mut task_failures = 0u64;
    for t in tasks {
        // Every task ends by the deadline; the margin only guards against a bug.
        let guard = deadline + Duration::from_secs(10);
        match tokio::time::timeout_at(guard, t).await {
            Ok(Ok(o)) => outcomes.push(o),
            Ok(Err(e)) => {
                task_failures += 1;
                eprintln!("[publish] warning: a publisher task failed: {e}");
            }
            Err(_) => {
                task_failures += 1;
                eprintln!("[publish] warning: a publisher task did not stop");
            }
        }
    }
    let server_end = sample_server(args.server_pid);
    let bench_after = procfs::sample_self().unwrap_or_default();
    let machine_after = procfs::sample_machine().ok();
    let sampled_end = Instant::now();
    drop(publish_progress);

    // 3. Merge.
    let (duplicate_offsets, offset_holes, epoch_mismatches) = check_channels(&outcomes);
    let mut samples = Vec::with_capacity(outcomes.iter().map(|o| o.samples.len()).sum());
    let mut r = PublishBenchReport {
        scenario: "publish",
        label: args.label.clone(),
        via: args.via,
        outcome: "complete",
        channel: args.channel.clone(),
        channels: args.channels,
        channel_count: match args.channels {
            Channels::One => 1,
            Channels::PerPublisher => active.len() as u64,
        },
        publishers: args.publishers,
        publishers_connected: 0,
        connect_errors,
        first_connect_error,
        publishers_stopped: task_failures,
        first_stop: None,
        close_codes: BTreeMap::new(),
        window: args.window,
        payload_bytes: args.payload_bytes,
        publications: args.publications,
        sent: 0,
        acked: 0,
        errors: 0,
        errors_unmatched: 0,
        first_error: None,
        lost: 0,
        malformed: 0,
        unexpected_replies: 0,
        pushes: 0,
        replies_out_of_order: 0,
        history: false,
        acks_with_position: 0,
        acks_without_position: 0,
        duplicate_offsets,
        offset_regressions: 0,
        epoch_changes: epoch_mismatches,
        offset_holes,
        connect_secs: round(connect_secs, 3),
        publish_secs: 0.0,
        acked_per_sec: 0.0,
        latency: LatencySummary::default(),
        server: None,
        bench: BenchFigures::default(),
        machine: None,
        elapsed_secs: 0.0,
        problems: Vec::new(),
    };
    let (mut first_send, mut last_ack) = (u64::MAX, 0u64);
    let mut deadline_hit = false;
    for o in &mut outcomes {
        samples.append(&mut o.samples);
        r.sent += o.sent;
        r.acked += o.acked;
        r.errors += o.errors;
        r.errors_unmatched += o.errors_unmatched;
        r.malformed += o.malformed;
        r.unexpected_replies += o.unexpected_replies;
        r.pushes += o.pushes;
        r.replies_out_of_order += o.replies_out_of_order;
        r.acks_with_position += o.offsets.len() as u64;
        r.acks_without_position += o.acks_without_position;
        r.offset_regressions += o.offset_regressions();
        r.epoch_changes += o.epoch_changes;
        if r.first_error.is_none() {
            r.first_error = o.first_error.take();
        }
        if o.sent > 0 {
            r.publishers_connected += 1;
            first_send = first_send.min(o.first_send_ns);
        }
        last_ack = last_ack.max(o.last_ack_ns);
        if let Some(code) = o.close_code {
            *r.close_codes.entry(code).or_insert(0) += 1;
        }
        if let Some(why) = o.stopped.take() {
            r.publishers_stopped += 1;
            deadline_hit |= why.contains("deadline");
            r.first_stop.get_or_insert(why);
        }
    }
    if args.via == Via::Api {
        // API publishers connect in their task: one that sent nothing could not connect.
        r.connect_errors = active.len() as u64 - r.publishers_connected;
        if r.connect_errors > 0 {
            r.first_connect_error = r.first_stop.clone();
        }
    }
    r.history = r.acks_with_position > 0;
    r.lost = r.sent.saturating_sub(r.acked + r.errors);
    r.outcome = if deadline_hit {
        "deadline"
    } else if r.publishers_stopped > 0 || r.connect_errors > 0 {
        "stopped"
    } else {
        "complete"
    };
    r.latency = LatencySummary::from_ns(&mut samples);
    drop(samples);
    if first_send != u64::MAX {
        r.publish_secs = round(clock::secs_between(first_send, last_ack), 6);
        if r.publish_secs > 0.0 {
            r.acked_per_sec = round(r.acked as f64 / r.publish_secs, 1);
        }
    }

    let window_secs = (sampled_end - sampled_start).as_secs_f64();
    let cores = |cpu: f64| {
        if window_secs > 0.0 {
            cpu / window_secs
        } else {
            0.0
        }
    };
    let per_ack_us = |cpu: f64| {
        if r.acked > 0 {
            cpu * 1e6 / r.acked as f64
        } else {
            0.0
        }
    };
    r.server = match (args.server_pid, server_start, server_connected, server_end) {
        (Some(pid), Some(s0), Some(s1), Some(s2)) => Some(ServerFigures {
            pid,
            cpu_secs_connect: round(s1.cpu_secs - s0.cpu_secs, 2),
            cpu_secs_publish: round(s2.cpu_secs - s1.cpu_secs, 2),
            cpu_us_per_ack: round(per_ack_us(s2.cpu_secs - s1.cpu_secs), 3),
            cores_publish: round(cores(s2.cpu_secs - s1.cpu_secs), 3),
            rss_kib_start: s0.rss_kib,
            rss_kib_connected: s1.rss_kib,
            rss_kib_end: s2.rss_kib,
            hwm_kib: s2.hwm_kib,
            threads: s2.threads,
        }),
        _ => None,
    };
    let bench_cpu = bench_after.cpu_secs - bench_before.cpu_secs;
    r.bench = BenchFigures {
        threads,
        cpu_secs_publish: round(bench_cpu, 2),
        cpu_us_per_ack: round(per_ack_us(bench_cpu), 3),
        cores_publish: round(cores(bench_cpu), 3),
        rss_kib_end: bench_after.rss_kib,
    };
    r.machine = match (machine_before, machine_after) {
        (Some(a), Some(b)) => {
            let busy = cores(b.busy_secs - a.busy_secs);
            let ours = r.bench.cores_publish + r.server.as_ref().map_or(0.0, |s| s.cores_publish);
            Some(MachineReport {
                cpus: b.cpus,
                busy_cores_publish: round(busy, 3),
                other_cores_publish: round((busy - ours).max(0.0), 3),
            })
        }
        _ => None,
    };
    r.elapsed_secs = round(started.elapsed().as_secs_f64(), 3);
    r.problems = r.find_problems();
    Ok(r)
}

impl PublishBenchReport {
    /// What makes this run not a clean measurement (empty when it is one).
    pub fn find_problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.outcome != "complete" {
            p.push(format!(
                "run ended by {}{}",
                self.outcome,
                self.first_stop
                    .as_deref()
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default()
            ));
        }
        if self.history && self.acks_without_position > 0 {
            p.push(format!(
                "{} acknowledgements without a position on a history channel",
                self.acks_without_position
            ));
        }
        for (n, what) in [
            (self.connect_errors, "publishers failed to connect"),
            (self.publishers_stopped, "publishers stopped early"),
            (self.errors, "error replies"),
            (self.lost, "publications lost (never answered)"),
            (self.malformed, "malformed replies"),
            (self.unexpected_replies, "unexpected replies"),
            (self.pushes, "unexpected pushes"),
            (self.duplicate_offsets, "duplicate offsets"),
            (self.offset_regressions, "offsets not increasing"),
            (self.epoch_changes, "epoch changes"),
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
            let _ = writeln!(t, "  {k:<22} {v}");
        };
        row(
            "scenario",
            format!(
                "publish via {} to {} ({} channel{}): {}{}",
                match self.via {
                    Via::Native => "native WebSocket",
                    Via::Api => "backend API",
                },
                self.channel,
                self.channel_count,
                if self.channel_count == 1 { "" } else { "s" },
                self.outcome,
                self.label
                    .as_deref()
                    .map(|l| format!(" [{l}]"))
                    .unwrap_or_default()
            ),
        );
        row(
            "publishers",
            format!(
                "{} connected of {} ({} failed, {} stopped early{}), window {}",
                self.publishers_connected,
                self.publishers,
                self.connect_errors,
                self.publishers_stopped,
                if self.close_codes.is_empty() {
                    String::new()
                } else {
                    format!(", close codes {:?}", self.close_codes)
                },
                self.window
            ),
        );
        if let Some(e) = self.first_connect_error.as_deref() {
            row("first connect error", e.to_string());
        }
        if let Some(e) = self.first_stop.as_deref() {
            row("first stop", e.to_string());
        }
        row(
            "publications",
            format!(
                "{} of {} sent ({} B payload): {} acked, {} errors, {} lost",
                self.sent,
                self.publications,
                self.payload_bytes,
                self.acked,
                self.errors,
                self.lost
            ),
        );
        if let Some(e) = self.first_error.as_deref() {
            row("first error", e.to_string());
        }
        row(
            "replies",
            format!(
                "malformed {}, unexpected {}, pushes {}, out of order {}",
                self.malformed, self.unexpected_replies, self.pushes, self.replies_out_of_order
            ),
        );
        row(
            "positions",
            if self.history {
                format!(
                    "{} with, {} without; duplicates {}, not increasing {}, epoch changes {}, \
                     holes {}",
                    self.acks_with_position,
                    self.acks_without_position,
                    self.duplicate_offsets,
                    self.offset_regressions,
                    self.epoch_changes,
                    self.offset_holes
                )
            } else {
                "none (no history)".to_string()
            },
        );
        row(
            "time",
            format!(
                "connect {:.2}s, publish {:.3}s, total {:.2}s",
                self.connect_secs, self.publish_secs, self.elapsed_secs
            ),
        );
        row("throughput", format!("{:.0} acked/s", self.acked_per_sec));
        let l = &self.latency;
        row(
            "ack latency (µs)",
            format!(
                "p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}  mean {:.0}",
                l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us, l.mean_us
            ),
        );
        if let Some(s) = &self.server {
            row(
                "server CPU",
                format!(
                    "{:.2}s publishing = {:.2} µs/ack, {:.2} cores ({:.2}s connecting)",
                    s.cpu_secs_publish, s.cpu_us_per_ack, s.cores_publish, s.cpu_secs_connect
                ),
            );
            row(
                "server memory",
                format!(
                    "RSS {} → {} → {} KiB (peak {}), {} threads",
                    s.rss_kib_start, s.rss_kib_connected, s.rss_kib_end, s.hwm_kib, s.threads
                ),
            );
        }
        let b = &self.bench;
        row(
            "load generator",
            format!(
                "{:.2}s CPU publishing = {:.2} µs/ack, {:.2} cores ({} threads)",
                b.cpu_secs_publish, b.cpu_us_per_ack, b.cores_publish, b.threads
            ),
        );
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
        if !self.problems.is_empty() {
            row("PROBLEMS", self.problems.join("; "));
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: PublishArgs,
    }

    fn args(extra: &[&str]) -> PublishArgs {
        let mut v = vec!["x"];
        v.extend_from_slice(extra);
        Cli::parse_from(v).args
    }

    #[test]
    fn splits_publications_and_names_channels() {
        let a = args(&["--publishers", "3", "--publications", "10"]);
        assert_eq!((a.quota(0), a.quota(1), a.quota(2)), (4, 3, 3));
        assert_eq!(a.channel_name(a.channel_index(2)), "durable:bench-2");
        let a = args(&[
            "--publishers",
            "4",
            "--publications",
            "2",
            "--channels",
            "one",
        ]);
        assert_eq!((0..4).map(|i| a.quota(i)).sum::<u64>(), 2);
        assert_eq!(a.quota(3), 0);
        assert_eq!(a.channel_name(a.channel_index(3)), "durable:bench");
        assert!(args(&["--window", "0"]).validate().is_err());
        assert!(args(&["--via", "api", "--key", ""]).validate().is_err());
        assert!(args(&["--via", "api", "--key", "k"]).validate().is_ok());
        assert!(args(&["--key", "k"]).validate().is_ok());
    }

    #[test]
    fn encodes_requests() {
        let mut out = Vec::new();
        publish_request(7, "\"a:b\"", br#"{"s":1}"#, &mut out);
        assert_eq!(
            out,
            br#"{"id":7,"method":"publish","params":{"channel":"a:b","data":{"s":1}}}"#
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["params"]["data"]["s"], 1);
    }

    #[test]
    fn in_flight_matches_replies_to_requests() {
        let mut f = InFlight::new(FIRST_ID, 4);
        for t in [10, 20, 30] {
            assert_eq!(f.next_id(), FIRST_ID + f.sent_at.len() as u64);
            f.push(t);
        }
        assert_eq!(f.count, 3);
        assert_eq!(f.complete(3), Some((20, true)));
        assert_eq!(f.complete(3), None);
        assert_eq!(f.complete(1), None);
        assert_eq!(f.complete(99), None);
        assert_eq!(f.complete(2), Some((10, false)));
        assert_eq!((f.base, f.sent_at.len()), (4, 1));
        assert_eq!(f.next_id(), 5);
        f.push(40);
        assert_eq!(f.complete(4), Some((30, false)));
        assert_eq!(f.complete(5), Some((40, false)));
        assert_eq!((f.count, f.sent_at.len(), f.next_id()), (0, 0, 6));
        f.complete_unknown();
        assert_eq!(f.count, 0);
    }

    #[test]
    fn accounts_replies() {
        let mut f = InFlight::new(FIRST_ID, 8);
        let mut o = PubOutcome::new(0, 5);
        for _ in 0..5 {
            f.push(100);
        }
        let frame = "{\"id\":2,\"result\":{\"epoch\":\"e1\",\"offset\":1}}\n\
                     {\"id\":3,\"result\":{\"epoch\":\"e1\",\"offset\":1}}\n\
                     {\"id\":2,\"result\":{}}\n\
                     {\"id\":4,\"error\":{\"code\":107,\"message\":\"no\"}}\n\
                     {\"id\":null,\"error\":{\"code\":101,\"message\":\"bad\"}}\n\
                     garbage\n\
                     {\"push\":\"publication\",\"channel\":\"c\",\"data\":1}";
        on_event(Event::Text(frame.as_bytes()), 150, &mut f, &mut o);
        on_event(
            Event::Text(br#"{"id":6,"result":{"epoch":"e2","offset":5}}"#),
            170,
            &mut f,
            &mut o,
        );
        on_event(Event::Binary(b"x"), 180, &mut f, &mut o);
        on_event(Event::Close(Some(3004)), 190, &mut f, &mut o);
        assert_eq!(
            (o.acked, o.errors, o.errors_unmatched, o.malformed),
            (3, 2, 1, 2)
        );
        assert_eq!((o.unexpected_replies, o.pushes), (1, 1));
        assert_eq!(o.samples, [50, 50, 70]);
        let offsets: Vec<u64> = o.offsets.iter().map(|(_, off)| *off).collect();
        assert_eq!(offsets, [1, 1, 5]);
        assert_eq!((o.offset_regressions(), o.epoch_changes), (1, 1));
        assert_eq!(o.replies_out_of_order, 1);
        assert_eq!(o.epoch.as_deref(), Some(&b"e1"[..]));
        assert_eq!(
            o.first_error.as_deref(),
            Some(r#"{"id":4,"error":{"code":107,"message":"no"}}"#)
        );
        assert_eq!(o.close_code, Some(3004));
        // id 5 is still awaited; the unmatched error took one more off the count.
        assert_eq!(f.count, 0);
        assert_eq!((f.base, f.sent_at.len()), (5, 2));
    }

    #[test]
    fn checks_offsets_per_channel() {
        let mut a = PubOutcome::new(0, 3);
        let mut b = PubOutcome::new(0, 3);
        let mut c = PubOutcome::new(1, 3);
        for (o, offs, epoch) in [
            (&mut a, [1u64, 3, 4], "e"),
            (&mut b, [2, 4, 7], "e"),
            (&mut c, [1, 2, 3], "f"),
        ] {
            for (seq, off) in offs.into_iter().enumerate() {
                o.on_ack(
                    seq as u64,
                    0,
                    1,
                    Some(Position {
                        epoch: epoch.as_bytes(),
                        offset: off,
                    }),
                );
            }
        }
        // Channel 0: 1 2 3 4 4 7 -> one duplicate, holes 5 and 6; channel 1 is clean.
        assert_eq!(check_channels(&[a, b, c]), (1, 2, 0));
        let mut d = PubOutcome::new(0, 1);
        d.on_ack(
            0,
            0,
            1,
            Some(Position {
                epoch: b"x",
                offset: 9,
            }),
        );
        let e = PubOutcome::new(0, 1);
        let mut a = PubOutcome::new(0, 1);
        a.on_ack(
            0,
            0,
            1,
            Some(Position {
                epoch: b"y",
                offset: 8,
            }),
        );
        assert_eq!(check_channels(&[a, d, e]), (0, 0, 1));
    }

    #[test]
    fn offsets_must_grow_with_the_request_not_the_reply_order() {
        let mut o = PubOutcome::new(0, 3);
        let at = |offset| {
            Some(Position {
                epoch: b"e",
                offset,
            })
        };
        // Replies for requests 2, 1, 3 arrive in that order: fine.
        o.on_ack(2, 0, 1, at(11));
        o.on_ack(1, 0, 1, at(10));
        o.on_ack(3, 0, 1, at(12));
        assert_eq!(o.offset_regressions(), 0);
        // Request 4 stored before request 3: a regression.
        o.on_ack(4, 0, 1, at(9));
        assert_eq!(o.offset_regressions(), 1);
    }

    #[test]
    fn truncates_on_a_char_boundary() {
        let s = "é".repeat(MAX_ERROR_TEXT);
        let t = truncate(s);
        assert!(t.len() <= MAX_ERROR_TEXT + '…'.len_utf8());
        assert!(t.ends_with('…'));
        assert_eq!(truncate("short".into()), "short");
    }

    #[test]
    fn problems_name_what_went_wrong() {
        let mut r = PublishBenchReport {
            scenario: "publish",
            label: None,
            via: Via::Native,
            outcome: "complete",
            channel: "c".into(),
            channels: Channels::One,
            channel_count: 1,
            publishers: 1,
            publishers_connected: 1,
            connect_errors: 0,
            first_connect_error: None,
            publishers_stopped: 0,
            first_stop: None,
            close_codes: BTreeMap::new(),
            window: 1,
            payload_bytes: 1,
            publications: 1,
            sent: 1,
            acked: 1,
            errors: 0,
            errors_unmatched: 0,
            first_error: None,
            lost: 0,
            malformed: 0,
            unexpected_replies: 0,
            pushes: 0,
            replies_out_of_order: 0,
            history: true,
            acks_with_position: 1,
            acks_without_position: 0,
            duplicate_offsets: 0,
            offset_regressions: 0,
            epoch_changes: 0,
            offset_holes: 3,
            connect_secs: 0.0,
            publish_secs: 1.0,
            acked_per_sec: 1.0,
            latency: LatencySummary::default(),
            server: None,
            bench: BenchFigures::default(),
            machine: None,
            elapsed_secs: 1.0,
            problems: Vec::new(),
        };
        assert!(r.find_problems().is_empty());
        r.duplicate_offsets = 2;
        r.outcome = "deadline";
        r.first_stop = Some("global deadline".into());
        assert_eq!(
            r.find_problems(),
            [
                "run ended by deadline (global deadline)",
                "2 duplicate offsets"
            ]
        );
        r.problems = r.find_problems();
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["via"], "native");
        assert_eq!(json["channels"], "one");
        assert!(r.table().contains("PROBLEMS"));
    }
}
