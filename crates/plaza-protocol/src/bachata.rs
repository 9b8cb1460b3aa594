//! Bachata 0.1 (PyPI `bachata`, its example page and its `websockets` tests): frames ⇄ commands,
//! with no sockets.
//!
//! Two kinds of JSON objects travel on a Bachata socket, one per WebSocket text frame:
//!
//! - **transport messages** have an integer `type`: the server sends `{"type": 1000}` once the
//!   channel is known, answers `1001` with `{"type": 1002}`, confirms every data message it took
//!   with `{"type": 100, "data": ID}` and tells the sender `{"type": 300, "data": ID}` once the
//!   receiver acknowledged it with `{"type": 200, "data": ID}`. A client's `100`, `300` and `1002`
//!   are ignored.
//! - **data messages** carry an `id` and a `type` (a string; an integer that is not one of the
//!   transport types above counts as data too, as in the reference), plus any of `data`, `dest`,
//!   `from`, `time`, `sign`. The server overwrites `from` with the sender's channel and delivers
//!   the object itself, key order kept.
//!
//! The server's frames are what Python's `json.dumps` writes (`", "` and `": "` separators,
//! non-ASCII escaped), as the reference stores and sends them. Data messages are stored in a
//! Plaza chat inbox as compact JSON ([`DataMessage::stored`]) and turned back into the frame the
//! receiver expects by [`encode_entry`].

use std::fmt;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::hightemplar::{python_json, python_string};

/// `{"type": 1000}`: the channel is known, messages follow.
pub const READY: &str = "{\"type\": 1000}";
/// `{"type": 1002}`: the answer to a ping (1001).
pub const PONG: &str = "{\"type\": 1002}";
/// The close reason of a connection without a channel (close code 1000).
pub const NOT_AUTHORIZED: &str = "Error: not authorized for channel access";

/// The integer types the reference treats as transport messages.
const TRANSPORT_TYPES: [i64; 5] = [1001, 1002, 100, 200, 300];

/// Longest message id, in bytes (Plaza's chat limit).
pub const MAX_ID_LEN: usize = 128;

/// A decoded client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// `{"type": 1001}`: answer [`PONG`].
    Ping,
    /// `{"type": 200, "data": ID}`: the receiver got message `ID`.
    Ack(String),
    /// `100`, `300`, `1002`, or a `200` without a usable id: nothing to do.
    Ignored,
    Data(DataMessage),
    /// Not a usable message: no 100, no delivery, the connection stays open.
    Invalid(Invalid),
}

/// Why a frame is not a usable message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    NotJson,
    NotAnObject,
    NoType,
    /// `type` is neither a string nor an integer.
    BadType,
    NoId,
    /// `id` is not a string or an integer, or is empty, too long or holds control characters.
    BadId,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Invalid::NotJson => "not JSON",
            Invalid::NotAnObject => "not a JSON object",
            Invalid::NoType => "no `type`",
            Invalid::BadType => "`type` must be a string (or an integer)",
            Invalid::NoId => "no `id`",
            Invalid::BadId => "`id` must be a string or an integer of 1 to 128 bytes",
        })
    }
}

/// A data message as a client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataMessage {
    /// The id as Plaza's chat stores it: a string id as is, an integer id as its digits.
    pub id: String,
    /// The `id` field as sent (JSON text), echoed in the 100.
    pub id_json: String,
    /// `type` as a route key: a string as is, an integer as its digits.
    pub kind: String,
    /// `dest` when it is a string (anything else is no destination, as in the reference).
    pub dest: Option<String>,
    /// Every field as raw JSON text, in the order sent (a repeated key keeps its first place
    /// and its last value).
    fields: Vec<(String, String)>,
}

impl DataMessage {
    /// The object with `from` set to `channel` (in its place, or appended), as compact JSON:
    /// what is stored in the receiver's inbox.
    pub fn stored(&self, channel: &str) -> String {
        let from = serde_json::to_string(channel).unwrap_or_default();
        let mut out = String::with_capacity(
            64 + self
                .fields
                .iter()
                .map(|(k, v)| k.len() + v.len() + 4)
                .sum::<usize>(),
        );
        out.push('{');
        let mut from_done = false;
        for (i, (key, value)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&serde_json::to_string(key).unwrap_or_default());
            out.push(':');
            if key == "from" {
                out.push_str(&from);
                from_done = true;
            } else {
                out.push_str(value);
            }
        }
        if !from_done {
            if !self.fields.is_empty() {
                out.push(',');
            }
            out.push_str("\"from\":");
            out.push_str(&from);
        }
        out.push('}');
        out
    }
}

