//! Snorky (PyPI `snorky` 0.1.0a4) with its `pubsub` service, against
//! `bench/peers/snorky_server.py`.
//!
//! Every frame is one envelope `{"service": NAME, "message": MSG}`, written by Python's
//! `json.dumps` (a space after `:` and `,`). Requests are RPC calls
//! `{"command": C, "params": {…}, "callId": N}` answered with
//! `{"type": "response", "callId": N, "data": …}` or `{"type": "error", …}`; a publication is the
//! notification `{"type": "message", "channel": C, "message": DATA}`. The server pings with empty
//! WebSocket pings only. Publications are sent through the backend HTTP handler
//! ([`backend_publish_body`]).

use super::native::string_end;
use super::{Item, SubscriberPeer};
use crate::ws::{Message, WsConn};
use anyhow::{Result, bail};
use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::time::Duration;

/// The frontend service the subscribers use.
pub const SERVICE: &str = "pubsub";
/// The backend service publications go through.
pub const BACKEND_SERVICE: &str = "pubsub_backend";

/// Snorky, as a subscriber.
#[derive(Debug, Default, Clone, Copy)]
pub struct Snorky;

const NOTIFY_PREFIX: &[u8] =
    b"{\"service\": \"pubsub\", \"message\": {\"type\": \"message\", \"channel\": \"";
const MESSAGE_FIELD: &[u8] = b", \"message\": ";

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    message: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Inner<'a> {
    #[serde(rename = "type", default)]
    ty: Option<std::borrow::Cow<'a, str>>,
    #[serde(rename = "callId", default)]
    call_id: Option<serde_json::Value>,
    #[serde(borrow, default)]
    message: Option<&'a RawValue>,
}

/// The data of a publication in the layout Snorky writes, without parsing JSON.
fn fast_publication(frame: &[u8]) -> Option<&[u8]> {
    let rest = frame.strip_prefix(NOTIFY_PREFIX)?;
    let rest = &rest[string_end(rest)? + 1..];
    rest.strip_prefix(MESSAGE_FIELD)?.strip_suffix(b"}}")
}

/// The envelope's message, as far as this client cares.
struct Classified<'a> {
    ty: String,
    call_id: Option<serde_json::Value>,
    message: Option<&'a [u8]>,
}

/// What one frame is: the type, callId and message of the envelope's message.
fn classify(frame: &[u8]) -> Option<Classified<'_>> {
    let env: Envelope<'_> = serde_json::from_slice(frame).ok()?;
    let inner: Inner<'_> = serde_json::from_str(env.message?.get()).ok()?;
    // `inner.message` borrows from the envelope's raw text, which borrows from `frame`.
    let msg = inner.message.map(|m| {
        let s = m.get().as_bytes();
        let start = s.as_ptr() as usize - frame.as_ptr() as usize;
        &frame[start..start + s.len()]
    });
    Some(Classified {
        ty: inner.ty?.into_owned(),
        call_id: inner.call_id,
        message: msg,
    })
}

/// Scans one frame.
pub fn scan_frame(frame: &[u8]) -> Item<'_> {
    if let Some(data) = fast_publication(frame) {
        return Item::Publication(data);
    }
    match classify(frame) {
        Some(Classified {
            ty,
            message: Some(data),
            ..
        }) if ty == "message" => Item::Publication(data),
        Some(c) if c.ty == "error" => Item::Error,
        Some(_) => Item::Control,
        None => Item::Malformed,
    }
}

/// `{"service": S, "message": {"command": C, "params": P, "callId": N}}`.
pub fn rpc(service: &str, command: &str, params: &str, call_id: u64) -> String {
    format!(
        r#"{{"service":"{service}","message":{{"command":"{command}","params":{params},"callId":{call_id}}}}}"#
    )
}

/// The backend request publishing `data` (already JSON) on a channel given as a JSON string.
pub fn backend_publish_body(channel_json: &str, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"service\":\"");
    out.extend_from_slice(BACKEND_SERVICE.as_bytes());
    out.extend_from_slice(b"\",\"message\":{\"command\":\"publish\",\"params\":{\"channel\":");
    out.extend_from_slice(channel_json.as_bytes());
    out.extend_from_slice(b",\"message\":");
    out.extend_from_slice(data);
    out.extend_from_slice(b"},\"callId\":0}}");
}

/// Sends an RPC call and waits for its response.
pub async fn call(
    ws: &mut WsConn,
    command: &str,
    params: &str,
    call_id: u64,
    timeout: Duration,
) -> Result<()> {
    ws.send_text(rpc(SERVICE, command, params, call_id).as_bytes())
        .await?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let frame = match ws.next_message(left).await? {
            Message::Text(t) | Message::Binary(t) => t,
            Message::Close(c) => bail!("Snorky: the server closed the connection ({c:?})"),
        };
        match classify(&frame) {
            Some(c) if c.call_id.as_ref().and_then(|v| v.as_u64()) == Some(call_id) => {
                if c.ty == "response" {
                    return Ok(());
                }
                bail!("Snorky: {command}: {}", String::from_utf8_lossy(&frame));
            }
            Some(c) if c.ty == "error" => {
                bail!("Snorky: {command}: {}", String::from_utf8_lossy(&frame))
            }
            _ => {}
        }
    }
}

impl SubscriberPeer for Snorky {
    fn name(&self) -> &'static str {
        "snorky"
    }

    fn subscribe<'a>(
        &'a self,
        ws: &'a mut WsConn,
        channel: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let params = serde_json::json!({ "channel": channel }).to_string();
            call(ws, "subscribe", &params, 1, timeout).await
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
    fn scans_notifications() {
        let f = br#"{"service": "pubsub", "message": {"type": "message", "channel": "be\"nch", "message": {"s": 1, "t": 2, "p": "x"}}}"#;
        assert_eq!(
            scan_frame(f),
            Item::Publication(br#"{"s": 1, "t": 2, "p": "x"}"#)
        );
        // Another key order goes through serde.
        let f = br#"{"message": {"message": {"s": 4, "t": 5}, "type": "message", "channel": "b"}, "service": "pubsub"}"#;
        match scan_frame(f) {
            Item::Publication(d) => assert_eq!(crate::payload::parse(d), Some((4, 5))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn scans_replies() {
        assert_eq!(
            scan_frame(
                br#"{"service": "pubsub", "message": {"type": "response", "callId": 1, "data": null}}"#
            ),
            Item::Control
        );
        assert_eq!(
            scan_frame(
                br#"{"service": "pubsub", "message": {"type": "error", "callId": null, "message": "Unknown command"}}"#
            ),
            Item::Error
        );
        assert_eq!(scan_frame(b"nope"), Item::Malformed);
        assert_eq!(scan_frame(br#"{"service": "pubsub"}"#), Item::Malformed);
    }

    #[test]
    fn encodes_requests() {
        let r = rpc("pubsub", "subscribe", r#"{"channel":"b"}"#, 3);
        let v: serde_json::Value = serde_json::from_str(&r).unwrap();
        assert_eq!(v["service"], "pubsub");
        assert_eq!(v["message"]["command"], "subscribe");
        assert_eq!(v["message"]["params"]["channel"], "b");
        assert_eq!(v["message"]["callId"], 3);
        let mut out = Vec::new();
        backend_publish_body("\"bench\"", br#"{"s":1}"#, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["service"], "pubsub_backend");
        assert_eq!(v["message"]["params"]["message"]["s"], 1);
        assert_eq!(v["message"]["params"]["channel"], "bench");
    }
}
