//! The native protocol, version 1: JSON text frames (`docs/PROTOCOL.md` is the specification).
//!
//! Request: `{"id": 1, "method": "subscribe", "params": {"channel": "news"}}`.
//! Reply: `{"id": 1, "result": {...}}` or `{"id": 1, "error": {"code": 105, "message": "..."}}`.
//! Push: `{"push": "publication", "channel": "news", "data": ...}`.
//!
//! A frame that cannot be read as a request with a usable `id` gets an error whose `id` is
//! `null`, as in JSON-RPC 2.0, and the connection stays open.

use plaza_core::chat::{self, Peer};
use plaza_core::command::{ConnectInfo, Outcome, Position, SubscribeInfo};
use plaza_core::{
    ChatCommand, ClientInfo, Command, ErrorCode, Payload, PresenceEvent, Publication, ReplyError,
    json_string,
};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Protocol version spoken by this module.
pub const VERSION: u32 = 1;

/// Longest accepted string id, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// A request id, kept as the JSON text the client sent so the reply echoes it exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(Box<str>);

impl RequestId {
    pub fn as_json(&self) -> &str {
        &self.0
    }
}

/// A decoded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: RequestId,
    pub command: Command,
}

/// Why a frame could not become a [`Request`]. `id` is set when the frame had a usable id, so the
/// error reply can carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub id: Option<RequestId>,
    pub error: ReplyError,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    method: Option<&'a RawValue>,
    #[serde(borrow)]
    params: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
struct Params<'a> {
    #[serde(borrow)]
    channel: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    name: Option<&'a RawValue>,
    #[serde(borrow)]
    since: Option<&'a RawValue>,
    #[serde(borrow)]
    token: Option<&'a RawValue>,
    #[serde(borrow)]
    dealer: Option<&'a RawValue>,
    #[serde(borrow)]
    query: Option<&'a RawValue>,
    #[serde(borrow)]
    subscription: Option<&'a RawValue>,
    #[serde(borrow)]
    user: Option<&'a RawValue>,
    #[serde(borrow)]
    group: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    from: Option<&'a RawValue>,
    #[serde(borrow)]
    seq: Option<&'a RawValue>,
    #[serde(borrow)]
    all: Option<&'a RawValue>,
    #[serde(borrow)]
    before: Option<&'a RawValue>,
    #[serde(borrow)]
    limit: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Since {
    epoch: String,
    offset: u64,
}

fn bad(message: impl Into<String>) -> ReplyError {
    ReplyError::new(ErrorCode::BadRequest, message)
}

