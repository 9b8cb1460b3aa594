//! Snorky 0.1 (PyPI `snorky` 0.1.0a4): the service envelope, its RPC, the exact error texts and
//! every frame the built-in services send, with no I/O.
//!
//! Both directions carry `{"service": <name>, "message": <any JSON>}`. The built-in services are
//! RPC services: a request is `{"command", "params", "callId"?}`; the answer is
//! `{"type": "response", "callId"?, "data"}` (the `callId` key left out when the request had
//! none, or had `null`) or `{"type": "error", "callId", "message"}` (`callId` always present,
//! `null` when absent). Everything the server writes is in Python's `json.dumps` layout (`", "`
//! and `": "` separators, non-ASCII as `\uXXXX`, key order kept), so frames match the reference
//! byte for byte.
//!
//! Bad input follows the reference (see [`Ignored`]): invalid JSON, a missing `service` or
//! `message`, an unknown service, or a message without `command` or `params` get no reply. Where
//! the reference crashed and Tornado aborted the TCP connection (a `message` that is a string or
//! an array, a top-level array), Plaza ignores the frame and the connection stays open.

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use std::collections::BTreeMap;

use crate::hightemplar::{python_json, python_string};

// ---- error texts (exactly the reference's) ----

pub const UNKNOWN_COMMAND: &str = "Unknown command";
pub const INVALID_PARAMS: &str = "Invalid params";
pub const INTERNAL_ERROR: &str = "Internal error";
pub const NOT_AUTHORIZED: &str = "Not authorized";
pub const NOT_SUBSCRIBED: &str = "Not subscribed";
pub const ALREADY_SUBSCRIBED: &str = "Already subscribed";
pub const NO_SUCH_DEALER: &str = "No such dealer";
pub const DEALER_NOT_A_NAME: &str = "dealer should be a dealer name";
pub const MISSING_FIELD: &str = "Missing field";
pub const MODEL_MUST_BE_STRING: &str = "model must be string";
pub const INVALID_DELTA_TYPE: &str = "Invalid delta type";
pub const TOKEN_MUST_BE_STRING: &str = "token must be string";
pub const NO_SUCH_SUBSCRIPTION: &str = "No such subscription";
pub const NAME_ALREADY_REGISTERED: &str = "Name already registered";
pub const NAME_NOT_ALLOWED: &str = "Name not allowed";
pub const INVALID_PARTICIPANT: &str = "Invalid participant";
pub const UNKNOWN_PARTICIPANT: &str = "Unknown participant";
pub const INVALID_SENDER: &str = "Invalid sender";
pub const UNKNOWN_DESTINATION: &str = "Unknown destination";
pub const NOT_AUTHENTICATED: &str = "Not authenticated";
pub const ALREADY_JOINED: &str = "Already joined";
pub const NOT_JOINED: &str = "Not joined";
pub const TOO_MANY_CURSORS: &str = "Too many cursors";
pub const REUSED_HANDLE: &str = "Reused handle";
pub const NO_SUCH_CURSOR: &str = "No such cursor";
/// Plaza's own text (the reference accepted any value as a row): a delta's `data`, `newData` or
/// `oldData` that is not a JSON object.
pub const DATA_NOT_OBJECT: &str = "Delta data must be an object";
/// Plaza's own text: the backend answers a call to a service it does not have (the reference
/// never answered).
pub const UNKNOWN_SERVICE: &str = "Unknown service";
/// Plaza's own text: more live subscriptions than a connection may hold.
pub const TOO_MANY_SUBSCRIPTIONS: &str = "Too many subscriptions";

/// Cursors one client may hold, as in the reference.
pub const MAX_CURSORS: usize = 16;
/// Length of a subscription token.
pub const TOKEN_LEN: usize = 32;

// ---- decoding ----

