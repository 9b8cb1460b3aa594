//! Publishing through an HTTP backend API (`POST /api/publish`), pipelined on one keep-alive
//! connection: the writer sends up to the window's worth of requests ahead of the responses, and
//! the reader hands a slot back per response. Responses come in request order, so the server sees
//! the publications in sequence order.

use super::{Pace, PublishReport};
use crate::clock;
use crate::http::{HttpTarget, ResponseReader, encode_request};
use crate::payload;
use anyhow::{Context, Result, bail};
use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
    let report = RefCell::new(PublishReport::default());
    let result = tokio::time::timeout_at(p.deadline, publish(p, progress, &report)).await;
    let mut report = report.into_inner();
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => report.aborted = Some(format!("{e:#}")),
        Err(_) => report.aborted = Some("global deadline reached while publishing".into()),
    }
    report.sent = progress.sent.load(Ordering::Relaxed);
    report
}

/// Writer and reader share `report` (never borrowed across an await). Whichever fails first ends
/// both.
async fn publish(
    p: &HttpPublish<'_>,
    progress: &PublishProgress,
    report: &RefCell<PublishReport>,
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
                let mut r = report.borrow_mut();
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
            {
                let mut r = report.borrow_mut();
                r.last_ack_ns = clock::now_ns();
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
            }
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
