//! Socket.IO v4 over a raw WebSocket (`/socket.io/?EIO=4&transport=websocket`), against
//! `bench/peers/socketio-server.js`.
//!
//! Every WebSocket text frame is one Engine.IO packet: a type digit, then data. The server opens
//! with `0{"sid":…,"pingInterval":…}` and pings with `2`, which the client must answer with `3`.
//! Socket.IO packets ride in Engine.IO messages (`4`): `40` connects to the main namespace (the
//! server answers `40{"sid":…}`, or `44{…}` to refuse), `42["event",…]` is an event and
//! `42<id>[…]` one that wants an acknowledgement, answered with `43<id>[…]`.
//!
//! The bench server's events: `join(room)` (acknowledged once joined) and
//! `publish(room, data)` (acknowledged once broadcast), which emits `m(data)` to the room.

use super::{Item, SubscriberPeer};
use crate::ws::{Message, WsConn};
use anyhow::{Result, bail};
use futures_util::future::BoxFuture;
use std::time::Duration;

/// The path and query of the WebSocket transport.
pub const PATH: &str = "/socket.io/?EIO=4&transport=websocket";

/// Socket.IO, as a subscriber.
#[derive(Debug, Default, Clone, Copy)]
pub struct SocketIo;

/// How a broadcast of the bench server's `m` event starts.
const EVENT_M: &[u8] = b"42[\"m\",";

