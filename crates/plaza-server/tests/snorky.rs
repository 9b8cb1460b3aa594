//! Snorky against the real binary: the acceptance cases S1–S13 of the research notes (§4), with
//! a WebSocket client written against the wire description (§1) and raw HTTP for the backend.
//! Frames are compared byte for byte (Python's `json.dumps` layout).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Server, WAIT, Ws};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

const KEY: &str = "swordfish-but-longer-0123";
const SECRET: &str = "an-hmac-secret-that-is-long-enough-0123456789";
const QUIET: Duration = Duration::from_millis(300);

fn config(extra: &str) -> String {
    format!(
        r#"
[auth]
hmac_secret = "{SECRET}"
anonymous = true
[live]
token_ttl_secs = 2
[[live.dealers]]
name = "AllTasks"
model = "Task"
kind = "broadcast"
[[live.dealers]]
name = "TasksByColor"
model = "Task"
kind = "key"
key = "color"
[[live.dealers]]
name = "FilteredTasks"
model = "Task"
kind = "filter"
[snorky]
path = "/ws"
{extra}
"#
    )
}

fn start(extra: &str) -> Server {
    Server::start_with(&config(extra), &["--backend-key", KEY])
}

async fn open_url(url: String) -> Ws {
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("ws connect timeout")
        .expect("ws connect");
    ws
}

async fn open(server: &Server) -> Ws {
    open_url(format!("ws://{}/ws", server.public)).await
}

fn token(user: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": user, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A connection whose identity is `user` (a connection token in the URL).
async fn open_as(server: &Server, user: &str) -> Ws {
    open_url(format!("ws://{}/ws?token={}", server.public, token(user))).await
}

async fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
}

/// Sends an RPC call; `call_id` is left out when `None`.
async fn call(ws: &mut Ws, service: &str, command: &str, params: Value, call_id: Option<Value>) {
    let mut message = json!({"command": command, "params": params});
    if let Some(id) = call_id {
        message["callId"] = id;
    }
    send(
        ws,
        &json!({"service": service, "message": message}).to_string(),
    )
    .await;
}

