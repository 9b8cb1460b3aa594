//! One RSocket connection: SETUP first, KEEPALIVE echo, requests routed by their composite
//! metadata's route to the chat, each request on its own task so streams run side by side.
//!
//! Errors of a request are ERROR 0x201 (APPLICATION_ERROR) on its stream and the connection
//! goes on; a bad SETUP (lease, resume, other version, metadata that is not composite) is an
//! ERROR on stream 0 and the connection is closed. A connection silent for longer than its
//! SETUP's max lifetime (at most `max_lifetime_secs`) gets ERROR 0x101 CONNECTION_ERROR and is
//! closed; so is one whose unsent frames pile up past its limit (a client that does not read).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use plaza_core::chat::Peer;
use plaza_core::{AccessPolicy, ErrorCode as PlazaCode, Payload as ChatPayload, ReplyError};
use plaza_protocol::rsocket::{
    COMPOSITE_METADATA_MIME, CompositeMetadata, Credit, ErrorCode, Frame, LengthPrefixed, Payload,
    Reassembler, encode_length_prefixed, fragment,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::stats::Request as StatsRequest;
use super::{Rsocket, files, incoming};
use crate::auth::app::{AppSubscribeDecision, AppSubscribeRequest, Forwarded};
use crate::auth::jwt::unix_now;
use crate::node::Node;

/// Largest reassembled payload (raised to fit `max_file_size`), and all partial payloads of a
/// connection together.
const MAX_PAYLOAD: usize = 16 * 1024 * 1024;
const MAX_BUFFERED: usize = 32 * 1024 * 1024;
/// Most channels listed by `channels`, files by `files`.
pub(super) const MAX_CHANNELS: usize = 10_000;
/// Most requests in flight on one connection.
const MAX_STREAMS: usize = 256;
/// Outbound frames larger than this are fragmented (the tutorial's `fragment_size_bytes`).
const FRAGMENT_LEN: usize = 1_000_000;
/// Client PAYLOADs a channel asks for at a time (REQUEST_N), and how many it buffers.
const CHANNEL_WINDOW: u32 = 16;
const CHANNEL_BUFFER: usize = 64;
/// Own channel messages kept for `messages.incoming` (chat does not echo them to the sender).
const MAX_OWN: usize = 1024;
/// Largest client statistics (FNF `statistics`) kept per session.
const MAX_CLIENT_STATS: usize = 4096;

/// What the writer task gets: a frame, or `None` to flush and close.
type Out = mpsc::UnboundedSender<Option<Frame>>;

/// The writer's side of a connection: frames to send, with the bytes they hold accounted.
pub(super) struct Outbox {
    rx: mpsc::UnboundedReceiver<Option<Frame>>,
    bytes: Arc<AtomicUsize>,
}

impl Outbox {
    /// The next frame to write; `None` once the connection is to be flushed and closed.
    pub(super) async fn recv(&mut self) -> Option<Frame> {
        let frame = self.rx.recv().await.flatten()?;
        self.bytes.fetch_sub(frame.encoded_len(), Relaxed);
        Some(frame)
    }
}

/// The interaction model of a request, which is part of its route's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Response,
    Fnf,
    Stream,
    Channel,
}

/// A stream's REQUEST_N credit, waited on by the task that emits.
pub(super) struct Gate {
    credit: Mutex<Credit>,
    granted: Notify,
}

impl Gate {
    fn new(initial_n: u32) -> Self {
        Self {
            credit: Mutex::new(Credit::new(initial_n)),
            granted: Notify::new(),
        }
    }

    fn grant(&self, n: u32) {
        self.credit
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .grant(n);
        self.granted.notify_one();
    }

