//! A client session: the protocol-independent state of one connection (connected or not, its
//! subscriptions) and the execution of its commands against the node.

use std::collections::HashSet;
use std::sync::Arc;

use plaza_core::{Command, ConnectInfo, ErrorCode, Outcome, ReplyError};

use crate::conn::ConnHandle;
use crate::node::Node;

pub struct Session {
    node: Arc<Node>,
    conn: Arc<ConnHandle>,
    channels: HashSet<Arc<str>>,
    client_name: Option<String>,
}

impl Session {
    pub fn new(node: Arc<Node>, conn: Arc<ConnHandle>) -> Self {
        Self {
            node,
            conn,
            channels: HashSet::new(),
            client_name: None,
        }
    }

    pub fn client_name(&self) -> Option<&str> {
        self.client_name.as_deref()
    }

    /// Executes one command. Errors are counted in the metrics.
    pub async fn handle(&mut self, command: Command) -> Result<Outcome, ReplyError> {
        self.execute(command).await.map_err(|e| self.node.count(e))
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
            Command::Subscribe { channel } => self.subscribe(&channel).await,
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
                self.node.publish(channel, data).await?;
                Ok(Outcome::Done)
            }
            Command::Ping | Command::Connect { .. } => Ok(Outcome::Done),
        }
    }

    async fn subscribe(&mut self, name: &str) -> Result<Outcome, ReplyError> {
        let (channel, _options) = self.node.resolve_channel(name)?;
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
        let key = Arc::clone(channel.as_arc());
        let hub = &self.node.hub;
        hub.subscribe(&key, &self.conn);
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
        Ok(Outcome::Done)
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
