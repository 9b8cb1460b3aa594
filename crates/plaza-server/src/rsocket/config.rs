//! `[rsocket]` in the configuration.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RsocketConfig {
    /// TCP listener (24-bit length-prefixed frames); none when absent.
    pub tcp_listen: Option<SocketAddr>,
    /// WebSocket path on the public listener (one binary message per frame), e.g. `/chat`;
    /// none when absent.
    pub ws_path: Option<String>,
    /// `login` takes any username, as the tutorial does: the client is trusted to say who it
    /// is (demos and closed networks only). Otherwise the login data must be a connection token.
    pub open_login: bool,
    /// Namespace of the chat groups that RSocket channels map to (`<namespace>:<channel>`).
    /// It must set `client_join = true`.
    pub channel_namespace: String,
}

impl Default for RsocketConfig {
    fn default() -> Self {
        Self {
            tcp_listen: None,
            ws_path: None,
            open_login: false,
            channel_namespace: "rsocket".into(),
        }
    }
}

impl RsocketConfig {
    pub fn validate(&self) -> Result<(), String> {
        let ns = &self.channel_namespace;
        if ns.is_empty() || ns.contains(':') {
            return Err(format!(
                "rsocket.channel_namespace '{ns}' must be a non-empty name without ':'"
            ));
        }
        if let Some(path) = &self.ws_path
            && !path.starts_with('/')
        {
            return Err(format!("rsocket.ws_path '{path}' must start with '/'"));
        }
        Ok(())
    }
}
