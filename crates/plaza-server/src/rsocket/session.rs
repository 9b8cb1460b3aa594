//! One RSocket connection: SETUP first, KEEPALIVE echo, requests routed by their composite
//! metadata's route to the chat, each request on its own task so streams run side by side.
//!
//! Errors of a request are ERROR 0x201 (APPLICATION_ERROR) on its stream and the connection
//! goes on; a bad SETUP (lease, resume, other version, metadata that is not composite) is an
//! ERROR on stream 0 and the connection is closed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use plaza_core::chat::Peer;
use plaza_core::{ErrorCode as PlazaCode, Payload as ChatPayload, ReplyError};
use plaza_protocol::rsocket::{
    COMPOSITE_METADATA_MIME, CompositeMetadata, Credit, ErrorCode, Frame, LengthPrefixed, Payload,
    Reassembler, encode_length_prefixed,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio::task::AbortHandle;

use super::RsocketConfig;
use crate::auth::jwt::unix_now;
use crate::node::Node;

/// Largest reassembled payload, and all partial payloads of a connection together.
const MAX_PAYLOAD: usize = 16 * 1024 * 1024;
const MAX_BUFFERED: usize = 32 * 1024 * 1024;
/// How often `messages.incoming` looks at the inbox when nothing woke it.
const INBOX_POLL: Duration = Duration::from_millis(100);
/// Most channels listed by `channels`.
const MAX_CHANNELS: usize = 10_000;

/// What the writer task gets: a frame, or `None` to flush and close.
type Out = mpsc::UnboundedSender<Option<Frame>>;

/// The interaction model of a request, which is part of its route's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Response,
    Fnf,
    Stream,
    Channel,
}

/// A stream's REQUEST_N credit, waited on by the task that emits.
struct Gate {
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

    async fn take(&self) {
        loop {
            if self
                .credit
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
            {
                return;
            }
            self.granted.notified().await;
        }
    }
}

struct Stream {
    gate: Arc<Gate>,
    abort: Option<AbortHandle>,
}

struct Session {
    node: Arc<Node>,
    config: Arc<RsocketConfig>,
    out: Out,
    user: Mutex<Option<String>>,
    streams: Mutex<HashMap<u32, Stream>>,
    /// Channel messages this connection's user sent: chat does not put them in the sender's
    /// inbox, the tutorial shows them to the sender too, so `messages.incoming` takes them here.
    own: Mutex<Vec<Bytes>>,
    own_ready: Notify,
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
}

impl Inbound {
    /// A session and the frames its writer must send (`None`: flush and close).
    pub(super) fn new(
        node: Arc<Node>,
        config: Arc<RsocketConfig>,
    ) -> (Self, mpsc::UnboundedReceiver<Option<Frame>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let session = Arc::new(Session {
            node,
            config,
            out: tx,
            user: Mutex::new(None),
            streams: Mutex::new(HashMap::new()),
            own: Mutex::new(Vec::new()),
            own_ready: Notify::new(),
        });
        let inbound = Self {
            session,
            reassembler: Reassembler::new(MAX_PAYLOAD, MAX_BUFFERED),
            set_up: false,
        };
        (inbound, rx)
    }

    /// One frame's bytes (without any transport prefix).
    pub(super) fn feed(&mut self, bytes: Bytes) -> Flow {
        self.session
            .on_frame(bytes, &mut self.set_up, &mut self.reassembler)
    }

    pub(super) fn connection_error(&self, message: &str) {
        self.session
            .send(Frame::error(0, ErrorCode::CONNECTION_ERROR, message));
    }

    /// Ends every stream and tells the writer to flush and close.
    pub(super) fn finish(self) {
        self.session.cancel_all();
        let _ = self.session.out.send(None);
    }
}

