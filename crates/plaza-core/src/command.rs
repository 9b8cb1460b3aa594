//! What a client asks of the server, whatever protocol it speaks. Each protocol adapter decodes
//! its frames into these; the server executes them.

use crate::chat::Peer;
use crate::payload::Payload;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Opens the session. Must come first.
    Connect {
        /// A free-form client name for logs (`"web-1.2"`), optional.
        client_name: Option<String>,
        /// A connection token the app signed.
        token: Option<String>,
        /// Anything the client wants the app to see when Plaza asks it (`connect_url`).
        data: Option<Payload>,
    },
    Subscribe {
        channel: String,
        /// The last position the client saw, to recover what it missed.
        since: Option<Position>,
        /// A subscription token, for namespaces whose `subscribe` policy is `token`.
        token: Option<String>,
    },
    Unsubscribe {
        channel: String,
    },
    Publish {
        channel: String,
        data: Payload,
        /// A token for the channel, for namespaces whose `publish` policy is `token`.
        token: Option<String>,
    },
    /// Who is subscribed to a channel with presence.
    Presence {
        channel: String,
    },
    /// How many connections and users are subscribed to a channel with presence.
    PresenceStats {
        channel: String,
    },
    /// Redeems a live-view token the app obtained from `/api/live/authorize`.
    LiveSubscribe {
        token: String,
    },
    /// Opens a live view with the client's own query, where the dealer allows it.
    LiveSubscribeQuery {
        dealer: String,
        query: Payload,
    },
    /// Ends a live view.
    LiveCancel {
        subscription: String,
    },
    /// Chat: direct messages, groups, the inbox.
    Chat(ChatCommand),
    /// Application-level ping: answered with an empty result.
    Ping,
}

/// The chat requests of a connected user (`docs/PROTOCOL.md`, "Chat").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatCommand {
    /// A message to a user or a group. `id` is the client's own (unique per sender, so a retry
    /// is stored once); without it the server makes one.
    Send {
        to: Peer,
        id: Option<String>,
        data: Payload,
    },
    /// Acknowledges inbox entries by `seq`, or messages by id (and sender, when ids collide).
    Ack {
        seqs: Vec<u64>,
        id: Option<String>,
        from: Option<String>,
    },
    /// Marks a received message (and its conversation up to it) read.
    Read {
        id: String,
        from: Option<String>,
    },
    /// An ephemeral "typing" notice to a user or a group.
    Typing {
        to: Peer,
    },
    /// Joins a group, creating it if it does not exist.
    Join {
        group: String,
    },
    Leave {
        group: String,
    },
    /// The groups this user is in, or with `all` every group (where the server allows it).
    Groups {
        all: bool,
    },
    /// A group's members with their online state.
    Members {
        group: String,
    },
    /// A page of a conversation's history: the latest `limit` messages, or those before offset
    /// `before`.
    History {
        with: Peer,
        before: Option<u64>,
        limit: Option<usize>,
    },
    /// Unread counts per conversation.
    Unread,
}

impl ChatCommand {
    pub fn method(&self) -> &'static str {
        match self {
            ChatCommand::Send { .. } => "send",
            ChatCommand::Ack { .. } => "ack",
            ChatCommand::Read { .. } => "read",
            ChatCommand::Typing { .. } => "typing",
            ChatCommand::Join { .. } => "group_join",
            ChatCommand::Leave { .. } => "group_leave",
            ChatCommand::Groups { .. } => "groups",
            ChatCommand::Members { .. } => "group_members",
            ChatCommand::History { .. } => "chat_history",
            ChatCommand::Unread => "unread",
        }
    }
}

impl Command {
    /// The method name, for logs and errors.
    pub fn method(&self) -> &'static str {
        match self {
            Command::Connect { .. } => "connect",
            Command::Subscribe { .. } => "subscribe",
            Command::Unsubscribe { .. } => "unsubscribe",
            Command::Publish { .. } => "publish",
            Command::Presence { .. } => "presence",
            Command::PresenceStats { .. } => "presence_stats",
            Command::LiveSubscribe { .. } => "live_subscribe",
            Command::LiveSubscribeQuery { .. } => "live_subscribe_query",
            Command::LiveCancel { .. } => "live_cancel",
            Command::Chat(chat) => chat.method(),
            Command::Ping => "ping",
        }
    }
}

/// A place in a channel's history: offsets count publications within one epoch, and the epoch
/// changes only when the history is lost.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    pub epoch: String,
    pub offset: u64,
}

/// A successful answer to a [`Command`], before a protocol adapter encodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The session is open.
    Connected(ConnectInfo),
    /// The command was carried out and has nothing more to say.
    Done,
    /// A publication to a channel with history was durably stored at this position.
    Published(Position),
    /// Subscribed to a channel with history.
    Subscribed(SubscribeInfo),
    /// The connections present in a channel.
    Presence(Vec<crate::presence::ClientInfo>),
    /// Connections and distinct users present in a channel.
    PresenceStats { clients: usize, users: usize },
    /// Live views opened, by subscription id, in the order of the request's items.
    LiveSubscribed(Vec<u64>),
    /// A result object the server rendered itself (chat results).
    Json(Payload),
}

/// What a subscriber learns about a channel with history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeInfo {
    /// The channel's position when the subscription started: publications after it follow.
    pub position: Option<Position>,
    /// Only when `since` was given: whether every publication after `since` follows this reply
    /// (`true`), or the gap could not be filled and the client should reload its state (`false`).
    pub recovered: Option<bool>,
}

/// What a client learns when its session opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectInfo {
    /// The connection's id on this server, for logs and support.
    pub client_id: String,
    /// The server's version.
    pub version: &'static str,
    /// The authenticated user; empty when anonymous.
    pub user: String,
    /// Channels the server subscribed the connection to (from its token or the app).
    pub channels: Vec<String>,
    /// Seconds between server pings; 0 when keep-alive pings are off.
    pub ping_interval_secs: u64,
    /// Largest frame the client may send, in bytes.
    pub max_frame_size: usize,
    /// The user's chat inbox, when it was attached to this connection.
    pub inbox: Option<InboxInfo>,
}

/// What a connection learns about its user's inbox at connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxInfo {
    /// Unacknowledged entries that follow the reply, oldest first.
    pub pending: usize,
    /// Unacknowledged entries the inbox's bounds (size, age) dropped since the last connect.
    pub dropped: u64,
    /// The inbox was lost and started again: what it held is unknown.
    pub reset: bool,
}
