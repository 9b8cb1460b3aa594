//! RSocket chat compatibility (`[rsocket]`): the server side of the rsocket-py chat tutorial
//! over Plaza's chat. The codec is [`plaza_protocol::rsocket`]; this module owns the listener
//! and one [`session`] per connection.
//!
//! Transport: TCP with the 24-bit length prefix (`tcp_listen`, off unless configured). An
//! RSocket chat channel is the chat group `<channel_namespace>:<name>`; that namespace must set
//! `client_join = true` (see README).

pub mod config;
mod session;

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::node::Node;
pub use config::RsocketConfig;

/// Starts the `[rsocket]` listeners. Needs a runtime.
pub async fn start(config: &RsocketConfig, node: Arc<Node>) -> anyhow::Result<()> {
    if !node.chat.config.enabled {
        anyhow::bail!("[rsocket] needs chat: set chat.enabled = true");
    }
    let Some(addr) = config.tcp_listen else {
        return Ok(());
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for rsocket: {e}"))?;
    tracing::info!(addr = %listener.local_addr()?, "rsocket TCP listener bound");
    let config = Arc::new(config.clone());
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let node = Arc::clone(&node);
                    let config = Arc::clone(&config);
                    tokio::spawn(async move {
                        tracing::debug!(%peer, "rsocket connection");
                        session::run_tcp(stream, node, config).await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "rsocket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}