/// Why a frame gets no reply (as in the reference, which logged and ignored these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Ignored {
    #[error("not valid JSON")]
    InvalidJson,
    #[error("not a JSON object")]
    NotAnObject,
    #[error("no 'service' key (or it is not a string)")]
    NoService,
    #[error("no 'message' key")]
    NoMessage,
    /// The reference crashed on these (Tornado aborted the connection).
    #[error("'message' is not an object")]
    MessageNotAnObject,
    #[error("the message has no 'command' or no 'params'")]
    NotACall,
}

/// One RPC request, decoded.
#[derive(Debug)]
pub struct Call {
    pub service: String,
    /// The `callId` as the client wrote it; `None` when absent or `null`.
    pub call_id: Option<Box<RawValue>>,
    /// `None` when `command` is not a string (the reference answers `Unknown command`).
    pub command: Option<String>,
    /// `None` when `params` is not an object (the reference answers `Invalid params`).
    pub params: Option<Params>,
}

#[derive(Deserialize)]
struct EnvelopeIn<'a> {
    #[serde(borrow)]
    service: Option<&'a RawValue>,
    #[serde(borrow)]
    message: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct MessageIn<'a> {
    #[serde(rename = "callId", borrow)]
    call_id: Option<&'a RawValue>,
    #[serde(borrow)]
    command: Option<&'a RawValue>,
    #[serde(borrow)]
    params: Option<&'a RawValue>,
}

/// Decodes one frame (text, or the bytes of a binary frame, which the reference treats alike).
pub fn decode(frame: &[u8]) -> Result<Call, Ignored> {
    let Ok(text) = std::str::from_utf8(frame) else {
        return Err(Ignored::InvalidJson);
    };
    let value: &RawValue = serde_json::from_str(text).map_err(|_| Ignored::InvalidJson)?;
    // serde reads a struct from an array too: only objects are envelopes.
    if !value.get().starts_with('{') {
        return Err(Ignored::NotAnObject);
    }
    let envelope: EnvelopeIn<'_> =
        serde_json::from_str(value.get()).map_err(|_| Ignored::NotAnObject)?;
    let service = envelope.service.ok_or(Ignored::NoService)?;
    let Ok(service) = serde_json::from_str::<String>(service.get()) else {
        // A non-string name names no registered service.
        return Err(Ignored::NoService);
    };
    let message = envelope.message.ok_or(Ignored::NoMessage)?;
    if !message.get().starts_with('{') {
        return Err(Ignored::MessageNotAnObject);
    }
    let message: MessageIn<'_> =
        serde_json::from_str(message.get()).map_err(|_| Ignored::MessageNotAnObject)?;
    let (Some(command), Some(params)) = (message.command, message.params) else {
        return Err(Ignored::NotACall);
    };
    let call_id = message
        .call_id
        .filter(|raw| raw.get() != "null")
        .map(RawValue::to_owned);
    Ok(Call {
        service,
        call_id,
        command: serde_json::from_str::<String>(command.get()).ok(),
        params: serde_json::from_str::<BTreeMap<String, Box<RawValue>>>(params.get())
            .ok()
            .map(Params),
    })
}

/// A request's `params` object (the last of duplicate keys wins, as in Python).
#[derive(Debug, Default)]
pub struct Params(BTreeMap<String, Box<RawValue>>);

impl Params {
    /// Binds the params to a command's arguments, like Python's `signature().bind`: every name
    /// in `names`, nothing else. `Err(INVALID_PARAMS)` otherwise.
    pub fn bind<const N: usize>(
        mut self,
        names: [&'static str; N],
    ) -> Result<[Box<RawValue>; N], &'static str> {
        if self.0.len() != N {
            return Err(INVALID_PARAMS);
        }
        let mut out = Vec::with_capacity(N);
        for name in names {
            out.push(self.0.remove(name).ok_or(INVALID_PARAMS)?);
        }
        out.try_into().map_err(|_| INVALID_PARAMS)
    }
}

