//! A client session: the protocol-independent state of one connection (connected or not, its
//! subscriptions) and the execution of its commands against the node.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use plaza_core::chat::{self as chat_rules, Peer};
use plaza_core::{
    AccessPolicy, ChannelName, ChatCommand, ClientInfo, CloseCode, Command, ConnectInfo, ErrorCode,
    InboxInfo, NamespaceOptions, Outcome, Payload, Position, Publication, ReplyError,
    SubscribeInfo, json_string,
};

use crate::auth::app::{
    AppConnectDecision, AppConnectRequest, AppSubscribeDecision, AppSubscribeRequest, Forwarded,
};
use crate::auth::jwt::unix_now;
use crate::chat::Backlog;
use crate::conn::ConnHandle;
use crate::hub::Subscriber;
use crate::live::{ClientSubscribeError, LiveSub};
use crate::node::{Node, Published};

/// What a command produced: the outcome to reply with and, for a subscribe to a channel with
/// history, what must be queued with the reply.
pub struct Handled {
    /// The reply, unless `pending` will give it.
    pub outcome: Result<Outcome, ReplyError>,
    /// A reply that comes later (a publish waiting to be durable). The connection keeps reading
    /// meanwhile; replies are matched to requests by id.
    pub pending: Option<PendingReply>,
    /// New subscriptions whose first frames must be queued with the reply.
    pub recoveries: Vec<Recovery>,
    /// Close the connection with this code once the reply is written.
    pub close_after: Option<CloseCode>,
    /// Live views to attach once the reply is queued (their waiting deltas follow it).
    pub attach_live: Vec<Arc<LiveSub>>,
}

/// A reply that resolves later; whoever awaits it counts its error.
pub type PendingReply = plaza_store::BoxFuture<'static, Result<Outcome, ReplyError>>;

/// Who a connection turned out to be.
struct Identity {
    user: String,
    channels: Vec<String>,
    info: Option<Payload>,
}

/// A new history subscription: the adapter encodes the reply and `publications`, and hands them
/// to [`Subscriber::unpark`] with `last_offset`, so they go out before any live publication.
pub struct Recovery {
    pub subscriber: Arc<Subscriber>,
    pub publications: Vec<Publication>,
    pub last_offset: u64,
}

pub struct Session {
    node: Arc<Node>,
    conn: Arc<ConnHandle>,
    channels: HashSet<Arc<str>>,
    client_name: Option<String>,
    /// The authenticated user; empty for an anonymous connection.
    user: String,
    /// What the token or the app attached to this connection.
    info: Option<Payload>,
    /// The upgrade request's headers and query parameters the app wants to see.
    forwarded: Forwarded,
    /// Set while executing a command that must end the connection after its reply.
    close_after: Option<CloseCode>,
    /// Subscriptions made by the command being executed, for [`Handled::recoveries`].
    recoveries: Vec<Recovery>,
    /// Live views open on this connection.
    live: HashSet<u64>,
    /// Redeemed by the command being executed, for [`Handled::attach_live`].
    attach_live: Vec<Arc<LiveSub>>,
    /// The user's inbox while this connection is still being sent its backlog.
    inbox_catch_up: Option<InboxCatchUp>,
}

/// A connection whose inbox backlog did not fit in one go: the inbox subscriber stays parked
/// (live entries wait) while the rest follows as the client acknowledges what it got.
struct InboxCatchUp {
    subscriber: Arc<Subscriber>,
    epoch: String,
    /// The last seq sent so far.
    last: u64,
}

/// A publish's result: now, or once durable.
enum Executed {
    Now(Outcome),
    Later(PendingReply),
}

impl Session {
    pub fn new(node: Arc<Node>, conn: Arc<ConnHandle>, forwarded: Forwarded) -> Self {
        Self {
            node,
            conn,
            channels: HashSet::new(),
            client_name: None,
            user: String::new(),
            info: None,
            forwarded,
            close_after: None,
            recoveries: Vec::new(),
            live: HashSet::new(),
            attach_live: Vec::new(),
            inbox_catch_up: None,
        }
    }

    pub fn client_name(&self) -> Option<&str> {
        self.client_name.as_deref()
    }