/// The fields of a JSON object in their order, values kept as raw JSON text.
struct Ordered(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
                let mut fields: Vec<(String, Box<RawValue>)> = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, Box<RawValue>>()? {
                    // Python's dict: a repeated key keeps its first place and its last value.
                    match fields.iter_mut().find(|(k, _)| *k == key) {
                        Some(field) => field.1 = value,
                        None => fields.push((key, value)),
                    }
                }
                Ok(Ordered(fields))
            }
        }
        d.deserialize_map(V)
    }
}

impl Ordered {
    fn get(&self, key: &str) -> Option<&RawValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| &**v)
    }
}

/// A JSON value as far as routing cares.
enum Scalar {
    Str(String),
    Int(i64),
    Other,
}

fn scalar(raw: &RawValue) -> Scalar {
    match serde_json::from_str::<serde_json::Value>(raw.get()) {
        Ok(serde_json::Value::String(s)) => Scalar::Str(s),
        Ok(serde_json::Value::Number(n)) => n.as_i64().map_or(Scalar::Other, Scalar::Int),
        _ => Scalar::Other,
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && !id.chars().any(char::is_control)
}

/// Decodes a text frame.
pub fn decode(text: &str) -> ClientFrame {
    let object = match serde_json::from_str::<Ordered>(text) {
        Ok(object) => object,
        Err(_) if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() => {
            return ClientFrame::Invalid(Invalid::NotAnObject);
        }
        Err(_) => return ClientFrame::Invalid(Invalid::NotJson),
    };
    let Some(kind) = object.get("type") else {
        return ClientFrame::Invalid(Invalid::NoType);
    };
    let kind = match scalar(kind) {
        Scalar::Int(n) if TRANSPORT_TYPES.contains(&n) => {
            return match n {
                1001 => ClientFrame::Ping,
                200 => match object.get("data").map(scalar) {
                    Some(Scalar::Str(id)) if valid_id(&id) => ClientFrame::Ack(id),
                    Some(Scalar::Int(id)) => ClientFrame::Ack(id.to_string()),
                    _ => ClientFrame::Ignored,
                },
                _ => ClientFrame::Ignored,
            };
        }
        Scalar::Int(n) => n.to_string(),
        Scalar::Str(s) => s,
        Scalar::Other => return ClientFrame::Invalid(Invalid::BadType),
    };
    let Some(raw_id) = object.get("id") else {
        return ClientFrame::Invalid(Invalid::NoId);
    };
    let id = match scalar(raw_id) {
        Scalar::Str(id) if valid_id(&id) => id,
        Scalar::Int(id) => id.to_string(),
        _ => return ClientFrame::Invalid(Invalid::BadId),
    };
    let dest = match object.get("dest").map(scalar) {
        Some(Scalar::Str(dest)) => Some(dest),
        _ => None,
    };
    ClientFrame::Data(DataMessage {
        id,
        id_json: raw_id.get().to_owned(),
        kind,
        dest,
        fields: object
            .0
            .into_iter()
            .map(|(k, v)| (k, v.get().to_owned()))
            .collect(),
    })
}

/// What Tornado's `write_message(dict)` writes: `json.dumps` with `</` escaped.
fn tornado(text: String) -> String {
    if text.contains("</") {
        text.replace("</", "<\\/")
    } else {
        text
    }
}

/// `{"type": 100, "data": ID}` for the message whose `id` field was `id_json`.
pub fn encode_got_it(id_json: &str) -> String {
    tornado(format!(
        "{{\"type\": 100, \"data\": {}}}",
        python_json(id_json)
    ))
}

/// `{"type": 300, "data": "ID"}`: the receiver acknowledged message `id`.
pub fn encode_delivered(id: &str) -> String {
    format!("{{\"type\": 300, \"data\": {}}}", python_string(id))
}

/// How a connection's mode treats inbox entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Messages stay until the receiver's 200; the sender gets a 300.
    Reliable,
    /// Messages count as delivered once written; no 300.
    Simple,
}

/// What one inbox entry becomes on a Bachata connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoded {
    /// A frame that waits for the client's 200 (reliable mode's data messages).
    AwaitAck(String),
    /// A frame that is acknowledged as soon as it is written (300 notices; simple mode's data
    /// messages).
    AckWhenWritten(String),
    /// Nothing to send: acknowledge the entry at once (read receipts; simple mode's receipts).
    Skip,
}

