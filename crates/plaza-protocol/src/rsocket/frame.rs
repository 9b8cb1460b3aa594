//! RSocket 1.0 frames: [`Frame`] and its byte codec ([`Frame::decode`], [`Frame::encode`]).
//!
//! A frame here is the bytes *after* any transport framing: a WebSocket binary message holds
//! exactly one, a TCP connection prefixes each with a 24-bit length (see
//! [`framing`](super::framing)). The layout is the 1.0 specification's:
//!
//! ```text
//! stream id (u32, top bit reserved) | type (6 bits) | flags (10 bits: I M F/R C/L N ...) | body
//! ```
//!
//! Decoding never panics: every read is bounds-checked and reports a [`FrameError`]. Decoding is
//! structural: it does not judge whether a frame is acceptable at this point of a connection (a
//! REQUEST_N of 0, a SETUP with the lease flag); the session decides, and
//! [`Setup::unsupported`] and [`FrameError::error_code`] give it the error code to answer with.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Largest stream id (31 bits).
pub const MAX_STREAM_ID: u32 = 0x7FFF_FFFF;
/// Largest request count (31 bits). As an initial or added credit it means "unbounded".
pub const MAX_REQUEST_N: u32 = 0x7FFF_FFFF;
/// Largest metadata that a length-prefixed metadata field can carry (24 bits).
pub const MAX_METADATA_LEN: usize = 0xFF_FFFF;
/// Largest keepalive position (63 bits).
pub const MAX_POSITION: u64 = 0x7FFF_FFFF_FFFF_FFFF;
/// Length of the frame header (stream id, type and flags).
pub const HEADER_LEN: usize = 6;

const MASK_31: u32 = 0x7FFF_FFFF;

/// Flag bits, as they sit in the low 10 bits of the type-and-flags u16.
pub mod flags {
    /// Ignore the frame if not understood.
    pub const IGNORE: u16 = 0x200;
    /// Metadata present.
    pub const METADATA: u16 = 0x100;
    /// More fragments follow (requests and PAYLOAD).
    pub const FOLLOWS: u16 = 0x80;
    /// SETUP: client requests resume.
    pub const RESUME: u16 = 0x80;
    /// KEEPALIVE: respond with a KEEPALIVE.
    pub const RESPOND: u16 = 0x80;
    /// PAYLOAD and REQUEST_CHANNEL: the stream completes.
    pub const COMPLETE: u16 = 0x40;
    /// SETUP: client will honour LEASE.
    pub const LEASE: u16 = 0x40;
    /// PAYLOAD: carries a payload (onNext).
    pub const NEXT: u16 = 0x20;
}

/// The frame types of RSocket 1.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    Setup = 0x01,
    Lease = 0x02,
    Keepalive = 0x03,
    RequestResponse = 0x04,
    RequestFnf = 0x05,
    RequestStream = 0x06,
    RequestChannel = 0x07,
    RequestN = 0x08,
    Cancel = 0x09,
    Payload = 0x0A,
    Error = 0x0B,
    MetadataPush = 0x0C,
    Resume = 0x0D,
    ResumeOk = 0x0E,
    Ext = 0x3F,
}

impl FrameType {
    /// The type for a 6-bit type id, `None` for reserved ids.
    pub fn from_id(id: u8) -> Option<Self> {
        Some(match id {
            0x01 => Self::Setup,
            0x02 => Self::Lease,
            0x03 => Self::Keepalive,
            0x04 => Self::RequestResponse,
            0x05 => Self::RequestFnf,
            0x06 => Self::RequestStream,
            0x07 => Self::RequestChannel,
            0x08 => Self::RequestN,
            0x09 => Self::Cancel,
            0x0A => Self::Payload,
            0x0B => Self::Error,
            0x0C => Self::MetadataPush,
            0x0D => Self::Resume,
            0x0E => Self::ResumeOk,
            0x3F => Self::Ext,
            _ => return None,
        })
    }

    /// SETUP, LEASE, KEEPALIVE, METADATA_PUSH, RESUME and RESUME_OK: always on stream 0.
    pub fn is_connection_level(self) -> bool {
        matches!(
            self,
            Self::Setup
                | Self::Lease
                | Self::Keepalive
                | Self::MetadataPush
                | Self::Resume
                | Self::ResumeOk
        )
    }
}

/// An ERROR frame's code. Any u32 decodes; the named constants are the specification's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// Connection: the SETUP frame is invalid for the server.
    pub const INVALID_SETUP: Self = Self(0x001);
    /// Connection: some SETUP parameters are not supported (lease, resume, version).
    pub const UNSUPPORTED_SETUP: Self = Self(0x002);
    /// Connection: the server rejected the SETUP.
    pub const REJECTED_SETUP: Self = Self(0x003);
    /// Connection: the server rejected the RESUME.
    pub const REJECTED_RESUME: Self = Self(0x004);
    /// Connection: the connection is being terminated.
    pub const CONNECTION_ERROR: Self = Self(0x101);
    /// Connection: the connection is being closed cleanly.
    pub const CONNECTION_CLOSE: Self = Self(0x102);
    /// Stream: application layer logic failed (the handler's error).
    pub const APPLICATION_ERROR: Self = Self(0x201);
    /// Stream: the responder rejected the request before processing it.
    pub const REJECTED: Self = Self(0x202);
    /// Stream: the responder cancelled the request.
    pub const CANCELED: Self = Self(0x203);
    /// Stream: the request is invalid.
    pub const INVALID: Self = Self(0x204);

    /// Whether the code is one the specification allows on stream 0 only.
    pub fn is_connection_level(self) -> bool {
        matches!(self.0, 0x001..=0x004 | 0x101 | 0x102)
    }
}