    /// Executes one command. Errors are counted in the metrics.
    pub async fn handle(&mut self, command: Command) -> Handled {
        let mut pending = None;
        let outcome = match command {
            Command::Publish {
                channel,
                data,
                token,
            } if self.conn.is_connected() => match self.publish(&channel, data, token).await {
                Ok(Executed::Now(outcome)) => Ok(outcome),
                Ok(Executed::Later(later)) => {
                    pending = Some(later);
                    // Replaced by the pending reply.
                    Ok(Outcome::Done)
                }
                Err(e) => Err(e),
            },
            Command::Chat(ChatCommand::Send { to, id, data }) if self.conn.is_connected() => {
                match self.start_send(to, id, data).await {
                    Ok(later) => {
                        pending = Some(later);
                        // Replaced by the pending reply.
                        Ok(Outcome::Done)
                    }
                    Err(e) => Err(e),
                }
            }
            other => self.execute(other).await,
        };
        Handled {
            outcome: outcome.map_err(|e| self.node.count(e)),
            pending,
            recoveries: std::mem::take(&mut self.recoveries),
            close_after: self.close_after.take(),
            attach_live: std::mem::take(&mut self.attach_live),
        }
    }

    async fn execute(&mut self, command: Command) -> Result<Outcome, ReplyError> {
        let connected = self.conn.is_connected();
        match command {
            Command::Ping => return Ok(Outcome::Done),
            Command::Connect {
                client_name,
                token,
                data,
            } => {
                if connected {
                    return Err(ReplyError::new(
                        ErrorCode::AlreadyConnected,
                        "connect was already sent on this connection",
                    ));
                }
                return self.connect(client_name, token, data).await;
            }
            _ if !connected => {
                return Err(ReplyError::new(
                    ErrorCode::NotConnected,
                    "send connect before any other request",
                ));
            }
            _ => {}
        }
        match command {
            Command::Subscribe {
                channel,
                since,
                token,
            } => self.subscribe(&channel, since, token).await,
            Command::Unsubscribe { channel } => self.unsubscribe(&channel).await,
            Command::Publish {
                channel,
                data,
                token,
            } => match self.publish(&channel, data, token).await? {
                Executed::Now(outcome) => Ok(outcome),
                Executed::Later(later) => later.await,
            },
            Command::Presence { channel } => {
                let (channel, options) = self.subscribed(&channel)?;
                self.node
                    .presence(options, channel.as_str())
                    .await?
                    .map(Outcome::Presence)
                    .ok_or_else(|| no_presence(&channel))
            }
            Command::PresenceStats { channel } => {
                let (channel, options) = self.subscribed(&channel)?;
                self.node
                    .presence_stats(options, channel.as_str())
                    .await?
                    .map(|(clients, users)| Outcome::PresenceStats { clients, users })
                    .ok_or_else(|| no_presence(&channel))
            }
            Command::LiveSubscribe { token } => {
                self.live_room(1)?;
                let subs = self
                    .node
                    .live
                    .redeem(&token, &self.user, Instant::now())
                    .map_err(|e| ReplyError::new(ErrorCode::PermissionDenied, e.to_string()))?;
                let ids: Vec<u64> = subs.iter().map(|s| s.id).collect();
                self.live.extend(ids.iter().copied());
                self.attach_live = subs;
                Ok(Outcome::LiveSubscribed(ids))
            }
            Command::LiveSubscribeQuery { dealer, query } => {
                self.live_room(1)?;
                let query: serde_json::Value = serde_json::from_str(query.as_str())
                    .map_err(|e| ReplyError::new(ErrorCode::BadRequest, e.to_string()))?;
                let id = self
                    .node
                    .live
                    .subscribe(&dealer, &query, &self.conn)
                    .map_err(|e| match e {
                        ClientSubscribeError::NotOpen(_) => {
                            ReplyError::new(ErrorCode::PermissionDenied, e.to_string())
                        }
                        ClientSubscribeError::Live(_) => {
                            ReplyError::new(ErrorCode::BadRequest, e.to_string())
                        }
                    })?;
                self.live.insert(id);
                Ok(Outcome::LiveSubscribed(vec![id]))
            }
            Command::LiveCancel { subscription } => {
                let id = subscription
                    .parse::<u64>()
                    .ok()
                    .filter(|id| self.live.remove(id))
                    .ok_or_else(|| {
                        ReplyError::new(
                            ErrorCode::NotSubscribed,
                            format!("no live view '{subscription}' on this connection"),
                        )
                    })?;
                self.node.live.cancel(id);
                Ok(Outcome::Done)
            }
            Command::Chat(command) => {
                let outcome = self.chat(command).await;
                if let Err(e) = self.continue_inbox().await {
                    tracing::warn!(conn = self.conn.id, error = %e, "inbox backlog: read failed");
                }
                outcome
            }
            Command::Ping | Command::Connect { .. } => Ok(Outcome::Done),
        }
    }

