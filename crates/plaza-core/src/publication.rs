//! A message published to a channel.

use crate::channel::ChannelName;
use crate::command::Position;
use crate::payload::Payload;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub channel: ChannelName,
    pub data: Payload,
    /// Where it sits in the channel's history; `None` for a channel without history.
    pub position: Option<Position>,
}
