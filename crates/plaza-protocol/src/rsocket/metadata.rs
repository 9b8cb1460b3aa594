//! Composite metadata (`message/x.rsocket.composite-metadata.v0`) and routing metadata
//! (`message/x.rsocket.routing.v0`), the RSocket extensions the rsocket-py tutorial uses.
//!
//! Composite metadata is a sequence of entries, each:
//!
//! ```text
//! well-known:  1 | id (7 bits)                  | length (u24) | content
//! custom:      0 | mime length - 1 (7 bits) | mime (US-ASCII) | length (u24) | content
//! ```
//!
//! Routing metadata is a sequence of tags, each a u8 length then UTF-8 bytes. The tutorial puts
//! one tag, the route name, in a well-known routing entry (byte `0xFE`), and file names in a custom
//! `chat/file-name` entry.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use super::frame::{MAX_METADATA_LEN, put_u24};

/// Metadata mime type of a composite metadata SETUP.
pub const COMPOSITE_METADATA_MIME: &str = "message/x.rsocket.composite-metadata.v0";
/// Mime type of a routing entry.
pub const ROUTING_MIME: &str = "message/x.rsocket.routing.v0";
/// Well-known id of [`ROUTING_MIME`].
pub const ROUTING_ID: u8 = 0x7E;
/// Longest custom mime type in a composite entry.
pub const MAX_CUSTOM_MIME_LEN: usize = 128;

/// The well-known mime types and their ids (RSocket extension "WellKnownMimeTypes").
const WELL_KNOWN: &[(u8, &str)] = &[
    (0x00, "application/avro"),
    (0x01, "application/cbor"),
    (0x02, "application/graphql"),
    (0x03, "application/gzip"),
    (0x04, "application/javascript"),
    (0x05, "application/json"),
    (0x06, "application/octet-stream"),
    (0x07, "application/pdf"),
    (0x08, "application/vnd.apache.thrift.binary"),
    (0x09, "application/vnd.google.protobuf"),
    (0x0A, "application/xml"),
    (0x0B, "application/zip"),
    (0x0C, "audio/aac"),
    (0x0D, "audio/mp3"),
    (0x0E, "audio/mp4"),
    (0x0F, "audio/mpeg3"),
    (0x10, "audio/mpeg"),
    (0x11, "audio/ogg"),
    (0x12, "audio/opus"),
    (0x13, "audio/vorbis"),
    (0x14, "image/bmp"),
    (0x15, "image/gif"),
    (0x16, "image/heic-sequence"),
    (0x17, "image/heic"),
    (0x18, "image/heif-sequence"),
    (0x19, "image/heif"),
    (0x1A, "image/jpeg"),
    (0x1B, "image/png"),
    (0x1C, "image/tiff"),
    (0x1D, "multipart/mixed"),
    (0x1E, "text/css"),
    (0x1F, "text/csv"),
    (0x20, "text/html"),
    (0x21, "text/plain"),
    (0x22, "text/xml"),
    (0x23, "video/H264"),
    (0x24, "video/H265"),
    (0x25, "video/VP8"),
    (0x26, "application/x-hessian"),
    (0x27, "application/x-java-object"),
    (0x28, "application/cloudevents+json"),
    (0x7A, "message/x.rsocket.mime-type.v0"),
    (0x7B, "message/x.rsocket.accept-mime-types.v0"),
    (0x7C, "message/x.rsocket.authentication.v0"),
    (0x7D, "message/x.rsocket.tracing-zipkin.v0"),
    (0x7E, ROUTING_MIME),
    (0x7F, COMPOSITE_METADATA_MIME),
];

/// Name of a well-known mime id, `None` for reserved ids.
pub fn well_known_name(id: u8) -> Option<&'static str> {
    WELL_KNOWN.iter().find(|(i, _)| *i == id).map(|(_, n)| *n)
}

/// Id of a well-known mime name.
pub fn well_known_id(name: &str) -> Option<u8> {
    WELL_KNOWN.iter().find(|(_, n)| *n == name).map(|(i, _)| *i)
}

/// An entry's mime type: a well-known id (7 bits, possibly one this table does not name) or a
/// custom US-ASCII string of 1 to 128 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MimeType {
    WellKnown(u8),
    Custom(String),
}

impl MimeType {
    /// The routing mime type, as rsocket-py sends it.
    pub const ROUTING: MimeType = MimeType::WellKnown(ROUTING_ID);

    /// The shortest encoding of `name`: its well-known id if it has one (as rsocket-py encodes),
    /// a custom string otherwise.
    pub fn from_name(name: &str) -> MimeType {
        well_known_id(name).map_or_else(|| MimeType::Custom(name.to_owned()), MimeType::WellKnown)
    }