    /// Refuses chat when it is off or the connection is anonymous.
    fn chat_allowed(&self) -> Result<(), ReplyError> {
        if !self.node.chat.config.enabled {
            return Err(ReplyError::new(
                ErrorCode::UnknownMethod,
                "chat is turned off on this server ([chat] enabled = false)",
            ));
        }
        if self.user.is_empty() {
            return Err(ReplyError::new(
                ErrorCode::PermissionDenied,
                "chat needs an authenticated user: connect with a token",
            ));
        }
        Ok(())
    }

    /// A chat send, pipelined like a publish: queued to the store now (so a connection's
    /// messages keep their order), answered `accepted` once durable.
    async fn start_send(
        &self,
        to: Peer,
        id: Option<String>,
        data: Payload,
    ) -> Result<PendingReply, ReplyError> {
        self.chat_allowed()?;
        let to = self.checked_peer(to)?;
        let durable = self
            .node
            .chat
            .start_send(&self.user, &to, id, data, false)
            .await?;
        Ok(Box::pin(async move {
            let accepted = durable.await?;
            Ok(Outcome::Json(Payload::from_trusted(format!(
                "{{\"status\":\"accepted\",\"id\":{},\"ts\":{},\"recipients\":{},\"duplicate\":{}}}",
                json_string(&accepted.id),
                accepted.ts,
                accepted.recipients,
                accepted.duplicate
            ))))
        }))
    }

    async fn chat(&mut self, command: ChatCommand) -> Result<Outcome, ReplyError> {
        self.chat_allowed()?;
        let node = Arc::clone(&self.node);
        let chat = &node.chat;
        let user = self.user.clone();
        let json = |text: String| Ok(Outcome::Json(Payload::from_trusted(text)));
        match command {
            ChatCommand::Send { to, id, data } => self.start_send(to, id, data).await?.await,
            ChatCommand::Ack { seqs, id, from } => {
                let mut acked = chat.ack_seqs(&user, &seqs).await?;
                if let Some(id) = id {
                    acked += chat.ack_id(&user, &id, from.as_deref()).await?;
                }
                json(format!("{{\"acked\":{acked}}}"))
            }
            ChatCommand::Read { id, from } => {
                let read = chat.read(&user, &id, from.as_deref()).await?;
                json(format!("{{\"read\":{read}}}"))
            }
            ChatCommand::Typing { to } => {
                let to = self.checked_peer(to)?;
                chat.typing(&user, &to).await?;
                Ok(Outcome::Done)
            }
            ChatCommand::Join { group } => {
                let (channel, options) = node.resolve_channel(&group)?;
                if !options.client_join {
                    return Err(ReplyError::new(
                        ErrorCode::PermissionDenied,
                        format!(
                            "clients may not join groups in the namespace of '{channel}': it does not set client_join"
                        ),
                    ));
                }
                self.check_access(options.subscribe, &channel, None, "join")
                    .await?;
                let created = chat.join(channel.as_str(), &user).await?;
                json(format!("{{\"created\":{created}}}"))
            }
            ChatCommand::Leave { group } => {
                let (channel, _) = node.resolve_channel(&group)?;
                chat.leave(channel.as_str(), &user).await?;
                Ok(Outcome::Done)
            }
            ChatCommand::Groups { all } => {
                let groups = if all {
                    if !chat.config.list_all_groups {
                        return Err(ReplyError::new(
                            ErrorCode::PermissionDenied,
                            "listing every group is turned off ([chat] list_all_groups)",
                        ));
                    }
                    chat.all_groups(10_000).await?
                } else {
                    chat.groups_of(&user).await?
                };
                let list: Vec<String> = groups.iter().map(|g| json_string(g)).collect();
                json(format!("{{\"groups\":[{}]}}", list.join(",")))
            }
            ChatCommand::Members { group } => {
                let (channel, _) = node.resolve_channel(&group)?;
                if !chat.is_member(channel.as_str(), &user).await? {
                    return Err(ReplyError::new(
                        ErrorCode::PermissionDenied,
                        format!("'{user}' is not a member of '{channel}'"),
                    ));
                }
                let members = chat.members(channel.as_str()).await?;
                json(members_json(&members))
            }
            ChatCommand::History {
                with,
                before,
                limit,
            } => {
                let with = self.checked_peer(with)?;
                let conversation = chat.conversation(&user, &with, false).await?;
                Ok(Outcome::Json(
                    chat.history(&conversation, before, limit).await?,
                ))
            }
            ChatCommand::Unread => {
                let counts = chat.unread(&user).await?;
                json(unread_json(&counts))
            }
        }
    }