/// A JSON value as a key: equal values (regardless of key order) give equal keys. Channel names,
/// documents and handles may be any JSON value in Snorky.
pub fn canonical_key(raw: &RawValue) -> String {
    serde_json::from_str::<Value>(raw.get())
        .map(|v| v.to_string())
        .unwrap_or_else(|_| raw.get().to_owned())
}

/// `raw` as a string, if it is one.
pub fn as_string(raw: &RawValue) -> Option<String> {
    serde_json::from_str::<String>(raw.get()).ok()
}

// ---- encoding ----

/// `{"service": S, "message": M}` with `message` already in Python layout.
pub fn envelope(service: &str, message: &str) -> String {
    format!(
        "{{\"service\": {}, \"message\": {message}}}",
        python_string(service)
    )
}

/// A success answer; `data` is JSON text (any layout). `callId` is left out when `None`.
pub fn response(service: &str, call_id: Option<&RawValue>, data: &str) -> String {
    let data = python_json(data);
    let message = match call_id {
        Some(id) => format!(
            "{{\"type\": \"response\", \"callId\": {}, \"data\": {data}}}",
            python_json(id.get())
        ),
        None => format!("{{\"type\": \"response\", \"data\": {data}}}"),
    };
    envelope(service, &message)
}

/// An error answer: `callId` is `null` when `None`.
pub fn error(service: &str, call_id: Option<&RawValue>, text: &str) -> String {
    let id = call_id.map_or_else(|| "null".to_owned(), |id| python_json(id.get()));
    envelope(
        service,
        &format!(
            "{{\"type\": \"error\", \"callId\": {id}, \"message\": {}}}",
            python_string(text)
        ),
    )
}

/// An error for a backend request that names no service (the reference never answered it):
/// `{"service": null, "message": {"type": "error", "callId": null, "message": T}}`.
pub fn error_without_service(text: &str) -> String {
    format!(
        "{{\"service\": null, \"message\": {{\"type\": \"error\", \"callId\": null, \"message\": {}}}}}",
        python_string(text)
    )
}

/// PubSub: `{"type": "message", "channel": C, "message": M}` (C and M as JSON text).
pub fn pubsub_message(service: &str, channel: &str, message: &str) -> String {
    envelope(
        service,
        &format!(
            "{{\"type\": \"message\", \"channel\": {}, \"message\": {}}}",
            python_json(channel),
            python_json(message)
        ),
    )
}

/// DataSync: `{"type": "delta", "delta": D}`, D as JSON text.
pub fn delta(service: &str, delta: &str) -> String {
    envelope(
        service,
        &format!("{{\"type\": \"delta\", \"delta\": {}}}", python_json(delta)),
    )
}

/// Messaging: `{"type": "message", "sender", "dest", "body"}` (body as JSON text).
pub fn messaging_message(service: &str, sender: &str, dest: &str, body: &str) -> String {
    envelope(
        service,
        &format!(
            "{{\"type\": \"message\", \"sender\": {}, \"dest\": {}, \"body\": {}}}",
            python_string(sender),
            python_string(dest),
            python_json(body)
        ),
    )
}

/// Chat presence: `{"type": "presence", "from", "channel", "status", "timestamp"}`.
pub fn chat_presence(
    service: &str,
    from: &str,
    channel: &str,
    joined: bool,
    timestamp: &str,
) -> String {
    envelope(
        service,
        &format!(
            "{{\"type\": \"presence\", \"from\": {}, \"channel\": {}, \"status\": \"{}\", \"timestamp\": {}}}",
            python_string(from),
            python_json(channel),
            if joined { "joined" } else { "left" },
            python_string(timestamp)
        ),
    )
}

/// Chat message: `{"type": "message", "from", "channel", "body", "timestamp"}`.
pub fn chat_message(
    service: &str,
    from: &str,
    channel: &str,
    body: &str,
    timestamp: &str,
) -> String {
    envelope(
        service,
        &format!(
            "{{\"type\": \"message\", \"from\": {}, \"channel\": {}, \"body\": {}, \"timestamp\": {}}}",
            python_string(from),
            python_json(channel),
            python_json(body),
            python_string(timestamp)
        ),
    )
}

