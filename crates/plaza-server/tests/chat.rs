//! Chat against the real binary: direct messages and groups through per-user inboxes, receipts
//! to senders (online or not), redelivery until acknowledged, kill -9, and the bad inputs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Client, KEY, Server, http};
use serde_json::{Value, json};

const SECRET: &str = "an-hmac-secret-that-is-long-enough-0123456789";

fn config(chat: &str) -> String {
    format!(
        r#"
[auth]
hmac_secret = "{SECRET}"
[default_namespace]
client_join = true
[namespaces.closed]
[namespaces.dm]
client_join = true
subscribe = "user"
[chat]
{chat}
"#
    )
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

/// Connects as `user`; returns the client and the connect result.
async fn login(server: &Server, user: &str) -> (Client, Value) {
    let mut c = Client::open(&server.ws_url()).await;
    let reply = c.request("connect", json!({"token": token(user)})).await;
    let result = reply["result"].clone();
    assert!(result.is_object(), "connect failed: {reply}");
    (c, result)
}

/// The next push of one of `kinds`, skipping ephemeral member/presence/typing pushes of other
/// kinds.
async fn next_of(c: &mut Client, kinds: &[&str]) -> Value {
    loop {
        let v = match c.pushes.pop_front() {
            Some(v) => v,
            None => c.next_json().await,
        };
        let kind = v["push"]
            .as_str()
            .unwrap_or_else(|| panic!("not a push: {v}"));
        if kinds.contains(&kind) {
            return v;
        }
        assert!(
            ["member", "typing", "group_deleted"].contains(&kind),
            "unexpected push {v} while waiting for {kinds:?}"
        );
    }
}

async fn message(c: &mut Client) -> Value {
    next_of(c, &["message"]).await
}

async fn receipt(c: &mut Client) -> Value {
    next_of(c, &["receipt"]).await
}

async fn ok(c: &mut Client, method: &str, params: Value) -> Value {
    let reply = c.request(method, params).await;
    assert!(reply.get("error").is_none(), "{method} failed: {reply}");
    reply["result"].clone()
}

async fn error_code(c: &mut Client, method: &str, params: Value) -> u64 {
    let reply = c.request(method, params).await;
    reply["error"]["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("{method} should fail: {reply}"))
}

async fn ack(c: &mut Client, seq: &Value) -> Value {
    ok(c, "ack", json!({"seq": seq})).await
}

async fn api(server: &Server, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let (status, text) = http(server.backend, method, path, Some(KEY), body.as_deref()).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn register(server: &Server, users: &[&str]) {
    let (status, body) = api(
        server,
        "POST",
        "/api/chat/users",
        Some(json!({"users": users})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

/// Two users, three connections: a direct message to an offline user, then online; delivered
/// and read receipts reach both of the sender's connections, and a receipt produced while the
/// sender is offline waits in its inbox.
#[tokio::test]
async fn direct_messages_and_receipts() {
    let server = Server::start(&config(""));
    register(&server, &["bob"]).await;
    let (mut a1, info) = login(&server, "alice").await;
    assert_eq!(
        info["inbox"],
        json!({"pending": 0, "dropped": 0, "reset": false})
    );
    let (mut a2, _) = login(&server, "alice").await;

    // Bob is offline: the message waits in his inbox. A forged `from` is ignored.
    let accepted = ok(
        &mut a1,
        "send",
        json!({"user": "bob", "id": "m1", "from": "mallory", "data": {"text": "hi"}}),
    )
    .await;
    assert_eq!(accepted["status"], "accepted");
    assert_eq!(accepted["id"], "m1");
    assert_eq!(accepted["duplicate"], false);

    let (mut b, info) = login(&server, "bob").await;
    assert_eq!(info["inbox"]["pending"], 1);
    let m1 = message(&mut b).await;
    assert_eq!(m1["id"], "m1");
    assert_eq!(m1["from"], "alice");
    assert_eq!(m1["to"], "bob");
    assert_eq!(m1["data"], json!({"text": "hi"}));

    // Delivered when bob acknowledges, read when he marks it read: both alice connections hear.
    assert_eq!(ack(&mut b, &m1["seq"]).await["acked"], 1);
    assert_eq!(
        ack(&mut b, &m1["seq"]).await["acked"],
        0,
        "a repeated ack is a no-op"
    );
    for a in [&mut a1, &mut a2] {
        let r = receipt(a).await;
        assert_eq!(
            (r["status"].as_str(), r["id"].as_str()),
            (Some("delivered"), Some("m1"))
        );
        assert_eq!(r["by"], "bob");
        assert_eq!(r["to"], "bob");
    }
    assert_eq!(ok(&mut b, "read", json!({"id": "m1"})).await["read"], 1);
    assert_eq!(ok(&mut b, "read", json!({"id": "m1"})).await["read"], 0);
    for a in [&mut a1, &mut a2] {
        let r = receipt(a).await;
        assert_eq!(
            (r["status"].as_str(), r["id"].as_str()),
            (Some("read"), Some("m1"))
        );
    }

    // Online: pushed at once. Bob answers; alice's two connections both get it.
    ok(
        &mut a2,
        "send",
        json!({"user": "bob", "id": "m2", "data": "again"}),
    )
    .await;
    let m2 = message(&mut b).await;
    assert_eq!(
        (m2["id"].as_str(), m2["from"].as_str()),
        (Some("m2"), Some("alice"))
    );
    ok(
        &mut b,
        "send",
        json!({"user": "alice", "id": "r1", "data": "yo"}),
    )
    .await;
    for a in [&mut a1, &mut a2] {
        let r = message(a).await;
        assert_eq!(
            (r["id"].as_str(), r["from"].as_str()),
            (Some("r1"), Some("bob"))
        );
    }

    // Alice goes offline (without acknowledging her receipts); bob acknowledges m2 meanwhile.
    drop(a1);
    drop(a2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    ack(&mut b, &m2["seq"]).await;
    let (mut a3, info) = login(&server, "alice").await;
    // Two receipts and a message for m1 were pushed, never acknowledged: they come again, in
    // order, then the receipt that waited for her.
    assert_eq!(info["inbox"]["pending"], 4, "{info}");
    let mut seen = Vec::new();
    for _ in 0..4 {
        let v = next_of(&mut a3, &["receipt", "message"]).await;
        seen.push(format!(
            "{}:{}",
            v["push"].as_str().unwrap(),
            v["id"].as_str().unwrap()
        ));
        ack(&mut a3, &v["seq"]).await;
    }
    assert_eq!(
        seen,
        ["receipt:m1", "receipt:m1", "message:r1", "receipt:m2"]
    );

    // History of the conversation, seen from both sides, for members only.
    let page = ok(&mut a3, "chat_history", json!({"user": "bob"})).await;
    let ids: Vec<_> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, [json!("m1"), json!("m2"), json!("r1")]);
    let offsets: Vec<_> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].clone())
        .collect();
    assert_eq!(offsets, [json!(1), json!(2), json!(3)]);
    let older = ok(
        &mut a3,
        "chat_history",
        json!({"user": "bob", "before": 3, "limit": 1}),
    )
    .await;
    assert_eq!(older["messages"][0]["id"], "m2");
    assert_eq!(older["more"], true);
    // Unread: bob read m1 but not m2.
    let unread = ok(&mut b, "unread", json!({})).await;
    assert_eq!(
        unread["conversations"],
        json!([{"user": "alice", "unread": 1}])
    );
}

/// A group of three with one member offline: everything arrives on reconnect, in order; each
/// member's acknowledgement is its own delivered receipt; members and presence.
#[tokio::test]
async fn group_with_an_offline_member() {
    let server = Server::start(&config(""));
    let (mut carol, _) = login(&server, "carol").await;
    assert_eq!(
        ok(&mut carol, "group_join", json!({"group": "team"})).await["created"],
        true
    );
    drop(carol);
    let (mut alice, _) = login(&server, "alice").await;
    let (mut bob, _) = login(&server, "bob").await;
    assert_eq!(
        ok(&mut alice, "group_join", json!({"group": "team"})).await["created"],
        false
    );
    ok(&mut bob, "group_join", json!({"group": "team"})).await;
    assert_eq!(
        error_code(&mut bob, "group_join", json!({"group": "team"})).await,
        108
    );
    // Alice hears bob join.
    let joined = next_of(&mut alice, &["member"]).await;
    assert_eq!(
        (joined["event"].as_str(), joined["user"].as_str()),
        (Some("joined"), Some("bob"))
    );

    let members = ok(&mut alice, "group_members", json!({"group": "team"})).await;
    assert_eq!(
        members["members"],
        json!([
            {"user": "alice", "online": true},
            {"user": "bob", "online": true},
            {"user": "carol", "online": false}
        ])
    );
    assert_eq!(
        ok(&mut bob, "groups", json!({})).await["groups"],
        json!(["team"])
    );

    for i in 0..3 {
        let r = ok(
            &mut alice,
            "send",
            json!({"group": "team", "id": format!("g{i}"), "data": i}),
        )
        .await;
        assert_eq!(r["recipients"], 2);
    }
    for i in 0..3 {
        let m = message(&mut bob).await;
        assert_eq!(
            (m["id"].clone(), m["group"].as_str()),
            (json!(format!("g{i}")), Some("team"))
        );
        ack(&mut bob, &m["seq"]).await;
    }
    let (mut carol, info) = login(&server, "carol").await;
    assert_eq!(info["inbox"]["pending"], 3);
    let mut seqs = Vec::new();
    for i in 0..3 {
        let m = message(&mut carol).await;
        assert_eq!(m["id"], format!("g{i}"));
        assert_eq!(m["from"], "alice");
        seqs.push(m["seq"].clone());
    }
    // One ack for several entries.
    assert_eq!(
        ok(&mut carol, "ack", json!({"seq": seqs})).await["acked"],
        3
    );
    let mut delivered = Vec::new();
    for _ in 0..6 {
        let r = receipt(&mut alice).await;
        assert_eq!(r["status"], "delivered");
        assert_eq!(r["group"], "team");
        delivered.push(format!(
            "{}:{}",
            r["id"].as_str().unwrap(),
            r["by"].as_str().unwrap()
        ));
    }
    delivered.sort();
    assert_eq!(
        delivered,
        [
            "g0:bob", "g0:carol", "g1:bob", "g1:carol", "g2:bob", "g2:carol"
        ]
    );
    // Per-member read markers: carol read up to g1, bob nothing.
    ok(&mut carol, "read", json!({"id": "g1"})).await;
    let r = receipt(&mut alice).await;
    assert_eq!(
        (r["status"].as_str(), r["by"].as_str(), r["id"].as_str()),
        (Some("read"), Some("carol"), Some("g1"))
    );
    assert_eq!(
        ok(&mut carol, "unread", json!({})).await["conversations"],
        json!([{"group": "team", "unread": 1}])
    );
    assert_eq!(
        ok(&mut bob, "unread", json!({})).await["conversations"],
        json!([{"group": "team", "unread": 3}])
    );

    // Typing reaches the others, and is stored nowhere.
    ok(&mut bob, "typing", json!({"group": "team"})).await;
    let t = next_of(&mut alice, &["typing"]).await;
    assert_eq!(
        (t["from"].as_str(), t["group"].as_str()),
        (Some("bob"), Some("team"))
    );
    // Carol leaves: the others hear it, and she can no longer send or read history.
    ok(&mut carol, "group_leave", json!({"group": "team"})).await;
    loop {
        let m = next_of(&mut bob, &["member"]).await;
        if m["event"] == "left" {
            assert_eq!(m["user"], "carol");
            break;
        }
    }
    assert_eq!(
        error_code(&mut carol, "send", json!({"group": "team", "data": 1})).await,
        107
    );
    assert_eq!(
        error_code(&mut carol, "chat_history", json!({"group": "team"})).await,
        107
    );
    // Bob going offline is announced to the remaining members.
    drop(bob);
    loop {
        let m = next_of(&mut alice, &["member"]).await;
        if m["event"] == "offline" {
            assert_eq!(m["user"], "bob");
            break;
        }
    }
}

/// Pushed but not acknowledged: pushed again first after reconnecting; after the ack, never.
#[tokio::test]
async fn redelivered_until_acknowledged() {
    let server = Server::start(&config(""));
    register(&server, &["bob"]).await;
    let (mut alice, _) = login(&server, "alice").await;
    let (mut bob, _) = login(&server, "bob").await;
    ok(
        &mut alice,
        "send",
        json!({"user": "bob", "id": "x1", "data": 1}),
    )
    .await;
    assert_eq!(message(&mut bob).await["id"], "x1");
    drop(bob);
    tokio::time::sleep(Duration::from_millis(100)).await;
    ok(
        &mut alice,
        "send",
        json!({"user": "bob", "id": "x2", "data": 2}),
    )
    .await;
    let (mut bob, info) = login(&server, "bob").await;
    assert_eq!(info["inbox"]["pending"], 2);
    let first = message(&mut bob).await;
    assert_eq!(first["id"], "x1", "the unacknowledged one comes first");
    let second = message(&mut bob).await;
    assert_eq!(second["id"], "x2");
    // Acknowledged by id this time (the sender disambiguates ids of different senders).
    assert_eq!(
        ok(&mut bob, "ack", json!({"id": "x1", "from": "alice"})).await["acked"],
        1
    );
    assert_eq!(ok(&mut bob, "ack", json!({"id": "x2"})).await["acked"], 1);
    assert_eq!(
        ok(&mut bob, "ack", json!({"id": "nope"})).await["acked"],
        0,
        "unknown id: no-op"
    );
    drop(bob);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (mut bob, info) = login(&server, "bob").await;
    assert_eq!(info["inbox"]["pending"], 0);
    bob.expect_silence(Duration::from_millis(300)).await;
}

/// Each bad input gets its documented error and stores nothing.
#[tokio::test]
async fn bad_chat_input_is_refused() {
    let server = Server::start(&config("max_message_size = 64"));
    register(&server, &["bob"]).await;
    let (mut alice, _) = login(&server, "alice").await;
    let (mut bob, _) = login(&server, "bob").await;
    ok(&mut bob, "group_join", json!({"group": "bobs"})).await;

    assert_eq!(
        error_code(&mut alice, "send", json!({"user": "nobody", "data": 1})).await,
        113
    );
    assert_eq!(
        error_code(&mut alice, "send", json!({"group": "nogroup", "data": 1})).await,
        113
    );
    assert_eq!(
        error_code(&mut alice, "send", json!({"group": "bobs", "data": 1})).await,
        107
    );
    assert_eq!(
        error_code(&mut alice, "send", json!({"user": "alice", "data": 1})).await,
        101
    );
    let big = "x".repeat(100);
    assert_eq!(
        error_code(&mut alice, "send", json!({"user": "bob", "data": big})).await,
        110
    );
    assert_eq!(
        error_code(&mut alice, "send", json!({"user": "bob"})).await,
        101
    );
    assert_eq!(
        error_code(
            &mut alice,
            "send",
            json!({"user": "bob", "group": "bobs", "data": 1})
        )
        .await,
        101
    );
    assert_eq!(
        error_code(
            &mut alice,
            "send",
            json!({"user": "bob", "id": "", "data": 1})
        )
        .await,
        101
    );
    assert_eq!(
        error_code(&mut alice, "group_members", json!({"group": "bobs"})).await,
        107
    );
    // Joining where the namespace forbids it: no client_join, or a user-limited group.
    assert_eq!(
        error_code(&mut alice, "group_join", json!({"group": "closed:x"})).await,
        107
    );
    assert_eq!(
        error_code(
            &mut alice,
            "group_join",
            json!({"group": "dm:pair#bob,carol"})
        )
        .await,
        107
    );
    assert_eq!(
        ok(
            &mut alice,
            "group_join",
            json!({"group": "dm:pair#alice,bob"})
        )
        .await["created"],
        true
    );
    assert_eq!(
        error_code(&mut alice, "group_join", json!({"group": "nons:x"})).await,
        106
    );
    assert_eq!(
        error_code(&mut alice, "groups", json!({"all": true})).await,
        107
    );
    // Nothing of the refused sends reached bob.
    bob.expect_silence(Duration::from_millis(300)).await;

    // Acknowledging someone else's message is refused; acknowledging an unknown one is a no-op.
    register(&server, &["carol"]).await;
    ok(
        &mut bob,
        "send",
        json!({"user": "carol", "id": "for-carol", "data": 1}),
    )
    .await;
    assert_eq!(
        error_code(&mut alice, "ack", json!({"id": "for-carol"})).await,
        107
    );
    assert_eq!(
        error_code(&mut alice, "read", json!({"id": "for-carol"})).await,
        107
    );
    assert_eq!(ok(&mut alice, "ack", json!({"seq": 999})).await["acked"], 0);
    assert_eq!(error_code(&mut alice, "ack", json!({})).await, 101);

    // A retried send with the same id is stored once.
    let first = ok(
        &mut alice,
        "send",
        json!({"user": "bob", "id": "once", "data": 1}),
    )
    .await;
    let again = ok(
        &mut alice,
        "send",
        json!({"user": "bob", "id": "once", "data": 1}),
    )
    .await;
    assert_eq!(
        (first["duplicate"].clone(), again["duplicate"].clone()),
        (json!(false), json!(true))
    );
    assert_eq!(first["ts"], again["ts"]);
    assert_eq!(message(&mut bob).await["id"], "once");
    bob.expect_silence(Duration::from_millis(300)).await;

    // Anonymous connections have no chat.
    let mut anon = Client::open(&server.ws_url()).await;
    let reply = anon.request("connect", json!({})).await;
    assert!(
        reply["error"].is_object(),
        "anonymous is off with a token key: {reply}"
    );
}

/// Accepted messages survive kill -9: all arrive after the restart, in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_messages_survive_kill_9() {
    let server = Server::start(&config(""));
    register(&server, &["bob"]).await;
    let (mut alice, _) = login(&server, "alice").await;
    // Pipelined sends; each reply is an acceptance.
    for i in 0..200 {
        alice
            .send_text(
                json!({"id": i + 1, "method": "send", "params": {"user": "bob", "id": format!("k{i}"), "data": i}})
                    .to_string(),
            )
            .await;
    }
    for i in 0..200 {
        let reply = alice.reply_to(json!(i + 1)).await;
        assert_eq!(reply["result"]["status"], "accepted", "{reply}");
    }
    let dir = server.kill9();
    let server = Server::start_in(dir, &config(""), &["--backend-key", KEY]);
    let (mut bob, info) = login(&server, "bob").await;
    assert_eq!(info["inbox"]["pending"], 200);
    for i in 0..200 {
        let m = message(&mut bob).await;
        assert_eq!(m["id"], format!("k{i}"));
        assert_eq!(m["data"], i);
    }
    bob.expect_silence(Duration::from_millis(300)).await;
}

/// A backlog beyond the window comes in slices as the client acknowledges, and a message sent
/// meanwhile waits for the older ones. The inbox's size bound reports what it dropped.
#[tokio::test]
async fn large_backlogs_come_in_windows_and_drops_are_reported() {
    let server = Server::start(&config("window = 10\ninbox_size = 30"));
    register(&server, &["bob"]).await;
    let (mut alice, _) = login(&server, "alice").await;
    for i in 0..35 {
        ok(
            &mut alice,
            "send",
            json!({"user": "bob", "id": format!("w{i}"), "data": i}),
        )
        .await;
    }
    let (mut bob, info) = login(&server, "bob").await;
    assert_eq!(
        info["inbox"],
        json!({"pending": 10, "dropped": 5, "reset": false})
    );
    let mut got = Vec::new();
    let mut first = Vec::new();
    while got.len() < 10 {
        let m = message(&mut bob).await;
        got.push(m["data"].as_i64().unwrap());
        first.push(m["seq"].clone());
    }
    // The rest waits for acknowledgements; a message sent meanwhile waits behind it.
    bob.expect_silence(Duration::from_millis(200)).await;
    ok(
        &mut alice,
        "send",
        json!({"user": "bob", "id": "late", "data": 99}),
    )
    .await;
    bob.expect_silence(Duration::from_millis(200)).await;
    for seq in &first {
        ack(&mut bob, seq).await;
    }
    while got.len() < 31 {
        let m = message(&mut bob).await;
        got.push(m["data"].as_i64().unwrap());
        ack(&mut bob, &m["seq"]).await;
    }
    let expected: Vec<i64> = (5..35).chain([99]).collect();
    assert_eq!(got, expected);
    bob.expect_silence(Duration::from_millis(200)).await;
}

/// The backend: users, groups, members, sending as the system or a user, history, unread.
#[tokio::test]
async fn backend_chat_api() {
    let server = Server::start(&config(""));
    let (status, body) = api(
        &server,
        "POST",
        "/api/chat/groups",
        Some(json!({"group": "ops", "members": ["ann", "ben"]})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"created": true, "added": 2}));
    let (_, body) = api(
        &server,
        "POST",
        "/api/chat/groups",
        Some(json!({"group": "ops"})),
    )
    .await;
    assert_eq!(body["created"], false);
    let (mut ann, _) = login(&server, "ann").await;
    let (status, body) = api(
        &server,
        "POST",
        "/api/chat/send",
        Some(json!({"group": "ops", "data": {"alert": 1}})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["recipients"], 2);
    let m = message(&mut ann).await;
    assert_eq!(
        (m["from"].as_str(), m["data"].clone()),
        (Some(""), json!({"alert": 1}))
    );
    let (status, _) = api(
        &server,
        "POST",
        "/api/chat/send",
        Some(json!({"from": "ben", "user": "ann", "id": "b1", "data": "hey"})),
    )
    .await;
    assert_eq!(status, 200);
    // Inboxes are internal streams: never listed as channels.
    let (_, body) = api(&server, "GET", "/api/channels", None).await;
    assert_eq!(body["channels"], json!([]), "{body}");
    let m = message(&mut ann).await;
    assert_eq!(
        (m["from"].as_str(), m["id"].as_str()),
        (Some("ben"), Some("b1"))
    );

    let (status, body) = api(&server, "GET", "/api/chat/history?group=ops", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["messages"][0]["data"], json!({"alert": 1}));
    let (_, body) = api(&server, "GET", "/api/chat/history?user=ann&with=ben", None).await;
    assert_eq!(body["messages"][0]["id"], "b1");
    let (_, body) = api(&server, "GET", "/api/chat/unread?user=ann", None).await;
    let mut convs = body["conversations"].as_array().unwrap().clone();
    convs.sort_by_key(|c| c.to_string());
    assert_eq!(
        convs,
        [
            json!({"group": "ops", "unread": 1}),
            json!({"user": "ben", "unread": 1})
        ]
    );

    let (status, body) = api(
        &server,
        "POST",
        "/api/chat/members",
        Some(json!({"group": "ops", "add": ["cat"], "remove": ["ben"]})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"added": 1, "removed": 1}));
    let (_, body) = api(&server, "GET", "/api/chat/members?group=ops", None).await;
    assert_eq!(
        body["members"],
        json!([{"user": "ann", "online": true}, {"user": "cat", "online": false}])
    );
    let (_, body) = api(&server, "GET", "/api/chat/groups?user=cat", None).await;
    assert_eq!(body["groups"], json!(["ops"]));

    let (status, _) = api(
        &server,
        "POST",
        "/api/chat/send",
        Some(json!({"user": "ghost", "data": 1})),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = api(
        &server,
        "POST",
        "/api/chat/send",
        Some(json!({"group": "ops", "from": "ben", "data": 1})),
    )
    .await;
    assert_eq!(status, 403, "ben was removed");
    let (status, _) = api(
        &server,
        "POST",
        "/api/chat/send",
        Some(json!({"user": "ann", "data": 1, "sender": "x"})),
    )
    .await;
    assert_eq!(status, 400);

    let (status, _) = api(
        &server,
        "POST",
        "/api/chat/groups/delete",
        Some(json!({"group": "ops"})),
    )
    .await;
    assert_eq!(status, 200);
    let d = next_of(&mut ann, &["group_deleted"]).await;
    assert_eq!(d["group"], "ops");
    let (status, _) = api(&server, "GET", "/api/chat/members?group=ops", None).await;
    assert_eq!(status, 404);
    // Created again: a new conversation, the old history is not shown to its members.
    api(
        &server,
        "POST",
        "/api/chat/groups",
        Some(json!({"group": "ops", "members": ["ann"]})),
    )
    .await;
    let (_, body) = api(&server, "GET", "/api/chat/history?group=ops", None).await;
    assert_eq!(body["messages"], json!([]));
}

/// A message still unacknowledged after `undelivered_after_secs` is POSTed to the app, retried
/// until the app takes it; an acknowledged one is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undelivered_messages_reach_the_webhook() {
    use axum::routing::post;
    use std::sync::{Arc, Mutex};
    let calls: Arc<Mutex<Vec<Value>>> = Arc::default();
    let seen = Arc::clone(&calls);
    let app = axum::Router::new().route(
        "/undelivered",
        post(move |axum::Json(body): axum::Json<Value>| {
            let seen = Arc::clone(&seen);
            async move {
                let mut calls = seen.lock().unwrap();
                calls.push(body);
                // The first call fails: the webhook must retry.
                if calls.len() == 1 {
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    axum::http::StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let server = Server::start(&config(&format!(
        "undelivered_webhook_url = \"http://{addr}/undelivered\"\nundelivered_after_secs = 1"
    )));
    register(&server, &["bob"]).await;
    let (mut bob, _) = login(&server, "bob").await;
    let (mut alice, _) = login(&server, "alice").await;
    ok(
        &mut alice,
        "send",
        json!({"user": "bob", "id": "acked", "data": 1}),
    )
    .await;
    ok(
        &mut alice,
        "send",
        json!({"user": "bob", "id": "ignored", "data": 2}),
    )
    .await;
    let first = message(&mut bob).await;
    assert_eq!(first["id"], "acked");
    ack(&mut bob, &first["seq"]).await;
    // Due after 1 s, then one retry after 1 s more.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while calls.lock().unwrap().len() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "one failed call and its retry: {calls:?}");
    for call in &calls {
        assert_eq!(call["event"], "undelivered");
        assert_eq!(call["id"], "ignored");
        assert_eq!(call["from"], "alice");
        assert_eq!(call["recipient"], "bob");
        assert_eq!(call["to"], "bob");
    }
}