    /// Validates a group name as a channel name (its namespace must exist).
    fn checked_peer(&self, peer: Peer) -> Result<Peer, ReplyError> {
        match peer {
            Peer::Group(group) => {
                let (channel, _) = self.node.resolve_channel(&group)?;
                Ok(Peer::Group(channel.as_str().to_owned()))
            }
            user => Ok(user),
        }
    }

    /// Subscribes this connection to its user's inbox and queues the unacknowledged entries
    /// after the connect reply. `None` when chat is off or the connection is anonymous.
    async fn attach_inbox(&mut self) -> Result<Option<InboxInfo>, ReplyError> {
        let node = Arc::clone(&self.node);
        let chat = &node.chat;
        if !chat.config.enabled || self.user.is_empty() {
            return Ok(None);
        }
        if let Err(e) = chat.register_user(&self.user).await {
            if e.code == ErrorCode::BadRequest {
                tracing::debug!(conn = self.conn.id, user = %self.user, "no chat inbox: {e}");
                return Ok(None);
            }
            return Err(e);
        }
        let channel = chat_rules::inbox(&self.user);
        let subscriber = Subscriber::parked(Arc::clone(&self.conn));
        self.join(&channel, Arc::clone(&subscriber)).await?;
        let came_online = node.hub.subscriber_count(channel.as_str()) == 1;
        let budget = node.settings.limits.max_queue_bytes / 2;
        let backlog = match chat.backlog(&self.user, budget).await {
            Ok(backlog) => backlog,
            Err(e) => {
                self.channels.remove(channel.as_str());
                self.leave(channel.as_arc()).await;
                return Err(e);
            }
        };
        let info = backlog.info();
        self.queue_backlog(&channel, subscriber, backlog);
        chat.share_inbox_presence(&self.user, self.conn.id, true)
            .await;
        if came_online && let Err(e) = chat.announce_presence(&self.user, true).await {
            tracing::warn!(user = %self.user, error = %e, "group presence not announced");
        }
        Ok(Some(info))
    }

    /// Queues a slice of the inbox. The last slice releases the parked subscriber (live entries
    /// follow it); an earlier one goes out through a detached subscriber, never registered in the
    /// hub, so the real one stays parked.
    fn queue_backlog(
        &mut self,
        channel: &ChannelName,
        subscriber: Arc<Subscriber>,
        backlog: Backlog,
    ) {
        let last = backlog.last();
        let publications = backlog
            .entries
            .into_iter()
            .map(|(seq, data)| Publication {
                channel: channel.clone(),
                data,
                position: Some(Position {
                    epoch: backlog.top.epoch.clone(),
                    offset: seq,
                }),
            })
            .collect();
        if backlog.more {
            self.recoveries.push(Recovery {
                subscriber: Subscriber::parked(Arc::clone(&self.conn)),
                publications,
                last_offset: 0,
            });
            self.inbox_catch_up = Some(InboxCatchUp {
                subscriber,
                epoch: backlog.top.epoch,
                last,
            });
        } else {
            self.recoveries.push(Recovery {
                subscriber,
                publications,
                last_offset: backlog.top.offset,
            });
            self.inbox_catch_up = None;
        }
    }

