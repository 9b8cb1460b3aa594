//! `chat`: channels joined by identities, with presence. Members are hub subscribers of
//! `ChannelName::internal("snorky-chat", <channel's canonical JSON>)`; who is present follows the
//! core presence rule (a user joins with its first connection, leaves with its last).

use axum::extract::ws::Utf8Bytes;
use plaza_core::{ChannelName, ClientInfo, PresenceEvent};
use plaza_protocol::snorky::{self as proto, Params};

use super::{Client, Reply, Snorky, bind, now_micros};

impl Snorky {
    pub(super) async fn chat(
        &self,
        client: &mut Client,
        command: Option<&str>,
        params: Option<Params>,
    ) -> Reply {
        match command {
            Some("join") => {
                let [channel] = bind(params, ["channel"])?;
                let identity = client.identity.clone().ok_or(proto::NOT_AUTHENTICATED)?;
                let key = proto::canonical_key(&channel);
                if client.chats.contains_key(&key) {
                    return Err(proto::ALREADY_JOINED);
                }
                if client.chats.len() >= self.node.settings.limits.max_channels_per_connection {
                    return Err(proto::TOO_MANY_SUBSCRIPTIONS);
                }
                let name = ChannelName::internal("snorky-chat", &key);
                self.subscribe_frames(&client.conn, &name).await;
                let id = client.conn.id;
                let (event, mut members) = {
                    let mut presence = self.chats.entry(key.clone()).or_default();
                    let event = presence.join(ClientInfo {
                        user: identity.clone(),
                        client: id,
                        info: None,
                    });
                    let members: Vec<String> =
                        presence.clients().into_iter().map(|c| c.user).collect();
                    (event, members)
                };
                members.sort_unstable();
                members.dedup();
                if event.is_some() {
                    let frame = proto::chat_presence(
                        &self.config.services.chat,
                        &identity,
                        channel.get(),
                        true,
                        &proto::timestamp(now_micros()),
                    );
                    self.node.hub.push_event(name.as_str(), id, frame);
                }
                client.chats.insert(key, (name, channel.get().to_owned()));
                Ok(format!(
                    "{{\"members\": {}}}",
                    proto::string_list(members.iter().map(String::as_str))
                ))
            }
            Some("leave") => {
                let [channel] = bind(params, ["channel"])?;
                let key = proto::canonical_key(&channel);
                if !client.chats.contains_key(&key) {
                    return Err(proto::NOT_JOINED);
                }
                self.leave_chat(client, &key).await;
                Ok("null".into())
            }
            Some("send") => {
                let [channel, body] = bind(params, ["channel", "body"])?;
                let key = proto::canonical_key(&channel);
                let (name, _) = client.chats.get(&key).ok_or(proto::NOT_JOINED)?;
                let from = client.identity.as_deref().unwrap_or("");
                let frame = proto::chat_message(
                    &self.config.services.chat,
                    from,
                    channel.get(),
                    body.get(),
                    &proto::timestamp(now_micros()),
                );
                self.publish_frame(name.clone(), frame).await?;
                Ok("null".into())
            }
            Some("read") => {
                let [channel] = bind(params, ["channel"])?;
                let key = proto::canonical_key(&channel);
                if !client.chats.contains_key(&key) {
                    return Err(proto::NOT_JOINED);
                }
                let me = client.conn.id;
                let identity = client.identity.as_deref().unwrap_or("");
                let others: Vec<u64> = self
                    .chats
                    .get(&key)
                    .map(|p| {
                        p.clients()
                            .into_iter()
                            .filter(|c| c.user == identity && c.client != me)
                            .map(|c| c.client)
                            .collect()
                    })
                    .unwrap_or_default();
                let frame = Utf8Bytes::from(proto::chat_read(
                    &self.config.services.chat,
                    channel.get(),
                    &proto::timestamp(now_micros()),
                ));
                for id in others {
                    self.push_to(id, &frame);
                }
                Ok("null".into())
            }
            _ => Err(proto::UNKNOWN_COMMAND),
        }
    }

    /// Leaves a chat channel; the remaining members get `left` when this was the identity's
    /// last connection there.
    pub(super) async fn leave_chat(&self, client: &mut Client, key: &str) {
        let Some((name, channel)) = client.chats.remove(key) else {
            return;
        };
        let id = client.conn.id;
        self.unsubscribe_frames(id, &name).await;
        let event = self.chats.get_mut(key).and_then(|mut p| p.leave(id));
        self.chats.remove_if(key, |_, p| p.is_empty());
        if let Some(PresenceEvent::Leave(info)) = event {
            let frame = proto::chat_presence(
                &self.config.services.chat,
                &info.user,
                &channel,
                false,
                &proto::timestamp(now_micros()),
            );
            self.node.hub.push_event(name.as_str(), id, frame);
        }
    }
}