/// The next text frame, exactly as sent.
async fn next(ws: &mut Ws) -> String {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("stream ended")
            .expect("ws error");
        match msg {
            Message::Text(t) => return t.to_string(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Asserts that no text frame arrives for a while.
async fn quiet(ws: &mut Ws) {
    let deadline = tokio::time::Instant::now() + QUIET;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(other) => panic!("expected nothing, got {other:?}"),
        }
    }
}

/// `{"service": S, "message": {"type": "response", "callId": ID, "data": D}}`.
fn ok(service: &str, id: Option<u64>, data: &str) -> String {
    match id {
        Some(id) => format!(
            r#"{{"service": "{service}", "message": {{"type": "response", "callId": {id}, "data": {data}}}}}"#
        ),
        None => format!(
            r#"{{"service": "{service}", "message": {{"type": "response", "data": {data}}}}}"#
        ),
    }
}

fn err(service: &str, id: Option<u64>, text: &str) -> String {
    let id = id.map_or("null".to_owned(), |i| i.to_string());
    format!(
        r#"{{"service": "{service}", "message": {{"type": "error", "callId": {id}, "message": "{text}"}}}}"#
    )
}

/// One raw HTTP/1.1 request to the backend listener, with `X-Backend-Key` when given.
async fn backend_raw(
    addr: SocketAddr,
    method: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let key = key
        .map(|k| format!("X-Backend-Key: {k}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} /backend HTTP/1.1\r\nHost: t\r\n{key}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("backend request hung")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text[9..12].parse().unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// A backend call as the Python connector makes it (no callId); returns the reply envelope.
async fn backend(server: &Server, service: &str, command: &str, params: Value) -> Value {
    let body = json!({"service": service, "message": {"command": command, "params": params}});
    let (status, _, body) = backend_raw(server.backend, "POST", Some(KEY), &body.to_string()).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn authorize(server: &Server, items: Value) -> String {
    let reply = backend(
        server,
        "datasync_backend",
        "authorizeSubscription",
        json!({"items": items}),
    )
    .await;
    reply["message"]["data"]
        .as_str()
        .unwrap_or_else(|| panic!("no token: {reply}"))
        .to_owned()
}

async fn publish_deltas(server: &Server, deltas: Value) -> Value {
    backend(
        server,
        "datasync_backend",
        "publishDeltas",
        json!({"deltas": deltas}),
    )
    .await["message"]
        .clone()
}

async fn acquire(ws: &mut Ws, token: &str) {
    call(
        ws,
        "datasync",
        "acquireSubscription",
        json!({"token": token}),
        Some(json!(1)),
    )
    .await;
    assert_eq!(next(ws).await, ok("datasync", Some(1), "null"));
}

fn delta_frame(delta: &str) -> String {
    format!(r#"{{"service": "datasync", "message": {{"type": "delta", "delta": {delta}}}}}"#)
}

#[tokio::test]
async fn s1_rpc_shape() {
    let server = start("");
    let mut ws = open(&server).await;
    call(
        &mut ws,
        "pubsub",
        "subscribe",
        json!({"channel": "c1"}),
        Some(json!(0)),
    )
    .await;
    assert_eq!(
        next(&mut ws).await,
        r#"{"service": "pubsub", "message": {"type": "response", "callId": 0, "data": null}}"#
    );
    call(
        &mut ws,
        "pubsub",
        "subscribe",
        json!({"channel": "c2"}),
        None,
    )
    .await;
    assert_eq!(
        next(&mut ws).await,
        r#"{"service": "pubsub", "message": {"type": "response", "data": null}}"#
    );
    call(
        &mut ws,
        "pubsub",
        "subscribe",
        json!({"channel": "c2"}),
        None,
    )
    .await;
    assert_eq!(
        next(&mut ws).await,
        r#"{"service": "pubsub", "message": {"type": "error", "callId": null, "message": "Already subscribed"}}"#
    );
    call(
        &mut ws,
        "pubsub",
        "unsubscribe",
        json!({"channel": "c2"}),
        Some(json!("a-string")),
    )
    .await;
    assert_eq!(
        next(&mut ws).await,
        r#"{"service": "pubsub", "message": {"type": "response", "callId": "a-string", "data": null}}"#
    );
}

#[tokio::test]
async fn s2_rpc_errors_and_ignored_input() {
    let server = start("");
    let mut ws = open(&server).await;
    call(&mut ws, "pubsub", "nope", json!({}), Some(json!(1))).await;
    assert_eq!(
        next(&mut ws).await,
        err("pubsub", Some(1), "Unknown command")
    );
    call(&mut ws, "pubsub", "subscribe", json!({}), Some(json!(2))).await;
    assert_eq!(
        next(&mut ws).await,
        err("pubsub", Some(2), "Invalid params")
    );
    call(
        &mut ws,
        "pubsub",
        "subscribe",
        json!({"channel": "c", "x": 1}),
        Some(json!(3)),
    )
    .await;
    assert_eq!(
        next(&mut ws).await,
        err("pubsub", Some(3), "Invalid params")
    );
    call(&mut ws, "pubsub", "subscribe", json!(["c"]), Some(json!(4))).await;
    assert_eq!(
        next(&mut ws).await,
        err("pubsub", Some(4), "Invalid params")
    );
    // No reply, and the socket stays open (the reference aborted TCP on the last three).
    for frame in [
        "{not json",
        r#"{"service":"nope","message":{"command":"subscribe","params":{"channel":"c"}}}"#,
        r#"{"message":{"command":"subscribe","params":{"channel":"c"}}}"#,
        r#"{"service":"pubsub","message":{"command":"subscribe"}}"#,
        r#"{"service":"pubsub","message":"subscribe"}"#,
        r#"{"service":"pubsub","message":[1,2]}"#,
        r#"[{"service":"pubsub"}]"#,
    ] {
        send(&mut ws, frame).await;
    }
    quiet(&mut ws).await;
    call(
        &mut ws,
        "pubsub",
        "subscribe",
        json!({"channel": "c"}),
        Some(json!(5)),
    )
    .await;
    assert_eq!(next(&mut ws).await, ok("pubsub", Some(5), "null"));
}

#[tokio::test]
async fn s3_pubsub() {
    let server = start("");
    let (mut a, mut b) = (open(&server).await, open(&server).await);
    for ws in [&mut a, &mut b] {
        call(
            ws,
            "pubsub",
            "subscribe",
            json!({"channel": "c1"}),
            Some(json!(0)),
        )
        .await;
        assert_eq!(next(ws).await, ok("pubsub", Some(0), "null"));
    }
    send(
        &mut b,
        r#"{"service":"pubsub","message":{"command":"publish","params":{"channel":"c1","message":{"hello":[1,2]}},"callId":1}}"#,
    )
    .await;
    let message = r#"{"service": "pubsub", "message": {"type": "message", "channel": "c1", "message": {"hello": [1, 2]}}}"#;
    // The publisher's own notification comes before its response.
    assert_eq!(next(&mut b).await, message);
    assert_eq!(next(&mut b).await, ok("pubsub", Some(1), "null"));
    assert_eq!(next(&mut a).await, message);
    call(
        &mut b,
        "pubsub",
        "subscribe",
        json!({"channel": "c1"}),
        Some(json!(2)),
    )
    .await;
    assert_eq!(
        next(&mut b).await,
        err("pubsub", Some(2), "Already subscribed")
    );
    call(
        &mut b,
        "pubsub",
        "unsubscribe",
        json!({"channel": "zz"}),
        Some(json!(3)),
    )
    .await;
    assert_eq!(next(&mut b).await, err("pubsub", Some(3), "Not subscribed"));
    // Any JSON value is a channel; key order does not matter.
    call(
        &mut a,
        "pubsub",
        "subscribe",
        json!({"channel": {"room": 1, "kind": "x"}}),
        None,
    )
    .await;
    assert_eq!(next(&mut a).await, ok("pubsub", None, "null"));
    send(
        &mut b,
        r#"{"service":"pubsub","message":{"command":"publish","params":{"channel":{"kind":"x","room":1},"message":"é"}}}"#,
    )
    .await;
    assert_eq!(next(&mut b).await, ok("pubsub", None, "null"));
    assert_eq!(
        next(&mut a).await,
        r#"{"service": "pubsub", "message": {"type": "message", "channel": {"kind": "x", "room": 1}, "message": "\u00e9"}}"#
    );
    b.close(None).await.unwrap();
    drop(b);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c = open(&server).await;
    call(
        &mut c,
        "pubsub",
        "publish",
        json!({"channel": "c1", "message": 2}),
        None,
    )
    .await;
    assert_eq!(next(&mut c).await, ok("pubsub", None, "null"));
    assert_eq!(
        next(&mut a).await,
        r#"{"service": "pubsub", "message": {"type": "message", "channel": "c1", "message": 2}}"#
    );
    // Subscribers of a native channel with the same name see nothing of it.
    let body = json!({"channel": "c1", "data": 3}).to_string();
    let (status, _) = common::http(
        server.backend,
        "POST",
        "/api/publish",
        Some(KEY),
        Some(&body),
    )
    .await;
    assert_eq!(status, 200);
    quiet(&mut a).await;
}

#[tokio::test]
async fn s4_backend_http_and_client_publish_switch() {
    let server = start("client_publish = false");
    let mut ws = open(&server).await;
    call(
        &mut ws,
        "pubsub",
        "subscribe",
        json!({"channel": "news"}),
        None,
    )
    .await;
    assert_eq!(next(&mut ws).await, ok("pubsub", None, "null"));
    call(
        &mut ws,
        "pubsub",
        "publish",
        json!({"channel": "news", "message": 1}),
        Some(json!(7)),
    )
    .await;
    assert_eq!(
        next(&mut ws).await,
        err("pubsub", Some(7), "Not authorized")
    );

    let body = r#"{"service":"pubsub_backend","message":{"command":"publish","params":{"channel":"news","message":{"t":1}},"callId":0}}"#;
    let (status, _, _) = backend_raw(server.backend, "POST", None, body).await;
    assert_eq!(status, 401);
    let (status, _, _) = backend_raw(server.backend, "POST", Some("wrong"), body).await;
    assert_eq!(status, 401);
    let (status, _, reply) = backend_raw(server.backend, "POST", Some(KEY), "{nope").await;
    assert_eq!(status, 400);
    assert!(reply.contains("Invalid JSON"), "{reply}");
    let (status, _, _) = backend_raw(server.backend, "GET", Some(KEY), "").await;
    assert_eq!(status, 405);
    let (status, head, reply) = backend_raw(server.backend, "POST", Some(KEY), body).await;
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: application/json; charset=utf-8"),
        "{head}"
    );
    assert_eq!(
        reply,
        r#"{"service": "pubsub_backend", "message": {"type": "response", "callId": 0, "data": null}}"#
    );
    assert_eq!(
        next(&mut ws).await,
        r#"{"service": "pubsub", "message": {"type": "message", "channel": "news", "message": {"t": 1}}}"#
    );
    // Not upstream: what made the reference hang gets an answer.
    let (status, _, reply) = backend_raw(
        server.backend,
        "POST",
        Some(KEY),
        r#"{"service":"nope","message":{"command":"x","params":{}}}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(reply, err("nope", None, "Unknown service"));
    let (status, _, reply) = backend_raw(
        server.backend,
        "POST",
        Some(KEY),
        r#"{"service":"pubsub_backend","message":{"command":"publish"}}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        reply.starts_with(r#"{"service": null, "message": {"type": "error", "callId": null"#),
        "{reply}"
    );
    // The frontend services are not reachable from the backend, and vice versa.
    let reply = backend(
        &server,
        "pubsub",
        "publish",
        json!({"channel": "news", "message": 1}),
    )
    .await;
    assert_eq!(reply["message"]["message"], "Unknown service");
    call(
        &mut ws,
        "pubsub_backend",
        "publish",
        json!({"channel": "news", "message": 1}),
        None,
    )
    .await;
    quiet(&mut ws).await;
}

#[tokio::test]
async fn s5_s6_subscription_lifecycle() {
    let server = start("");
    let token = authorize(&server, json!([{"dealer": "AllTasks", "query": null}])).await;
    assert_eq!(token.len(), 32);
    assert!(
        token
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "{token}"
    );
    let reply = backend(
        &server,
        "datasync_backend",
        "authorizeSubscription",
        json!({"items": [{"dealer": "Nope", "query": 1}]}),
    )
    .await;
    assert_eq!(
        reply["message"],
        json!({"type": "error", "callId": null, "message": "No such dealer"})
    );

    // A delta before the acquire is sent first, then the response.
    let reply = publish_deltas(
        &server,
        json!([{"type": "insert", "model": "Task", "data": {"id": 1, "title": "a"}}]),
    )
    .await;
    assert_eq!(reply, json!({"type": "response", "data": null}));
    let mut a = open(&server).await;
    call(
        &mut a,
        "datasync",
        "acquireSubscription",
        json!({"token": token}),
        Some(json!(0)),
    )
    .await;
    assert_eq!(
        next(&mut a).await,
        delta_frame(r#"{"type": "insert", "model": "Task", "data": {"id": 1, "title": "a"}}"#)
    );
    assert_eq!(next(&mut a).await, ok("datasync", Some(0), "null"));
    // Another client can neither acquire nor cancel it.
    let mut b = open(&server).await;
    call(
        &mut b,
        "datasync",
        "acquireSubscription",
        json!({"token": token}),
        Some(json!(1)),
    )
    .await;
    assert_eq!(
        next(&mut b).await,
        err("datasync", Some(1), "No such subscription")
    );
    call(
        &mut b,
        "datasync",
        "cancelSubscription",
        json!({"token": token}),
        Some(json!(2)),
    )
    .await;
    assert_eq!(
        next(&mut b).await,
        err("datasync", Some(2), "No such subscription")
    );
    call(
        &mut b,
        "datasync",
        "acquireSubscription",
        json!({"token": 5}),
        Some(json!(3)),
    )
    .await;
    assert_eq!(
        next(&mut b).await,
        err("datasync", Some(3), "token must be string")
    );
    // Cancel, then the token is gone.
    call(
        &mut a,
        "datasync",
        "cancelSubscription",
        json!({"token": token}),
        Some(json!(4)),
    )
    .await;
    assert_eq!(next(&mut a).await, ok("datasync", Some(4), "null"));
    call(
        &mut a,
        "datasync",
        "acquireSubscription",
        json!({"token": token}),
        Some(json!(5)),
    )
    .await;
    assert_eq!(
        next(&mut a).await,
        err("datasync", Some(5), "No such subscription")
    );
    publish_deltas(
        &server,
        json!([{"type": "delete", "model": "Task", "data": {"id": 1}}]),
    )
    .await;
    quiet(&mut a).await;

    // Left unacquired past the timeout (token_ttl_secs = 2).
    let late = authorize(&server, json!([{"dealer": "AllTasks", "query": null}])).await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    call(
        &mut a,
        "datasync",
        "acquireSubscription",
        json!({"token": late}),
        Some(json!(6)),
    )
    .await;
    assert_eq!(
        next(&mut a).await,
        err("datasync", Some(6), "No such subscription")
    );

    // An empty item list is a token that never receives anything.
    let empty = authorize(&server, json!([])).await;
    acquire(&mut a, &empty).await;

    // Disconnecting cancels: the owner's subscription stops receiving (its view is gone).
    let owned = authorize(&server, json!([{"dealer": "AllTasks", "query": null}])).await;
    acquire(&mut b, &owned).await;
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    call(
        &mut a,
        "datasync",
        "cancelSubscription",
        json!({"token": owned}),
        Some(json!(7)),
    )
    .await;
    assert_eq!(
        next(&mut a).await,
        err("datasync", Some(7), "No such subscription")
    );
}

/// Reads `n` frames and returns them sorted (order across subscription items is unspecified).
async fn frames(ws: &mut Ws, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(next(ws).await);
    }
    out.sort();
    out
}

#[tokio::test]
async fn s7_update_becomes_insert_update_delete() {
    let server = start("");
    let token = authorize(
        &server,
        json!([{"dealer": "TasksByColor", "query": "red"}, {"dealer": "AllTasks", "query": null}]),
    )
    .await;
    let mut ws = open(&server).await;
    acquire(&mut ws, &token).await;
    let update = |old: &str, new: &str| json!([{"type": "update", "model": "Task", "newData": {"color": new, "id": 1}, "oldData": {"color": old, "id": 1}}]);
    let up = |old: &str, new: &str| {
        delta_frame(&format!(
            r#"{{"type": "update", "model": "Task", "newData": {{"color": "{new}", "id": 1}}, "oldData": {{"color": "{old}", "id": 1}}}}"#
        ))
    };
    publish_deltas(&server, update("blue", "red")).await;
    let mut want = vec![
        delta_frame(r#"{"type": "insert", "model": "Task", "data": {"color": "red", "id": 1}}"#),
        up("blue", "red"),
    ];
    want.sort();
    assert_eq!(frames(&mut ws, 2).await, want);
    publish_deltas(&server, update("red", "red")).await;
    assert_eq!(
        frames(&mut ws, 2).await,
        vec![up("red", "red"), up("red", "red")]
    );
    publish_deltas(&server, update("red", "green")).await;
    let mut want = vec![
        delta_frame(r#"{"type": "delete", "model": "Task", "data": {"color": "red", "id": 1}}"#),
        up("red", "green"),
    ];
    want.sort();
    assert_eq!(frames(&mut ws, 2).await, want);
    publish_deltas(&server, update("green", "blue")).await;
    assert_eq!(frames(&mut ws, 1).await, vec![up("green", "blue")]);
    // A delta of another model goes nowhere.
    publish_deltas(
        &server,
        json!([{"type": "insert", "model": "Other", "data": {"color": "red"}}]),
    )
    .await;
    quiet(&mut ws).await;
}

#[tokio::test]
async fn s8_filter_semantics() {
    let server = start("");
    let query = json!(["and", [">=", "prio", 3], ["not", ["==", "done", true]]]);
    let token = authorize(
        &server,
        json!([{"dealer": "FilteredTasks", "query": query}]),
    )
    .await;
    let not_x = authorize(
        &server,
        json!([{"dealer": "FilteredTasks", "query": ["not", ["==", "x", 1]]}]),
    )
    .await;
    let mut ws = open(&server).await;
    acquire(&mut ws, &token).await;
    let mut other = open(&server).await;
    acquire(&mut other, &not_x).await;
    let insert = |data: Value| json!([{"type": "insert", "model": "Task", "data": data}]);
    publish_deltas(&server, insert(json!({"prio": "9"}))).await;
    publish_deltas(&server, insert(json!({}))).await;
    publish_deltas(&server, insert(json!({"prio": 5, "done": false}))).await;
    assert_eq!(
        next(&mut ws).await,
        delta_frame(r#"{"type": "insert", "model": "Task", "data": {"done": false, "prio": 5}}"#)
    );
    // `["not", ["==", "x", 1]]` matches rows without x: all three.
    for _ in 0..3 {
        assert!(next(&mut other).await.contains(r#""type": "insert""#));
    }
    // Updates follow S7 (0.1.0a4 answered `Internal error` here).
    let update = json!([{"type": "update", "model": "Task", "newData": {"prio": 5, "done": true}, "oldData": {"prio": 5, "done": false}}]);
    let reply = publish_deltas(&server, update).await;
    assert_eq!(reply["type"], "response");
    assert_eq!(
        next(&mut ws).await,
        delta_frame(r#"{"type": "delete", "model": "Task", "data": {"done": false, "prio": 5}}"#)
    );
    // Dotted fields are nested access.
    let owner = authorize(
        &server,
        json!([{"dealer": "FilteredTasks", "query": ["==", "owner.name", "bob"]}]),
    )
    .await;
    let mut third = open(&server).await;
    acquire(&mut third, &owner).await;
    publish_deltas(
        &server,
        insert(json!({"name": "bob", "owner": {"name": "alice"}})),
    )
    .await;
    publish_deltas(&server, insert(json!({"owner": {"name": "bob"}}))).await;
    assert_eq!(
        next(&mut third).await,
        delta_frame(r#"{"type": "insert", "model": "Task", "data": {"owner": {"name": "bob"}}}"#)
    );
    quiet(&mut third).await;
    // A query that is not a filter cannot be authorized.
    let reply = backend(
        &server,
        "datasync_backend",
        "authorizeSubscription",
        json!({"items": [{"dealer": "FilteredTasks", "query": 5}]}),
    )
    .await;
    assert_eq!(reply["message"]["message"], "Internal error");
}

#[tokio::test]
async fn s9_backend_validation() {
    let server = start("");
    let token = authorize(&server, json!([{"dealer": "AllTasks", "query": null}])).await;
    let mut ws = open(&server).await;
    acquire(&mut ws, &token).await;
    let error = |items: Value| {
        let server = &server;
        async move {
            backend(
                server,
                "datasync_backend",
                "authorizeSubscription",
                json!({"items": items}),
            )
            .await["message"]["message"]
                .clone()
        }
    };
    assert_eq!(
        error(json!([{"dealer": 1, "query": null}])).await,
        "dealer should be a dealer name"
    );
    assert_eq!(
        error(json!([{"dealer": "Nope", "query": null}])).await,
        "No such dealer"
    );
    assert_eq!(
        error(json!([{"dealer": "AllTasks"}])).await,
        "Missing field 'query'"
    );
    let good = json!({"type": "insert", "model": "Task", "data": {"id": 1}});
    for (bad, text) in [
        (
            json!({"type": "upsert", "model": "Task", "data": {}}),
            "Invalid delta type",
        ),
        (json!({"type": "insert", "data": {}}), "Missing field"),
        (json!({"type": "insert", "model": "Task"}), "Missing field"),
        (
            json!({"type": "insert", "model": 1, "data": {}}),
            "model must be string",
        ),
    ] {
        let reply = publish_deltas(&server, json!([good, bad])).await;
        assert_eq!(
            reply,
            json!({"type": "error", "callId": null, "message": text})
        );
    }
    // The valid first delta of each rejected batch was never delivered.
    quiet(&mut ws).await;
    let reply = backend(&server, "datasync_backend", "publishDeltas", json!({})).await;
    assert_eq!(reply["message"]["message"], "Invalid params");
    let reply = backend(&server, "datasync_backend", "nope", json!({})).await;
    assert_eq!(reply["message"]["message"], "Unknown command");
}

#[tokio::test]
async fn s10_messaging() {
    let server = start("");
    let (mut alice, mut bob) = (open(&server).await, open(&server).await);
    call(
        &mut alice,
        "messaging",
        "registerParticipant",
        json!({"name": "alice"}),
        Some(json!(0)),
    )
    .await;
    assert_eq!(next(&mut alice).await, ok("messaging", Some(0), "null"));
    call(
        &mut bob,
        "messaging",
        "registerParticipant",
        json!({"name": "bob"}),
        Some(json!(0)),
    )
    .await;
    assert_eq!(next(&mut bob).await, ok("messaging", Some(0), "null"));
    call(
        &mut bob,
        "messaging",
        "registerParticipant",
        json!({"name": "alice"}),
        Some(json!(1)),
    )
    .await;
    assert_eq!(
        next(&mut bob).await,
        err("messaging", Some(1), "Name already registered")
    );
    call(
        &mut alice,
        "messaging",
        "listParticipants",
        json!({}),
        Some(json!(1)),
    )
    .await;
    assert_eq!(
        next(&mut alice).await,
        ok("messaging", Some(1), r#"["alice", "bob"]"#)
    );
    call(
        &mut alice,
        "messaging",
        "send",
        json!({"sender": "alice", "dest": "bob", "body": {"text": "hi"}}),
        Some(json!(2)),
    )
    .await;
    assert_eq!(next(&mut alice).await, ok("messaging", Some(2), "null"));
    assert_eq!(
        next(&mut bob).await,
        r#"{"service": "messaging", "message": {"type": "message", "sender": "alice", "dest": "bob", "body": {"text": "hi"}}}"#
    );
    quiet(&mut alice).await;
    call(
        &mut alice,
        "messaging",
        "send",
        json!({"sender": "bob", "dest": "bob", "body": 1}),
        Some(json!(3)),
    )
    .await;
    assert_eq!(
        next(&mut alice).await,
        err("messaging", Some(3), "Invalid sender")
    );
    call(
        &mut alice,
        "messaging",
        "send",
        json!({"sender": "alice", "dest": "carol", "body": 1}),
        Some(json!(4)),
    )
    .await;
    assert_eq!(
        next(&mut alice).await,
        err("messaging", Some(4), "Unknown destination")
    );
    call(
        &mut alice,
        "messaging",
        "unregisterParticipant",
        json!({"name": "bob"}),
        Some(json!(5)),
    )
    .await;
    assert_eq!(
        next(&mut alice).await,
        err("messaging", Some(5), "Invalid participant")
    );
    call(
        &mut alice,
        "messaging",
        "unregisterParticipant",
        json!({"name": "zed"}),
        Some(json!(6)),
    )
    .await;
    assert_eq!(
        next(&mut alice).await,
        err("messaging", Some(6), "Unknown participant")
    );
    // A name is freed on disconnect.
    drop(bob);
    tokio::time::sleep(Duration::from_millis(200)).await;
    call(
        &mut alice,
        "messaging",
        "listParticipants",
        json!({}),
        Some(json!(7)),
    )
    .await;
    assert_eq!(
        next(&mut alice).await,
        ok("messaging", Some(7), r#"["alice"]"#)
    );
    let mut carol = open(&server).await;
    call(
        &mut carol,
        "messaging",
        "registerParticipant",
        json!({"name": "bob"}),
        None,
    )
    .await;
    assert_eq!(next(&mut carol).await, ok("messaging", None, "null"));
}

/// The `timestamp` of a chat frame: ISO-8601 with microseconds and an offset.
fn timestamp_of(frame: &str) -> String {
    let v: Value = serde_json::from_str(frame).unwrap();
    let t = v["message"]["timestamp"].as_str().unwrap().to_owned();
    assert!(
        t.ends_with("+00:00") && t.len() >= 25 && &t[10..11] == "T",
        "{t}"
    );
    t
}

#[tokio::test]
async fn s11_chat() {
    let server = start("");
    let mut anon = open(&server).await;
    call(
        &mut anon,
        "chat",
        "join",
        json!({"channel": "room"}),
        Some(json!(0)),
    )
    .await;
    assert_eq!(
        next(&mut anon).await,
        err("chat", Some(0), "Not authenticated")
    );

    let mut u1 = open_as(&server, "u1").await;
    let mut u2 = open_as(&server, "u2").await;
    let mut u2b = open_as(&server, "u2").await;
    call(
        &mut u1,
        "chat",
        "join",
        json!({"channel": "room"}),
        Some(json!(0)),
    )
    .await;
    assert_eq!(
        next(&mut u1).await,
        ok("chat", Some(0), r#"{"members": ["u1"]}"#)
    );
    call(
        &mut u2,
        "chat",
        "join",
        json!({"channel": "room"}),
        Some(json!(0)),
    )
    .await;
    assert_eq!(
        next(&mut u2).await,
        ok("chat", Some(0), r#"{"members": ["u1", "u2"]}"#)
    );
    let joined = next(&mut u1).await;
    let ts = timestamp_of(&joined);
    assert_eq!(
        joined,
        format!(
            r#"{{"service": "chat", "message": {{"type": "presence", "from": "u2", "channel": "room", "status": "joined", "timestamp": "{ts}"}}}}"#
        )
    );
    // A second connection of the same identity: no presence.
    call(
        &mut u2b,
        "chat",
        "join",
        json!({"channel": "room"}),
        Some(json!(0)),
    )
    .await;
    assert_eq!(
        next(&mut u2b).await,
        ok("chat", Some(0), r#"{"members": ["u1", "u2"]}"#)
    );
    quiet(&mut u1).await;
    call(
        &mut u2b,
        "chat",
        "join",
        json!({"channel": "room"}),
        Some(json!(1)),
    )
    .await;
    assert_eq!(next(&mut u2b).await, err("chat", Some(1), "Already joined"));

    // send reaches every member, the sender included.
    call(
        &mut u1,
        "chat",
        "send",
        json!({"channel": "room", "body": "hello"}),
        Some(json!(1)),
    )
    .await;
    let own = next(&mut u1).await;
    let ts = timestamp_of(&own);
    let message = format!(
        r#"{{"service": "chat", "message": {{"type": "message", "from": "u1", "channel": "room", "body": "hello", "timestamp": "{ts}"}}}}"#
    );
    assert_eq!(own, message);
    assert_eq!(next(&mut u1).await, ok("chat", Some(1), "null"));
    assert_eq!(next(&mut u2).await, message);
    assert_eq!(next(&mut u2b).await, message);

    // read reaches only the identity's other connections.
    call(
        &mut u2,
        "chat",
        "read",
        json!({"channel": "room"}),
        Some(json!(2)),
    )
    .await;
    assert_eq!(next(&mut u2).await, ok("chat", Some(2), "null"));
    let read = next(&mut u2b).await;
    let ts = timestamp_of(&read);
    assert_eq!(
        read,
        format!(
            r#"{{"service": "chat", "message": {{"type": "read", "channel": "room", "timestamp": "{ts}"}}}}"#
        )
    );
    quiet(&mut u1).await;
    call(
        &mut u1,
        "chat",
        "send",
        json!({"channel": "other", "body": 1}),
        Some(json!(3)),
    )
    .await;
    assert_eq!(next(&mut u1).await, err("chat", Some(3), "Not joined"));
    call(
        &mut u1,
        "chat",
        "leave",
        json!({"channel": "other"}),
        Some(json!(4)),
    )
    .await;
    assert_eq!(next(&mut u1).await, err("chat", Some(4), "Not joined"));

    // Closing the identity's last connection sends `left`; closing one of two does not.
    drop(u2b);
    quiet(&mut u1).await;
    drop(u2);
    let left = next(&mut u1).await;
    let ts = timestamp_of(&left);
    assert_eq!(
        left,
        format!(
            r#"{{"service": "chat", "message": {{"type": "presence", "from": "u2", "channel": "room", "status": "left", "timestamp": "{ts}"}}}}"#
        )
    );
}

#[tokio::test]
async fn s12_cursors() {
    let server = start("");
    let mut a = open_as(&server, "ann").await;
    let mut b = open_as(&server, "ben").await;
    for ws in [&mut a, &mut b] {
        call(
            ws,
            "cursors",
            "join",
            json!({"document": "doc"}),
            Some(json!(0)),
        )
        .await;
        assert_eq!(next(ws).await, ok("cursors", Some(0), r#"{"cursors": []}"#));
    }
    call(
        &mut a,
        "cursors",
        "createCursor",
        json!({"privateHandle": 1, "document": "doc", "position": 3, "status": "typing"}),
        Some(json!(1)),
    )
    .await;
    let reply: Value = serde_json::from_str(&next(&mut a).await).unwrap();
    let handle = reply["message"]["data"].as_u64().expect("an int handle");
    assert!(handle <= u64::from(u16::MAX));
    assert_eq!(
        next(&mut b).await,
        format!(
            r#"{{"service": "cursors", "message": {{"type": "cursorAdded", "cursor": {{"publicHandle": {handle}, "document": "doc", "position": 3, "status": "typing", "owner": "ann"}}}}}}"#
        )
    );
    quiet(&mut a).await;
    call(
        &mut a,
        "cursors",
        "updateCursor",
        json!({"privateHandle": 1, "newData": {"position": 7}}),
        Some(json!(2)),
    )
    .await;
    assert_eq!(next(&mut a).await, ok("cursors", Some(2), "null"));
    assert_eq!(
        next(&mut b).await,
        format!(
            r#"{{"service": "cursors", "message": {{"type": "cursorUpdated", "cursor": {{"publicHandle": {handle}, "document": "doc", "position": 7, "status": "typing", "owner": "ann"}}}}}}"#
        )
    );
    call(
        &mut a,
        "cursors",
        "createCursor",
        json!({"privateHandle": 1, "document": "doc", "position": 0, "status": null}),
        Some(json!(3)),
    )
    .await;
    assert_eq!(next(&mut a).await, err("cursors", Some(3), "Reused handle"));
    call(
        &mut a,
        "cursors",
        "removeCursor",
        json!({"privateHandle": 99}),
        Some(json!(4)),
    )
    .await;
    assert_eq!(
        next(&mut a).await,
        err("cursors", Some(4), "No such cursor")
    );
    call(
        &mut a,
        "cursors",
        "createCursor",
        json!({"privateHandle": 1, "document": "other", "position": 0, "status": null}),
        Some(json!(5)),
    )
    .await;
    assert_eq!(next(&mut a).await, err("cursors", Some(5), "Not joined"));
    for i in 2..=16 {
        call(
            &mut a,
            "cursors",
            "createCursor",
            json!({"privateHandle": i, "document": "doc", "position": i, "status": null}),
            None,
        )
        .await;
        assert!(next(&mut a).await.contains(r#""type": "response""#));
        assert!(next(&mut b).await.contains("cursorAdded"));
    }
    call(
        &mut a,
        "cursors",
        "createCursor",
        json!({"privateHandle": 17, "document": "doc", "position": 0, "status": null}),
        Some(json!(6)),
    )
    .await;
    assert_eq!(
        next(&mut a).await,
        err("cursors", Some(6), "Too many cursors")
    );
    // A newcomer sees every cursor.
    let mut c = open_as(&server, "cid").await;
    call(&mut c, "cursors", "join", json!({"document": "doc"}), None).await;
    let joined: Value = serde_json::from_str(&next(&mut c).await).unwrap();
    assert_eq!(
        joined["message"]["data"]["cursors"]
            .as_array()
            .unwrap()
            .len(),
        16
    );
    // A disconnect removes the owner's cursors and tells the others.
    drop(a);
    let mut removed = Vec::new();
    for _ in 0..16 {
        let frame = next(&mut b).await;
        assert!(
            frame.contains(r#""type": "cursorRemoved", "cursor": {"publicHandle": "#),
            "{frame}"
        );
        assert!(frame.ends_with(r#", "document": "doc"}}}"#), "{frame}");
        removed.push(frame);
    }
    assert!(
        removed
            .iter()
            .any(|f| f.contains(&format!(r#""publicHandle": {handle},"#)))
    );
    call(
        &mut b,
        "cursors",
        "leave",
        json!({"document": "nope"}),
        Some(json!(7)),
    )
    .await;
    assert_eq!(next(&mut b).await, err("cursors", Some(7), "Not joined"));
    let mut anon = open(&server).await;
    call(
        &mut anon,
        "cursors",
        "join",
        json!({"document": "doc"}),
        Some(json!(0)),
    )
    .await;
    assert_eq!(
        next(&mut anon).await,
        err("cursors", Some(0), "Not authenticated")
    );
}

#[tokio::test]
async fn s13_pings_origins_and_binary_frames() {
    let server = start("ping_interval_secs = 1");
    let mut request = format!("ws://{}/ws", server.public)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("Origin", "http://anything.example".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    ws.send(Message::binary(
        br#"{"service":"pubsub","message":{"command":"subscribe","params":{"channel":"b"},"callId":0}}"#.to_vec(),
    ))
    .await
    .unwrap();
    assert_eq!(next(&mut ws).await, ok("pubsub", Some(0), "null"));
    let ping = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            if let Some(Ok(Message::Ping(payload))) = ws.next().await {
                return payload;
            }
        }
    })
    .await
    .expect("a ping within the interval");
    assert!(ping.is_empty());

    let strict = start("allowed_origins = [\"http://ok.example\"]");
    let url = format!("ws://{}/ws", strict.public);
    let mut bad = url.clone().into_client_request().unwrap();
    bad.headers_mut()
        .insert("Origin", "http://evil.example".parse().unwrap());
    let refused = tokio_tungstenite::connect_async(bad).await.unwrap_err();
    assert!(refused.to_string().contains("403"), "{refused}");
    let mut good = url.into_client_request().unwrap();
    good.headers_mut()
        .insert("Origin", "http://ok.example".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(good).await.is_ok());
    // A plain GET on the WebSocket path is a 400, as Tornado answers it.
    let (status, _) = common::http(server.public, "GET", "/ws", None, None).await;
    assert_eq!(status, 400);
    // A bad connection token is refused before the upgrade.
    let refused = tokio_tungstenite::connect_async(format!("ws://{}/ws?token=nope", server.public))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("401"), "{refused}");
}

#[tokio::test]
async fn todo_demo_three_clients_follow_the_task_list() {
    let server = start("");
    let mut clients = Vec::new();
    for _ in 0..3 {
        let token = authorize(&server, json!([{"dealer": "AllTasks", "query": null}])).await;
        let mut ws = open(&server).await;
        acquire(&mut ws, &token).await;
        clients.push((ws, Vec::<Value>::new()));
    }
    let task =
        |id: u64, title: &str, done: bool| json!({"id": id, "title": title, "completed": done});
    let steps = vec![
        json!({"type": "insert", "model": "Task", "data": task(1, "milk", false)}),
        json!({"type": "insert", "model": "Task", "data": task(2, "eggs", false)}),
        json!({"type": "insert", "model": "Task", "data": task(3, "bread", false)}),
        json!({"type": "update", "model": "Task", "newData": task(2, "eggs", true), "oldData": task(2, "eggs", false)}),
        json!({"type": "delete", "model": "Task", "data": task(1, "milk", false)}),
        json!({"type": "update", "model": "Task", "newData": task(3, "rye bread", false), "oldData": task(3, "bread", false)}),
    ];
    for step in &steps {
        publish_deltas(&server, json!([step])).await;
    }
    // Each client applies the deltas as Snorky.js's CollectionDeltaProcessor does (by id).
    for (ws, list) in &mut clients {
        for _ in 0..steps.len() {
            let frame: Value = serde_json::from_str(&next(ws).await).unwrap();
            assert_eq!(frame["service"], "datasync");
            let delta = &frame["message"]["delta"];
            match delta["type"].as_str().unwrap() {
                "insert" => list.push(delta["data"].clone()),
                "update" => {
                    let id = &delta["oldData"]["id"];
                    let row = list.iter_mut().find(|r| &r["id"] == id).unwrap();
                    *row = delta["newData"].clone();
                }
                "delete" => list.retain(|r| r["id"] != delta["data"]["id"]),
                other => panic!("delta type {other}"),
            }
        }
        assert_eq!(
            *list,
            vec![task(2, "eggs", true), task(3, "rye bread", false)]
        );
        quiet(ws).await;
    }
}
