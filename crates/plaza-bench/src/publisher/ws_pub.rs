//! Publishing over one WebSocket connection of a peer's client protocol, with the server's
//! acknowledgements counted in order: NATS `PUB` on a verbose connection (each answered `+OK`),
//! Socket.IO `publish` emits with an ack id (each answered `43<id>[]`).
//!
//! One task writes what the pace allows and reads acks between writes, like the native
//! publisher of the `publish` scenario.

use super::{Pace, PublishReport};
use crate::clock;
use crate::payload;
use crate::peer::{nats, socketio};
use crate::publisher::http_api::PublishProgress;
use crate::ws::{Event, WsConn, WsTarget};
use anyhow::{Context, Result, bail};
use futures_util::future::BoxFuture;
use std::future::poll_fn;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;
use tokio::time::Instant;

/// Most publications written in one `write` call.
const MAX_BATCH: u64 = 64;

/// What one received protocol message means to a publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PubItem<'a> {
    /// The next publication was accepted.
    Ack,
    /// The next publication (or the connection) was refused: the server's words.
    Refused(&'a [u8]),
    /// A keep-alive to answer with this message.
    Reply(&'static [u8]),
    /// Anything else.
    Other,
}

/// A peer's publishing protocol.
pub trait WsPubProtocol: Send + Sync {
    /// Whether frames are binary (NATS).
    fn binary(&self) -> bool {
        false
    }

    /// Opens the session on a fresh connection; resolves once publishing may start.
    fn open<'a>(&'a self, ws: &'a mut WsConn, timeout: Duration) -> BoxFuture<'a, Result<()>>;

    /// Appends the message publishing `data` as the `seq`-th publication (0-based).
    fn encode(&self, seq: u64, data: &[u8], out: &mut Vec<u8>);

    /// Calls `f` for each complete message of `buf`; returns the bytes consumed (the rest is an
    /// incomplete message, given again with the next frame).
    fn scan(&self, buf: &[u8], f: &mut dyn FnMut(PubItem<'_>)) -> usize;
}

/// NATS: `PUB` on a connection with `verbose: true`.
pub struct NatsPub {
    pub subject: String,
}

impl WsPubProtocol for NatsPub {
    fn binary(&self) -> bool {
        true
    }

    fn open<'a>(&'a self, ws: &'a mut WsConn, timeout: Duration) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut lines = nats::connect_line(true);
            lines.push_str("PING\r\n");
            ws.send_binary(lines.as_bytes()).await?;
            let mut rest = Vec::new();
            nats::wait_pong(ws, timeout, &mut rest).await?;
            if !rest.is_empty() {
                bail!("NATS: unexpected data after PONG");
            }
            Ok(())
        })
    }

    fn encode(&self, _seq: u64, data: &[u8], out: &mut Vec<u8>) {
        nats::pub_message(&self.subject, data, out);
    }

    fn scan(&self, buf: &[u8], f: &mut dyn FnMut(PubItem<'_>)) -> usize {
        nats::scan_ops(buf, &mut |op| {
            f(match op {
                nats::Op::Ok => PubItem::Ack,
                nats::Op::Err(e) => PubItem::Refused(e),
                nats::Op::Ping => PubItem::Reply(b"PONG\r\n"),
                _ => PubItem::Other,
            })
        })
    }
}

/// Socket.IO: `42<id>["publish",ROOM,DATA]`, acknowledged by `43<id>[]`. Ack id 0 is the
/// publication `seq` 0, and so on.
pub struct SocketIoPub {
    /// The room as a JSON string.
    pub room_json: String,
}

impl WsPubProtocol for SocketIoPub {
    fn open<'a>(&'a self, ws: &'a mut WsConn, timeout: Duration) -> BoxFuture<'a, Result<()>> {
        Box::pin(socketio::open(ws, timeout))
    }

    fn encode(&self, seq: u64, data: &[u8], out: &mut Vec<u8>) {
        socketio::event_with_ack(seq, "publish", &[self.room_json.as_bytes(), data], out);
    }

    fn scan(&self, buf: &[u8], f: &mut dyn FnMut(PubItem<'_>)) -> usize {
        f(match socketio::parse_packet(buf) {
            socketio::Packet::Ack(..) => PubItem::Ack,
            socketio::Packet::Ping => PubItem::Reply(b"3"),
            socketio::Packet::ConnectError(e) => PubItem::Refused(e),
            socketio::Packet::Close | socketio::Packet::Disconnected => {
                PubItem::Refused(b"the server closed the session")
            }
            _ => PubItem::Other,
        });
        buf.len()
    }
}

/// What to publish and where.
pub struct WsPublish<'a> {
    pub target: &'a WsTarget,
    pub proto: &'a dyn WsPubProtocol,
    pub count: u64,
    pub payload_bytes: usize,
    pub pace: Pace,
    pub deadline: Instant,
    /// Give up when no ack came for this long with publications in flight.
    pub idle: Duration,
}

/// Publishes `count` payloads; returns what happened, including partial runs.
pub async fn run(p: &WsPublish<'_>, progress: &PublishProgress) -> PublishReport {
    let mut report = PublishReport::default();
    let r = tokio::time::timeout_at(p.deadline, publish(p, progress, &mut report)).await;
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => report.aborted = Some(format!("{e:#}")),
        Err(_) => report.aborted = Some("global deadline reached while publishing".into()),
    }
    report.sent = progress.sent.load(Ordering::Relaxed);
    report
}

