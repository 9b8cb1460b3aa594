//! Limits that protect the server from one client. Every one has a default that is safe for a
//! public deployment and can be changed in the configuration.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest WebSocket message a client may send, in bytes.
    pub max_frame_size: usize,
    /// Channels one connection may be subscribed to at once.
    pub max_channels_per_connection: usize,
    /// Bytes waiting in one connection's outgoing queue before it is closed as a slow consumer.
    pub max_queue_bytes: usize,
    /// Longest channel name, in bytes.
    pub max_channel_length: usize,
    /// Most channels in one backend broadcast.
    pub max_broadcast_channels: usize,
    /// Largest backend API request body, in bytes.
    pub max_api_body_size: usize,
    /// Most publications one recovery may replay; a larger gap answers `recovered: false`.
    pub max_recovery_publications: usize,
    /// Most publications one backend history request may return.
    pub max_history_limit: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_size: 64 * 1024,
            max_channels_per_connection: 128,
            max_queue_bytes: 1024 * 1024,
            max_channel_length: 255,
            max_broadcast_channels: 1000,
            max_api_body_size: 1024 * 1024,
            max_recovery_publications: 300,
            max_history_limit: 1000,
        }
    }
}

impl Limits {
    /// Refuses limits that cannot work (zero where a zero would refuse everything).
    pub fn validate(&self) -> Result<(), String> {
        let checks = [
            ("max_frame_size", self.max_frame_size, 16),
            (
                "max_channels_per_connection",
                self.max_channels_per_connection,
                1,
            ),
            ("max_queue_bytes", self.max_queue_bytes, 1024),
            ("max_channel_length", self.max_channel_length, 1),
            ("max_broadcast_channels", self.max_broadcast_channels, 1),
            ("max_api_body_size", self.max_api_body_size, 64),
            ("max_history_limit", self.max_history_limit, 1),
        ];
        for (name, value, min) in checks {
            if value < min {
                return Err(format!(
                    "limits.{name} is {value}, it must be at least {min}"
                ));
            }
        }
        Ok(())
    }
}