/// Chat read marker: `{"type": "read", "channel", "timestamp"}`.
pub fn chat_read(service: &str, channel: &str, timestamp: &str) -> String {
    envelope(
        service,
        &format!(
            "{{\"type\": \"read\", \"channel\": {}, \"timestamp\": {}}}",
            python_json(channel),
            python_string(timestamp)
        ),
    )
}

/// A cursor as the Cursors service shows it to the other clients.
#[derive(Debug, Clone, PartialEq)]
pub struct Cursor {
    pub public_handle: u16,
    /// JSON text.
    pub document: String,
    /// JSON text.
    pub position: String,
    /// JSON text.
    pub status: String,
    pub owner: String,
}

impl Cursor {
    /// `{"publicHandle", "document", "position", "status", "owner"}`.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"publicHandle\": {}, \"document\": {}, \"position\": {}, \"status\": {}, \"owner\": {}}}",
            self.public_handle,
            python_json(&self.document),
            python_json(&self.position),
            python_json(&self.status),
            python_string(&self.owner)
        )
    }
}

/// `cursorAdded` or `cursorUpdated` with the whole cursor.
pub fn cursor_changed(service: &str, added: bool, cursor: &Cursor) -> String {
    envelope(
        service,
        &format!(
            "{{\"type\": \"{}\", \"cursor\": {}}}",
            if added {
                "cursorAdded"
            } else {
                "cursorUpdated"
            },
            cursor.to_json()
        ),
    )
}

/// `cursorRemoved` with `{"publicHandle", "document"}`.
pub fn cursor_removed(service: &str, public_handle: u16, document: &str) -> String {
    envelope(
        service,
        &format!(
            "{{\"type\": \"cursorRemoved\", \"cursor\": {{\"publicHandle\": {public_handle}, \"document\": {}}}}}",
            python_json(document)
        ),
    )
}

/// `[a, b, ...]` of strings, in Python layout.
pub fn string_list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let items: Vec<String> = items.into_iter().map(python_string).collect();
    format!("[{}]", items.join(", "))
}

// ---- DataSync backend ----

/// `authorizeSubscription`'s `items`, checked item by item in the reference's order: `dealer`
/// present, a string, a known dealer, then `query` present. Returns `(dealer, query)` pairs.
pub fn parse_items(
    items: &RawValue,
    is_dealer: impl Fn(&str) -> bool,
) -> Result<Vec<(String, Value)>, &'static str> {
    // A non-list, or an item that is not an object, crashed the reference: `Internal error`.
    let items: Vec<serde_json::Map<String, Value>> =
        serde_json::from_str(items.get()).map_err(|_| INTERNAL_ERROR)?;
    let mut out = Vec::with_capacity(items.len());
    for mut item in items {
        let dealer = match item.remove("dealer") {
            None => return Err("Missing field 'dealer'"),
            Some(Value::String(name)) => name,
            Some(_) => return Err(DEALER_NOT_A_NAME),
        };
        if !is_dealer(&dealer) {
            return Err(NO_SUCH_DEALER);
        }
        let query = item.remove("query").ok_or("Missing field 'query'")?;
        out.push((dealer, query));
    }
    Ok(out)
}

