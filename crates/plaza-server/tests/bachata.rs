//! Bachata against the real binary: the acceptance cases B1–B15 of the research notes (§4.2),
//! byte for byte, in reliable and simple mode; plus what the reference gets wrong (§3.7) and what
//! Plaza adds: several sockets per channel, kill -9, groups, token identity.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{KEY, Server, WAIT, Ws, http};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "an-hmac-secret-that-is-long-enough-0123456789";
const QUIET: Duration = Duration::from_millis(400);

fn config(mode: &str) -> String {
    format!(
        r#"
[auth]
hmac_secret = "{SECRET}"
[bachata]
allow_query_channel = true
mode = "{mode}"
[bachata.routes]
team = "group"
"#
    )
}

fn reliable() -> Server {
    Server::start(&config("reliable"))
}

fn url(server: &Server, query: &str) -> String {
    format!("ws://{}/messages{query}", server.public)
}

async fn open(server: &Server, query: &str) -> Ws {
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url(server, query)))
        .await
        .expect("ws connect timeout")
        .expect("ws connect");
    ws
}

/// Opens `?channel=<channel>` and reads the 1000.
async fn connect(server: &Server, channel: &str) -> Ws {
    let mut ws = open(server, &format!("?channel={channel}")).await;
    assert_eq!(next(&mut ws).await, r#"{"type": 1000}"#);
    ws
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
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

async fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.into())).await.expect("send");
}

async fn silence(ws: &mut Ws, quiet: Duration) {
    let deadline = Instant::now() + quiet;
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()),
        ws.next(),
    )
    .await
    {
        if !matches!(msg, Message::Ping(_) | Message::Pong(_)) {
            panic!("expected silence, got {msg:?}");
        }
    }
}

async fn close(mut ws: Ws) {
    let _ = ws.close(None).await;
    // Read until the server's close reply, so the server has seen the close.
    let _ = tokio::time::timeout(WAIT, async { while let Some(Ok(_)) = ws.next().await {} }).await;
}

