//! High-templar rooms: a room is a JSON object, and the app's bootstrap answer lists the rooms a
//! connection may join, where the string `"*"` stands for any value of a key.
//!
//! - Identity: two rooms are the same room when their canonical JSON is equal (keys sorted at
//!   every depth), so key order does not matter but types do: `"1"`, `1` and `1.0` are three
//!   rooms.
//! - Permission ([`Room::admits`]): an allowed room A admits a requested room R when R equals A,
//!   or when A and R have exactly the same keys and, for every key, the values are equal or A's
//!   value is the string `"*"`. A requested `"*"` is therefore admitted only by an allowed `"*"`.
//! - Delivery is by identity only: `*` means nothing when a trigger names rooms.

use std::sync::Arc;

use serde_json::{Map, Value};

/// One room: its fields and its canonical text (the identity, shared).
#[derive(Debug, Clone)]
pub struct Room {
    fields: Map<String, Value>,
    key: Arc<str>,
}

impl PartialEq for Room {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for Room {}

impl Room {
    /// A room from a JSON value; `None` unless it is an object.
    pub fn from_value(value: Value) -> Option<Self> {
        match value {
            Value::Object(fields) => Some(Self::from_fields(fields)),
            _ => None,
        }
    }

    pub fn from_fields(fields: Map<String, Value>) -> Self {
        let mut key = String::new();
        write_object(&fields, &mut key);
        Self {
            fields,
            key: Arc::from(key),
        }
    }

    /// The canonical JSON text: the room's identity.
    pub fn key(&self) -> &Arc<str> {
        &self.key
    }

    pub fn fields(&self) -> &Map<String, Value> {
        &self.fields
    }

    /// Whether this allowed room lets a connection join `requested`.
    pub fn admits(&self, requested: &Room) -> bool {
        if self.key == requested.key {
            return true;
        }
        self.fields.len() == requested.fields.len()
            && self.fields.iter().all(|(name, allowed)| {
                requested
                    .fields
                    .get(name)
                    .is_some_and(|value| allowed.as_str() == Some("*") || same(allowed, value))
            })
    }
}

/// Whether any room of `allowed` admits `requested`.
pub fn admitted(allowed: &[Room], requested: &Room) -> bool {
    allowed.iter().any(|a| a.admits(requested))
}

/// JSON equality with objects compared by canonical text (order-free, types strict).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(_), Value::Object(_)) | (Value::Array(_), Value::Array(_)) => {
            canonical(a) == canonical(b)
        }
        _ => a == b,
    }
}

/// The canonical JSON text of a value: no whitespace, object keys sorted at every depth,
/// numbers as serde_json prints them.
pub fn canonical(value: &Value) -> String {
    let mut out = String::new();
    write_value(value, &mut out);
    out
}

fn write_value(value: &Value, out: &mut String) {
    match value {
        Value::Object(fields) => write_object(fields, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(item, out);
            }
            out.push(']');
        }
        // Scalars: serde_json's own text (strings escaped, numbers normalised).
        other => out.push_str(&other.to_string()),
    }
}

fn write_object(fields: &Map<String, Value>, out: &mut String) {
    let mut names: Vec<&String> = fields.keys().collect();
    names.sort_unstable();
    out.push('{');
    for (i, name) in names.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&Value::String(name.clone()).to_string());
        out.push(':');
        if let Some(value) = fields.get(name) {
            write_value(value, out);
        }
    }
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn room(v: Value) -> Room {
        Room::from_value(v).unwrap()
    }

    #[test]
    fn identity_ignores_key_order_but_not_types() {
        assert_eq!(
            room(json!({"a": 1, "b": "x"})),
            room(json!({"b": "x", "a": 1}))
        );
        assert_eq!(
            room(json!({"n": {"y": 1, "x": [1, {"q": 2, "p": 1}]}}))
                .key()
                .as_ref(),
            r#"{"n":{"x":[1,{"p":1,"q":2}],"y":1}}"#
        );
        let rooms = [json!({"c": "1"}), json!({"c": 1}), json!({"c": 1.0})];
        for (i, a) in rooms.iter().enumerate() {
            for (j, b) in rooms.iter().enumerate() {
                assert_eq!(room(a.clone()) == room(b.clone()), i == j, "{a} {b}");
            }
        }
        assert!(Room::from_value(json!("foo")).is_none());
        assert!(Room::from_value(json!([])).is_none());
    }

    #[test]
    fn star_permission() {
        // H13
        let allowed = room(json!({"t": "x", "a": "*", "b": "*"}));
        assert!(allowed.admits(&room(json!({"t": "x", "a": 1, "b": "*"}))));
        assert!(allowed.admits(&room(json!({"b": "*", "a": "*", "t": "x"}))));
        assert!(!allowed.admits(&room(json!({"t": "x", "a": 1}))));
        assert!(!allowed.admits(&room(json!({"t": "y", "a": 1, "b": 2}))));
        assert!(!allowed.admits(&room(json!({"t": "x", "a": 1, "b": 2, "c": 3}))));
        // H14: types matter.
        let allowed = room(json!({"t": "m", "c": "1"}));
        assert!(!allowed.admits(&room(json!({"t": "m", "c": 1}))));
        assert!(allowed.admits(&room(json!({"c": "1", "t": "m"}))));
        // A requested `*` only where the allowed room has `*`.
        assert!(!allowed.admits(&room(json!({"t": "m", "c": "*"}))));
        // Missing key in the request.
        let allowed = room(json!({"target": "message", "customer": "1"}));
        assert!(!allowed.admits(&room(json!({"target": "message"}))));
        // Nested values compare by content.
        let allowed = room(json!({"n": {"a": 1, "b": 2}}));
        assert!(allowed.admits(&room(json!({"n": {"b": 2, "a": 1}}))));
        assert!(admitted(
            &[room(json!({"x": 1})), room(json!({"c": "*"}))],
            &room(json!({"c": 5}))
        ));
        assert!(!admitted(&[], &room(json!({}))));
        assert!(admitted(&[room(json!({}))], &room(json!({}))));
    }
}
