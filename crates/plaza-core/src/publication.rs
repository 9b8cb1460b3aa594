//! A message published to a channel.

use crate::channel::ChannelName;
use crate::payload::Payload;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub channel: ChannelName,
    pub data: Payload,
}