/// `publishDeltas`'s `deltas`, all checked before any is used, in the reference's order per
/// delta: `type` and `model` present, `model` a string, `type` known, then the rows present.
/// Plaza also requires the rows to be objects ([`DATA_NOT_OBJECT`]).
pub fn parse_deltas(deltas: &RawValue) -> Result<Vec<plaza_core::Delta>, &'static str> {
    let deltas: Vec<Value> = serde_json::from_str(deltas.get()).map_err(|_| INTERNAL_ERROR)?;
    for delta in &deltas {
        let Value::Object(map) = delta else {
            return Err(INTERNAL_ERROR);
        };
        let (Some(kind), Some(model)) = (map.get("type"), map.get("model")) else {
            return Err(MISSING_FIELD);
        };
        if !model.is_string() {
            return Err(MODEL_MUST_BE_STRING);
        }
        let rows: &[&str] = match kind.as_str() {
            Some("insert" | "delete") => &["data"],
            Some("update") => &["newData", "oldData"],
            _ => return Err(INVALID_DELTA_TYPE),
        };
        for row in rows {
            match map.get(*row) {
                None => return Err(MISSING_FIELD),
                Some(Value::Object(_)) => {}
                Some(_) => return Err(DATA_NOT_OBJECT),
            }
        }
    }
    plaza_core::live::parse_batch(deltas).map_err(|_| INTERNAL_ERROR)
}

/// A subscription token: [`TOKEN_LEN`] characters of `[a-z0-9]` drawn from `random` bytes
/// without bias (bytes of 252 and above are skipped). `None` if `random` ran out first.
pub fn token(random: impl IntoIterator<Item = u8>) -> Option<String> {
    const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let token: String = random
        .into_iter()
        .filter(|b| *b < 252)
        .take(TOKEN_LEN)
        .map(|b| char::from(ALPHABET[usize::from(b % 36)]))
        .collect();
    (token.len() == TOKEN_LEN).then_some(token)
}

