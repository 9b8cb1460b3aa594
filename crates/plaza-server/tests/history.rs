//! Durable history and recovery against the real binary: kill -9 keeps every acknowledged
//! publication, and a resubscribe with `since` gets exactly what it missed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Client, KEY, Server, http};
use serde_json::{Value, json};

const CONFIG: &str = r#"
[namespaces.h]
history_size = 10000
client_publish = true
[namespaces.short]
history_size = 5
"#;

async fn history(server: &Server, query: &str) -> (u16, Value) {
    let (status, body) = http(
        server.backend,
        "GET",
        &format!("/api/history?{query}"),
        Some(KEY),
        None,
    )
    .await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_publishes_survive_kill_9() {
    let server = Server::start(CONFIG);
    // Backend publishes, each acknowledged with its offset.
    let mut epoch = None;
    for i in 1..=300u64 {
        let (status, body) = server.publish("h:log", json!({"i": i})).await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["offset"], i, "{v}");
        let e = v["epoch"].as_str().unwrap().to_owned();
        assert_eq!(epoch.get_or_insert(e.clone()), &e);
    }
    // Client publishes, pipelined on one connection: each reply is an acknowledgement with an
    // offset, and replies may come in any order (they are matched by id).
    let commits_before = server.metric("plaza_store_commits_total").await;
    let mut c = Client::connect(&server.ws_url()).await;
    for i in 301..=500u64 {
        c.send_text(
            json!({"id": i, "method": "publish", "params": {"channel": "h:log", "data": {"i": i}}})
                .to_string(),
        )
        .await;
    }
    let mut acked = std::collections::BTreeMap::new();
    while acked.len() < 200 {
        let r = c.next_json().await;
        acked.insert(
            r["id"].as_u64().unwrap(),
            r["result"]["offset"].as_u64().unwrap(),
        );
    }
    assert!(acked.iter().all(|(id, offset)| id == offset), "{acked:?}");
    // One connection's pipelined publishes share commits (group commit).
    let commits = server.metric("plaza_store_commits_total").await - commits_before;
    assert!(
        commits < 100,
        "{commits} commits for 200 pipelined publishes"
    );
    let epoch = epoch.unwrap();

    // No shutdown code runs.
    let dir = server.kill9();
    let server = Server::start_in(dir, CONFIG, &["--backend-key", KEY]);
    let (status, v) = history(&server, "channel=h:log&limit=1000").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["epoch"], epoch.as_str());
    assert_eq!(v["offset"], 500);
    assert_eq!(v["complete"], true);
    let publications = v["publications"].as_array().unwrap();
    assert_eq!(publications.len(), 500);
    for (i, p) in publications.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(p, &json!({"offset": n, "data": {"i": n}}));
    }
    // Offsets continue in the same epoch.
    let (_, body) = server.publish("h:log", json!("after")).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["epoch"].as_str(), v["offset"].as_u64()),
        (Some(epoch.as_str()), Some(501))
    );
}

