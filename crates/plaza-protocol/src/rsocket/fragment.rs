//! Fragmentation (the F flag). A request or PAYLOAD too large for one frame is sent as its first
//! frame with F set, then PAYLOAD frames with F set, then a last PAYLOAD without F. All metadata
//! comes before any data. [`Reassembler`] puts inbound fragments back together under size limits;
//! [`fragment`] splits an outbound frame.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use thiserror::Error;

use super::frame::{Frame, FrameType, HEADER_LEN, Payload};

/// Smallest frame size [`fragment`] accepts (rsocket-py's minimum is 64 bytes including the
/// 3-byte TCP length prefix).
pub const MIN_FRAGMENT_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FragmentError {
    /// The reassembled payload would exceed the per-payload limit. The partial frame was dropped;
    /// the session answers with an ERROR on the stream (or closes the connection).
    #[error("stream {stream_id}: reassembled payload exceeds {max} bytes")]
    TooLarge { stream_id: u32, max: usize },
    /// All partial frames together would exceed the per-connection limit; the partial frame of
    /// this stream was dropped.
    #[error("stream {stream_id}: fragments buffered on the connection exceed {max} bytes")]
    BufferFull { stream_id: u32, max: usize },
    /// A fragment followed by something other than a PAYLOAD (a protocol error); the partial frame
    /// was dropped.
    #[error("stream {stream_id}: {frame_type:?} frame while reassembling fragments")]
    UnexpectedFrame {
        stream_id: u32,
        frame_type: FrameType,
    },
    #[error("fragment size {0} is below the minimum of {MIN_FRAGMENT_LEN}")]
    FragmentSizeTooSmall(usize),
}

impl FragmentError {
    /// The stream concerned, if any.
    pub fn stream_id(&self) -> Option<u32> {
        match self {
            Self::TooLarge { stream_id, .. }
            | Self::BufferFull { stream_id, .. }
            | Self::UnexpectedFrame { stream_id, .. } => Some(*stream_id),
            Self::FragmentSizeTooSmall(_) => None,
        }
    }
}

#[derive(Debug)]
struct Partial {
    /// The first fragment, payload emptied.
    head: Frame,
    metadata: Option<BytesMut>,
    data: BytesMut,
}

impl Partial {
    fn len(&self) -> usize {
        self.metadata.as_ref().map_or(0, BytesMut::len) + self.data.len()
    }

    fn append(&mut self, payload: Payload) {
        if let Some(m) = payload.metadata {
            self.metadata
                .get_or_insert_with(BytesMut::new)
                .extend_from_slice(&m);
        }
        self.data.extend_from_slice(&payload.data);
    }

    fn finish(self, last: Option<&Frame>) -> Frame {
        let Partial {
            mut head,
            metadata,
            data,
        } = self;
        let (last_complete, last_next) = match last {
            Some(Frame::Payload { complete, next, .. }) => (*complete, *next),
            _ => (false, false),
        };
        match &mut head {
            Frame::Payload { complete, next, .. } => {
                *complete = last_complete;
                *next |= last_next;
            }
            Frame::RequestChannel { complete, .. } => *complete |= last_complete,
            _ => {}
        }
        if let Some((payload, follows)) = head.fragment_parts_mut() {
            *follows = false;
            *payload = Payload {
                metadata: metadata.map(BytesMut::freeze),
                data: data.freeze(),
            };
        }
        head
    }
}

/// Inbound reassembly for one connection. Feed every decoded frame through
/// [`push`](Self::push); it returns the frames to act on, whole.
#[derive(Debug)]
pub struct Reassembler {
    partial: HashMap<u32, Partial>,
    max_payload_len: usize,
    max_buffered: usize,
    buffered: usize,
}

impl Reassembler {
    /// `max_payload_len` bounds one reassembled payload (metadata plus data); `max_buffered`
    /// bounds all partial payloads of the connection together.
    pub fn new(max_payload_len: usize, max_buffered: usize) -> Self {
        Self {
            partial: HashMap::new(),
            max_payload_len,
            max_buffered,
            buffered: 0,
        }
    }

