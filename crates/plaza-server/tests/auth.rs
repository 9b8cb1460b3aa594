//! Authentication and authorisation against the real binary: tokens the app signs, the app asked
//! over HTTP (a real HTTP server started by the test), namespace policies, disconnect, presence.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::{Client, KEY, Server, WAIT, http};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "an-hmac-secret-that-is-long-enough-0123456789";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn token_config(extra: &str) -> String {
    format!(
        r#"
[auth]
hmac_secret = "{SECRET}"
[namespaces.dm]
subscribe = "user"
[namespaces.secret]
subscribe = "token"
[namespaces.room]
presence = true
join_leave = true
{extra}"#
    )
}

async fn connect_with(server: &Server, params: Value) -> (Client, Value) {
    let mut c = Client::open(&server.ws_url()).await;
    let reply = c.request("connect", params).await;
    (c, reply)
}

/// Every bad token is refused with 112 and the connection is closed with 3502; none gets in.
#[tokio::test]
async fn tokens_are_checked_and_bad_ones_refused() {
    let server = Server::start(&token_config(""));
    let good = sign(json!({"sub": "42", "exp": now() + 60}), SECRET);
    let (mut c, r) = connect_with(&server, json!({"token": good})).await;
    assert_eq!(r["result"]["user"], "42", "{r}");
    assert_eq!(c.request("ping", json!({})).await["result"], json!({}));

    let header_none =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let body = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!(r#"{{"sub":"42","exp":{}}}"#, now() + 60));
    let bad_tokens = [
        (
            "expired",
            sign(json!({"sub": "42", "exp": now() - 100}), SECRET),
        ),
        (
            "not yet valid",
            sign(json!({"sub": "42", "nbf": now() + 100}), SECRET),
        ),
        (
            "wrong key",
            sign(
                json!({"sub": "42", "exp": now() + 60}),
                "another-secret-that-is-long-enough-000000",
            ),
        ),
        ("malformed", "not.a.token".to_owned()),
        ("garbage", "x".to_owned()),
        ("alg none", format!("{header_none}.{body}.")),
        ("no subject", sign(json!({"exp": now() + 60}), SECRET)),
    ];
    for (what, token) in bad_tokens {
        let (mut c, r) = connect_with(&server, json!({"token": token})).await;
        assert_eq!(r["error"]["code"], 112, "{what}: {r}");
        assert_eq!(c.close_code().await, Some(3502), "{what}");
    }
    // Anonymous connections are off once a key is configured.
    let (mut c, r) = connect_with(&server, json!({})).await;
    assert_eq!(r["error"]["code"], 112, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("anonymous")
    );
    assert_eq!(c.close_code().await, Some(3502));
    assert_eq!(
        server
            .metric("plaza_errors_total{kind=\"unauthorized\"}")
            .await,
        8
    );
}

#[tokio::test]
async fn token_channels_user_channels_and_subscription_tokens() {
    let server = Server::start(&token_config(""));
    // The `channels` claim subscribes on connect.
    let token = sign(
        json!({"sub": "42", "exp": now() + 60, "channels": ["news"]}),
        SECRET,
    );
    let (mut c42, r) = connect_with(&server, json!({"token": token})).await;
    assert_eq!(r["result"]["channels"], json!(["news"]), "{r}");
    server.publish("news", json!("hello 42")).await;
    assert_eq!(c42.next_push().await["data"], "hello 42");

    // User-limited channels: only the users named after '#'.
    let r = c42
        .request("subscribe", json!({"channel": "dm:talk#42,57"}))
        .await;
    assert_eq!(r["result"], json!({}), "{r}");
    let token7 = sign(json!({"sub": "7", "exp": now() + 60}), SECRET);
    let (mut c7, _) = connect_with(&server, json!({"token": token7})).await;
    let r = c7
        .request("subscribe", json!({"channel": "dm:talk#42,57"}))
        .await;
    assert_eq!(r["error"]["code"], 107, "{r}");
    let r = c7
        .request("subscribe", json!({"channel": "dm:nobody"}))
        .await;
    assert_eq!(r["error"]["code"], 107, "{r}");

    // Token policy: a subscription token for that channel and that user.
    let r = c42
        .request("subscribe", json!({"channel": "secret:x"}))
        .await;
    assert_eq!(r["error"]["code"], 107, "no token: {r}");
    let for_other_channel = sign(
        json!({"sub": "42", "channel": "secret:y", "exp": now() + 60}),
        SECRET,
    );
    let r = c42
        .request(
            "subscribe",
            json!({"channel": "secret:x", "token": for_other_channel}),
        )
        .await;
    assert_eq!(r["error"]["code"], 107, "other channel: {r}");
    let for_other_user = sign(
        json!({"sub": "7", "channel": "secret:x", "exp": now() + 60}),
        SECRET,
    );
    let r = c42
        .request(
            "subscribe",
            json!({"channel": "secret:x", "token": for_other_user}),
        )
        .await;
    assert_eq!(r["error"]["code"], 107, "other user: {r}");
    // The CLI signs a valid one with the same config.
    let config = server.dir.join("plaza.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_plaza"))
        .args([
            "gen-token",
            "--user",
            "42",
            "--subscribe",
            "secret:x",
            "--config",
        ])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let r = c42
        .request("subscribe", json!({"channel": "secret:x", "token": token}))
        .await;
    assert_eq!(r["result"], json!({}), "{r}");
}