    /// Sends the next slice of a backlog once the client acknowledged half of what it got.
    async fn continue_inbox(&mut self) -> Result<(), ReplyError> {
        let Some(catch_up) = self.inbox_catch_up.take() else {
            return Ok(());
        };
        let node = Arc::clone(&self.node);
        let chat = &node.chat;
        let cursor = chat.ack_cursor(&self.user).await?;
        if cursor.saturating_add(chat.config.window as u64 / 2) < catch_up.last {
            self.inbox_catch_up = Some(catch_up);
            return Ok(());
        }
        let budget = node.settings.limits.max_queue_bytes / 2;
        let backlog = chat
            .backlog_after(&self.user, &catch_up.epoch, catch_up.last, budget)
            .await?;
        let channel = chat_rules::inbox(&self.user);
        self.queue_backlog(&channel, catch_up.subscriber, backlog);
        Ok(())
    }

    async fn subscribe(
        &mut self,
        name: &str,
        since: Option<Position>,
        token: Option<String>,
    ) -> Result<Outcome, ReplyError> {
        let node = Arc::clone(&self.node);
        let (channel, options) = node.resolve_channel(name)?;
        self.check_access(options.subscribe, &channel, token.as_deref(), "subscribe")
            .await?;
        self.add_subscription(channel, options, since).await
    }

    /// Subscribes after access was granted (by policy, or by the token or app at connect).
    async fn add_subscription(
        &mut self,
        channel: ChannelName,
        options: &NamespaceOptions,
        since: Option<Position>,
    ) -> Result<Outcome, ReplyError> {
        if self.channels.contains(channel.as_str()) {
            return Err(ReplyError::new(
                ErrorCode::AlreadySubscribed,
                format!("already subscribed to '{channel}'"),
            ));
        }
        let max = self.node.settings.limits.max_channels_per_connection;
        if self.channels.len() >= max {
            return Err(ReplyError::new(
                ErrorCode::LimitExceeded,
                format!("a connection may subscribe to at most {max} channels"),
            ));
        }
        let history = options.has_history();
        let subscriber = if history {
            Subscriber::parked(Arc::clone(&self.conn))
        } else {
            Subscriber::live(Arc::clone(&self.conn))
        };
        self.join(&channel, Arc::clone(&subscriber)).await?;
        if !history {
            // Without history nothing can be recovered: say so when the client asked.
            let outcome = match since {
                None => Outcome::Done,
                Some(_) => Outcome::Subscribed(SubscribeInfo {
                    position: None,
                    recovered: Some(false),
                }),
            };
            return Ok(outcome);
        }
        match self.recover(&channel, since, subscriber).await {
            Ok((outcome, recovery)) => {
                self.recoveries.push(recovery);
                Ok(outcome)
            }
            Err(e) => {
                self.channels.remove(channel.as_str());
                self.leave(channel.as_arc()).await;
                Err(e)
            }
        }
    }

    async fn publish(
        &self,
        name: &str,
        data: Payload,
        token: Option<String>,
    ) -> Result<Executed, ReplyError> {
        let node = Arc::clone(&self.node);
        let (channel, options) = node.resolve_channel(name)?;
        if !options.client_publish {
            return Err(ReplyError::new(
                ErrorCode::PermissionDenied,
                format!(
                    "clients may not publish to '{channel}': its namespace does not set client_publish"
                ),
            ));
        }
        self.check_access(options.publish, &channel, token.as_deref(), "publish")
            .await?;
        Ok(match node.start_publish(channel, options, data).await? {
            Published::Now(position) => {
                Executed::Now(position.map_or(Outcome::Done, Outcome::Published))
            }
            Published::Later(durable) => {
                Executed::Later(Box::pin(
                    async move { durable.await.map(Outcome::Published) },
                ))
            }
        })
    }

