//! A minimal WebSocket client (RFC 6455) for load generation.
//!
//! The subscriber side of a benchmark reads millions of small frames while sharing the CPU with
//! the server, so this client reads into one fixed buffer per connection (no zeroing per read, no
//! allocation per frame, no UTF-8 validation: the scanners only look for ASCII markers) and hands
//! out frame payloads as slices. It answers pings and close frames, reassembles fragmented
//! messages, and refuses what a server must not send (masked frames, reserved bits, unknown
//! opcodes). No extensions, no TLS.

use anyhow::{Context, Result, anyhow, bail};
use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::clock;

/// Largest message accepted from a server.
pub const MAX_MESSAGE: usize = 16 << 20;
/// Largest HTTP response head accepted during the handshake.
const MAX_HANDSHAKE: usize = 16 * 1024;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Why a connection cannot be read any more.
#[derive(Debug)]
pub enum WsError {
    /// The server sent something a server must not send.
    Protocol(&'static str),
    /// The TCP connection ended without a close frame.
    Eof,
    Io(std::io::Error),
}

impl fmt::Display for WsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WsError::Protocol(m) => write!(f, "protocol error: {m}"),
            WsError::Eof => write!(f, "connection closed without a close frame"),
            WsError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for WsError {}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    pub fin: bool,
    pub opcode: u8,
    /// Servers never mask; a masked frame is refused by the reader.
    pub masked: bool,
    pub header_len: usize,
    pub payload_len: usize,
}

/// Parses the frame header at the start of `buf`: `Ok(None)` while incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<FrameHead>, WsError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(WsError::Protocol("reserved bits set"));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    if !matches!(
        opcode,
        OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err(WsError::Protocol("unknown opcode"));
    }
    let masked = b1 & 0x80 != 0;
    let (mut header_len, payload_len) = match b1 & 0x7F {
        126 => {
            let Some(b) = buf.get(2..4) else {
                return Ok(None);
            };
            (4, usize::from(u16::from_be_bytes([b[0], b[1]])))
        }
        127 => {
            let Some(b) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut be = [0u8; 8];
            be.copy_from_slice(b);
            let len = u64::from_be_bytes(be);
            if len > MAX_MESSAGE as u64 {
                return Err(WsError::Protocol("frame too large"));
            }
            (10, len as usize)
        }
        n => (2, usize::from(n)),
    };
    if opcode >= OP_CLOSE && (!fin || payload_len > 125) {
        return Err(WsError::Protocol("bad control frame"));
    }
    if payload_len > MAX_MESSAGE {
        return Err(WsError::Protocol("frame too large"));
    }
    if masked {
        header_len += 4;
    }
    if buf.len() < header_len {
        return Ok(None);
    }
    Ok(Some(FrameHead {
        fin,
        opcode,
        masked,
        header_len,
        payload_len,
    }))
}

/// Appends one final, masked client frame to `out`.
pub fn encode_frame(opcode: u8, payload: &[u8], mask: [u8; 4], out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
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
}

/// A message received, borrowed from the connection's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    Text(&'a [u8]),
    Binary(&'a [u8]),
    /// The server closed the connection, with this close code (none if the frame had none).
    Close(Option<u16>),
}

/// An owned [`Event`], for the handshake phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Close(Option<u16>),
}

impl From<Event<'_>> for Message {
    fn from(e: Event<'_>) -> Self {
        match e {
            Event::Text(t) => Message::Text(t.to_vec()),
            Event::Binary(b) => Message::Binary(b.to_vec()),
            Event::Close(c) => Message::Close(c),
        }
    }
}

/// Where a `ws://host:port/path` URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsTarget {
    pub addr: String,
    pub host: String,
    pub path: String,
}

impl WsTarget {
    pub fn parse(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("ws://")
            .with_context(|| format!("{url:?}: only ws:// URLs are supported"))?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        if authority.is_empty() {
            bail!("{url:?}: no host");
        }
        let addr = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.contains(']'))
        {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(Self {
            addr,
            host: authority.to_string(),
            path,
        })
    }
}

/// Outcome of draining the buffer.
enum Drained {
    /// Everything complete was handled; `need` more bytes make the next frame complete.
    More { need: usize },
    /// A close frame was handled.
    Closed,
}

/// One client WebSocket connection.
pub struct WsConn {
    tcp: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Opcode and payload of a fragmented message being reassembled.
    frag: Option<(u8, Vec<u8>)>,
    /// Pongs and the close echo waiting to be written.
    out: Vec<u8>,
    /// Messages read during the handshake phase and not handed out yet.
    pending: VecDeque<Message>,
    rng: u64,
    closed: bool,
    last_read_ns: u64,
}

