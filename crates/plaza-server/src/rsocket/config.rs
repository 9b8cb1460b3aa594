//! `[rsocket]` in the configuration.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The largest `max_file_size`: a stored file is one key-value value, read whole.
pub const MAX_FILE_SIZE_LIMIT: usize = 16 * 1024 * 1024;

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
    /// Largest file `file.upload` accepts, in bytes (at most 16 MiB).
    pub max_file_size: usize,
    /// Most files kept (`file.upload` of a new name is refused beyond it; overwriting is not).
    pub max_files: usize,
    /// Longest time, in seconds, a connection may stay silent (no KEEPALIVE or other frame)
    /// before it is closed with a connection ERROR: the SETUP's max lifetime, at most this.
    /// Also how long a new connection has to send its SETUP.
    pub max_lifetime_secs: u64,
}

impl Default for RsocketConfig {
    fn default() -> Self {
        Self {
            tcp_listen: None,
            ws_path: None,
            open_login: false,
            channel_namespace: "rsocket".into(),
            max_file_size: 1024 * 1024,
            max_files: 1000,
            max_lifetime_secs: 600,
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
        if self.max_file_size == 0 || self.max_file_size > MAX_FILE_SIZE_LIMIT {
            return Err(format!(
                "rsocket.max_file_size {} must be 1 to {MAX_FILE_SIZE_LIMIT} bytes",
                self.max_file_size
            ));
        }
        if self.max_files == 0 || self.max_files > 100_000 {
            return Err(format!(
                "rsocket.max_files {} must be 1 to 100000",
                self.max_files
            ));
        }
        if self.max_lifetime_secs == 0 || self.max_lifetime_secs > 86_400 {
            return Err(format!(
                "rsocket.max_lifetime_secs {} must be 1 to 86400",
                self.max_lifetime_secs
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_limits_are_checked() {
        let c = RsocketConfig::default();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.max_file_size, 1024 * 1024);
        for bad in [
            RsocketConfig {
                max_file_size: 0,
                ..RsocketConfig::default()
            },
            RsocketConfig {
                max_file_size: MAX_FILE_SIZE_LIMIT + 1,
                ..RsocketConfig::default()
            },
            RsocketConfig {
                max_files: 0,
                ..RsocketConfig::default()
            },
            RsocketConfig {
                max_lifetime_secs: 0,
                ..RsocketConfig::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
