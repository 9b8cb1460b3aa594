//! The Snorky WebSocket endpoint: text and binary frames of JSON, one reader and one writer per
//! connection, one JSON object per WebSocket message out. Bad input never ends a connection.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use plaza_core::ConnId;

use super::{Client, Snorky};
use crate::auth::app::{AppConnectDecision, AppConnectRequest};
use crate::auth::jwt::unix_now;
use crate::conn::{ConnHandle, Outgoing, Queue};

/// How long the writer may take to deliver the close frame before the socket is dropped.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most frames fed before one flush.
const MAX_FRAMES_PER_FLUSH: usize = 256;

pub async fn upgrade(
    State(s): State<Arc<Snorky>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    ws: WebSocketUpgrade,
) -> Response {
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    if !s.config.origin_allowed(origin) {
        s.node
            .hub
            .metrics
            .error(plaza_core::ErrorCode::PermissionDenied);
        return (StatusCode::FORBIDDEN, "origin not allowed\n").into_response();
    }
    let id = s.node.next_conn_id();
    let identity = match s.identify(&headers, query.as_deref(), id).await {
        Ok(identity) => identity,
        Err((status, why)) => {
            tracing::debug!(conn = id, reason = %why, "Snorky connection refused");
            s.node
                .hub
                .metrics
                .error(plaza_core::ErrorCode::Unauthorized);
            return (status, format!("{why}\n")).into_response();
        }
    };
    let settings = &s.node.settings;
    ws.max_message_size(settings.limits.max_frame_size)
        .max_frame_size(settings.limits.max_frame_size)
        .read_buffer_size(settings.ws_read_buffer_size)
        .write_buffer_size(settings.ws_write_buffer_size)
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "websocket upgrade failed"))
        .on_upgrade(move |socket| run(s, socket, id, identity))
}

/// The value of cookie `name`, if the request carries it.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| n.trim() == name)
        .map(|(_, v)| v.trim().trim_matches('"').to_owned())
}

impl Snorky {
    /// Who the connection is: the user of a connection token (`?token=`, else the
    /// `token_cookie` cookie), else the app's answer (`auth.connect_url`), else nobody, where
    /// anonymous connections are allowed. Snorky had no identity; only chat and cursors use it.
    async fn identify(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        id: ConnId,
    ) -> Result<Option<String>, (StatusCode, String)> {
        let auth = &self.node.auth;
        let token = crate::bachata::query_param(query, "token")
            .or_else(|| cookie(headers, &self.config.token_cookie));
        if let Some(token) = token {
            let Some(jwt) = &auth.jwt else {
                return Err((
                    StatusCode::UNAUTHORIZED,
                    "this server accepts no connection tokens".into(),
                ));
            };
            return match jwt.verify_connect(&token, unix_now()) {
                Ok(claims) => Ok(Some(claims.user)),
                Err(e) => Err((StatusCode::UNAUTHORIZED, e.to_string())),
            };
        }
        if let Some(app) = auth.app.as_ref().filter(|a| a.has_connect()) {
            let forwarded = app.capture(headers, query);
            let client = id.to_string();
            let request = AppConnectRequest {
                client: &client,
                protocol: "snorky",
                forwarded: &forwarded,
                data: None,
            };
            return match app.connect(request).await {
                Ok(AppConnectDecision::Allow { user, .. }) => {
                    Ok(Some(user).filter(|u| !u.is_empty()))
                }
                Ok(AppConnectDecision::Deny { reason }) => Err((StatusCode::FORBIDDEN, reason)),
                Err(e) => Err((StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
            };
        }
        if auth.anonymous {
            Ok(None)
        } else {
            Err((
                StatusCode::UNAUTHORIZED,
                "a connection token is needed (?token= or the token cookie)".into(),
            ))
        }
    }
}

async fn run(s: Arc<Snorky>, socket: WebSocket, id: ConnId, identity: Option<String>) {
    let node = Arc::clone(&s.node);
    let (handle, queue) = ConnHandle::new(
        id,
        node.settings.limits.max_queue_bytes,
        Instant::now(),
        &node.hub.backlog,
    );
    let conn = Arc::new(handle);
    conn.set_connected(identity.as_deref().unwrap_or(""));
    s.clients.insert(id, Arc::clone(&conn));
    let metrics = &node.hub.metrics;
    metrics.connections.fetch_add(1, Relaxed);
    metrics.connections_total.fetch_add(1, Relaxed);
    tracing::debug!(conn = id, identity = ?identity, "Snorky connection opened");
    let mut client = Client::new(Arc::clone(&conn), identity);
    let (sink, stream) = socket.split();
    tokio::join!(
        read_loop(&s, &mut client, stream),
        write_loop(&s, &conn, queue, sink)
    );
    s.disconnected(&mut client).await;
    s.clients.remove(&id);
    metrics.connections.fetch_sub(1, Relaxed);
    tracing::debug!(conn = id, "Snorky connection closed");
}

async fn read_loop(s: &Snorky, client: &mut Client, mut stream: SplitStream<WebSocket>) {
    let conn = Arc::clone(&client.conn);
    let metrics = &s.node.hub.metrics;
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
        let reply = match &message {
            Message::Text(text) => {
                metrics
                    .bytes_received_total
                    .fetch_add(text.len() as u64, Relaxed);
                s.handle(client, text.as_bytes()).await
            }
            // Binary frames of JSON are read exactly like text frames, as in the reference.
            Message::Binary(bytes) => {
                metrics
                    .bytes_received_total
                    .fetch_add(bytes.len() as u64, Relaxed);
                s.handle(client, bytes).await
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Close(_) => break,
        };
        if let Some(reply) = reply {
            client.push(reply);
        }
    }
    if !conn.is_draining() {
        conn.close_quietly();
    }
}

async fn write_loop(
    s: &Snorky,
    conn: &ConnHandle,
    mut queue: Queue,
    mut sink: SplitSink<WebSocket, Message>,
) {
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
            r = write_batch(s, conn, &mut queue, &mut sink, first) => r,
        };
        if let Err(e) = written {
            tracing::debug!(conn = conn.id, error = %e, "write failed");
            conn.close_quietly();
            return;
        }
    }
    let Some(code) = conn.close_code() else {
        let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, sink.close()).await;
        return;
    };
    s.node.hub.metrics.disconnect(code);
    let frame = CloseFrame {
        code: code.code(),
        reason: Utf8Bytes::from_static(""),
    };
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
        sink.send(Message::Close(Some(frame))).await?;
        sink.close().await
    })
    .await;
}

/// Writes `first` and what else is queued (one JSON object per WebSocket message), then flushes
/// once.
async fn write_batch(
    s: &Snorky,
    conn: &ConnHandle,
    queue: &mut Queue,
    sink: &mut SplitSink<WebSocket, Message>,
    first: Outgoing,
) -> Result<(), axum::Error> {
    let metrics = &s.node.hub.metrics;
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
            // Snorky's ping: a control frame with an empty payload.
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