    /// Takes one credit if there is one.
    pub(super) fn try_take(&self) -> bool {
        self.credit
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Waits for one credit and takes it. Cancel-safe: nothing is taken until it returns.
    pub(super) async fn take(&self) {
        loop {
            let granted = self.granted.notified();
            if self
                .credit
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
            {
                return;
            }
            granted.await;
        }
    }
}

struct Stream {
    gate: Arc<Gate>,
    abort: Option<AbortHandle>,
    /// A channel's inbound side: the client's PAYLOADs, until it completes.
    inbound: Option<mpsc::Sender<Payload>>,
}

pub(super) struct Session {
    rs: Arc<Rsocket>,
    out: Out,
    out_bytes: Arc<AtomicUsize>,
    /// Unsent bytes beyond which the connection is closed.
    out_limit: usize,
    /// Set when the connection must end; the reader waits on `closing`.
    closed: std::sync::atomic::AtomicBool,
    closing: Notify,
    user: Mutex<Option<String>>,
    /// The client's last FNF `statistics` (e.g. `{"memory_usage": n}`).
    client_stats: Mutex<Option<Bytes>>,
    streams: Mutex<HashMap<u32, Stream>>,
    /// Channel messages this connection's user sent: chat does not put them in the sender's
    /// inbox, the tutorial shows them to the sender too, so `messages.incoming` takes them here
    /// (only while one is open, at most [`MAX_OWN`]).
    own: Mutex<VecDeque<Bytes>>,
    own_ready: Notify,
    listeners: AtomicUsize,
}

/// Counts an open `messages.incoming` while alive.
pub(super) struct Listening<'a>(&'a Session);

impl Drop for Listening<'_> {
    fn drop(&mut self) {
        if self.0.listeners.fetch_sub(1, AcqRel) == 1 {
            self.0
                .own
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
    }
}

/// Whether the connection goes on after a frame.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Flow {
    Continue,
    Close,
}

/// A connection's inbound side, whatever the transport: frame bytes in, [`Flow`] out.
pub(super) struct Inbound {
    session: Arc<Session>,
    reassembler: Reassembler,
    set_up: bool,
    /// How long the connection may stay silent: the SETUP's max lifetime, at most the config's.
    lifetime: Duration,
    deadline: Instant,
}

impl Inbound {
    /// A session and the frames its writer must send.
    pub(super) fn new(rs: Arc<Rsocket>) -> (Self, Outbox) {
        let (tx, rx) = mpsc::unbounded_channel();
        let bytes = Arc::new(AtomicUsize::new(0));
        let lifetime = Duration::from_secs(rs.config.max_lifetime_secs);
        let max_payload = MAX_PAYLOAD.max(rs.config.max_file_size + 64 * 1024);
        let out_limit = rs.node.settings.limits.max_queue_bytes + rs.config.max_file_size * 2;
        let session = Arc::new(Session {
            rs,
            out: tx,
            out_bytes: Arc::clone(&bytes),
            out_limit,
            closed: std::sync::atomic::AtomicBool::new(false),
            closing: Notify::new(),
            user: Mutex::new(None),
            client_stats: Mutex::new(None),
            streams: Mutex::new(HashMap::new()),
            own: Mutex::new(VecDeque::new()),
            own_ready: Notify::new(),
            listeners: AtomicUsize::new(0),
        });
        let inbound = Self {
            session,
            reassembler: Reassembler::new(max_payload, MAX_BUFFERED.max(max_payload * 2)),
            set_up: false,
            lifetime,
            deadline: Instant::now() + lifetime,
        };
        (inbound, Outbox { rx, bytes })
    }

    /// One frame's bytes (without any transport prefix).
    pub(super) fn feed(&mut self, bytes: Bytes) -> Flow {
        let was_set_up = self.set_up;
        let mut lifetime = None;
        let flow = self.session.on_frame(
            bytes,
            &mut self.set_up,
            &mut self.reassembler,
            &mut lifetime,
        );
        if !was_set_up && let Some(ms) = lifetime {
            self.lifetime = self.lifetime.min(Duration::from_millis(u64::from(ms)));
        }
        self.deadline = Instant::now() + self.lifetime;
        flow
    }