async fn publish(
    p: &WsPublish<'_>,
    progress: &PublishProgress,
    report: &mut PublishReport,
) -> Result<()> {
    let mut ws = WsConn::connect(p.target, 64 * 1024, Duration::from_secs(10)).await?;
    p.proto
        .open(&mut ws, Duration::from_secs(10))
        .await
        .context("opening the publisher's session")?;
    let binary = p.proto.binary();
    let window = p.pace.max_in_flight() as u64;
    let start = Instant::now();
    let (mut frames, mut msg, mut data) = (Vec::new(), Vec::new(), Vec::new());
    let mut carry: Vec<u8> = Vec::new();
    let mut replies: Vec<&'static [u8]> = Vec::new();
    let (mut sent, mut answered) = (0u64, 0u64);
    let mut last_ack = Instant::now();
    while answered < p.count {
        // What the pace allows now.
        let due = match p.pace {
            Pace::Window(_) => p.count,
            Pace::Rate { per_sec, .. } => {
                (((start.elapsed().as_secs_f64() * per_sec) as u64) + 1).min(p.count)
            }
        };
        let room = window.saturating_sub(sent - answered);
        let n = due.saturating_sub(sent).min(room).min(MAX_BATCH);
        if n > 0 {
            frames.clear();
            let t = clock::now_ns();
            for seq in sent..sent + n {
                data.clear();
                payload::encode(seq, t, p.payload_bytes, &mut data);
                msg.clear();
                p.proto.encode(seq, &data, &mut msg);
                ws.encode_message(&msg, binary, &mut frames);
            }
            if sent == 0 {
                report.first_send_ns = t;
                last_ack = Instant::now();
            }
            report.last_send_ns = t;
            ws.write_all(&frames)
                .await
                .context("writing publications")?;
            sent += n;
            progress.sent.store(sent, Ordering::Relaxed);
            // Write more before reading when the pace and the window allow.
            if sent < due && sent - answered < window {
                continue;
            }
        }
        // Read until something arrives, or until the next publication is due.
        let next_due = match p.pace {
            Pace::Rate { per_sec, .. } if sent < p.count && sent - answered < window => {
                Some(start + Duration::from_secs_f64(sent as f64 / per_sec))
            }
            _ => None,
        };
        let idle_at = last_ack + p.idle;
        let until = next_due.map_or(idle_at, |d| d.min(idle_at)).min(p.deadline);
        let mut acks = 0u64;
        let mut closed = None;
        let read = poll_fn(|cx| {
            let mut handled = 0u64;
            let r = ws.poll_events(cx, &mut |ev, now| {
                let frame = match ev {
                    Event::Text(t) | Event::Binary(t) => t,
                    Event::Close(c) => {
                        closed = Some(c.unwrap_or(1005));
                        return;
                    }
                };
                handled += 1;
                let mut on_item = |item: PubItem<'_>| match item {
                    PubItem::Ack => {
                        acks += 1;
                        report.ok += 1;
                        report.last_ack_ns = now;
                    }
                    PubItem::Refused(why) => {
                        acks += 1;
                        report.refused += 1;
                        report.last_ack_ns = now;
                        if report.first_refusal.is_none() {
                            report.first_refusal = Some(String::from_utf8_lossy(why).into_owned());
                        }
                    }
                    PubItem::Reply(r) => replies.push(r),
                    PubItem::Other => {}
                };
                if carry.is_empty() {
                    let used = p.proto.scan(frame, &mut on_item);
                    carry.extend_from_slice(&frame[used..]);
                } else {
                    carry.extend_from_slice(frame);
                    let used = p.proto.scan(&carry, &mut on_item);
                    carry.drain(..used);
                }
            });
            for r in replies.drain(..) {
                ws.queue_message(r, binary);
            }
            ws.poll_flush(cx);
            match r {
                Poll::Pending if handled == 0 => Poll::Pending,
                Poll::Pending => Poll::Ready(Ok(true)),
                Poll::Ready(Ok(())) => Poll::Ready(Ok(false)),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            }
        });
        match tokio::time::timeout_at(until, read).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => bail!(
                "the server closed the publisher's connection (code {})",
                closed.unwrap_or(1005)
            ),
            Ok(Err(e)) => bail!("the publisher's connection broke: {e}"),
            Err(_) if Some(until) == next_due => {}
            Err(_) if until >= p.deadline => bail!("global deadline reached while publishing"),
            Err(_) => bail!(
                "no acknowledgement for {:.1}s with {} publications in flight",
                p.idle.as_secs_f64(),
                sent - answered
            ),
        }
        if acks > 0 {
            answered += acks;
            last_ack = Instant::now();
            progress.acked.store(answered, Ordering::Relaxed);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(proto: &dyn WsPubProtocol, buf: &[u8]) -> (Vec<String>, usize) {
        let mut v = Vec::new();
        let n = proto.scan(buf, &mut |i| v.push(format!("{i:?}")));
        (v, n)
    }

    #[test]
    fn nats_acks_and_refusals() {
        let p = NatsPub {
            subject: "bench".into(),
        };
        let (v, n) = items(
            &p,
            b"+OK\r\n+OK\r\nPING\r\n-ERR 'Maximum Payload Violation'\r\n+O",
        );
        assert_eq!(
            v,
            [
                "Ack",
                "Ack",
                "Reply([80, 79, 78, 71, 13, 10])",
                "Refused([39, 77, 97, 120, 105, 109, 117, 109, 32, 80, 97, 121, 108, 111, 97, 100, 32, 86, 105, 111, 108, 97, 116, 105, 111, 110, 39])"
            ]
        );
        assert_eq!(n, 50);
        let mut out = Vec::new();
        p.encode(0, b"{}", &mut out);
        assert_eq!(out, b"PUB bench 2\r\n{}\r\n");
    }

    #[test]
    fn socketio_acks() {
        let p = SocketIoPub {
            room_json: "\"bench\"".into(),
        };
        assert_eq!(items(&p, b"437[]").0, ["Ack"]);
        assert_eq!(items(&p, b"2").0, ["Reply([51])"]);
        assert_eq!(items(&p, b"42[\"m\",1]").0, ["Other"]);
        assert_eq!(items(&p, b"41").0.len(), 1);
        let mut out = Vec::new();
        p.encode(9, b"{\"s\":9}", &mut out);
        assert_eq!(out, br#"429["publish","bench",{"s":9}]"#);
    }
}