/// Python's `datetime.isoformat()` of an aware UTC time: `2026-11-22T21:11:40.203704+00:00`.
pub fn timestamp(unix_micros: i64) -> String {
    let mut text = crate::hightemplar::iso_datetime(unix_micros);
    text.push_str("+00:00");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(text: &str) -> Call {
        decode(text.as_bytes()).unwrap()
    }

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).unwrap()
    }

    // S1: the RPC shape.
    #[test]
    fn s1_response_with_and_without_call_id() {
        let c = call(
            r#"{"service":"pubsub","message":{"command":"subscribe","params":{"channel":"c1"},"callId":0}}"#,
        );
        assert_eq!(c.service, "pubsub");
        assert_eq!(c.command.as_deref(), Some("subscribe"));
        assert_eq!(
            response(&c.service, c.call_id.as_deref(), "null"),
            r#"{"service": "pubsub", "message": {"type": "response", "callId": 0, "data": null}}"#
        );
        let c = call(
            r#"{"service":"pubsub","message":{"command":"subscribe","params":{"channel":"c1"}}}"#,
        );
        assert!(c.call_id.is_none());
        assert_eq!(
            response(&c.service, c.call_id.as_deref(), "null"),
            r#"{"service": "pubsub", "message": {"type": "response", "data": null}}"#
        );
        // An explicit null is no callId, as `msg.get("callId", None)` reads it.
        let c = call(r#"{"service":"pubsub","message":{"command":"x","params":{},"callId":null}}"#);
        assert!(c.call_id.is_none());
        assert_eq!(
            error("pubsub", None, UNKNOWN_COMMAND),
            r#"{"service": "pubsub", "message": {"type": "error", "callId": null, "message": "Unknown command"}}"#
        );
        let c =
            call(r#"{"service":"pubsub","message":{"command":"x","params":{},"callId":"abc"}}"#);
        assert_eq!(
            error("pubsub", c.call_id.as_deref(), UNKNOWN_COMMAND),
            r#"{"service": "pubsub", "message": {"type": "error", "callId": "abc", "message": "Unknown command"}}"#
        );
        // An object callId comes back in Python layout, key order kept.
        let c = call(
            r#"{"service":"s","message":{"command":"x","params":{},"callId":{"b":1,"a":[1,2]}}}"#,
        );
        assert_eq!(
            response("s", c.call_id.as_deref(), r#"{"x":"é"}"#),
            r#"{"service": "s", "message": {"type": "response", "callId": {"b": 1, "a": [1, 2]}, "data": {"x": "\u00e9"}}}"#
        );
    }

    // S2: RPC errors and ignored input.
    #[test]
    fn s2_bad_params_and_ignored_frames() {
        let c = call(r#"{"service":"pubsub","message":{"command":"subscribe","params":{}}}"#);
        assert_eq!(
            c.params.unwrap().bind(["channel"]).unwrap_err(),
            INVALID_PARAMS
        );
        let c = call(
            r#"{"service":"pubsub","message":{"command":"subscribe","params":{"channel":1,"x":2}}}"#,
        );
        assert_eq!(
            c.params.unwrap().bind(["channel"]).unwrap_err(),
            INVALID_PARAMS
        );
        let c = call(r#"{"service":"pubsub","message":{"command":"subscribe","params":[1]}}"#);
        assert!(c.params.is_none());
        let c = call(
            r#"{"service":"pubsub","message":{"command":"subscribe","params":{"channel":{"a":1}}}}"#,
        );
        let [channel] = c.params.unwrap().bind(["channel"]).unwrap();
        assert_eq!(channel.get(), r#"{"a":1}"#);
        let c = call(r#"{"service":"pubsub","message":{"command":5,"params":{}}}"#);
        assert!(c.command.is_none());

        for (frame, why) in [
            ("{not json", Ignored::InvalidJson),
            ("[1,2]", Ignored::NotAnObject),
            ("\"x\"", Ignored::NotAnObject),
            (
                r#"{"message":{"command":"a","params":{}}}"#,
                Ignored::NoService,
            ),
            (
                r#"{"service":1,"message":{"command":"a","params":{}}}"#,
                Ignored::NoService,
            ),
            (r#"{"service":"pubsub"}"#, Ignored::NoMessage),
            (
                r#"{"service":"pubsub","message":"hi"}"#,
                Ignored::MessageNotAnObject,
            ),
            (
                r#"{"service":"pubsub","message":[1]}"#,
                Ignored::MessageNotAnObject,
            ),
            (
                r#"{"service":"pubsub","message":{"command":"subscribe"}}"#,
                Ignored::NotACall,
            ),
            (
                r#"{"service":"pubsub","message":{"params":{}}}"#,
                Ignored::NotACall,
            ),
        ] {
            assert_eq!(decode(frame.as_bytes()).unwrap_err(), why, "{frame}");
        }
        assert_eq!(decode(&[0xff, 0xfe]).unwrap_err(), Ignored::InvalidJson);
    }

    // S3: the PubSub notification.
    #[test]
    fn s3_pubsub_message() {
        assert_eq!(
            pubsub_message("pubsub", r#""c1""#, r#"{"hello":[1,2]}"#),
            r#"{"service": "pubsub", "message": {"type": "message", "channel": "c1", "message": {"hello": [1, 2]}}}"#
        );
        assert_eq!(
            pubsub_message("pubsub", r#"{"room": 1}"#, r#""ü""#),
            r#"{"service": "pubsub", "message": {"type": "message", "channel": {"room": 1}, "message": "\u00fc"}}"#
        );
        assert_eq!(
            canonical_key(&raw(r#"{"b": 1, "a": 2}"#)),
            r#"{"a":2,"b":1}"#
        );
        assert_eq!(canonical_key(&raw(r#"{"a":2,"b":1}"#)), r#"{"a":2,"b":1}"#);
    }

    // S6: the delta notification and the token.
    #[test]
    fn s6_delta_frame_and_token() {
        assert_eq!(
            delta(
                "datasync",
                r#"{"type":"insert","model":"Task","data":{"id":1,"title":"a"}}"#
            ),
            r#"{"service": "datasync", "message": {"type": "delta", "delta": {"type": "insert", "model": "Task", "data": {"id": 1, "title": "a"}}}}"#
        );
        let t = token((0u8..=255).cycle().skip(200)).unwrap();
        assert_eq!(t.len(), 32);
        assert!(
            t.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
        assert_eq!(token([1u8; 10]), None);
        assert_eq!(token([255u8; 100]), None);
        assert_eq!(
            error("datasync", Some(&raw("3")), TOKEN_MUST_BE_STRING),
            r#"{"service": "datasync", "message": {"type": "error", "callId": 3, "message": "token must be string"}}"#
        );
    }

    // S7: the deltas an update becomes are the core's (`OutDelta`); here their frames.
    #[test]
    fn s7_update_insert_delete_frames() {
        use plaza_core::live::OutDelta;
        let new = serde_json::json!({"color": "red", "id": 1});
        let old = serde_json::json!({"color": "blue", "id": 1});
        let encode = |out: Option<OutDelta<'_>>| {
            delta("datasync", &serde_json::to_string(&out.unwrap()).unwrap())
        };
        assert_eq!(
            encode(OutDelta::for_update("Task", &new, &old, false, true)),
            r#"{"service": "datasync", "message": {"type": "delta", "delta": {"type": "insert", "model": "Task", "data": {"color": "red", "id": 1}}}}"#
        );
        assert_eq!(
            encode(OutDelta::for_update("Task", &new, &old, true, true)),
            r#"{"service": "datasync", "message": {"type": "delta", "delta": {"type": "update", "model": "Task", "newData": {"color": "red", "id": 1}, "oldData": {"color": "blue", "id": 1}}}}"#
        );
        assert_eq!(
            encode(OutDelta::for_update("Task", &new, &old, true, false)),
            r#"{"service": "datasync", "message": {"type": "delta", "delta": {"type": "delete", "model": "Task", "data": {"color": "blue", "id": 1}}}}"#
        );
        assert!(OutDelta::for_update("Task", &new, &old, false, false).is_none());
    }

    // S8: filter queries pass through `authorizeSubscription` untouched (compiled by the core).
    #[test]
    fn s8_filter_query_items() {
        let items = parse_items(
            &raw(r#"[{"dealer":"FilteredTasks","query":["and",[">=","prio",3],["not",["==","done",true]]]}]"#),
            |d| d == "FilteredTasks",
        )
        .unwrap();
        assert_eq!(items[0].0, "FilteredTasks");
        let filter = plaza_core::Filter::compile(&items[0].1).unwrap();
        assert!(filter.matches(&serde_json::json!({"prio": 5, "done": false})));
        assert!(!filter.matches(&serde_json::json!({"prio": "9"})));
        assert!(!filter.matches(&serde_json::json!({})));
        let not = plaza_core::Filter::compile(&serde_json::json!(["not", ["==", "x", 1]])).unwrap();
        assert!(not.matches(&serde_json::json!({})));
        // Dotted fields are nested access (the documented intent, not 0.1.0a4's top-level lookup).
        let dotted =
            plaza_core::Filter::compile(&serde_json::json!(["==", "owner.name", "bob"])).unwrap();
        assert!(dotted.matches(&serde_json::json!({"owner": {"name": "bob"}})));
        assert!(!dotted.matches(&serde_json::json!({"name": "bob", "owner": {"name": "alice"}})));
    }

    // S9: the backend's validation texts.
    #[test]
    fn s9_backend_validation() {
        let dealers = |d: &str| d == "AllTasks";
        let items = |t: &str| parse_items(&raw(t), dealers);
        assert_eq!(
            items(r#"[{"dealer":5,"query":1}]"#).unwrap_err(),
            DEALER_NOT_A_NAME
        );
        assert_eq!(
            items(r#"[{"dealer":"Nope","query":1}]"#).unwrap_err(),
            NO_SUCH_DEALER
        );
        assert_eq!(
            items(r#"[{"dealer":"AllTasks"}]"#).unwrap_err(),
            "Missing field 'query'"
        );
        assert_eq!(
            items(r#"[{"query":1}]"#).unwrap_err(),
            "Missing field 'dealer'"
        );
        assert_eq!(
            items(r#"{"dealer":"AllTasks"}"#).unwrap_err(),
            INTERNAL_ERROR
        );
        assert_eq!(items("[]").unwrap(), vec![]);
        assert_eq!(
            items(r#"[{"dealer":"AllTasks","query":null}]"#).unwrap(),
            vec![("AllTasks".to_owned(), Value::Null)]
        );

        let deltas = |t: &str| parse_deltas(&raw(t));
        let ok = r#"{"type":"insert","model":"Task","data":{"id":1}}"#;
        for (batch, text) in [
            (
                format!(r#"[{ok},{{"type":"upsert","model":"Task","data":{{}}}}]"#),
                INVALID_DELTA_TYPE,
            ),
            (
                format!(r#"[{ok},{{"type":"insert","data":{{}}}}]"#),
                MISSING_FIELD,
            ),
            (
                format!(r#"[{ok},{{"model":"Task","data":{{}}}}]"#),
                MISSING_FIELD,
            ),
            (
                format!(r#"[{ok},{{"type":"insert","model":"Task"}}]"#),
                MISSING_FIELD,
            ),
            (
                format!(r#"[{ok},{{"type":"update","model":"Task","newData":{{}}}}]"#),
                MISSING_FIELD,
            ),
            (
                format!(r#"[{ok},{{"type":"insert","model":5,"data":{{}}}}]"#),
                MODEL_MUST_BE_STRING,
            ),
            // model is checked before type, as in the reference
            (
                format!(r#"[{ok},{{"type":"upsert","model":5,"data":{{}}}}]"#),
                MODEL_MUST_BE_STRING,
            ),
            (
                format!(r#"[{ok},{{"type":"insert","model":"Task","data":5}}]"#),
                DATA_NOT_OBJECT,
            ),
        ] {
            assert_eq!(deltas(&batch).unwrap_err(), text, "{batch}");
        }
        let parsed = deltas(&format!(
            r#"[{ok},{{"type":"update","model":"Task","newData":{{"id":1}},"oldData":{{"id":1}}}}]"#
        ))
        .unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[1].kind(), plaza_core::live::DeltaKind::Update);
    }

    #[test]
    fn other_frames() {
        assert_eq!(
            messaging_message("messaging", "alice", "bob", r#""hi""#),
            r#"{"service": "messaging", "message": {"type": "message", "sender": "alice", "dest": "bob", "body": "hi"}}"#
        );
        assert_eq!(
            chat_presence(
                "chat",
                "u1",
                r#""room""#,
                true,
                "2026-11-22T21:11:40.203704+00:00"
            ),
            r#"{"service": "chat", "message": {"type": "presence", "from": "u1", "channel": "room", "status": "joined", "timestamp": "2026-11-22T21:11:40.203704+00:00"}}"#
        );
        assert_eq!(
            chat_read("chat", r#""room""#, "t"),
            r#"{"service": "chat", "message": {"type": "read", "channel": "room", "timestamp": "t"}}"#
        );
        let cursor = Cursor {
            public_handle: 7,
            document: "\"doc\"".into(),
            position: "3".into(),
            status: "null".into(),
            owner: "u1".into(),
        };
        assert_eq!(
            cursor_changed("cursors", true, &cursor),
            r#"{"service": "cursors", "message": {"type": "cursorAdded", "cursor": {"publicHandle": 7, "document": "doc", "position": 3, "status": null, "owner": "u1"}}}"#
        );
        assert_eq!(
            cursor_removed("cursors", 7, "\"doc\""),
            r#"{"service": "cursors", "message": {"type": "cursorRemoved", "cursor": {"publicHandle": 7, "document": "doc"}}}"#
        );
        assert_eq!(string_list(["alice", "bob"]), r#"["alice", "bob"]"#);
        assert_eq!(
            error_without_service("Invalid message: not a JSON object"),
            r#"{"service": null, "message": {"type": "error", "callId": null, "message": "Invalid message: not a JSON object"}}"#
        );
        assert_eq!(
            timestamp(1_795_900_300_203_704),
            "2026-11-28T21:11:40.203704+00:00"
        );
    }
}
