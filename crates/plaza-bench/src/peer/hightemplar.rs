//! High-templar 3.1 (PyPI `high-templar`), against `bench/peers/hightemplar_server.py` and its
//! mock app.
//!
//! On connect the server asks the app (`GET {API_URL}bootstrap/`) which rooms the connection may
//! join, then sends `{"is_authorized": true, "allowed_rooms": [...]}`. A client subscribes with
//! `{"type":"subscribe","room":{…},"requestId":X}` (answered `{"code": "success"}`, with no
//! requestId), and receives `{"type": "publish", "data": DATA, "requestId": X}` (Python
//! `json.dumps` layout). Publications go through RabbitMQ (see [`crate::publisher::amqp`]). The
//! server closes a connection that sent nothing for 300 s; its keep-alive is the text `ping`.

use super::{Item, SubscriberPeer};
use crate::ws::{Message, WsConn};
use anyhow::{Result, bail};
use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::time::Duration;

/// High-templar, as a subscriber.
#[derive(Debug, Default, Clone, Copy)]
pub struct HighTemplar;

/// The requestId every bench subscription uses.
pub const REQUEST_ID: u64 = 1;
const PUBLISH_PREFIX: &[u8] = b"{\"type\": \"publish\", \"data\": ";
const PUBLISH_SUFFIX: &[u8] = b", \"requestId\": 1}";

/// The room of a bench channel: `{"target": CHANNEL}`.
pub fn room(channel: &str) -> String {
    serde_json::json!({ "target": channel }).to_string()
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", default)]
    ty: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    code: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    is_authorized: Option<bool>,
}

/// Scans one frame.
pub fn scan_frame(frame: &[u8]) -> Item<'_> {
    if let Some(d) = frame
        .strip_prefix(PUBLISH_PREFIX)
        .and_then(|r| r.strip_suffix(PUBLISH_SUFFIX))
    {
        return Item::Publication(d);
    }
    if frame == b"pong" {
        return Item::Control;
    }
    match serde_json::from_slice::<Frame<'_>>(frame) {
        Ok(Frame {
            ty: Some(t),
            data: Some(d),
            ..
        }) if t == "publish" => {
            let s = d.get().as_bytes();
            let start = s.as_ptr() as usize - frame.as_ptr() as usize;
            Item::Publication(&frame[start..start + s.len()])
        }
        Ok(Frame { code: Some(c), .. }) if c == "error" => Item::Error,
        Ok(Frame {
            is_authorized: Some(false),
            ..
        }) => Item::Error,
        Ok(_) => Item::Control,
        Err(_) => Item::Malformed,
    }
}

async fn next_text(ws: &mut WsConn, deadline: tokio::time::Instant) -> Result<Vec<u8>> {
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    match ws.next_message(left).await? {
        Message::Text(t) | Message::Binary(t) => Ok(t),
        Message::Close(c) => bail!("High-templar: the server closed the connection ({c:?})"),
    }
}

impl SubscriberPeer for HighTemplar {
    fn name(&self) -> &'static str {
        "hightemplar"
    }

    fn subscribe<'a>(
        &'a self,
        ws: &'a mut WsConn,
        channel: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let hello = next_text(ws, deadline).await?;
            match serde_json::from_slice::<Frame<'_>>(&hello) {
                Ok(Frame {
                    is_authorized: Some(true),
                    ..
                }) => {}
                _ => bail!(
                    "High-templar: not authorized: {}",
                    String::from_utf8_lossy(&hello)
                ),
            }
            let req = format!(
                r#"{{"type":"subscribe","room":{},"requestId":{REQUEST_ID}}}"#,
                room(channel)
            );
            ws.send_text(req.as_bytes()).await?;
            // Replies carry no requestId: the first `code` is this subscribe's.
            loop {
                let reply = next_text(ws, deadline).await?;
                if let Ok(Frame { code: Some(c), .. }) = serde_json::from_slice::<Frame<'_>>(&reply)
                {
                    if c == "success" {
                        return Ok(());
                    }
                    bail!(
                        "High-templar: subscribe refused: {}",
                        String::from_utf8_lossy(&reply)
                    );
                }
            }
        })
    }

    fn scan(&self, frame: &[u8], f: &mut dyn FnMut(Item<'_>)) -> usize {
        f(scan_frame(frame));
        frame.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_frames() {
        let f = br#"{"type": "publish", "data": {"s": 7, "t": 8, "p": "x"}, "requestId": 1}"#;
        assert_eq!(
            scan_frame(f),
            Item::Publication(br#"{"s": 7, "t": 8, "p": "x"}"#)
        );
        let f = br#"{"requestId": "other", "data": {"s": 7, "t": 9}, "type": "publish"}"#;
        match scan_frame(f) {
            Item::Publication(d) => assert_eq!(crate::payload::parse(d), Some((7, 9))),
            other => panic!("{other:?}"),
        }
        assert_eq!(scan_frame(br#"{"code": "success"}"#), Item::Control);
        assert_eq!(scan_frame(b"pong"), Item::Control);
        assert_eq!(
            scan_frame(br#"{"code": "error", "message": "room-not-found"}"#),
            Item::Error
        );
        assert_eq!(scan_frame(br#"{"is_authorized": false}"#), Item::Error);
        assert_eq!(scan_frame(b"geen json"), Item::Malformed);
        assert_eq!(room("a\"b"), r#"{"target":"a\"b"}"#);
    }
}