/// The fields of a stored inbox entry that matter here.
#[derive(Deserialize)]
struct Entry<'a> {
    push: &'a str,
    #[serde(default)]
    status: Option<&'a str>,
    #[serde(default)]
    id: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    ts: Option<u64>,
}

/// Encodes a chat inbox entry (`{"push":"message",...}` or `{"push":"receipt",...}`, see
/// `plaza_core::chat`) for a Bachata connection in `mode`.
///
/// A message sent from a Bachata socket is delivered as the object the sender wrote, with `from`
/// set to the sender. A message from elsewhere (a native client, the backend) becomes
/// `{"id": ID, "type": "message", "from": FROM, "dest": TO, "data": DATA, "time": TS}` (no
/// `from` for a message from the system).
pub fn encode_entry(entry: &str, mode: Mode) -> Encoded {
    let Ok(e) = serde_json::from_str::<Entry<'_>>(entry) else {
        return Encoded::Skip;
    };
    match (e.push, e.status, mode) {
        ("message", _, _) => {
            let frame = message_frame(&e);
            match mode {
                Mode::Reliable => Encoded::AwaitAck(frame),
                Mode::Simple => Encoded::AckWhenWritten(frame),
            }
        }
        ("receipt", Some("delivered"), Mode::Reliable) => {
            Encoded::AckWhenWritten(encode_delivered(&e.id))
        }
        _ => Encoded::Skip,
    }
}

