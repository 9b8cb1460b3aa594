//! Idle connections: C connections, each subscribed to a channel of its own, then held open.
//!
//! Measured: the connect rate (connections subscribed per second, `--connect-concurrency`
//! handshakes in flight), the server's RSS per connection ((RSS once all are connected and the
//! server settled) − (RSS before the first), over the connections), the server's CPU per
//! connection while connecting, and its CPU while they sit idle for `--hold-secs` (keep-alives),
//! plus connections the server dropped.

use super::fanout::{
    ConnectSpec, Ended, Live, ReaderPool, connect_subscribers, round, sample_self, sample_server,
};
use super::target::TargetArgs;
use crate::progress;
use crate::ws::WsTarget;
use anyhow::{Result, bail};
use clap::Args;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Args)]
pub struct ConnsArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    pub connections: u64,
    /// Connection i subscribes to `<prefix><i>`.
    #[arg(long, default_value = "idle")]
    pub channel_prefix: String,
    /// WebSocket handshakes (and subscribes) in flight at once.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Seconds to wait after the last connection before reading the server's memory.
    #[arg(long, default_value_t = 2.0)]
    pub settle_secs: f64,
    /// Seconds the connections are then held idle (server CPU is measured over them).
    #[arg(long, default_value_t = 10.0)]
    pub hold_secs: f64,
    /// Tasks reading the connections (answering keep-alives).
    #[arg(long, default_value_t = 4)]
    pub reader_tasks: usize,
    /// Read buffer per WebSocket, in bytes (it grows for a larger message).
    #[arg(long, default_value_t = 4096)]
    pub ws_read_buffer: usize,
    /// The server's PID, to read its CPU time and memory from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Global deadline for the whole run, in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// Seconds between progress lines on stderr (0: none).
    #[arg(long, default_value_t = 1.0)]
    pub progress_secs: f64,
}

/// The result of a conns run (one JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct ConnsReport {
    pub scenario: &'static str,
    pub peer: &'static str,
    /// `complete` or `deadline`.
    pub outcome: &'static str,
    pub connections: u64,
    pub connected: u64,
    pub connect_errors: u64,
    pub first_connect_error: Option<String>,
    pub connect_secs: f64,
    /// Connections subscribed per second.
    pub connect_rate: f64,
    /// Connections that ended before the run did, and their close codes.
    pub dropped: u64,
    pub close_codes: BTreeMap<u16, u64>,
    pub first_drop_error: Option<String>,
    pub server: Option<ConnsServer>,
    pub bench_rss_kib: u64,
    pub bench_cpu_secs: f64,
    pub elapsed_secs: f64,
    pub problems: Vec<String>,
}

/// The server's side of a conns run.
#[derive(Debug, Clone, Serialize)]
pub struct ConnsServer {
    pub pid: u32,
    pub rss_kib_before: u64,
    pub rss_kib_connected: u64,
    pub rss_kib_end: u64,
    pub hwm_kib: u64,
    /// (RSS connected − RSS before) / connections, in bytes.
    pub rss_bytes_per_connection: f64,
    pub cpu_secs_connect: f64,
    /// Server CPU per connection opened and subscribed, in microseconds.
    pub cpu_us_per_connect: f64,
    /// Average cores busy while the connections were idle.
    pub cores_idle: f64,
    pub threads: u64,
}