impl fmt::Debug for WsConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsConn")
            .field("buffered", &(self.end - self.start))
            .field("closed", &self.closed)
            .finish()
    }
}

impl WsConn {
    /// Connects and performs the opening handshake, within `timeout`. `read_buffer` is the size
    /// of this connection's read buffer (it grows only for a message larger than it).
    pub async fn connect(target: &WsTarget, read_buffer: usize, timeout: Duration) -> Result<Self> {
        tokio::time::timeout(timeout, Self::handshake(target, read_buffer))
            .await
            .map_err(|_| {
                anyhow!(
                    "WebSocket handshake with {}: no answer within {timeout:?}",
                    target.addr
                )
            })?
    }

    async fn handshake(target: &WsTarget, read_buffer: usize) -> Result<Self> {
        let tcp = TcpStream::connect(&target.addr)
            .await
            .with_context(|| format!("connecting to {}", target.addr))?;
        tcp.set_nodelay(true)?;
        let mut conn = WsConn {
            tcp,
            buf: vec![0; read_buffer.max(256)],
            start: 0,
            end: 0,
            frag: None,
            out: Vec::new(),
            pending: VecDeque::new(),
            rng: seed(),
            closed: false,
            last_read_ns: 0,
        };
        let key = generate_key();
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
            target.path, target.host
        );
        conn.tcp.write_all(request.as_bytes()).await?;
        // Read the response head; what follows it is the first frames.
        let head_end = loop {
            if let Some(i) = conn.buf[..conn.end]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
            {
                break i;
            }
            if conn.end >= MAX_HANDSHAKE {
                bail!("handshake response head too large");
            }
            if conn.end == conn.buf.len() {
                conn.buf.resize(conn.buf.len() * 2, 0);
            }
            let n = tokio::io::AsyncReadExt::read(&mut conn.tcp, &mut conn.buf[conn.end..]).await?;
            if n == 0 {
                bail!("the server closed the connection during the handshake");
            }
            conn.end += n;
        };
        let head = String::from_utf8_lossy(&conn.buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap_or_default();
        if status.split(' ').nth(1) != Some("101") {
            bail!("the server refused the WebSocket upgrade: {status:?}");
        }
        let accept = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("sec-websocket-accept"))
            .map(|(_, v)| v.trim().to_string());
        if accept.as_deref() != Some(derive_accept_key(key.as_bytes()).as_str()) {
            bail!("bad Sec-WebSocket-Accept in the upgrade response");
        }
        conn.start = head_end + 4;
        if conn.start == conn.end {
            conn.start = 0;
            conn.end = 0;
        }
        Ok(conn)
    }

    fn next_mask(&mut self) -> [u8; 4] {
        // xorshift64: servers do not check that masks are unpredictable, only that they exist.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng as u32).to_le_bytes()
    }

    /// Sends one text message (and any pending control reply).
    pub async fn send_text(&mut self, text: &[u8]) -> Result<()> {
        let mask = self.next_mask();
        let mut out = std::mem::take(&mut self.out);
        encode_frame(OP_TEXT, text, mask, &mut out);
        self.tcp.write_all(&out).await.context("sending a frame")?;
        Ok(())
    }

    /// Sends one binary message (and any pending control reply).
    pub async fn send_binary(&mut self, data: &[u8]) -> Result<()> {
        let mask = self.next_mask();
        let mut out = std::mem::take(&mut self.out);
        encode_frame(OP_BINARY, data, mask, &mut out);
        self.tcp.write_all(&out).await.context("sending a frame")?;
        Ok(())
    }

    /// Sends one message as a text or a binary frame.
    pub async fn send(&mut self, data: &[u8], binary: bool) -> Result<()> {
        if binary {
            self.send_binary(data).await
        } else {
            self.send_text(data).await
        }
    }

    /// Appends one masked frame (text or binary) carrying `data` to `out`.
    pub fn encode_message(&mut self, data: &[u8], binary: bool, out: &mut Vec<u8>) {
        let mask = self.next_mask();
        encode_frame(if binary { OP_BINARY } else { OP_TEXT }, data, mask, out);
    }

    /// Queues one message (a protocol-level pong) to go out with the control replies: it is
    /// written by the next [`Self::poll_events`] or [`Self::poll_flush`].
    pub fn queue_message(&mut self, data: &[u8], binary: bool) {
        let mask = self.next_mask();
        encode_frame(
            if binary { OP_BINARY } else { OP_TEXT },
            data,
            mask,
            &mut self.out,
        );
    }

    /// Writes what is queued, as far as the socket takes it now (best effort: the rest goes
    /// out on a later call, and the task is woken when the socket is writable again).
    pub fn poll_flush(&mut self, cx: &mut TaskContext<'_>) {
        while !self.out.is_empty() && !self.closed {
            match Pin::new(&mut self.tcp).poll_write(cx, &self.out) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    self.out.drain(..n);
                }
                _ => break,
            }
        }
    }

    /// Appends one masked text frame carrying `text` to `out`, to be written with
    /// [`Self::write_all`] (several frames go out in one write).
    pub fn encode_text(&mut self, text: &[u8], out: &mut Vec<u8>) {
        let mask = self.next_mask();
        encode_frame(OP_TEXT, text, mask, out);
    }

    /// Writes any pending control reply, then `bytes` (frames from [`Self::encode_text`]).
    pub async fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        if !self.out.is_empty() {
            let out = std::mem::take(&mut self.out);
            self.tcp
                .write_all(&out)
                .await
                .context("sending a control frame")?;
        }
        self.tcp.write_all(bytes).await.context("sending frames")?;
        Ok(())
    }

    /// The next message, within `timeout`.
    pub async fn next_message(&mut self, timeout: Duration) -> Result<Message> {
        if let Some(m) = self.pending.pop_front() {
            return Ok(m);
        }
        let read = poll_fn(|cx| {
            let mut got = VecDeque::new();
            let r = self.poll_events(cx, &mut |e, _| got.push_back(Message::from(e)));
            let done = match r {
                Poll::Pending if got.is_empty() => return Poll::Pending,
                Poll::Ready(Err(e)) if got.is_empty() => Err(e),
                _ => Ok(()),
            };
            self.pending.extend(got);
            Poll::Ready(done)
        });
        tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| anyhow!("no message within {timeout:?}"))??;
        self.pending
            .pop_front()
            .ok_or_else(|| anyhow!("the connection ended"))
    }

    /// When the last bytes were read ([`clock::now_ns`]).
    pub fn last_read_ns(&self) -> u64 {
        self.last_read_ns
    }

    /// Puts a message back in front of the ones [`Self::next_message`] and
    /// [`Self::take_pending`] return (bytes a handshake read past its reply).
    pub fn push_pending(&mut self, m: Message) {
        self.pending.push_front(m);
    }

    /// Messages read during the handshake phase and not returned by [`Self::next_message`].
    pub fn take_pending(&mut self) -> VecDeque<Message> {
        std::mem::take(&mut self.pending)
    }

    /// Reads what the socket has and calls `f` for every complete message, with the time
    /// ([`clock::now_ns`]) at which its last bytes were read. `Pending` once the socket is
    /// drained; `Ready(Ok)` after a close frame; `Ready(Err)` when the connection broke.
    pub fn poll_events(
        &mut self,
        cx: &mut TaskContext<'_>,
        f: &mut dyn FnMut(Event<'_>, u64),
    ) -> Poll<Result<(), WsError>> {
        if self.closed {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !self.out.is_empty() {
                // Best effort: a pong that does not fit now goes out on the next call.
                if let Poll::Ready(Ok(n)) = Pin::new(&mut self.tcp).poll_write(cx, &self.out) {
                    self.out.drain(..n);
                }
            }
            let need = match self.drain(f) {
                Ok(Drained::Closed) => {
                    self.closed = true;
                    if !self.out.is_empty() {
                        let _ = Pin::new(&mut self.tcp).poll_write(cx, &self.out);
                    }
                    return Poll::Ready(Ok(()));
                }
                Ok(Drained::More { need }) => need,
                Err(e) => {
                    self.closed = true;
                    return Poll::Ready(Err(e));
                }
            };
            // Room for the rest of the current frame.
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            } else if self.start + need > self.buf.len() || self.end == self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if need > self.buf.len() {
                self.buf.resize(need, 0);
            }
            let mut rb = ReadBuf::new(&mut self.buf[self.end..]);
            match Pin::new(&mut self.tcp).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    self.closed = true;
                    return Poll::Ready(Err(WsError::Io(e)));
                }
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        self.closed = true;
                        return Poll::Ready(Err(WsError::Eof));
                    }
                    self.end += n;
                    self.last_read_ns = clock::now_ns();
                }
            }
        }
    }

    /// Handles every complete frame in the buffer.
    fn drain(&mut self, f: &mut dyn FnMut(Event<'_>, u64)) -> Result<Drained, WsError> {
        let now = self.last_read_ns;
        loop {
            let avail = &self.buf[self.start..self.end];
            let Some(h) = parse_head(avail)? else {
                // At most 14 header bytes.
                return Ok(Drained::More { need: 14 });
            };
            let total = h.header_len + h.payload_len;
            if avail.len() < total {
                return Ok(Drained::More { need: total });
            }
            if h.masked {
                return Err(WsError::Protocol("masked frame from the server"));
            }
            let payload = &avail[h.header_len..total];
            self.start += total;
            match (h.opcode, h.fin, &mut self.frag) {
                (OP_TEXT, true, None) => f(Event::Text(payload), now),
                (OP_BINARY, true, None) => f(Event::Binary(payload), now),
                (OP_TEXT | OP_BINARY, false, frag @ None) => {
                    *frag = Some((h.opcode, payload.to_vec()));
                }
                (OP_CONTINUATION, fin, Some((op, data))) => {
                    if data.len() + payload.len() > MAX_MESSAGE {
                        return Err(WsError::Protocol("message too large"));
                    }
                    data.extend_from_slice(payload);
                    if fin {
                        if *op == OP_TEXT {
                            f(Event::Text(&data[..]), now);
                        } else {
                            f(Event::Binary(&data[..]), now);
                        }
                        self.frag = None;
                    }
                }
                (OP_CLOSE, _, _) => {
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    let echo = code.map(u16::to_be_bytes);
                    let mask = self.next_mask();
                    encode_frame(
                        OP_CLOSE,
                        echo.as_ref().map_or(&[][..], |c| &c[..]),
                        mask,
                        &mut self.out,
                    );
                    f(Event::Close(code), now);
                    return Ok(Drained::Closed);
                }
                (OP_PING, _, _) => {
                    let ping = payload.to_vec();
                    let mask = self.next_mask();
                    encode_frame(OP_PONG, &ping, mask, &mut self.out);
                }
                (OP_PONG, _, _) => {}
                _ => return Err(WsError::Protocol("bad fragmentation")),
            }
        }
    }
}

