//! Publishing through RabbitMQ (AMQP 0-9-1), as High-templar's real deployments do: each
//! publication is a `basic.publish` of `{"rooms":[ROOM],"data":DATA}` to exchange `hightemplar`
//! with routing key `*`, on a channel in confirm mode; the broker's `basic.ack` is the
//! acknowledgement (it means the broker routed the message, not that High-templar delivered it).
//!
//! Only what a publisher needs is implemented: the handshake with PLAIN login, one channel,
//! `confirm.select`, `basic.publish` with its content header and body, and the frames the broker
//! answers with (`basic.ack`/`basic.nack`, `channel.close`, `connection.close`). Heartbeats are
//! turned off.

use super::{Pace, PublishReport};
use crate::clock;
use crate::payload;
use crate::publisher::http_api::PublishProgress;
use anyhow::{Context, Result, bail};
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
/// Largest frame accepted from the broker before `tune` (the spec's minimum frame-max).
const MIN_FRAME_MAX: u32 = 4096;
/// Largest frame this client accepts or sends.
const FRAME_MAX: u32 = 128 * 1024;
/// Most publications written in one `write` call.
const MAX_BATCH: usize = 64;

/// What to publish and where.
pub struct AmqpPublish<'a> {
    /// `host:port` of the broker.
    pub addr: &'a str,
    pub user: &'a str,
    pub password: &'a str,
    pub exchange: &'a str,
    pub routing_key: &'a str,
    /// The High-templar rooms, as JSON: publication `i` goes to room `i % rooms.len()` with
    /// sequence number `i / rooms.len()` (one room: sequence `i`).
    pub rooms: Vec<String>,
    pub count: u64,
    pub payload_bytes: usize,
    pub pace: Pace,
    pub deadline: Instant,
    /// Give up when no confirm came for this long with publications in flight.
    pub idle: Duration,
}

/// One frame from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub channel: u16,
    pub payload: Vec<u8>,
}

impl Frame {
    /// `(class, method)` of a method frame.
    pub fn method(&self) -> Option<(u16, u16)> {
        if self.kind != FRAME_METHOD || self.payload.len() < 4 {
            return None;
        }
        let p = &self.payload;
        Some((
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        ))
    }

    /// The arguments of a method frame.
    pub fn args(&self) -> &[u8] {
        self.payload.get(4..).unwrap_or(&[])
    }
}

/// Parses one frame at the start of `buf`: `Ok(None)` while incomplete.
pub fn parse_frame(buf: &[u8], frame_max: u32) -> Result<Option<(Frame, usize)>> {
    if buf.len() < 7 {
        return Ok(None);
    }
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]);
    if size > frame_max {
        bail!("AMQP: a frame of {size} bytes (frame-max {frame_max})");
    }
    let total = 7 + size as usize + 1;
    if buf.len() < total {
        return Ok(None);
    }
    if buf[total - 1] != FRAME_END {
        bail!("AMQP: bad frame end");
    }
    Ok(Some((
        Frame {
            kind: buf[0],
            channel: u16::from_be_bytes([buf[1], buf[2]]),
            payload: buf[7..total - 1].to_vec(),
        },
        total,
    )))
}

/// Appends a frame.
pub fn encode_frame(kind: u8, channel: u16, payload: &[u8], out: &mut Vec<u8>) {
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(FRAME_END);
}

fn shortstr(s: &str, out: &mut Vec<u8>) {
    let b = &s.as_bytes()[..s.len().min(255)];
    out.push(b.len() as u8);
    out.extend_from_slice(b);
}

fn longstr(b: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// A method frame's payload: class, method, arguments.
pub fn method(class: u16, method: u16, args: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + args.len());
    p.extend_from_slice(&class.to_be_bytes());
    p.extend_from_slice(&method.to_be_bytes());
    p.extend_from_slice(args);
    p
}

/// Appends `basic.publish` + content header + body frames on channel 1.
pub fn encode_publish(
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    frame_max: u32,
    out: &mut Vec<u8>,
) {
    let mut args = Vec::with_capacity(8 + exchange.len() + routing_key.len());
    args.extend_from_slice(&0u16.to_be_bytes()); // reserved
    shortstr(exchange, &mut args);
    shortstr(routing_key, &mut args);
    args.push(0); // mandatory, immediate
    encode_frame(FRAME_METHOD, 1, &method(60, 40, &args), out);
    let mut header = Vec::with_capacity(14);
    header.extend_from_slice(&60u16.to_be_bytes());
    header.extend_from_slice(&0u16.to_be_bytes()); // weight
    header.extend_from_slice(&(body.len() as u64).to_be_bytes());
    header.extend_from_slice(&0u16.to_be_bytes()); // no properties
    encode_frame(FRAME_HEADER, 1, &header, out);
    let chunk = (frame_max as usize).saturating_sub(8).max(1);
    for part in body.chunks(chunk) {
        encode_frame(FRAME_BODY, 1, part, out);
    }
}