/// Runs the scenario.
pub async fn run(args: ConnsArgs, _threads: usize) -> Result<ConnsReport> {
    if args.connections == 0 || args.connect_concurrency == 0 {
        bail!("--connections and --connect-concurrency must be at least 1");
    }
    for (v, name) in [
        (args.settle_secs, "--settle-secs"),
        (args.hold_secs, "--hold-secs"),
        (args.progress_secs, "--progress-secs"),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            bail!("{name} must be a non-negative number");
        }
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let progress_every = Duration::from_secs_f64(args.progress_secs);
    let peer = args.target.peer.subscriber();
    args.target.check().await?;
    let ws_target = WsTarget::parse(&args.target.ws)?;

    let before = sample_server(args.server_pid);
    let live = Arc::new(Live::default());
    let mut pool = ReaderPool::new(args.reader_tasks);
    let prefix = args.channel_prefix.clone();
    let t0 = Instant::now();
    let conn = connect_subscribers(
        &mut pool,
        ConnectSpec {
            peer: &peer,
            targets: std::slice::from_ref(&ws_target),
            channel: &move |i| format!("{prefix}{i}"),
            count: args.connections,
            concurrency: args.connect_concurrency,
            read_buffer: args.ws_read_buffer,
            publications: 0,
            live: &live,
            deadline,
            progress_every,
            label: "conns",
            sender: None,
        },
    )
    .await;
    let connect_secs = t0.elapsed().as_secs_f64();
    let after_connect = sample_server(args.server_pid);

    // Settle, read the memory, then hold.
    let sleep_until = |secs: f64| {
        let until = (Instant::now() + Duration::from_secs_f64(secs)).min(deadline);
        tokio::time::sleep_until(until)
    };
    if !conn.deadline_hit {
        sleep_until(args.settle_secs).await;
    }
    let connected_sample = sample_server(args.server_pid);
    let hold_start = Instant::now();
    if !conn.deadline_hit {
        let _p = progress::spawn("conns", progress_every, || "holding".to_string());
        sleep_until(args.hold_secs).await;
    }
    let hold_secs = hold_start.elapsed().as_secs_f64();
    let end = sample_server(args.server_pid);
    let outcome = if conn.deadline_hit || Instant::now() >= deadline {
        "deadline"
    } else {
        "complete"
    };

    let subs = pool.stop().await;
    let (mut dropped, mut close_codes, mut first_drop_error) = (0u64, BTreeMap::new(), None);
    for sub in &subs {
        match &sub.ended {
            None => {}
            Some(Ended::Closed(code)) => {
                dropped += 1;
                *close_codes.entry(*code).or_insert(0u64) += 1;
            }
            Some(Ended::Broken(e)) => {
                dropped += 1;
                first_drop_error.get_or_insert_with(|| e.clone());
            }
        }
    }
    dropped += conn.connected.saturating_sub(subs.len() as u64);
    drop(subs);
    let me = sample_self();

    let n = conn.connected.max(1) as f64;
    let server = match (
        args.server_pid,
        before,
        after_connect,
        connected_sample,
        end,
    ) {
        (Some(pid), Some(b), Some(a), Some(c), Some(e)) => Some(ConnsServer {
            pid,
            rss_kib_before: b.rss_kib,
            rss_kib_connected: c.rss_kib,
            rss_kib_end: e.rss_kib,
            hwm_kib: e.hwm_kib,
            rss_bytes_per_connection: round((c.rss_kib as f64 - b.rss_kib as f64) * 1024.0 / n, 0),
            cpu_secs_connect: round(a.cpu_secs - b.cpu_secs, 2),
            cpu_us_per_connect: round((a.cpu_secs - b.cpu_secs) * 1e6 / n, 1),
            cores_idle: round((e.cpu_secs - c.cpu_secs) / hold_secs.max(1e-9), 4),
            threads: e.threads,
        }),
        _ => None,
    };
    let mut report = ConnsReport {
        scenario: "conns",
        peer: peer.name(),
        outcome,
        connections: args.connections,
        connected: conn.connected,
        connect_errors: conn.failed,
        first_connect_error: conn.first_error,
        connect_secs: round(connect_secs, 3),
        connect_rate: round(conn.connected as f64 / connect_secs.max(1e-9), 1),
        dropped,
        close_codes,
        first_drop_error,
        server,
        bench_rss_kib: me.rss_kib,
        bench_cpu_secs: round(me.cpu_secs, 2),
        elapsed_secs: round(started.elapsed().as_secs_f64(), 3),
        problems: Vec::new(),
    };
    report.problems = report.find_problems();
    Ok(report)
}

impl ConnsReport {
    pub fn find_problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.outcome != "complete" {
            p.push(format!("run ended by {}", self.outcome));
        }
        if self.connect_errors > 0 {
            p.push(format!("{} connections failed", self.connect_errors));
        }
        if self.dropped > 0 {
            p.push(format!("{} connections dropped", self.dropped));
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
            format!("conns ({}): {}", self.peer, self.outcome),
        );
        row(
            "connections",
            format!(
                "{} of {} in {:.2}s = {:.0}/s ({} failed, {} dropped{})",
                self.connected,
                self.connections,
                self.connect_secs,
                self.connect_rate,
                self.connect_errors,
                self.dropped,
                if self.close_codes.is_empty() {
                    String::new()
                } else {
                    format!(", close codes {:?}", self.close_codes)
                }
            ),
        );
        if let Some(e) = &self.first_connect_error {
            row("first connect error", e.clone());
        }
        if let Some(s) = &self.server {
            row(
                "server memory",
                format!(
                    "RSS {} → {} → {} KiB (peak {}): {:.0} B/connection, {} threads",
                    s.rss_kib_before,
                    s.rss_kib_connected,
                    s.rss_kib_end,
                    s.hwm_kib,
                    s.rss_bytes_per_connection,
                    s.threads
                ),
            );
            row(
                "server CPU",
                format!(
                    "{:.2}s connecting = {:.1} µs/connection; {:.3} cores while idle",
                    s.cpu_secs_connect, s.cpu_us_per_connect, s.cores_idle
                ),
            );
        }
        row(
            "load generator",
            format!(
                "RSS {} KiB, {:.2}s CPU",
                self.bench_rss_kib, self.bench_cpu_secs
            ),
        );
        if !self.problems.is_empty() {
            row("PROBLEMS", self.problems.join("; "));
        }
        t
    }
}
