//! The Bachata WebSocket endpoint: the channel is settled after the upgrade (as the reference
//! does), then one task per connection runs a reader, a writer and the inbox's acknowledgement
//! work side by side. Every frame is one JSON object in its own WebSocket text message.

use std::sync::Arc;
use std::sync::atomic::Ordering::{Relaxed, Release};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use plaza_core::chat::inbox;
use plaza_core::{ChannelName, CloseCode, ErrorCode, ReplyError};
use plaza_protocol::bachata::{self as proto, ClientFrame, Mode};
use tokio::sync::mpsc;

use super::{Bachata, InboxFrames, Refusal, Work};
use crate::auth::app::Forwarded;
use crate::chat::Backlog;
use crate::conn::{ConnHandle, Outgoing, Queue};
use crate::hub::Subscriber;

/// How long the writer may take to deliver the close frame before the socket is dropped.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most frames fed before one flush.
const MAX_FRAMES_PER_FLUSH: usize = 256;
/// The close code of a refused connection, as in the reference.
const NORMAL: u16 = 1000;

pub async fn upgrade(
    State(b): State<Arc<Bachata>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    ws: WebSocketUpgrade,
) -> Response {
    let forwarded = b
        .node
        .auth
        .app
        .as_ref()
        .map(|app| app.capture(&headers, query.as_deref()))
        .unwrap_or_default();
    let settings = &b.node.settings;
    ws.max_message_size(settings.limits.max_frame_size)
        .max_frame_size(settings.limits.max_frame_size)
        .read_buffer_size(settings.ws_read_buffer_size)
        .write_buffer_size(settings.ws_write_buffer_size)
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "websocket upgrade failed"))
        .on_upgrade(move |socket| run(b, socket, query, forwarded))
}