    /// Takes the next inbound frame. Returns `Some(frame)` when there is a whole frame to act on
    /// (an unfragmented frame, or the last fragment joined to the others: the first fragment's
    /// type and header fields, F cleared, C from the last fragment), `None` while fragments are
    /// still expected. A CANCEL or ERROR on a stream drops its partial frame and is returned.
    pub fn push(&mut self, mut frame: Frame) -> Result<Option<Frame>, FragmentError> {
        let stream_id = frame.stream_id();
        if matches!(frame, Frame::Cancel { .. } | Frame::Error { .. }) {
            self.discard(stream_id);
            return Ok(Some(frame));
        }
        let Some((payload, follows)) = frame.fragment_parts_mut() else {
            return Ok(Some(frame));
        };
        let follows = *follows;
        let payload = std::mem::take(payload);
        let Some(mut partial) = self.partial.remove(&stream_id) else {
            if !follows {
                if let Some((p, _)) = frame.fragment_parts_mut() {
                    *p = payload;
                }
                return Ok(Some(frame));
            }
            let mut partial = Partial {
                head: frame,
                metadata: None,
                data: BytesMut::new(),
            };
            self.add(stream_id, &mut partial, payload)?;
            self.partial.insert(stream_id, partial);
            return Ok(None);
        };
        self.buffered -= partial.len();
        if !matches!(frame, Frame::Payload { .. }) {
            return Err(FragmentError::UnexpectedFrame {
                stream_id,
                frame_type: frame.frame_type(),
            });
        }
        self.add(stream_id, &mut partial, payload)?;
        if follows {
            self.partial.insert(stream_id, partial);
            Ok(None)
        } else {
            self.buffered -= partial.len();
            Ok(Some(partial.finish(Some(&frame))))
        }
    }

    /// Checks the limits and appends; on success `partial.len()` is counted in `buffered`.
    fn add(
        &mut self,
        stream_id: u32,
        partial: &mut Partial,
        payload: Payload,
    ) -> Result<(), FragmentError> {
        let old = partial.len();
        let new = old + payload.len();
        if new > self.max_payload_len {
            return Err(FragmentError::TooLarge {
                stream_id,
                max: self.max_payload_len,
            });
        }
        if self.buffered + new > self.max_buffered {
            return Err(FragmentError::BufferFull {
                stream_id,
                max: self.max_buffered,
            });
        }
        partial.append(payload);
        self.buffered += new;
        Ok(())
    }

    /// Drops the partial frame of a stream, if any (e.g. when the session ends the stream).
    pub fn discard(&mut self, stream_id: u32) {
        if let Some(p) = self.partial.remove(&stream_id) {
            self.buffered -= p.len();
        }
    }

    /// Whether a stream has fragments waiting for their last one.
    pub fn in_progress(&self, stream_id: u32) -> bool {
        self.partial.contains_key(&stream_id)
    }

    /// Bytes held in partial frames.
    pub fn buffered_len(&self) -> usize {
        self.buffered
    }
}

