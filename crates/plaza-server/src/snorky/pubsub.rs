//! `pubsub` and `pubsub_backend`: hub channels carrying whole Snorky frames.

use plaza_core::ChannelName;
use plaza_protocol::snorky::{self as proto, Params};
use serde_json::value::RawValue;

use super::{Client, Reply, Snorky, bind};

/// Where a Snorky channel (any JSON value) lives in the hub.
fn hub_channel(key: &str) -> ChannelName {
    ChannelName::internal("snorky", key)
}

impl Snorky {
    pub(super) async fn pubsub(
        &self,
        client: &mut Client,
        command: Option<&str>,
        params: Option<Params>,
    ) -> Reply {
        match command {
            Some("subscribe") => {
                let [channel] = bind(params, ["channel"])?;
                let key = proto::canonical_key(&channel);
                if client.channels.contains_key(&key) {
                    return Err(proto::ALREADY_SUBSCRIBED);
                }
                if client.channels.len() >= self.node.settings.limits.max_channels_per_connection {
                    return Err(proto::TOO_MANY_SUBSCRIPTIONS);
                }
                let name = hub_channel(&key);
                self.subscribe_frames(&client.conn, &name).await;
                client.channels.insert(key, name);
                Ok("null".into())
            }
            Some("unsubscribe") => {
                let [channel] = bind(params, ["channel"])?;
                let key = proto::canonical_key(&channel);
                let name = client.channels.remove(&key).ok_or(proto::NOT_SUBSCRIBED)?;
                self.unsubscribe_frames(client.conn.id, &name).await;
                Ok("null".into())
            }
            Some("publish") => {
                let [channel, message] = bind(params, ["channel", "message"])?;
                if !self.config.client_publish {
                    return Err(proto::NOT_AUTHORIZED);
                }
                self.publish(&channel, &message).await
            }
            _ => Err(proto::UNKNOWN_COMMAND),
        }
    }

    /// `pubsub_backend`: `publish{channel, message}` without any permission check.
    pub(super) async fn pubsub_backend(
        &self,
        command: Option<&str>,
        params: Option<Params>,
    ) -> Reply {
        match command {
            Some("publish") => {
                let [channel, message] = bind(params, ["channel", "message"])?;
                self.publish(&channel, &message).await
            }
            _ => Err(proto::UNKNOWN_COMMAND),
        }
    }

    /// Every subscriber gets the frame, the publisher included, before the publisher's answer.
    async fn publish(&self, channel: &RawValue, message: &RawValue) -> Reply {
        let key = proto::canonical_key(channel);
        let frame =
            proto::pubsub_message(&self.config.services.pubsub, channel.get(), message.get());
        self.publish_frame(hub_channel(&key), frame).await?;
        Ok("null".into())
    }
}