#[tokio::test]
async fn resubscribe_with_since_gets_exactly_what_was_missed() {
    let server = Server::start(CONFIG);
    let mut a = Client::connect(&server.ws_url()).await;
    let r = a.request("subscribe", json!({"channel": "h:room"})).await;
    let epoch = r["result"]["epoch"].as_str().unwrap().to_owned();
    assert_eq!(r["result"]["offset"], 0, "{r}");
    assert!(r["result"].get("recovered").is_none(), "{r}");
    for i in 1..=3 {
        server.publish("h:room", json!(i)).await;
    }
    for i in 1..=3u64 {
        let p = a.next_push().await;
        assert_eq!(
            (p["offset"].as_u64(), p["epoch"].as_str()),
            (Some(i), Some(epoch.as_str()))
        );
    }
    drop(a);

    for i in 4..=8 {
        server.publish("h:room", json!(i)).await;
    }
    let mut a = Client::connect(&server.ws_url()).await;
    let r = a
        .request(
            "subscribe",
            json!({"channel": "h:room", "since": {"epoch": epoch, "offset": 3}}),
        )
        .await;
    assert_eq!(
        r["result"],
        json!({"epoch": epoch, "offset": 8, "recovered": true})
    );
    for i in 4..=8u64 {
        let p = a.next_push().await;
        assert_eq!((p["offset"].as_u64(), &p["data"]), (Some(i), &json!(i)));
    }
    server.publish("h:room", json!(9)).await;
    assert_eq!(a.next_push().await["offset"], 9);
    a.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn unrecoverable_gaps_say_recovered_false() {
    let server = Server::start(CONFIG);
    for i in 1..=10 {
        server.publish("short:x", json!(i)).await;
    }
    let (_, v) = history(&server, "channel=short:x").await;
    let epoch = v["epoch"].as_str().unwrap().to_owned();
    let mut c = Client::connect(&server.ws_url()).await;
    let cases = [
        // Trimmed: only offsets 6..10 are kept.
        json!({"epoch": epoch, "offset": 2}),
        // Another epoch (the stream was lost since).
        json!({"epoch": "not-this-one", "offset": 9}),
        // An offset from the future.
        json!({"epoch": epoch, "offset": 99}),
    ];
    for since in cases {
        let r = c
            .request("subscribe", json!({"channel": "short:x", "since": since}))
            .await;
        assert_eq!(
            r["result"],
            json!({"epoch": epoch, "offset": 10, "recovered": false}),
            "{since}"
        );
        c.expect_silence(Duration::from_millis(200)).await;
        c.request("unsubscribe", json!({"channel": "short:x"}))
            .await;
    }
    // A gap still in history is recovered.
    let r = c
        .request(
            "subscribe",
            json!({"channel": "short:x", "since": {"epoch": epoch, "offset": 7}}),
        )
        .await;
    assert_eq!(r["result"]["recovered"], true);
    for i in 8..=10 {
        assert_eq!(c.next_push().await["offset"], i);
    }
    // A channel without history cannot recover anything, and says so.
    let r = c
        .request(
            "subscribe",
            json!({"channel": "plain", "since": {"epoch": "e", "offset": 1}}),
        )
        .await;
    assert_eq!(r["result"], json!({"recovered": false}));
}

/// Publications keep flowing while a client resubscribes from an old position: it gets every
/// offset after that position exactly once, in order, across the seam between recovered and live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_gap_and_no_duplicate_at_the_seam() {
    let server = Server::start(CONFIG);
    let mut publisher = Client::connect(&server.ws_url()).await;
    const TOTAL: u64 = 600;
    let publishing = tokio::spawn(async move {
        for i in 1..=TOTAL {
            let r = publisher
                .request("publish", json!({"channel": "h:seam", "data": i}))
                .await;
            assert_eq!(r["result"]["offset"], i, "{r}");
        }
    });
    // Resubscribe from offset 0 while the publisher is (most likely) half way.
    tokio::time::sleep(Duration::from_millis(30)).await;
    let (_, v) = history(&server, "channel=h:seam&limit=1").await;
    let epoch = v["epoch"].as_str().unwrap().to_owned();
    let mut c = Client::connect(&server.ws_url()).await;
    let r = c
        .request(
            "subscribe",
            json!({"channel": "h:seam", "since": {"epoch": epoch, "offset": 0}}),
        )
        .await;
    assert_eq!(r["result"]["recovered"], true, "{r}");
    for expected in 1..=TOTAL {
        let p = c.next_push().await;
        assert_eq!(p["offset"], expected, "{p}");
        assert_eq!(p["data"], expected);
    }
    publishing.await.unwrap();
    c.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn idempotency_key_makes_a_retry_return_the_first_result() {
    let server = Server::start(CONFIG);
    let publish = |key: &'static str, data: i32| {
        let body = json!({"channel": "h:idem", "data": data, "idempotency_key": key}).to_string();
        let addr = server.backend;
        async move {
            let (status, text) = http(addr, "POST", "/api/publish", Some(KEY), Some(&body)).await;
            assert_eq!(status, 200, "{text}");
            serde_json::from_str::<Value>(&text).unwrap()
        }
    };
    let first = publish("order-17", 1).await;
    let retry = publish("order-17", 1).await;
    assert_eq!(first, retry);
    let other = publish("order-18", 2).await;
    assert_eq!(other["offset"], first["offset"].as_u64().unwrap() + 1);
    let (_, v) = history(&server, "channel=h:idem").await;
    assert_eq!(v["publications"].as_array().unwrap().len(), 2);

    let long_key = "k".repeat(300);
    let body = json!({"channel": "h:idem", "data": 1, "idempotency_key": long_key}).to_string();
    let (status, _) = http(
        server.backend,
        "POST",
        "/api/publish",
        Some(KEY),
        Some(&body),
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn history_api_pages_and_refuses_bad_queries() {
    let server = Server::start(CONFIG);
    for i in 1..=20 {
        server.publish("h:p", json!(i)).await;
    }
    let (_, v) = history(&server, "channel=h:p&limit=5").await;
    let offsets: Vec<u64> = v["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [16, 17, 18, 19, 20], "latest ones without since");
    let epoch = v["epoch"].as_str().unwrap().to_owned();
    let (_, v) = history(
        &server,
        &format!("channel=h:p&since=10&epoch={epoch}&limit=3"),
    )
    .await;
    let offsets: Vec<u64> = v["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [11, 12, 13]);
    assert_eq!(v["complete"], false, "limit cut it short");
    let (_, v) = history(&server, "channel=h:p&since=18").await;
    assert_eq!(v["publications"].as_array().unwrap().len(), 2);
    assert_eq!(v["complete"], true);

    for bad in [
        "limit=5",
        "channel=plain",
        "channel=h:p&limit=0",
        "channel=h:p&limit=100000",
        "channel=h:p&since=x",
        "channel=h:p&epoch=e",
        "channel=nope:p",
    ] {
        let (status, v) = history(&server, bad).await;
        assert_eq!(status, 400, "{bad}: {v}");
        assert!(v["error"]["message"].as_str().is_some(), "{bad}: {v}");
    }
}

/// Publications older than `history_ttl_secs` are trimmed in the background; offsets go on.
#[tokio::test]
async fn history_is_trimmed_by_age_in_the_background() {
    let server = Server::start("[namespaces.brief]\nhistory_size = 100\nhistory_ttl_secs = 1\n");
    for i in 1..=3 {
        server.publish("brief:x", json!(i)).await;
    }
    let (_, v) = history(&server, "channel=brief:x").await;
    assert_eq!(v["publications"].as_array().unwrap().len(), 3);
    // The maintenance timer runs every 5 s; allow two rounds.
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    loop {
        let (_, v) = history(&server, "channel=brief:x").await;
        if v["publications"].as_array().unwrap().is_empty() {
            assert_eq!(v["offset"], 3, "the top offset stays: {v}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not trimmed: {v}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (_, body) = server.publish("brief:x", json!(4)).await;
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["offset"], 4);
}
