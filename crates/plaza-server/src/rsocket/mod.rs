//! RSocket chat compatibility (`[rsocket]`): the server side of the rsocket-py chat tutorial
//! over Plaza's chat. The codec is [`plaza_protocol::rsocket`]; this module owns the listener
//! and one [`session`] per connection.
//!
//! Transports: TCP with the 24-bit length prefix (`tcp_listen`) and WebSocket binary messages,
//! one frame each (`ws_path` on the public listener); both off unless configured. An
//! RSocket chat channel is the chat group `<channel_namespace>:<name>`; that namespace must set
//! `client_join = true` (see README).

pub mod config;
mod files;
mod incoming;
mod session;
mod stats;
mod ws;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;

use axum::Router;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::node::Node;
pub use config::RsocketConfig;

/// This node's RSocket side, the state of its WebSocket route.
pub struct Rsocket {
    node: Arc<Node>,
    config: Arc<RsocketConfig>,
    /// The node's statistics timer (`statistics` request-channels).
    stats: Arc<stats::Statistics>,
    /// Logged-in RSocket sessions on this node (`user_count`).
    logged_in: AtomicUsize,
    /// Serializes `file.upload`, so `max_files` holds.
    files_lock: tokio::sync::Mutex<()>,
}

impl Rsocket {
    /// The WebSocket route, when `ws_path` is set.
    pub fn router<S: Clone + Send + Sync + 'static>(self: &Arc<Self>) -> Option<Router<S>> {
        let path = self.config.ws_path.as_ref()?;
        Some(
            Router::new()
                .route(path, get(ws::upgrade))
                .with_state(Arc::clone(self)),
        )
    }
}

/// Starts the `[rsocket]` TCP listener (when configured). Needs a runtime.
pub async fn start(config: &RsocketConfig, node: Arc<Node>) -> anyhow::Result<Arc<Rsocket>> {
    if !node.chat.config.enabled {
        anyhow::bail!("[rsocket] needs chat: set chat.enabled = true");
    }
    let rs = Arc::new(Rsocket {
        node: Arc::clone(&node),
        config: Arc::new(config.clone()),
        stats: Arc::new(stats::Statistics::default()),
        logged_in: AtomicUsize::new(0),
        files_lock: tokio::sync::Mutex::new(()),
    });
    let weak = Arc::downgrade(&rs);
    tokio::spawn(Arc::clone(&rs.stats).run(move || {
        let rs = weak.upgrade();
        async move {
            let Some(rs) = rs else {
                return stats::Counts {
                    users: 0,
                    channels: 0,
                };
            };
            let prefix = format!("{}:", rs.config.channel_namespace);
            let channels = match rs.node.chat.all_groups(session::MAX_CHANNELS).await {
                Ok(groups) => groups.iter().filter(|g| g.starts_with(&prefix)).count(),
                Err(e) => {
                    tracing::warn!(error = %e, "rsocket statistics: groups not read");
                    0
                }
            };
            stats::Counts {
                users: rs.logged_in.load(Relaxed),
                channels,
            }
        }
    }));
    let Some(addr) = config.tcp_listen else {
        return Ok(rs);
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for rsocket: {e}"))?;
    tracing::info!(addr = %listener.local_addr()?, "rsocket TCP listener bound");
    let weak = Arc::downgrade(&rs);
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let Some(rs) = weak.upgrade() else { return };
                    tokio::spawn(async move {
                        tracing::debug!(%peer, "rsocket connection");
                        session::run_tcp(stream, rs).await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "rsocket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(rs)
}
