//! High-templar 3.1 (PyPI `high-templar`, the browser client `spine-high-templar`): frames ⇄
//! commands, with no sockets.
//!
//! The server's frames are what Python's `json.dumps` writes with default settings (`", "` and
//! `": "` separators, non-ASCII escaped as `\uXXXX`), and the client matches replies by order
//! only: success and error replies carry no requestId. Publish frames carry the subscription's
//! requestId, so they are encoded per subscription: the trigger's data is formatted once
//! ([`python_json`]) and wrapped per requestId ([`publish_frame`]).
//!
//! What a client sends, and what it gets ([`decode_text`], [`decode_binary`]):
//!
//! | frame | answer |
//! |---|---|
//! | text `ping` | text `pong` |
//! | not JSON (also a binary `ping`) | `non-json-message`, with the *connection's* id as requestId |
//! | object without a known `type` | `message-type-not-allowed`, with the connection's id |
//! | `subscribe`/`unsubscribe` without `requestId` | `no-request-id` |
//! | `subscribe` to a room the bootstrap did not allow | `room-not-found` |
//! | `unsubscribe` of an unknown requestId | `not-subscribed` |
//! | JSON that is not an object; `subscribe` without an object `room` | the socket is closed (1000) |

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use plaza_core::Room;
use serde_json::Value;
use serde_json::value::RawValue;

/// The answer to a text `ping` (raw text, not JSON).
pub const PONG: &str = "pong";
/// A successful subscribe or unsubscribe.
pub const SUCCESS: &str = r#"{"code": "success"}"#;
/// The hello of a connection the app refused; the socket is closed (1000) after it.
pub const DENIED: &str = r#"{"is_authorized": false}"#;

/// A subscription's requestId: any JSON value, echoed in publish frames exactly.
#[derive(Debug, Clone)]
pub struct RequestId {
    /// For matching an unsubscribe (JSON equality).
    pub value: Value,
    /// The value as the server writes it (Python layout), shared by every frame.
    pub text: Arc<str>,
}

impl PartialEq for RequestId {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

/// A decoded client frame.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    /// Text `ping`: answer [`PONG`].
    Ping,
    Subscribe {
        room: Room,
        request_id: RequestId,
    },
    Unsubscribe {
        request_id: RequestId,
    },
    Status,
    /// Answer with [`encode_error`] (or [`encode_connection_error`] where
    /// [`FrameError::carries_connection_id`]).
    Error(FrameError),
    /// The reference server's handler raised: close the socket with 1000, no error frame.
    Close,
}

/// The error replies of §1.3, by their `message`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    NonJson,
    TypeNotAllowed,
    NoRequestId,
    RoomNotFound,
    NotSubscribed,
}

impl FrameError {
    pub fn message(self) -> &'static str {
        match self {
            FrameError::NonJson => "non-json-message",
            FrameError::TypeNotAllowed => "message-type-not-allowed",
            FrameError::NoRequestId => "no-request-id",
            FrameError::RoomNotFound => "room-not-found",
            FrameError::NotSubscribed => "not-subscribed",
        }
    }

    /// These two carry the connection's own id as `requestId`.
    pub fn carries_connection_id(self) -> bool {
        matches!(self, FrameError::NonJson | FrameError::TypeNotAllowed)
    }
}

/// Decodes a text frame.
pub fn decode_text(text: &str) -> ClientFrame {
    if text == "ping" {
        return ClientFrame::Ping;
    }
    decode_json(text)
}

/// Decodes a binary frame: parsed as JSON like a text frame, but a binary `ping` is not a ping.
pub fn decode_binary(data: &[u8]) -> ClientFrame {
    match std::str::from_utf8(data) {
        Ok(text) => decode_json(text),
        Err(_) => ClientFrame::Error(FrameError::NonJson),
    }
}

