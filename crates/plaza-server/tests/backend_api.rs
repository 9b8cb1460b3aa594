//! The backend HTTP API against the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Client, KEY, Server, http};
use serde_json::{Value, json};

#[tokio::test]
async fn the_key_is_required_and_checked() {
    let server = Server::start("");
    let body = Some(r#"{"channel":"a","data":1}"#);
    for key in [None, Some("wrong"), Some("")] {
        let (status, text) = http(server.backend, "POST", "/api/publish", key, body).await;
        assert_eq!(status, 401, "{key:?}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["code"], 112);
    }
    // Both header forms work.
    let mut stream = tokio::net::TcpStream::connect(server.backend)
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!(
        "GET /api/info HTTP/1.1\r\nHost: x\r\nAuthorization: apikey {KEY}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(
        server
            .metric("plaza_api_requests_total{endpoint=\"/api/publish\",status=\"401\"}")
            .await,
        3
    );
    assert_eq!(
        server
            .metric("plaza_errors_total{kind=\"unauthorized\"}")
            .await,
        3
    );
    // Health and metrics need no key.
    assert_eq!(
        http(server.backend, "GET", "/healthz", None, None).await.0,
        200
    );
}

#[tokio::test]
async fn bad_requests_name_the_problem() {
    let server = Server::start("[limits]\nmax_api_body_size = 1024\nmax_broadcast_channels = 3\n");
    let cases: &[(&str, &str, u16, u64, &str)] = &[
        ("/api/publish", "{\"channel\":", 400, 101, "invalid JSON"),
        ("/api/publish", "[1]", 400, 101, "JSON object"),
        ("/api/publish", r#"{"data":1}"#, 400, 101, "channel"),
        ("/api/publish", r#"{"channel":"a"}"#, 400, 101, "data"),
        (
            "/api/publish",
            r#"{"channel":5,"data":1}"#,
            400,
            101,
            "invalid type",
        ),
        (
            "/api/publish",
            r#"{"channel":"","data":1}"#,
            400,
            105,
            "empty",
        ),
        (
            "/api/publish",
            r#"{"channel":"zz:a","data":1}"#,
            400,
            106,
            "zz",
        ),
        (
            "/api/broadcast",
            r#"{"channels":[],"data":1}"#,
            400,
            101,
            "1 to 3",
        ),
        (
            "/api/broadcast",
            r#"{"channels":["a","b","c","d"],"data":1}"#,
            400,
            110,
            "1 to 3",
        ),
        (
            "/api/broadcast",
            r#"{"channels":["a","b c"],"data":1}"#,
            400,
            105,
            "whitespace",
        ),
    ];
    for (path, body, status, code, needle) in cases {
        let (s, text) = http(server.backend, "POST", path, Some(KEY), Some(body)).await;
        assert_eq!(s, *status, "{path} {body}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["code"], *code, "{body}: {text}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{body}: {text}"
        );
    }
    let big = format!(r#"{{"channel":"a","data":"{}"}}"#, "x".repeat(2000));
    let (s, text) = http(
        server.backend,
        "POST",
        "/api/publish",
        Some(KEY),
        Some(&big),
    )
    .await;
    assert_eq!(s, 413, "{text}");
    assert!(text.contains("\"code\":110"), "{text}");
    let (s, text) = http(server.backend, "GET", "/api/nothing", Some(KEY), None).await;
    assert_eq!((s, text.contains("\"code\":102")), (404, true), "{text}");
    let (s, _) = http(server.backend, "GET", "/api/publish", Some(KEY), None).await;
    assert_eq!(s, 405);
    assert!(
        server
            .metric("plaza_errors_total{kind=\"bad_request\"}")
            .await
            >= 6
    );
}

#[tokio::test]
async fn broadcast_channels_and_info() {
    let server = Server::start("[namespaces.chat]\n");
    let mut c = Client::connect(&server.ws_url()).await;
    for ch in ["chat:a", "chat:b", "news"] {
        c.request("subscribe", json!({"channel": ch})).await;
    }
    let body = r#"{"channels":["chat:a","news","empty"],"data":{"k":[1]}}"#;
    let (s, text) = http(
        server.backend,
        "POST",
        "/api/broadcast",
        Some(KEY),
        Some(body),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap(),
        json!({"results": [{"channel": "chat:a"}, {"channel": "news"}, {"channel": "empty"}]})
    );
    let mut got: Vec<String> = Vec::new();
    for _ in 0..2 {
        let p = c.next_push().await;
        assert_eq!(p["data"], json!({"k": [1]}));
        got.push(p["channel"].as_str().unwrap().to_owned());
    }
    got.sort();
    assert_eq!(got, ["chat:a", "news"]);

    // A broadcast with one bad name sends nothing at all.
    let body = r#"{"channels":["news","bad name"],"data":2}"#;
    let (s, _) = http(
        server.backend,
        "POST",
        "/api/broadcast",
        Some(KEY),
        Some(body),
    )
    .await;
    assert_eq!(s, 400);
    c.expect_silence(std::time::Duration::from_millis(300))
        .await;

    let (_, text) = http(
        server.backend,
        "GET",
        "/api/channels?prefix=chat:",
        Some(KEY),
        None,
    )
    .await;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["channels"],
        json!([{"channel": "chat:a", "subscribers": 1}, {"channel": "chat:b", "subscribers": 1}])
    );
    let (_, text) = http(server.backend, "GET", "/api/info", Some(KEY), None).await;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["connections"], 1);
    assert_eq!(v["subscriptions"], 3);
    assert_eq!(v["channels"], 3);
    assert_eq!(v["broker"], "local");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(server.metric("plaza_publications_total").await, 3);
}