    /// The mime type's name; `None` for a reserved well-known id.
    pub fn name(&self) -> Option<&str> {
        match self {
            MimeType::WellKnown(id) => well_known_name(*id),
            MimeType::Custom(name) => Some(name),
        }
    }

    /// Whether this is `name`, whichever encoding was used.
    pub fn is(&self, name: &str) -> bool {
        self.name() == Some(name)
    }
}

/// One composite metadata entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataEntry {
    pub mime: MimeType,
    pub content: Bytes,
}

/// Decoded composite metadata, entries in wire order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompositeMetadata {
    pub entries: Vec<MetadataEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MetadataError {
    #[error("composite metadata truncated")]
    Truncated,
    #[error("custom mime type is not US-ASCII")]
    MimeNotAscii,
    #[error("custom mime type must be 1 to 128 bytes, not {0}")]
    BadMimeLength(usize),
    #[error("well-known mime id {0:#x} out of range")]
    BadWellKnownId(u8),
    #[error("metadata entry too long: {0} bytes")]
    EntryTooLong(usize),
    #[error("routing metadata truncated")]
    RoutingTruncated,
    #[error("routing tag is not UTF-8")]
    TagNotUtf8,
    #[error("routing tag too long: {0} bytes (max 255)")]
    TagTooLong(usize),
    #[error("no routing metadata")]
    NoRoute,
}

impl CompositeMetadata {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an entry (builder style).
    pub fn with(mut self, mime: MimeType, content: impl Into<Bytes>) -> Self {
        self.entries.push(MetadataEntry {
            mime,
            content: content.into(),
        });
        self
    }

    /// Adds a routing entry with the given tags (builder style).
    pub fn with_route(self, tags: &[&str]) -> Result<Self, MetadataError> {
        let content = encode_routing(tags)?;
        Ok(self.with(MimeType::ROUTING, content))
    }

    /// Decodes composite metadata. Entry contents share `buf`'s allocation.
    pub fn decode(buf: &Bytes) -> Result<Self, MetadataError> {
        let mut buf = buf.clone();
        let mut entries = Vec::new();
        while buf.has_remaining() {
            let first = buf.get_u8();
            let mime = if first & 0x80 != 0 {
                MimeType::WellKnown(first & 0x7F)
            } else {
                let len = usize::from(first) + 1;
                if buf.remaining() < len {
                    return Err(MetadataError::Truncated);
                }
                let raw = buf.split_to(len);
                if !raw.is_ascii() {
                    return Err(MetadataError::MimeNotAscii);
                }
                MimeType::Custom(String::from_utf8_lossy(&raw).into_owned())
            };
            if buf.remaining() < 3 {
                return Err(MetadataError::Truncated);
            }
            let len = usize::from(buf.get_u8()) << 16 | usize::from(buf.get_u16());
            if buf.remaining() < len {
                return Err(MetadataError::Truncated);
            }
            entries.push(MetadataEntry {
                mime,
                content: buf.split_to(len),
            });
        }
        Ok(Self { entries })
    }

    /// Appends the encoding to `out`; on error nothing is written.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), MetadataError> {
        let mut len = 0;
        for e in &self.entries {
            len += match &e.mime {
                MimeType::WellKnown(id) if *id > 0x7F => {
                    return Err(MetadataError::BadWellKnownId(*id));
                }
                MimeType::WellKnown(_) => 1,
                MimeType::Custom(name) => {
                    if name.is_empty() || name.len() > MAX_CUSTOM_MIME_LEN {
                        return Err(MetadataError::BadMimeLength(name.len()));
                    }
                    if !name.is_ascii() {
                        return Err(MetadataError::MimeNotAscii);
                    }
                    1 + name.len()
                }
            };
            if e.content.len() > MAX_METADATA_LEN {
                return Err(MetadataError::EntryTooLong(e.content.len()));
            }
            len += 3 + e.content.len();
        }
        out.reserve(len);
        for e in &self.entries {
            match &e.mime {
                MimeType::WellKnown(id) => out.put_u8(0x80 | id),
                MimeType::Custom(name) => {
                    out.put_u8((name.len() - 1) as u8);
                    out.put_slice(name.as_bytes());
                }
            }
            put_u24(out, e.content.len());
            out.put_slice(&e.content);
        }
        Ok(())
    }

    pub fn to_bytes(&self) -> Result<Bytes, MetadataError> {
        let mut out = BytesMut::new();
        self.encode(&mut out)?;
        Ok(out.freeze())
    }

    /// The first entry of mime type `name` (well-known or custom encoding).
    pub fn find(&self, name: &str) -> Option<&MetadataEntry> {
        self.entries.iter().find(|e| e.mime.is(name))
    }

    /// Tags of the first routing entry, `None` without one.
    pub fn routing_tags(&self) -> Option<Result<Vec<String>, MetadataError>> {
        self.find(ROUTING_MIME).map(|e| decode_routing(&e.content))
    }

    /// The route: the first tag of the first routing entry, as rsocket-py's router reads it.
    /// [`MetadataError::NoRoute`] without a routing entry or with an empty one.
    pub fn route(&self) -> Result<String, MetadataError> {
        let tags = self.routing_tags().ok_or(MetadataError::NoRoute)??;
        tags.into_iter().next().ok_or(MetadataError::NoRoute)
    }
}

