//! High-templar compatibility, end to end: the real `plaza` binary, a real HTTP app stub (axum,
//! started by each test) serving `GET /api/bootstrap/`, and a real RabbitMQ for the triggers
//! (`PLAZA_TEST_AMQP_URL`, a private node that scripts/test.sh starts). Each test names the
//! acceptance cases (H1–H28 of the research notes, §4.1) it covers.
//!
//! The tests that need RabbitMQ fail with a clear message when `PLAZA_TEST_AMQP_URL` is unset:
//! run `scripts/test.sh`, or start a broker and set it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use common::{KEY, Server, WAIT, http};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// "No frame" windows, as in High-templar's own suite.
const QUIET: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// The app stub.

#[derive(Clone)]
struct Reply {
    status: u16,
    body: String,
    delay: Duration,
}

#[derive(Clone, Default)]
struct Stub {
    reply: Arc<Mutex<Option<Reply>>>,
    seen: Arc<Mutex<Vec<(String, HeaderMap)>>>,
}

impl Stub {
    fn answer(&self, status: u16, body: &str) {
        *self.reply.lock().unwrap() = Some(Reply {
            status,
            body: body.into(),
            delay: Duration::ZERO,
        });
    }

    fn answer_late(&self, delay: Duration) {
        *self.reply.lock().unwrap() = Some(Reply {
            status: 200,
            body: "{}".into(),
            delay,
        });
    }

    fn last_request(&self) -> (String, HeaderMap) {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("no bootstrap call")
    }
}

async fn bootstrap(
    State(stub): State<Stub>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> axum::response::Response {
    stub.seen.lock().unwrap().push((uri.to_string(), headers));
    let reply = stub.reply.lock().unwrap().clone().unwrap_or(Reply {
        status: 200,
        body: "{}".into(),
        delay: Duration::ZERO,
    });
    tokio::time::sleep(reply.delay).await;
    (
        StatusCode::from_u16(reply.status).unwrap(),
        [(header::CONTENT_TYPE, "application/json")],
        reply.body,
    )
        .into_response()
}

fn stub_router(stub: &Stub) -> axum::Router {
    axum::Router::new()
        .route("/api/bootstrap/", get(bootstrap))
        .with_state(stub.clone())
}

async fn start_stub() -> (SocketAddr, Stub) {
    let stub = Stub::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = stub_router(&stub);
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, stub)
}

// ---------------------------------------------------------------------------------------------
// Plaza and RabbitMQ.

fn amqp_url() -> String {
    std::env::var("PLAZA_TEST_AMQP_URL").unwrap_or_else(|_| {
        panic!(
            "PLAZA_TEST_AMQP_URL is not set: these High-templar tests need RabbitMQ. Run \
             scripts/test.sh (it starts a private node), or start one and set \
             PLAZA_TEST_AMQP_URL=amqp://user:pass@127.0.0.1:PORT/%2f"
        )
    })
}

fn config(app: SocketAddr, extra: &str) -> String {
    format!(
        "ping_interval_secs = 0\n[hightemplar]\napi_url = \"http://{app}/api/\"\n\
         api_timeout_ms = 1000\n{extra}"
    )
}

/// Plaza consuming `exchange` on the test broker, ready (its queue bound) when this returns.
async fn start_with_amqp(app: SocketAddr, exchange: &str, extra: &str) -> Server {
    if !cfg!(feature = "amqp") {
        panic!("this test needs RabbitMQ support: cargo test --features amqp (or --all-features)");
    }
    let server = Server::start(&config(
        app,
        &format!(
            "amqp_url = \"{}\"\nexchange = \"{exchange}\"\n{extra}",
            amqp_url()
        ),
    ));
    wait_for_log(&server, "consuming RabbitMQ triggers").await;
    server
}

