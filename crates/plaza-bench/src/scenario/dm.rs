//! Direct messages through Plaza's chat (native protocol only): P senders each paired with one
//! receiver, every connection authenticated with an HS256 token signed here.
//!
//! Two phases:
//! - **throughput**: every sender keeps `--window` sends in flight until `--messages` are
//!   accepted in all; each acceptance means the message is durably in its recipient's inbox.
//!   Measured: accepted DMs/s.
//! - **latency**: every sender sends at `--rate` per second for `--secs`; each message carries
//!   its send time, receivers record the end-to-end latency of every message and acknowledge it
//!   (so the server also stores a `delivered` receipt per message). Measured: p50/p90/p99/max,
//!   loss, duplicates.
//!
//! Receivers acknowledge everything they get by `seq` in both phases, as a real client would.

use crate::clock;
use crate::stats::LatencySummary;
use crate::ws::{Message, WsConn, WsTarget};
use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde::Serialize;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Args)]
pub struct DmArgs {
    /// The native WebSocket endpoint.
    #[arg(long, default_value = "ws://127.0.0.1:7700/plaza/ws")]
    pub url: String,
    /// The server's `auth.hmac_secret`, to sign each user's connection token.
    #[arg(long)]
    pub hmac_secret: String,
    /// Sender/receiver pairs (two connections each).
    #[arg(long, default_value_t = 50)]
    pub pairs: u64,
    /// Throughput phase: DMs in all.
    #[arg(long, default_value_t = 20_000)]
    pub messages: u64,
    /// Throughput phase: sends each sender keeps in flight.
    #[arg(long, default_value_t = 32)]
    pub window: u64,
    /// Latency phase: DMs per second per sender.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Latency phase: seconds of sending.
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    /// Size of each message's data, in bytes (roughly).
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// Global deadline, in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DmReport {
    pub scenario: &'static str,
    pub pairs: u64,
    pub messages: u64,
    pub window: u64,
    pub accepted_per_sec: f64,
    pub throughput_secs: f64,
    pub rate: f64,
    pub latency_messages: u64,
    pub latency: LatencySummary,
    pub lost: u64,
    pub duplicates: u64,
    pub problems: Vec<String>,
}

impl DmReport {
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "dm: {} pairs | throughput: {} DMs, window {} → {:.0} accepted DMs/s ({:.2} s)",
            self.pairs, self.messages, self.window, self.accepted_per_sec, self.throughput_secs
        );
        let ms = |us: f64| format!("{:.2}", us / 1e3);
        let _ = writeln!(
            t,
            "latency at {} DM/s per sender: {} DMs, p50 {} ms, p90 {} ms, p99 {} ms, max {} ms, lost {}, dup {}",
            self.rate,
            self.latency_messages,
            ms(self.latency.p50_us),
            ms(self.latency.p90_us),
            ms(self.latency.p99_us),
            ms(self.latency.max_us),
            self.lost,
            self.duplicates
        );
        for p in &self.problems {
            let _ = writeln!(t, "problem: {p}");
        }
        t
    }
}

fn token(secret: &str, user: &str) -> Result<String> {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": user, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .context("signing a token")
}

const WAIT: Duration = Duration::from_secs(10);

/// The JSON objects of one text frame (the native protocol may put several in one frame, one
/// per line).
fn objects(message: Message) -> Result<Vec<serde_json::Value>> {
    match message {
        Message::Text(text) => text
            .split(|b| *b == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| serde_json::from_slice(line).context("a frame that is not JSON"))
            .collect(),
        Message::Binary(_) => bail!("unexpected binary frame"),
        Message::Close(code) => bail!("the server closed the connection ({code:?})"),
    }
}