/// `{"rooms":[ROOM],"data":DATA}`.
pub fn trigger_body(room_json: &str, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"rooms\":[");
    out.extend_from_slice(room_json.as_bytes());
    out.extend_from_slice(b"],\"data\":");
    out.extend_from_slice(data);
    out.push(b'}');
}

/// What a method frame from the broker means to a publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `basic.ack` / `basic.nack`: (delivery tag, multiple, ack?).
    Confirm {
        tag: u64,
        multiple: bool,
        ack: bool,
    },
    /// `channel.close` / `connection.close`: the reply code and text.
    Closed(u16, String),
    Other,
}

/// Reads a method frame's meaning.
pub fn reply(f: &Frame) -> Reply {
    let a = f.args();
    match f.method() {
        Some((60, 80)) | Some((60, 120)) if a.len() >= 9 => {
            let mut tag = [0u8; 8];
            tag.copy_from_slice(&a[..8]);
            Reply::Confirm {
                tag: u64::from_be_bytes(tag),
                multiple: a[8] & 1 != 0,
                ack: f.method() == Some((60, 80)),
            }
        }
        Some((20, 40)) | Some((10, 50)) if a.len() >= 3 => {
            let code = u16::from_be_bytes([a[0], a[1]]);
            let n = usize::from(a[2]);
            let text = a.get(3..3 + n).unwrap_or(&[]);
            Reply::Closed(code, String::from_utf8_lossy(text).into_owned())
        }
        _ => Reply::Other,
    }
}