/// Metadata and data of a request or PAYLOAD. `metadata` is `Some` when the M flag is set, even
/// if empty (the flag and an empty field are distinct on the wire).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Payload {
    pub metadata: Option<Bytes>,
    pub data: Bytes,
}

impl Payload {
    pub fn new(metadata: Option<Bytes>, data: Bytes) -> Self {
        Self { metadata, data }
    }

    /// A payload with data only.
    pub fn data(data: impl Into<Bytes>) -> Self {
        Self {
            metadata: None,
            data: data.into(),
        }
    }

    /// Metadata plus data length.
    pub fn len(&self) -> usize {
        self.metadata.as_ref().map_or(0, Bytes::len) + self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A SETUP frame (stream 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    pub major_version: u16,
    pub minor_version: u16,
    /// Time between KEEPALIVE frames the client sends, in milliseconds (31 bits).
    pub keepalive_ms: u32,
    /// Time after which the client considers the server dead without a KEEPALIVE (31 bits).
    pub max_lifetime_ms: u32,
    /// The L flag: the client will honour LEASE.
    pub lease: bool,
    /// The R flag with its resume identification token.
    pub resume_token: Option<Bytes>,
    pub metadata_mime: String,
    pub data_mime: String,
    pub payload: Payload,
}

impl Setup {
    /// Why this server cannot accept the SETUP, as the code and message of the connection ERROR
    /// to send, or `None` if it is acceptable as far as the frame itself goes (the session still
    /// checks the mime types it supports). Lease, resume and major versions other than 1 give
    /// UNSUPPORTED_SETUP; zero keepalive or lifetime give INVALID_SETUP.
    pub fn unsupported(&self) -> Option<(ErrorCode, &'static str)> {
        if self.major_version != 1 {
            Some((ErrorCode::UNSUPPORTED_SETUP, "unsupported protocol version"))
        } else if self.lease {
            Some((ErrorCode::UNSUPPORTED_SETUP, "lease is not supported"))
        } else if self.resume_token.is_some() {
            Some((ErrorCode::UNSUPPORTED_SETUP, "resume is not supported"))
        } else if self.keepalive_ms == 0 || self.max_lifetime_ms == 0 {
            Some((
                ErrorCode::INVALID_SETUP,
                "keepalive and lifetime must be positive",
            ))
        } else {
            None
        }
    }
}

/// One RSocket frame. Connection-level variants (SETUP, LEASE, KEEPALIVE, METADATA_PUSH, RESUME,
/// RESUME_OK) always sit on stream 0 and carry no stream id; the others carry theirs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Setup(Setup),
    Lease {
        ttl_ms: u32,
        number_of_requests: u32,
        /// LEASE metadata runs to the end of the frame (no length field).
        metadata: Option<Bytes>,
    },
    Keepalive {
        /// The R flag: the receiver must answer with a KEEPALIVE carrying the same data.
        respond: bool,
        last_received_position: u64,
        data: Bytes,
    },
    RequestResponse {
        stream_id: u32,
        follows: bool,
        payload: Payload,
    },
    RequestFnf {
        stream_id: u32,
        follows: bool,
        payload: Payload,
    },
    RequestStream {
        stream_id: u32,
        follows: bool,
        initial_n: u32,
        payload: Payload,
    },
    RequestChannel {
        stream_id: u32,
        follows: bool,
        /// The requester's side of the channel is already complete.
        complete: bool,
        initial_n: u32,
        payload: Payload,
    },
    RequestN {
        stream_id: u32,
        n: u32,
    },
    Cancel {
        stream_id: u32,
    },
    Payload {
        stream_id: u32,
        follows: bool,
        complete: bool,
        next: bool,
        payload: Payload,
    },
    Error {
        /// 0 for a connection error.
        stream_id: u32,
        code: ErrorCode,
        /// UTF-8 message, per the specification (kept as bytes).
        data: Bytes,
    },
    MetadataPush {
        /// Runs to the end of the frame (no length field).
        metadata: Bytes,
    },
    Resume {
        major_version: u16,
        minor_version: u16,
        token: Bytes,
        last_received_server_position: u64,
        first_available_client_position: u64,
    },
    ResumeOk {
        last_received_client_position: u64,
    },
    Ext {
        stream_id: u32,
        /// The I flag: a receiver that does not understand the extension ignores the frame.
        ignore: bool,
        /// The M flag, kept as is: the body's layout depends on the extended type.
        metadata_flag: bool,
        extended_type: u32,
        body: Bytes,
    },
}

/// Why bytes are not a frame, or a frame cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("frame too short: {len} bytes")]
    TooShort { len: usize },
    #[error("{frame_type:?} frame truncated")]
    Truncated { frame_type: FrameType },
    #[error("unknown frame type {frame_type:#04x}")]
    UnknownFrameType {
        frame_type: u8,
        /// The I flag was set: the receiver should ignore the frame rather than fail.
        ignore: bool,
    },
    #[error("{frame_type:?} frame must be on stream 0, not {stream_id}")]
    ConnectionFrameOnStream {
        frame_type: FrameType,
        stream_id: u32,
    },
    #[error("{frame_type:?} frame must not be on stream 0")]
    StreamFrameOnConnection { frame_type: FrameType },
    #[error("METADATA_PUSH without the metadata flag")]
    MetadataPushWithoutMetadata,
    #[error("mime type is not UTF-8")]
    MimeNotUtf8,
    #[error("{what} too long: {len} bytes (max {max})")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} out of range: {value}")]
    OutOfRange { what: &'static str, value: u64 },
}

impl FrameError {
    /// The connection ERROR code to answer a frame that failed to decode with: INVALID_SETUP for
    /// a malformed SETUP, CONNECTION_ERROR otherwise.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            Self::Truncated {
                frame_type: FrameType::Setup,
            }
            | Self::MimeNotUtf8 => ErrorCode::INVALID_SETUP,
            Self::ConnectionFrameOnStream {
                frame_type: FrameType::Setup,
                ..
            } => ErrorCode::INVALID_SETUP,
            _ => ErrorCode::CONNECTION_ERROR,
        }
    }

    /// The frame had the I flag and an unknown type, so the receiver should drop it silently.
    pub fn is_ignorable(&self) -> bool {
        matches!(self, Self::UnknownFrameType { ignore: true, .. })
    }
}