/// Splits `frame` into frames of at most `max_frame_len` encoded bytes (transport prefix not
/// counted). A frame that fits, or is not a request or PAYLOAD, is returned alone.
pub fn fragment(frame: Frame, max_frame_len: usize) -> Result<Vec<Frame>, FragmentError> {
    if max_frame_len < MIN_FRAGMENT_LEN {
        return Err(FragmentError::FragmentSizeTooSmall(max_frame_len));
    }
    if frame.encoded_len() <= max_frame_len || frame.payload().is_none() {
        return Ok(vec![frame]);
    }
    let stream_id = frame.stream_id();
    let (complete, next) = match &frame {
        Frame::Payload { complete, next, .. } => (*complete, *next),
        Frame::RequestChannel { complete, .. } => (*complete, true),
        _ => (false, true),
    };
    let first_overhead = match &frame {
        Frame::RequestStream { .. } | Frame::RequestChannel { .. } => HEADER_LEN + 4,
        _ => HEADER_LEN,
    };
    let mut head = frame;
    let Some((payload, _)) = head.fragment_parts_mut() else {
        return Ok(vec![head]);
    };
    let Payload { metadata, data } = std::mem::take(payload);
    let mut metadata: Option<Bytes> = metadata;
    let mut data = data;
    let mut out = Vec::new();
    let mut first = true;
    loop {
        let mut budget = max_frame_len - if first { first_overhead } else { HEADER_LEN };
        let meta_chunk = match &mut metadata {
            Some(m) if !m.is_empty() || first => {
                budget -= 3;
                let take = budget.min(m.len());
                budget -= take;
                Some(m.split_to(take))
            }
            _ => None,
        };
        if metadata.as_ref().is_some_and(Bytes::is_empty) {
            metadata = None;
        }
        let data_chunk = if metadata.is_none() {
            data.split_to(budget.min(data.len()))
        } else {
            Bytes::new()
        };
        let last = metadata.is_none() && data.is_empty();
        let chunk = Payload {
            metadata: meta_chunk,
            data: data_chunk,
        };
        if first {
            let mut f = head.clone();
            match &mut f {
                Frame::Payload { complete: c, .. } | Frame::RequestChannel { complete: c, .. } => {
                    *c = last && complete
                }
                _ => {}
            }
            if let Some((p, follows)) = f.fragment_parts_mut() {
                *p = chunk;
                *follows = !last;
            }
            out.push(f);
            first = false;
        } else {
            out.push(Frame::Payload {
                stream_id,
                follows: !last,
                complete: last && complete,
                next,
                payload: chunk,
            });
        }
        if last {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn payload_fragment(stream_id: u32, follows: bool, data: &'static [u8]) -> Frame {
        Frame::Payload {
            stream_id,
            follows,
            complete: false,
            next: true,
            payload: Payload::data(data),
        }
    }

    #[test]
    fn request_then_payload_fragments() {
        let mut r = Reassembler::new(100, 100);
        let first = Frame::RequestChannel {
            stream_id: 1,
            follows: true,
            complete: false,
            initial_n: 7,
            payload: Payload::new(Some(Bytes::from_static(b"me")), Bytes::from_static(b"ab")),
        };
        assert_eq!(r.push(first).unwrap(), None);
        assert!(r.in_progress(1));
        // Another stream passes through meanwhile.
        assert_eq!(
            r.push(Frame::complete(3)).unwrap(),
            Some(Frame::complete(3))
        );
        assert_eq!(r.push(payload_fragment(1, true, b"cd")).unwrap(), None);
        assert_eq!(r.buffered_len(), 6);
        let last = Frame::Payload {
            stream_id: 1,
            follows: false,
            complete: true,
            next: true,
            payload: Payload::data("e"),
        };
        let whole = r.push(last).unwrap().unwrap();
        assert_eq!(
            whole,
            Frame::RequestChannel {
                stream_id: 1,
                follows: false,
                complete: true,
                initial_n: 7,
                payload: Payload::new(
                    Some(Bytes::from_static(b"me")),
                    Bytes::from_static(b"abcde")
                ),
            }
        );
        assert_eq!(r.buffered_len(), 0);
    }

    #[test]
    fn limits_and_protocol_errors_drop_the_partial() {
        let mut r = Reassembler::new(5, 8);
        assert_eq!(r.push(payload_fragment(1, true, b"abc")).unwrap(), None);
        assert_eq!(
            r.push(payload_fragment(1, true, b"def")),
            Err(FragmentError::TooLarge {
                stream_id: 1,
                max: 5
            })
        );
        assert!(!r.in_progress(1));
        assert_eq!(r.buffered_len(), 0);

        assert_eq!(r.push(payload_fragment(1, true, b"abcd")).unwrap(), None);
        assert_eq!(r.push(payload_fragment(3, true, b"abcd")).unwrap(), None);
        assert_eq!(
            r.push(payload_fragment(5, true, b"a")),
            Err(FragmentError::BufferFull {
                stream_id: 5,
                max: 8
            })
        );
        assert_eq!(r.buffered_len(), 8);

        let rr = Frame::RequestResponse {
            stream_id: 3,
            follows: false,
            payload: Payload::default(),
        };
        assert_eq!(
            r.push(rr),
            Err(FragmentError::UnexpectedFrame {
                stream_id: 3,
                frame_type: FrameType::RequestResponse
            })
        );
        assert_eq!(r.buffered_len(), 4);
        assert_eq!(
            r.push(Frame::Cancel { stream_id: 1 }).unwrap(),
            Some(Frame::Cancel { stream_id: 1 })
        );
        assert_eq!(r.buffered_len(), 0);
    }

    #[test]
    fn fragment_keeps_metadata_first_and_flags_on_the_last() {
        let big = Frame::next(
            9,
            Payload::new(Some(Bytes::from(vec![1; 70])), Bytes::from(vec![2; 70])),
            true,
        );
        let pieces = fragment(big.clone(), 32).unwrap();
        assert!(pieces.iter().all(|p| p.encoded_len() <= 32));
        let (last, init) = pieces.split_last().unwrap();
        assert!(init.iter().all(|p| p.follows()
            && matches!(
                p,
                Frame::Payload {
                    complete: false,
                    ..
                }
            )));
        assert!(matches!(
            last,
            Frame::Payload {
                follows: false,
                complete: true,
                next: true,
                ..
            }
        ));
        let mut seen_data = false;
        for p in &pieces {
            let payload = p.payload().unwrap();
            assert!(!(seen_data && payload.metadata.is_some()));
            seen_data |= !payload.data.is_empty();
        }
        let mut r = Reassembler::new(1000, 1000);
        let out: Vec<_> = pieces
            .into_iter()
            .filter_map(|p| r.push(p).unwrap())
            .collect();
        assert_eq!(out, [big]);
        assert_eq!(
            fragment(Frame::complete(1), 31),
            Err(FragmentError::FragmentSizeTooSmall(31))
        );
    }
}
