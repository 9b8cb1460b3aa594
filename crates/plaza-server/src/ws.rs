//! The native protocol's WebSocket endpoint: one task per connection, running a reader and a
//! writer side by side.
//!
//! The reader decodes frames, runs them through the [`Session`] and queues the replies. The
//! writer drains the queue: it `feed`s every frame that is ready and flushes once per drain, so a
//! burst of publications costs one write system call, not one per frame.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use plaza_core::{CloseCode, ErrorCode, Outcome, ReplyError};
use plaza_protocol::native::{self, RequestId};

use crate::auth::app::Forwarded;
use crate::conn::{ConnHandle, Outgoing, Queue};
use crate::node::Node;
use crate::session::Session;

/// How long the writer may take to deliver the close frame before the socket is dropped.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most publishes one connection may have waiting for durability before it stops reading.
const MAX_PENDING_REPLIES: usize = 1024;
/// Most frames fed before one flush, so one busy connection cannot monopolise its task.
const MAX_FRAMES_PER_FLUSH: usize = 256;

pub async fn upgrade(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    ws: WebSocketUpgrade,
) -> Response {
    // The app sees the upgrade request's cookies and chosen headers when Plaza asks it later.
    let forwarded = node
        .auth
        .app
        .as_ref()
        .map(|app| app.capture(&headers, query.as_deref()))
        .unwrap_or_default();
    let limits = &node.settings.limits;
    ws.max_message_size(limits.max_frame_size)
        .max_frame_size(limits.max_frame_size)
        .read_buffer_size(node.settings.ws_read_buffer_size)
        .write_buffer_size(node.settings.ws_write_buffer_size)
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "websocket upgrade failed"))
        .on_upgrade(move |socket| run(node, socket, forwarded))
}

async fn run(node: Arc<Node>, socket: WebSocket, forwarded: Forwarded) {
    let id = node.next_conn_id();
    let (handle, queue) = ConnHandle::new(id, node.settings.limits.max_queue_bytes, Instant::now());
    let conn = Arc::new(handle);
    node.hub.register(Arc::clone(&conn));
    tracing::debug!(conn = id, "connection opened");

    let (sink, stream) = socket.split();
    let mut session = Session::new(Arc::clone(&node), Arc::clone(&conn), forwarded);
    let reader = read_loop(&node, &conn, &mut session, stream);
    let writer = write_loop(&node, &conn, queue, sink);
    tokio::join!(reader, writer);

    let name = session.client_name().map(str::to_owned);
    session.end().await;
    node.hub.deregister(id);
    let code = conn.close_code();
    tracing::debug!(conn = id, name = ?name, close = ?code, "connection closed");
}