/// Closes a connection that got no channel: `code` and `reason`, no 1000 frame.
async fn refuse(mut socket: WebSocket, code: u16, reason: &'static str) {
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
        socket
            .send(Message::Close(Some(CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
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

/// A connection whose backlog did not fit in one go: its subscriber stays parked (live entries
/// wait) while the rest follows as the client acknowledges what it got.
struct CatchUp {
    subscriber: Arc<Subscriber>,
    epoch: String,
    /// The last seq queued so far.
    last: u64,
}

/// One connection with its channel.
struct Conn {
    b: Arc<Bachata>,
    channel: String,
    inbox: ChannelName,
    conn: Arc<ConnHandle>,
    frames: Arc<InboxFrames>,
}

async fn run(b: Arc<Bachata>, socket: WebSocket, query: Option<String>, forwarded: Forwarded) {
    let node = Arc::clone(&b.node);
    let id = node.next_conn_id();
    let channel = match b.identify(query.as_deref(), &forwarded, id).await {
        Ok(channel) => channel,
        Err(Refusal::NotAuthorized(why)) => {
            tracing::debug!(conn = id, reason = %why, "Bachata connection without a channel");
            node.hub.metrics.error(ErrorCode::Unauthorized);
            return refuse(socket, NORMAL, proto::NOT_AUTHORIZED).await;
        }
        Err(Refusal::AppUnavailable(why)) => {
            tracing::warn!(conn = id, error = %why, "Bachata connect: the app gave no decision");
            return refuse(socket, CloseCode::AppUnavailable.code(), "").await;
        }
    };
    if let Err(e) = node.chat.register_user(&channel).await {
        tracing::warn!(conn = id, channel, error = %e, "Bachata channel not registered");
        return refuse(socket, CloseCode::Shutdown.code(), "").await;
    }
    let (handle, queue) = ConnHandle::new(
        id,
        node.settings.limits.max_queue_bytes,
        Instant::now(),
        &node.hub.backlog,
    );
    let conn = Arc::new(handle);
    conn.set_connected(&channel);
    let (work_tx, work_rx) = mpsc::unbounded_channel();
    let frames = Arc::new(InboxFrames {
        mode: b.mode,
        written_acks: std::sync::Mutex::default(),
        work: work_tx.clone(),
        hold: std::sync::Mutex::default(),
        catching_up: std::sync::atomic::AtomicBool::new(false),
    });
    node.hub.register(Arc::clone(&conn));
    let c = Conn {
        b: Arc::clone(&b),
        inbox: inbox(&channel),
        channel,
        conn: Arc::clone(&conn),
        frames,
    };
    tracing::debug!(conn = id, channel = %c.channel, "Bachata connection opened");

    let (sink, stream) = socket.split();
    match c.attach().await {
        Ok(catch_up) => {
            tokio::join!(
                c.read_loop(stream, work_tx),
                c.write_loop(queue, sink),
                c.inbox_loop(work_rx, catch_up)
            );
        }
        Err(e) => {
            tracing::warn!(conn = id, channel = %c.channel, error = %e, "Bachata inbox not attached");
            conn.close(CloseCode::Shutdown);
            drop(work_tx);
            c.write_loop(queue, sink).await;
        }
    }
    c.detach().await;
    node.hub.deregister(id);
    tracing::debug!(conn = id, "Bachata connection closed");
}

impl Conn {
    /// Subscribes to the inbox (parked), then queues `{"type": 1000}` and the unacknowledged
    /// backlog ahead of live entries.
    async fn attach(&self) -> Result<Option<CatchUp>, ReplyError> {
        let node = &self.b.node;
        let key = Arc::clone(self.inbox.as_arc());
        let subscriber = Subscriber::parked_with_encoder(
            Arc::clone(&self.conn),
            Arc::clone(&self.frames) as Arc<dyn crate::hub::EntryEncoder>,
        );
        node.hub.subscribe(&key, Arc::clone(&subscriber));
        if node.hub.subscriber_count(&key) == 1
            && let Err(e) = node.broker.subscribe(Arc::clone(&key)).await
        {
            return Err(ReplyError::new(ErrorCode::Internal, e.to_string()));
        }
        let budget = node.settings.limits.max_queue_bytes / 2;
        let backlog = node.chat.backlog(&self.channel, budget).await?;
        if backlog.dropped > 0 || backlog.reset {
            tracing::warn!(channel = %self.channel, dropped = backlog.dropped, reset = backlog.reset, "Bachata inbox lost entries before they were delivered");
        }
        let ready = Utf8Bytes::from_static(proto::READY);
        Ok(self.queue_backlog(subscriber, Some(ready), backlog))
    }

    /// Queues a slice of the backlog. The last slice releases the parked subscriber.
    fn queue_backlog(
        &self,
        subscriber: Arc<Subscriber>,
        first: Option<Utf8Bytes>,
        backlog: Backlog,
    ) -> Option<CatchUp> {
        let last = backlog.last();
        let frames = first.into_iter().chain(
            backlog
                .entries
                .iter()
                .filter_map(|(seq, data)| self.frames.frame(*seq, data)),
        );
        if backlog.more {
            self.frames.catching_up.store(true, Release);
            for frame in frames {
                let _ = self.conn.push_text(frame);
            }
            Some(CatchUp {
                subscriber,
                epoch: backlog.top.epoch,
                last,
            })
        } else {
            subscriber.unpark(frames.collect::<Vec<_>>(), backlog.top.offset);
            self.frames.catching_up.store(false, Release);
            None
        }
    }

    async fn detach(&self) {
        let node = &self.b.node;
        let key = self.inbox.as_str();
        node.hub.unsubscribe(key, self.conn.id);
        if node.hub.subscriber_count(key) == 0
            && let Err(e) = node
                .broker
                .unsubscribe(Arc::clone(self.inbox.as_arc()))
                .await
        {
            tracing::warn!(error = %e, "broker unsubscribe failed");
        }
    }

    fn push(&self, frame: String) {
        let _ = self.conn.push_text(Utf8Bytes::from(frame));
    }

    async fn read_loop(
        &self,
        mut stream: SplitStream<WebSocket>,
        work: mpsc::UnboundedSender<Work>,
    ) {
        let conn = &self.conn;
        let metrics = &self.b.node.hub.metrics;
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
                Message::Text(text) => {
                    metrics
                        .bytes_received_total
                        .fetch_add(text.len() as u64, Relaxed);
                    proto::decode(text.as_str())
                }
                // Bachata 0.1 drops binary frames (a non-object): so does Plaza, counted.
                Message::Binary(_) => ClientFrame::Invalid(proto::Invalid::NotAnObject),
                Message::Ping(_) | Message::Pong(_) => continue,
                Message::Close(_) => break,
            };
            match frame {
                ClientFrame::Ping => self.push(proto::PONG.to_owned()),
                ClientFrame::Ignored => {}
                ClientFrame::Ack(id) => {
                    if self.b.mode == Mode::Reliable {
                        let _ = work.send(Work::Id(id));
                    }
                }
                ClientFrame::Data(message) => {
                    // To its own channel: the 100 must come before the message.
                    let held = message.dest.as_deref() == Some(self.channel.as_str())
                        && self.frames.hold();
                    let got_it = match self.b.send(&self.channel, &message).await {
                        Ok(()) => Some(Utf8Bytes::from(proto::encode_got_it(&message.id_json))),
                        Err(_) => None,
                    };
                    if held {
                        self.frames.release(conn, got_it);
                    } else if let Some(frame) = got_it {
                        let _ = conn.push_text(frame);
                    }
                }
                ClientFrame::Invalid(why) => {
                    metrics.error(ErrorCode::BadRequest);
                    tracing::warn!(conn = conn.id, channel = %self.channel, reason = %why, "Bachata frame ignored");
                }
            }
        }
        if !conn.is_draining() {
            conn.close_quietly();
        }
    }

    /// Acknowledges what the client or the writer says is delivered, then sends the next slice
    /// of a backlog once half of what was sent is acknowledged.
    async fn inbox_loop(
        &self,
        mut work: mpsc::UnboundedReceiver<Work>,
        mut catch_up: Option<CatchUp>,
    ) {
        loop {
            let first = tokio::select! {
                biased;
                w = work.recv() => match w {
                    Some(w) => w,
                    None => return,
                },
                () = self.conn.closed() => break,
            };
            self.process(first, &mut work).await;
            if let Some(c) = catch_up.take() {
                catch_up = match self.continue_backlog(c).await {
                    Ok(next) => next,
                    Err(e) => {
                        tracing::warn!(channel = %self.channel, error = %e, "Bachata backlog: read failed");
                        self.conn.close(CloseCode::Shutdown);
                        None
                    }
                };
            }
        }
        // The connection is closing: what was already written or acknowledged still counts.
        while let Ok(w) = work.try_recv() {
            self.process(w, &mut work).await;
        }
    }

    /// Handles `first` and whatever else is waiting, acknowledging seqs in one batch.
    async fn process(&self, first: Work, work: &mut mpsc::UnboundedReceiver<Work>) {
        let chat = &self.b.node.chat;
        let mut seqs = Vec::new();
        let mut ids = Vec::new();
        let mut next = Some(first);
        while let Some(w) = next.take() {
            match w {
                Work::Seqs(s) => seqs.extend(s),
                Work::Id(id) => ids.push(id),
            }
            next = work.try_recv().ok();
        }
        if !seqs.is_empty()
            && let Err(e) = chat.ack_seqs(&self.channel, &seqs).await
        {
            tracing::warn!(channel = %self.channel, error = %e, "Bachata acknowledgement not stored");
        }
        for id in ids {
            match chat.ack_id(&self.channel, &id, None).await {
                Ok(_) => {}
                Err(e) if e.code == ErrorCode::Internal => {
                    tracing::warn!(channel = %self.channel, error = %e, "Bachata 200 not stored");
                }
                // Someone else's message: nothing, as for an unknown id.
                Err(e) => {
                    tracing::debug!(channel = %self.channel, error = %e, "Bachata 200 ignored")
                }
            }
        }
    }

    async fn continue_backlog(&self, c: CatchUp) -> Result<Option<CatchUp>, ReplyError> {
        let node = &self.b.node;
        let chat = &node.chat;
        let cursor = chat.ack_cursor(&self.channel).await?;
        if cursor.saturating_add(chat.config.window as u64 / 2) < c.last {
            return Ok(Some(c));
        }
        let budget = node.settings.limits.max_queue_bytes / 2;
        let backlog = chat
            .backlog_after(&self.channel, &c.epoch, c.last, budget)
            .await?;
        Ok(self.queue_backlog(c.subscriber, None, backlog))
    }

    async fn write_loop(&self, mut queue: Queue, mut sink: SplitSink<WebSocket, Message>) {
        let conn = &self.conn;
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
                r = self.write_batch(&mut queue, &mut sink, first) => r,
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
        self.b.node.hub.metrics.disconnect(code);
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

    /// Writes `first` and what else is queued (one JSON object per WebSocket message), flushes
    /// once, then acknowledges the written frames that wait for it.
    async fn write_batch(
        &self,
        queue: &mut Queue,
        sink: &mut SplitSink<WebSocket, Message>,
        first: Outgoing,
    ) -> Result<(), axum::Error> {
        let conn = &self.conn;
        let metrics = &self.b.node.hub.metrics;
        let mut written = Vec::new();
        let mut next = Some(first);
        let mut fed = 0;
        while let Some(item) = next.take() {
            let message = match item {
                Outgoing::Text(text) => {
                    let len = text.len();
                    conn.dequeued(len);
                    metrics.bytes_sent_total.fetch_add(len as u64, Relaxed);
                    written.push(text.as_str().as_ptr() as usize);
                    Message::Text(text)
                }
                Outgoing::Ping => Message::Ping(bytes::Bytes::new()),
                Outgoing::Close(code) => {
                    sink.flush().await?;
                    self.frames.written(&written);
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
        sink.flush().await?;
        self.frames.written(&written);
        Ok(())
    }
}
