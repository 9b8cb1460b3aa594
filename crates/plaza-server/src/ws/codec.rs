//! The server side of WebSocket framing (RFC 6455), as much as the native endpoint needs, with
//! no buffer held while a connection is idle.
//!
//! [`Decoder`] turns the bytes a client sent into messages: it unmasks, reassembles fragmented
//! messages, checks UTF-8 and the size limit, and refuses what a client must not send (unmasked
//! frames, reserved bits, unknown opcodes, long or fragmented control frames). Its buffer only
//! holds the bytes of a frame not complete yet; once everything read is consumed the buffer is
//! freed. Reading goes through one scratch buffer per thread ([`Decoder::poll_fill`]), so a
//! connection waiting for data holds no read buffer at all.
//!
//! The encoding side is a few functions that append unmasked server frames to a `Vec`.

use std::cell::RefCell;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, ReadBuf};

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Bytes read from a socket at most at once (the per-thread scratch buffer).
pub const SCRATCH_LEN: usize = 64 * 1024;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A complete message from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Text(String),
    /// A binary message (not part of the native protocol) and its length.
    Binary(usize),
    Ping(Bytes),
    Pong,
    /// A close frame and its status code, if it had one.
    Close(Option<u16>),
}

/// Why the client's bytes cannot be read as WebSocket messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// A frame or message above the size limit.
    TooLarge,
    /// A text message that is not UTF-8.
    Utf8,
    Protocol(&'static str),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge => f.write_str("message larger than the limit"),
            FrameError::Utf8 => f.write_str("text message is not valid UTF-8"),
            FrameError::Protocol(m) => write!(f, "protocol error: {m}"),
        }
    }
}

/// Client bytes not consumed yet, and a fragmented message being assembled.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed.
    start: usize,
    /// The opcode and payload of a fragmented message so far.
    fragments: Option<(u8, Vec<u8>)>,
    max_message: usize,
}

impl Decoder {
    pub fn new(max_message: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            fragments: None,
            max_message,
        }
    }

    /// Whether the decoder holds no allocation (nothing half-read).
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.buf.capacity() == 0 && self.fragments.is_none()
    }

    /// Appends bytes read from the client.
    pub fn extend(&mut self, data: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Reads what the socket has (at most `max_read` bytes) through this thread's scratch
    /// buffer. `Ready(Ok(0))` is the end of the stream.
    pub fn poll_fill<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut R,
        max_read: usize,
    ) -> Poll<std::io::Result<usize>> {
        SCRATCH.with_borrow_mut(|scratch| {
            if scratch.is_empty() {
                scratch.resize(SCRATCH_LEN, 0);
            }
            let mut read = ReadBuf::new(&mut scratch[..max_read.clamp(1, SCRATCH_LEN)]);
            ready!(Pin::new(io).poll_read(cx, &mut read))?;
            let data = read.filled();
            self.extend(data);
            Poll::Ready(Ok(data.len()))
        })
    }

    /// The next complete message, `Ok(None)` when more bytes are needed. Frees the buffer once
    /// everything in it is consumed.
    pub fn next_message(&mut self) -> Result<Option<Incoming>, FrameError> {
        loop {
            let Some((fin, opcode, payload)) = self.next_frame()? else {
                if self.start == self.buf.len() {
                    self.buf = Vec::new();
                    self.start = 0;
                } else if self.start > 0 && self.start >= self.buf.len() / 2 {
                    self.buf.drain(..self.start);
                    self.start = 0;
                }
                return Ok(None);
            };
            let payload = &self.buf[payload];
            let message = match opcode {
                OP_TEXT | OP_BINARY if self.fragments.is_some() => {
                    return Err(FrameError::Protocol(
                        "a new message inside a fragmented one",
                    ));
                }
                OP_TEXT | OP_BINARY if !fin => {
                    self.fragments = Some((opcode, payload.to_vec()));
                    continue;
                }
                OP_TEXT => Incoming::Text(text(payload.to_vec())?),
                OP_BINARY => Incoming::Binary(payload.len()),
                OP_CONTINUATION => {
                    let Some((_, so_far)) = self.fragments.as_mut() else {
                        return Err(FrameError::Protocol("a continuation frame with no message"));
                    };
                    so_far.extend_from_slice(payload);
                    if !fin {
                        continue;
                    }
                    let (opcode, whole) = self.fragments.take().unwrap_or_default();
                    if opcode == OP_TEXT {
                        Incoming::Text(text(whole)?)
                    } else {
                        Incoming::Binary(whole.len())
                    }
                }
                OP_PING => Incoming::Ping(Bytes::copy_from_slice(payload)),
                OP_PONG => Incoming::Pong,
                _ => match payload {
                    [] => Incoming::Close(None),
                    [_] => return Err(FrameError::Protocol("a close frame of one byte")),
                    [hi, lo, ..] => Incoming::Close(Some(u16::from_be_bytes([*hi, *lo]))),
                },
            };
            return Ok(Some(message));
        }
    }

    /// The next complete frame, unmasked in place: its fin bit, opcode and payload range in
    /// `buf`. Refuses a frame as soon as its header shows it is not acceptable.
    fn next_frame(&mut self) -> Result<Option<(bool, u8, std::ops::Range<usize>)>, FrameError> {
        let b = &self.buf[self.start..];
        let [b0, b1, ..] = *b else {
            return Ok(None);
        };
        if b0 & 0x70 != 0 {
            return Err(FrameError::Protocol("reserved bits set"));
        }
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0F;
        if !matches!(
            opcode,
            OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
        ) {
            return Err(FrameError::Protocol("unknown opcode"));
        }
        if b1 & 0x80 == 0 {
            return Err(FrameError::Protocol("unmasked frame from a client"));
        }
        let (header, len) = match b1 & 0x7F {
            126 => match b.get(2..4) {
                Some(l) => (4, u64::from(u16::from_be_bytes([l[0], l[1]]))),
                None => return Ok(None),
            },
            127 => match b.get(2..10) {
                Some(l) => {
                    let mut be = [0u8; 8];
                    be.copy_from_slice(l);
                    (10, u64::from_be_bytes(be))
                }
                None => return Ok(None),
            },
            n => (2, u64::from(n)),
        };
        if opcode >= OP_CLOSE {
            if !fin {
                return Err(FrameError::Protocol("fragmented control frame"));
            }
            if len > 125 {
                return Err(FrameError::Protocol("control frame longer than 125 bytes"));
            }
        } else {
            let so_far = self.fragments.as_ref().map_or(0, |(_, f)| f.len() as u64);
            if len.saturating_add(so_far) > self.max_message as u64 {
                return Err(FrameError::TooLarge);
            }
        }
        // Bounded by max_message (or 125) above, so it fits.
        let len = len as usize;
        let total = header + 4 + len;
        if b.len() < total {
            self.buf.reserve(total - b.len());
            return Ok(None);
        }
        let mut mask = [0u8; 4];
        mask.copy_from_slice(&b[header..header + 4]);
        let payload = self.start + header + 4..self.start + total;
        unmask(&mut self.buf[payload.clone()], mask);
        self.start += total;
        Ok(Some((fin, opcode, payload)))
    }
}

