//! The High-templar WebSocket endpoint: the bootstrap call before the upgrade is answered (as the
//! reference does), then one task per connection running a reader and a writer.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use plaza_core::CloseCode;
use plaza_protocol::hightemplar::{self as proto, AllowedRoom, ClientFrame, FrameError};

use super::{HighTemplar, HtConn, count_sent};
use crate::conn::{ConnHandle, Outgoing, Queue};

/// How long the writer may take to deliver the close frame before the socket is dropped.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most frames fed before one flush.
const MAX_FRAMES_PER_FLUSH: usize = 256;
/// High-templar closes every socket with 1000.
const NORMAL: u16 = 1000;

pub async fn upgrade(
    State(ht): State<Arc<HighTemplar>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    ws: WebSocketUpgrade,
) -> Response {
    // Like High-templar, answer the upgrade only once the app has answered.
    let forwarded = ht.bootstrap.headers(&headers, query.as_deref());
    let verdict = ht.bootstrap.call(forwarded).await;
    let settings = &ht.node.settings;
    ws.max_message_size(settings.limits.max_frame_size)
        .max_frame_size(settings.limits.max_frame_size)
        .read_buffer_size(settings.ws_read_buffer_size)
        .write_buffer_size(settings.ws_write_buffer_size)
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "websocket upgrade failed"))
        .on_upgrade(move |socket| async move {
            match verdict {
                Ok(rooms) => run(ht, socket, rooms).await,
                Err(refusal) => {
                    tracing::debug!(reason = %refusal, "High-templar connection refused");
                    deny(socket).await;
                }
            }
        })
}

/// `{"is_authorized": false}`, then close 1000.
async fn deny(mut socket: WebSocket) {
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
        socket
            .send(Message::Text(Utf8Bytes::from_static(proto::DENIED)))
            .await?;
        socket
            .send(Message::Close(Some(CloseFrame {
                code: NORMAL,
                reason: Utf8Bytes::from_static(""),
            })))
            .await?;
        // Wait for the client's close reply, so the close is clean.
        while let Some(Ok(message)) = socket.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
        Ok::<(), axum::Error>(())
    })
    .await;
}

/// Asks the writer to close with 1000 once the frames already queued are written.
pub(super) fn close_normally(c: &HtConn) {
    c.normal_close.store(true, Release);
    c.conn.close_after_queue(CloseCode::Shutdown);
}

async fn run(ht: Arc<HighTemplar>, socket: WebSocket, allowed: Vec<AllowedRoom>) {
    let node = &ht.node;
    let id = node.next_conn_id();
    let (handle, queue) = ConnHandle::new(
        id,
        node.settings.limits.max_queue_bytes,
        Instant::now(),
        &node.hub.backlog,
    );
    let conn = Arc::new(handle);
    // No `connect` step in this protocol: the bootstrap was it.
    conn.set_connected("");
    let mut random = [0u8; 16];
    if getrandom::fill(&mut random).is_err() {
        // Only the error frames' id depends on it; uniqueness comes from the counter.
        random[..8].copy_from_slice(&id.to_le_bytes());
    }
    let c = Arc::new(HtConn {
        conn: Arc::clone(&conn),
        uuid: proto::uuid4(random),
        allowed,
        state: Mutex::default(),
        last_frame_ms: AtomicU64::new(ht.now_ms()),
        normal_close: AtomicBool::new(false),
    });
    let _ = conn.push_text(Utf8Bytes::from(proto::encode_hello(&c.allowed)));
    node.hub.register(Arc::clone(&conn));
    ht.register(Arc::clone(&c));
    tracing::debug!(conn = id, "High-templar connection opened");

    let (sink, stream) = socket.split();
    tokio::join!(read_loop(&ht, &c, stream), write_loop(&ht, &c, queue, sink));

    ht.deregister(&c);
    node.hub.deregister(id);
    tracing::debug!(conn = id, "High-templar connection closed");
}