/// A per-connection seed for the masking keys.
fn seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
    let s = N.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed) ^ clock::now_ns();
    s | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_heads() {
        assert_eq!(parse_head(&[]).unwrap(), None);
        assert_eq!(parse_head(&[0x81]).unwrap(), None);
        let h = parse_head(&[0x81, 5, b'h']).unwrap().unwrap();
        assert_eq!(
            h,
            FrameHead {
                fin: true,
                opcode: OP_TEXT,
                masked: false,
                header_len: 2,
                payload_len: 5
            }
        );
        assert_eq!(parse_head(&[0x82, 126, 1]).unwrap(), None);
        let h = parse_head(&[0x82, 126, 1, 0]).unwrap().unwrap();
        assert_eq!((h.header_len, h.payload_len), (4, 256));
        let h = parse_head(&[0x01, 127, 0, 0, 0, 0, 0, 1, 0, 0])
            .unwrap()
            .unwrap();
        assert_eq!((h.fin, h.header_len, h.payload_len), (false, 10, 65536));
        let h = parse_head(&[0x89, 0x80 | 3, 1, 2, 3, 4]).unwrap().unwrap();
        assert_eq!((h.masked, h.header_len, h.payload_len), (true, 6, 3));
        assert_eq!(parse_head(&[0x89, 0x80 | 3, 1, 2, 3]).unwrap(), None);
    }

    #[test]
    fn refuses_bad_heads() {
        for bad in [
            &[0xC1u8, 0][..],                        // RSV1
            &[0x83, 0],                              // reserved opcode
            &[0x09, 0],                              // fragmented ping
            &[0x89, 126, 0, 126],                    // long ping
            &[0x81, 127, 0x80, 0, 0, 0, 0, 0, 0, 0], // huge
            &[0x81, 127, 0, 0, 0, 0, 0x10, 0, 0, 1], // over MAX_MESSAGE
        ] {
            assert!(parse_head(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn encodes_masked_frames() {
        let mut out = Vec::new();
        encode_frame(OP_TEXT, b"Hello", [0x37, 0xfa, 0x21, 0x3d], &mut out);
        // RFC 6455 section 5.7, "A single-frame masked text message".
        assert_eq!(
            out,
            [
                0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58
            ]
        );
        out.clear();
        encode_frame(OP_BINARY, &[0; 300], [0; 4], &mut out);
        assert_eq!(&out[..4], &[0x82, 0x80 | 126, 1, 44]);
        assert_eq!(out.len(), 4 + 4 + 300);
        out.clear();
        encode_frame(OP_BINARY, &vec![0; 70000], [0; 4], &mut out);
        assert_eq!(&out[..10], &[0x82, 0xFF, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
    }

    #[test]
    fn parses_targets() {
        let t = WsTarget::parse("ws://127.0.0.1:7700/plaza/ws").unwrap();
        assert_eq!(
            (t.addr.as_str(), t.path.as_str()),
            ("127.0.0.1:7700", "/plaza/ws")
        );
        let t = WsTarget::parse("ws://h?x=1").unwrap();
        assert_eq!((t.addr.as_str(), t.path.as_str()), ("h:80", "/?x=1"));
        let t = WsTarget::parse("ws://h:1").unwrap();
        assert_eq!(t.path, "/");
        assert!(WsTarget::parse("wss://h").is_err());
        assert!(WsTarget::parse("ws:///x").is_err());
    }

    /// A server side for the reader tests: accepts one connection, completes the upgrade and
    /// writes `frames` in pieces of `chunk` bytes.
    async fn serve(frames: Vec<u8>, chunk: usize) -> (WsTarget, tokio::task::JoinHandle<Vec<u8>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            let mut req = Vec::new();
            let mut b = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut b).await.unwrap();
                req.extend_from_slice(&b[..n]);
            }
            let req = String::from_utf8(req).unwrap();
            let key = req
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap()
                .trim()
                .to_string();
            let resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {}\r\n\r\n",
                derive_accept_key(key.as_bytes())
            );
            let mut all = resp.into_bytes();
            all.extend_from_slice(&frames);
            for piece in all.chunks(chunk) {
                s.write_all(piece).await.unwrap();
                s.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            // Whatever the client sent back (pongs, the close echo).
            let mut back = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_millis(300), s.read_to_end(&mut back)).await;
            back
        });
        (
            WsTarget::parse(&format!("ws://{addr}/plaza/ws")).unwrap(),
            h,
        )
    }

    fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n if n < 126 => v.push(n as u8),
            n if n < 65536 => {
                v.push(126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                v.push(127);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        v.extend_from_slice(payload);
        v
    }

    #[tokio::test]
    async fn reads_frames_split_anywhere() {
        // Byte-by-byte splits use a 300-byte frame (16-bit length); the 70,000-byte one (64-bit
        // length) goes in larger pieces, so the test does not depend on the machine's load.
        for (chunk, size) in [(1, 300), (7, 300), (4096, 70_000), (1 << 20, 70_000)] {
            let big = vec![b'x'; size];
            let mut frames = Vec::new();
            frames.extend(server_frame(true, OP_TEXT, b"one"));
            frames.extend(server_frame(true, OP_PING, b"p"));
            frames.extend(server_frame(false, OP_TEXT, b"tw"));
            frames.extend(server_frame(true, OP_CONTINUATION, b"o"));
            frames.extend(server_frame(true, OP_BINARY, &big));
            frames.extend(server_frame(true, OP_CLOSE, &3001u16.to_be_bytes()));
            let (target, server) = serve(frames, chunk).await;
            let mut c = WsConn::connect(&target, 256, Duration::from_secs(5))
                .await
                .unwrap();
            let mut got = Vec::new();
            loop {
                let m = c.next_message(Duration::from_secs(5)).await.unwrap();
                let end = matches!(m, Message::Close(_));
                got.push(m);
                if end {
                    break;
                }
            }
            assert_eq!(
                got,
                [
                    Message::Text(b"one".to_vec()),
                    Message::Text(b"two".to_vec()),
                    Message::Binary(big.clone()),
                    Message::Close(Some(3001)),
                ],
                "chunk {chunk}"
            );
            drop(c);
            let back = server.await.unwrap();
            // A masked pong with "p", then a masked close echoing 3001.
            assert_eq!(back[0], 0x80 | OP_PONG);
            assert_eq!(back[1], 0x80 | 1);
            assert_eq!(back[2 + 4] ^ back[2], b'p');
            assert_eq!(back[7], 0x80 | OP_CLOSE);
            assert_eq!(back.len(), 7 + 2 + 4 + 2);
        }
    }

    #[tokio::test]
    async fn masked_server_frames_are_refused() {
        let frames = vec![0x81, 0x81, 0, 0, 0, 0, b'x'];
        let (target, _server) = serve(frames, 1024).await;
        let mut c = WsConn::connect(&target, 256, Duration::from_secs(5))
            .await
            .unwrap();
        let e = c.next_message(Duration::from_secs(5)).await.unwrap_err();
        assert!(e.to_string().contains("masked"), "{e}");
    }
}