fn decode_json(text: &str) -> ClientFrame {
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => return ClientFrame::Error(FrameError::NonJson),
    };
    if !value.is_object() {
        return ClientFrame::Close;
    }
    // Parsed again keeping each field's text, for the requestId's exact echo.
    let Ok(fields) = serde_json::from_str::<HashMap<String, Box<RawValue>>>(text) else {
        return ClientFrame::Close;
    };
    let kind = value.get("type").and_then(Value::as_str);
    let request_id = || {
        fields.get("requestId").map(|raw| RequestId {
            value: value.get("requestId").cloned().unwrap_or(Value::Null),
            text: Arc::from(python_json(raw.get())),
        })
    };
    match kind {
        Some("subscribe") => {
            let Some(request_id) = request_id() else {
                return ClientFrame::Error(FrameError::NoRequestId);
            };
            match value.get("room").cloned().and_then(Room::from_value) {
                Some(room) => ClientFrame::Subscribe { room, request_id },
                None => ClientFrame::Close,
            }
        }
        Some("unsubscribe") => match request_id() {
            Some(request_id) => ClientFrame::Unsubscribe { request_id },
            None => ClientFrame::Error(FrameError::NoRequestId),
        },
        Some("status") => ClientFrame::Status,
        _ => ClientFrame::Error(FrameError::TypeNotAllowed),
    }
}

