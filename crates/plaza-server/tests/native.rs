//! End-to-end tests of the native WebSocket protocol against the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Client, KEY, Server, WAIT, http};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const CHAT_CONFIG: &str = r#"
[namespaces.chat]
client_publish = true
[namespaces.feed]
client_publish = false
"#;

#[tokio::test]
async fn subscribe_publish_deliver_unsubscribe() {
    let server = Server::start(CHAT_CONFIG);
    let mut a = Client::connect(&server.ws_url()).await;
    let mut b = Client::connect(&server.ws_url()).await;
    for c in [&mut a, &mut b] {
        let r = c.request("subscribe", json!({"channel": "news"})).await;
        assert_eq!(r["result"], json!({}), "{r}");
    }

    let (status, body) = server.publish("news", json!({"title": "one"})).await;
    assert_eq!((status, body.as_str()), (200, "{}"));
    for c in [&mut a, &mut b] {
        let p = c.next_push().await;
        assert_eq!(
            p,
            json!({"push": "publication", "channel": "news", "data": {"title": "one"}})
        );
    }

    let r = a.request("unsubscribe", json!({"channel": "news"})).await;
    assert_eq!(r["result"], json!({}));
    server.publish("news", json!(2)).await;
    assert_eq!(b.next_push().await["data"], json!(2));
    a.expect_silence(Duration::from_millis(300)).await;

    // Channels and info reflect the one remaining subscriber.
    let (status, body) = http(server.backend, "GET", "/api/channels", Some(KEY), None).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v,
        json!({"channels": [{"channel": "news", "subscribers": 1}]})
    );
    assert_eq!(server.metric("plaza_deliveries_total").await, 3);
}

#[tokio::test]
async fn publications_arrive_in_order_byte_for_byte() {
    let server = Server::start(CHAT_CONFIG);
    let mut sub = Client::connect(&server.ws_url()).await;
    sub.request("subscribe", json!({"channel": "chat:r1"}))
        .await;
    let mut publisher = Client::connect(&server.ws_url()).await;
    // Pipelined: every request sent before any reply is read.
    for i in 0..200 {
        publisher
            .send_text(format!(
                r#"{{"id":{i},"method":"publish","params":{{"channel":"chat:r1","data":{{"n": {i}, "s": "é\"x"}}}}}}"#
            ))
            .await;
    }
    for i in 0..200 {
        assert_eq!(publisher.reply_to(json!(i)).await["result"], json!({}));
    }
    // Pushes queued together share a text frame, one per line.
    let mut lines = Vec::new();
    while lines.len() < 200 {
        match tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut sub.ws))
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Text(t) => lines.extend(t.split('\n').map(str::to_owned)),
            other => panic!("{other:?}"),
        }
    }
    for (i, raw) in lines.iter().enumerate() {
        assert_eq!(
            *raw,
            format!(
                r#"{{"push":"publication","channel":"chat:r1","data":{{"n": {i}, "s": "é\"x"}}}}"#
            )
        );
    }
}

/// Frames queued together go out as one text message, one JSON object per line, and a payload
/// sent pretty-printed (raw line feeds between its tokens) still takes one line.
#[tokio::test]
async fn frames_queued_together_share_a_message_one_per_line() {
    let server = Server::start(CHAT_CONFIG);
    let mut c = Client::connect(&server.ws_url()).await;
    c.request("subscribe", json!({"channel": "chat:lines"}))
        .await;
    // All 50 publishes in one TCP write: the server reads and handles them in one go, so their
    // replies and pushes are queued before its writer runs.
    for i in 0..50 {
        let data = if i == 7 {
            "{\n  \"pretty\": [1,\n    2],\n  \"s\": \"a\\nb\"\n}".to_owned()
        } else {
            i.to_string()
        };
        let frame = format!(
            r#"{{"id":"p{i}","method":"publish","params":{{"channel":"chat:lines","data":{data}}}}}"#
        );
        c.ws.feed(Message::Text(frame.into())).await.unwrap();
    }
    c.ws.flush().await.unwrap();
    let (mut replies, mut pushes, mut most_in_one) = (0, Vec::new(), 0);
    while replies < 50 || pushes.len() < 50 {
        let raw = match tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut c.ws))
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Text(t) => t.to_string(),
            Message::Ping(_) => continue,
            other => panic!("{other:?}"),
        };
        let lines = common::split_frame(&raw);
        most_in_one = most_in_one.max(lines.len());
        for v in lines {
            if v.get("push").is_some() {
                pushes.push(v["data"].clone());
            } else {
                assert_eq!(v["result"], json!({}), "{v}");
                replies += 1;
            }
        }
    }
    assert!(most_in_one > 1, "every frame carried one object");
    assert_eq!(pushes[7], json!({"pretty": [1, 2], "s": "a\nb"}));
    for (i, data) in pushes.iter().enumerate().filter(|(i, _)| *i != 7) {
        assert_eq!(*data, json!(i));
    }
}

