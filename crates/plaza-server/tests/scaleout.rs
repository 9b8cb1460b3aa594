//! Several Plaza processes sharing one real broker: fan-out exactly once on every node, chat with
//! receipts across nodes, presence across nodes and after a `kill -9`, recovery on another node,
//! and a broker restart in the middle of a run.
//!
//! Every case is written once (`case_*`, given a [`Backend`]) and run twice by thin tests: `redis_*`
//! against a private `redis-server` (`broker = "redis"`), `nats_*` against a private `nats-server`
//! with JetStream (`broker = "nats"`). Each test starts its own server on a free loopback port (the
//! restart case restarts it mid-test), from `PLAZA_TEST_REDIS_SERVER` / `PLAZA_TEST_NATS_SERVER`
//! (scripts/test.sh sets both) or `redis-server` / `nats-server` on the PATH; without one the tests
//! fail with a message saying so. The binary must be built with `--features redis,nats` (the test
//! script builds everything with `--all-features`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Client, KEY, Server, WAIT, http, temp_dir};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "an-hmac-secret-that-is-long-enough-0123456789";

/// How long a crashed node's presence entries and its place in the node list outlive it.
const PRESENCE_TTL_SECS: u64 = 2;

/// Which broker a [`Backend`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Redis,
    Nats,
}

impl Kind {
    /// The `broker` setting, also what `/api/info` reports.
    fn name(self) -> &'static str {
        match self {
            Kind::Redis => "redis",
            Kind::Nats => "nats",
        }
    }

    fn url(self, port: u16) -> String {
        match self {
            Kind::Redis => format!("redis://127.0.0.1:{port}"),
            Kind::Nats => format!("nats://127.0.0.1:{port}"),
        }
    }

    /// The top of a Plaza config file for this broker at `port` (tables of the rest follow).
    fn config_section(self, port: u16, prefix: &str) -> String {
        let (name, url) = (self.name(), self.url(port));
        format!(
            "broker = \"{name}\"\n[{name}]\nurl = \"{url}\"\nprefix = \"{prefix}\"\n\
             presence_ttl_secs = {PRESENCE_TTL_SECS}\n"
        )
    }

    /// The key / subject prefix of one test: Redis tests keep `t:`; each NATS test gets its own.
    fn prefix(self) -> String {
        match self {
            Kind::Redis => "t:".to_owned(),
            Kind::Nats => format!("plaza{}", NEXT_PREFIX.fetch_add(1, Ordering::Relaxed)),
        }
    }

    /// How `plaza check-config` names an unreachable server of this kind.
    fn unreachable(self) -> &'static str {
        match self {
            Kind::Redis => "Redis at redis://127.0.0.1",
            Kind::Nats => "NATS at nats://127.0.0.1",
        }
    }
}

static NEXT_PREFIX: AtomicU32 = AtomicU32::new(0);

/// A private broker server on a free loopback port, in a temp dir; killed (SIGKILL) and its dir
/// removed when dropped.
struct Backend {
    kind: Kind,
    child: Option<Child>,
    port: u16,
    /// Its working dir: Redis's `--dir` (it saves nothing there), NATS's JetStream store (`-sd`).
    /// Also holds `server.log`, its output.
    dir: PathBuf,
    prefix: String,
}

impl Backend {
    fn redis() -> Backend {
        Backend::start(Kind::Redis)
    }

    fn nats() -> Backend {
        Backend::start(Kind::Nats)
    }

    fn start(kind: Kind) -> Backend {
        let prefix = kind.prefix();
        let mut backend = Backend {
            kind,
            child: None,
            port: free_port(),
            dir: temp_dir(),
            prefix,
        };
        backend.spawn();
        backend
    }

