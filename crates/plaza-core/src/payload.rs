//! Publication data: any JSON value, kept as its validated text so it is parsed once on the way in
//! and copied verbatim into every frame on the way out.

use bytes::Bytes;

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
        Ok(Self(bytes))
    }

    /// Wraps text that a JSON parser already accepted as one value (a `RawValue`).
    pub fn from_raw(raw: &serde_json::value::RawValue) -> Self {
        Self(Bytes::copy_from_slice(raw.get().as_bytes()))
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
        for bad in ["", "{", "1 2", "nul", "\u{0}"] {
            assert!(Payload::from_json_text(bad).is_err(), "{bad}");
        }
    }
}