/// Bounds-checked reader over a frame's body.
struct Reader {
    buf: Bytes,
    frame_type: FrameType,
}

impl Reader {
    fn truncated(&self) -> FrameError {
        FrameError::Truncated {
            frame_type: self.frame_type,
        }
    }

    fn need(&self, n: usize) -> Result<(), FrameError> {
        if self.buf.remaining() < n {
            Err(self.truncated())
        } else {
            Ok(())
        }
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }

    fn u24(&mut self) -> Result<usize, FrameError> {
        self.need(3)?;
        let hi = usize::from(self.buf.get_u8());
        let lo = usize::from(self.buf.get_u16());
        Ok(hi << 16 | lo)
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }

    fn bytes(&mut self, n: usize) -> Result<Bytes, FrameError> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }

    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    fn string(&mut self, n: usize) -> Result<String, FrameError> {
        let raw = self.bytes(n)?;
        String::from_utf8(raw.to_vec()).map_err(|_| FrameError::MimeNotUtf8)
    }

    /// Metadata with its 24-bit length (when `present`), then data to the end of the frame.
    fn payload(&mut self, present: bool) -> Result<Payload, FrameError> {
        let metadata = if present {
            let len = self.u24()?;
            Some(self.bytes(len)?)
        } else {
            None
        };
        Ok(Payload {
            metadata,
            data: self.rest(),
        })
    }
}

