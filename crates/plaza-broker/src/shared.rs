//! What the Redis and NATS brokers share: node numbering, time stamps, presence entries, and
//! the messages relayed on a channel's pub/sub subject.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use plaza_core::{ChannelName, ClientInfo, ConnId, Payload, Publication};
use serde_json::{Value as Json, json};

use crate::{BrokerError, PublicationSink};

/// A publication without history, as relayed between nodes: `n <data>`.
pub(crate) fn plain_message(data: &Payload) -> String {
    format!("n {}", data.as_str())
}

/// An ephemeral frame for every subscriber but `except`: `e <except> <frame>`.
pub(crate) fn event_message(except: ConnId, frame: &str) -> String {
    format!("e {except} {frame}")
}

/// Hands a relayed message ([`plain_message`], [`event_message`]) of `channel` to the node.
/// `engine` names the sender in the warning about a malformed one.
pub(crate) fn relay(
    sink: &dyn PublicationSink,
    channel: &ChannelName,
    message: &[u8],
    engine: &str,
) {
    let Ok(message) = std::str::from_utf8(message) else {
        tracing::warn!(channel = %channel, "non-UTF-8 message from {engine} ignored");
        return;
    };
    if let Some(data) = message.strip_prefix("n ") {
        match Payload::from_json_text(data.to_owned()) {
            Ok(data) => sink.deliver(&Publication {
                channel: channel.clone(),
                data,
                position: None,
            }),
            Err(_) => {
                tracing::warn!(channel = %channel, "non-JSON publication from {engine} ignored")
            }
        }
        return;
    }
    let event = message
        .strip_prefix("e ")
        .and_then(|rest| rest.split_once(' '))
        .and_then(|(except, frame)| Some((except.parse::<ConnId>().ok()?, frame)));
    match event {
        Some((except, frame)) => sink.event(channel.as_str(), except, frame),
        None => tracing::warn!(channel = %channel, "malformed message from {engine} ignored"),
    }
}

/// Connection ids of one node are `base + n`, with `base = node number << 40`: 2^40 connections
/// a node, and ids stay below 2^53 so JSON clients read them exactly.
const CONN_ID_BITS: u32 = 40;
const NODE_NUMBERS: u64 = 1 << (53 - CONN_ID_BITS);

/// Where the connection ids of the node numbered `number` (by the shared engine) start.
pub(crate) fn conn_id_base(number: u64) -> u64 {
    (number % NODE_NUMBERS) << CONN_ID_BITS
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

/// A presence entry as stored in the shared engine.
pub(crate) fn client_json(client: &ClientInfo) -> String {
    let info: Json = client
        .info
        .as_ref()
        .and_then(|p| serde_json::from_str(p.as_str()).ok())
        .unwrap_or(Json::Null);
    json!({"user": client.user, "client": client.client, "info": info}).to_string()
}

/// The presence entries of `channel` read back from the engine; one of another shape is an error.
pub(crate) fn clients_from_json(
    channel: &str,
    values: &[String],
) -> Result<Vec<ClientInfo>, BrokerError> {
    values
        .iter()
        .map(|v| client_from_json(v))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| BrokerError::Corrupt(format!("a presence entry of '{channel}'")))
}

fn client_from_json(text: &str) -> Option<ClientInfo> {
    let value: Json = serde_json::from_str(text).ok()?;
    let info = match value.get("info") {
        None | Some(Json::Null) => None,
        Some(info) => Payload::from_json_text(info.to_string()).ok(),
    };
    Some(ClientInfo {
        user: value.get("user")?.as_str()?.to_owned(),
        client: value.get("client")?.as_u64()?,
        info,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Seen(Mutex<Vec<String>>);

    impl PublicationSink for Seen {
        fn deliver(&self, p: &Publication) {
            let line = format!("deliver {} {}", p.channel.as_str(), p.data.as_str());
            self.0.lock().unwrap().push(line);
        }
        fn event(&self, channel: &str, except: ConnId, frame: &str) {
            let line = format!("event {channel} {except} {frame}");
            self.0.lock().unwrap().push(line);
        }
        fn interested(&self, _: &str) -> bool {
            true
        }
        fn gap(&self, _: &str, _: Option<&plaza_core::Position>, _: bool) {}
    }

    #[test]
    fn relayed_messages_round_trip_and_junk_is_dropped() {
        let sink = Seen::default();
        let channel = ChannelName::from_stored("news");
        let data = Payload::from_json_text(r#"{"a":"b c"}"#).unwrap();
        relay(&sink, &channel, plain_message(&data).as_bytes(), "test");
        relay(
            &sink,
            &channel,
            event_message(42, r#"{"x":1}"#).as_bytes(),
            "test",
        );
        for junk in ["", "n ", "n {", "e 42", "e x {}", "h 1 2 3", "zz"] {
            relay(&sink, &channel, junk.as_bytes(), "test");
        }
        relay(&sink, &channel, &[b'n', b' ', 0xff], "test");
        assert_eq!(
            *sink.0.lock().unwrap(),
            vec![r#"deliver news {"a":"b c"}"#, r#"event news 42 {"x":1}"#]
        );
    }

    #[test]
    fn client_json_round_trips() {
        let client = ClientInfo {
            user: "ann".into(),
            client: conn_id_base(3) + 7,
            info: Some(Payload::from_json_text(r#"{"name":"Ann"}"#).unwrap()),
        };
        assert_eq!(client_from_json(&client_json(&client)), Some(client));
        let anonymous = ClientInfo {
            user: String::new(),
            client: 1,
            info: None,
        };
        assert_eq!(client_from_json(&client_json(&anonymous)), Some(anonymous));
        assert_eq!(client_from_json("{}"), None);
    }

    #[test]
    fn connection_ids_stay_exact_in_json() {
        let largest = conn_id_base(NODE_NUMBERS - 1) | ((1 << CONN_ID_BITS) - 1);
        assert!(largest < 1 << 53);
        assert_eq!(conn_id_base(NODE_NUMBERS), 0);
    }
}