/// One Engine.IO / Socket.IO packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    /// Engine.IO open (`0{…}`).
    Open(&'a [u8]),
    /// Engine.IO close (`1`).
    Close,
    /// Engine.IO ping (`2`), to answer with `3`.
    Ping,
    /// Engine.IO pong (`3`).
    Pong,
    /// Socket.IO connect accepted (`40…`).
    Connected,
    /// Socket.IO disconnect (`41…`).
    Disconnected,
    /// Socket.IO event without ack id: the JSON array (`42[…]`).
    Event(&'a [u8]),
    /// Socket.IO event that wants an ack: `(id, array)`.
    EventAck(u64, &'a [u8]),
    /// Socket.IO ack: `(id, array)` (`43<id>[…]`).
    Ack(u64, &'a [u8]),
    /// Socket.IO connect error (`44{…}`).
    ConnectError(&'a [u8]),
    /// Anything else (Engine.IO upgrade/noop, binary events, a namespace, garbage).
    Other,
}

/// Parses one WebSocket frame as an Engine.IO packet.
pub fn parse_packet(frame: &[u8]) -> Packet<'_> {
    let Some((&ty, rest)) = frame.split_first() else {
        return Packet::Other;
    };
    match ty {
        b'0' => Packet::Open(rest),
        b'1' => Packet::Close,
        b'2' => Packet::Ping,
        b'3' => Packet::Pong,
        b'4' => {
            let Some((&sty, rest)) = rest.split_first() else {
                return Packet::Other;
            };
            match sty {
                b'0' => Packet::Connected,
                b'1' => Packet::Disconnected,
                b'4' => Packet::ConnectError(rest),
                b'2' | b'3' => {
                    // Events and acks of the main namespace only (a namespace starts with '/').
                    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
                    let (id, body) = if digits == 0 {
                        (None, rest)
                    } else {
                        match crate::payload::take_u64(rest) {
                            Some((id, body)) => (Some(id), body),
                            None => return Packet::Other,
                        }
                    };
                    if body.first() != Some(&b'[') {
                        return Packet::Other;
                    }
                    match (sty, id) {
                        (b'2', None) => Packet::Event(body),
                        (b'2', Some(id)) => Packet::EventAck(id, body),
                        (_, Some(id)) => Packet::Ack(id, body),
                        _ => Packet::Other,
                    }
                }
                _ => Packet::Other,
            }
        }
        _ => Packet::Other,
    }
}

/// The data of a bench `m` event (`42["m",DATA]`) in the layout Socket.IO writes; `None` for
/// anything else.
pub fn event_m_data(frame: &[u8]) -> Option<&[u8]> {
    frame.strip_prefix(EVENT_M)?.strip_suffix(b"]")
}

/// `42<id>["event",args…]` with already-encoded JSON arguments.
pub fn event_with_ack(id: u64, event: &str, args: &[&[u8]], out: &mut Vec<u8>) {
    out.extend_from_slice(b"42");
    out.extend_from_slice(id.to_string().as_bytes());
    out.extend_from_slice(b"[\"");
    out.extend_from_slice(event.as_bytes());
    out.push(b'"');
    for a in args {
        out.push(b',');
        out.extend_from_slice(a);
    }
    out.push(b']');
}

/// Opens the Engine.IO session and connects to the main namespace.
pub async fn open(ws: &mut WsConn, timeout: Duration) -> Result<()> {
    wait_for(ws, timeout, "the open packet", |p| {
        matches!(p, Packet::Open(_)).then_some(Ok(()))
    })
    .await?;
    ws.send_text(b"40").await?;
    wait_for(ws, timeout, "the namespace connect", |p| match p {
        Packet::Connected => Some(Ok(())),
        Packet::ConnectError(e) => Some(Err(format!(
            "connect refused: {}",
            String::from_utf8_lossy(e)
        ))),
        _ => None,
    })
    .await
}

/// Reads packets (answering pings) until `want` says something.
pub async fn wait_for(
    ws: &mut WsConn,
    timeout: Duration,
    what: &str,
    mut want: impl FnMut(Packet<'_>) -> Option<Result<(), String>>,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let frame = match ws.next_message(left).await {
            Ok(Message::Text(t)) => t,
            Ok(Message::Binary(_)) => bail!("Socket.IO: a binary frame while waiting for {what}"),
            Ok(Message::Close(code)) => {
                bail!("Socket.IO: the server closed the connection ({code:?}) before {what}")
            }
            Err(e) => bail!("Socket.IO: waiting for {what}: {e:#}"),
        };
        let p = parse_packet(&frame);
        match p {
            Packet::Ping => ws.send_text(b"3").await?,
            Packet::Close | Packet::Disconnected => {
                bail!("Socket.IO: the server closed the session before {what}")
            }
            _ => {}
        }
        match want(p) {
            Some(Ok(())) => return Ok(()),
            Some(Err(e)) => bail!("Socket.IO: {e}"),
            None => {}
        }
    }
}

/// Emits `event(args…)` with ack id `id` and waits for the ack.
pub async fn call(
    ws: &mut WsConn,
    id: u64,
    event: &str,
    args: &[&[u8]],
    timeout: Duration,
) -> Result<()> {
    let mut msg = Vec::new();
    event_with_ack(id, event, args, &mut msg);
    ws.send_text(&msg).await?;
    wait_for(ws, timeout, event, |p| match p {
        Packet::Ack(got, _) if got == id => Some(Ok(())),
        _ => None,
    })
    .await
}

impl SubscriberPeer for SocketIo {
    fn name(&self) -> &'static str {
        "socketio"
    }

    fn subscribe<'a>(
        &'a self,
        ws: &'a mut WsConn,
        channel: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            open(ws, timeout).await?;
            let room = serde_json::to_string(channel)?;
            call(ws, 0, "join", &[room.as_bytes()], timeout).await
        })
    }

    fn scan(&self, frame: &[u8], f: &mut dyn FnMut(Item<'_>)) -> usize {
        if let Some(data) = event_m_data(frame) {
            f(Item::Publication(data));
            return frame.len();
        }
        f(match parse_packet(frame) {
            Packet::Ping => Item::Reply(b"3"),
            Packet::Open(_)
            | Packet::Pong
            | Packet::Connected
            | Packet::Ack(..)
            | Packet::Event(_)
            | Packet::EventAck(..) => Item::Control,
            Packet::Close | Packet::Disconnected | Packet::ConnectError(_) => Item::Error,
            Packet::Other => Item::Malformed,
        });
        frame.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_packets() {
        assert_eq!(
            parse_packet(br#"0{"sid":"a","pingInterval":25000}"#),
            Packet::Open(br#"{"sid":"a","pingInterval":25000}"#)
        );
        assert_eq!(parse_packet(b"2"), Packet::Ping);
        assert_eq!(parse_packet(b"3"), Packet::Pong);
        assert_eq!(parse_packet(b"1"), Packet::Close);
        assert_eq!(parse_packet(br#"40{"sid":"x"}"#), Packet::Connected);
        assert_eq!(parse_packet(b"41"), Packet::Disconnected);
        assert_eq!(
            parse_packet(br#"44{"message":"no"}"#),
            Packet::ConnectError(br#"{"message":"no"}"#)
        );
        assert_eq!(parse_packet(br#"42["m",1]"#), Packet::Event(br#"["m",1]"#));
        assert_eq!(
            parse_packet(br#"4217["publish","r",{}]"#),
            Packet::EventAck(17, br#"["publish","r",{}]"#)
        );
        assert_eq!(parse_packet(b"430[]"), Packet::Ack(0, b"[]"));
        assert_eq!(parse_packet(b"43123[1]"), Packet::Ack(123, b"[1]"));
        for other in [
            &b""[..],
            b"4",
            b"6",
            b"x",
            b"43[]",
            br#"42/admin,["m",1]"#,
            b"4312",
            b"4399999999999999999999999[]",
            br#"45["m"]"#,
        ] {
            assert_eq!(
                parse_packet(other),
                Packet::Other,
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }

    #[test]
    fn finds_bench_events() {
        let f = br#"42["m",{"s":3,"t":9,"p":"x"}]"#;
        assert_eq!(event_m_data(f), Some(&br#"{"s":3,"t":9,"p":"x"}"#[..]));
        assert_eq!(event_m_data(br#"42["n",{"s":3}]"#), None);
        let mut got = Vec::new();
        for frame in [&f[..], b"2", b"430[]", b"41", b"zz"] {
            SocketIo.scan(frame, &mut |i| {
                got.push(match i {
                    Item::Publication(d) => crate::payload::parse(d).map_or(0, |(s, _)| s + 100),
                    Item::Reply(r) => u64::from(r == b"3"),
                    Item::Control => 2,
                    Item::Error => 3,
                    Item::Malformed => 4,
                })
            });
        }
        assert_eq!(got, [103, 1, 2, 3, 4]);
    }

    #[test]
    fn encodes_events() {
        let mut out = Vec::new();
        event_with_ack(5, "publish", &[b"\"bench\"", b"{\"s\":1}"], &mut out);
        assert_eq!(out, br#"425["publish","bench",{"s":1}]"#);
        assert_eq!(
            parse_packet(&out),
            Packet::EventAck(5, br#"["publish","bench",{"s":1}]"#)
        );
    }
}
