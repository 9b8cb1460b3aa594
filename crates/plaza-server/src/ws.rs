//! The native protocol's WebSocket endpoint: one task per connection, running a reader and a
//! writer side by side over the same socket.
//!
//! The reader decodes frames, runs them through the [`Session`] and queues the replies. The
//! writer takes everything queued at once and writes it with one write call; consecutive text
//! frames (pushes and replies) are joined into one WebSocket text message, separated by `\n`,
//! up to `ws_write_buffer_size` bytes (docs/PROTOCOL.md, "Frames").
//!
//! The WebSocket framing is done here (`codec`) rather than by a library so that an idle
//! connection holds no buffer: reads go through one scratch buffer per thread, and the writer's
//! buffers are freed whenever its queue is empty. What a connection keeps while idle is its
//! task, its [`ConnHandle`] and its [`Session`].

mod codec;

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ws::Utf8Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use hyper_util::rt::TokioIo;
use plaza_core::{CloseCode, ErrorCode, Outcome, ReplyError};
use plaza_protocol::native::{self, RequestId};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::auth::app::Forwarded;
use crate::conn::{ConnHandle, Outgoing, Queue};
use crate::node::Node;
use crate::session::Session;
use codec::{Decoder, FrameError, Incoming};

/// How long the writer may take to deliver the close frame before the socket is dropped.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most publishes one connection may have waiting for durability before it stops reading.
const MAX_PENDING_REPLIES: usize = 1024;
/// A write buffer above this size is not kept for the next drain.
const KEEP_WRITE_BUFFER: usize = 64 * 1024;
/// A drain of at most this many bytes leaves the connection idle: its buffers are freed. (Bytes,
/// not queued items: a batch of publications is one item.)
const IDLE_DRAIN_BYTES: u64 = 512;