#[tokio::test]
async fn gen_token_connects_and_backend_disconnects_a_user() {
    let server = Server::start(&token_config(""));
    let config = server.dir.join("plaza.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_plaza"))
        .args(["gen-token", "--user", "alice", "--ttl", "60", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let (mut a1, r) = connect_with(&server, json!({"token": token})).await;
    assert_eq!(r["result"]["user"], "alice");
    let (mut a2, _) = connect_with(&server, json!({"token": token})).await;
    let bob = sign(json!({"sub": "bob", "exp": now() + 60}), SECRET);
    let (mut b, _) = connect_with(&server, json!({"token": bob})).await;

    let (status, body) = http(
        server.backend,
        "POST",
        "/api/disconnect",
        Some(KEY),
        Some(r#"{"user":"alice"}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"disconnected": 2})
    );
    assert_eq!(a1.close_code().await, Some(3503));
    assert_eq!(a2.close_code().await, Some(3503));
    assert_eq!(b.request("ping", json!({})).await["result"], json!({}));

    // Without a secret, gen-token says why.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_plaza"))
        .args(["gen-token", "--user", "x"])
        .env_remove("PLAZA_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("hmac_secret"));
}

/// Two users, three connections: a user joins once and leaves with its last connection.
#[tokio::test]
async fn presence_counts_users_and_pushes_join_and_leave() {
    let server = Server::start(&token_config(""));
    let tok = |user: &str| json!({"token": sign(json!({"sub": user, "exp": now() + 60, "info": {"name": user.to_uppercase()}}), SECRET)});
    let (mut watcher, _) = connect_with(&server, tok("watcher")).await;
    watcher
        .request("subscribe", json!({"channel": "room:1"}))
        .await;

    let (mut alice1, _) = connect_with(&server, tok("alice")).await;
    alice1
        .request("subscribe", json!({"channel": "room:1"}))
        .await;
    let join = watcher.next_json().await;
    assert_eq!(join["push"], "join", "{join}");
    assert_eq!(join["info"]["user"], "alice");
    assert_eq!(join["info"]["info"], json!({"name": "ALICE"}));

    let (mut alice2, _) = connect_with(&server, tok("alice")).await;
    alice2
        .request("subscribe", json!({"channel": "room:1"}))
        .await;
    let (mut bob, _) = connect_with(&server, tok("bob")).await;
    bob.request("subscribe", json!({"channel": "room:1"})).await;
    // Alice's second connection made no join; Bob's did.
    let join = watcher.next_json().await;
    assert_eq!(
        (join["push"].as_str(), join["info"]["user"].as_str()),
        (Some("join"), Some("bob"))
    );

    let r = watcher
        .request("presence_stats", json!({"channel": "room:1"}))
        .await;
    assert_eq!(r["result"], json!({"num_clients": 4, "num_users": 3}));
    let r = bob.request("presence", json!({"channel": "room:1"})).await;
    let users: Vec<&str> = r["result"]["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["user"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["watcher", "alice", "alice", "bob"]);
    let (status, body) = http(
        server.backend,
        "GET",
        "/api/presence_stats?channel=room:1",
        Some(KEY),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["num_users"],
        3
    );

    // One of Alice's connections goes: no leave. The other goes: leave.
    drop(alice1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = watcher
        .request("presence_stats", json!({"channel": "room:1"}))
        .await;
    assert_eq!(
        r["result"],
        json!({"num_clients": 3, "num_users": 3}),
        "{r}"
    );
    alice2
        .request("unsubscribe", json!({"channel": "room:1"}))
        .await;
    let leave = watcher.next_json().await;
    assert_eq!(
        (leave["push"].as_str(), leave["info"]["user"].as_str()),
        (Some("leave"), Some("alice"))
    );

    // Presence is for subscribers, and only where the namespace keeps it.
    let r = alice2
        .request("presence", json!({"channel": "room:1"}))
        .await;
    assert_eq!(r["error"]["code"], 109, "{r}");
    watcher
        .request("subscribe", json!({"channel": "news"}))
        .await;
    let r = watcher
        .request("presence", json!({"channel": "news"}))
        .await;
    assert_eq!(r["error"]["code"], 107, "{r}");
}

/// A tiny app backend: decides connections by cookie, subscriptions by channel name.
async fn start_app() -> std::net::SocketAddr {
    use axum::{Json, Router, http::HeaderMap, routing::post};
    async fn connect(headers: HeaderMap, Json(body): Json<Value>) -> axum::response::Response {
        use axum::response::IntoResponse;
        let cookie = headers
            .get("cookie")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert_eq!(body["protocol"], "native");
        match cookie {
            "session=alice" => Json(json!({"allow": true, "user": "alice", "channels": ["lobby"], "info": {"from": body["data"]}})).into_response(),
            "session=bob" => Json(json!({"allow": false, "reason": "banned"})).into_response(),
            "session=crash" => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
            "session=slow" => {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Json(json!({"allow": true, "user": "slow"})).into_response()
            }
            _ => (axum::http::StatusCode::FORBIDDEN, "who are you").into_response(),
        }
    }
    async fn subscribe(Json(body): Json<Value>) -> Json<Value> {
        Json(json!({"allow": body["channel"] == "app:open" && body["user"] == "alice"}))
    }
    let app = Router::new()
        .route("/connect", post(connect))
        .route("/subscribe", post(subscribe));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn open_with_cookie(server: &Server, cookie: &str) -> Client {
    let mut request = server.ws_url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("cookie", cookie.parse().unwrap());
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .unwrap()
        .unwrap();
    Client::from_ws(ws)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_decides_connects_and_subscribes() {
    let app = start_app().await;
    let server = Server::start(&format!(
        r#"
[auth]
connect_url = "http://{app}/connect"
subscribe_url = "http://{app}/subscribe"
app_timeout_ms = 500
[namespaces.app]
subscribe = "app"
"#
    ));
    let mut alice = open_with_cookie(&server, "session=alice").await;
    let r = alice
        .request("connect", json!({"data": {"device": "phone"}}))
        .await;
    assert_eq!(r["result"]["user"], "alice", "{r}");
    assert_eq!(r["result"]["channels"], json!(["lobby"]));
    assert_eq!(
        alice
            .request("subscribe", json!({"channel": "app:open"}))
            .await["result"],
        json!({})
    );
    assert_eq!(
        alice
            .request("subscribe", json!({"channel": "app:closed"}))
            .await["error"]["code"],
        107
    );

    let mut bob = open_with_cookie(&server, "session=bob").await;
    let r = bob.request("connect", json!({})).await;
    assert_eq!(r["error"]["code"], 112, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("banned"));
    assert_eq!(bob.close_code().await, Some(3502));

    let mut nobody = Client::open(&server.ws_url()).await;
    assert_eq!(
        nobody.request("connect", json!({})).await["error"]["code"],
        112
    );
    assert_eq!(nobody.close_code().await, Some(3502));

    // The app failing or too slow is not a verdict: close 3005, reconnect later.
    for cookie in ["session=crash", "session=slow"] {
        let mut c = open_with_cookie(&server, cookie).await;
        let started = Instant::now();
        let r = c.request("connect", json!({})).await;
        assert_eq!(r["error"]["code"], 100, "{cookie}: {r}");
        assert_eq!(c.close_code().await, Some(3005), "{cookie}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{cookie} took {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn an_unreachable_app_is_a_3005_not_a_hang() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let server = Server::start(&format!(
        "[auth]\nconnect_url = \"http://127.0.0.1:{port}/connect\"\napp_timeout_ms = 1000\n"
    ));
    let mut c = Client::open(&server.ws_url()).await;
    let r = c.request("connect", json!({})).await;
    assert_eq!(r["error"]["code"], 100, "{r}");
    assert_eq!(c.close_code().await, Some(3005));
}

#[test]
fn policies_that_cannot_work_are_refused_at_startup() {
    for (config, needle) in [
        ("[namespaces.s]\nsubscribe = \"token\"\n", "hmac_secret"),
        ("[namespaces.s]\nsubscribe = \"app\"\n", "subscribe_url"),
        ("[namespaces.s]\njoin_leave = true\n", "presence"),
        ("[auth]\nhmac_secret = \"short\"\n", "hmac_secret"),
        ("[auth]\nconnect_url = \"https://x/\"\n", "https"),
    ] {
        let err = common::check_config_error(config);
        assert!(err.contains(needle), "{config}: {err}");
    }
}

/// `publish` policies apply on top of `client_publish`.
#[tokio::test]
async fn publish_policies() {
    let server = Server::start(&token_config(
        "[namespaces.board]\nclient_publish = true\npublish = \"user\"\n",
    ));
    let token =
        |user: &str| json!({"token": sign(json!({"sub": user, "exp": now() + 60}), SECRET)});
    let (mut c42, _) = connect_with(&server, token("42")).await;
    let (mut c7, _) = connect_with(&server, token("7")).await;
    c7.request("subscribe", json!({"channel": "board:wall#42"}))
        .await;
    let r = c42
        .request(
            "publish",
            json!({"channel": "board:wall#42", "data": "mine"}),
        )
        .await;
    assert_eq!(r["result"], json!({}), "{r}");
    assert_eq!(c7.next_push().await["data"], "mine");
    let r = c7
        .request(
            "publish",
            json!({"channel": "board:wall#42", "data": "not mine"}),
        )
        .await;
    assert_eq!(r["error"]["code"], 107, "{r}");
    c7.expect_silence(Duration::from_millis(200)).await;
}