    async fn connect(
        &mut self,
        client_name: Option<String>,
        token: Option<String>,
        data: Option<Payload>,
    ) -> Result<Outcome, ReplyError> {
        let identity = match self.authenticate(token, data).await {
            Ok(identity) => identity,
            Err((error, close)) => {
                tracing::debug!(conn = self.conn.id, error = %error, "connect refused");
                self.close_after = Some(close);
                return Err(error);
            }
        };
        self.client_name = client_name;
        self.user = identity.user;
        self.info = identity.info;
        self.conn.set_connected(&self.user);
        tracing::debug!(conn = self.conn.id, user = %self.user, name = ?self.client_name, "client connected");

        // Channels granted by the token or the app: subscribed without a policy check.
        let node = Arc::clone(&self.node);
        let mut subscribed = Vec::new();
        for name in identity.channels {
            let result = match node.resolve_channel(&name) {
                Ok((channel, options)) => self.add_subscription(channel, options, None).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(_) => subscribed.push(name),
                Err(e) => {
                    tracing::warn!(conn = self.conn.id, channel = %name, error = %e, "channel granted at connect not subscribed")
                }
            }
        }
        let inbox = match self.attach_inbox().await {
            Ok(inbox) => inbox,
            Err(e) => {
                tracing::warn!(conn = self.conn.id, user = %self.user, error = %e, "inbox not attached");
                self.close_after = Some(CloseCode::Shutdown);
                return Err(e);
            }
        };
        let settings = &self.node.settings;
        Ok(Outcome::Connected(ConnectInfo {
            client_id: self.conn.id.to_string(),
            user: self.user.clone(),
            channels: subscribed,
            version: env!("CARGO_PKG_VERSION"),
            ping_interval_secs: settings.ping_interval.as_secs(),
            max_frame_size: settings.limits.max_frame_size,
            inbox,
        }))
    }

    /// A token if there is one, else the app if it is configured, else anonymous if allowed.
    /// A refusal comes with the close code that follows the error reply.
    async fn authenticate(
        &self,
        token: Option<String>,
        data: Option<Payload>,
    ) -> Result<Identity, (ReplyError, CloseCode)> {
        let unauthorized = |m: String| {
            (
                ReplyError::new(ErrorCode::Unauthorized, m),
                CloseCode::Unauthorized,
            )
        };
        let auth = &self.node.auth;
        if let Some(token) = token {
            let Some(jwt) = &auth.jwt else {
                return Err(unauthorized(
                    "this server accepts no connection tokens".into(),
                ));
            };
            let claims = jwt
                .verify_connect(&token, unix_now())
                .map_err(|e| unauthorized(e.to_string()))?;
            return Ok(Identity {
                user: claims.user,
                channels: claims.channels,
                info: claims.info.as_ref().and_then(to_payload),
            });
        }
        if let Some(app) = auth.app.as_ref().filter(|a| a.has_connect()) {
            let client = self.conn.id.to_string();
            let raw = data.as_ref().and_then(raw_json);
            let request = AppConnectRequest {
                client: &client,
                protocol: "native",
                forwarded: &self.forwarded,
                data: raw,
            };
            return match app.connect(request).await {
                Ok(AppConnectDecision::Allow {
                    user,
                    channels,
                    info,
                }) => Ok(Identity {
                    user,
                    channels,
                    info: info.as_ref().and_then(to_payload),
                }),
                Ok(AppConnectDecision::Deny { reason }) => Err(unauthorized(format!(
                    "the app refused the connection: {reason}"
                ))),
                Err(e) => {
                    tracing::warn!(conn = self.conn.id, error = %e, "connect: the app gave no decision");
                    Err((
                        ReplyError::new(
                            ErrorCode::Internal,
                            "the app could not be asked; reconnect later",
                        ),
                        CloseCode::AppUnavailable,
                    ))
                }
            };
        }
        if auth.anonymous {
            return Ok(Identity {
                user: String::new(),
                channels: Vec::new(),
                info: None,
            });
        }
        Err(unauthorized(
            "anonymous connections are not allowed: connect with a token".into(),
        ))
    }