async fn wait_for_log(server: &Server, needle: &str) {
    let deadline = Instant::now() + WAIT;
    while !server.log().iter().any(|l| l.contains(needle)) {
        assert!(
            Instant::now() < deadline,
            "no log line with {needle:?}: {:#?}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A unique exchange per test, so parallel tests never see each other's triggers.
fn exchange(test: &str) -> String {
    format!("hightemplar_test_{test}_{}", std::process::id())
}

/// Publishes like django-binder: `basic_publish(exchange, routing_key, body)`, confirmed.
async fn publish(exchange: &str, routing_key: &str, bodies: &[Vec<u8>]) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::{BasicProperties, Connection, ConnectionProperties};
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirms = Vec::new();
    for body in bodies {
        confirms.push(
            channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    body,
                    BasicProperties::default(),
                )
                .await
                .expect("publish"),
        );
    }
    for confirm in confirms {
        confirm.await.expect("confirm");
    }
    let _ = connection.close(200, "done".into()).await;
}

async fn trigger_amqp(exchange: &str, body: Value) {
    publish(exchange, "*", &[body.to_string().into_bytes()]).await;
}

async fn trigger_http(server: &Server, body: Value) -> (u16, String) {
    http(
        server.backend,
        "POST",
        "/api/hightemplar/trigger",
        Some(KEY),
        Some(&body.to_string()),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// A High-templar client (what spine-high-templar does, frame by frame).

struct Ht {
    ws: common::Ws,
}

impl Ht {
    async fn open(server: &Server, path: &str, headers: &[(&str, &str)]) -> Ht {
        let mut request = format!("ws://{}{path}", server.public)
            .into_client_request()
            .unwrap();
        for (name, value) in headers {
            request.headers_mut().insert(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
            .await
            .expect("ws connect timeout")
            .expect("ws connect");
        Ht { ws }
    }

    /// Opens `/ws/` and reads the hello, which must authorize.
    async fn connect(server: &Server) -> Ht {
        let mut ht = Ht::open(server, "/ws/", &[]).await;
        let hello = ht.json().await;
        assert_eq!(hello["is_authorized"], true, "{hello}");
        ht
    }

    async fn send(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.to_owned().into()))
            .await
            .unwrap();
    }

    async fn text(&mut self) -> String {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for a frame")
                .expect("stream ended")
                .expect("ws error");
            match msg {
                Message::Text(t) => return t.to_string(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    async fn json(&mut self) -> Value {
        let text = self.text().await;
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
    }

    async fn request(&mut self, frame: Value) -> String {
        self.send(&frame.to_string()).await;
        self.text().await
    }

    async fn subscribe(&mut self, room: Value, request_id: Value) -> String {
        self.request(json!({"type": "subscribe", "room": room, "requestId": request_id}))
            .await
    }

    async fn status(&mut self) -> Value {
        self.send(r#"{"type":"status"}"#).await;
        self.json().await
    }

    async fn silence(&mut self, quiet: Duration) {
        if let Ok(Some(Ok(msg))) = tokio::time::timeout(quiet, self.ws.next()).await {
            panic!("expected no frame, got {msg:?}");
        }
    }

    async fn close_code(&mut self) -> Option<u16> {
        common::read_close_code(&mut self.ws).await
    }

    /// Closes from the client side and waits for the server's close reply.
    async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(WAIT, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

const SUCCESS: &str = r#"{"code": "success"}"#;
const ROOM_NOT_FOUND: &str = r#"{"code": "error", "message": "room-not-found"}"#;
const NO_REQUEST_ID: &str = r#"{"code": "error", "message": "no-request-id"}"#;
const NOT_SUBSCRIBED: &str = r#"{"code": "error", "message": "not-subscribed"}"#;

fn rooms_set(hello: &Value) -> Vec<String> {
    let mut rooms: Vec<String> = hello["allowed_rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.to_string())
        .collect();
    rooms.sort();
    rooms
}

// ---------------------------------------------------------------------------------------------
// Connect and bootstrap: H1–H6.

#[tokio::test]
async fn h1_h2_h5_hello_lists_the_allowed_rooms() {
    let (app, stub) = start_stub().await;
    let server = Server::start(&config(app, ""));

    // H1: `{}` → no rooms, exactly this frame.
    stub.answer(200, "{}");
    let mut ht = Ht::open(&server, "/ws/", &[]).await;
    assert_eq!(
        ht.text().await,
        r#"{"is_authorized": true, "allowed_rooms": []}"#
    );

    // H2: the rooms, compared as a set; a room listed twice is listed once.
    stub.answer(
        200,
        r#"{"allowed_rooms":[{"target":"foo"},{"target":"bar","id":"*"},{"target":"foo"}]}"#,
    );
    let mut ht = Ht::open(&server, "/ws", &[]).await;
    let hello = ht.json().await;
    assert_eq!(hello["is_authorized"], true);
    assert_eq!(
        rooms_set(&hello),
        [
            json!({"target": "bar", "id": "*"}).to_string(),
            json!({"target": "foo"}).to_string()
        ]
    );

    // H5: only the status and allowed_rooms matter.
    stub.answer(200, r#"{"is_authenticated": false, "user": null}"#);
    let mut ht = Ht::open(&server, "/ws/?x=1", &[]).await;
    assert_eq!(
        ht.json().await,
        json!({"is_authorized": true, "allowed_rooms": []})
    );
}

#[tokio::test]
async fn h3_h4_refusals_close_with_1000() {
    let (app, stub) = start_stub().await;
    let server = Server::start(&config(app, ""));
    let refusals = [
        (403, "{}"),
        (401, "{}"),
        (500, "oops"),
        (200, r#"{"allowed_rooms":["foo"]}"#),
        (200, r#"{"allowed_rooms":{"target":"foo"}}"#),
        // Where High-templar answers the upgrade with HTTP 500, Plaza refuses cleanly.
        (200, "not json"),
        (200, "[]"),
        (200, r#"{"allowed_rooms":null}"#),
    ];
    for (status, body) in refusals {
        stub.answer(status, body);
        let started = Instant::now();
        let mut ht = Ht::open(&server, "/ws/", &[]).await;
        assert_eq!(
            ht.text().await,
            r#"{"is_authorized": false}"#,
            "{status} {body}"
        );
        assert_eq!(ht.close_code().await, Some(1000), "{status} {body}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{status} {body}"
        );
    }
    // An app that does not answer within api_timeout_ms (1 s here) is a refusal, not a hang.
    stub.answer_late(Duration::from_secs(10));
    let started = Instant::now();
    let mut ht = Ht::open(&server, "/ws/", &[]).await;
    assert_eq!(ht.text().await, r#"{"is_authorized": false}"#);
    assert_eq!(ht.close_code().await, Some(1000));
    assert!(started.elapsed() < Duration::from_secs(3));
    // An app that is not there at all.
    let gone = Server::start(&config("127.0.0.1:9".parse().unwrap(), ""));
    let mut ht = Ht::open(&gone, "/ws/", &[]).await;
    assert_eq!(ht.text().await, r#"{"is_authorized": false}"#);
    assert_eq!(ht.close_code().await, Some(1000));
}

#[tokio::test]
async fn h6_the_app_sees_the_browser_credentials() {
    let (app, stub) = start_stub().await;
    let server = Server::start(&config(
        app,
        "[[hightemplar.headers]]\nname = \"X-Session-Token\"\nquery = \"session_token\"\n\
         [[hightemplar.headers]]\nname = \"Referer\"\nvalue = \"https://app.example/\"\n",
    ));
    stub.answer(200, "{}");
    let mut ht = Ht::open(
        &server,
        "/ws/?token=T&session_token=S&other=1",
        &[
            ("cookie", "sessionid=a; csrftoken=C"),
            ("user-agent", "U"),
            ("x-real-ip", "10.9.8.7"),
            ("origin", "http://browser.example"),
            ("x-forwarded-for", "1.2.3.4"),
        ],
    )
    .await;
    ht.json().await;
    let (uri, headers) = stub.last_request();
    assert_eq!(uri, "/api/bootstrap/");
    let get = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(get("cookie").as_deref(), Some("sessionid=a; csrftoken=C"));
    assert_eq!(get("user-agent").as_deref(), Some("U"));
    assert_eq!(get("x-real-ip").as_deref(), Some("10.9.8.7"));
    assert_eq!(get("x-csrftoken").as_deref(), Some("C"));
    assert_eq!(get("authorization").as_deref(), Some("Token T"));
    assert_eq!(get("x-session-token").as_deref(), Some("S"));
    assert_eq!(get("referer").as_deref(), Some("https://app.example/"));
    // The client's Host, Origin and X-Forwarded-For are not forwarded.
    assert_eq!(get("host"), Some(app.to_string()));
    assert_eq!(get("origin"), None);
    assert_eq!(get("x-forwarded-for"), None);

    // Nothing to forward: none of those headers.
    let mut ht = Ht::open(&server, "/ws/", &[]).await;
    ht.json().await;
    let (_, headers) = stub.last_request();
    for name in [
        "cookie",
        "x-csrftoken",
        "authorization",
        "x-real-ip",
        "x-session-token",
    ] {
        assert!(headers.get(name).is_none(), "{name}");
    }
}

#[tokio::test]
async fn bootstrap_over_a_unix_socket() {
    let dir = common::temp_dir();
    let socket = dir.join("app.sock");
    let stub = Stub::default();
    stub.answer(200, r#"{"allowed_rooms":[{"target":"unix"}]}"#);
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let app = stub_router(&stub);
    tokio::spawn(async move { axum::serve(listener, app).await });
    let server = Server::start(&format!(
        "ping_interval_secs = 0\n[hightemplar]\napi_url = \"http://app.internal:8000/api/\"\n\
         api_socket = \"{}\"\n",
        socket.display()
    ));
    let mut ht = Ht::open(&server, "/ws/", &[]).await;
    assert_eq!(
        ht.text().await,
        r#"{"is_authorized": true, "allowed_rooms": [{"target": "unix"}]}"#
    );
    let (uri, headers) = stub.last_request();
    assert_eq!(uri, "/api/bootstrap/");
    assert_eq!(headers["host"], "app.internal:8000");
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------------------------
// Frames: H7–H14 and the frames that close the socket.

#[tokio::test]
async fn h7_to_h14_client_frames() {
    let (app, stub) = start_stub().await;
    let server = Server::start(&config(app, ""));
    stub.answer(
        200,
        r#"{"allowed_rooms":[{"target":"foo"},{"t":"x","a":"*","b":"*"},{"t":"m","c":"1"}]}"#,
    );
    let mut ht = Ht::connect(&server).await;
    // H7
    ht.send("ping").await;
    assert_eq!(ht.text().await, "pong");
    // H8 (also a binary ping, and PING): the connection's own id as requestId.
    ht.send("geen json").await;
    let error = ht.json().await;
    assert_eq!(error["code"], "error");
    assert_eq!(error["message"], "non-json-message");
    let connection_id = error["requestId"].as_str().unwrap().to_owned();
    assert_eq!(connection_id.len(), 36, "a uuid4: {connection_id}");
    ht.ws
        .send(Message::Binary(b"ping".to_vec().into()))
        .await
        .unwrap();
    assert_eq!(
        ht.text().await,
        format!(
            r#"{{"requestId": "{connection_id}", "code": "error", "message": "non-json-message"}}"#
        )
    );
    // H9
    for frame in [r#"{"type":"foobar"}"#, "{}", r#"{"type":null}"#] {
        assert_eq!(
            ht.request(serde_json::from_str(frame).unwrap()).await,
            format!(
                r#"{{"requestId": "{connection_id}", "code": "error", "message": "message-type-not-allowed"}}"#
            )
        );
    }
    // H10
    assert_eq!(
        ht.subscribe(json!({"target": "foo"}), json!("r1")).await,
        SUCCESS
    );
    // A binary subscribe is parsed like a text one.
    ht.ws
        .send(Message::Binary(
            json!({"type": "subscribe", "room": {"target": "foo"}, "requestId": "bin"})
                .to_string()
                .into_bytes()
                .into(),
        ))
        .await
        .unwrap();
    assert_eq!(ht.text().await, SUCCESS);
    // H11
    assert_eq!(
        ht.subscribe(json!({"target": "bar"}), json!("r2")).await,
        ROOM_NOT_FOUND
    );
    // H12
    assert_eq!(
        ht.request(json!({"type": "subscribe", "room": {"target": "foo"}}))
            .await,
        NO_REQUEST_ID
    );
    // H13
    assert_eq!(
        ht.subscribe(json!({"t": "x", "a": 1, "b": "*"}), json!("w1"))
            .await,
        SUCCESS
    );
    assert_eq!(
        ht.subscribe(json!({"b": "*", "a": "*", "t": "x"}), json!("w2"))
            .await,
        SUCCESS
    );
    assert_eq!(
        ht.subscribe(json!({"t": "x", "a": 1}), json!("w3")).await,
        ROOM_NOT_FOUND
    );
    // H14: types matter.
    assert_eq!(
        ht.subscribe(json!({"t": "m", "c": 1}), json!("n1")).await,
        ROOM_NOT_FOUND
    );
    assert_eq!(
        ht.subscribe(json!({"c": "1", "t": "m"}), json!("n2")).await,
        SUCCESS
    );
    // The socket is still fine.
    ht.send("ping").await;
    assert_eq!(ht.text().await, "pong");

    // JSON that is not an object, and a subscribe without an object room: closed with 1000,
    // no error frame (the reference's handler raises).
    for frame in [
        "[1]",
        "\"x\"",
        "3",
        "null",
        r#"{"type":"subscribe","requestId":1}"#,
        r#"{"type":"subscribe","room":"foo","requestId":1}"#,
    ] {
        let mut ht = Ht::connect(&server).await;
        ht.send(frame).await;
        assert_eq!(ht.close_code().await, Some(1000), "{frame}");
    }
}

// ---------------------------------------------------------------------------------------------
// Delivery: H15–H21, H23 through RabbitMQ, as django-binder publishes.

#[tokio::test]
async fn h15_to_h21_h23_h27_rabbitmq_triggers() {
    let (app, stub) = start_stub().await;
    stub.answer(
        200,
        r#"{"allowed_rooms":[{"target":"chat","customer":"*"},{"target":"chat","customer":"1"},{"room":"R"},{"room":"S"}]}"#,
    );
    let exchange = exchange("h15");
    let server = start_with_amqp(app, &exchange, "").await;
    let r = json!({"room": "R"});
    let mut a = Ht::connect(&server).await;
    let mut b = Ht::connect(&server).await;
    assert_eq!(a.subscribe(r.clone(), json!("A")).await, SUCCESS);
    assert_eq!(b.subscribe(r.clone(), json!("B")).await, SUCCESS);

    // H15 and H17: one frame each, with its own requestId, in Python's layout.
    trigger_amqp(&exchange, json!({"rooms": [r], "data": {"foo": "bar"}})).await;
    assert_eq!(
        a.text().await,
        r#"{"type": "publish", "data": {"foo": "bar"}, "requestId": "A"}"#
    );
    assert_eq!(
        b.text().await,
        r#"{"type": "publish", "data": {"foo": "bar"}, "requestId": "B"}"#
    );

    // H16: a room nobody subscribed to adds nothing; H19: a room listed twice gives two frames.
    trigger_amqp(
        &exchange,
        json!({"rooms": [r, {"room": "nobody"}], "data": "once", "requestId": "ignored"}),
    )
    .await;
    for (ht, id) in [(&mut a, "A"), (&mut b, "B")] {
        assert_eq!(
            ht.text().await,
            format!(r#"{{"type": "publish", "data": "once", "requestId": "{id}"}}"#)
        );
    }
    trigger_amqp(&exchange, json!({"rooms": [r, r], "data": [1, 2]})).await;
    for (ht, id) in [(&mut a, "A"), (&mut b, "B")] {
        for _ in 0..2 {
            assert_eq!(
                ht.text().await,
                format!(r#"{{"type": "publish", "data": [1, 2], "requestId": "{id}"}}"#)
            );
        }
    }

    // H20: an integer requestId comes back as an integer; two requestIds in one room, one
    // frame each.
    assert_eq!(b.subscribe(r.clone(), json!(42)).await, SUCCESS);
    trigger_amqp(&exchange, json!({"rooms": [{"room": "R"}], "data": 0})).await;
    let mut frames = vec![b.text().await, b.text().await];
    frames.sort();
    assert_eq!(
        frames,
        [
            r#"{"type": "publish", "data": 0, "requestId": "B"}"#,
            r#"{"type": "publish", "data": 0, "requestId": 42}"#
        ]
    );
    assert_eq!(
        a.text().await,
        r#"{"type": "publish", "data": 0, "requestId": "A"}"#
    );

    // H18: delivery is exact match only, both ways.
    let mut c = Ht::connect(&server).await;
    assert_eq!(
        c.subscribe(json!({"target": "chat", "customer": "*"}), json!("star"))
            .await,
        SUCCESS
    );
    trigger_amqp(
        &exchange,
        json!({"rooms": [{"target": "chat", "customer": "1"}], "data": 1}),
    )
    .await;
    c.silence(QUIET).await;
    let mut d = Ht::connect(&server).await;
    assert_eq!(
        d.subscribe(json!({"target": "chat", "customer": "1"}), json!("one"))
            .await,
        SUCCESS
    );
    trigger_amqp(
        &exchange,
        json!({"rooms": [{"target": "chat", "customer": "*"}], "data": 2}),
    )
    .await;
    assert_eq!(
        c.text().await,
        r#"{"type": "publish", "data": 2, "requestId": "star"}"#
    );
    d.silence(QUIET).await;

    // H21: no data, no rooms, not JSON, not an object: dropped; the server keeps running.
    publish(
        &exchange,
        "*",
        &[
            json!({"rooms": [r]}).to_string().into_bytes(),
            json!({"data": 1}).to_string().into_bytes(),
            b"not json".to_vec(),
            b"[1]".to_vec(),
            json!({"rooms": ["R"], "data": 1}).to_string().into_bytes(),
        ],
    )
    .await;
    // H27: another routing key is not delivered.
    publish(
        &exchange,
        "other",
        &[json!({"rooms": [r], "data": "wrong key"})
            .to_string()
            .into_bytes()],
    )
    .await;
    publish(
        &exchange,
        "",
        &[json!({"rooms": [r], "data": "empty key"})
            .to_string()
            .into_bytes()],
    )
    .await;
    a.silence(QUIET).await;
    trigger_amqp(&exchange, json!({"rooms": [r], "data": "still here"})).await;
    assert_eq!(
        a.text().await,
        r#"{"type": "publish", "data": "still here", "requestId": "A"}"#
    );

    // H23: after unsubscribing, nothing.
    assert_eq!(
        a.request(json!({"type": "unsubscribe", "requestId": "A"}))
            .await,
        SUCCESS
    );
    trigger_amqp(&exchange, json!({"rooms": [r], "data": "after"})).await;
    a.silence(QUIET).await;
    let status = a.status().await;
    assert!(
        status["rabbitmq_messages_received"].as_u64().unwrap() >= 13,
        "{status}"
    );
}

// ---------------------------------------------------------------------------------------------
// The HTTP trigger.

#[tokio::test]
async fn http_trigger_delivers_and_explains_bad_bodies() {
    let (app, stub) = start_stub().await;
    stub.answer(200, r#"{"allowed_rooms":[{"room":"R"}]}"#);
    let server = Server::start(&config(app, ""));
    let mut a = Ht::connect(&server).await;
    assert_eq!(
        a.subscribe(json!({"room": "R"}), json!("r1")).await,
        SUCCESS
    );
    let (status, body) = trigger_http(
        &server,
        json!({"rooms": [{"room": "R"}, {"room": "R"}], "data": {"é": "x"}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"rooms": 2})
    );
    for _ in 0..2 {
        assert_eq!(
            a.text().await,
            r#"{"type": "publish", "data": {"\u00e9": "x"}, "requestId": "r1"}"#
        );
    }
    for (body, reason) in [
        (json!({"data": 1}), "rooms not specified"),
        (json!({"rooms": []}), "data not specified"),
        (
            json!({"rooms": ["R"], "data": 1}),
            "rooms must be a list of objects",
        ),
        (json!([1]), "not a JSON object"),
    ] {
        let (status, text) = trigger_http(&server, body).await;
        assert_eq!(status, 400, "{text}");
        assert!(text.contains(reason), "{text}");
    }
    // The backend key is required.
    let (status, _) = http(
        server.backend,
        "POST",
        "/api/hightemplar/trigger",
        None,
        Some(r#"{"rooms":[],"data":1}"#),
    )
    .await;
    assert_eq!(status, 401);
    a.silence(Duration::from_millis(300)).await;

    // Without [hightemplar]: 404 with the reason, and no /ws/ endpoint.
    let plain = Server::start("ping_interval_secs = 0\n");
    let (status, text) = trigger_http(&plain, json!({"rooms": [], "data": 1})).await;
    assert_eq!(status, 404, "{text}");
    assert!(text.contains("[hightemplar]"), "{text}");
    let (status, _) = http(plain.public, "GET", "/ws/", None, None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn native_clients_cannot_reach_rooms() {
    let (app, stub) = start_stub().await;
    stub.answer(200, r#"{"allowed_rooms":[{"room":"R"}]}"#);
    let server = Server::start(&config(app, ""));
    let mut native = common::Client::connect(&server.ws_url()).await;
    let reply = native
        .request(
            "subscribe",
            json!({"channel": "\u{1}hightemplar\u{1}{\"room\":\"R\"}"}),
        )
        .await;
    assert!(reply.get("error").is_some(), "{reply}");
    let (status, body) = server
        .publish("\u{1}hightemplar\u{1}{\"room\":\"R\"}", json!(1))
        .await;
    assert_eq!(status, 400, "{body}");
}

// ---------------------------------------------------------------------------------------------
// Unsubscribe and status: H22, H24.

#[tokio::test]
async fn h22_unsubscribe() {
    let (app, stub) = start_stub().await;
    stub.answer(200, r#"{"allowed_rooms":[{"room":"R"},{"room":"S"}]}"#);
    let server = Server::start(&config(app, ""));
    let mut ht = Ht::connect(&server).await;
    assert_eq!(
        ht.subscribe(json!({"room": "R"}), json!("r1")).await,
        SUCCESS
    );
    let unsubscribe = json!({"type": "unsubscribe", "requestId": "r1", "room": {"ignored": 1}});
    assert_eq!(ht.request(unsubscribe.clone()).await, SUCCESS);
    assert_eq!(ht.request(unsubscribe).await, NOT_SUBSCRIBED);
    assert_eq!(
        ht.request(json!({"type": "unsubscribe", "requestId": "unknown"}))
            .await,
        NOT_SUBSCRIBED
    );
    assert_eq!(
        ht.request(json!({"type": "unsubscribe"})).await,
        NO_REQUEST_ID
    );
    // The same requestId in two rooms: one unsubscribe removes one of them.
    assert_eq!(ht.subscribe(json!({"room": "R"}), json!(7)).await, SUCCESS);
    assert_eq!(ht.subscribe(json!({"room": "S"}), json!(7)).await, SUCCESS);
    assert_eq!(ht.status().await["num_rooms"], 2);
    assert_eq!(
        ht.request(json!({"type": "unsubscribe", "requestId": 7}))
            .await,
        SUCCESS
    );
    assert_eq!(ht.status().await["num_rooms"], 1);
    // The same (requestId, room) twice: success twice, stored once.
    assert_eq!(ht.subscribe(json!({"room": "S"}), json!(7)).await, SUCCESS);
    assert_eq!(
        ht.request(json!({"type": "unsubscribe", "requestId": 7}))
            .await,
        SUCCESS
    );
    assert_eq!(
        ht.request(json!({"type": "unsubscribe", "requestId": 7}))
            .await,
        NOT_SUBSCRIBED
    );
    // A null requestId is a requestId.
    assert_eq!(
        ht.subscribe(json!({"room": "S"}), Value::Null).await,
        SUCCESS
    );
    assert_eq!(
        ht.request(json!({"type": "unsubscribe", "requestId": null}))
            .await,
        SUCCESS
    );
}

#[tokio::test]
async fn h24_status_counts_are_exact() {
    let (app, stub) = start_stub().await;
    stub.answer(200, r#"{"allowed_rooms":[{"room":"R"},{"room":"S"}]}"#);
    let server = Server::start(&config(app, ""));
    let mut a = Ht::connect(&server).await;
    let status = a.status().await;
    assert_eq!(status["open_connections"], 1, "{status}");
    assert_eq!(status["num_rooms"], 0);
    for key in [
        "online_since",
        "rabbitmq_messages_received",
        "ws_messages_received",
        "ws_messages_send",
        "ws_messages_send_error",
        "ws_messages_send_queued",
    ] {
        assert!(status.get(key).is_some(), "{key} missing: {status}");
    }
    let text = {
        a.send(r#"{"type":"status"}"#).await;
        a.text().await
    };
    assert!(
        text.starts_with(r#"{"open_connections": 1, "num_rooms": 0, "online_since": ""#),
        "{text}"
    );

    // test_open_connections: 1 → 2 → 1, with no sleeps: a closed socket is deregistered before
    // its close handshake completes.
    for _ in 0..5 {
        let b = Ht::connect(&server).await;
        assert_eq!(a.status().await["open_connections"], 2);
        b.close().await;
        assert_eq!(a.status().await["open_connections"], 1);
    }
    // A refused connection is never counted.
    stub.answer(403, "{}");
    let mut denied = Ht::open(&server, "/ws/", &[]).await;
    denied.text().await;
    assert_eq!(a.status().await["open_connections"], 1);
    stub.answer(200, r#"{"allowed_rooms":[{"room":"R"},{"room":"S"}]}"#);

    // test_room_autocloses_on_unsubscribe: 0 → 1 → 2 → 1 → 0.
    assert_eq!(a.subscribe(json!({"room": "R"}), json!("1")).await, SUCCESS);
    assert_eq!(a.status().await["num_rooms"], 1);
    assert_eq!(a.subscribe(json!({"room": "S"}), json!("2")).await, SUCCESS);
    assert_eq!(a.status().await["num_rooms"], 2);
    a.request(json!({"type": "unsubscribe", "requestId": "1"}))
        .await;
    assert_eq!(a.status().await["num_rooms"], 1);
    a.request(json!({"type": "unsubscribe", "requestId": "2"}))
        .await;
    assert_eq!(a.status().await["num_rooms"], 0);

    // test_room_doesnt_close_if_second_subscription: an unsubscribe without requestId (an
    // error) leaves the room.
    let mut b = Ht::connect(&server).await;
    a.subscribe(json!({"room": "R"}), json!("a")).await;
    b.subscribe(json!({"room": "R"}), json!("b")).await;
    assert_eq!(
        b.request(json!({"type": "unsubscribe"})).await,
        NO_REQUEST_ID
    );
    assert_eq!(a.status().await["num_rooms"], 1);

    // test_auto_close_hubs_on_disconnect: closing the subscribed sockets drops the room.
    b.close().await;
    let status = a.status().await;
    assert_eq!(status["num_rooms"], 1, "{status}");
    assert_eq!(status["open_connections"], 1);
    let mut c = Ht::connect(&server).await;
    c.subscribe(json!({"room": "S"}), json!("c")).await;
    assert_eq!(a.status().await["num_rooms"], 2);
    c.close().await;
    let status = a.status().await;
    assert_eq!(status["num_rooms"], 1, "{status}");
    assert_eq!(status["open_connections"], 1);
    a.request(json!({"type": "unsubscribe", "requestId": "a"}))
        .await;
    assert_eq!(a.status().await["num_rooms"], 0);
}

// ---------------------------------------------------------------------------------------------
// H25: test_load.

#[tokio::test]
async fn h25_load_1500_rooms() {
    const N: usize = 1500;
    let rooms: Vec<Value> = (0..N).map(|i| json!({"target": "load", "id": i})).collect();
    let (app, stub) = start_stub().await;
    stub.answer(200, &json!({"allowed_rooms": rooms}).to_string());
    let exchange = exchange("h25");
    let server = start_with_amqp(app, &exchange, "").await;
    let mut ht = Ht::connect(&server).await;
    for (i, room) in rooms.iter().enumerate() {
        assert_eq!(ht.subscribe(room.clone(), json!(i)).await, SUCCESS, "{i}");
    }
    assert_eq!(ht.status().await["num_rooms"], N);
    let bodies: Vec<Vec<u8>> = rooms
        .iter()
        .enumerate()
        .map(|(i, room)| json!({"rooms": [room], "data": i}).to_string().into_bytes())
        .collect();
    publish(&exchange, "*", &bodies).await;
    let mut seen = vec![false; N];
    for _ in 0..N {
        let frame = ht.json().await;
        assert_eq!(frame["type"], "publish");
        assert_eq!(frame["data"], frame["requestId"], "{frame}");
        let i = frame["data"].as_u64().unwrap() as usize;
        assert!(!seen[i], "twice: {i}");
        seen[i] = true;
    }
    ht.silence(Duration::from_millis(500)).await;
    ht.close().await;
    let mut other = Ht::connect(&server).await;
    let status = other.status().await;
    assert_eq!(status["num_rooms"], 0, "{status}");
    assert_eq!(status["open_connections"], 1, "{status}");
}

// ---------------------------------------------------------------------------------------------
// H26: two Plaza processes on one broker.

#[tokio::test]
async fn h26_two_nodes_one_broker() {
    let (app, stub) = start_stub().await;
    stub.answer(200, r#"{"allowed_rooms":[{"room":"R"}]}"#);
    let exchange = exchange("h26");
    let one = start_with_amqp(app, &exchange, "").await;
    let two = start_with_amqp(app, &exchange, "").await;
    let mut a = Ht::connect(&one).await;
    let mut b = Ht::connect(&two).await;
    assert_eq!(a.subscribe(json!({"room": "R"}), json!("a")).await, SUCCESS);
    assert_eq!(b.subscribe(json!({"room": "R"}), json!("b")).await, SUCCESS);
    trigger_amqp(&exchange, json!({"rooms": [{"room": "R"}], "data": "both"})).await;
    assert_eq!(
        a.text().await,
        r#"{"type": "publish", "data": "both", "requestId": "a"}"#
    );
    assert_eq!(
        b.text().await,
        r#"{"type": "publish", "data": "both", "requestId": "b"}"#
    );
    // Counts are per process.
    assert_eq!(a.status().await["open_connections"], 1);
    a.silence(Duration::from_millis(300)).await;
    b.silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn rabbitmq_down_then_back() {
    // The consumer keeps retrying while the broker is unreachable; the WebSocket side serves
    // meanwhile. Pointed at a closed port, it logs and retries.
    let (app, stub) = start_stub().await;
    stub.answer(200, r#"{"allowed_rooms":[{"room":"R"}]}"#);
    let server = Server::start(&config(
        app,
        "amqp_url = \"amqp://plaza:plaza@127.0.0.1:9/%2f\"\namqp_retry_max_secs = 1\n",
    ));
    wait_for_log(&server, "RabbitMQ unavailable").await;
    let mut ht = Ht::connect(&server).await;
    assert_eq!(
        ht.subscribe(json!({"room": "R"}), json!("r")).await,
        SUCCESS
    );
    // The HTTP trigger still works.
    let (status, _) = trigger_http(&server, json!({"rooms": [{"room": "R"}], "data": 1})).await;
    assert_eq!(status, 200);
    assert_eq!(
        ht.text().await,
        r#"{"type": "publish", "data": 1, "requestId": "r"}"#
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let retries = server
        .log()
        .iter()
        .filter(|l| l.contains("RabbitMQ unavailable"))
        .count();
    assert!(retries >= 2, "it retries: {retries}");
}

// ---------------------------------------------------------------------------------------------
// H28: the idle timeout (configured short here; 300 s by default).

#[tokio::test]
async fn h28_idle_timeout_ignores_protocol_pings() {
    let (app, stub) = start_stub().await;
    stub.answer(200, "{}");
    let server = Server::start(&config(app, "idle_timeout_secs = 2\n"));
    let mut idle = Ht::connect(&server).await;
    let mut active = Ht::connect(&server).await;
    let started = Instant::now();
    let mut code = None;
    // WebSocket pings every 300 ms do not keep `idle` open; text pings keep `active` open.
    while started.elapsed() < Duration::from_secs(6) {
        idle.ws
            .send(Message::Ping(b"x".to_vec().into()))
            .await
            .unwrap();
        active.send("ping").await;
        assert_eq!(active.text().await, "pong");
        match tokio::time::timeout(Duration::from_millis(300), idle.ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => {
                code = frame.map(|f| u16::from(f.code));
                break;
            }
            Ok(Some(Ok(_))) | Err(_) => {}
            Ok(other) => panic!("unexpected {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(code, Some(1000), "closed after {elapsed:?}");
    assert!(
        elapsed >= Duration::from_millis(1900) && elapsed < Duration::from_secs(4),
        "{elapsed:?}"
    );
    assert_eq!(active.status().await["open_connections"], 1);
}

#[tokio::test]
async fn config_errors_are_explained() {
    for (config, expected) in [
        ("[hightemplar]\n", "api_url is required"),
        (
            "[hightemplar]\napi_url = \"http://x/api\"\n",
            "must end with '/'",
        ),
        (
            "native_path = \"/ws\"\n[hightemplar]\napi_url = \"http://x/api/\"\n",
            "also in hightemplar.paths",
        ),
        (
            "[hightemplar]\napi_url = \"http://x/api/\"\nbogus = 1\n",
            "unknown field",
        ),
    ] {
        let err = common::check_config_error(config);
        assert!(err.contains(expected), "{config}: {err}");
    }
}
