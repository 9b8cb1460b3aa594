//! What the Redis and NATS brokers share: node numbering, time stamps, presence entries.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use plaza_core::{ClientInfo, Payload};
use serde_json::{Value as Json, json};

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

pub(crate) fn client_from_json(text: &str) -> Option<ClientInfo> {
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