/// `{"code": "error", "message": "..."}`.
pub fn encode_error(error: FrameError) -> String {
    format!(r#"{{"code": "error", "message": "{}"}}"#, error.message())
}

/// `{"requestId": "<connection id>", "code": "error", "message": "..."}`.
pub fn encode_connection_error(connection_id: &str, error: FrameError) -> String {
    format!(
        r#"{{"requestId": {}, "code": "error", "message": "{}"}}"#,
        python_string(connection_id),
        error.message()
    )
}

/// The frame a subscription receives: `{"type": "publish", "data": DATA, "requestId": ID}`.
/// `data` is already in Python layout ([`python_json`]), as is `request_id`.
pub fn publish_frame(data: &str, request_id: &str) -> String {
    let mut frame = String::with_capacity(data.len() + request_id.len() + 48);
    frame.push_str(r#"{"type": "publish", "data": "#);
    frame.push_str(data);
    frame.push_str(r#", "requestId": "#);
    frame.push_str(request_id);
    frame.push('}');
    frame
}

/// A room the app allows, with its text as the app wrote it (for the hello).
#[derive(Debug, Clone)]
pub struct AllowedRoom {
    pub room: Room,
    /// Python layout of the app's text, key order kept.
    pub text: String,
}

/// Why a bootstrap answer is not a usable list of rooms. The connection is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootstrapError {
    #[error("the bootstrap answer is not a JSON object")]
    NotAnObject,
    #[error("allowed_rooms is not a list")]
    RoomsNotAList,
    #[error("allowed_rooms holds something that is not an object")]
    RoomNotAnObject,
}

/// Reads the body of a 200 bootstrap answer: only `allowed_rooms` matters (missing: none).
/// Rooms listed twice are kept once, in the order of their first appearance.
pub fn parse_bootstrap(body: &[u8]) -> Result<Vec<AllowedRoom>, BootstrapError> {
    let fields: HashMap<String, Box<RawValue>> =
        serde_json::from_slice(body).map_err(|_| BootstrapError::NotAnObject)?;
    let Some(raw) = fields.get("allowed_rooms") else {
        return Ok(Vec::new());
    };
    let items: Vec<Box<RawValue>> =
        serde_json::from_str(raw.get()).map_err(|_| BootstrapError::RoomsNotAList)?;
    let mut rooms: Vec<AllowedRoom> = Vec::with_capacity(items.len());
    for item in items {
        let value: Value =
            serde_json::from_str(item.get()).map_err(|_| BootstrapError::RoomNotAnObject)?;
        let room = Room::from_value(value).ok_or(BootstrapError::RoomNotAnObject)?;
        if rooms.iter().all(|r| r.room != room) {
            rooms.push(AllowedRoom {
                room,
                text: python_json(item.get()),
            });
        }
    }
    Ok(rooms)
}

/// `{"is_authorized": true, "allowed_rooms": [...]}`.
pub fn encode_hello(rooms: &[AllowedRoom]) -> String {
    let mut frame = String::from(r#"{"is_authorized": true, "allowed_rooms": ["#);
    for (i, room) in rooms.iter().enumerate() {
        if i > 0 {
            frame.push_str(", ");
        }
        frame.push_str(&room.text);
    }
    frame.push_str("]}");
    frame
}

/// A trigger: `{"rooms": [ROOM, ...], "data": ANY}` from RabbitMQ or the HTTP endpoint.
#[derive(Debug, Clone)]
pub struct Trigger {
    /// In the order listed; a room listed twice is delivered twice.
    pub rooms: Vec<Room>,
    /// The data in Python layout, ready for [`publish_frame`].
    pub data: String,
}

/// Why a trigger body was refused (logged and dropped, or a 400 over HTTP).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TriggerError {
    #[error("the body is not a JSON object")]
    NotAnObject,
    #[error("rooms not specified")]
    NoRooms,
    #[error("data not specified")]
    NoData,
    #[error("rooms must be a list of objects")]
    BadRooms,
}

pub fn parse_trigger(body: &[u8]) -> Result<Trigger, TriggerError> {
    let fields: HashMap<String, Box<RawValue>> =
        serde_json::from_slice(body).map_err(|_| TriggerError::NotAnObject)?;
    let rooms = fields.get("rooms").ok_or(TriggerError::NoRooms)?;
    let data = fields.get("data").ok_or(TriggerError::NoData)?;
    let rooms: Vec<Value> =
        serde_json::from_str(rooms.get()).map_err(|_| TriggerError::BadRooms)?;
    let rooms = rooms
        .into_iter()
        .map(Room::from_value)
        .collect::<Option<Vec<_>>>()
        .ok_or(TriggerError::BadRooms)?;
    Ok(Trigger {
        rooms,
        data: python_json(data.get()),
    })
}

/// The `status` reply's counts (High-templar's `hub.status()`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub open_connections: u64,
    pub num_rooms: u64,
    /// ISO-8601 without a zone, e.g. [`iso_datetime`].
    pub online_since: String,
    pub rabbitmq_messages_received: u64,
    pub ws_messages_received: u64,
    pub ws_messages_send: u64,
    pub ws_messages_send_error: u64,
    pub ws_messages_send_queued: u64,
}

pub fn encode_status(s: &Status) -> String {
    format!(
        "{{\"open_connections\": {}, \"num_rooms\": {}, \"online_since\": {}, \
         \"rabbitmq_messages_received\": {}, \"ws_messages_received\": {}, \
         \"ws_messages_send\": {}, \"ws_messages_send_error\": {}, \
         \"ws_messages_send_queued\": {}}}",
        s.open_connections,
        s.num_rooms,
        python_string(&s.online_since),
        s.rabbitmq_messages_received,
        s.ws_messages_received,
        s.ws_messages_send,
        s.ws_messages_send_error,
        s.ws_messages_send_queued
    )
}

/// `YYYY-MM-DDTHH:MM:SS.ffffff` (Python's `datetime.isoformat()`) for a time in microseconds
/// since the Unix epoch.
pub fn iso_datetime(unix_micros: i64) -> String {
    let secs = unix_micros.div_euclid(1_000_000);
    let micros = unix_micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let rest = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut text = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    );
    if micros != 0 {
        let _ = write!(text, ".{micros:06}");
    }
    text
}

/// A version-4 UUID from 16 random bytes, in the usual hyphenated lowercase form.
pub fn uuid4(mut bytes: [u8; 16]) -> String {
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let mut text = String::with_capacity(36);
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            text.push('-');
        }
        let _ = write!(text, "{b:02x}");
    }
    text
}

/// A string as Python's `json.dumps` writes it.
pub fn python_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        push_escaped(c, &mut out);
    }
    out.push('"');
    out
}