/// The upgrade request: checked as RFC 6455 asks, answered with 101, and the connection's task
/// spawned once hyper hands the socket over.
pub async fn upgrade(State(node): State<Arc<Node>>, mut request: Request) -> Response {
    let headers = request.headers();
    let key = match check_upgrade(headers) {
        Ok(key) => key,
        Err((status, why)) => {
            tracing::debug!(%status, why, "websocket upgrade refused");
            let mut response = (status, why).into_response();
            if status == StatusCode::UPGRADE_REQUIRED {
                response.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            return response;
        }
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    // The app sees the upgrade request's cookies and chosen headers when Plaza asks it later.
    let forwarded = node
        .auth
        .app
        .as_ref()
        .map(|app| app.capture(headers, request.uri().query()))
        .unwrap_or_default();
    if request
        .extensions()
        .get::<hyper::upgrade::OnUpgrade>()
        .is_none()
    {
        return (
            StatusCode::UPGRADE_REQUIRED,
            "connection cannot be upgraded",
        )
            .into_response();
    }
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => run(node, TokioIo::new(upgraded), forwarded).await,
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    });
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// The `Sec-WebSocket-Key` of a valid upgrade request, or why it is refused.
fn check_upgrade(headers: &HeaderMap) -> Result<String, (StatusCode, &'static str)> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has_token(header::CONNECTION, "upgrade") {
        return Err((
            StatusCode::BAD_REQUEST,
            "Connection header did not include 'upgrade'",
        ));
    }
    if !has_token(header::UPGRADE, "websocket") {
        return Err((
            StatusCode::BAD_REQUEST,
            "`Upgrade` header did not include 'websocket'",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        // Answered with `Sec-WebSocket-Version: 13` (RFC 6455 §4.4).
        return Err((
            StatusCode::UPGRADE_REQUIRED,
            "`Sec-WebSocket-Version` header did not include '13'",
        ));
    }
    match headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
    {
        Some(key) if !key.trim().is_empty() => Ok(key.trim().to_owned()),
        _ => Err((
            StatusCode::BAD_REQUEST,
            "`Sec-WebSocket-Key` header missing",
        )),
    }
}

/// What the reader and the writer of one connection share. Both run in the connection's task,
/// so the locks are never contended; they make the task `Send`.
struct Link<S> {
    io: Mutex<S>,
    /// A ping's payload the writer must answer with a pong.
    pong: Mutex<Option<Bytes>>,
    /// The status code of the client's close frame, echoed in ours (RFC 6455 §5.5.1).
    peer_close: Mutex<Option<Option<u16>>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Link<S> {
    fn io(&self) -> std::sync::MutexGuard<'_, S> {
        self.io.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take_pong(&self) -> Option<Bytes> {
        self.pong
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn has_pong(&self) -> bool {
        self.pong
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }
}

async fn run<S>(node: Arc<Node>, socket: S, forwarded: Forwarded)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let id = node.next_conn_id();
    let (handle, queue) = ConnHandle::new(
        id,
        node.settings.limits.max_queue_bytes,
        Instant::now(),
        &node.hub.backlog,
    );
    let conn = Arc::new(handle);
    node.hub.register(Arc::clone(&conn));
    tracing::debug!(conn = id, "connection opened");

    let link = Link {
        io: Mutex::new(socket),
        pong: Mutex::new(None),
        peer_close: Mutex::new(None),
    };
    let mut session = Session::new(Arc::clone(&node), Arc::clone(&conn), forwarded);
    // Not bound to locals first: a moved-from local still takes room in the task's future.
    tokio::join!(
        read_loop(&node, &conn, &mut session, &link),
        write_loop(&node, &conn, queue, &link)
    );

    let name = session.client_name().map(str::to_owned);
    // Boxed, like every await of the session, so that its futures do not weigh on the
    // connection's task while it is idle.
    Box::pin(session.end()).await;
    node.hub.deregister(id);
    let code = conn.close_code();
    tracing::debug!(conn = id, name = ?name, close = ?code, "connection closed");
}

/// Why the reader stopped.
enum ReadEnd {
    Eof,
    Frame(FrameError),
    Io(std::io::Error),
}

/// The next message from the client. Cancel-safe: bytes read are kept in `decoder`.
async fn next_message<S: AsyncRead + AsyncWrite + Unpin>(
    decoder: &mut Decoder,
    link: &Link<S>,
    max_read: usize,
) -> Result<Incoming, ReadEnd> {
    poll_fn(|cx| {
        loop {
            match decoder.next_message() {
                Ok(Some(m)) => return Poll::Ready(Ok(m)),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(ReadEnd::Frame(e))),
            }
            let mut io = link.io();
            match ready!(decoder.poll_fill(cx, &mut *io, max_read)) {
                Ok(0) => return Poll::Ready(Err(ReadEnd::Eof)),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(ReadEnd::Io(e))),
            }
        }
    })
    .await
}

type Pending = FuturesUnordered<BoxFuture<'static, (RequestId, Result<Outcome, ReplyError>)>>;

async fn read_loop<S: AsyncRead + AsyncWrite + Unpin>(
    node: &Node,
    conn: &Arc<ConnHandle>,
    session: &mut Session,
    link: &Link<S>,
) {
    let metrics = &node.hub.metrics;
    let mut decoder = Decoder::new(node.settings.limits.max_frame_size);
    let max_read = node.settings.ws_read_buffer_size;
    // Publishes waiting to be durable. Reading goes on meanwhile, so one connection can keep
    // many publishes in flight and group commit can batch them. Made on first use.
    let mut pending: Option<Pending> = None;
    loop {
        let in_flight = pending.as_ref().map_or(0, FuturesUnordered::len);
        let message = tokio::select! {
            biased;
            () = conn.closed() => return,
            Some((id, outcome)) = next_pending(&mut pending), if in_flight > 0 => {
                let outcome = outcome.map_err(|e| node.count(e));
                let _ = conn.push_text(Utf8Bytes::from(native::encode_reply(&id, &outcome)));
                if pending.as_ref().is_some_and(FuturesUnordered::is_empty) {
                    pending = None;
                }
                continue;
            }
            m = next_message(&mut decoder, link, max_read), if in_flight < MAX_PENDING_REPLIES => m,
        };
        let message = match message {
            Ok(m) => m,
            Err(ReadEnd::Eof) => break,
            Err(ReadEnd::Frame(e)) => {
                tracing::debug!(conn = conn.id, error = %e, "closing on a bad frame");
                conn.close(match e {
                    FrameError::TooLarge => CloseCode::MessageTooLarge,
                    FrameError::Utf8 | FrameError::Protocol(_) => CloseCode::ProtocolViolation,
                });
                break;
            }
            Err(ReadEnd::Io(e)) => {
                tracing::debug!(conn = conn.id, error = %e, "read failed");
                break;
            }
        };
        conn.mark_alive();
        metrics.frames_received_total.fetch_add(1, Relaxed);
        match message {
            Incoming::Text(text) => {
                metrics
                    .bytes_received_total
                    .fetch_add(text.len() as u64, Relaxed);
                // Boxed: what a request needs while it runs takes no room in the future of
                // an idle connection.
                if Box::pin(handle_text(node, conn, session, &mut pending, text)).await {
                    return;
                }
            }
            Incoming::Binary(len) => {
                metrics.bytes_received_total.fetch_add(len as u64, Relaxed);
                let error = node.count(ReplyError::new(
                    ErrorCode::BinaryNotSupported,
                    "binary messages are not supported: send JSON as text",
                ));
                let _ = conn.push_text(Utf8Bytes::from(native::encode_error(None, &error)));
            }
            Incoming::Ping(payload) => {
                *link.pong.lock().unwrap_or_else(PoisonError::into_inner) = Some(payload);
                conn.wake_writer();
            }
            Incoming::Pong => {}
            Incoming::Close(code) => {
                *link
                    .peer_close
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(code);
                break;
            }
        }
    }
    // The client went away or the read side failed: let the writer finish.
    if !conn.is_draining() {
        conn.close_quietly();
    }
}

/// Runs one request and queues its reply (and what follows it). Returns whether the connection
/// must stop reading (it closes once the reply is written).
async fn handle_text(
    node: &Node,
    conn: &Arc<ConnHandle>,
    session: &mut Session,
    pending: &mut Option<Pending>,
    text: String,
) -> bool {
    let metrics = &node.hub.metrics;
    let (reply, recoveries, close_after, attach_live) = match native::decode(&text) {
        Ok(request) => {
            drop(text);
            let handled = session.handle(request.command).await;
            if let Some(later) = handled.pending {
                let id = request.id;
                pending
                    .get_or_insert_with(FuturesUnordered::new)
                    .push(Box::pin(async move { (id, later.await) }));
                return false;
            }
            let reply = native::encode_reply(&request.id, &handled.outcome);
            (
                reply,
                handled.recoveries,
                handled.close_after,
                handled.attach_live,
            )
        }
        Err(e) => (
            native::encode_error(e.id.as_ref(), &node.count(e.error)),
            Vec::new(),
            None,
            Vec::new(),
        ),
    };
    // The reply goes first: with the first new subscription's recovered
    // publications if there is one, otherwise alone.
    let mut reply = Some(Utf8Bytes::from(reply));
    for r in recoveries {
        let missed = r
            .publications
            .iter()
            .map(|p| Utf8Bytes::from(native::encode_publication(p)));
        let queued = r
            .subscriber
            .unpark(reply.take().into_iter().chain(missed), r.last_offset);
        metrics
            .deliveries_total
            .fetch_add(r.publications.len().min(queued) as u64, Relaxed);
    }
    if let Some(reply) = reply {
        // A refused reply means the connection is closing; the writer ends it.
        let _ = conn.push_text(reply);
    }
    for sub in attach_live {
        if !sub.attach(conn) {
            node.live.cancel(sub.id);
            let _ = conn.push_text(Utf8Bytes::from(native::encode_live_cancelled(
                sub.id,
                "too many deltas waited for this view; authorize it again",
            )));
        }
    }
    if let Some(code) = close_after {
        conn.close_after_queue(code);
        return true;
    }
    false
}

async fn next_pending(
    pending: &mut Option<Pending>,
) -> Option<(RequestId, Result<Outcome, ReplyError>)> {
    match pending {
        Some(p) => p.next().await,
        None => None,
    }
}

/// Appends the frames for `items` to `out`, stopping at a close marker (returned). Runs of
/// text frames become one text message each, joined by `\n`, up to `max_batch` bytes; a frame
/// larger than that goes alone. Returns the close marker, the text frames and their bytes.
fn encode_batch(
    items: &mut VecDeque<Outgoing>,
    out: &mut Vec<u8>,
    max_batch: usize,
) -> (Option<CloseCode>, u64, u64) {
    let (mut frames, mut bytes) = (0u64, 0u64);
    // One allocation for the whole drain: every frame, a separator or a header each.
    let needed: usize = items
        .iter()
        .map(|i| match i {
            Outgoing::Text(t) => t.len() + 1,
            _ => 2,
        })
        .sum();
    out.reserve(needed + 10 * (1 + needed / max_batch.max(1)));
    while let Some(item) = items.pop_front() {
        let first = match item {
            Outgoing::Text(text) => {
                debug_assert_no_line_feed(&text);
                text
            }
            Outgoing::Ping => {
                codec::put_header(codec::OP_PING, 0, out);
                continue;
            }
            Outgoing::Close(code) => return (Some(code), frames, bytes),
        };
        // How many of the following text frames join this message.
        let mut len = first.len();
        let mut joined = 0;
        for next in items.iter() {
            match next {
                Outgoing::Text(t) if len + 1 + t.len() <= max_batch => {
                    len += 1 + t.len();
                    joined += 1;
                }
                _ => break,
            }
        }
        codec::put_header(codec::OP_TEXT, len, out);
        out.extend_from_slice(first.as_str().as_bytes());
        for _ in 0..joined {
            if let Some(Outgoing::Text(t)) = items.pop_front() {
                debug_assert_no_line_feed(&t);
                out.push(b'\n');
                out.extend_from_slice(t.as_str().as_bytes());
            }
        }
        frames += 1 + joined;
        bytes += len as u64;
    }
    (None, frames, bytes)
}

/// Every object the server queues is one line (docs/PROTOCOL.md, "Frames"), and an item holds
/// one or more of them (a batch of publications is queued as one item); the debug builds that run
/// the tests check that no line is empty, which is what a raw line feed inside an object makes
/// likely.
fn debug_assert_no_line_feed(text: &Utf8Bytes) {
    debug_assert!(
        text.as_str().split('\n').all(|line| !line.is_empty()),
        "a queued frame holds an empty line (a raw line feed?): {text:?}"
    );
}

/// Writes `out[*written..]`; `Ok(false)` if the connection started closing first (the rest
/// stays in `out`).
async fn write_out<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &ConnHandle,
    queue: &Queue,
    link: &Link<S>,
    out: &[u8],
    written: &mut usize,
) -> std::io::Result<bool> {
    poll_fn(|cx| {
        loop {
            if conn.is_closing() {
                return Poll::Ready(Ok(false));
            }
            if *written == out.len() {
                return Poll::Ready(Ok(true));
            }
            // A close must wake this task even while the socket is not writable.
            queue.register(cx);
            let mut io = link.io();
            match ready!(Pin::new(&mut *io).poll_write(cx, &out[*written..])) {
                Ok(0) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => *written += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    })
    .await
}

async fn write_loop<S: AsyncRead + AsyncWrite + Unpin>(
    node: &Node,
    conn: &ConnHandle,
    mut queue: Queue,
    link: &Link<S>,
) {
    let metrics = &node.hub.metrics;
    let max_batch = node.settings.ws_write_buffer_size;
    let mut items = VecDeque::new();
    let mut out = Vec::new();
    let mut written = 0;
    // Bytes of the last drain: after a small one the connection is taken as idle and its
    // buffers are freed; after a large one they are kept for the next drain, which is likely
    // to come soon (the keep-alive timer frees the queue's later if it does not).
    let mut last_drain = 0;
    loop {
        let ready = poll_fn(|cx: &mut Context<'_>| {
            if conn.is_closing() {
                return Poll::Ready(false);
            }
            if link.has_pong() {
                return Poll::Ready(true);
            }
            let release = last_drain <= IDLE_DRAIN_BYTES;
            let taken = queue.poll_take(cx, &mut items, release);
            if taken.is_pending() && release {
                items = VecDeque::new();
                out = Vec::new();
            }
            taken.map(|()| true)
        })
        .await;
        if !ready {
            break;
        }
        out.clear();
        written = 0;
        if let Some(payload) = link.take_pong() {
            codec::put_frame(codec::OP_PONG, &payload, &mut out);
        }
        let (close, _frames, bytes) = encode_batch(&mut items, &mut out, max_batch);
        last_drain = bytes;
        // Anything after a close marker is dropped (nothing is queued after one).
        items.clear();
        metrics.bytes_sent_total.fetch_add(bytes, Relaxed);
        match write_out(conn, &queue, link, &out, &mut written).await {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                tracing::debug!(conn = conn.id, error = %e, "write failed");
                conn.close_quietly();
                return;
            }
        }
        if let Some(code) = close {
            conn.close(code);
            break;
        }
        if out.capacity() > KEEP_WRITE_BUFFER {
            out = Vec::new();
        }
    }
    // Boxed: the close timer would otherwise take room in every idle connection's future.
    Box::pin(finish(node, conn, link, out, written)).await;
}