async fn login(target: &WsTarget, secret: &str, user: &str) -> Result<WsConn> {
    let mut ws = WsConn::connect(target, 16 * 1024, WAIT).await?;
    let connect = serde_json::json!({"id": 0, "method": "connect", "params": {"token": token(secret, user)?}});
    ws.send_text(connect.to_string().as_bytes()).await?;
    loop {
        for v in objects(ws.next_message(WAIT).await?)? {
            if v["id"] == 0 {
                if v.get("result").is_none() {
                    bail!("connect as {user} refused: {v}");
                }
                return Ok(ws);
            }
        }
    }
}

/// A receiver: takes `expected` messages (ids "<phase>-<n>"), acknowledges each, and returns
/// the latency samples and the duplicate count.
async fn receive(
    mut ws: WsConn,
    expected: u64,
    deadline: Instant,
) -> Result<(WsConn, Vec<u64>, u64)> {
    let mut seen = HashSet::new();
    let mut latencies = Vec::with_capacity(expected as usize);
    let mut duplicates = 0;
    let mut acks = Vec::new();
    let mut request = 1u64;
    while (seen.len() as u64) < expected {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let Ok(message) = ws.next_message(left.min(WAIT)).await else {
            break;
        };
        for v in objects(message)? {
            if v["push"] != "message" {
                continue;
            }
            let now = clock::now_ns();
            if !seen.insert(v["id"].as_str().unwrap_or("").to_owned()) {
                duplicates += 1;
            }
            if let Some(sent) = v["data"]["t"].as_u64() {
                latencies.push(now.saturating_sub(sent));
            }
            if let Some(seq) = v["seq"].as_u64() {
                acks.push(seq);
            }
        }
        if !acks.is_empty() {
            let ack = serde_json::json!({"id": request, "method": "ack", "params": {"seq": acks}});
            request += 1;
            ws.send_text(ack.to_string().as_bytes()).await?;
            acks.clear();
        }
    }
    Ok((ws, latencies, duplicates))
}

/// A sender in the throughput phase: `count` sends with `window` in flight.
async fn send_window(
    mut ws: WsConn,
    receiver: String,
    phase: &str,
    count: u64,
    window: u64,
    pad: String,
) -> Result<WsConn> {
    let mut sent = 0;
    let mut accepted = 0;
    while accepted < count {
        while sent < count && sent - accepted < window {
            sent += 1;
            let req = serde_json::json!({"id": sent, "method": "send", "params": {
                "user": receiver, "id": format!("{phase}-{sent}"), "data": {"t": clock::now_ns(), "p": pad}}});
            ws.queue_message(req.to_string().as_bytes(), false);
        }
        ws.write_all(&[]).await?;
        for v in objects(ws.next_message(WAIT).await?)? {
            if v.get("id").is_some_and(|id| id.is_u64()) {
                if v.get("result").is_none() {
                    bail!("send refused: {v}");
                }
                accepted += 1;
            }
        }
    }
    Ok(ws)
}

/// A sender in the latency phase: `count` sends paced at `rate` per second.
async fn send_paced(
    mut ws: WsConn,
    receiver: String,
    count: u64,
    rate: f64,
    offset: Duration,
    pad: String,
) -> Result<WsConn> {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + offset;
    let mut accepted = 0;
    for n in 1..=count {
        tokio::time::sleep_until(start + interval * (n as u32 - 1)).await;
        let req = serde_json::json!({"id": n, "method": "send", "params": {
            "user": receiver, "id": format!("lat-{n}"), "data": {"t": clock::now_ns(), "p": pad}}});
        ws.send_text(req.to_string().as_bytes()).await?;
        // Replies are read as they come, without waiting for each.
        while let Ok(Ok(message)) =
            tokio::time::timeout(Duration::ZERO, ws.next_message(WAIT)).await
        {
            accepted += objects(message)?
                .iter()
                .filter(|v| v.get("result").is_some())
                .count() as u64;
        }
    }
    while accepted < count {
        accepted += objects(ws.next_message(WAIT).await?)?
            .iter()
            .filter(|v| v.get("result").is_some())
            .count() as u64;
    }
    Ok(ws)
}