impl Frame {
    /// Decodes one frame from exactly its bytes (no transport length prefix). `Bytes` in the
    /// result share `buf`'s allocation.
    pub fn decode(buf: Bytes) -> Result<Frame, FrameError> {
        let len = buf.len();
        if len < HEADER_LEN {
            return Err(FrameError::TooShort { len });
        }
        let mut buf = buf;
        let stream_id = buf.get_u32() & MASK_31;
        let type_and_flags = buf.get_u16();
        let type_id = (type_and_flags >> 10) as u8;
        let f = type_and_flags & 0x3FF;
        let has = |bit: u16| f & bit != 0;
        let Some(frame_type) = FrameType::from_id(type_id) else {
            return Err(FrameError::UnknownFrameType {
                frame_type: type_id,
                ignore: has(flags::IGNORE),
            });
        };
        let connection_level = frame_type.is_connection_level();
        if connection_level && stream_id != 0 {
            return Err(FrameError::ConnectionFrameOnStream {
                frame_type,
                stream_id,
            });
        }
        let stream_level =
            !connection_level && !matches!(frame_type, FrameType::Error | FrameType::Ext);
        if stream_level && stream_id == 0 {
            return Err(FrameError::StreamFrameOnConnection { frame_type });
        }
        let mut r = Reader { buf, frame_type };
        let m = has(flags::METADATA);
        let frame = match frame_type {
            FrameType::Setup => {
                let major_version = r.u16()?;
                let minor_version = r.u16()?;
                let keepalive_ms = r.u32()? & MASK_31;
                let max_lifetime_ms = r.u32()? & MASK_31;
                let resume_token = if has(flags::RESUME) {
                    let n = usize::from(r.u16()?);
                    Some(r.bytes(n)?)
                } else {
                    None
                };
                let n = usize::from(r.u8()?);
                let metadata_mime = r.string(n)?;
                let n = usize::from(r.u8()?);
                let data_mime = r.string(n)?;
                let payload = r.payload(m)?;
                Frame::Setup(Setup {
                    major_version,
                    minor_version,
                    keepalive_ms,
                    max_lifetime_ms,
                    lease: has(flags::LEASE),
                    resume_token,
                    metadata_mime,
                    data_mime,
                    payload,
                })
            }
            FrameType::Lease => {
                let ttl_ms = r.u32()? & MASK_31;
                let number_of_requests = r.u32()? & MASK_31;
                let metadata = m.then(|| r.rest());
                Frame::Lease {
                    ttl_ms,
                    number_of_requests,
                    metadata,
                }
            }
            FrameType::Keepalive => {
                let last_received_position = r.u64()? & MAX_POSITION;
                Frame::Keepalive {
                    respond: has(flags::RESPOND),
                    last_received_position,
                    data: r.rest(),
                }
            }
            FrameType::RequestResponse => Frame::RequestResponse {
                stream_id,
                follows: has(flags::FOLLOWS),
                payload: r.payload(m)?,
            },
            FrameType::RequestFnf => Frame::RequestFnf {
                stream_id,
                follows: has(flags::FOLLOWS),
                payload: r.payload(m)?,
            },
            FrameType::RequestStream => {
                let initial_n = r.u32()? & MASK_31;
                Frame::RequestStream {
                    stream_id,
                    follows: has(flags::FOLLOWS),
                    initial_n,
                    payload: r.payload(m)?,
                }
            }
            FrameType::RequestChannel => {
                let initial_n = r.u32()? & MASK_31;
                Frame::RequestChannel {
                    stream_id,
                    follows: has(flags::FOLLOWS),
                    complete: has(flags::COMPLETE),
                    initial_n,
                    payload: r.payload(m)?,
                }
            }
            FrameType::RequestN => Frame::RequestN {
                stream_id,
                n: r.u32()? & MASK_31,
            },
            FrameType::Cancel => Frame::Cancel { stream_id },
            FrameType::Payload => Frame::Payload {
                stream_id,
                follows: has(flags::FOLLOWS),
                complete: has(flags::COMPLETE),
                next: has(flags::NEXT),
                payload: r.payload(m)?,
            },
            FrameType::Error => {
                let code = ErrorCode(r.u32()?);
                Frame::Error {
                    stream_id,
                    code,
                    data: r.rest(),
                }
            }
            FrameType::MetadataPush => {
                if !m {
                    return Err(FrameError::MetadataPushWithoutMetadata);
                }
                Frame::MetadataPush { metadata: r.rest() }
            }
            FrameType::Resume => {
                let major_version = r.u16()?;
                let minor_version = r.u16()?;
                let n = usize::from(r.u16()?);
                let token = r.bytes(n)?;
                let last_received_server_position = r.u64()? & MAX_POSITION;
                let first_available_client_position = r.u64()? & MAX_POSITION;
                Frame::Resume {
                    major_version,
                    minor_version,
                    token,
                    last_received_server_position,
                    first_available_client_position,
                }
            }
            FrameType::ResumeOk => Frame::ResumeOk {
                last_received_client_position: r.u64()? & MAX_POSITION,
            },
            FrameType::Ext => {
                let extended_type = r.u32()?;
                Frame::Ext {
                    stream_id,
                    ignore: has(flags::IGNORE),
                    metadata_flag: m,
                    extended_type,
                    body: r.rest(),
                }
            }
        };
        Ok(frame)
    }

