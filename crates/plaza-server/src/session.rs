//! A client session: the protocol-independent state of one connection (connected or not, its
//! subscriptions) and the execution of its commands against the node.

use std::collections::HashSet;
use std::sync::Arc;

use plaza_core::{
    ChannelName, ClientInfo, Command, ConnectInfo, ErrorCode, NamespaceOptions, Outcome, Payload,
    Position, Publication, ReplyError, SubscribeInfo,
};

use crate::conn::ConnHandle;
use crate::hub::Subscriber;
use crate::node::Node;

/// What a command produced: the outcome to reply with and, for a subscribe to a channel with
/// history, what must be queued with the reply.
pub struct Handled {
    pub outcome: Result<Outcome, ReplyError>,
    pub recovery: Option<Recovery>,
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
}

impl Session {
    pub fn new(node: Arc<Node>, conn: Arc<ConnHandle>) -> Self {
        Self {
            node,
            conn,
            channels: HashSet::new(),
            client_name: None,
            user: String::new(),
            info: None,
        }
    }

    pub fn client_name(&self) -> Option<&str> {
        self.client_name.as_deref()
    }

    /// Executes one command. Errors are counted in the metrics.
    pub async fn handle(&mut self, command: Command) -> Handled {
        let mut recovery = None;
        let outcome = match command {
            Command::Subscribe { channel, since } if self.conn.is_connected() => {
                match self.subscribe(&channel, since).await {
                    Ok((outcome, r)) => {
                        recovery = r;
                        Ok(outcome)
                    }
                    Err(e) => Err(e),
                }
            }
            other => self.execute(other).await,
        };
        Handled {
            outcome: outcome.map_err(|e| self.node.count(e)),
            recovery,
        }
    }

    async fn execute(&mut self, command: Command) -> Result<Outcome, ReplyError> {
        let connected = self.conn.is_connected();
        match command {
            Command::Ping => return Ok(Outcome::Done),
            Command::Connect { client_name } => {
                if connected {
                    return Err(ReplyError::new(
                        ErrorCode::AlreadyConnected,
                        "connect was already sent on this connection",
                    ));
                }
                self.client_name = client_name;
                self.conn.set_connected();
                tracing::debug!(conn = self.conn.id, name = ?self.client_name, "client connected");
                let settings = &self.node.settings;
                return Ok(Outcome::Connected(ConnectInfo {
                    client_id: self.conn.id.to_string(),
                    version: env!("CARGO_PKG_VERSION"),
                    ping_interval_secs: settings.ping_interval.as_secs(),
                    max_frame_size: settings.limits.max_frame_size,
                }));
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
            Command::Subscribe { channel, since } => self
                .subscribe(&channel, since)
                .await
                .map(|(outcome, _)| outcome),
            Command::Unsubscribe { channel } => self.unsubscribe(&channel).await,
            Command::Publish { channel, data } => {
                let (channel, options) = self.node.resolve_channel(&channel)?;
                if !options.client_publish {
                    return Err(ReplyError::new(
                        ErrorCode::PermissionDenied,
                        format!(
                            "clients may not publish to '{channel}': its namespace does not set client_publish"
                        ),
                    ));
                }
                let position = self.node.publish(channel, options, data, None).await?;
                Ok(position.map_or(Outcome::Done, Outcome::Published))
            }
            Command::Presence { channel } => {
                let (channel, options) = self.subscribed(&channel)?;
                self.node
                    .presence(options, channel.as_str())
                    .map(Outcome::Presence)
                    .ok_or_else(|| no_presence(&channel))
            }
            Command::PresenceStats { channel } => {
                let (channel, options) = self.subscribed(&channel)?;
                self.node
                    .presence_stats(options, channel.as_str())
                    .map(|(clients, users)| Outcome::PresenceStats { clients, users })
                    .ok_or_else(|| no_presence(&channel))
            }
            Command::Ping | Command::Connect { .. } => Ok(Outcome::Done),
        }
    }

    async fn subscribe(
        &mut self,
        name: &str,
        since: Option<Position>,
    ) -> Result<(Outcome, Option<Recovery>), ReplyError> {
        let node = Arc::clone(&self.node);
        let (channel, options) = node.resolve_channel(name)?;
        if self.channels.contains(channel.as_str()) {
            return Err(ReplyError::new(
                ErrorCode::AlreadySubscribed,
                format!("already subscribed to '{channel}'"),
            ));
        }
        let max = node.settings.limits.max_channels_per_connection;
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
            return Ok((outcome, None));
        }
        match self.recover(&channel, since, subscriber).await {
            Ok(result) => Ok(result),
            Err(e) => {
                self.channels.remove(channel.as_str());
                self.leave(channel.as_arc()).await;
                Err(e)
            }
        }
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
            self.node.presence_join(
                &key,
                options,
                ClientInfo {
                    user: self.user.clone(),
                    client: self.conn.id,
                    info: self.info.clone(),
                },
            );
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
    ) -> Result<(Outcome, Option<Recovery>), ReplyError> {
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
        Ok((outcome, Some(recovery)))
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
            self.node.presence_leave(channel, options, self.conn.id);
        }
        if hub.subscriber_count(channel) == 0
            && let Err(e) = self.node.broker.unsubscribe(Arc::clone(channel)).await
        {
            tracing::warn!(channel = %channel, error = %e, "broker unsubscribe failed");
        }
    }

    /// Drops every subscription. Called once when the connection ends.
    pub async fn end(mut self) {
        for channel in std::mem::take(&mut self.channels) {
            self.leave(&channel).await;
        }
    }
}

fn no_presence(channel: &ChannelName) -> ReplyError {
    ReplyError::new(
        ErrorCode::PermissionDenied,
        format!("'{channel}' keeps no presence: its namespace does not set presence"),
    )
}