    fn name(&self) -> &'static str {
        self.kind.name()
    }

    fn config_section(&self) -> String {
        self.kind.config_section(self.port, &self.prefix)
    }

    /// Whether what the server held survives [`Backend::restart`]: Redis runs without
    /// persistence and comes back empty; NATS comes back with its JetStream store.
    fn keeps_data_across_restart(&self) -> bool {
        self.kind == Kind::Nats
    }

    fn spawn(&mut self) {
        let (var, program, package) = match self.kind {
            Kind::Redis => ("PLAZA_TEST_REDIS_SERVER", "redis-server", "redis-server"),
            Kind::Nats => ("PLAZA_TEST_NATS_SERVER", "nats-server", "nats-server"),
        };
        let server = std::env::var(var).unwrap_or_else(|_| program.into());
        let port = self.port.to_string();
        let mut command = Command::new(&server);
        match self.kind {
            Kind::Redis => command
                .args(["--bind", "127.0.0.1", "--port", &port])
                .args(["--save", "", "--appendonly", "no", "--dir"])
                .arg(&self.dir),
            // No monitoring port; JetStream in this test's own store dir.
            Kind::Nats => {
                command
                    .args(["-js", "-sd"])
                    .arg(&self.dir)
                    .args(["-a", "127.0.0.1", "-p", &port])
            }
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("server log");
        let cannot = |e: &dyn std::fmt::Display| -> ! {
            panic!(
                "cannot start {program} ({server}): {e}. Install it (apt-get install {package}) \
                 or set {var}; scripts/test.sh does both"
            )
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("server log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| cannot(&e));
        let child = self.child.insert(child);
        let deadline = Instant::now() + WAIT;
        while !answers(self.kind, self.port) {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
                cannot(&format_args!("it exited ({status}):\n{log}"));
            }
            assert!(
                Instant::now() < deadline,
                "{program} did not answer on 127.0.0.1:{}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, and the server again on the same port and dir. Redis comes back empty: everything
    /// it held is gone. NATS comes back with every JetStream stream it had acknowledged writes to.
    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// SIGKILL, the JetStream store deleted, and NATS again: a server that lost everything.
    fn restart_wiped(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(self.dir.join("jetstream"));
        self.spawn();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Whether the server on `port` answers: Redis replies `+PONG` to `PING`; nats-server greets
/// every connection with an `INFO {...}` line.
fn answers(kind: Kind, port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    match kind {
        Kind::Redis => {
            let mut buf = [0u8; 7];
            s.write_all(b"PING\r\n").is_ok()
                && s.read_exact(&mut buf).is_ok()
                && &buf == b"+PONG\r\n"
        }
        Kind::Nats => {
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("INFO ")
        }
    }
}

fn config(backend: &Backend) -> String {
    format!(
        r#"{}
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
        backend.config_section()
    )
}

fn node(backend: &Backend) -> Server {
    Server::start(&config(backend))
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

/// The next publication `c` gets (`Ok`), or the code the server closed it with (`Err`; `None`
/// when the socket just ended). Panics when neither comes within [`WAIT`].
async fn next_push_or_close(c: &mut Client) -> Result<Value, Option<u16>> {
    if let Some(v) = c.pushes.pop_front() {
        return Ok(v);
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, c.ws.next()).await {
            Err(_) => panic!("neither a publication nor a close within {WAIT:?}"),
            Ok(None | Some(Err(_))) => return Err(None),
            Ok(Some(Ok(Message::Close(frame)))) => return Err(frame.map(|f| u16::from(f.code))),
            Ok(Some(Ok(Message::Text(text)))) => {
                let mut objects = common::split_frame(&text).into_iter();
                let first = objects.next().expect("an empty frame");
                c.pushes.extend(objects);
                assert_eq!(first["push"], "publication", "not a publication: {first}");
                return Ok(first);
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Subscribed on A and C, published through B's backend API: each publication arrives once on
/// each node, in order, with history positions assigned once; `/api/info` lists the three nodes.
async fn case_fan_out_reaches_every_node_exactly_once(backend: Backend) {
    let (a, b, c) = (node(&backend), node(&backend), node(&backend));
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
                assert_eq!(
                    v["offset"],
                    i,
                    "offsets are assigned once, in {}: {v}",
                    backend.name()
                );
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
    assert_eq!(info["broker"], backend.name());
    assert_eq!(info["nodes"].as_array().map(Vec::len), Some(3), "{info}");
    let (_, body) = http(a.backend, "GET", "/metrics", None, None).await;
    assert!(
        body.contains("plaza_node_info{node="),
        "node id missing from /metrics"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_fan_out_reaches_every_node_exactly_once() {
    case_fan_out_reaches_every_node_exactly_once(Backend::redis()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_fan_out_reaches_every_node_exactly_once() {
    case_fan_out_reaches_every_node_exactly_once(Backend::nats()).await;
}

/// A direct message from a user on A to a user on C with every receipt, and a group whose
/// members are spread over the three nodes.
async fn case_chat_works_across_nodes(backend: Backend) {
    let (a, b, c) = (node(&backend), node(&backend), node(&backend));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_chat_works_across_nodes() {
    case_chat_works_across_nodes(Backend::redis()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_chat_works_across_nodes() {
    case_chat_works_across_nodes(Backend::nats()).await;
}

/// Presence lists every node's connections; a node killed with SIGKILL drops out of presence and
/// of the node list within the TTL (`PRESENCE_TTL_SECS`).
async fn case_presence_spans_nodes_and_expires_with_a_dead_node(backend: Backend) {
    let (a, b) = (node(&backend), node(&backend));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_presence_spans_nodes_and_expires_with_a_dead_node() {
    case_presence_spans_nodes_and_expires_with_a_dead_node(Backend::redis()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_presence_spans_nodes_and_expires_with_a_dead_node() {
    case_presence_spans_nodes_and_expires_with_a_dead_node(Backend::nats()).await;
}

/// A client that read a history channel on A resubscribes on C with `since` and gets exactly
/// what it missed.
async fn case_recovery_after_moving_to_another_node(backend: Backend) {
    let (a, b, c) = (node(&backend), node(&backend), node(&backend));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_recovery_after_moving_to_another_node() {
    case_recovery_after_moving_to_another_node(Backend::redis()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_recovery_after_moving_to_another_node() {
    case_recovery_after_moving_to_another_node(Backend::nats()).await;
}

/// The broker is killed (SIGKILL) and started again on the same port, nodes A and B running
/// through it. Either way, publications after the restart reach subscribers of every kind again,
/// and no subscriber of a history channel is left with a silent hole.
///
/// - Redis comes back empty: the history subscriber is told to resynchronise (close 3006) and
///   learns `recovered: false` (and a new epoch) on resubscribing.
/// - NATS comes back with its JetStream store: history survives. The next publication gets the
///   next offset in the same epoch; the subscriber that stayed through the restart either gets it
///   (no gap) or was told to resynchronise (3006), never silence or a later offset; and a client
///   that resubscribes with `since` recovers exactly what it missed (`recovered: true`).
async fn case_restart_mid_run(mut backend: Backend) {
    let (a, b) = (node(&backend), node(&backend));
    let mut history_sub = Client::connect(&a.ws_url()).await;
    let sub = ok(&mut history_sub, "subscribe", json!({"channel": "h:log"})).await;
    let epoch = sub["epoch"].as_str().unwrap().to_owned();
    let mut plain_sub = Client::connect(&a.ws_url()).await;
    ok(&mut plain_sub, "subscribe", json!({"channel": "plain"})).await;
    for i in 1..=3 {
        b.publish("h:log", json!({"i": i})).await;
    }
    for i in 1..=3 {
        let p = history_sub.next_push().await;
        assert_eq!(p["offset"], i, "{p}");
    }

    backend.restart();

    if !backend.keeps_data_across_restart() {
        // The history subscriber may have missed publications: it is told so.
        assert_eq!(history_sub.close_code().await, Some(3006));
    }

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

    if backend.keeps_data_across_restart() {
        // History survived: the next publication continues the same epoch at offset 4.
        let (status, body) = b.publish("h:log", json!({"i": 4})).await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["epoch"],
            json!(epoch),
            "history kept across the restart: {v}"
        );
        assert_eq!(v["offset"], 4, "{v}");
        // The subscriber that stayed on A through the restart gets it, or was told to resync.
        match next_push_or_close(&mut history_sub).await {
            Ok(p) => {
                assert_eq!(p["offset"], 4, "no gap after the restart: {p}");
                assert_eq!(p["data"], json!({"i": 4}));
            }
            Err(code) => assert_eq!(code, Some(3006), "closed, but not told to resync"),
        }
        // A client that last saw offset 3 resubscribes and recovers exactly what it missed.
        let mut again = Client::connect(&a.ws_url()).await;
        let sub = ok(
            &mut again,
            "subscribe",
            json!({"channel": "h:log", "since": {"epoch": epoch, "offset": 3}}),
        )
        .await;
        assert_eq!(sub, json!({"epoch": epoch, "offset": 4, "recovered": true}));
        let p = again.next_push().await;
        assert_eq!(
            (&p["offset"], &p["data"]),
            (&json!(4), &json!({"i": 4})),
            "{p}"
        );
        let (status, _) = b.publish("h:log", json!({"after": true})).await;
        assert_eq!(status, 200);
        let p = again.next_push().await;
        assert_eq!(
            (&p["offset"], &p["data"]),
            (&json!(5), &json!({"after": true})),
            "{p}"
        );
    } else {
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_run() {
    case_restart_mid_run(Backend::redis()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_mid_run() {
    case_restart_mid_run(Backend::nats()).await;
}

/// NATS restarted without its store: the nodes notice the log's new identity, start over in a new
/// epoch and tell history subscribers to resynchronise; those learn `recovered: false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_store_lost_mid_run() {
    let mut backend = Backend::nats();
    let (a, b) = (node(&backend), node(&backend));
    let mut history_sub = Client::connect(&a.ws_url()).await;
    let sub = ok(&mut history_sub, "subscribe", json!({"channel": "h:log"})).await;
    let epoch = sub["epoch"].as_str().unwrap().to_owned();
    for i in 1..=3 {
        b.publish("h:log", json!({"i": i})).await;
    }
    for i in 1..=3 {
        assert_eq!(history_sub.next_push().await["offset"], i);
    }

    backend.restart_wiped();

    assert_eq!(history_sub.close_code().await, Some(3006));
    let deadline = Instant::now() + Duration::from_secs(20);
    let published = loop {
        let (status, body) = b.publish("h:log", json!({"after": true})).await;
        if status == 200 {
            break serde_json::from_str::<Value>(&body).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "no publish accepted after the restart: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_ne!(published["epoch"], json!(epoch), "{published}");
    assert_eq!(published["offset"], 1, "{published}");
    let mut again = Client::connect(&a.ws_url()).await;
    let sub = ok(
        &mut again,
        "subscribe",
        json!({"channel": "h:log", "since": {"epoch": epoch, "offset": 3}}),
    )
    .await;
    assert_eq!(sub["recovered"], false, "{sub}");
    assert_eq!(sub["epoch"], published["epoch"], "{sub}");
}

/// `plaza check-config` connects to the broker: one that is not there is reported.
fn case_check_config_reports_an_unreachable_broker(kind: Kind) {
    let port = free_port();
    let err = common::check_config_error(&kind.config_section(port, &kind.prefix()));
    assert!(err.contains(kind.unreachable()), "{err}");
}

#[test]
fn check_config_pings_redis() {
    case_check_config_reports_an_unreachable_broker(Kind::Redis);
}

#[test]
fn check_config_pings_nats() {
    case_check_config_reports_an_unreachable_broker(Kind::Nats);
}