    /// The frame's type.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Setup(_) => FrameType::Setup,
            Frame::Lease { .. } => FrameType::Lease,
            Frame::Keepalive { .. } => FrameType::Keepalive,
            Frame::RequestResponse { .. } => FrameType::RequestResponse,
            Frame::RequestFnf { .. } => FrameType::RequestFnf,
            Frame::RequestStream { .. } => FrameType::RequestStream,
            Frame::RequestChannel { .. } => FrameType::RequestChannel,
            Frame::RequestN { .. } => FrameType::RequestN,
            Frame::Cancel { .. } => FrameType::Cancel,
            Frame::Payload { .. } => FrameType::Payload,
            Frame::Error { .. } => FrameType::Error,
            Frame::MetadataPush { .. } => FrameType::MetadataPush,
            Frame::Resume { .. } => FrameType::Resume,
            Frame::ResumeOk { .. } => FrameType::ResumeOk,
            Frame::Ext { .. } => FrameType::Ext,
        }
    }

    /// The stream the frame belongs to (0 for connection-level frames).
    pub fn stream_id(&self) -> u32 {
        match self {
            Frame::RequestResponse { stream_id, .. }
            | Frame::RequestFnf { stream_id, .. }
            | Frame::RequestStream { stream_id, .. }
            | Frame::RequestChannel { stream_id, .. }
            | Frame::RequestN { stream_id, .. }
            | Frame::Cancel { stream_id }
            | Frame::Payload { stream_id, .. }
            | Frame::Error { stream_id, .. }
            | Frame::Ext { stream_id, .. } => *stream_id,
            _ => 0,
        }
    }

    /// The F flag of a fragmentable frame (requests and PAYLOAD); false for the others.
    pub fn follows(&self) -> bool {
        match self {
            Frame::RequestResponse { follows, .. }
            | Frame::RequestFnf { follows, .. }
            | Frame::RequestStream { follows, .. }
            | Frame::RequestChannel { follows, .. }
            | Frame::Payload { follows, .. } => *follows,
            _ => false,
        }
    }

    /// The payload of a fragmentable frame (requests and PAYLOAD).
    pub fn payload(&self) -> Option<&Payload> {
        match self {
            Frame::RequestResponse { payload, .. }
            | Frame::RequestFnf { payload, .. }
            | Frame::RequestStream { payload, .. }
            | Frame::RequestChannel { payload, .. }
            | Frame::Payload { payload, .. } => Some(payload),
            _ => None,
        }
    }

    /// Mutable payload and F flag of a fragmentable frame.
    pub(crate) fn fragment_parts_mut(&mut self) -> Option<(&mut Payload, &mut bool)> {
        match self {
            Frame::RequestResponse {
                payload, follows, ..
            }
            | Frame::RequestFnf {
                payload, follows, ..
            }
            | Frame::RequestStream {
                payload, follows, ..
            }
            | Frame::RequestChannel {
                payload, follows, ..
            }
            | Frame::Payload {
                payload, follows, ..
            } => Some((payload, follows)),
            _ => None,
        }
    }

    /// PAYLOAD with N (and C if `complete`): one stream element.
    pub fn next(stream_id: u32, payload: Payload, complete: bool) -> Frame {
        Frame::Payload {
            stream_id,
            follows: false,
            complete,
            next: true,
            payload,
        }
    }

    /// PAYLOAD with C only: completion without an element.
    pub fn complete(stream_id: u32) -> Frame {
        Frame::Payload {
            stream_id,
            follows: false,
            complete: true,
            next: false,
            payload: Payload::default(),
        }
    }

    /// ERROR on a stream or (stream 0) on the connection, with a UTF-8 message.
    pub fn error(stream_id: u32, code: ErrorCode, message: &str) -> Frame {
        Frame::Error {
            stream_id,
            code,
            data: Bytes::copy_from_slice(message.as_bytes()),
        }
    }

    /// The answer to a KEEPALIVE with the R flag: R cleared, same data. `None` for any other
    /// frame. `last_received_position` is 0 since resume is not supported.
    pub fn keepalive_reply(&self) -> Option<Frame> {
        match self {
            Frame::Keepalive {
                respond: true,
                data,
                ..
            } => Some(Frame::Keepalive {
                respond: false,
                last_received_position: 0,
                data: data.clone(),
            }),
            _ => None,
        }
    }

    /// Exact encoded length (without any transport prefix).
    pub fn encoded_len(&self) -> usize {
        let payload_len =
            |p: &Payload| p.metadata.as_ref().map_or(0, |m| 3 + m.len()) + p.data.len();
        HEADER_LEN
            + match self {
                Frame::Setup(s) => {
                    12 + s.resume_token.as_ref().map_or(0, |t| 2 + t.len())
                        + 1
                        + s.metadata_mime.len()
                        + 1
                        + s.data_mime.len()
                        + payload_len(&s.payload)
                }
                Frame::Lease { metadata, .. } => 8 + metadata.as_ref().map_or(0, Bytes::len),
                Frame::Keepalive { data, .. } => 8 + data.len(),
                Frame::RequestResponse { payload, .. }
                | Frame::RequestFnf { payload, .. }
                | Frame::Payload { payload, .. } => payload_len(payload),
                Frame::RequestStream { payload, .. } | Frame::RequestChannel { payload, .. } => {
                    4 + payload_len(payload)
                }
                Frame::RequestN { .. } => 4,
                Frame::Cancel { .. } => 0,
                Frame::Error { data, .. } => 4 + data.len(),
                Frame::MetadataPush { metadata } => metadata.len(),
                Frame::Resume { token, .. } => 4 + 2 + token.len() + 16,
                Frame::ResumeOk { .. } => 8,
                Frame::Ext { body, .. } => 4 + body.len(),
            }
    }

    /// Appends the frame's bytes (without any transport prefix) to `out`. Fails, writing
    /// nothing, when a field is out of its wire range (a stream id or request count over 31 bits,
    /// metadata over 16 MiB, a mime type over 255 bytes, a resume token over 64 KiB).
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), FrameError> {
        self.validate()?;
        out.reserve(self.encoded_len());
        let mut f: u16 = 0;
        let set = |f: &mut u16, bit: u16, on: bool| {
            if on {
                *f |= bit;
            }
        };
        match self {
            Frame::Setup(s) => {
                set(&mut f, flags::METADATA, s.payload.metadata.is_some());
                set(&mut f, flags::RESUME, s.resume_token.is_some());
                set(&mut f, flags::LEASE, s.lease);
            }
            Frame::Lease { metadata, .. } => set(&mut f, flags::METADATA, metadata.is_some()),
            Frame::Keepalive { respond, .. } => set(&mut f, flags::RESPOND, *respond),
            Frame::RequestResponse {
                follows, payload, ..
            }
            | Frame::RequestFnf {
                follows, payload, ..
            }
            | Frame::RequestStream {
                follows, payload, ..
            } => {
                set(&mut f, flags::METADATA, payload.metadata.is_some());
                set(&mut f, flags::FOLLOWS, *follows);
            }
            Frame::RequestChannel {
                follows,
                complete,
                payload,
                ..
            } => {
                set(&mut f, flags::METADATA, payload.metadata.is_some());
                set(&mut f, flags::FOLLOWS, *follows);
                set(&mut f, flags::COMPLETE, *complete);
            }
            Frame::Payload {
                follows,
                complete,
                next,
                payload,
                ..
            } => {
                set(&mut f, flags::METADATA, payload.metadata.is_some());
                set(&mut f, flags::FOLLOWS, *follows);
                set(&mut f, flags::COMPLETE, *complete);
                set(&mut f, flags::NEXT, *next);
            }
            Frame::MetadataPush { .. } => f |= flags::METADATA,
            Frame::Ext {
                ignore,
                metadata_flag,
                ..
            } => {
                set(&mut f, flags::IGNORE, *ignore);
                set(&mut f, flags::METADATA, *metadata_flag);
            }
            Frame::RequestN { .. }
            | Frame::Cancel { .. }
            | Frame::Error { .. }
            | Frame::Resume { .. }
            | Frame::ResumeOk { .. } => {}
        }
        out.put_u32(self.stream_id());
        out.put_u16(u16::from(self.frame_type() as u8) << 10 | f);
        let put_payload = |out: &mut BytesMut, p: &Payload| {
            if let Some(m) = &p.metadata {
                put_u24(out, m.len());
                out.put_slice(m);
            }
            out.put_slice(&p.data);
        };
        match self {
            Frame::Setup(s) => {
                out.put_u16(s.major_version);
                out.put_u16(s.minor_version);
                out.put_u32(s.keepalive_ms);
                out.put_u32(s.max_lifetime_ms);
                if let Some(token) = &s.resume_token {
                    out.put_u16(token.len() as u16);
                    out.put_slice(token);
                }
                out.put_u8(s.metadata_mime.len() as u8);
                out.put_slice(s.metadata_mime.as_bytes());
                out.put_u8(s.data_mime.len() as u8);
                out.put_slice(s.data_mime.as_bytes());
                put_payload(out, &s.payload);
            }
            Frame::Lease {
                ttl_ms,
                number_of_requests,
                metadata,
            } => {
                out.put_u32(*ttl_ms);
                out.put_u32(*number_of_requests);
                if let Some(m) = metadata {
                    out.put_slice(m);
                }
            }
            Frame::Keepalive {
                last_received_position,
                data,
                ..
            } => {
                out.put_u64(*last_received_position);
                out.put_slice(data);
            }
            Frame::RequestResponse { payload, .. }
            | Frame::RequestFnf { payload, .. }
            | Frame::Payload { payload, .. } => put_payload(out, payload),
            Frame::RequestStream {
                initial_n, payload, ..
            }
            | Frame::RequestChannel {
                initial_n, payload, ..
            } => {
                out.put_u32(*initial_n);
                put_payload(out, payload);
            }
            Frame::RequestN { n, .. } => out.put_u32(*n),
            Frame::Cancel { .. } => {}
            Frame::Error { code, data, .. } => {
                out.put_u32(code.0);
                out.put_slice(data);
            }
            Frame::MetadataPush { metadata } => out.put_slice(metadata),
            Frame::Resume {
                major_version,
                minor_version,
                token,
                last_received_server_position,
                first_available_client_position,
            } => {
                out.put_u16(*major_version);
                out.put_u16(*minor_version);
                out.put_u16(token.len() as u16);
                out.put_slice(token);
                out.put_u64(*last_received_server_position);
                out.put_u64(*first_available_client_position);
            }
            Frame::ResumeOk {
                last_received_client_position,
            } => {
                out.put_u64(*last_received_client_position);
            }
            Frame::Ext {
                extended_type,
                body,
                ..
            } => {
                out.put_u32(*extended_type);
                out.put_slice(body);
            }
        }
        Ok(())
    }

    /// The frame's bytes (without any transport prefix), e.g. for one WebSocket message.
    pub fn to_bytes(&self) -> Result<Bytes, FrameError> {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut out)?;
        Ok(out.freeze())
    }

    /// Checks every field against its wire range, so that `encode` cannot write a truncated
    /// value.
    fn validate(&self) -> Result<(), FrameError> {
        fn range(what: &'static str, value: u64, max: u64) -> Result<(), FrameError> {
            if value > max {
                Err(FrameError::OutOfRange { what, value })
            } else {
                Ok(())
            }
        }
        fn length(what: &'static str, len: usize, max: usize) -> Result<(), FrameError> {
            if len > max {
                Err(FrameError::TooLong { what, len, max })
            } else {
                Ok(())
            }
        }
        let payload = |p: &Payload| -> Result<(), FrameError> {
            length(
                "metadata",
                p.metadata.as_ref().map_or(0, Bytes::len),
                MAX_METADATA_LEN,
            )
        };
        range(
            "stream id",
            u64::from(self.stream_id()),
            u64::from(MAX_STREAM_ID),
        )?;
        if self.stream_id() == 0 && !matches!(self, Frame::Error { .. } | Frame::Ext { .. }) {
            let frame_type = self.frame_type();
            if !frame_type.is_connection_level() {
                return Err(FrameError::StreamFrameOnConnection { frame_type });
            }
        }
        match self {
            Frame::Setup(s) => {
                range("keepalive", u64::from(s.keepalive_ms), u64::from(MASK_31))?;
                range(
                    "max lifetime",
                    u64::from(s.max_lifetime_ms),
                    u64::from(MASK_31),
                )?;
                length(
                    "resume token",
                    s.resume_token.as_ref().map_or(0, Bytes::len),
                    0xFFFF,
                )?;
                length("metadata mime type", s.metadata_mime.len(), 0xFF)?;
                length("data mime type", s.data_mime.len(), 0xFF)?;
                payload(&s.payload)
            }
            Frame::Lease {
                ttl_ms,
                number_of_requests,
                ..
            } => {
                range("lease ttl", u64::from(*ttl_ms), u64::from(MASK_31))?;
                range(
                    "lease requests",
                    u64::from(*number_of_requests),
                    u64::from(MASK_31),
                )
            }
            Frame::Keepalive {
                last_received_position,
                ..
            } => range("position", *last_received_position, MAX_POSITION),
            Frame::RequestResponse { payload: p, .. }
            | Frame::RequestFnf { payload: p, .. }
            | Frame::Payload { payload: p, .. } => payload(p),
            Frame::RequestStream {
                initial_n,
                payload: p,
                ..
            }
            | Frame::RequestChannel {
                initial_n,
                payload: p,
                ..
            } => {
                range(
                    "initial request n",
                    u64::from(*initial_n),
                    u64::from(MAX_REQUEST_N),
                )?;
                payload(p)
            }
            Frame::RequestN { n, .. } => {
                range("request n", u64::from(*n), u64::from(MAX_REQUEST_N))
            }
            Frame::Resume {
                token,
                last_received_server_position,
                first_available_client_position,
                ..
            } => {
                length("resume token", token.len(), 0xFFFF)?;
                range("position", *last_received_server_position, MAX_POSITION)?;
                range("position", *first_available_client_position, MAX_POSITION)
            }
            Frame::ResumeOk {
                last_received_client_position,
            } => range("position", *last_received_client_position, MAX_POSITION),
            Frame::Cancel { .. }
            | Frame::Error { .. }
            | Frame::MetadataPush { .. }
            | Frame::Ext { .. } => Ok(()),
        }
    }
}