/// What the example page sends (keys in this order: `json!` would sort them).
fn text(id: &str, dest: &str, data: &str) -> String {
    format!(r#"{{"id":"{id}","type":"text","dest":"{dest}","data":"{data}"}}"#)
}

/// What B receives for `text(id, dest, data)` from `from`.
fn delivered(id: &str, dest: &str, data: &str, from: &str) -> String {
    format!(
        r#"{{"id": "{id}", "type": "text", "dest": "{dest}", "data": "{data}", "from": "{from}"}}"#
    )
}

fn got_it(id: &str) -> String {
    format!(r#"{{"type": 100, "data": "{id}"}}"#)
}

fn receipt(id: &str) -> String {
    format!(r#"{{"type": 300, "data": "{id}"}}"#)
}

fn ack(id: &str) -> String {
    format!(r#"{{"type": 200, "data": "{id}"}}"#)
}

// ----- B1, B2, B3 -----

#[tokio::test]
async fn b1_b2_ready_then_ping_pong() {
    let server = reliable();
    let mut a = connect(&server, "A").await;
    send(&mut a, r#"{"type":1001}"#).await;
    assert_eq!(next(&mut a).await, r#"{"type": 1002}"#);
    // Extra fields are ignored.
    send(&mut a, r#"{"type": 1001, "data": "x"}"#).await;
    assert_eq!(next(&mut a).await, r#"{"type": 1002}"#);
}

/// The close frame of a refused connection, with no text frame before it.
async fn refused(ws: &mut Ws) -> (u16, String) {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("no close")
            .expect("stream ended without close")
            .expect("ws error");
        match msg {
            Message::Close(Some(frame)) => {
                return (u16::from(frame.code), frame.reason.to_string());
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a close, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn b3_no_channel_closes_1000_without_ready() {
    let server = reliable();
    let reason = "Error: not authorized for channel access".to_owned();
    for query in ["?channel=", "?channel=%20", "", "?token=not-a-token"] {
        let mut ws = open(&server, query).await;
        assert_eq!(refused(&mut ws).await, (1000, reason.clone()), "{query}");
    }
}

#[tokio::test]
async fn channel_from_token_only_where_the_query_is_not_trusted() {
    let server = Server::start(&format!(
        "[auth]\nhmac_secret = \"{SECRET}\"\n[bachata]\npath = \"/bachata\"\n"
    ));
    let reason = "Error: not authorized for channel access".to_owned();
    let open_at = |query: String| {
        let url = format!("ws://{}/bachata{query}", server.public);
        async move {
            tokio_tungstenite::connect_async(url)
                .await
                .expect("connect")
                .0
        }
    };
    let mut ws = open_at("?channel=A".into()).await;
    assert_eq!(refused(&mut ws).await, (1000, reason));
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let token = |user: &str| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &json!({"sub": user, "exp": exp}),
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let mut a = open_at(format!("?token={}&channel=B", token("A"))).await;
    assert_eq!(next(&mut a).await, r#"{"type": 1000}"#);
    let mut b = open_at(format!("?token={}", token("B"))).await;
    assert_eq!(next(&mut b).await, r#"{"type": 1000}"#);
    // `from` is the token's user whatever the message says.
    send(&mut a, r#"{"id":"t1","type":"text","dest":"B","from":"Z"}"#).await;
    assert_eq!(next(&mut a).await, got_it("t1"));
    assert_eq!(
        next(&mut b).await,
        r#"{"id": "t1", "type": "text", "dest": "B", "from": "A"}"#
    );
}

// ----- B4, B5, B6 -----

#[tokio::test]
async fn b4_b5_b6_direct_message_ack_and_receipt() {
    let server = reliable();
    let mut a = connect(&server, "A").await;
    let mut b = connect(&server, "B").await;
    send(&mut a, &text("m1", "B", "hi")).await;
    assert_eq!(next(&mut a).await, got_it("m1"));
    assert_eq!(next(&mut b).await, delivered("m1", "B", "hi", "A"));
    send(&mut b, &ack("m1")).await;
    assert_eq!(next(&mut a).await, receipt("m1"));
    // B6: a duplicate 200 and a 200 for an unknown id do nothing.
    send(&mut b, &ack("m1")).await;
    send(&mut b, &ack("nope")).await;
    silence(&mut a, QUIET).await;
    silence(&mut b, QUIET).await;
    // B5's "no keys remain": m1 is settled, so a new socket of B is not sent it again, and A's
    // 300 was acknowledged when written.
    close(b).await;
    close(a).await;
    let mut b = connect(&server, "B").await;
    let mut a = connect(&server, "A").await;
    silence(&mut b, QUIET).await;
    silence(&mut a, QUIET).await;
}

#[tokio::test]
async fn b4_spoofed_from_is_overwritten_and_key_order_kept() {
    let server = reliable();
    let mut a = connect(&server, "A").await;
    let mut b = connect(&server, "B").await;
    send(
        &mut a,
        r#"{"data": {"x": [1, 2.5, null]}, "from": "mallory", "id": "m9", "type": "text", "dest": "B", "time": 12, "sign": "s", "ü": "é😀</"}"#,
    )
    .await;
    assert_eq!(next(&mut a).await, got_it("m9"));
    assert_eq!(
        next(&mut b).await,
        r#"{"data": {"x": [1, 2.5, null]}, "from": "A", "id": "m9", "type": "text", "dest": "B", "time": 12, "sign": "s", "\u00fc": "\u00e9\ud83d\ude00</"}"#
    );
}

// ----- B7, B8, B9 -----

#[tokio::test]
async fn b7_offline_receiver_gets_it_after_its_1000() {
    let server = reliable();
    let mut a = connect(&server, "A").await;
    // B has never connected.
    send(&mut a, &text("m2", "B", "later")).await;
    assert_eq!(next(&mut a).await, got_it("m2"));
    let mut b = connect(&server, "B").await;
    assert_eq!(next(&mut b).await, delivered("m2", "B", "later", "A"));
    send(&mut b, &ack("m2")).await;
    assert_eq!(next(&mut a).await, receipt("m2"));
}

#[tokio::test]
async fn b8_unacked_comes_again_first_after_reconnect() {
    let server = reliable();
    let mut a = connect(&server, "A").await;
    let mut b = connect(&server, "B").await;
    send(&mut a, &text("m3", "B", "one")).await;
    assert_eq!(next(&mut a).await, got_it("m3"));
    assert_eq!(next(&mut b).await, delivered("m3", "B", "one", "A"));
    close(b).await;
    send(&mut a, &text("m4", "B", "two")).await;
    assert_eq!(next(&mut a).await, got_it("m4"));
    let mut b = connect(&server, "B").await;
    assert_eq!(next(&mut b).await, delivered("m3", "B", "one", "A"));
    assert_eq!(next(&mut b).await, delivered("m4", "B", "two", "A"));
    send(&mut b, &ack("m3")).await;
    assert_eq!(next(&mut a).await, receipt("m3"));
    send(&mut b, &ack("m4")).await;
    assert_eq!(next(&mut a).await, receipt("m4"));
}

#[tokio::test]
async fn b9_offline_sender_gets_its_300_at_next_connect() {
    let server = reliable();
    let mut a = connect(&server, "A").await;
    let mut b = connect(&server, "B").await;
    send(&mut a, &text("m5", "B", "x")).await;
    assert_eq!(next(&mut a).await, got_it("m5"));
    close(a).await;
    assert_eq!(next(&mut b).await, delivered("m5", "B", "x", "A"));
    send(&mut b, &ack("m5")).await;
    silence(&mut b, QUIET).await;
    let mut a = connect(&server, "A").await;
    assert_eq!(next(&mut a).await, receipt("m5"));
    // Written once, the 300 is settled (its acknowledgement is stored just after the write).
    silence(&mut a, QUIET).await;
    close(a).await;
    let mut a = connect(&server, "A").await;
    silence(&mut a, QUIET).await;
}

// ----- B10 to B14 -----

#[tokio::test]
async fn b10_b11_b13_bad_and_undeliverable_messages() {
    let server = reliable();
    let mut a = connect(&server, "A").await;
    let mut b = connect(&server, "B").await;
    let errors_before = server
        .metric("plaza_errors_total{kind=\"bad_request\"}")
        .await;
    // B10: no id, no type, not JSON, not an object, a null type: no 100, no delivery.
    for bad in [
        r#"{"type":"text","dest":"B","data":"x"}"#,
        r#"{"id":"q1","dest":"B","data":"x"}"#,
        "not json",
        "[1]",
        r#"{"id":"q2","type":null,"dest":"B"}"#,
    ] {
        send(&mut a, bad).await;
    }
    a.send(Message::Binary(b"{\"id\":\"q3\"}".to_vec().into()))
        .await
        .unwrap();
    // B13: client-sent 100, 300, 1002 are ignored.
    for t in [100, 300, 1002] {
        send(&mut a, &format!(r#"{{"type":{t},"data":"m1"}}"#)).await;
    }
    // B11: an id but no dest (or a dest that is not a string): a 100, no delivery.
    send(&mut a, r#"{"id":"n1","type":"text","data":"x"}"#).await;
    assert_eq!(next(&mut a).await, got_it("n1"));
    send(&mut a, r#"{"id":"n2","type":"text","dest":5}"#).await;
    assert_eq!(next(&mut a).await, got_it("n2"));
    // The connection is still open and works.
    send(&mut a, &text("ok", "B", "y")).await;
    assert_eq!(next(&mut a).await, got_it("ok"));
    assert_eq!(next(&mut b).await, delivered("ok", "B", "y", "A"));
    silence(&mut a, QUIET).await;
    silence(&mut b, QUIET).await;
    // Beyond the reference: each refused frame is counted (and logged).
    let errors = server
        .metric("plaza_errors_total{kind=\"bad_request\"}")
        .await;
    assert_eq!(errors - errors_before, 6);
}

#[tokio::test]
async fn b12_unknown_integer_types_are_data() {
    let server = reliable();
    let mut a = connect(&server, "A").await;
    let mut b = connect(&server, "B").await;
    send(&mut a, r#"{"id":"i7","type":7,"dest":"B"}"#).await;
    assert_eq!(next(&mut a).await, got_it("i7"));
    assert_eq!(
        next(&mut b).await,
        r#"{"id": "i7", "type": 7, "dest": "B", "from": "A"}"#
    );
    send(&mut a, r#"{"id":"i1000","type":1000,"dest":"B"}"#).await;
    assert_eq!(next(&mut a).await, got_it("i1000"));
    assert_eq!(
        next(&mut b).await,
        r#"{"id": "i1000", "type": 1000, "dest": "B", "from": "A"}"#
    );
    // An integer id is echoed as sent.
    send(&mut a, r#"{"id":42,"type":"text","dest":"B"}"#).await;
    assert_eq!(next(&mut a).await, r#"{"type": 100, "data": 42}"#);
    assert_eq!(
        next(&mut b).await,
        r#"{"id": 42, "type": "text", "dest": "B", "from": "A"}"#
    );
    send(&mut b, r#"{"type":200,"data":42}"#).await;
    assert_eq!(next(&mut a).await, receipt("42"));
}

#[tokio::test]
async fn b14_own_channel_gets_100_then_the_message() {
    let server = reliable();
    let mut a = connect(&server, "A").await;
    for i in 0..5 {
        let id = format!("self{i}");
        send(&mut a, &text(&id, "A", "me")).await;
        assert_eq!(next(&mut a).await, got_it(&id));
        assert_eq!(next(&mut a).await, delivered(&id, "A", "me", "A"));
    }
}

// ----- B15: simple mode -----

#[tokio::test]
async fn b15_simple_mode_same_frames_and_no_300() {
    let server = Server::start(&config("simple"));
    let mut a = connect(&server, "A").await;
    let mut b = connect(&server, "B").await;
    // B4
    send(&mut a, &text("m1", "B", "hi")).await;
    assert_eq!(next(&mut a).await, got_it("m1"));
    assert_eq!(next(&mut b).await, delivered("m1", "B", "hi", "A"));
    // A 200 never produces a 300.
    send(&mut b, &ack("m1")).await;
    silence(&mut a, QUIET).await;
    // B7: nothing lost while B is offline.
    close(b).await;
    send(&mut a, &text("m2", "B", "later")).await;
    assert_eq!(next(&mut a).await, got_it("m2"));
    let mut b = connect(&server, "B").await;
    assert_eq!(next(&mut b).await, delivered("m2", "B", "later", "A"));
    // Written is delivered: not sent again, even without a 200.
    silence(&mut b, QUIET).await;
    close(b).await;
    let mut b = connect(&server, "B").await;
    silence(&mut b, QUIET).await;
    silence(&mut a, QUIET).await;
}

// ----- beyond the reference -----

/// §3.7: the reference's stale close sentinel. B closes while its backlog is being sent, comes
/// back, and a new message must still reach it.
#[tokio::test]
async fn close_during_backlog_then_new_message_is_delivered() {
    let server = reliable();
    let mut a = connect(&server, "A").await;
    for i in 0..300 {
        send(&mut a, &text(&format!("s{i}"), "B", "x")).await;
    }
    for i in 0..300 {
        assert_eq!(next(&mut a).await, got_it(&format!("s{i}")));
    }
    let mut b = connect(&server, "B").await;
    assert_eq!(next(&mut b).await, delivered("s0", "B", "x", "A"));
    drop(b); // gone mid-backlog, no close handshake
    let mut b = connect(&server, "B").await;
    send(&mut a, &text("new", "B", "fresh")).await;
    assert_eq!(next(&mut a).await, got_it("new"));
    // The whole backlog again (nothing was acknowledged), in order, then the new one.
    for i in 0..300 {
        assert_eq!(
            next(&mut b).await,
            delivered(&format!("s{i}"), "B", "x", "A")
        );
    }
    assert_eq!(next(&mut b).await, delivered("new", "B", "fresh", "A"));
    // And a socket that closed cleanly during a backlog changes nothing either.
    close(b).await;
    let mut b = connect(&server, "B").await;
    assert_eq!(next(&mut b).await, delivered("s0", "B", "x", "A"));
}

/// Unlike the reference's competing consumers, every socket of a channel receives, and one ack
/// settles the message for all.
#[tokio::test]
async fn several_sockets_on_one_channel_all_receive() {
    let server = reliable();
    let mut a = connect(&server, "A").await;
    let mut b1 = connect(&server, "B").await;
    let mut b2 = connect(&server, "B").await;
    send(&mut a, &text("m1", "B", "both")).await;
    assert_eq!(next(&mut a).await, got_it("m1"));
    assert_eq!(next(&mut b1).await, delivered("m1", "B", "both", "A"));
    assert_eq!(next(&mut b2).await, delivered("m1", "B", "both", "A"));
    send(&mut b2, &ack("m1")).await;
    assert_eq!(next(&mut a).await, receipt("m1"));
    send(&mut b1, &ack("m1")).await;
    silence(&mut a, QUIET).await;
    let mut b3 = connect(&server, "B").await;
    silence(&mut b3, QUIET).await;
}

#[tokio::test]
async fn a_retried_send_is_stored_once() {
    let server = reliable();
    let mut a = connect(&server, "A").await;
    let mut b = connect(&server, "B").await;
    send(&mut a, &text("r1", "B", "once")).await;
    send(&mut a, &text("r1", "B", "once")).await;
    assert_eq!(next(&mut a).await, got_it("r1"));
    assert_eq!(next(&mut a).await, got_it("r1"));
    assert_eq!(next(&mut b).await, delivered("r1", "B", "once", "A"));
    silence(&mut b, QUIET).await;
}

#[tokio::test]
async fn group_route_reaches_every_member_but_the_sender() {
    let server = reliable();
    let body = json!({"group": "team", "members": ["A", "B", "C"]}).to_string();
    let (status, reply) = http(
        server.backend,
        "POST",
        "/api/chat/groups",
        Some(KEY),
        Some(&body),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let mut a = connect(&server, "A").await;
    let mut b = connect(&server, "B").await;
    send(
        &mut a,
        r#"{"id":"g1","type":"team","dest":"team","data":"all"}"#,
    )
    .await;
    assert_eq!(next(&mut a).await, got_it("g1"));
    let frame = r#"{"id": "g1", "type": "team", "dest": "team", "data": "all", "from": "A"}"#;
    assert_eq!(next(&mut b).await, frame);
    let mut c = connect(&server, "C").await;
    assert_eq!(next(&mut c).await, frame);
    send(&mut b, &ack("g1")).await;
    assert_eq!(next(&mut a).await, receipt("g1"));
    send(&mut c, &ack("g1")).await;
    assert_eq!(next(&mut a).await, receipt("g1"));
    // Not a member: a 100 (as the reference gives one), no delivery.
    let mut d = connect(&server, "D").await;
    send(&mut d, r#"{"id":"g2","type":"team","dest":"team"}"#).await;
    assert_eq!(next(&mut d).await, got_it("g2"));
    silence(&mut b, QUIET).await;
}

#[tokio::test]
async fn native_chat_messages_reach_bachata_wrapped() {
    let server = reliable();
    let mut b = connect(&server, "B").await;
    let body =
        json!({"from": "carol", "user": "B", "id": "n1", "data": {"text": "yo"}}).to_string();
    let (status, reply) = http(
        server.backend,
        "POST",
        "/api/chat/send",
        Some(KEY),
        Some(&body),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let frame = next(&mut b).await;
    let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
    assert!(
        frame.starts_with(r#"{"id": "n1", "type": "message", "from": "carol", "dest": "B", "data": {"text": "yo"}, "time": "#),
        "{frame}"
    );
    assert!(v["time"].is_u64());
}

/// Crash test: A gets its 100, the server is killed (-9) and restarted on the same data, B
/// connects and receives the message, and B's 200 gives A its 300.
#[tokio::test]
async fn kill9_after_100_loses_nothing() {
    let server = reliable();
    let mut a = connect(&server, "A").await;
    send(&mut a, &text("k1", "B", "durable")).await;
    assert_eq!(next(&mut a).await, got_it("k1"));
    let dir = server.kill9();
    let server = Server::start_in(dir, &config("reliable"), &["--backend-key", KEY]);
    let mut a = connect(&server, "A").await;
    let mut b = connect(&server, "B").await;
    assert_eq!(next(&mut b).await, delivered("k1", "B", "durable", "A"));
    send(&mut b, &ack("k1")).await;
    assert_eq!(next(&mut a).await, receipt("k1"));
}

#[test]
fn config_is_checked() {
    let err = common::check_config_error("[bachata]\nmode = \"sometimes\"\n");
    assert!(err.contains("mode"), "{err}");
    let err = common::check_config_error("[bachata]\npath = \"/plaza/ws\"\n");
    assert!(err.contains("already used"), "{err}");
    let err = common::check_config_error("[chat]\nenabled = false\n[bachata]\n");
    assert!(err.contains("chat.enabled"), "{err}");
}