/// Sends the close frame (after whatever of the last batch was not written yet, so the client
/// never sees half a message) and shuts the socket down, within [`CLOSE_WRITE_TIMEOUT`].
async fn finish<S: AsyncRead + AsyncWrite + Unpin>(
    node: &Node,
    conn: &ConnHandle,
    link: &Link<S>,
    mut out: Vec<u8>,
    written: usize,
) {
    let metrics = &node.hub.metrics;
    out.drain(..written.min(out.len()));
    match conn.close_code() {
        None => {
            let peer = *link
                .peer_close
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            codec::put_close(peer.flatten(), "", &mut out);
        }
        Some(code) => {
            metrics.disconnect(code);
            if code == CloseCode::SlowConsumer {
                metrics.slow_consumers_total.fetch_add(1, Relaxed);
                tracing::warn!(conn = conn.id, "slow consumer disconnected");
            }
            // Frames still queued are dropped: the client recovers them after reconnecting.
            codec::put_close(Some(code.code()), code.reason(), &mut out);
        }
    }
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
        let mut written = 0;
        poll_fn(|cx| {
            let mut io = link.io();
            while written < out.len() {
                match ready!(Pin::new(&mut *io).poll_write(cx, &out[written..])) {
                    Ok(n) if n > 0 => written += n,
                    _ => return Poll::Ready(()),
                }
            }
            let _ = ready!(Pin::new(&mut *io).poll_shutdown(cx));
            Poll::Ready(())
        })
        .await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Outgoing {
        Outgoing::Text(Utf8Bytes::from(s.to_owned()))
    }

    /// The messages of a run of server frames: (opcode, payload).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, String)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let opcode = bytes[0] & 0x0F;
            let (head, len) = match bytes[1] {
                126 => (4, usize::from(u16::from_be_bytes([bytes[2], bytes[3]]))),
                127 => (
                    10,
                    u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                ),
                n => (2, usize::from(n)),
            };
            out.push((
                opcode,
                String::from_utf8(bytes[head..head + len].to_vec()).unwrap(),
            ));
            bytes = &bytes[head + len..];
        }
        out
    }

    #[test]
    fn joins_queued_text_frames_up_to_the_cap() {
        let mut items: VecDeque<Outgoing> = [
            text("{\"a\":1}"),
            text("{\"b\":2}"),
            Outgoing::Ping,
            text("{\"c\":3}"),
            text(&"x".repeat(20)),
            text(&"y".repeat(40)),
            text("{\"d\":4}"),
            Outgoing::Close(CloseCode::Shutdown),
            text("after"),
        ]
        .into();
        let mut out = Vec::new();
        let (close, n, bytes) = encode_batch(&mut items, &mut out, 32);
        assert_eq!(close, Some(CloseCode::Shutdown));
        assert_eq!(n, 6);
        assert_eq!(
            frames(&out),
            [
                (codec::OP_TEXT, "{\"a\":1}\n{\"b\":2}".to_owned()),
                (codec::OP_PING, String::new()),
                (codec::OP_TEXT, format!("{{\"c\":3}}\n{}", "x".repeat(20))),
                // Larger than the cap: alone.
                (codec::OP_TEXT, "y".repeat(40)),
                (codec::OP_TEXT, "{\"d\":4}".to_owned()),
            ]
        );
        assert_eq!(bytes, 15 + 28 + 40 + 7);
        assert_eq!(items.len(), 1);
    }
}