/// Rewrites one valid JSON text the way Python's `json.dumps(json.loads(text))` writes it: `", "`
/// and `": "` separators, no other whitespace, strings re-escaped with non-ASCII as `\uXXXX`
/// (lowercase hex, surrogate pairs above the BMP), key order kept. Numbers keep their text.
pub fn python_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' | '\r' => {}
            ',' => out.push_str(", "),
            ':' => out.push_str(": "),
            '"' => {
                out.push('"');
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => match chars.next() {
                            Some('u') => {
                                let unit = read_hex4(&mut chars);
                                let decoded = match unit {
                                    Some(high @ 0xD800..=0xDBFF) => {
                                        let mut ahead = chars.clone();
                                        let low = (ahead.next() == Some('\\')
                                            && ahead.next() == Some('u'))
                                        .then(|| read_hex4(&mut ahead))
                                        .flatten()
                                        .filter(|low| (0xDC00..=0xDFFF).contains(low));
                                        match low {
                                            Some(low) => {
                                                chars = ahead;
                                                char::from_u32(
                                                    0x10000
                                                        + ((high - 0xD800) << 10)
                                                        + (low - 0xDC00),
                                                )
                                            }
                                            None => None,
                                        }
                                    }
                                    Some(unit) => char::from_u32(unit),
                                    None => None,
                                };
                                match (decoded, unit) {
                                    (Some(c), _) => push_escaped(c, &mut out),
                                    // A lone surrogate: Python keeps it, escaped.
                                    (None, Some(unit)) => {
                                        let _ = write!(out, "\\u{unit:04x}");
                                    }
                                    (None, None) => {}
                                }
                            }
                            Some('b') => out.push_str("\\b"),
                            Some('f') => out.push_str("\\f"),
                            Some('n') => out.push_str("\\n"),
                            Some('r') => out.push_str("\\r"),
                            Some('t') => out.push_str("\\t"),
                            Some(c) => push_escaped(c, &mut out),
                            None => {}
                        },
                        c => push_escaped(c, &mut out),
                    }
                }
                out.push('"');
            }
            c => out.push(c),
        }
    }
    out
}