#[tokio::test]
async fn client_publish_follows_the_namespace() {
    let server = Server::start(CHAT_CONFIG);
    let mut c = Client::connect(&server.ws_url()).await;
    c.request("subscribe", json!({"channel": "chat:room"}))
        .await;
    let r = c
        .request("publish", json!({"channel": "chat:room", "data": "hi"}))
        .await;
    assert_eq!(r["result"], json!({}), "{r}");
    assert_eq!(c.next_push().await["data"], "hi");

    for forbidden in ["feed:x", "news"] {
        let r = c
            .request("publish", json!({"channel": forbidden, "data": 1}))
            .await;
        assert_eq!(r["error"]["code"], 107, "{r}");
    }
    // The backend may publish anywhere.
    c.request("subscribe", json!({"channel": "feed:x"})).await;
    assert_eq!(server.publish("feed:x", json!(5)).await.0, 200);
    assert_eq!(c.next_push().await["data"], 5);
    assert_eq!(
        server
            .metric("plaza_errors_total{kind=\"permission_denied\"}")
            .await,
        2
    );
}

/// Every bad input gets its documented answer, the error counter moves, and the server keeps
/// serving another connection throughout.
#[tokio::test]
async fn bad_input_is_answered_and_counted() {
    let server = Server::start(CHAT_CONFIG);
    let mut bystander = Client::connect(&server.ws_url()).await;
    bystander
        .request("subscribe", json!({"channel": "chat:ok"}))
        .await;

    let mut c = Client::open(&server.ws_url()).await;
    // A request before connect.
    let r = c.request("subscribe", json!({"channel": "a"})).await;
    assert_eq!(r["error"]["code"], 103, "{r}");
    // ping is allowed before connect.
    assert_eq!(c.request("ping", json!({})).await["result"], json!({}));
    assert!(
        c.request("connect", json!({}))
            .await
            .get("result")
            .is_some()
    );
    assert_eq!(c.request("connect", json!({})).await["error"]["code"], 104);

    let cases: Vec<(String, Value, u64)> = vec![
        ("{oops".into(), Value::Null, 101),
        ("[1,2,3]".into(), Value::Null, 101),
        ("42".into(), Value::Null, 101),
        (r#"{"method":"ping"}"#.into(), Value::Null, 101),
        (r#"{"id":{},"method":"ping"}"#.into(), Value::Null, 101),
        (r#"{"id":9,"method":"dance"}"#.into(), json!(9), 102),
        (r#"{"id":10}"#.into(), json!(10), 101),
        (r#"{"id":11,"method":"subscribe"}"#.into(), json!(11), 101),
        (
            r#"{"id":12,"method":"subscribe","params":{"channel":7}}"#.into(),
            json!(12),
            101,
        ),
        (
            r#"{"id":13,"method":"publish","params":{"channel":"chat:a"}}"#.into(),
            json!(13),
            101,
        ),
        (
            format!(
                r#"{{"id":14,"method":"subscribe","params":{{"channel":"{}"}}}}"#,
                "x".repeat(256)
            ),
            json!(14),
            105,
        ),
        (
            r#"{"id":15,"method":"subscribe","params":{"channel":"a b"}}"#.into(),
            json!(15),
            105,
        ),
        (
            r#"{"id":16,"method":"subscribe","params":{"channel":"nope:a"}}"#.into(),
            json!(16),
            106,
        ),
        (
            r#"{"id":17,"method":"publish","params":{"channel":"news","data":1}}"#.into(),
            json!(17),
            107,
        ),
        (
            r#"{"id":18,"method":"unsubscribe","params":{"channel":"news"}}"#.into(),
            json!(18),
            109,
        ),
    ];
    for (frame, id, code) in &cases {
        c.send_text(frame.clone()).await;
        let r = c.next_json().await;
        assert_eq!(&r["id"], id, "{frame} -> {r}");
        assert_eq!(r["error"]["code"], *code, "{frame} -> {r}");
        assert!(
            r["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    // Double subscribe.
    c.request("subscribe", json!({"channel": "chat:a"})).await;
    let r = c.request("subscribe", json!({"channel": "chat:a"})).await;
    assert_eq!(r["error"]["code"], 108);
    // A binary frame.
    c.ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    let r = c.next_json().await;
    assert_eq!(
        (r["id"].clone(), r["error"]["code"].clone()),
        (Value::Null, json!(111))
    );

    // The connection still works after all that.
    assert_eq!(c.request("ping", json!({})).await["result"], json!({}));
    assert_eq!(
        server
            .metric("plaza_errors_total{kind=\"bad_request\"}")
            .await,
        9
    );
    assert_eq!(
        server
            .metric("plaza_errors_total{kind=\"not_connected\"}")
            .await,
        1
    );
    assert_eq!(
        server
            .metric("plaza_errors_total{kind=\"binary_not_supported\"}")
            .await,
        1
    );

    // An oversize frame ends the connection with 3500 (do not reconnect).
    c.send_text(format!(
        r#"{{"id":99,"method":"publish","params":{{"channel":"chat:a","data":"{}"}}}}"#,
        "x".repeat(70 * 1024)
    ))
    .await;
    assert_eq!(c.close_code().await, Some(3500));
    assert_eq!(
        server
            .metric("plaza_disconnects_total{code=\"3500\",reason=\"message too large\"}")
            .await,
        1
    );

    // The bystander was served all along.
    server.publish("chat:ok", json!("still here")).await;
    assert_eq!(bystander.next_push().await["data"], "still here");
}

#[tokio::test]
async fn channel_limit_per_connection() {
    let server = Server::start("[limits]\nmax_channels_per_connection = 3\n");
    let mut c = Client::connect(&server.ws_url()).await;
    for i in 0..3 {
        let r = c
            .request("subscribe", json!({"channel": format!("c{i}")}))
            .await;
        assert_eq!(r["result"], json!({}));
    }
    let r = c.request("subscribe", json!({"channel": "c3"})).await;
    assert_eq!(r["error"]["code"], 110, "{r}");
    // Room again after an unsubscribe.
    c.request("unsubscribe", json!({"channel": "c0"})).await;
    let r = c.request("subscribe", json!({"channel": "c3"})).await;
    assert_eq!(r["result"], json!({}));
}

/// One client never reads; a hundred do. The hundred get everything, in order; the slow one is
/// closed with 3001 and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_cut_off_without_hurting_the_others() {
    let server = Server::start(
        "tcp_send_buffer_size = 4096\nping_interval_secs = 0\n[limits]\nmax_queue_bytes = 65536\n",
    );
    const READERS: usize = 100;
    const PUBLICATIONS: usize = 2000;

    // The slow client: small receive buffer, and it never reads until the end.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.public).await.unwrap();
    let (mut slow, _) = tokio_tungstenite::client_async(server.ws_url(), stream)
        .await
        .unwrap();
    slow.send(Message::Text(r#"{"id":1,"method":"connect"}"#.into()))
        .await
        .unwrap();
    slow.send(Message::Text(
        r#"{"id":2,"method":"subscribe","params":{"channel":"firehose"}}"#.into(),
    ))
    .await
    .unwrap();

    let mut readers = Vec::new();
    for _ in 0..READERS {
        let mut c = Client::connect(&server.ws_url()).await;
        c.request("subscribe", json!({"channel": "firehose"})).await;
        readers.push(c);
    }
    // Wait until the slow client's subscription is in place too.
    let deadline = std::time::Instant::now() + WAIT;
    while server.metric("plaza_subscriptions").await < (READERS + 1) as u64 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let tasks: Vec<_> = readers
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                for i in 0..PUBLICATIONS {
                    let p = c.next_push().await;
                    assert_eq!(p["data"]["n"], i);
                }
            })
        })
        .collect();

    // As soon as the server gives up on the slow client, it reads: what got through, then the
    // close frame with 3001. (The server tries to deliver the close frame for a few seconds.)
    let metrics_addr = server.backend;
    let slow_task = tokio::spawn(async move {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let (_, body) = http(metrics_addr, "GET", "/metrics", None, None).await;
            if body.contains("plaza_slow_consumers_total 1") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "slow client never cut off"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        common::read_close_code(&mut slow).await
    });

    let filler = "y".repeat(1000);
    for i in 0..PUBLICATIONS {
        let (status, _) = server
            .publish("firehose", json!({"n": i, "pad": filler}))
            .await;
        assert_eq!(status, 200);
    }
    for t in tasks {
        tokio::time::timeout(WAIT, t).await.unwrap().unwrap();
    }
    assert_eq!(server.metric("plaza_slow_consumers_total").await, 1);
    assert_eq!(
        server
            .metric("plaza_disconnects_total{code=\"3001\",reason=\"slow consumer\"}")
            .await,
        1
    );

    assert_eq!(slow_task.await.unwrap(), Some(3001));
}