/// Decodes routing metadata content into its tags.
pub fn decode_routing(content: &[u8]) -> Result<Vec<String>, MetadataError> {
    let mut tags = Vec::new();
    let mut rest = content;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len);
        if tail.len() < len {
            return Err(MetadataError::RoutingTruncated);
        }
        let (tag, tail) = tail.split_at(len);
        tags.push(
            std::str::from_utf8(tag)
                .map_err(|_| MetadataError::TagNotUtf8)?
                .to_owned(),
        );
        rest = tail;
    }
    Ok(tags)
}

/// Encodes tags as routing metadata content.
pub fn encode_routing<S: AsRef<str>>(tags: &[S]) -> Result<Bytes, MetadataError> {
    let mut out = BytesMut::new();
    for tag in tags {
        let tag = tag.as_ref();
        if tag.len() > 255 {
            return Err(MetadataError::TagTooLong(tag.len()));
        }
        out.put_u8(tag.len() as u8);
        out.put_slice(tag.as_bytes());
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn routing_and_custom_entries() {
        // route("file.upload") then the custom mime chat/file-name ("byte holds length - 1").
        let mut wire = vec![0xFE, 0, 0, 12, 11];
        wire.extend(b"file.upload");
        wire.push(13);
        wire.extend(b"chat/file-name");
        wire.extend([0, 0, 15]);
        wire.extend(b"file_name_1.txt");
        let wire = Bytes::from(wire);
        let md = CompositeMetadata::decode(&wire).unwrap();
        assert_eq!(md.route().unwrap(), "file.upload");
        assert_eq!(
            md.find("chat/file-name").unwrap().content,
            "file_name_1.txt"
        );
        assert_eq!(
            md.entries[1].mime,
            MimeType::Custom("chat/file-name".into())
        );
        let built = CompositeMetadata::new()
            .with_route(&["file.upload"])
            .unwrap()
            .with(MimeType::from_name("chat/file-name"), "file_name_1.txt");
        assert_eq!(built.to_bytes().unwrap(), wire);
    }

    #[test]
    fn well_known_names_match_either_encoding() {
        assert_eq!(MimeType::from_name(ROUTING_MIME), MimeType::ROUTING);
        assert!(MimeType::Custom(ROUTING_MIME.into()).is(ROUTING_MIME));
        let md = CompositeMetadata::new().with(
            MimeType::Custom(ROUTING_MIME.into()),
            encode_routing(&["x"]).unwrap(),
        );
        assert_eq!(md.route().unwrap(), "x");
        assert_eq!(MimeType::WellKnown(0x50).name(), None);
    }

    #[test]
    fn errors() {
        assert_eq!(
            CompositeMetadata::new().route(),
            Err(MetadataError::NoRoute)
        );
        let empty_route = CompositeMetadata::new().with(MimeType::ROUTING, Bytes::new());
        assert_eq!(empty_route.route(), Err(MetadataError::NoRoute));
        assert_eq!(
            CompositeMetadata::decode(&Bytes::from_static(&[0xFE, 0, 0])),
            Err(MetadataError::Truncated)
        );
        assert_eq!(
            CompositeMetadata::decode(&Bytes::from_static(&[0xFE, 0, 0, 2, 1])),
            Err(MetadataError::Truncated)
        );
        assert_eq!(
            CompositeMetadata::decode(&Bytes::from_static(&[0x01, b'a'])),
            Err(MetadataError::Truncated)
        );
        assert_eq!(
            CompositeMetadata::decode(&Bytes::from_static(&[0x00, 0xC3, 0, 0, 0])),
            Err(MetadataError::MimeNotAscii)
        );
        assert_eq!(
            decode_routing(&[3, b'a']),
            Err(MetadataError::RoutingTruncated)
        );
        assert_eq!(decode_routing(&[1, 0xFF]), Err(MetadataError::TagNotUtf8));
        assert_eq!(
            encode_routing(&["x".repeat(256)]),
            Err(MetadataError::TagTooLong(256))
        );
        let bad = CompositeMetadata::new().with(MimeType::Custom(String::new()), Bytes::new());
        assert_eq!(bad.to_bytes(), Err(MetadataError::BadMimeLength(0)));
        let bad = CompositeMetadata::new().with(MimeType::WellKnown(0x80), Bytes::new());
        assert_eq!(bad.to_bytes(), Err(MetadataError::BadWellKnownId(0x80)));
    }
}