    /// Applies a namespace's access policy to this connection and `channel`.
    async fn check_access(
        &self,
        policy: AccessPolicy,
        channel: &ChannelName,
        token: Option<&str>,
        action: &str,
    ) -> Result<(), ReplyError> {
        let denied = |m: String| ReplyError::new(ErrorCode::PermissionDenied, m);
        match policy {
            AccessPolicy::Public => Ok(()),
            AccessPolicy::User => {
                if !self.user.is_empty() && channel.allowed_users().any(|u| u == self.user) {
                    Ok(())
                } else {
                    Err(denied(format!(
                        "'{channel}' is only for the users named after its '#'"
                    )))
                }
            }
            AccessPolicy::Token => {
                let token = token.ok_or_else(|| {
                    denied(format!(
                        "{action} to '{channel}' needs a token for that channel"
                    ))
                })?;
                let jwt = self
                    .node
                    .auth
                    .jwt
                    .as_ref()
                    .ok_or_else(|| denied("this server has no token key configured".into()))?;
                jwt.verify_subscribe(token, channel.as_str(), &self.user, unix_now())
                    .map(|_| ())
                    .map_err(|e| denied(format!("token refused: {e}")))
            }
            AccessPolicy::App => {
                let app = self
                    .node
                    .auth
                    .app
                    .as_ref()
                    .filter(|a| a.has_subscribe())
                    .ok_or_else(|| denied("auth.subscribe_url is not configured".into()))?;
                let client = self.conn.id.to_string();
                let request = AppSubscribeRequest {
                    client: &client,
                    user: &self.user,
                    channel: channel.as_str(),
                    forwarded: &self.forwarded,
                    data: None,
                };
                match app.subscribe(request).await {
                    Ok(AppSubscribeDecision::Allow { .. }) => Ok(()),
                    Ok(AppSubscribeDecision::Deny { reason }) => {
                        Err(denied(format!("the app refused: {reason}")))
                    }
                    Err(e) => {
                        tracing::warn!(conn = self.conn.id, error = %e, "{action}: the app gave no decision");
                        Err(ReplyError::new(
                            ErrorCode::Internal,
                            "the app could not be asked; retry later",
                        ))
                    }
                }
            }
        }
    }

    /// Refuses a new live view when the connection already holds its maximum.
    fn live_room(&self, adding: usize) -> Result<(), ReplyError> {
        let max = self.node.settings.limits.max_channels_per_connection;
        if self.live.len() + adding > max {
            return Err(ReplyError::new(
                ErrorCode::LimitExceeded,
                format!("a connection may hold at most {max} live views"),
            ));
        }
        Ok(())
    }

    /// Resolves a channel this connection is subscribed to: presence is for members only.
    fn subscribed(&self, name: &str) -> Result<(ChannelName, &NamespaceOptions), ReplyError> {
        let (channel, options) = self.node.resolve_channel(name)?;
        if !self.channels.contains(channel.as_str()) {
            return Err(ReplyError::new(
                ErrorCode::NotSubscribed,
                format!("subscribe to '{channel}' to see its presence"),
            ));
        }
        Ok((channel, options))
    }

    /// Adds this connection to the channel in the hub (and the broker, for the first one).
    async fn join(
        &mut self,
        channel: &ChannelName,
        subscriber: Arc<Subscriber>,
    ) -> Result<(), ReplyError> {
        let key = Arc::clone(channel.as_arc());
        let hub = &self.node.hub;
        hub.subscribe(&key, subscriber);
        self.channels.insert(Arc::clone(&key));
        if hub.subscriber_count(&key) == 1 {
            // The broker hears only of a channel's first local subscriber, so it keeps one
            // upstream subscription per channel per node however many clients there are.
            if let Err(e) = self.node.broker.subscribe(Arc::clone(&key)).await {
                hub.unsubscribe(&key, self.conn.id);
                self.channels.remove(&key);
                return Err(ReplyError::new(ErrorCode::Internal, e.to_string()));
            }
        }
        if let Ok((_, options)) = self.node.resolve_channel(&key) {
            self.node
                .presence_join(
                    &key,
                    options,
                    ClientInfo {
                        user: self.user.clone(),
                        client: self.conn.id,
                        info: self.info.clone(),
                    },
                )
                .await;
        }
        Ok(())
    }

