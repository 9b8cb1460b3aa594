//! Several Plaza processes sharing one real `redis-server` (`broker = "redis"`): fan-out exactly
//! once on every node, chat with receipts across nodes, presence across nodes and after a
//! `kill -9`, recovery on another node, and a Redis restart in the middle of a run.
//!
//! Each test starts its own private Redis on a free loopback port (it restarts it mid-test), from
//! `PLAZA_TEST_REDIS_SERVER` (scripts/test.sh sets it) or `redis-server` on the PATH; without
//! one the tests fail with a message saying so. The binary must be built with `--features redis`
//! (the test script builds everything with `--all-features`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Client, KEY, Server, WAIT, http, temp_dir};
use serde_json::{Value, json};

const SECRET: &str = "an-hmac-secret-that-is-long-enough-0123456789";

/// A private redis-server, killed when dropped.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Redis {
    fn start() -> Redis {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut redis = Redis {
            child: None,
            port,
            dir: temp_dir(),
        };
        redis.spawn();
        redis
    }

    fn spawn(&mut self) {
        let server =
            std::env::var("PLAZA_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&server)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({server}): {e}. Install it (apt-get install \
                     redis-server) or set PLAZA_TEST_REDIS_SERVER; scripts/test.sh does both"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while !ping(self.port) {
            assert!(Instant::now() < deadline, "redis-server did not answer");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, and a new empty Redis on the same port: everything it held is gone.
    fn restart_empty(&mut self) {
        self.kill();
        self.spawn();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

fn config(redis: &Redis) -> String {
    format!(
        r#"
broker = "redis"
[redis]
url = "{}"
prefix = "t:"
presence_ttl_secs = 2
[auth]
hmac_secret = "{SECRET}"
anonymous = true
[default_namespace]
client_join = true
[namespaces.h]
history_size = 100
[namespaces.room]
presence = true
join_leave = true
"#,
        redis.url()
    )
}

fn node(redis: &Redis) -> Server {
    Server::start(&config(redis))
}

fn token(user: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
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

async fn login(server: &Server, user: &str) -> Client {
    let mut c = Client::open(&server.ws_url()).await;
    let reply = c.request("connect", json!({"token": token(user)})).await;
    assert!(reply["result"].is_object(), "connect failed: {reply}");
    c
}

async fn ok(c: &mut Client, method: &str, params: Value) -> Value {
    let reply = c.request(method, params).await;
    assert!(reply.get("error").is_none(), "{method} failed: {reply}");
    reply["result"].clone()
}

async fn api(server: &Server, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let (status, text) = http(server.backend, method, path, Some(KEY), body.as_deref()).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The next push of kind `kind`, skipping ephemeral pushes of the kinds in `skip`.
async fn next_of(c: &mut Client, kind: &str, skip: &[&str]) -> Value {
    loop {
        let v = match c.pushes.pop_front() {
            Some(v) => v,
            None => c.next_json().await,
        };
        let k = v["push"]
            .as_str()
            .unwrap_or_else(|| panic!("not a push: {v}"));
        if k == kind {
            return v;
        }
        assert!(
            skip.contains(&k),
            "unexpected push {v} while waiting for {kind}"
        );
    }
}

/// Subscribed on A and C, published through B's backend API: each publication arrives once on
/// each node, in order, with history positions assigned once; `/api/info` lists the three nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_reaches_every_node_exactly_once() {
    let redis = Redis::start();
    let (a, b, c) = (node(&redis), node(&redis), node(&redis));
    let mut subscribers = Vec::new();
    for server in [&a, &c] {
        for channel in ["news", "h:feed"] {
            let mut client = Client::connect(&server.ws_url()).await;
            ok(&mut client, "subscribe", json!({"channel": channel})).await;
            subscribers.push((channel, client));
        }
    }
    for i in 1..=20u64 {
        for channel in ["news", "h:feed"] {
            let (status, body) = b.publish(channel, json!({"i": i})).await;
            assert_eq!(status, 200, "{body}");
            if channel == "h:feed" {
                let v: Value = serde_json::from_str(&body).unwrap();
                assert_eq!(v["offset"], i, "offsets are assigned once, in Redis: {v}");
            }
        }
    }
    for (channel, client) in &mut subscribers {
        for i in 1..=20u64 {
            let p = client.next_push().await;
            assert_eq!(p["channel"], *channel);
            assert_eq!(p["data"], json!({"i": i}), "{channel}: {p}");
            if *channel == "h:feed" {
                assert_eq!(p["offset"], i);
            }
        }
    }
    for (_, client) in &mut subscribers {
        client.expect_silence(Duration::from_millis(300)).await;
    }

    // History written through B is read on C.
    let (status, body) = http(
        c.backend,
        "GET",
        "/api/history?channel=h:feed&limit=100",
        Some(KEY),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let history: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        history["publications"].as_array().map(Vec::len),
        Some(20),
        "{history}"
    );

    let (_, info) = api(&a, "GET", "/api/info", None).await;
    assert_eq!(info["broker"], "redis");
    assert_eq!(info["nodes"].as_array().map(Vec::len), Some(3), "{info}");
    let (_, body) = http(a.backend, "GET", "/metrics", None, None).await;
    assert!(
        body.contains("plaza_node_info{node="),
        "node id missing from /metrics"
    );
}

/// A direct message from a user on A to a user on C with every receipt, and a group whose
/// members are spread over the three nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_works_across_nodes() {
    let redis = Redis::start();
    let (a, b, c) = (node(&redis), node(&redis), node(&redis));
    let mut alice = login(&a, "alice").await;
    let mut bob = login(&c, "bob").await;
    let skip = ["member", "typing"];

    let accepted = ok(
        &mut alice,
        "send",
        json!({"user": "bob", "id": "m1", "data": {"text": "hi"}}),
    )
    .await;
    assert_eq!(accepted["status"], "accepted");
    let m = next_of(&mut bob, "message", &skip).await;
    assert_eq!(m["from"], "alice");
    assert_eq!(m["data"], json!({"text": "hi"}));
    ok(&mut bob, "ack", json!({"seq": m["seq"]})).await;
    let delivered = next_of(&mut alice, "receipt", &skip).await;
    assert_eq!(delivered["status"], "delivered", "{delivered}");
    assert_eq!(delivered["id"], "m1");
    ok(&mut alice, "ack", json!({"seq": delivered["seq"]})).await;
    ok(&mut bob, "read", json!({"user": "alice", "id": "m1"})).await;
    let read = next_of(&mut alice, "receipt", &skip).await;
    assert_eq!(read["status"], "read", "{read}");
    ok(&mut alice, "ack", json!({"seq": read["seq"]})).await;

    // Typing is ephemeral: it crosses nodes through the broker.
    ok(&mut alice, "typing", json!({"user": "bob"})).await;
    let typing = next_of(&mut bob, "typing", &[]).await;
    assert_eq!(typing["from"], "alice");

    // A group with a member on each node.
    let mut carol = login(&b, "carol").await;
    for (client, _) in [
        (&mut alice, "alice"),
        (&mut bob, "bob"),
        (&mut carol, "carol"),
    ] {
        ok(client, "group_join", json!({"group": "team"})).await;
    }
    let members = ok(&mut carol, "group_members", json!({"group": "team"})).await;
    let online: Vec<bool> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["online"].as_bool().unwrap())
        .collect();
    assert_eq!(
        online,
        vec![true, true, true],
        "online on every node: {members}"
    );
    ok(
        &mut alice,
        "send",
        json!({"group": "team", "id": "g1", "data": {"text": "all"}}),
    )
    .await;
    for client in [&mut bob, &mut carol] {
        let m = next_of(client, "message", &skip).await;
        assert_eq!(m["group"], "team");
        assert_eq!(m["data"], json!({"text": "all"}));
        ok(client, "ack", json!({"seq": m["seq"]})).await;
    }
    for _ in 0..2 {
        let r = next_of(&mut alice, "receipt", &skip).await;
        assert_eq!(r["status"], "delivered", "{r}");
    }
}

/// Presence lists every node's connections; a node killed with SIGKILL drops out of presence and
/// of the node list within the TTL (2 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_spans_nodes_and_expires_with_a_dead_node() {
    let redis = Redis::start();
    let (a, b) = (node(&redis), node(&redis));
    let mut ann = login(&a, "ann").await;
    ok(&mut ann, "subscribe", json!({"channel": "room:lobby"})).await;
    let mut ben = login(&b, "ben").await;
    ok(&mut ben, "subscribe", json!({"channel": "room:lobby"})).await;
    // Ann, on A, hears Ben join on B.
    let join = next_of(&mut ann, "join", &[]).await;
    assert_eq!(join["info"]["user"], "ben", "{join}");

    let users = |v: &Value| -> Vec<String> {
        let mut users: Vec<String> = v["clients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["user"].as_str().unwrap().to_owned())
            .collect();
        users.sort();
        users
    };
    let (status, present) = api(&a, "GET", "/api/presence?channel=room:lobby", None).await;
    assert_eq!(status, 200, "{present}");
    assert_eq!(users(&present), vec!["ann", "ben"]);
    let stats = ok(&mut ann, "presence_stats", json!({"channel": "room:lobby"})).await;
    assert_eq!(stats["num_users"], 2, "{stats}");

    drop(ben);
    let _ = b.kill9();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, present) = api(&a, "GET", "/api/presence?channel=room:lobby", None).await;
        let (_, info) = api(&a, "GET", "/api/info", None).await;
        if users(&present) == vec!["ann"] && info["nodes"].as_array().map(Vec::len) == Some(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dead node still present: {present} {info}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A client that read a history channel on A resubscribes on C with `since` and gets exactly
/// what it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_after_moving_to_another_node() {
    let redis = Redis::start();
    let (a, b, c) = (node(&redis), node(&redis), node(&redis));
    let mut client = Client::connect(&a.ws_url()).await;
    let sub = ok(&mut client, "subscribe", json!({"channel": "h:x"})).await;
    let epoch = sub["epoch"].as_str().unwrap().to_owned();
    for i in 1..=5 {
        b.publish("h:x", json!({"i": i})).await;
    }
    for _ in 0..5 {
        client.next_push().await;
    }
    drop(client);
    for i in 6..=9 {
        b.publish("h:x", json!({"i": i})).await;
    }
    let mut moved = Client::connect(&c.ws_url()).await;
    let sub = ok(
        &mut moved,
        "subscribe",
        json!({"channel": "h:x", "since": {"epoch": epoch, "offset": 5}}),
    )
    .await;
    assert_eq!(sub, json!({"epoch": epoch, "offset": 9, "recovered": true}));
    for i in 6..=9 {
        let p = moved.next_push().await;
        assert_eq!(p["data"], json!({"i": i}));
        assert_eq!(p["offset"], i);
    }
    b.publish("h:x", json!({"i": 10})).await;
    assert_eq!(moved.next_push().await["offset"], 10);
}

/// Redis is killed and comes back empty. A subscriber of a history channel is told to
/// resynchronise (close 3006) and learns `recovered: false` on resubscribing; publications after
/// the restart reach subscribers of every kind again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_run() {
    let mut redis = Redis::start();
    let (a, b) = (node(&redis), node(&redis));
    let mut history_sub = Client::connect(&a.ws_url()).await;
    let sub = ok(&mut history_sub, "subscribe", json!({"channel": "h:log"})).await;
    let epoch = sub["epoch"].as_str().unwrap().to_owned();
    let mut plain_sub = Client::connect(&a.ws_url()).await;
    ok(&mut plain_sub, "subscribe", json!({"channel": "plain"})).await;
    for i in 1..=3 {
        b.publish("h:log", json!({"i": i})).await;
    }
    for _ in 0..3 {
        history_sub.next_push().await;
    }

    redis.restart_empty();

    // The history subscriber may have missed publications: it is told so.
    assert_eq!(history_sub.close_code().await, Some(3006));

    // Publications through B reach the plain subscriber on A once both nodes are back.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    let first = loop {
        n += 1;
        let (status, _) = b.publish("plain", json!({"n": n})).await;
        if status == 200
            && let Ok(push) =
                tokio::time::timeout(Duration::from_millis(300), plain_sub.next_push()).await
        {
            break push;
        }
        assert!(
            Instant::now() < deadline,
            "no publication got through after the restart"
        );
    };
    assert_eq!(first["channel"], "plain");

    // The moved-on history subscriber learns that its gap is gone for good.
    let mut again = Client::connect(&a.ws_url()).await;
    let sub = ok(
        &mut again,
        "subscribe",
        json!({"channel": "h:log", "since": {"epoch": epoch, "offset": 3}}),
    )
    .await;
    assert_eq!(sub["recovered"], false, "{sub}");
    assert_ne!(sub["epoch"], json!(epoch));
    let (status, _) = b.publish("h:log", json!({"after": true})).await;
    assert_eq!(status, 200);
    assert_eq!(again.next_push().await["data"], json!({"after": true}));
}

/// `plaza check-config` pings Redis: a Redis that is not there is reported.
#[tokio::test]
async fn check_config_pings_redis() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = common::check_config_error(&format!(
        "broker = \"redis\"\n[redis]\nurl = \"redis://127.0.0.1:{port}\"\n"
    ));
    assert!(err.contains("Redis at redis://127.0.0.1"), "{err}");
    let err = common::check_config_error("broker = \"nats\"\n");
    assert!(err.contains("not available yet"), "{err}");
}