    /// When the connection has been silent too long, unless a frame comes first.
    pub(super) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Resolves once the session wants the connection closed (its writer was told to flush
    /// and close).
    pub(super) async fn closing(&self) {
        self.session.closing().await;
    }

    /// The client sent nothing for its max lifetime: ERROR 0x101, then close.
    pub(super) fn timed_out(&self) {
        tracing::debug!(lifetime = ?self.lifetime, "rsocket connection silent past its max lifetime");
        self.session.send(Frame::error(
            0,
            ErrorCode::CONNECTION_ERROR,
            &format!(
                "no KEEPALIVE or other frame for {} ms (the max lifetime)",
                self.lifetime.as_millis()
            ),
        ));
    }

    pub(super) fn connection_error(&self, message: &str) {
        self.session
            .send(Frame::error(0, ErrorCode::CONNECTION_ERROR, message));
    }

    /// Ends every stream and tells the writer to flush and close.
    pub(super) fn finish(self) {
        self.session.cancel_all();
        {
            // Under the user lock, so a login finishing on another thread counts consistently.
            let user = self
                .session
                .user
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.session.closed.store(true, Release);
            if user.is_some() {
                self.session.rs.logged_in.fetch_sub(1, Relaxed);
            }
        }
        let _ = self.session.out.send(None);
    }
}

pub(super) async fn run_tcp(stream: TcpStream, rs: Arc<Rsocket>) {
    let (mut rd, mut wr) = stream.into_split();
    let (mut inbound, mut rx) = Inbound::new(rs);
    let writer = tokio::spawn(async move {
        let mut buf = BytesMut::new();
        while let Some(frame) = rx.recv().await {
            buf.clear();
            if let Err(e) = encode_length_prefixed(&frame, &mut buf) {
                tracing::warn!(error = %e, "rsocket frame not encodable");
                continue;
            }
            if wr.write_all(&buf).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    let framing = LengthPrefixed::default();
    let mut buf = BytesMut::with_capacity(8192);
    'read: loop {
        loop {
            match framing.next_frame_bytes(&mut buf) {
                Ok(Some(bytes)) => {
                    if inbound.feed(bytes) == Flow::Close {
                        break 'read;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    inbound.connection_error(&e.to_string());
                    break 'read;
                }
            }
        }
        let read = tokio::select! {
            biased;
            () = inbound.closing() => break,
            r = tokio::time::timeout_at(inbound.deadline(), rd.read_buf(&mut buf)) => r,
        };
        match read {
            Err(_elapsed) => {
                inbound.timed_out();
                break;
            }
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(_)) => {}
        }
    }
    inbound.finish();
    // A client that does not read would hold the writer (and the socket) forever.
    let abort = writer.abort_handle();
    if tokio::time::timeout(Duration::from_secs(2), writer)
        .await
        .is_err()
    {
        abort.abort();
    }
}

fn app_error(e: ReplyError) -> String {
    e.message
}

impl Session {
    pub(super) fn node(&self) -> &Arc<Node> {
        &self.rs.node
    }

    /// Queues a frame for the writer (fragmented when large). A client that does not read
    /// while frames pile up past the limit is closed.
    fn send(&self, frame: Frame) {
        if self.closed.load(Acquire) {
            return;
        }
        let len = frame.encoded_len();
        let queued = self.out_bytes.fetch_add(len, Relaxed) + len;
        if queued > self.out_limit {
            tracing::debug!(queued, "rsocket client does not read: closing");
            self.close();
            return;
        }
        if len <= FRAGMENT_LEN {
            let _ = self.out.send(Some(frame));
            return;
        }
        match fragment(frame, FRAGMENT_LEN) {
            Ok(frames) => {
                // Each fragment is counted when it is written; the whole was counted above.
                let total: usize = frames.iter().map(Frame::encoded_len).sum();
                self.out_bytes.fetch_add(total.saturating_sub(len), Relaxed);
                for f in frames {
                    let _ = self.out.send(Some(f));
                }
            }
            Err(e) => tracing::warn!(error = %e, "rsocket frame not fragmented"),
        }
    }

    /// Tells the writer to flush and close, and the reader to stop.
    fn close(&self) {
        if !self.closed.swap(true, AcqRel) {
            let _ = self.out.send(None);
            self.closing.notify_waiters();
        }
    }

    async fn closing(&self) {
        loop {
            let woken = self.closing.notified();
            if self.closed.load(Acquire) {
                return;
            }
            woken.await;
        }
    }

    fn cancel_all(&self) {
        let streams =
            std::mem::take(&mut *self.streams.lock().unwrap_or_else(PoisonError::into_inner));
        for (_, s) in streams {
            if let Some(a) = s.abort {
                a.abort();
            }
        }
    }

    fn cancel(&self, stream_id: u32) {
        let removed = self
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&stream_id);
        if let Some(a) = removed.and_then(|s| s.abort) {
            a.abort();
        }
    }

    fn connection_error(&self, code: ErrorCode, message: &str) -> Flow {
        self.send(Frame::error(0, code, message));
        Flow::Close
    }

    /// One frame. `lifetime` gets the SETUP's max lifetime (ms) when this is the SETUP.
    fn on_frame(
        self: &Arc<Self>,
        bytes: Bytes,
        set_up: &mut bool,
        reassembler: &mut Reassembler,
        lifetime: &mut Option<u32>,
    ) -> Flow {
        let frame = match Frame::decode(bytes) {
            Ok(f) => f,
            Err(e) if e.is_ignorable() => return Flow::Continue,
            Err(e) => return self.connection_error(e.error_code(), &e.to_string()),
        };
        if !*set_up {
            let Frame::Setup(setup) = frame else {
                return self
                    .connection_error(ErrorCode::INVALID_SETUP, "the first frame must be SETUP");
            };
            if let Some((code, message)) = setup.unsupported() {
                return self.connection_error(code, message);
            }
            if setup.metadata_mime != COMPOSITE_METADATA_MIME {
                return self.connection_error(
                    ErrorCode::REJECTED_SETUP,
                    "the metadata mime type must be message/x.rsocket.composite-metadata.v0",
                );
            }
            *lifetime = Some(setup.max_lifetime_ms);
            *set_up = true;
            return Flow::Continue;
        }
        if let Frame::Ext { ignore: true, .. } = frame {
            return Flow::Continue;
        }
        let frame = match reassembler.push(frame) {
            Ok(Some(f)) => f,
            Ok(None) => return Flow::Continue,
            Err(e) => match e.stream_id() {
                Some(id) => {
                    self.cancel(id);
                    self.send(Frame::error(id, ErrorCode::INVALID, &e.to_string()));
                    return Flow::Continue;
                }
                None => return self.connection_error(ErrorCode::CONNECTION_ERROR, &e.to_string()),
            },
        };
        if let Some(reply) = frame.keepalive_reply() {
            self.send(reply);
            return Flow::Continue;
        }
        match frame {
            Frame::Keepalive { .. } | Frame::MetadataPush { .. } | Frame::Ext { .. } => {}
            Frame::Setup(_) => {
                return self.connection_error(ErrorCode::CONNECTION_ERROR, "SETUP sent twice");
            }
            Frame::Lease { .. } | Frame::Resume { .. } | Frame::ResumeOk { .. } => {
                return self.connection_error(
                    ErrorCode::CONNECTION_ERROR,
                    "lease and resume are not supported",
                );
            }
            Frame::RequestResponse {
                stream_id, payload, ..
            } => self.request(stream_id, Kind::Response, 0, false, payload),
            Frame::RequestFnf {
                stream_id, payload, ..
            } => self.request(stream_id, Kind::Fnf, 0, false, payload),
            Frame::RequestStream {
                stream_id,
                initial_n,
                payload,
                ..
            } => self.request(stream_id, Kind::Stream, initial_n, false, payload),
            Frame::RequestChannel {
                stream_id,
                initial_n,
                complete,
                payload,
                ..
            } => self.request(stream_id, Kind::Channel, initial_n, complete, payload),
            Frame::RequestN { stream_id, n } => {
                let gate = self
                    .streams
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&stream_id)
                    .map(|s| Arc::clone(&s.gate));
                if let Some(gate) = gate {
                    gate.grant(n);
                }
            }
            Frame::Cancel { stream_id } => self.cancel(stream_id),
            Frame::Error { stream_id: 0, .. } => return Flow::Close,
            Frame::Error { stream_id, .. } => self.cancel(stream_id),
            // The inbound side of a channel.
            Frame::Payload {
                stream_id,
                complete,
                next,
                payload,
                ..
            } => self.channel_payload(stream_id, next, complete, payload),
        }
        Flow::Continue
    }

    /// A client PAYLOAD on a channel: handed to the channel's task; C ends the inbound side.
    fn channel_payload(&self, stream_id: u32, next: bool, complete: bool, payload: Payload) {
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(stream) = streams.get_mut(&stream_id) else {
            return;
        };
        if next && let Some(tx) = &stream.inbound {
            // R10: accepted even beyond the REQUEST_N we gave, up to the buffer.
            if tx.try_send(payload).is_err() {
                tracing::debug!(stream_id, "rsocket channel PAYLOAD dropped: buffer full");
            }
        }
        if complete {
            stream.inbound = None;
        }
    }

    /// Starts a request on its own task.
    fn request(
        self: &Arc<Self>,
        stream_id: u32,
        kind: Kind,
        initial_n: u32,
        complete: bool,
        payload: Payload,
    ) {
        let gate = Arc::new(Gate::new(initial_n));
        let (inbound_tx, inbound_rx) = if kind == Kind::Channel {
            let (tx, rx) = mpsc::channel(CHANNEL_BUFFER);
            ((!complete).then_some(tx), Some(rx))
        } else {
            (None, None)
        };
        {
            let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
            if streams.contains_key(&stream_id) {
                drop(streams);
                self.send(Frame::error(
                    0,
                    ErrorCode::CONNECTION_ERROR,
                    &format!("stream id {stream_id} is already in use"),
                ));
                self.close();
                return;
            }
            if streams.len() >= MAX_STREAMS {
                drop(streams);
                if kind != Kind::Fnf {
                    self.send(Frame::error(
                        stream_id,
                        ErrorCode::REJECTED,
                        &format!(
                            "too many requests in flight on this connection (at most {MAX_STREAMS})"
                        ),
                    ));
                }
                return;
            }
            streams.insert(
                stream_id,
                Stream {
                    gate: Arc::clone(&gate),
                    abort: None,
                    inbound: inbound_tx,
                },
            );
        }
        let session = Arc::clone(self);
        let task = tokio::spawn(async move {
            let result = session
                .handle(stream_id, kind, &gate, payload, inbound_rx)
                .await;
            session
                .streams
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&stream_id);
            if let Err(message) = result {
                if kind == Kind::Fnf {
                    tracing::debug!(stream_id, error = %message, "rsocket fire-and-forget failed");
                } else {
                    session.send(Frame::error(
                        stream_id,
                        ErrorCode::APPLICATION_ERROR,
                        &message,
                    ));
                }
            }
        });
        if let Some(s) = self
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&stream_id)
        {
            s.abort = Some(task.abort_handle());
        }
    }

    pub(super) fn user(&self) -> Result<String, String> {
        self.user
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| "not logged in: call 'login' first".to_owned())
    }

    pub(super) fn group(&self, channel: &str) -> String {
        format!("{}:{channel}", self.rs.config.channel_namespace)
    }

    /// Sends one stream element once the stream has credit for it.
    pub(super) async fn emit(&self, stream_id: u32, gate: &Gate, data: Bytes) {
        gate.take().await;
        self.send_next(stream_id, data);
    }

    /// Sends one stream element (the caller took its credit).
    pub(super) fn send_next(&self, stream_id: u32, data: Bytes) {
        self.send(Frame::next(stream_id, Payload::data(data), false));
    }

    /// Counts a `messages.incoming` as open while the guard lives.
    pub(super) fn listening(&self) -> Listening<'_> {
        self.listeners.fetch_add(1, AcqRel);
        Listening(self)
    }

    /// Resolves when an own channel message was queued after this call.
    pub(super) fn own_ready(&self) -> tokio::sync::futures::Notified<'_> {
        self.own_ready.notified()
    }

    pub(super) fn take_own(&self) -> Option<Bytes> {
        self.own
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
    }

    async fn handle(
        &self,
        stream_id: u32,
        kind: Kind,
        gate: &Gate,
        payload: Payload,
        inbound: Option<mpsc::Receiver<Payload>>,
    ) -> Result<(), String> {
        let metadata = payload
            .metadata
            .as_ref()
            .ok_or_else(|| "no route: the request has no metadata".to_owned())?;
        let metadata =
            CompositeMetadata::decode(metadata).map_err(|e| format!("bad metadata: {e}"))?;
        let route = metadata.route().map_err(|e| format!("no route: {e}"))?;
        let data = payload.data;
        let node = self.node();
        let config = &self.rs.config;
        match (route.as_str(), kind) {
            ("login", Kind::Response) => {
                let id = self.login(&data).await?;
                self.send(Frame::next(stream_id, Payload::data(id), true));
            }
            ("channel.join", Kind::Response) => {
                self.join(&text(&data)?).await?;
                self.send(Frame::complete(stream_id));
            }
            ("channel.leave", Kind::Response) => {
                let user = self.user()?;
                let group = self.group(&text(&data)?);
                match node.chat.leave(&group, &user).await {
                    Ok(()) => {}
                    Err(e) if e.code == PlazaCode::NotSubscribed => {}
                    Err(e) => return Err(app_error(e)),
                }
                self.send(Frame::complete(stream_id));
            }
            ("message", Kind::Response) => {
                self.message(&data).await?;
                self.send(Frame::complete(stream_id));
            }
            ("messages.incoming", Kind::Stream) => incoming::run(self, stream_id, gate).await?,
            ("channels", Kind::Stream) => {
                let prefix = self.group("");
                let groups = node
                    .chat
                    .all_groups(MAX_CHANNELS)
                    .await
                    .map_err(app_error)?;
                for g in groups {
                    if let Some(name) = g.strip_prefix(&prefix) {
                        self.emit(stream_id, gate, Bytes::from(name.to_owned()))
                            .await;
                    }
                }
                self.send(Frame::complete(stream_id));
            }
            ("channel.users", Kind::Stream) => {
                let group = self.group(&text(&data)?);
                // An unknown channel is an empty stream.
                let members = node.chat.members(&group).await.unwrap_or_default();
                for (user, _online) in members {
                    self.emit(stream_id, gate, Bytes::from(user)).await;
                }
                self.send(Frame::complete(stream_id));
            }
            ("statistics", Kind::Fnf) => self.client_statistics(&data)?,
            ("statistics", Kind::Channel) => {
                self.user()?;
                let inbound = inbound.ok_or_else(|| "statistics: no inbound side".to_owned())?;
                self.statistics(stream_id, gate, &data, inbound).await?;
            }
            ("file.upload", Kind::Response) => {
                self.user()?;
                let name = files::name_of(&metadata)?;
                files::upload(
                    node.store.as_ref(),
                    &self.rs.files_lock,
                    config.max_file_size,
                    config.max_files,
                    &name,
                    data,
                )
                .await?;
                tracing::info!(file = %name, "rsocket file uploaded");
                self.send(Frame::complete(stream_id));
            }
            ("file.download", Kind::Response) => {
                self.user()?;
                let name = files::name_of(&metadata)?;
                let bytes = files::download(node.store.as_ref(), &name).await?;
                let md = files::name_metadata(&name)?;
                self.send(Frame::next(stream_id, Payload::new(Some(md), bytes), true));
            }
            ("files", Kind::Stream) => {
                self.user()?;
                let names = files::list(node.store.as_ref(), config.max_files).await?;
                for name in names {
                    self.emit(stream_id, gate, Bytes::from(name)).await;
                }
                self.send(Frame::complete(stream_id));
            }
            (
                "login" | "channel.join" | "channel.leave" | "message" | "messages.incoming"
                | "channels" | "channel.users" | "statistics" | "files" | "file.upload"
                | "file.download",
                _,
            ) => {
                return Err(format!(
                    "route '{route}' does not take this interaction model ({kind:?})"
                ));
            }
            _ => return Err(format!("unknown route '{route}'")),
        }
        Ok(())
    }

    /// FNF `statistics`: the client's own numbers (`{"memory_usage": n}`), kept for the
    /// session and logged.
    fn client_statistics(&self, data: &Bytes) -> Result<(), String> {
        let user = self.user()?;
        if data.len() > MAX_CLIENT_STATS {
            return Err(format!(
                "client statistics are {} bytes, at most {MAX_CLIENT_STATS}",
                data.len()
            ));
        }
        let value: serde_json::Value =
            serde_json::from_slice(data).map_err(|e| format!("bad client statistics: {e}"))?;
        if !value.is_object() {
            return Err("client statistics must be a JSON object".into());
        }
        tracing::info!(%user, statistics = %value, "rsocket client statistics");
        *self
            .client_stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(data.clone());
        Ok(())
    }

    /// The `statistics` request-channel: samples from the node's statistics timer, within the
    /// stream's credit (a sample waiting for credit is replaced by a newer one); the client's
    /// PAYLOADs change the ids and the period. Runs until CANCEL.
    async fn statistics(
        &self,
        stream_id: u32,
        gate: &Gate,
        first: &Bytes,
        mut inbound: mpsc::Receiver<Payload>,
    ) -> Result<(), String> {
        let mut request = StatsRequest::default();
        if !first.is_empty() {
            request = request.update(first)?;
        }
        let mut watch = self.rs.stats.watch(request)?;
        self.send(Frame::RequestN {
            stream_id,
            n: CHANNEL_WINDOW,
        });
        let mut received = 0u32;
        let mut inbound_open = true;
        let mut sample: Option<Bytes> = None;
        loop {
            tokio::select! {
                p = inbound.recv(), if inbound_open => match p {
                    Some(p) => {
                        request = request.update(&p.data)?;
                        watch.update(request);
                        tracing::debug!(stream_id, ?request, "rsocket statistics request");
                        received += 1;
                        if received >= CHANNEL_WINDOW / 2 {
                            self.send(Frame::RequestN { stream_id, n: received });
                            received = 0;
                        }
                    }
                    None => inbound_open = false,
                },
                changed = watch.rx.changed() => {
                    changed.map_err(|_| "statistics timer stopped".to_owned())?;
                    sample = watch.rx.borrow_and_update().clone();
                }
                () = gate.take(), if sample.is_some() => {
                    if let Some(s) = sample.take() {
                        self.send_next(stream_id, s);
                    }
                }
            }
        }
    }

    /// `login`: the username (open login) or a connection token; answers a session id.
    async fn login(&self, data: &Bytes) -> Result<Bytes, String> {
        let given = text(data)?;
        let node = self.node();
        let user = if self.rs.config.open_login {
            given
        } else {
            let jwt = node.auth.jwt.as_ref().ok_or_else(|| {
                "login needs a connection token, and this server accepts none".to_owned()
            })?;
            jwt.verify_connect(given.trim(), unix_now())
                .map_err(|e| format!("login refused: {e}"))?
                .user
        };
        node.chat.register_user(&user).await.map_err(app_error)?;
        let mut current = self.user.lock().unwrap_or_else(PoisonError::into_inner);
        if self.closed.load(Acquire) {
            return Err("the connection is closing".into());
        }
        if current.replace(user).is_none() {
            self.rs.logged_in.fetch_add(1, Relaxed);
        }
        drop(current);
        Ok(Bytes::from(session_id()?))
    }

    /// `channel.join`: the namespace must let clients join, and its subscribe policy must
    /// admit the user.
    async fn join(&self, channel: &str) -> Result<(), String> {
        let user = self.user()?;
        let node = self.node();
        let (group, options) = node
            .resolve_channel(&self.group(channel))
            .map_err(app_error)?;
        if !options.client_join {
            return Err(format!(
                "the namespace of '{group}' does not set client_join: RSocket channels cannot be joined"
            ));
        }
        match options.subscribe {
            AccessPolicy::Public => {}
            AccessPolicy::User => {
                if !group.allowed_users().any(|u| u == user) {
                    return Err(format!(
                        "permission denied: '{group}' is only for the users named after its '#'"
                    ));
                }
            }
            AccessPolicy::Token => {
                return Err(format!(
                    "permission denied: joining '{group}' needs a subscription token, which RSocket channel.join cannot carry"
                ));
            }
            AccessPolicy::App => {
                let app = node
                    .auth
                    .app
                    .as_ref()
                    .filter(|a| a.has_subscribe())
                    .ok_or_else(|| {
                        "permission denied: auth.subscribe_url is not configured".to_owned()
                    })?;
                let forwarded = Forwarded::default();
                let request = AppSubscribeRequest {
                    client: "rsocket",
                    user: &user,
                    channel: group.as_str(),
                    forwarded: &forwarded,
                    data: None,
                };
                match app.subscribe(request).await {
                    Ok(AppSubscribeDecision::Allow { .. }) => {}
                    Ok(AppSubscribeDecision::Deny { reason }) => {
                        return Err(format!("permission denied: the app refused: {reason}"));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "rsocket channel.join: the app gave no decision");
                        return Err("the app could not be asked; retry later".into());
                    }
                }
            }
        }
        match node.chat.join(group.as_str(), &user).await {
            Ok(_) => Ok(()),
            Err(e) if e.code == PlazaCode::AlreadySubscribed => Ok(()),
            Err(e) => Err(app_error(e)),
        }
    }

    /// `message`: `{"user": str|null, "content": str, "channel": str|null}`.
    async fn message(&self, data: &Bytes) -> Result<(), String> {
        #[derive(serde::Deserialize)]
        struct Message {
            #[serde(default)]
            user: Option<String>,
            content: String,
            #[serde(default)]
            channel: Option<String>,
        }
        let user = self.user()?;
        let node = self.node();
        let m: Message =
            serde_json::from_slice(data).map_err(|e| format!("bad message JSON: {e}"))?;
        let content = ChatPayload::from_trusted(
            serde_json::to_string(&m.content).map_err(|e| e.to_string())?,
        );
        if let Some(channel) = m.channel {
            let peer = Peer::Group(self.group(&channel));
            node.chat
                .send(&user, &peer, None, content)
                .await
                .map_err(app_error)?;
            if self.listeners.load(Acquire) > 0 {
                let own =
                    serde_json::json!({"user": user, "content": m.content, "channel": channel});
                let mut queue = self.own.lock().unwrap_or_else(PoisonError::into_inner);
                if queue.len() >= MAX_OWN {
                    queue.pop_front();
                }
                queue.push_back(Bytes::from(own.to_string()));
                drop(queue);
                self.own_ready.notify_waiters();
            }
        } else if let Some(to) = m.user {
            node.chat
                .send(&user, &Peer::User(to), None, content)
                .await
                .map_err(app_error)?;
        } else {
            return Err("a message needs 'user' or 'channel'".into());
        }
        Ok(())
    }
}

fn text(data: &Bytes) -> Result<String, String> {
    String::from_utf8(data.to_vec()).map_err(|_| "the data must be UTF-8 text".to_owned())
}

/// A random UUID (version 4) as text.
fn session_id() -> Result<String, String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| format!("no random bytes: {e}"))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}