pub(crate) fn put_u24(out: &mut BytesMut, len: usize) {
    out.put_u8((len >> 16) as u8);
    out.put_u16(len as u16);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn hex(s: &str) -> Bytes {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect::<Vec<_>>()
            .into()
    }

    /// Encodes to exactly `wire`, and `wire` decodes to `frame`.
    fn both_ways(frame: Frame, wire: &str) {
        let wire = hex(wire);
        assert_eq!(frame.to_bytes().unwrap(), wire);
        assert_eq!(frame.encoded_len(), wire.len());
        assert_eq!(Frame::decode(wire).unwrap(), frame);
    }

    #[test]
    fn tutorial_setup() {
        // rsocket-py 0.4.20 RSocketClient(metadata_encoding=composite): stream 0, type 1, no flags,
        // version 1.0, keepalive 1000 ms, lifetime 600000 ms, the two mime types, no payload.
        both_ways(
            Frame::Setup(Setup {
                major_version: 1,
                minor_version: 0,
                keepalive_ms: 1000,
                max_lifetime_ms: 600_000,
                lease: false,
                resume_token: None,
                metadata_mime: "message/x.rsocket.composite-metadata.v0".into(),
                data_mime: "application/json".into(),
                payload: Payload::default(),
            }),
            "00000000 0400 0001 0000 000003e8 000927c0
             27 6d6573736167652f782e72736f636b65742e636f6d706f736974652d6d657461646174612e7630
             10 6170706c69636174696f6e2f6a736f6e",
        );
    }

    #[test]
    fn routed_request_response_and_its_reply() {
        // REQUEST_RESPONSE on stream 1 with M: metadata length 10 = routing entry 0xFE, length 6,
        // tag "login"; data "user1".
        both_ways(
            Frame::RequestResponse {
                stream_id: 1,
                follows: false,
                payload: Payload::new(
                    Some(hex("fe000006 05 6c6f67696e")),
                    Bytes::from_static(b"user1"),
                ),
            },
            "00000001 1100 00000a fe000006056c6f67696e 7573657231",
        );
        // PAYLOAD N|C with the session id; PAYLOAD C alone for an empty completion.
        both_ways(
            Frame::next(1, Payload::data("sid"), true),
            "00000001 2860 736964",
        );
        both_ways(Frame::complete(3), "00000003 2840");
    }

    #[test]
    fn request_stream_with_unbounded_n_and_stream_elements() {
        both_ways(
            Frame::RequestStream {
                stream_id: 5,
                follows: false,
                initial_n: MAX_REQUEST_N,
                payload: Payload::new(
                    Some(hex("fe00000e0d6368616e6e656c2e7573657273")),
                    Bytes::from_static(b"channel1"),
                ),
            },
            "00000005 1900 7fffffff 000012 fe00000e0d6368616e6e656c2e7573657273 6368616e6e656c31",
        );
        both_ways(
            Frame::next(5, Payload::data("user2"), false),
            "00000005 2820 7573657232",
        );
        both_ways(Frame::Cancel { stream_id: 7 }, "00000007 2400");
        both_ways(
            Frame::RequestN { stream_id: 7, n: 2 },
            "00000007 2000 00000002",
        );
        both_ways(
            Frame::error(19, ErrorCode::APPLICATION_ERROR, "no.such.route"),
            "00000013 2c00 00000201 6e6f2e737563682e726f757465",
        );
    }

    #[test]
    fn keepalive_and_its_reply() {
        let ka = Frame::Keepalive {
            respond: true,
            last_received_position: 0,
            data: Bytes::new(),
        };
        both_ways(ka.clone(), "00000000 0c80 0000000000000000");
        let reply = ka.keepalive_reply().unwrap();
        both_ways(reply.clone(), "00000000 0c00 0000000000000000");
        assert_eq!(reply.keepalive_reply(), None);
    }

    #[test]
    fn setup_lease_and_resume_are_decoded_and_unsupported() {
        let lease = hex("00000000 0440 0001 0000 000003e8 000927c0 01 61 01 62");
        let Frame::Setup(s) = Frame::decode(lease).unwrap() else {
            panic!()
        };
        assert!(s.lease);
        assert_eq!(
            s.unsupported().map(|u| u.0),
            Some(ErrorCode::UNSUPPORTED_SETUP)
        );
        let resume = hex("00000000 0480 0001 0000 000003e8 000927c0 0002 7474 01 61 01 62");
        let Frame::Setup(s) = Frame::decode(resume).unwrap() else {
            panic!()
        };
        assert_eq!(s.resume_token, Some(Bytes::from_static(b"tt")));
        assert_eq!(
            s.unsupported().map(|u| u.0),
            Some(ErrorCode::UNSUPPORTED_SETUP)
        );
        let v2 = hex("00000000 0400 0002 0000 000003e8 000927c0 01 61 01 62");
        let Frame::Setup(s) = Frame::decode(v2).unwrap() else {
            panic!()
        };
        assert_eq!(
            s.unsupported().map(|u| u.0),
            Some(ErrorCode::UNSUPPORTED_SETUP)
        );
    }

    #[test]
    fn malformed_frames_are_errors() {
        assert_eq!(
            Frame::decode(hex("0000000104")),
            Err(FrameError::TooShort { len: 5 })
        );
        // Metadata length beyond the frame.
        assert_eq!(
            Frame::decode(hex("00000001 1100 000005 fe00")),
            Err(FrameError::Truncated {
                frame_type: FrameType::RequestResponse
            })
        );
        // SETUP cut in its mime type: INVALID_SETUP.
        let err =
            Frame::decode(hex("00000000 0400 0001 0000 000003e8 000927c0 05 61")).unwrap_err();
        assert_eq!(err.error_code(), ErrorCode::INVALID_SETUP);
        assert_eq!(
            Frame::decode(hex("00000003 0c00 0000000000000000")),
            Err(FrameError::ConnectionFrameOnStream {
                frame_type: FrameType::Keepalive,
                stream_id: 3
            })
        );
        assert_eq!(
            Frame::decode(hex("00000000 2400")),
            Err(FrameError::StreamFrameOnConnection {
                frame_type: FrameType::Cancel
            })
        );
        let unknown = Frame::decode(hex("00000001 3e00")).unwrap_err();
        assert_eq!(
            unknown,
            FrameError::UnknownFrameType {
                frame_type: 0x0f,
                ignore: true
            }
        );
        assert!(unknown.is_ignorable());
        assert!(
            !Frame::decode(hex("00000001 3c00"))
                .unwrap_err()
                .is_ignorable()
        );
        assert_eq!(
            Frame::decode(hex("00000000 3000 01")),
            Err(FrameError::MetadataPushWithoutMetadata)
        );
    }

    #[test]
    fn reserved_bits_are_masked() {
        // Stream id and request n with their reserved top bit set.
        assert_eq!(
            Frame::decode(hex("80000003 2000 80000005")).unwrap(),
            Frame::RequestN { stream_id: 3, n: 5 }
        );
    }

    #[test]
    fn encoding_out_of_range_fails_without_writing() {
        let mut out = BytesMut::new();
        let too_big = Frame::RequestN {
            stream_id: 1,
            n: MAX_REQUEST_N + 1,
        };
        assert!(matches!(
            too_big.encode(&mut out),
            Err(FrameError::OutOfRange { .. })
        ));
        let on_zero = Frame::Cancel { stream_id: 0 };
        assert!(on_zero.encode(&mut out).is_err());
        let huge = Frame::next(
            1,
            Payload::new(
                Some(Bytes::from(vec![0; MAX_METADATA_LEN + 1])),
                Bytes::new(),
            ),
            true,
        );
        assert!(matches!(
            huge.encode(&mut out),
            Err(FrameError::TooLong { .. })
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn metadata_flag_with_empty_metadata_is_kept() {
        both_ways(
            Frame::next(
                1,
                Payload::new(Some(Bytes::new()), Bytes::from_static(b"d")),
                false,
            ),
            "00000001 2920 000000 64",
        );
    }
}