async fn read_loop(
    node: &Node,
    conn: &Arc<ConnHandle>,
    session: &mut Session,
    mut stream: SplitStream<WebSocket>,
) {
    let metrics = &node.hub.metrics;
    // Publishes waiting to be durable. Reading goes on meanwhile, so one connection can keep
    // many publishes in flight and group commit can batch them.
    let mut pending =
        FuturesUnordered::<BoxFuture<'static, (RequestId, Result<Outcome, ReplyError>)>>::new();
    loop {
        let message = tokio::select! {
            biased;
            () = conn.closed() => return,
            Some((id, outcome)) = pending.next(), if !pending.is_empty() => {
                let outcome = outcome.map_err(|e| node.count(e));
                let _ = conn.push_text(Utf8Bytes::from(native::encode_reply(&id, &outcome)));
                continue;
            }
            m = stream.next(), if pending.len() < MAX_PENDING_REPLIES => m,
        };
        let message = match message {
            None => break,
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                let code = classify_read_error(&e);
                if let Some(code) = code {
                    tracing::debug!(conn = conn.id, error = %e, "closing on a bad frame");
                    conn.close(code);
                } else {
                    tracing::debug!(conn = conn.id, error = %e, "read failed");
                }
                break;
            }
        };
        conn.mark_alive();
        metrics.frames_received_total.fetch_add(1, Relaxed);
        match message {
            Message::Text(text) => {
                metrics
                    .bytes_received_total
                    .fetch_add(text.len() as u64, Relaxed);
                let (reply, recoveries, close_after, attach_live) =
                    match native::decode(text.as_str()) {
                        Ok(request) => {
                            let handled = session.handle(request.command).await;
                            if let Some(later) = handled.pending {
                                let id = request.id;
                                pending.push(Box::pin(async move { (id, later.await) }));
                                continue;
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
                    return;
                }
            }
            Message::Binary(data) => {
                metrics
                    .bytes_received_total
                    .fetch_add(data.len() as u64, Relaxed);
                let error = node.count(ReplyError::new(
                    ErrorCode::BinaryNotSupported,
                    "binary messages are not supported: send JSON as text",
                ));
                let _ = conn.push_text(Utf8Bytes::from(native::encode_error(None, &error)));
            }
            Message::Ping(_) | Message::Pong(_) => {}
            Message::Close(_) => break,
        }
    }
    // The client went away or the read side failed: let the writer finish.
    if !conn.is_draining() {
        conn.close_quietly();
    }
}

/// A read error caused by the client's frames gets a close code; a dropped socket does not.
fn classify_read_error(error: &axum::Error) -> Option<CloseCode> {
    use std::error::Error as _;
    let inner = error.source()?;
    let ws = inner.downcast_ref::<tungstenite::Error>()?;
    match ws {
        tungstenite::Error::Capacity(_) => Some(CloseCode::MessageTooLarge),
        tungstenite::Error::Protocol(_) | tungstenite::Error::Utf8(_) => {
            Some(CloseCode::ProtocolViolation)
        }
        _ => None,
    }
}

async fn write_loop(
    node: &Node,
    conn: &ConnHandle,
    mut queue: Queue,
    mut sink: SplitSink<WebSocket, Message>,
) {
    let metrics = &node.hub.metrics;
    loop {
        let first = tokio::select! {
            biased;
            () = conn.closed() => break,
            next = queue.recv() => match next {
                Some(item) => item,
                None => break,
            },
        };
        let drained = tokio::select! {
            biased;
            () = conn.closed() => break,
            r = write_batch(conn, metrics, &mut queue, &mut sink, first) => r,
        };
        if let Err(e) = drained {
            tracing::debug!(conn = conn.id, error = %e, "write failed");
            conn.close_quietly();
            return;
        }
    }
    let Some(code) = conn.close_code() else {
        let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, sink.close()).await;
        return;
    };
    metrics.disconnect(code);
    if code == CloseCode::SlowConsumer {
        metrics.slow_consumers_total.fetch_add(1, Relaxed);
        tracing::warn!(conn = conn.id, "slow consumer disconnected");
    }
    let frame = CloseFrame {
        code: code.code(),
        reason: Utf8Bytes::from_static(code.reason()),
    };
    // Frames still queued are dropped: the client recovers them after reconnecting.
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
        sink.send(Message::Close(Some(frame))).await?;
        sink.close().await
    })
    .await;
}

async fn write_batch(
    conn: &ConnHandle,
    metrics: &crate::metrics::Metrics,
    queue: &mut Queue,
    sink: &mut SplitSink<WebSocket, Message>,
    first: Outgoing,
) -> Result<(), axum::Error> {
    let mut next = Some(first);
    let mut fed = 0;
    while let Some(item) = next.take() {
        let message = match item {
            Outgoing::Text(text) => {
                let len = text.len();
                conn.dequeued(len);
                metrics.bytes_sent_total.fetch_add(len as u64, Relaxed);
                Message::Text(text)
            }
            Outgoing::Ping => Message::Ping(bytes::Bytes::new()),
            Outgoing::Close(code) => {
                // Everything before it is fed; the write loop sends the close frame.
                sink.flush().await?;
                conn.close(code);
                return Ok(());
            }
        };
        sink.feed(message).await?;
        fed += 1;
        if fed < MAX_FRAMES_PER_FLUSH {
            next = queue.try_recv();
        }
    }
    sink.flush().await
}
