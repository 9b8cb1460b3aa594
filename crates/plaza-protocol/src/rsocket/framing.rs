//! Transport framing. Over WebSocket a binary message is exactly one frame (use
//! [`Frame::decode`] and [`Frame::to_bytes`] directly). Over TCP every frame is preceded by its
//! length as a 24-bit big-endian integer: [`LengthPrefixed`] cuts frames out of a growing read
//! buffer and [`encode_length_prefixed`] writes them.

use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;

use super::frame::{Frame, FrameError, put_u24};

/// Largest frame a 24-bit length prefix can describe.
pub const MAX_PREFIXED_FRAME_LEN: usize = 0xFF_FFFF;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FramingError {
    /// The length prefix announces more than the configured maximum. The stream cannot be
    /// resynchronised: close the connection (after a CONNECTION_ERROR if wanted).
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Splits a TCP byte stream into frames. Holds only the limit: the caller owns the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LengthPrefixed {
    max_frame_len: usize,
}

impl LengthPrefixed {
    /// `max_frame_len` is clamped to [`MAX_PREFIXED_FRAME_LEN`].
    pub fn new(max_frame_len: usize) -> Self {
        Self {
            max_frame_len: max_frame_len.min(MAX_PREFIXED_FRAME_LEN),
        }
    }

    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// Takes the next complete frame's bytes (without the prefix) off the front of `buf`, or
    /// returns `None` and leaves `buf` untouched until more bytes arrive. A too large length is
    /// reported as soon as the prefix is readable, before the body is buffered.
    pub fn next_frame_bytes(&self, buf: &mut BytesMut) -> Result<Option<Bytes>, FramingError> {
        let Some(prefix) = buf.get(..3) else {
            return Ok(None);
        };
        let len =
            usize::from(prefix[0]) << 16 | usize::from(prefix[1]) << 8 | usize::from(prefix[2]);
        if len > self.max_frame_len {
            return Err(FramingError::TooLarge {
                len,
                max: self.max_frame_len,
            });
        }
        if buf.len() < 3 + len {
            // No reserve here: a 3-byte prefix must not make us allocate 16 MiB.
            return Ok(None);
        }
        buf.advance(3);
        Ok(Some(buf.split_to(len).freeze()))
    }

    /// [`next_frame_bytes`](Self::next_frame_bytes) then [`Frame::decode`]. A frame that does
    /// not decode has still been consumed, so the caller may answer it and go on.
    pub fn next_frame(&self, buf: &mut BytesMut) -> Result<Option<Frame>, FramingError> {
        match self.next_frame_bytes(buf)? {
            Some(bytes) => Ok(Some(Frame::decode(bytes)?)),
            None => Ok(None),
        }
    }
}

impl Default for LengthPrefixed {
    fn default() -> Self {
        Self::new(MAX_PREFIXED_FRAME_LEN)
    }
}

/// Appends the 24-bit length and the frame to `out`; on error nothing is written.
pub fn encode_length_prefixed(frame: &Frame, out: &mut BytesMut) -> Result<(), FrameError> {
    let len = frame.encoded_len();
    if len > MAX_PREFIXED_FRAME_LEN {
        return Err(FrameError::TooLong {
            what: "frame",
            len,
            max: MAX_PREFIXED_FRAME_LEN,
        });
    }
    let start = out.len();
    out.reserve(3 + len);
    put_u24(out, len);
    if let Err(e) = frame.encode(out) {
        out.truncate(start);
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn frames_split_across_reads() {
        let codec = LengthPrefixed::default();
        let mut wire = BytesMut::new();
        encode_length_prefixed(&Frame::Cancel { stream_id: 3 }, &mut wire).unwrap();
        encode_length_prefixed(&Frame::RequestN { stream_id: 3, n: 1 }, &mut wire).unwrap();
        assert_eq!(&wire[..9], &[0, 0, 6, 0, 0, 0, 3, 0x24, 0]);
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for b in wire.iter() {
            buf.extend_from_slice(&[*b]);
            while let Some(f) = codec.next_frame(&mut buf).unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(
            frames,
            [
                Frame::Cancel { stream_id: 3 },
                Frame::RequestN { stream_id: 3, n: 1 }
            ]
        );
    }

    #[test]
    fn too_large_is_reported_from_the_prefix_alone() {
        let codec = LengthPrefixed::new(100);
        let mut buf = BytesMut::from(&[0, 0, 101][..]);
        assert_eq!(
            codec.next_frame_bytes(&mut buf),
            Err(FramingError::TooLarge { len: 101, max: 100 })
        );
        let mut buf = BytesMut::from(&[0, 0][..]);
        assert_eq!(codec.next_frame_bytes(&mut buf), Ok(None));
    }

    #[test]
    fn a_bad_frame_is_consumed() {
        let codec = LengthPrefixed::default();
        let mut buf = BytesMut::from(&[0, 0, 1, 7, 0, 0, 6, 0, 0, 0, 3, 0x24, 0][..]);
        assert!(matches!(
            codec.next_frame(&mut buf),
            Err(FramingError::Frame(FrameError::TooShort { len: 1 }))
        ));
        assert_eq!(
            codec.next_frame(&mut buf).unwrap(),
            Some(Frame::Cancel { stream_id: 3 })
        );
    }
}
