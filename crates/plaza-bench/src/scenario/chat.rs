//! Chat rooms: R rooms of K members; every member sends M = rate × secs messages to its room at a
//! fixed rate (members staggered evenly over one interval), over its own connection, and
//! receives everything sent to its room, its own messages included. High-templar's clients
//! cannot publish: for it the same messages, at the same per-room rate, go through RabbitMQ.
//!
//! Measured: deliveries/s, exact latency over every delivery, loss and duplicates (each member
//! tracks the K × M sequence numbers of its room), server CPU while sending.

use super::fanout::{
    ConnectSpec, Ended, Live, ReaderPool, Sender, SubStats, connect_subscribers, round,
    sample_self, sample_server,
};
use super::target::{self, PublishJob, TargetArgs};
use crate::clock;
use crate::peer::Kind;
use crate::procfs;
use crate::progress;
use crate::publisher::http_api::PublishProgress;
use crate::publisher::{Pace, PublishReport};
use crate::stats::LatencySummary;
use crate::ws::WsTarget;
use anyhow::{Result, bail};
use clap::Args;
use futures_util::FutureExt;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Rooms.
    #[arg(long, default_value_t = 50)]
    pub rooms: u64,
    /// Members per room (one connection each).
    #[arg(long, default_value_t = 20)]
    pub members: u64,
    /// Messages per second each member sends.
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 20.0)]
    pub secs: f64,
    /// Room r is the channel `<prefix><r>` (Plaza needs client publishing in its namespace).
    #[arg(long, default_value = "chat:r")]
    pub channel_prefix: String,
    /// Size of each message's data, in bytes.
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// The server's PID, to read its CPU time and memory from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Global deadline for the whole run, in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// End the run when no delivery arrived for this long after sending.
    #[arg(long, default_value_t = 5.0)]
    pub drain_idle_secs: f64,
    /// Tasks reading (and writing) the members' connections.
    #[arg(long, default_value_t = 4)]
    pub reader_tasks: usize,
    /// WebSocket handshakes (and subscribes) in flight at once.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Read buffer per WebSocket, in bytes.
    #[arg(long, default_value_t = 8 * 1024)]
    pub ws_read_buffer: usize,
    /// Seconds between progress lines on stderr (0: none).
    #[arg(long, default_value_t = 1.0)]
    pub progress_secs: f64,
}

/// The result of a chat run (one JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct ChatReport {
    pub scenario: &'static str,
    pub peer: &'static str,
    /// `complete`, `idle` (deliveries stopped before all arrived) or `deadline`.
    pub outcome: &'static str,
    pub rooms: u64,
    pub members: u64,
    pub rate: f64,
    pub messages_per_member: u64,
    /// `members` (each member's own connection) or `amqp` (RabbitMQ for the members).
    pub sent_by: &'static str,
    pub connected: u64,
    pub connect_errors: u64,
    pub first_connect_error: Option<String>,
    pub dropped: u64,
    pub close_codes: BTreeMap<u16, u64>,
    /// Messages sent (written to the server or, for `amqp`, confirmed by the broker).
    pub sent: u64,
    pub publish_problem: Option<String>,
    /// sent × members: every member gets every message of its room.
    pub expected: u64,
    pub received: u64,
    pub unique: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub malformed: u64,
    pub error_frames: u64,
    /// From the first message sent to the last delivery.
    pub delivery_secs: f64,
    pub deliveries_per_sec: f64,
    pub latency: LatencySummary,
    pub server: Option<ChatServer>,
    pub bench_cores: f64,
    pub other_cores: Option<f64>,
    pub elapsed_secs: f64,
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatServer {
    pub pid: u32,
    pub cpu_secs: f64,
    /// Average cores busy from the first message to the end of the wait.
    pub cores: f64,
    pub rss_kib_connected: u64,
    pub rss_kib_end: u64,
    pub hwm_kib: u64,
}

impl ChatArgs {
    fn validate(&self) -> Result<u64> {
        if self.rooms == 0 || self.members == 0 {
            bail!("--rooms and --members must be at least 1");
        }
        if !(self.rate.is_finite() && self.rate > 0.0) {
            bail!("--rate must be positive");
        }
        if !(self.secs.is_finite() && self.secs > 0.0) {
            bail!("--secs must be positive");
        }
        for (v, name) in [
            (self.drain_idle_secs, "--drain-idle-secs"),
            (self.progress_secs, "--progress-secs"),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{name} must be a non-negative number");
            }
        }
        let m = (self.rate * self.secs).round().max(1.0) as u64;
        let per_member = self.members.saturating_mul(m);
        if self
            .rooms
            .saturating_mul(self.members)
            .saturating_mul(per_member)
            > 200_000_000
        {
            bail!("rooms x members x members x messages is over 200M deliveries: lower one");
        }
        Ok(m)
    }
}