pub async fn run(args: DmArgs) -> Result<DmReport> {
    if args.pairs == 0 || args.window == 0 || args.messages == 0 {
        bail!("--pairs, --window and --messages must be at least 1");
    }
    if !(args.rate.is_finite() && args.rate > 0.0 && args.secs.is_finite() && args.secs > 0.0) {
        bail!("--rate and --secs must be positive numbers");
    }
    let target = WsTarget::parse(&args.url)?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let pad = "x".repeat(args.payload_bytes.saturating_sub(40));
    let run_id = clock::now_ns();
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for p in 0..args.pairs {
        receivers.push(login(&target, &args.hmac_secret, &format!("r{run_id}-{p}")).await?);
        senders.push(login(&target, &args.hmac_secret, &format!("s{run_id}-{p}")).await?);
    }
    let mut problems = Vec::new();

    // Throughput.
    let per_sender = (args.messages / args.pairs.max(1)).max(1);
    let started = Instant::now();
    let mut receiving = Vec::new();
    for ws in receivers {
        receiving.push(tokio::spawn(receive(ws, per_sender, deadline)));
    }
    let mut sending = Vec::new();
    for (p, ws) in senders.into_iter().enumerate() {
        let receiver = format!("r{run_id}-{p}");
        sending.push(tokio::spawn(send_window(
            ws,
            receiver,
            "tp",
            per_sender,
            args.window,
            pad.clone(),
        )));
    }
    let mut senders = Vec::new();
    for task in sending {
        senders.push(task.await.map_err(|e| anyhow!("{e}"))??);
    }
    let throughput_secs = started.elapsed().as_secs_f64();
    let mut receivers = Vec::new();
    for task in receiving {
        let (ws, got, dup) = task.await.map_err(|e| anyhow!("{e}"))??;
        if (got.len() as u64) < per_sender {
            problems.push(format!(
                "throughput phase: a receiver got {} of {per_sender}",
                got.len()
            ));
        }
        if dup > 0 {
            problems.push(format!("throughput phase: {dup} duplicates"));
        }
        receivers.push(ws);
    }

    // Latency at a fixed load.
    let count = (args.rate * args.secs).round().max(1.0) as u64;
    let mut receiving = Vec::new();
    for ws in receivers {
        receiving.push(tokio::spawn(receive(ws, count, deadline)));
    }
    let mut sending = Vec::new();
    let stagger = Duration::from_secs_f64(1.0 / args.rate / args.pairs.max(1) as f64);
    for (p, ws) in senders.into_iter().enumerate() {
        let receiver = format!("r{run_id}-{p}");
        sending.push(tokio::spawn(send_paced(
            ws,
            receiver,
            count,
            args.rate,
            stagger * p as u32,
            pad.clone(),
        )));
    }
    for task in sending {
        task.await.map_err(|e| anyhow!("{e}"))??;
    }
    let mut samples = Vec::new();
    let mut lost = 0;
    let mut duplicates = 0;
    for task in receiving {
        let (_, mut got, dup) = task.await.map_err(|e| anyhow!("{e}"))??;
        lost += count.saturating_sub(got.len() as u64);
        duplicates += dup;
        samples.append(&mut got);
    }
    if lost > 0 {
        problems.push(format!("latency phase: {lost} messages lost"));
    }
    if duplicates > 0 {
        problems.push(format!("latency phase: {duplicates} duplicates"));
    }
    let latency_messages = samples.len() as u64;
    Ok(DmReport {
        scenario: "dm",
        pairs: args.pairs,
        messages: per_sender * args.pairs,
        window: args.window,
        accepted_per_sec: (per_sender * args.pairs) as f64 / throughput_secs,
        throughput_secs,
        rate: args.rate,
        latency_messages,
        latency: LatencySummary::from_ns(&mut samples),
        lost,
        duplicates,
        problems,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_into_objects() {
        let v = objects(Message::Text(b"{\"a\":1}\n{\"b\":2}".to_vec())).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1]["b"], 2);
        assert!(objects(Message::Close(Some(3000))).is_err());
    }
}
