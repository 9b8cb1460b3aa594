//! RSocket 1.0 (<https://rsocket.io/about/protocol>) as spoken by rsocket-py 0.4.x: the frame
//! codec, transport framing, fragment reassembly, composite and routing metadata, and per-stream
//! credit. Pure and synchronous: a session owns the socket, feeds bytes in and writes the frames
//! it gets back.
//!
//! A server session's inbound path:
//!
//! 1. bytes to frame bytes: one WebSocket binary message per frame, or
//!    [`LengthPrefixed::next_frame_bytes`] on the TCP read buffer;
//! 2. [`Frame::decode`]; on error answer ERROR on stream 0 with [`FrameError::error_code`]
//!    (unless [`FrameError::is_ignorable`]). A [`Frame::Ext`] is dropped when its `ignore` is
//!    set. Values are not judged: a REQUEST_N of 0 or a PAYLOAD with neither N nor C decodes, and
//!    the session decides;
//! 3. [`Reassembler::push`] to join fragments; a [`FragmentError`] names the stream to fail;
//! 4. the first frame must be a [`Setup`]: [`Setup::unsupported`] gives the ERROR for lease,
//!    resume or a bad version; then check `metadata_mime` is [`COMPOSITE_METADATA_MIME`];
//! 5. requests: [`CompositeMetadata::decode`] on the payload metadata, then
//!    [`CompositeMetadata::route`] and [`CompositeMetadata::find`] (e.g. `chat/file-name`);
//!    streams and channels track their [`Credit`].
//!
//! Outbound: [`Frame::next`], [`Frame::complete`], [`Frame::error`],
//! [`Frame::keepalive_reply`], [`fragment()`] for payloads over the frame size, then
//! [`Frame::to_bytes`] (WebSocket) or [`encode_length_prefixed`] (TCP).

pub mod fragment;
pub mod frame;
pub mod framing;
pub mod metadata;
pub mod stream;

pub use fragment::{FragmentError, MIN_FRAGMENT_LEN, Reassembler, fragment};
pub use frame::{
    ErrorCode, Frame, FrameError, FrameType, MAX_REQUEST_N, MAX_STREAM_ID, Payload, Setup,
};
pub use framing::{FramingError, LengthPrefixed, MAX_PREFIXED_FRAME_LEN, encode_length_prefixed};
pub use metadata::{
    COMPOSITE_METADATA_MIME, CompositeMetadata, MetadataEntry, MetadataError, MimeType,
    ROUTING_MIME, decode_routing, encode_routing,
};
pub use stream::{Credit, ServerStreamIds, is_client_stream_id};