/// Decodes one text frame.
pub fn decode(text: &str) -> Result<Request, DecodeError> {
    let no_id = |error| DecodeError { id: None, error };
    let raw: &RawValue =
        serde_json::from_str(text).map_err(|e| no_id(bad(format!("invalid JSON: {e}"))))?;
    if !raw.get().starts_with('{') {
        return Err(no_id(bad("a request must be a JSON object")));
    }
    let env: Envelope =
        serde_json::from_str(raw.get()).map_err(|e| no_id(bad(format!("invalid request: {e}"))))?;
    let id = parse_id(env.id).map_err(no_id)?;
    let with_id = |error| DecodeError {
        id: Some(id.clone()),
        error,
    };
    let method: String = match env.method {
        None => return Err(with_id(bad("missing field 'method'"))),
        Some(m) => serde_json::from_str(m.get())
            .map_err(|_| with_id(bad("field 'method' must be a string")))?,
    };
    let params: Params = match env.params {
        None => Params::default(),
        Some(p) if p.get().starts_with('{') => serde_json::from_str(p.get())
            .map_err(|e| with_id(bad(format!("invalid params: {e}"))))?,
        Some(_) => return Err(with_id(bad("field 'params' must be an object"))),
    };
    let command = match method.as_str() {
        "connect" => Command::Connect {
            client_name: optional_string(params.name, "name").map_err(with_id)?,
            token: optional_string(params.token, "token").map_err(with_id)?,
            data: params.data.map(Payload::from_raw),
        },
        "subscribe" => Command::Subscribe {
            channel: required_string(params.channel, "channel").map_err(with_id)?,
            since: parse_since(params.since).map_err(with_id)?,
            token: optional_string(params.token, "token").map_err(with_id)?,
        },
        "unsubscribe" => Command::Unsubscribe {
            channel: required_string(params.channel, "channel").map_err(with_id)?,
        },
        "publish" => Command::Publish {
            channel: required_string(params.channel, "channel").map_err(with_id)?,
            data: params
                .data
                .map(Payload::from_raw)
                .ok_or_else(|| with_id(bad("missing field 'params.data'")))?,
            token: optional_string(params.token, "token").map_err(with_id)?,
        },
        "presence" => Command::Presence {
            channel: required_string(params.channel, "channel").map_err(with_id)?,
        },
        "presence_stats" => Command::PresenceStats {
            channel: required_string(params.channel, "channel").map_err(with_id)?,
        },
        "live_subscribe" => Command::LiveSubscribe {
            token: required_string(params.token, "token").map_err(with_id)?,
        },
        "live_subscribe_query" => Command::LiveSubscribeQuery {
            dealer: required_string(params.dealer, "dealer").map_err(with_id)?,
            query: params
                .query
                .map(Payload::from_raw)
                .ok_or_else(|| with_id(bad("missing field 'params.query'")))?,
        },
        "live_cancel" => Command::LiveCancel {
            subscription: required_string(params.subscription, "subscription").map_err(with_id)?,
        },
        "ping" => Command::Ping,
        "send" | "ack" | "read" | "typing" | "group_join" | "group_leave" | "groups"
        | "group_members" | "chat_history" | "unread" => {
            Command::Chat(decode_chat(&method, &params).map_err(with_id)?)
        }
        other => {
            return Err(with_id(ReplyError::new(
                ErrorCode::UnknownMethod,
                format!("unknown method '{}'", truncate(other, 64)),
            )));
        }
    };
    Ok(Request { id, command })
}

fn decode_chat(method: &str, params: &Params) -> Result<ChatCommand, ReplyError> {
    Ok(match method {
        "send" => ChatCommand::Send {
            to: parse_peer(params)?,
            id: optional_string(params.id, "id")?,
            data: params
                .data
                .map(Payload::from_raw)
                .ok_or_else(|| bad("missing field 'params.data'"))?,
        },
        "ack" => {
            let seqs = match params.seq {
                None => Vec::new(),
                Some(raw) => serde_json::from_str::<u64>(raw.get())
                    .map(|seq| vec![seq])
                    .or_else(|_| serde_json::from_str::<Vec<u64>>(raw.get()))
                    .map_err(|_| {
                        bad("field 'params.seq' must be an integer >= 0 or a list of them")
                    })?,
            };
            let id = optional_string(params.id, "id")?;
            if seqs.is_empty() && id.is_none() {
                return Err(bad("ack needs 'params.seq' or 'params.id'"));
            }
            ChatCommand::Ack {
                seqs,
                id,
                from: optional_string(params.from, "from")?,
            }
        }
        "read" => ChatCommand::Read {
            id: required_string(params.id, "id")?,
            from: optional_string(params.from, "from")?,
        },
        "typing" => ChatCommand::Typing {
            to: parse_peer(params)?,
        },
        "group_join" => ChatCommand::Join {
            group: required_string(params.group, "group")?,
        },
        "group_leave" => ChatCommand::Leave {
            group: required_string(params.group, "group")?,
        },
        "groups" => ChatCommand::Groups {
            all: optional_json::<bool>(params.all, "all", "a boolean")?.unwrap_or(false),
        },
        "group_members" => ChatCommand::Members {
            group: required_string(params.group, "group")?,
        },
        "chat_history" => ChatCommand::History {
            with: parse_peer(params)?,
            before: optional_json::<u64>(params.before, "before", "an integer >= 0")?,
            limit: optional_json::<usize>(params.limit, "limit", "an integer >= 0")?,
        },
        _ => ChatCommand::Unread,
    })
}

