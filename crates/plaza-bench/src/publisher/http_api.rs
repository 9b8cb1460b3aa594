//! Publishing through an HTTP backend API (`POST /api/publish`), pipelined on one keep-alive
//! connection: the writer sends up to the window's worth of requests ahead of the responses, and
//! the reader hands a slot back per response. Responses come in request order, so the server sees
//! the publications in sequence order, and each response is matched with its request's send time
//! (for [`run_with`]'s hook). The future is `Send`: several publishers can run as tasks.

use super::{Pace, PublishReport};
use crate::clock;
use crate::http::{HttpTarget, Response, ResponseReader, encode_request};
use crate::payload;
use anyhow::{Context, Result, bail};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Most requests written in one `write` call.
const MAX_BATCH: usize = 64;

/// What to publish and where.
pub struct HttpPublish<'a> {
    pub target: &'a HttpTarget,
    /// The endpoint, e.g. `/api/publish`.
    pub path: &'a str,
    /// Extra headers (the key).
    pub headers: &'a [(&'a str, &'a str)],
    /// Writes the request body for one payload.
    pub body: &'a (dyn Fn(&[u8], &mut Vec<u8>) + Sync),
    pub count: u64,
    pub payload_bytes: usize,
    pub pace: Pace,
    pub deadline: Instant,
}

/// Live counters for the progress line.
#[derive(Debug, Default)]
pub struct PublishProgress {
    pub sent: AtomicU64,
    pub acked: AtomicU64,
}

/// Publishes `count` payloads; returns what happened, including partial runs.
pub async fn run(p: &HttpPublish<'_>, progress: &Arc<PublishProgress>) -> PublishReport {
    run_with(p, progress, &mut |_, _, _| {}).await
}

/// [`run`], calling `on_response(response, sent_ns, received_ns)` for every response, in request
/// order, with the clock readings ([`clock::now_ns`]) of when its request was written and when the
/// response was read.
pub async fn run_with(
    p: &HttpPublish<'_>,
    progress: &Arc<PublishProgress>,
    on_response: &mut (dyn FnMut(&Response, u64, u64) + Send),
) -> PublishReport {
    let shared = Mutex::new(Shared::default());
    let result =
        tokio::time::timeout_at(p.deadline, publish(p, progress, &shared, on_response)).await;
    let mut report = shared
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
        .report;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => report.aborted = Some(format!("{e:#}")),
        Err(_) => report.aborted = Some("global deadline reached while publishing".into()),
    }
    report.sent = progress.sent.load(Ordering::Relaxed);
    report
}

/// What the writer and the reader share (never locked across an await).
#[derive(Default)]
struct Shared {
    report: PublishReport,
    /// When each request awaiting its response was written, oldest first.
    sent_at: VecDeque<u64>,
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whichever of the writer and the reader fails first ends both.
async fn publish(
    p: &HttpPublish<'_>,
    progress: &PublishProgress,
    shared: &Mutex<Shared>,
    on_response: &mut (dyn FnMut(&Response, u64, u64) + Send),
) -> Result<()> {
    let stream = TcpStream::connect(&p.target.addr)
        .await
        .with_context(|| format!("connecting to {}", p.target.addr))?;
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.into_split();
    let slots = Semaphore::new(p.pace.max_in_flight());
    let path = p.target.path(p.path);
    let start = Instant::now();

    let writer = async {
        let mut buf = Vec::with_capacity(MAX_BATCH * (p.payload_bytes + 256));
        let (mut data, mut body) = (Vec::new(), Vec::new());
        let mut seq = 0u64;
        while seq < p.count {
            // How many are due now (all of them when windowed).
            let due = match p.pace {
                Pace::Window(_) => p.count,
                Pace::Rate { per_sec, .. } => {
                    let due_at = |n: u64| start + Duration::from_secs_f64(n as f64 / per_sec);
                    if Instant::now() < due_at(seq) {
                        tokio::time::sleep_until(due_at(seq)).await;
                    }
                    let elapsed = start.elapsed().as_secs_f64();
                    ((elapsed * per_sec) as u64 + 1).clamp(seq + 1, p.count)
                }
            };
            let want = (due - seq).min(MAX_BATCH as u64) as usize;
            slots.acquire().await.context("window closed")?.forget();
            let mut n = 1;
            while n < want {
                match slots.try_acquire() {
                    Ok(permit) => permit.forget(),
                    Err(_) => break,
                }
                n += 1;
            }
            buf.clear();
            let t = clock::now_ns();
            for s in seq..seq + n as u64 {
                data.clear();
                payload::encode(s, t, p.payload_bytes, &mut data);
                body.clear();
                (p.body)(&data, &mut body);
                encode_request(&mut buf, "POST", &path, &p.target.host, p.headers, &body);
            }
            {
                let mut sh = lock(shared);
                sh.sent_at.extend(std::iter::repeat_n(t, n));
                let r = &mut sh.report;
                if seq == 0 {
                    r.first_send_ns = t;
                }
                r.last_send_ns = t;
            }
            wr.write_all(&buf).await.context("writing requests")?;
            seq += n as u64;
            progress.sent.store(seq, Ordering::Relaxed);
        }
        Ok::<_, anyhow::Error>(())
    };

    let reader = async {
        let mut rr = ResponseReader::default();
        let mut acked = 0u64;
        while acked < p.count {
            let resp = rr.next(&mut rd).await?;
            acked += 1;
            let now = clock::now_ns();
            let sent_at = {
                let mut sh = lock(shared);
                let sent_at = sh.sent_at.pop_front().unwrap_or(now);
                let r = &mut sh.report;
                r.last_ack_ns = now;
                *r.statuses.entry(resp.status).or_insert(0) += 1;
                if (200..300).contains(&resp.status) {
                    r.ok += 1;
                } else {
                    r.refused += 1;
                    if r.first_refusal.is_none() {
                        r.first_refusal = Some(format!(
                            "{} {}",
                            resp.status,
                            String::from_utf8_lossy(&resp.body)
                        ));
                    }
                }
                sent_at
            };
            on_response(&resp, sent_at, now);
            slots.add_permits(1);
            progress.acked.store(acked, Ordering::Relaxed);
            if resp.close && acked < p.count {
                bail!("the server closed the keep-alive connection after {acked} responses");
            }
        }
        Ok::<_, anyhow::Error>(())
    };

    tokio::pin!(writer, reader);
    tokio::select! {
        w = &mut writer => {
            w?;
            (&mut reader).await
        }
        r = &mut reader => {
            r?;
            // Every response is in, so every request was written.
            (&mut writer).await
        }
    }
}