async fn read_loop(ht: &HighTemplar, c: &HtConn, mut stream: SplitStream<WebSocket>) {
    let conn = &c.conn;
    let metrics = &ht.node.hub.metrics;
    loop {
        let message = tokio::select! {
            biased;
            () = conn.closed() => break,
            m = stream.next() => m,
        };
        let message = match message {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::debug!(conn = conn.id, error = %e, "read failed");
                break;
            }
            None => break,
        };
        conn.mark_alive();
        metrics.frames_received_total.fetch_add(1, Relaxed);
        let frame = match &message {
            Message::Text(text) => proto::decode_text(text.as_str()),
            Message::Binary(data) => proto::decode_binary(data),
            // Protocol pings do not reset the idle timeout (H28).
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Close(_) => {
                ht.deregister(c);
                break;
            }
        };
        c.last_frame_ms.store(ht.now_ms(), Relaxed);
        ht.counters.ws_messages_received.fetch_add(1, Relaxed);
        if !handle(ht, c, frame) {
            return;
        }
    }
    // The client went away or the read side failed: deregister now, then let the writer
    // finish the close.
    ht.deregister(c);
    if !conn.is_draining() {
        conn.close_quietly();
    }
}

/// Answers one frame. `false`: the connection is closing.
fn handle(ht: &HighTemplar, c: &HtConn, frame: ClientFrame) -> bool {
    let reply = match frame {
        ClientFrame::Ping => proto::PONG.to_owned(),
        ClientFrame::Status => proto::encode_status(&ht.status()),
        ClientFrame::Subscribe { room, request_id } => {
            if c.allowed.iter().any(|a| a.room.admits(&room)) {
                ht.subscribe(c, &room, request_id);
                proto::SUCCESS.to_owned()
            } else {
                proto::encode_error(FrameError::RoomNotFound)
            }
        }
        ClientFrame::Unsubscribe { request_id } => {
            if ht.unsubscribe(c, &request_id) {
                proto::SUCCESS.to_owned()
            } else {
                proto::encode_error(FrameError::NotSubscribed)
            }
        }
        ClientFrame::Error(error) if error.carries_connection_id() => {
            proto::encode_connection_error(&c.uuid, error)
        }
        ClientFrame::Error(error) => proto::encode_error(error),
        ClientFrame::Close => {
            ht.deregister(c);
            close_normally(c);
            return false;
        }
    };
    if c.conn.push_text(Utf8Bytes::from(reply)).is_err() {
        ht.counters.ws_messages_send_error.fetch_add(1, Relaxed);
    }
    true
}

async fn write_loop(
    ht: &HighTemplar,
    c: &HtConn,
    mut queue: Queue,
    mut sink: SplitSink<WebSocket, Message>,
) {
    let conn = &c.conn;
    loop {
        let first = tokio::select! {
            biased;
            () = conn.closed() => break,
            next = queue.recv() => match next {
                Some(item) => item,
                None => break,
            },
        };
        let written = tokio::select! {
            biased;
            () = conn.closed() => break,
            r = write_batch(ht, conn, &mut queue, &mut sink, first) => r,
        };
        if let Err(e) = written {
            tracing::debug!(conn = conn.id, error = %e, "write failed");
            conn.close_quietly();
            return;
        }
    }
    let code = if c.normal_close.load(Acquire) {
        Some(NORMAL)
    } else {
        conn.close_code().map(|code| {
            ht.node.hub.metrics.disconnect(code);
            code.code()
        })
    };
    let Some(code) = code else {
        let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, sink.close()).await;
        return;
    };
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(""),
    };
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
        sink.send(Message::Close(Some(frame))).await?;
        sink.close().await
    })
    .await;
}

async fn write_batch(
    ht: &HighTemplar,
    conn: &ConnHandle,
    queue: &mut Queue,
    sink: &mut SplitSink<WebSocket, Message>,
    first: Outgoing,
) -> Result<(), axum::Error> {
    let metrics = &ht.node.hub.metrics;
    let mut next = Some(first);
    let mut fed = 0;
    while let Some(item) = next.take() {
        let message = match item {
            Outgoing::Text(text) => {
                let len = text.len();
                conn.dequeued(len);
                metrics.bytes_sent_total.fetch_add(len as u64, Relaxed);
                count_sent(&ht.counters);
                Message::Text(text)
            }
            Outgoing::Ping => Message::Ping(bytes::Bytes::new()),
            Outgoing::Close(code) => {
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