fn text(bytes: Vec<u8>) -> Result<String, FrameError> {
    String::from_utf8(bytes).map_err(|_| FrameError::Utf8)
}

/// XORs `data` with the client's mask, eight bytes at a time.
fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let word = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(b) ^ word).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// Appends the header of a final, unmasked frame with a payload of `len` bytes.
pub fn put_header(opcode: u8, len: usize, out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    if len < 126 {
        out.push(len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        out.push(126);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// Appends a whole control or data frame.
pub fn put_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    put_header(opcode, payload.len(), out);
    out.extend_from_slice(payload);
}

/// Appends a close frame: no payload without a code, otherwise the code and `reason`.
pub fn put_close(code: Option<u16>, reason: &str, out: &mut Vec<u8>) {
    match code {
        None => put_header(OP_CLOSE, 0, out),
        Some(code) => {
            // Control payloads are at most 125 bytes: 2 for the code, the rest for the reason.
            let mut end = reason.len().min(123);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            put_header(OP_CLOSE, 2 + end, out);
            out.extend_from_slice(&code.to_be_bytes());
            out.extend_from_slice(&reason.as_bytes()[..end]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn decode_all(d: &mut Decoder) -> Vec<Result<Incoming, FrameError>> {
        let mut out = Vec::new();
        loop {
            match d.next_message() {
                Ok(Some(m)) => out.push(Ok(m)),
                Ok(None) => return out,
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
    }

    #[test]
    fn decodes_messages_fed_in_any_pieces_and_frees_its_buffer() {
        let long = "é".repeat(40_000);
        let mut stream = Vec::new();
        stream.extend(client_frame(true, OP_TEXT, b"{\"id\":1}"));
        stream.extend(client_frame(true, OP_PING, b"hi"));
        stream.extend(client_frame(false, OP_TEXT, "ab".as_bytes()));
        stream.extend(client_frame(true, OP_PONG, b""));
        stream.extend(client_frame(false, OP_CONTINUATION, "cd".as_bytes()));
        stream.extend(client_frame(true, OP_CONTINUATION, "é".as_bytes()));
        stream.extend(client_frame(true, OP_TEXT, long.as_bytes()));
        stream.extend(client_frame(true, OP_BINARY, &[1, 2, 3]));
        stream.extend(client_frame(true, OP_CLOSE, &[0x03, 0xe8, b'o', b'k']));
        let expect = vec![
            Ok(Incoming::Text("{\"id\":1}".into())),
            Ok(Incoming::Ping(Bytes::from_static(b"hi"))),
            Ok(Incoming::Pong),
            Ok(Incoming::Text("abcdé".into())),
            Ok(Incoming::Text(long.clone())),
            Ok(Incoming::Binary(3)),
            Ok(Incoming::Close(Some(1000))),
        ];
        for piece in [1, 2, 3, 7, 100, 5000, stream.len()] {
            let mut d = Decoder::new(1 << 20);
            let mut got = Vec::new();
            for chunk in stream.chunks(piece) {
                d.extend(chunk);
                got.extend(decode_all(&mut d));
            }
            assert_eq!(got, expect, "pieces of {piece}");
            assert!(d.is_empty(), "pieces of {piece}: {d:?}");
        }
    }

    #[test]
    fn refuses_what_a_client_must_not_send() {
        let cases: Vec<(Vec<u8>, FrameError)> = vec![
            (
                vec![0x81, 0x02, b'h', b'i'],
                FrameError::Protocol("unmasked frame from a client"),
            ),
            (
                {
                    let mut f = client_frame(true, OP_TEXT, b"x");
                    f[0] |= 0x40;
                    f
                },
                FrameError::Protocol("reserved bits set"),
            ),
            (
                client_frame(true, 0x3, b""),
                FrameError::Protocol("unknown opcode"),
            ),
            (
                client_frame(false, OP_PING, b""),
                FrameError::Protocol("fragmented control frame"),
            ),
            (
                client_frame(true, OP_PING, &[0; 126]),
                FrameError::Protocol("control frame longer than 125 bytes"),
            ),
            (
                client_frame(true, OP_CONTINUATION, b"x"),
                FrameError::Protocol("a continuation frame with no message"),
            ),
            (
                [
                    client_frame(false, OP_TEXT, b"x"),
                    client_frame(true, OP_TEXT, b"y"),
                ]
                .concat(),
                FrameError::Protocol("a new message inside a fragmented one"),
            ),
            (client_frame(true, OP_TEXT, &[0xff, 0xfe]), FrameError::Utf8),
            (
                [
                    client_frame(false, OP_TEXT, &[0xc3]),
                    client_frame(true, OP_CONTINUATION, &[0x28]),
                ]
                .concat(),
                FrameError::Utf8,
            ),
            (
                client_frame(true, OP_TEXT, &[b'x'; 101]),
                FrameError::TooLarge,
            ),
            (
                [
                    client_frame(false, OP_TEXT, &[b'x'; 60]),
                    client_frame(true, 0, &[b'x'; 60]),
                ]
                .concat(),
                FrameError::TooLarge,
            ),
            (
                client_frame(true, OP_CLOSE, &[3]),
                FrameError::Protocol("a close frame of one byte"),
            ),
        ];
        for (bytes, want) in cases {
            let mut d = Decoder::new(100);
            d.extend(&bytes);
            assert_eq!(decode_all(&mut d).pop(), Some(Err(want)), "{bytes:x?}");
        }
        // Too large is seen from the header alone, before the payload arrives.
        let mut d = Decoder::new(100);
        d.extend(&client_frame(true, OP_TEXT, &[b'x'; 70_000])[..10]);
        assert_eq!(d.next_message(), Err(FrameError::TooLarge));
        let mut d = Decoder::new(100);
        d.extend(&[0x81, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(d.next_message(), Err(FrameError::TooLarge));
    }

    #[test]
    fn encodes_server_frames() {
        let mut out = Vec::new();
        put_frame(OP_TEXT, b"hi", &mut out);
        assert_eq!(out, [0x81, 2, b'h', b'i']);
        for (len, head) in [(125, 2), (126, 4), (65_535, 4), (65_536, 10)] {
            out.clear();
            put_header(OP_TEXT, len, &mut out);
            assert_eq!(out.len(), head, "{len}");
        }
        out.clear();
        put_header(OP_TEXT, 300, &mut out);
        assert_eq!(out, [0x81, 126, 1, 44]);
        out.clear();
        put_close(Some(3001), "slow consumer", &mut out);
        assert_eq!(&out[..4], [0x88, 15, 0x0b, 0xb9]);
        assert_eq!(&out[4..], b"slow consumer");
        out.clear();
        put_close(Some(1000), &"é".repeat(100), &mut out);
        assert_eq!(out.len(), 2 + 2 + 122);
        out.clear();
        put_close(None, "ignored", &mut out);
        assert_eq!(out, [0x88, 0]);
    }

    #[test]
    fn unmasks_any_length() {
        for n in 0..40 {
            let data: Vec<u8> = (0..n as u8).collect();
            let mask = [1, 2, 3, 4];
            let mut masked: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            unmask(&mut masked, mask);
            assert_eq!(masked, data);
        }
    }
}