pub(super) async fn run_tcp(stream: TcpStream, node: Arc<Node>, config: Arc<RsocketConfig>) {
    let (mut rd, mut wr) = stream.into_split();
    let (mut inbound, mut rx) = Inbound::new(node, config);
    let writer = tokio::spawn(async move {
        let mut buf = BytesMut::new();
        while let Some(Some(frame)) = rx.recv().await {
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
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    inbound.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

fn app_error(e: ReplyError) -> String {
    e.message
}

impl Session {
    fn send(&self, frame: Frame) {
        let _ = self.out.send(Some(frame));
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

    fn on_frame(
        self: &Arc<Self>,
        bytes: Bytes,
        set_up: &mut bool,
        reassembler: &mut Reassembler,
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
            } => self.request(stream_id, Kind::Response, 0, payload),
            Frame::RequestFnf {
                stream_id, payload, ..
            } => self.request(stream_id, Kind::Fnf, 0, payload),
            Frame::RequestStream {
                stream_id,
                initial_n,
                payload,
                ..
            } => self.request(stream_id, Kind::Stream, initial_n, payload),
            Frame::RequestChannel {
                stream_id,
                initial_n,
                payload,
                ..
            } => self.request(stream_id, Kind::Channel, initial_n, payload),
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
            // The inbound side of a channel: no route reads it yet.
            Frame::Payload { .. } => {}
        }
        Flow::Continue
    }

    /// Starts a request on its own task.
    fn request(self: &Arc<Self>, stream_id: u32, kind: Kind, initial_n: u32, payload: Payload) {
        let gate = Arc::new(Gate::new(initial_n));
        self.streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                stream_id,
                Stream {
                    gate: Arc::clone(&gate),
                    abort: None,
                },
            );
        let session = Arc::clone(self);
        let task = tokio::spawn(async move {
            let result = session.handle(stream_id, kind, &gate, payload).await;
            session
                .streams
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&stream_id);
            if let Err(message) = result
                && kind != Kind::Fnf
            {
                session.send(Frame::error(
                    stream_id,
                    ErrorCode::APPLICATION_ERROR,
                    &message,
                ));
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

    fn user(&self) -> Result<String, String> {
        self.user
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| "not logged in: call 'login' first".to_owned())
    }

    fn group(&self, channel: &str) -> String {
        format!("{}:{channel}", self.config.channel_namespace)
    }

    /// Sends one stream element once the stream has credit for it.
    async fn emit(&self, stream_id: u32, gate: &Gate, data: Bytes) {
        gate.take().await;
        self.send(Frame::next(stream_id, Payload::data(data), false));
    }

    async fn handle(
        &self,
        stream_id: u32,
        kind: Kind,
        gate: &Gate,
        payload: Payload,
    ) -> Result<(), String> {
        let metadata = payload
            .metadata
            .as_ref()
            .ok_or_else(|| "no route: the request has no metadata".to_owned())?;
        let metadata =
            CompositeMetadata::decode(metadata).map_err(|e| format!("bad metadata: {e}"))?;
        let route = metadata.route().map_err(|e| format!("no route: {e}"))?;
        let data = payload.data;
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
                match self.node.chat.leave(&group, &user).await {
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
            ("messages.incoming", Kind::Stream) => self.incoming(stream_id, gate).await?,
            ("channels", Kind::Stream) => {
                let prefix = self.group("");
                let groups = self
                    .node
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
                let members = self.node.chat.members(&group).await.unwrap_or_default();
                for (user, _online) in members {
                    self.emit(stream_id, gate, Bytes::from(user)).await;
                }
                self.send(Frame::complete(stream_id));
            }
            // Client statistics are accepted and dropped.
            ("statistics", Kind::Fnf) => {}
            ("statistics", Kind::Channel)
            | ("files", Kind::Stream)
            | ("file.upload" | "file.download", Kind::Response) => {
                return Err(format!("route '{route}' is not supported yet"));
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

    /// `login`: the username (open login) or a connection token; answers a session id.
    async fn login(&self, data: &Bytes) -> Result<Bytes, String> {
        let given = text(data)?;
        let user = if self.config.open_login {
            given
        } else {
            let jwt = self.node.auth.jwt.as_ref().ok_or_else(|| {
                "login needs a connection token, and this server accepts none".to_owned()
            })?;
            jwt.verify_connect(given.trim(), unix_now())
                .map_err(|e| format!("login refused: {e}"))?
                .user
        };
        self.node
            .chat
            .register_user(&user)
            .await
            .map_err(app_error)?;
        *self.user.lock().unwrap_or_else(PoisonError::into_inner) = Some(user);
        Ok(Bytes::from(session_id()?))
    }

    async fn join(&self, channel: &str) -> Result<(), String> {
        let user = self.user()?;
        let (group, options) = self
            .node
            .resolve_channel(&self.group(channel))
            .map_err(app_error)?;
        if !options.client_join {
            return Err(format!(
                "the namespace of '{group}' does not set client_join: RSocket channels cannot be joined"
            ));
        }
        match self.node.chat.join(group.as_str(), &user).await {
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
        let m: Message =
            serde_json::from_slice(data).map_err(|e| format!("bad message JSON: {e}"))?;
        let content = ChatPayload::from_trusted(
            serde_json::to_string(&m.content).map_err(|e| e.to_string())?,
        );
        if let Some(channel) = m.channel {
            let peer = Peer::Group(self.group(&channel));
            self.node
                .chat
                .send(&user, &peer, None, content)
                .await
                .map_err(app_error)?;
            let own = serde_json::json!({"user": user, "content": m.content, "channel": channel});
            self.own
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Bytes::from(own.to_string()));
            self.own_ready.notify_waiters();
        } else if let Some(to) = m.user {
            self.node
                .chat
                .send(&user, &Peer::User(to), None, content)
                .await
                .map_err(app_error)?;
        } else {
            return Err("a message needs 'user' or 'channel'".into());
        }
        Ok(())
    }

    /// `messages.incoming`: the user's inbox messages, acknowledged once queued, until CANCEL.
    async fn incoming(&self, stream_id: u32, gate: &Gate) -> Result<(), String> {
        let user = self.user()?;
        let chat = &self.node.chat;
        let budget = (self.node.settings.limits.max_queue_bytes / 2).max(64 * 1024);
        let mut last = 0u64;
        loop {
            let woken = self.own_ready.notified();
            let own = std::mem::take(&mut *self.own.lock().unwrap_or_else(PoisonError::into_inner));
            for m in own {
                self.emit(stream_id, gate, m).await;
            }
            let backlog = chat.backlog(&user, budget).await.map_err(app_error)?;
            let mut seqs = Vec::new();
            for (seq, entry) in &backlog.entries {
                if *seq <= last {
                    continue;
                }
                last = *seq;
                if let Some(m) = self.incoming_json(entry.as_bytes()) {
                    self.emit(stream_id, gate, m).await;
                }
                seqs.push(*seq);
            }
            if !seqs.is_empty() {
                chat.ack_seqs(&user, &seqs).await.map_err(app_error)?;
            }
            if backlog.more {
                continue;
            }
            let _ = tokio::time::timeout(INBOX_POLL, woken).await;
        }
    }

    /// An inbox entry as the tutorial's message JSON; `None` for receipts and events.
    fn incoming_json(&self, entry: &[u8]) -> Option<Bytes> {
        let v: serde_json::Value = serde_json::from_slice(entry).ok()?;
        if v.get("push")?.as_str()? != "message" {
            return None;
        }
        let from = v.get("from")?.as_str()?;
        let content = match v.get("data") {
            Some(serde_json::Value::String(s)) => serde_json::Value::String(s.clone()),
            Some(other) => serde_json::Value::String(other.to_string()),
            None => serde_json::Value::Null,
        };
        let prefix = self.group("");
        let channel = v
            .get("group")
            .and_then(|g| g.as_str())
            .map(|g| g.strip_prefix(&prefix).unwrap_or(g).to_owned());
        let m = serde_json::json!({"user": from, "content": content, "channel": channel});
        Some(Bytes::from(m.to_string()))
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