/// Runs the scenario.
pub async fn run(args: ChatArgs, threads: usize) -> Result<ChatReport> {
    let m = args.validate()?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let progress_every = Duration::from_secs_f64(args.progress_secs);
    let kind = args.target.peer;
    let peer = kind.subscriber();
    args.target.check().await?;
    let ws_target = WsTarget::parse(&args.target.ws)?;
    let (k, rooms) = (args.members, args.rooms);
    let n = rooms * k;
    let room_name = |r: u64| format!("{}{r}", args.channel_prefix);
    let interval = Duration::from_secs_f64(1.0 / args.rate);

    // Members send over their own connection, from one start instant.
    let (start_tx, start_rx) = tokio::sync::oneshot::channel::<Instant>();
    let start = start_rx.shared();
    let encoders: Vec<_> = (0..rooms)
        .map(|r| target::member_publish(kind, &room_name(r)))
        .collect();
    let sent_by = if encoders.iter().all(Option::is_some) {
        "members"
    } else {
        "amqp"
    };
    let make_sender = |i: u64| -> Option<Sender> {
        let encode = encoders.get((i / k) as usize)?.clone()?;
        Some(Sender {
            encode,
            start: start.clone(),
            offset: interval.mul_f64(i as f64 / n as f64),
            interval,
            count: m,
            first_seq: (i % k) * m,
            payload_bytes: args.payload_bytes,
            started: None,
            next: 0,
            sleep: None,
            buf: Vec::new(),
            data: Vec::new(),
        })
    };

    let live = Arc::new(Live::default());
    let mut pool = ReaderPool::new(args.reader_tasks);
    let conn = connect_subscribers(
        &mut pool,
        ConnectSpec {
            peer: &peer,
            targets: std::slice::from_ref(&ws_target),
            channel: &|i| room_name(i / k),
            count: n,
            concurrency: args.connect_concurrency,
            read_buffer: args.ws_read_buffer,
            publications: k * m,
            live: &live,
            deadline,
            progress_every,
            label: "chat",
            sender: Some(&make_sender),
        },
    )
    .await;
    if conn.connected == 0 {
        pool.stop().await;
        bail!(
            "no member could connect: {}",
            conn.first_error.unwrap_or_default()
        );
    }
    if !conn.deadline_hit {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(Duration::from_millis(500).min(left)).await;
    }

    // Send.
    let server_before = sample_server(args.server_pid);
    let bench_before = sample_self();
    let machine_before = procfs::sample_machine().ok();
    let t_start = Instant::now();
    let first_send_ns = clock::now_ns();
    let _ = start_tx.send(t_start);
    let total = n * m;
    let progress = {
        let l = live.clone();
        progress::spawn("chat", progress_every, move || {
            format!(
                "sent {}/{total}, delivered {}",
                l.sent.load(Ordering::Relaxed),
                l.unique.load(Ordering::Relaxed)
            )
        })
    };
    let mut publish_problem = None;
    let mut amqp_report: Option<PublishReport> = None;
    if kind == Kind::Hightemplar && !conn.deadline_hit {
        // RabbitMQ publishes for the members: message i to room i % R with sequence i / R,
        // at the members' combined rate.
        let job = PublishJob {
            target: &args.target,
            channel: "",
            rooms: (0..rooms).map(room_name).collect(),
            count: total,
            payload_bytes: args.payload_bytes,
            pace: Pace::Rate {
                per_sec: args.rate * n as f64,
                max_in_flight: 1024,
            },
            deadline,
        };
        let p = Arc::new(PublishProgress::default());
        let r = target::publish(&job, &p).await;
        live.sent.store(r.ok, Ordering::Relaxed);
        publish_problem = r.aborted.clone();
        amqp_report = Some(r);
    } else if !conn.deadline_hit {
        // Bounded by the deadline: the members stop after M messages each.
        let expected_sent = conn.connected * m;
        while live.sent.load(Ordering::Relaxed) < expected_sent && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let sent = live.sent.load(Ordering::Relaxed);

    // Drain.
    let expected = sent * k;
    let idle = Duration::from_secs_f64(args.drain_idle_secs);
    let (mut last_seen, mut last_change) = (live.unique.load(Ordering::Relaxed), Instant::now());
    let outcome = loop {
        let now = Instant::now();
        let unique = live.unique.load(Ordering::Relaxed);
        if conn.deadline_hit || now >= deadline {
            break "deadline";
        }
        if unique >= expected {
            break "complete";
        }
        if unique != last_seen {
            (last_seen, last_change) = (unique, now);
        } else if now - last_change >= idle {
            break "idle";
        }
        tokio::time::sleep(Duration::from_millis(5).min(deadline - now)).await;
    };
    let server_after = sample_server(args.server_pid);
    let bench_after = sample_self();
    let machine_after = procfs::sample_machine().ok();
    let window = t_start.elapsed().as_secs_f64().max(1e-9);
    drop(progress);

    let mut subs = pool.stop().await;
    let mut samples = Vec::with_capacity(subs.iter().map(|s| s.recv.samples.len()).sum());
    let mut st = SubStats::default();
    let (mut dropped, mut close_codes) = (0u64, BTreeMap::new());
    for sub in &mut subs {
        samples.append(&mut sub.recv.samples);
        st.add(&sub.recv.stats);
        match &sub.ended {
            None => {}
            Some(Ended::Closed(code)) => {
                dropped += 1;
                *close_codes.entry(*code).or_insert(0u64) += 1;
            }
            Some(Ended::Broken(_)) => dropped += 1,
        }
    }
    dropped += conn.connected.saturating_sub(subs.len() as u64);
    drop(subs);
    let latency = LatencySummary::from_ns(&mut samples);
    drop(samples);

    let first_ns = amqp_report
        .as_ref()
        .map_or(first_send_ns, |r| r.first_send_ns.max(first_send_ns));
    let delivery_secs = clock::secs_between(first_ns, st.last_recv_ns);
    let bench_cores = (bench_after.cpu_secs - bench_before.cpu_secs) / window;
    let server = match (args.server_pid, server_before, server_after) {
        (Some(pid), Some(a), Some(b)) => Some(ChatServer {
            pid,
            cpu_secs: round(b.cpu_secs - a.cpu_secs, 2),
            cores: round((b.cpu_secs - a.cpu_secs) / window, 3),
            rss_kib_connected: a.rss_kib,
            rss_kib_end: b.rss_kib,
            hwm_kib: b.hwm_kib,
        }),
        _ => None,
    };
    let other_cores = match (machine_before, machine_after) {
        (Some(a), Some(b)) => {
            let busy = (b.busy_secs - a.busy_secs) / window;
            let ours = bench_cores + server.as_ref().map_or(0.0, |s| s.cores);
            Some(round((busy - ours).max(0.0), 3))
        }
        _ => None,
    };
    let _ = threads;
    let mut report = ChatReport {
        scenario: "chat",
        peer: peer.name(),
        outcome,
        rooms,
        members: k,
        rate: args.rate,
        messages_per_member: m,
        sent_by,
        connected: conn.connected,
        connect_errors: conn.failed,
        first_connect_error: conn.first_error,
        dropped,
        close_codes,
        sent,
        publish_problem,
        expected,
        received: st.received,
        unique: st.unique,
        lost: expected.saturating_sub(st.unique),
        duplicates: st.duplicates,
        malformed: st.malformed,
        error_frames: st.error_frames,
        delivery_secs: round(delivery_secs, 3),
        deliveries_per_sec: round(
            if delivery_secs > 0.0 {
                st.unique as f64 / delivery_secs
            } else {
                0.0
            },
            1,
        ),
        latency,
        server,
        bench_cores: round(bench_cores, 3),
        other_cores,
        elapsed_secs: round(started.elapsed().as_secs_f64(), 3),
        problems: Vec::new(),
    };
    report.problems = report.find_problems();
    Ok(report)
}

impl ChatReport {
    pub fn find_problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.outcome != "complete" {
            p.push(format!("run ended by {}", self.outcome));
        }
        if self.connect_errors > 0 {
            p.push(format!("{} members failed to connect", self.connect_errors));
        }
        if self.dropped > 0 {
            p.push(format!("{} members dropped", self.dropped));
        }
        if let Some(e) = &self.publish_problem {
            p.push(format!("publishing: {e}"));
        }
        let planned = self.rooms * self.members * self.messages_per_member;
        if self.sent < planned {
            p.push(format!("{} of {planned} messages sent", self.sent));
        }
        for (n, what) in [
            (self.lost, "deliveries lost"),
            (self.duplicates, "duplicate deliveries"),
            (self.malformed, "malformed frames"),
            (self.error_frames, "error frames"),
        ] {
            if n > 0 {
                p.push(format!("{n} {what}"));
            }
        }
        p
    }

    pub fn table(&self) -> String {
        let mut t = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(t, "  {k:<26} {v}");
        };
        row(
            "scenario",
            format!(
                "chat ({}): {} rooms x {} members, {}/s each for {} messages (sent by {}): {}",
                self.peer,
                self.rooms,
                self.members,
                self.rate,
                self.messages_per_member,
                self.sent_by,
                self.outcome
            ),
        );
        row(
            "members",
            format!(
                "{} connected ({} failed, {} dropped{})",
                self.connected,
                self.connect_errors,
                self.dropped,
                if self.close_codes.is_empty() {
                    String::new()
                } else {
                    format!(", close codes {:?}", self.close_codes)
                }
            ),
        );
        row(
            "deliveries",
            format!(
                "{} sent; {} unique of {} expected: lost {}, duplicates {}",
                self.sent, self.unique, self.expected, self.lost, self.duplicates
            ),
        );
        row(
            "throughput",
            format!(
                "{:.0} deliveries/s over {:.2}s",
                self.deliveries_per_sec, self.delivery_secs
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
                "server",
                format!(
                    "{:.2}s CPU = {:.2} cores; RSS {} → {} KiB (peak {})",
                    s.cpu_secs, s.cores, s.rss_kib_connected, s.rss_kib_end, s.hwm_kib
                ),
            );
        }
        row(
            "load generator",
            format!(
                "{:.2} cores{}",
                self.bench_cores,
                self.other_cores
                    .map(|o| format!("; other processes {o:.2} cores"))
                    .unwrap_or_default()
            ),
        );
        if !self.problems.is_empty() {
            row("PROBLEMS", self.problems.join("; "));
        }
        t
    }
}