/// `{"user": ...}` or `{"group": ...}`, exactly one of them.
fn parse_peer(params: &Params) -> Result<Peer, ReplyError> {
    let user = optional_string(params.user, "user")?;
    let group = optional_string(params.group, "group")?;
    match (user, group) {
        (Some(user), None) => Ok(Peer::User(user)),
        (None, Some(group)) => Ok(Peer::Group(group)),
        _ => Err(bad("give exactly one of 'params.user' and 'params.group'")),
    }
}

fn optional_json<T: serde::de::DeserializeOwned>(
    raw: Option<&RawValue>,
    field: &str,
    kind: &str,
) -> Result<Option<T>, ReplyError> {
    raw.map(|r| serde_json::from_str::<T>(r.get()))
        .transpose()
        .map_err(|_| bad(format!("field 'params.{field}' must be {kind}")))
}

fn parse_id(raw: Option<&RawValue>) -> Result<RequestId, ReplyError> {
    let raw = raw.ok_or_else(|| bad("missing field 'id'"))?;
    let text = raw.get();
    let valid = match text.as_bytes().first() {
        Some(b'0'..=b'9') => text.parse::<u64>().is_ok(),
        Some(b'"') => serde_json::from_str::<String>(text)
            .map(|s| !s.is_empty() && s.len() <= MAX_ID_LEN)
            .unwrap_or(false),
        _ => false,
    };
    if valid {
        Ok(RequestId(text.into()))
    } else {
        Err(bad(format!(
            "field 'id' must be an integer from 0 to 2^64-1 or a string of 1 to {MAX_ID_LEN} bytes"
        )))
    }
}

fn parse_since(raw: Option<&RawValue>) -> Result<Option<Position>, ReplyError> {
    let Some(raw) = raw else { return Ok(None) };
    let since: Since = serde_json::from_str(raw.get()).map_err(|_| {
        bad("field 'params.since' must be {\"epoch\": string, \"offset\": integer >= 0}")
    })?;
    Ok(Some(Position {
        epoch: since.epoch,
        offset: since.offset,
    }))
}

fn required_string(raw: Option<&RawValue>, field: &str) -> Result<String, ReplyError> {
    optional_string(raw, field)?.ok_or_else(|| bad(format!("missing field 'params.{field}'")))
}