fn message_frame(e: &Entry<'_>) -> String {
    if let Some(data) = e.data
        && let ClientFrame::Data(message) = decode(data.get())
        && message.id == e.id
    {
        return python_json(&message.stored(&e.from));
    }
    let mut out = format!("{{\"id\": {}, \"type\": \"message\"", python_string(&e.id));
    if !e.from.is_empty() {
        out.push_str(", \"from\": ");
        out.push_str(&python_string(&e.from));
    }
    if let Some(dest) = e.group.as_ref().or(e.to.as_ref()) {
        out.push_str(", \"dest\": ");
        out.push_str(&python_string(dest));
    }
    out.push_str(", \"data\": ");
    out.push_str(
        &e.data
            .map_or_else(|| "null".to_owned(), |d| python_json(d.get())),
    );
    if let Some(ts) = e.ts {
        out.push_str(&format!(", \"time\": {ts}"));
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(text: &str) -> DataMessage {
        match decode(text) {
            ClientFrame::Data(m) => m,
            other => panic!("not data: {other:?}"),
        }
    }

    #[test]
    fn transport_messages() {
        assert_eq!(decode(r#"{"type":1001}"#), ClientFrame::Ping);
        assert_eq!(
            decode(r#"{"type": 1001, "data": "x", "extra": 1}"#),
            ClientFrame::Ping
        );
        assert_eq!(
            decode(r#"{"type":200,"data":"m1"}"#),
            ClientFrame::Ack("m1".into())
        );
        assert_eq!(
            decode(r#"{"type":200,"data":7}"#),
            ClientFrame::Ack("7".into())
        );
        assert_eq!(decode(r#"{"type":200}"#), ClientFrame::Ignored);
        for t in [100, 300, 1002] {
            assert_eq!(
                decode(&format!(r#"{{"type":{t},"data":"m1"}}"#)),
                ClientFrame::Ignored
            );
        }
        assert_eq!(READY, r#"{"type": 1000}"#);
        assert_eq!(PONG, r#"{"type": 1002}"#);
        assert_eq!(encode_got_it(r#""m1""#), r#"{"type": 100, "data": "m1"}"#);
        assert_eq!(encode_got_it("5"), r#"{"type": 100, "data": 5}"#);
        assert_eq!(
            encode_got_it(r#""a</b""#),
            r#"{"type": 100, "data": "a<\/b"}"#
        );
        assert_eq!(encode_delivered("m1"), r#"{"type": 300, "data": "m1"}"#);
        assert_eq!(encode_delivered("é"), r#"{"type": 300, "data": "\u00e9"}"#);
    }

    #[test]
    fn invalid_messages() {
        for (text, why) in [
            ("not json", Invalid::NotJson),
            ("{", Invalid::NotJson),
            ("[1,2]", Invalid::NotAnObject),
            ("\"x\"", Invalid::NotAnObject),
            (r#"{"id":"m1","data":"x"}"#, Invalid::NoType),
            (r#"{"type":"text","dest":"B"}"#, Invalid::NoId),
            (r#"{"type":null,"id":"m1"}"#, Invalid::BadType),
            (r#"{"type":1.5,"id":"m1"}"#, Invalid::BadType),
            (r#"{"type":"text","id":""}"#, Invalid::BadId),
            (r#"{"type":"text","id":null}"#, Invalid::BadId),
            (r#"{"type":"text","id":{"a":1}}"#, Invalid::BadId),
        ] {
            assert_eq!(decode(text), ClientFrame::Invalid(why), "{text}");
        }
        let long = format!(r#"{{"type":"text","id":"{}"}}"#, "x".repeat(129));
        assert_eq!(decode(&long), ClientFrame::Invalid(Invalid::BadId));
    }

    #[test]
    fn data_messages() {
        let m = data(r#"{"id":"m1","type":"text","dest":"B","data":"hi"}"#);
        assert_eq!((m.id.as_str(), m.kind.as_str()), ("m1", "text"));
        assert_eq!(m.dest.as_deref(), Some("B"));
        assert_eq!(
            m.stored("A"),
            r#"{"id":"m1","type":"text","dest":"B","data":"hi","from":"A"}"#
        );
        // A spoofed `from` is overwritten in its place.
        let m = data(r#"{"from":"mallory","id":"m1","type":"text","dest":"B"}"#);
        assert_eq!(
            m.stored("A"),
            r#"{"from":"A","id":"m1","type":"text","dest":"B"}"#
        );
        // Integer types other than the transport ones are data (B12); a non-string dest is none.
        let m = data(r#"{"id":5,"type":7,"dest":5}"#);
        assert_eq!((m.id.as_str(), m.kind.as_str(), m.dest), ("5", "7", None));
        assert_eq!(m.id_json, "5");
        let m = data(r#"{"id":"x","type":1000,"dest":"B"}"#);
        assert_eq!(m.kind, "1000");
        // No dest: still a data message (it gets its 100).
        assert_eq!(data(r#"{"id":"x","type":"t"}"#).dest, None);
    }

    #[test]
    fn entries_become_frames() {
        let stored =
            data(r#"{"id":"m1","type":"text","dest":"B","data":"h\u00e9 </"}"#).stored("A");
        let entry =
            format!(r#"{{"push":"message","id":"m1","from":"A","to":"B","data":{stored},"ts":7}}"#);
        let frame =
            r#"{"id": "m1", "type": "text", "dest": "B", "data": "h\u00e9 </", "from": "A"}"#;
        assert_eq!(
            encode_entry(&entry, Mode::Reliable),
            Encoded::AwaitAck(frame.into())
        );
        assert_eq!(
            encode_entry(&entry, Mode::Simple),
            Encoded::AckWhenWritten(frame.into())
        );
        // A native client's message: wrapped.
        let entry = r#"{"push":"message","id":"n1","from":"carol","group":"team","data":{"text":"yo"},"ts":9}"#;
        assert_eq!(
            encode_entry(entry, Mode::Reliable),
            Encoded::AwaitAck(
                r#"{"id": "n1", "type": "message", "from": "carol", "dest": "team", "data": {"text": "yo"}, "time": 9}"#.into()
            )
        );
        // A data object whose `from` lies is corrected to the stored sender.
        let entry = r#"{"push":"message","id":"m2","from":"A","to":"B","data":{"id":"m2","type":"t","from":"Z"},"ts":1}"#;
        assert_eq!(
            encode_entry(entry, Mode::Reliable),
            Encoded::AwaitAck(r#"{"id": "m2", "type": "t", "from": "A"}"#.into())
        );
        let delivered =
            r#"{"push":"receipt","status":"delivered","id":"m1","by":"B","to":"B","ts":8}"#;
        assert_eq!(
            encode_entry(delivered, Mode::Reliable),
            Encoded::AckWhenWritten(r#"{"type": 300, "data": "m1"}"#.into())
        );
        assert_eq!(encode_entry(delivered, Mode::Simple), Encoded::Skip);
        let read = r#"{"push":"receipt","status":"read","id":"m1","by":"B","to":"B","ts":8}"#;
        assert_eq!(encode_entry(read, Mode::Reliable), Encoded::Skip);
        assert_eq!(encode_entry("garbage", Mode::Reliable), Encoded::Skip);
    }
}