    /// Reads what a new history subscriber must get before live publications: nothing but the
    /// current position, or (with `since`) every publication after it, or `recovered: false`.
    async fn recover(
        &self,
        channel: &ChannelName,
        since: Option<Position>,
        subscriber: Arc<Subscriber>,
    ) -> Result<(Outcome, Recovery), ReplyError> {
        let asked = since.is_some();
        let limit = if asked {
            self.node.settings.limits.max_recovery_publications
        } else {
            0
        };
        let read = self.node.history(channel, since, limit).await?;
        let recovered = asked.then_some(read.complete);
        let publications = if read.complete {
            read.publications
                .into_iter()
                .map(|(offset, data)| Publication {
                    channel: channel.clone(),
                    data,
                    position: Some(Position {
                        epoch: read.top.epoch.clone(),
                        offset,
                    }),
                })
                .collect()
        } else {
            Vec::new()
        };
        let last_offset = read.top.offset;
        let outcome = Outcome::Subscribed(SubscribeInfo {
            position: Some(read.top),
            recovered,
        });
        let recovery = Recovery {
            subscriber,
            publications,
            last_offset,
        };
        Ok((outcome, recovery))
    }

    async fn unsubscribe(&mut self, name: &str) -> Result<Outcome, ReplyError> {
        let (channel, _) = self.node.resolve_channel(name)?;
        if !self.channels.remove(channel.as_str()) {
            return Err(ReplyError::new(
                ErrorCode::NotSubscribed,
                format!("not subscribed to '{channel}'"),
            ));
        }
        self.leave(channel.as_arc()).await;
        Ok(Outcome::Done)
    }

    async fn leave(&self, channel: &Arc<str>) {
        let hub = &self.node.hub;
        hub.unsubscribe(channel, self.conn.id);
        if let Ok((_, options)) = self.node.resolve_channel(channel) {
            self.node
                .presence_leave(channel, options, self.conn.id)
                .await;
        }
        if hub.subscriber_count(channel) == 0
            && let Err(e) = self.node.broker.unsubscribe(Arc::clone(channel)).await
        {
            tracing::warn!(channel = %channel, error = %e, "broker unsubscribe failed");
        }
    }

    /// Drops every subscription and live view. Called once when the connection ends.
    pub async fn end(mut self) {
        for id in std::mem::take(&mut self.live) {
            self.node.live.cancel(id);
        }
        for channel in std::mem::take(&mut self.channels) {
            self.leave(&channel).await;
            if !chat_rules::is_inbox(&channel) {
                continue;
            }
            let chat = &self.node.chat;
            chat.share_inbox_presence(&self.user, self.conn.id, false)
                .await;
            if !chat.is_online(&self.user)
                && let Err(e) = chat.announce_presence(&self.user, false).await
            {
                tracing::warn!(user = %self.user, error = %e, "group presence not announced");
            }
        }
    }
}

fn members_json(members: &[(String, bool)]) -> String {
    let list: Vec<String> = members
        .iter()
        .map(|(user, online)| format!("{{\"user\":{},\"online\":{online}}}", json_string(user)))
        .collect();
    format!("{{\"members\":[{}]}}", list.join(","))
}

fn unread_json(counts: &[(Peer, u64)]) -> String {
    let list: Vec<String> = counts
        .iter()
        .map(|(peer, unread)| {
            let (field, name) = match peer {
                Peer::User(u) => ("user", u),
                Peer::Group(g) => ("group", g),
            };
            format!("{{\"{field}\":{},\"unread\":{unread}}}", json_string(name))
        })
        .collect();
    format!("{{\"conversations\":[{}]}}", list.join(","))
}

fn no_presence(channel: &ChannelName) -> ReplyError {
    ReplyError::new(
        ErrorCode::PermissionDenied,
        format!("'{channel}' keeps no presence: its namespace does not set presence"),
    )
}

fn to_payload(value: &serde_json::Value) -> Option<Payload> {
    Payload::from_json_text(value.to_string()).ok()
}

fn raw_json(payload: &Payload) -> Option<&serde_json::value::RawValue> {
    serde_json::from_str(payload.as_str()).ok()
}