fn optional_string(raw: Option<&RawValue>, field: &str) -> Result<Option<String>, ReplyError> {
    match raw {
        None => Ok(None),
        Some(r) => serde_json::from_str::<String>(r.get())
            .map(Some)
            .map_err(|_| bad(format!("field 'params.{field}' must be a string"))),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Encodes the reply to a request.
pub fn encode_reply(id: &RequestId, outcome: &Result<Outcome, ReplyError>) -> String {
    match outcome {
        Ok(Outcome::Done) => format!("{{\"id\":{},\"result\":{{}}}}", id.as_json()),
        Ok(Outcome::Connected(info)) => encode_connected(id, info),
        Ok(Outcome::Published(position)) => format!(
            "{{\"id\":{},\"result\":{{{}}}}}",
            id.as_json(),
            position_fields(position)
        ),
        Ok(Outcome::Subscribed(info)) => encode_subscribed(id, info),
        Ok(Outcome::Presence(clients)) => {
            let list: Vec<String> = clients.iter().map(client_json).collect();
            format!(
                "{{\"id\":{},\"result\":{{\"clients\":[{}]}}}}",
                id.as_json(),
                list.join(",")
            )
        }
        Ok(Outcome::LiveSubscribed(ids)) => {
            let ids: Vec<String> = ids.iter().map(|id| format!("\"{id}\"")).collect();
            format!(
                "{{\"id\":{},\"result\":{{\"subscriptions\":[{}]}}}}",
                id.as_json(),
                ids.join(",")
            )
        }
        Ok(Outcome::Json(result)) => {
            format!("{{\"id\":{},\"result\":{}}}", id.as_json(), result.as_str())
        }
        Ok(Outcome::PresenceStats { clients, users }) => format!(
            "{{\"id\":{},\"result\":{{\"num_clients\":{clients},\"num_users\":{users}}}}}",
            id.as_json()
        ),
        Err(e) => encode_error(Some(id), e),
    }
}

/// `"epoch":"...","offset":N`, to be placed inside an object.
fn position_fields(position: &Position) -> String {
    format!(
        "\"epoch\":{},\"offset\":{}",
        json_string(&position.epoch),
        position.offset
    )
}

fn encode_subscribed(id: &RequestId, info: &SubscribeInfo) -> String {
    let mut fields = Vec::with_capacity(2);
    if let Some(position) = &info.position {
        fields.push(position_fields(position));
    }
    if let Some(recovered) = info.recovered {
        fields.push(format!("\"recovered\":{recovered}"));
    }
    format!(
        "{{\"id\":{},\"result\":{{{}}}}}",
        id.as_json(),
        fields.join(",")
    )
}

fn encode_connected(id: &RequestId, info: &ConnectInfo) -> String {
    let channels: Vec<String> = info.channels.iter().map(|c| json_string(c)).collect();
    let inbox = info.inbox.map_or(String::new(), |inbox| {
        format!(
            ",\"inbox\":{{\"pending\":{},\"dropped\":{},\"reset\":{}}}",
            inbox.pending, inbox.dropped, inbox.reset
        )
    });
    format!(
        "{{\"id\":{},\"result\":{{\"client\":{},\"user\":{},\"channels\":[{}],\"version\":{},\"protocol\":{VERSION},\"ping_interval\":{},\"max_frame_size\":{}{inbox}}}}}",
        id.as_json(),
        json_string(&info.client_id),
        json_string(&info.user),
        channels.join(","),
        json_string(info.version),
        info.ping_interval_secs,
        info.max_frame_size,
    )
}

/// Encodes an error reply; `id` is `None` when the frame had no usable id.
pub fn encode_error(id: Option<&RequestId>, error: &ReplyError) -> String {
    format!(
        "{{\"id\":{},\"error\":{{\"code\":{},\"message\":{}}}}}",
        id.map_or("null", RequestId::as_json),
        error.code.code(),
        json_string(&error.message)
    )
}

/// `{"user":"42","client":"7","info":...}` (`info` only when set).
fn client_json(c: &ClientInfo) -> String {
    let mut out = format!(
        "{{\"user\":{},\"client\":\"{}\"",
        json_string(&c.user),
        c.client
    );
    if let Some(info) = &c.info {
        out.push_str(",\"info\":");
        out.push_str(info.as_str());
    }
    out.push('}');
    out
}

/// Encodes a `join` or `leave` push, once per event for all the channel's other subscribers.
pub fn encode_presence_event(channel: &str, event: &PresenceEvent) -> String {
    let (kind, client) = match event {
        PresenceEvent::Join(c) => ("join", c),
        PresenceEvent::Leave(c) => ("leave", c),
    };
    format!(
        "{{\"push\":\"{kind}\",\"channel\":{},\"info\":{}}}",
        json_string(channel),
        client_json(client)
    )
}

/// `{"push":"live_cancelled","subscription":"7","reason":"..."}`: the server ended a live view.
pub fn encode_live_cancelled(subscription: u64, reason: &str) -> String {
    format!(
        "{{\"push\":\"live_cancelled\",\"subscription\":\"{subscription}\",\"reason\":{}}}",
        json_string(reason)
    )
}

/// Encodes the push of a publication. Called once per publication, whatever the number of
/// subscribers: the frame carries no per-subscriber field.
pub fn encode_publication(publication: &Publication) -> String {
    encode_publication_parts(
        publication.channel.as_str(),
        publication.position.as_ref(),
        &publication.data,
    )
}

/// [`encode_publication`] from its parts, for callers that hold no [`Publication`].
pub fn encode_publication_parts(
    channel: &str,
    position: Option<&Position>,
    data: &Payload,
) -> String {
    if chat::is_inbox(channel) {
        // An inbox entry is stored as its push; the inbox offset becomes its `seq`.
        return chat::with_number("seq", position.map_or(0, |p| p.offset), data.as_str());
    }
    let channel = json_string(channel);
    let data = data.as_str();
    let mut out = String::with_capacity(80 + channel.len() + data.len());
    out.push_str("{\"push\":\"publication\",\"channel\":");
    out.push_str(&channel);
    if let Some(position) = position {
        out.push(',');
        out.push_str(&position_fields(position));
    }
    out.push_str(",\"data\":");
    out.push_str(data);
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use plaza_core::ChannelName;
    use proptest::prelude::*;

    fn ok(text: &str) -> Request {
        decode(text).unwrap_or_else(|e| panic!("{text}: {e:?}"))
    }

    fn err(text: &str) -> DecodeError {
        decode(text).expect_err(text)
    }

    #[test]
    fn decodes_every_method() {
        let r = ok(
            r#"{"id":1,"method":"connect","params":{"name":"web","token":"t.k.n","data":{"a":1}}}"#,
        );
        assert_eq!(r.id.as_json(), "1");
        assert_eq!(
            r.command,
            Command::Connect {
                client_name: Some("web".into()),
                token: Some("t.k.n".into()),
                data: Some(Payload::from_json_text(r#"{"a":1}"#).unwrap()),
            }
        );
        assert_eq!(
            ok(r#"{"id":"a","method":"connect"}"#).command,
            Command::Connect {
                client_name: None,
                token: None,
                data: None
            }
        );
        assert_eq!(
            err(r#"{"id":"a","method":"connect","params":{"token":5}}"#)
                .error
                .message,
            "field 'params.token' must be a string"
        );
        assert_eq!(
            ok(r#"{"id":2,"method":"subscribe","params":{"channel":"news"}}"#).command,
            Command::Subscribe {
                channel: "news".into(),
                since: None,
                token: None,
            }
        );
        assert_eq!(
            ok(r#"{"id":2,"method":"subscribe","params":{"channel":"n","since":{"epoch":"e1","offset":7}}}"#)
                .command,
            Command::Subscribe {
                channel: "n".into(),
                since: Some(Position { epoch: "e1".into(), offset: 7 }),
                token: None,
            }
        );
        for bad_since in [
            r#"5"#,
            r#"{"epoch":"e"}"#,
            r#"{"epoch":1,"offset":2}"#,
            r#"{"epoch":"e","offset":-1}"#,
        ] {
            let text = format!(
                r#"{{"id":3,"method":"subscribe","params":{{"channel":"n","since":{bad_since}}}}}"#
            );
            assert_eq!(err(&text).error.code, ErrorCode::BadRequest, "{text}");
        }
        assert_eq!(
            ok(r#"{"id":3,"method":"unsubscribe","params":{"channel":"news"}}"#).command,
            Command::Unsubscribe {
                channel: "news".into()
            }
        );
        let p = ok(r#"{"id":4,"method":"publish","params":{"channel":"c","data":{"x": [1, 2]}}}"#);
        match p.command {
            Command::Publish { channel, data, .. } => {
                assert_eq!(channel, "c");
                assert_eq!(data.as_str(), r#"{"x": [1, 2]}"#);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(ok(r#"{"id":5,"method":"ping"}"#).command, Command::Ping);
        assert_eq!(
            ok(r#"{"id":6,"method":"presence","params":{"channel":"c"}}"#).command,
            Command::Presence {
                channel: "c".into()
            }
        );
        assert_eq!(
            ok(r#"{"id":7,"method":"presence_stats","params":{"channel":"c"}}"#).command,
            Command::PresenceStats {
                channel: "c".into()
            }
        );
    }

    #[test]
    fn bad_frames_name_the_problem() {
        let e = err("{not json");
        assert_eq!((e.id, e.error.code), (None, ErrorCode::BadRequest));
        assert!(e.error.message.starts_with("invalid JSON"));
        let e = err("[1,2]");
        assert_eq!(e.error.message, "a request must be a JSON object");
        assert_eq!(
            err(r#"{"method":"ping"}"#).error.message,
            "missing field 'id'"
        );
        assert!(err(r#"{"id":-1,"method":"ping"}"#).id.is_none());
        assert!(err(r#"{"id":1.5,"method":"ping"}"#).id.is_none());
        assert!(err(r#"{"id":"","method":"ping"}"#).id.is_none());
        let e = err(r#"{"id":7}"#);
        assert_eq!(e.id.unwrap().as_json(), "7");
        assert_eq!(e.error.message, "missing field 'method'");
        let e = err(r#"{"id":7,"method":"fly"}"#);
        assert_eq!(e.error.code, ErrorCode::UnknownMethod);
        assert_eq!(e.error.message, "unknown method 'fly'");
        let e = err(r#"{"id":7,"method":"subscribe","params":{}}"#);
        assert_eq!(e.error.message, "missing field 'params.channel'");
        let e = err(r#"{"id":7,"method":"subscribe","params":{"channel":5}}"#);
        assert_eq!(e.error.message, "field 'params.channel' must be a string");
        let e = err(r#"{"id":7,"method":"subscribe","params":[]}"#);
        assert_eq!(e.error.message, "field 'params' must be an object");
        let e = err(r#"{"id":7,"method":"publish","params":{"channel":"c"}}"#);
        assert_eq!(e.error.message, "missing field 'params.data'");
        let e = err(r#"{"id":7,"method":3}"#);
        assert_eq!(e.error.message, "field 'method' must be a string");
    }

    #[test]
    fn encodes_replies_and_pushes() {
        let id = ok(r#"{"id":"req-1","method":"ping"}"#).id;
        assert_eq!(
            encode_reply(&id, &Ok(Outcome::Done)),
            r#"{"id":"req-1","result":{}}"#
        );
        let e = ReplyError::new(ErrorCode::InvalidChannel, "bad \"name\"");
        assert_eq!(
            encode_reply(&id, &Err(e.clone())),
            r#"{"id":"req-1","error":{"code":105,"message":"bad \"name\""}}"#
        );
        assert_eq!(
            encode_error(None, &e),
            r#"{"id":null,"error":{"code":105,"message":"bad \"name\""}}"#
        );
        let info = ConnectInfo {
            client_id: "c1".into(),
            user: "42".into(),
            channels: vec!["a".into()],
            version: "0.1.0",
            ping_interval_secs: 25,
            max_frame_size: 65536,
            inbox: None,
        };
        let v: serde_json::Value =
            serde_json::from_str(&encode_reply(&id, &Ok(Outcome::Connected(info)))).unwrap();
        assert_eq!(v["result"]["client"], "c1");
        assert_eq!(v["result"]["protocol"], 1);
        assert_eq!(v["result"]["ping_interval"], 25);
        assert_eq!(v["result"]["user"], "42");
        assert_eq!(v["result"]["channels"], serde_json::json!(["a"]));
        let publication = Publication {
            channel: ChannelName::parse("chat:r\"1", 255).unwrap(),
            data: Payload::from_json_text(r#"{"text":"hi"}"#).unwrap(),
            position: None,
        };
        assert_eq!(
            encode_publication(&publication),
            r#"{"push":"publication","channel":"chat:r\"1","data":{"text":"hi"}}"#
        );
        let with_history = Publication {
            position: Some(Position {
                epoch: "ab".into(),
                offset: 9,
            }),
            ..publication
        };
        assert_eq!(
            encode_publication(&with_history),
            r#"{"push":"publication","channel":"chat:r\"1","epoch":"ab","offset":9,"data":{"text":"hi"}}"#
        );
        let position = Position {
            epoch: "ab".into(),
            offset: 9,
        };
        assert_eq!(
            encode_reply(&id, &Ok(Outcome::Published(position.clone()))),
            r#"{"id":"req-1","result":{"epoch":"ab","offset":9}}"#
        );
        let info = SubscribeInfo {
            position: Some(position),
            recovered: Some(false),
        };
        assert_eq!(
            encode_reply(&id, &Ok(Outcome::Subscribed(info))),
            r#"{"id":"req-1","result":{"epoch":"ab","offset":9,"recovered":false}}"#
        );
    }

    #[test]
    fn live_methods() {
        assert_eq!(
            ok(r#"{"id":1,"method":"live_subscribe","params":{"token":"ab"}}"#).command,
            Command::LiveSubscribe { token: "ab".into() }
        );
        match ok(r#"{"id":1,"method":"live_subscribe_query","params":{"dealer":"d","query":["==","a",1]}}"#).command {
            Command::LiveSubscribeQuery { dealer, query } => {
                assert_eq!((dealer.as_str(), query.as_str()), ("d", r#"["==","a",1]"#));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            err(r#"{"id":1,"method":"live_subscribe_query","params":{"dealer":"d"}}"#)
                .error
                .message,
            "missing field 'params.query'"
        );
        assert_eq!(
            ok(r#"{"id":1,"method":"live_cancel","params":{"subscription":"7"}}"#).command,
            Command::LiveCancel {
                subscription: "7".into()
            }
        );
        let id = ok(r#"{"id":1,"method":"ping"}"#).id;
        assert_eq!(
            encode_reply(&id, &Ok(Outcome::LiveSubscribed(vec![3, 4]))),
            r#"{"id":1,"result":{"subscriptions":["3","4"]}}"#
        );
    }

    #[test]
    fn encodes_presence() {
        let id = ok(r#"{"id":1,"method":"ping"}"#).id;
        let alice = ClientInfo {
            user: "alice".into(),
            client: 7,
            info: Some(Payload::from_json_text(r#"{"name":"A"}"#).unwrap()),
        };
        let anon = ClientInfo {
            user: String::new(),
            client: 8,
            info: None,
        };
        assert_eq!(
            encode_reply(&id, &Ok(Outcome::Presence(vec![alice.clone(), anon]))),
            r#"{"id":1,"result":{"clients":[{"user":"alice","client":"7","info":{"name":"A"}},{"user":"","client":"8"}]}}"#
        );
        assert_eq!(
            encode_reply(
                &id,
                &Ok(Outcome::PresenceStats {
                    clients: 3,
                    users: 2
                })
            ),
            r#"{"id":1,"result":{"num_clients":3,"num_users":2}}"#
        );
        assert_eq!(
            encode_presence_event("room", &PresenceEvent::Leave(alice)),
            r#"{"push":"leave","channel":"room","info":{"user":"alice","client":"7","info":{"name":"A"}}}"#
        );
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in ".{0,200}") {
            let _ = decode(&s);
        }

        #[test]
        fn error_replies_are_valid_json(msg in ".{0,100}", id in any::<u64>()) {
            let req = ok(&format!(r#"{{"id":{id},"method":"ping"}}"#));
            let text = encode_error(Some(&req.id), &ReplyError::new(ErrorCode::Internal, msg.clone()));
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(v["error"]["message"].as_str(), Some(msg.as_str()));
            prop_assert_eq!(v["id"].as_u64(), Some(id));
        }
    }
}