fn read_hex4(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Option<u32> {
    let mut unit = 0;
    for _ in 0..4 {
        unit = unit * 16 + chars.next()?.to_digit(16)?;
    }
    Some(unit)
}

fn push_escaped(c: char, out: &mut String) {
    match c {
        '"' => out.push_str("\\\""),
        '\\' => out.push_str("\\\\"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\u{8}' => out.push_str("\\b"),
        '\u{c}' => out.push_str("\\f"),
        c if (c as u32) < 0x20 => {
            let _ = write!(out, "\\u{:04x}", c as u32);
        }
        c if c.is_ascii() => out.push(c),
        c => {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn room(v: Value) -> Room {
        Room::from_value(v).unwrap()
    }

    #[test]
    fn ping_and_errors() {
        assert_eq!(decode_text("ping"), ClientFrame::Ping);
        assert_eq!(
            decode_binary(b"ping"),
            ClientFrame::Error(FrameError::NonJson)
        );
        for text in ["PING", "geen json", "", "{", "NaN"] {
            assert_eq!(
                decode_text(text),
                ClientFrame::Error(FrameError::NonJson),
                "{text}"
            );
        }
        for text in [
            r#"{"type":"foobar"}"#,
            r#"{}"#,
            r#"{"type":null}"#,
            r#"{"type":1}"#,
        ] {
            assert_eq!(
                decode_text(text),
                ClientFrame::Error(FrameError::TypeNotAllowed),
                "{text}"
            );
        }
        for text in [
            "[1]",
            "\"x\"",
            "3",
            "null",
            r#"{"type":"subscribe","requestId":1}"#,
        ] {
            assert_eq!(decode_text(text), ClientFrame::Close, "{text}");
        }
        assert_eq!(
            decode_text(r#"{"type":"subscribe","room":"foo","requestId":1}"#),
            ClientFrame::Close
        );
        assert_eq!(
            decode_text(r#"{"type":"subscribe","room":{"a":1}}"#),
            ClientFrame::Error(FrameError::NoRequestId)
        );
        assert_eq!(
            decode_text(r#"{"type":"unsubscribe","room":{"a":1}}"#),
            ClientFrame::Error(FrameError::NoRequestId)
        );
        assert_eq!(decode_text(r#"{"type":"status"}"#), ClientFrame::Status);
        assert_eq!(
            encode_connection_error("c-1", FrameError::NonJson),
            r#"{"requestId": "c-1", "code": "error", "message": "non-json-message"}"#
        );
        assert_eq!(
            encode_connection_error("c-1", FrameError::TypeNotAllowed),
            r#"{"requestId": "c-1", "code": "error", "message": "message-type-not-allowed"}"#
        );
        assert_eq!(
            encode_error(FrameError::RoomNotFound),
            r#"{"code": "error", "message": "room-not-found"}"#
        );
        assert_eq!(
            encode_error(FrameError::NotSubscribed),
            r#"{"code": "error", "message": "not-subscribed"}"#
        );
        assert_eq!(
            encode_error(FrameError::NoRequestId),
            r#"{"code": "error", "message": "no-request-id"}"#
        );
        assert!(FrameError::NonJson.carries_connection_id());
        assert!(!FrameError::NoRequestId.carries_connection_id());
    }

    #[test]
    fn subscribe_and_unsubscribe() {
        let ClientFrame::Subscribe { room: r, request_id } =
            decode_binary(br#"{"type": "subscribe", "room": {"b": 1, "a": "x"}, "requestId": {"z": 1, "y": "\u00e9"}}"#)
        else {
            panic!("not a subscribe");
        };
        assert_eq!(r, room(json!({"a": "x", "b": 1})));
        assert_eq!(request_id.value, json!({"z": 1, "y": "é"}));
        assert_eq!(&*request_id.text, r#"{"z": 1, "y": "\u00e9"}"#);
        let ClientFrame::Unsubscribe { request_id } =
            decode_text(r#"{"type":"unsubscribe","requestId":42,"room":"ignored"}"#)
        else {
            panic!("not an unsubscribe");
        };
        assert_eq!(&*request_id.text, "42");
        let ClientFrame::Unsubscribe { request_id } =
            decode_text(r#"{"type":"unsubscribe","requestId":null}"#)
        else {
            panic!("not an unsubscribe");
        };
        assert_eq!(&*request_id.text, "null");
    }

    #[test]
    fn publish_frames() {
        assert_eq!(
            publish_frame(&python_json(r#"{"foo":"bar"}"#), "\"r1\""),
            r#"{"type": "publish", "data": {"foo": "bar"}, "requestId": "r1"}"#
        );
        assert_eq!(
            publish_frame("0", "42"),
            r#"{"type": "publish", "data": 0, "requestId": 42}"#
        );
    }

    #[test]
    fn python_layout() {
        let cases = [
            (
                r#"{"a":1,"b":[1,2,{"c":null}]}"#,
                r#"{"a": 1, "b": [1, 2, {"c": null}]}"#,
            ),
            (" { } ", "{}"),
            ("[ ]", "[]"),
            (
                r#""é😀\u00e9\ud83d\ude00""#,
                r#""\u00e9\ud83d\ude00\u00e9\ud83d\ude00""#,
            ),
            (
                r#""a\/b\"c\\d\n\u0041\u001f\u007f""#,
                "\"a/b\\\"c\\\\d\\nA\\u001f\u{7f}\"",
            ),
            (r#""\ud800x""#, r#""\ud800x""#),
            (r#"{"k, :": "v: ,"}"#, r#"{"k, :": "v: ,"}"#),
            ("-1.5e3", "-1.5e3"),
            ("true", "true"),
        ];
        for (input, expected) in cases {
            assert_eq!(python_json(input), expected, "{input}");
        }
        assert_eq!(python_string("a\"é"), r#""a\"\u00e9""#);
    }

    #[test]
    fn bootstrap_answers() {
        assert!(parse_bootstrap(b"{}").unwrap().is_empty());
        assert!(
            parse_bootstrap(br#"{"is_authenticated": false}"#)
                .unwrap()
                .is_empty()
        );
        let rooms = parse_bootstrap(
            br#"{"allowed_rooms":[{"target":"foo","b":1},{"b":1,"target":"foo"},{"x":"*"}]}"#,
        )
        .unwrap();
        assert_eq!(rooms.len(), 2);
        assert_eq!(
            encode_hello(&rooms),
            r#"{"is_authorized": true, "allowed_rooms": [{"target": "foo", "b": 1}, {"x": "*"}]}"#
        );
        assert_eq!(
            encode_hello(&[]),
            r#"{"is_authorized": true, "allowed_rooms": []}"#
        );
        assert_eq!(
            parse_bootstrap(br#"{"allowed_rooms":["foo"]}"#).unwrap_err(),
            BootstrapError::RoomNotAnObject
        );
        assert_eq!(
            parse_bootstrap(br#"{"allowed_rooms":{"a":1}}"#).unwrap_err(),
            BootstrapError::RoomsNotAList
        );
        assert_eq!(
            parse_bootstrap(br#"{"allowed_rooms":null}"#).unwrap_err(),
            BootstrapError::RoomsNotAList
        );
        for body in [&b"not json"[..], b"[]", b"", b"\xff"] {
            assert_eq!(
                parse_bootstrap(body).unwrap_err(),
                BootstrapError::NotAnObject
            );
        }
    }

    #[test]
    fn triggers() {
        let t = parse_trigger(br#"{"rooms":[{"a":1},{"a":1}],"data":{"x":"y"},"requestId":5}"#)
            .unwrap();
        assert_eq!(t.rooms, vec![room(json!({"a": 1})), room(json!({"a": 1}))]);
        assert_eq!(t.data, r#"{"x": "y"}"#);
        assert_eq!(
            parse_trigger(br#"{"rooms":[],"data":null}"#).unwrap().data,
            "null"
        );
        assert_eq!(
            parse_trigger(br#"{"data":1}"#).unwrap_err(),
            TriggerError::NoRooms
        );
        assert_eq!(
            parse_trigger(br#"{"rooms":[]}"#).unwrap_err(),
            TriggerError::NoData
        );
        assert_eq!(
            parse_trigger(br#"{"rooms":["a"],"data":1}"#).unwrap_err(),
            TriggerError::BadRooms
        );
        assert_eq!(
            parse_trigger(br#"{"rooms":{},"data":1}"#).unwrap_err(),
            TriggerError::BadRooms
        );
        assert_eq!(
            parse_trigger(b"nope").unwrap_err(),
            TriggerError::NotAnObject
        );
        assert_eq!(TriggerError::NoData.to_string(), "data not specified");
    }

    #[test]
    fn status_and_ids() {
        let s = Status {
            open_connections: 2,
            num_rooms: 1,
            online_since: iso_datetime(0),
            ..Status::default()
        };
        assert_eq!(
            encode_status(&s),
            "{\"open_connections\": 2, \"num_rooms\": 1, \"online_since\": \"1970-01-01T00:00:00\", \
             \"rabbitmq_messages_received\": 0, \"ws_messages_received\": 0, \
             \"ws_messages_send\": 0, \"ws_messages_send_error\": 0, \"ws_messages_send_queued\": 0}"
        );
        assert_eq!(
            iso_datetime(1_795_000_000_123_456),
            "2026-11-18T11:06:40.123456"
        );
        assert_eq!(iso_datetime(951_782_400_000_000), "2000-02-29T00:00:00");
        let id = uuid4([0xff; 16]);
        assert_eq!(id, "ffffffff-ffff-4fff-bfff-ffffffffffff");
        assert_eq!(uuid4([0; 16]), "00000000-0000-4000-8000-000000000000");
    }
}
