//! Publication data: any JSON value, kept as its validated text so it is parsed once on the way in
//! and copied verbatim into every frame on the way out.
//!
//! The one change made to the text: a raw line feed (which valid JSON can only hold as
//! whitespace between tokens, never inside a string) becomes a space. So no frame that embeds a
//! payload contains a raw `\n`, and the native protocol can join several JSON objects in one
//! WebSocket message, one per line (docs/PROTOCOL.md, "Frames").

use bytes::Bytes;

/// `s` as a JSON string literal (quoted and escaped), for frames assembled from parts.
pub fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// JSON text known to be one valid JSON value.
#[derive(Clone, PartialEq, Eq)]
pub struct Payload(Bytes);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("data is not valid JSON: {0}")]
    Invalid(String),
}

impl Payload {
    /// Validates `text` as exactly one JSON value.
    pub fn from_json_text(text: impl Into<Bytes>) -> Result<Self, PayloadError> {
        let bytes = text.into();
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
            .map_err(|e| PayloadError::Invalid(e.to_string()))?;
        Ok(Self(without_line_feeds(bytes)))
    }

    /// Wraps text that a JSON parser already accepted as one value (a `RawValue`).
    pub fn from_raw(raw: &serde_json::value::RawValue) -> Self {
        Self(without_line_feeds(Bytes::copy_from_slice(
            raw.get().as_bytes(),
        )))
    }

    /// Wraps JSON text the server assembled from parts that are themselves valid JSON (a stored
    /// chat entry, say), without parsing it again. Checked in debug builds.
    pub fn from_trusted(text: String) -> Self {
        debug_assert!(
            serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok(),
            "not JSON: {text}"
        );
        Self(Bytes::from(text))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The JSON text. Valid UTF-8 by construction.
    pub fn as_str(&self) -> &str {
        // Both constructors only accept text that a JSON parser read as UTF-8.
        std::str::from_utf8(&self.0).unwrap_or("null")
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Valid JSON with every raw line feed replaced by a space: the same value, on one line.
fn without_line_feeds(bytes: Bytes) -> Bytes {
    if !bytes.contains(&b'\n') {
        return bytes;
    }
    let mut v = bytes.to_vec();
    for b in &mut v {
        if *b == b'\n' {
            *b = b' ';
        }
    }
    Bytes::from(v)
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Payload({})", self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_any_single_json_value() {
        for ok in ["1", "\"x\"", "{\"a\":[1,2]}", "null", " true "] {
            assert!(Payload::from_json_text(ok).is_ok(), "{ok}");
        }
        for bad in ["", "{", "1 2", "nul", "\u{0}", "\"a\nb\""] {
            assert!(Payload::from_json_text(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn raw_line_feeds_become_spaces() {
        // Pretty-printed JSON: line feeds between tokens; an escaped one inside a string stays.
        let text = "{\n  \"a\": [1,\n 2],\r\n  \"s\": \"x\\ny\"\n}\n";
        let p = Payload::from_json_text(text).unwrap();
        assert_eq!(p.as_str(), "{   \"a\": [1,  2],\r   \"s\": \"x\\ny\" } ");
        assert!(!p.as_bytes().contains(&b'\n'));
        let same: serde_json::Value = serde_json::from_str(p.as_str()).unwrap();
        assert_eq!(
            same,
            serde_json::from_str::<serde_json::Value>(text).unwrap()
        );
        let raw: Box<serde_json::value::RawValue> = serde_json::from_str(text).unwrap();
        assert_eq!(Payload::from_raw(&raw).as_str(), p.as_str().trim_end());
        // Without a line feed the text is kept as it is (no copy).
        let plain = Bytes::from_static(b"{ \"a\" : 1 }");
        assert_eq!(
            Payload::from_json_text(plain.clone())
                .unwrap()
                .as_bytes()
                .as_ptr(),
            plain.as_ptr()
        );
    }
}