/// Reads frames into `buf` until one is complete.
async fn read_frame(
    rd: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
    frame_max: u32,
) -> Result<Frame> {
    loop {
        if let Some((f, n)) = parse_frame(buf, frame_max)? {
            buf.drain(..n);
            return Ok(f);
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = rd
            .read(&mut chunk)
            .await
            .context("reading from the broker")?;
        if n == 0 {
            bail!("AMQP: the broker closed the connection");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads until the method `(class, method)` arrives on any channel.
async fn expect(
    rd: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
    frame_max: u32,
    want: (u16, u16),
) -> Result<Frame> {
    loop {
        let f = read_frame(rd, buf, frame_max).await?;
        if let Reply::Closed(code, text) = reply(&f) {
            bail!("AMQP: the broker closed: {code} {text}");
        }
        if f.method() == Some(want) {
            return Ok(f);
        }
    }
}

/// Connects, logs in, opens channel 1 in confirm mode; returns the stream, the read buffer and
/// the negotiated frame-max.
async fn open(p: &AmqpPublish<'_>) -> Result<(TcpStream, Vec<u8>, u32)> {
    let mut tcp = TcpStream::connect(p.addr)
        .await
        .with_context(|| format!("connecting to RabbitMQ at {}", p.addr))?;
    tcp.set_nodelay(true)?;
    let mut buf = Vec::new();
    tcp.write_all(b"AMQP\x00\x00\x09\x01").await?;
    expect(&mut tcp, &mut buf, FRAME_MAX, (10, 10)).await?;
    // start-ok: client properties (empty table), PLAIN, response, locale.
    let mut args = Vec::new();
    args.extend_from_slice(&0u32.to_be_bytes());
    shortstr("PLAIN", &mut args);
    longstr(
        format!("\0{}\0{}", p.user, p.password).as_bytes(),
        &mut args,
    );
    shortstr("en_US", &mut args);
    let mut out = Vec::new();
    encode_frame(FRAME_METHOD, 0, &method(10, 11, &args), &mut out);
    tcp.write_all(&out).await?;
    let tune = expect(&mut tcp, &mut buf, MIN_FRAME_MAX.max(FRAME_MAX), (10, 30)).await?;
    let t = tune.args();
    if t.len() < 8 {
        bail!("AMQP: short connection.tune");
    }
    let channel_max = u16::from_be_bytes([t[0], t[1]]);
    let server_frame_max = u32::from_be_bytes([t[2], t[3], t[4], t[5]]);
    let frame_max = if server_frame_max == 0 {
        FRAME_MAX
    } else {
        server_frame_max.min(FRAME_MAX)
    };
    let mut args = Vec::new();
    args.extend_from_slice(&channel_max.to_be_bytes());
    args.extend_from_slice(&frame_max.to_be_bytes());
    args.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
    out.clear();
    encode_frame(FRAME_METHOD, 0, &method(10, 31, &args), &mut out);
    let mut args = Vec::new();
    shortstr("/", &mut args);
    shortstr("", &mut args);
    args.push(0);
    encode_frame(FRAME_METHOD, 0, &method(10, 40, &args), &mut out);
    tcp.write_all(&out).await?;
    expect(&mut tcp, &mut buf, frame_max, (10, 41)).await?;
    out.clear();
    encode_frame(FRAME_METHOD, 1, &method(20, 10, &[0]), &mut out);
    tcp.write_all(&out).await?;
    expect(&mut tcp, &mut buf, frame_max, (20, 11)).await?;
    out.clear();
    encode_frame(FRAME_METHOD, 1, &method(85, 10, &[0]), &mut out);
    tcp.write_all(&out).await?;
    expect(&mut tcp, &mut buf, frame_max, (85, 11)).await?;
    Ok((tcp, buf, frame_max))
}

/// Publishes `count` payloads; returns what happened, including partial runs.
pub async fn run(p: &AmqpPublish<'_>, progress: &PublishProgress) -> PublishReport {
    let report = Mutex::new(PublishReport::default());
    let r = tokio::time::timeout_at(p.deadline, publish(p, progress, &report)).await;
    let mut report = report
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => report.aborted = Some(format!("{e:#}")),
        Err(_) => report.aborted = Some("global deadline reached while publishing".into()),
    }
    report.sent = progress.sent.load(Ordering::Relaxed);
    report
}

fn lock(m: &Mutex<PublishReport>) -> std::sync::MutexGuard<'_, PublishReport> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn publish(
    p: &AmqpPublish<'_>,
    progress: &PublishProgress,
    report: &Mutex<PublishReport>,
) -> Result<()> {
    let (tcp, mut buf, frame_max) = tokio::time::timeout(Duration::from_secs(10), open(p))
        .await
        .context("AMQP handshake: no answer within 10 s")??;
    let (mut rd, mut wr) = tcp.into_split();
    let slots = Semaphore::new(p.pace.max_in_flight());
    let start = Instant::now();

    let writer = async {
        let mut out = Vec::with_capacity(MAX_BATCH * (p.payload_bytes + 128));
        let (mut data, mut body) = (Vec::new(), Vec::new());
        let mut seq = 0u64;
        while seq < p.count {
            let due = match p.pace {
                Pace::Window(_) => p.count,
                Pace::Rate { per_sec, .. } => {
                    let due_at = |n: u64| start + Duration::from_secs_f64(n as f64 / per_sec);
                    if Instant::now() < due_at(seq) {
                        tokio::time::sleep_until(due_at(seq)).await;
                    }
                    ((start.elapsed().as_secs_f64() * per_sec) as u64 + 1).clamp(seq + 1, p.count)
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
            out.clear();
            let t = clock::now_ns();
            let rooms = p.rooms.len().max(1) as u64;
            for s in seq..seq + n as u64 {
                data.clear();
                payload::encode(s / rooms, t, p.payload_bytes, &mut data);
                body.clear();
                let room = p
                    .rooms
                    .get((s % rooms) as usize)
                    .map_or("{}", String::as_str);
                trigger_body(room, &data, &mut body);
                encode_publish(p.exchange, p.routing_key, &body, frame_max, &mut out);
            }
            {
                let mut r = lock(report);
                if seq == 0 {
                    r.first_send_ns = t;
                }
                r.last_send_ns = t;
            }
            wr.write_all(&out).await.context("writing publications")?;
            seq += n as u64;
            progress.sent.store(seq, Ordering::Relaxed);
        }
        Ok::<_, anyhow::Error>(())
    };

    let reader = async {
        let mut confirmed = 0u64; // highest delivery tag confirmed
        let mut answered = 0u64;
        while answered < p.count {
            let f = match tokio::time::timeout(p.idle, read_frame(&mut rd, &mut buf, frame_max))
                .await
            {
                Ok(f) => f?,
                Err(_) => bail!(
                    "no confirm for {:.1}s ({answered} of {} confirmed)",
                    p.idle.as_secs_f64(),
                    p.count
                ),
            };
            if f.kind == FRAME_HEARTBEAT {
                continue;
            }
            match reply(&f) {
                Reply::Confirm { tag, multiple, ack } => {
                    let newly = if multiple {
                        tag.saturating_sub(confirmed)
                    } else {
                        1
                    };
                    confirmed = confirmed.max(tag);
                    answered += newly;
                    let now = clock::now_ns();
                    {
                        let mut r = lock(report);
                        r.last_ack_ns = now;
                        if ack {
                            r.ok += newly;
                        } else {
                            r.refused += newly;
                            r.first_refusal.get_or_insert_with(|| "basic.nack".into());
                        }
                    }
                    slots.add_permits(newly as usize);
                    progress.acked.store(answered, Ordering::Relaxed);
                }
                Reply::Closed(code, text) => bail!("AMQP: the broker closed: {code} {text}"),
                Reply::Other => {}
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
            (&mut writer).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut out = Vec::new();
        encode_frame(
            FRAME_METHOD,
            1,
            &method(60, 80, &[0, 0, 0, 0, 0, 0, 0, 7, 1]),
            &mut out,
        );
        assert_eq!(out[0], 1);
        assert_eq!(*out.last().unwrap(), FRAME_END);
        for cut in 0..out.len() {
            assert!(parse_frame(&out[..cut], FRAME_MAX).unwrap().is_none());
        }
        let (f, n) = parse_frame(&out, FRAME_MAX).unwrap().unwrap();
        assert_eq!(n, out.len());
        assert_eq!(f.channel, 1);
        assert_eq!(
            reply(&f),
            Reply::Confirm {
                tag: 7,
                multiple: true,
                ack: true
            }
        );
        // A bad end byte and an oversized frame are errors.
        let mut bad = out.clone();
        *bad.last_mut().unwrap() = 0;
        assert!(parse_frame(&bad, FRAME_MAX).is_err());
        assert!(parse_frame(&[1, 0, 0, 0xff, 0xff, 0xff, 0xff], FRAME_MAX).is_err());
    }

    #[test]
    fn reads_nacks_and_closes() {
        let f = Frame {
            kind: FRAME_METHOD,
            channel: 1,
            payload: method(60, 120, &[0, 0, 0, 0, 0, 0, 0, 3, 0]),
        };
        assert_eq!(
            reply(&f),
            Reply::Confirm {
                tag: 3,
                multiple: false,
                ack: false
            }
        );
        let mut args = vec![1, 148];
        shortstr("NOT_FOUND - no exchange", &mut args);
        args.extend_from_slice(&[0, 60, 0, 40]);
        let f = Frame {
            kind: FRAME_METHOD,
            channel: 1,
            payload: method(20, 40, &args),
        };
        assert_eq!(
            reply(&f),
            Reply::Closed(404, "NOT_FOUND - no exchange".into())
        );
    }

    #[test]
    fn encodes_publish_with_split_body() {
        let body = vec![b'x'; 10_000];
        let mut out = Vec::new();
        encode_publish("hightemplar", "*", &body, 4096, &mut out);
        let mut frames = Vec::new();
        let mut at = 0;
        while let Some((f, n)) = parse_frame(&out[at..], FRAME_MAX).unwrap() {
            frames.push(f);
            at += n;
        }
        assert_eq!(at, out.len());
        assert_eq!(frames[0].method(), Some((60, 40)));
        assert_eq!(
            frames[0].args(),
            b"\x00\x00\x0bhightemplar\x01*\x00".as_slice()
        );
        assert_eq!(frames[1].kind, FRAME_HEADER);
        assert_eq!(&frames[1].payload[4..12], &10_000u64.to_be_bytes());
        let bodies: Vec<usize> = frames[2..].iter().map(|f| f.payload.len()).collect();
        assert_eq!(bodies, [4088, 4088, 1824]);
        let mut t = Vec::new();
        trigger_body(r#"{"target":"b"}"#, b"{\"s\":1}", &mut t);
        let v: serde_json::Value = serde_json::from_slice(&t).unwrap();
        assert_eq!(v["rooms"][0]["target"], "b");
        assert_eq!(v["data"]["s"], 1);
    }
}
