//! Live views against the real binary: tokens from the app, deltas routed per dealer, bad input.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Client, KEY, Server, http};
use serde_json::{Value, json};

const CONFIG: &str = r#"
[live]
token_ttl_secs = 2
client_dealers = ["players"]
[[live.dealers]]
name = "players"
model = "Player"
kind = "filter"
[[live.dealers]]
name = "team"
model = "Player"
kind = "key"
key = "team.name"
[[live.dealers]]
name = "everything"
model = "Player"
kind = "broadcast"
"#;

async fn post(server: &Server, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = http(
        server.backend,
        "POST",
        path,
        Some(KEY),
        Some(&body.to_string()),
    )
    .await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn authorize(server: &Server, items: Value) -> String {
    let (status, v) = post(server, "/api/live/authorize", json!({"items": items})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["expires_in"], 2);
    let token = v["token"].as_str().unwrap().to_owned();
    assert_eq!(token.len(), 32, "128-bit token");
    token
}

async fn deltas(server: &Server, deltas: Value) -> (u16, Value) {
    post(server, "/api/deltas", deltas).await
}

fn player(id: u64, color: &str, team: &str) -> Value {
    json!({"id": id, "color": color, "team": {"name": team}})
}

#[tokio::test]
async fn granted_views_buffer_until_redeemed_then_go_live() {
    let server = Server::start(CONFIG);
    let token = authorize(
        &server,
        json!([
            {"dealer": "players", "query": ["==", "color", "blue"]},
            {"dealer": "team", "query": "red"}
        ]),
    )
    .await;
    // A change between the app's read and the client's redeem is not lost.
    let (status, v) = deltas(
        &server,
        json!([{"type": "insert", "model": "Player", "data": player(1, "blue", "red")}]),
    )
    .await;
    assert_eq!((status, &v), (200, &json!({"deltas": 1, "deliveries": 2})));

    let mut c = Client::connect(&server.ws_url()).await;
    let r = c.request("live_subscribe", json!({"token": token})).await;
    let subs = r["result"]["subscriptions"].as_array().unwrap().clone();
    assert_eq!(subs.len(), 2, "{r}");
    let (by_color, by_team) = (subs[0].clone(), subs[1].clone());
    let mut first: Vec<Value> = vec![c.next_json().await, c.next_json().await];
    first.sort_by_key(|v| v["subscription"].as_str().unwrap().to_owned());
    for push in &first {
        assert_eq!(push["push"], "delta");
        assert_eq!(
            push["delta"],
            json!({"type": "insert", "model": "Player", "data": player(1, "blue", "red")})
        );
    }

    // Live now: an update that leaves the blue view is a delete there, an update in the red team.
    deltas(
        &server,
        json!({"deltas": [{"type": "update", "model": "Player",
        "oldData": player(1, "blue", "red"), "newData": player(1, "green", "red")}]}),
    )
    .await;
    let mut got = [c.next_json().await, c.next_json().await];
    got.sort_by_key(|v| v["subscription"].as_str().unwrap().to_owned());
    let kinds: Vec<(Value, Value)> = got
        .iter()
        .map(|v| (v["subscription"].clone(), v["delta"]["type"].clone()))
        .collect();
    let mut expected = vec![
        (by_color.clone(), json!("delete")),
        (by_team.clone(), json!("update")),
    ];
    expected.sort_by_key(|(s, _)| s.as_str().unwrap().to_owned());
    assert_eq!(kinds, expected);
    let delete = got.iter().find(|v| v["subscription"] == by_color).unwrap();
    assert_eq!(
        delete["delta"]["data"],
        player(1, "blue", "red"),
        "the row as the view knew it"
    );

    // Other models and other teams reach nobody here.
    deltas(
        &server,
        json!([
            {"type": "insert", "model": "Game", "data": {"id": 9}},
            {"type": "insert", "model": "Player", "data": player(2, "green", "blue")}
        ]),
    )
    .await;
    c.expect_silence(Duration::from_millis(300)).await;

    // The token was single-use.
    let mut other = Client::connect(&server.ws_url()).await;
    let r = other
        .request("live_subscribe", json!({"token": token}))
        .await;
    assert_eq!(r["error"]["code"], 107, "{r}");

    // Cancel stops deliveries; disconnect drops the rest.
    let r = c
        .request("live_cancel", json!({"subscription": by_team}))
        .await;
    assert_eq!(r["result"], json!({}));
    let r = c
        .request("live_cancel", json!({"subscription": by_team}))
        .await;
    assert_eq!(r["error"]["code"], 109, "{r}");
    deltas(
        &server,
        json!([{"type": "delete", "model": "Player", "data": player(3, "red", "red")}]),
    )
    .await;
    c.expect_silence(Duration::from_millis(300)).await;
    let (_, info) = http(server.backend, "GET", "/api/info", Some(KEY), None).await;
    assert_eq!(
        serde_json::from_str::<Value>(&info).unwrap()["live_views"],
        1
    );
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, info) = http(server.backend, "GET", "/api/info", Some(KEY), None).await;
    assert_eq!(
        serde_json::from_str::<Value>(&info).unwrap()["live_views"],
        0
    );
}

#[tokio::test]
async fn broadcast_and_client_queries() {
    let server = Server::start(CONFIG);
    let mut c = Client::connect(&server.ws_url()).await;
    let token = authorize(&server, json!([{"dealer": "everything", "query": null}])).await;
    c.request("live_subscribe", json!({"token": token})).await;
    let r = c
        .request("live_subscribe_query", json!({"dealer": "players", "query": ["and", ["==", "color", "blue"], [">=", "id", 10]]}))
        .await;
    let own = r["result"]["subscriptions"][0].clone();
    deltas(
        &server,
        json!([{"type": "insert", "model": "Player", "data": player(5, "blue", "x")}]),
    )
    .await;
    let p = c.next_json().await;
    assert_ne!(p["subscription"], own, "id 5 < 10: only the broadcast view");
    deltas(
        &server,
        json!([{"type": "insert", "model": "Player", "data": player(12, "blue", "x")}]),
    )
    .await;
    let mut subs = [
        c.next_json().await["subscription"].clone(),
        c.next_json().await["subscription"].clone(),
    ];
    subs.sort_by_key(|v| v.as_str().unwrap().to_owned());
    assert!(subs.contains(&own));

    // Dealers not open to clients, unknown dealers, bad filters.
    let r = c
        .request(
            "live_subscribe_query",
            json!({"dealer": "team", "query": "red"}),
        )
        .await;
    assert_eq!(r["error"]["code"], 107, "{r}");
    let r = c
        .request(
            "live_subscribe_query",
            json!({"dealer": "nope", "query": 1}),
        )
        .await;
    assert_eq!(r["error"]["code"], 101, "{r}");
    let r = c
        .request(
            "live_subscribe_query",
            json!({"dealer": "players", "query": ["xor", 1]}),
        )
        .await;
    assert_eq!(r["error"]["code"], 101, "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("xor"),
        "{r}"
    );
}

#[tokio::test]
async fn bad_input_is_refused_and_nothing_is_delivered() {
    let server = Server::start(CONFIG);
    let mut c = Client::connect(&server.ws_url()).await;
    let token = authorize(&server, json!([{"dealer": "everything", "query": null}])).await;
    c.request("live_subscribe", json!({"token": token})).await;

    for (items, needle) in [
        (json!([{"dealer": "ghost", "query": 1}]), "ghost"),
        (
            json!([{"dealer": "players", "query": ["==", "a"]}]),
            "item 0",
        ),
        (
            json!([{"dealer": "players", "query": ["==", "a", 1]}, {"dealer": "players", "query": [">", "a", null]}]),
            "item 1",
        ),
        (json!([]), "items"),
    ] {
        let (status, v) = post(&server, "/api/live/authorize", json!({"items": items})).await;
        assert_eq!(status, 400, "{items}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{items}: {v}"
        );
    }
    // One bad item fails the whole batch, and the good items before it are not delivered.
    for (batch, needle) in [
        (
            json!([{"type": "insert", "model": "Player", "data": {"id": 1}}, {"type": "upsert", "model": "Player", "data": {}}]),
            "item 1",
        ),
        (json!([{"type": "insert", "model": "Player"}]), "item 0"),
        (
            json!([{"type": "update", "model": "Player", "newData": {}}]),
            "item 0",
        ),
        (json!([{"type": "insert", "model": 5, "data": {}}]), "model"),
        (json!({"nope": []}), "deltas"),
        (json!("x"), "deltas"),
    ] {
        let (status, v) = deltas(&server, batch.clone()).await;
        assert_eq!(status, 400, "{batch}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{batch}: {v}"
        );
    }
    c.expect_silence(Duration::from_millis(300)).await;

    // Unknown, expired, and another user's tokens.
    let r = c
        .request(
            "live_subscribe",
            json!({"token": "0123456789abcdef0123456789abcdef"}),
        )
        .await;
    assert_eq!(r["error"]["code"], 107);
    let (_, v) = post(
        &server,
        "/api/live/authorize",
        json!({"items": [{"dealer": "everything", "query": null}], "user": "42"}),
    )
    .await;
    let for_42 = v["token"].as_str().unwrap().to_owned();
    let r = c.request("live_subscribe", json!({"token": for_42})).await;
    assert_eq!(r["error"]["code"], 107, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("another user"),
        "{r}"
    );
    let late = authorize(&server, json!([{"dealer": "everything", "query": null}])).await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let r = c.request("live_subscribe", json!({"token": late})).await;
    assert_eq!(r["error"]["code"], 107, "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("expired"),
        "{r}"
    );
}

#[test]
fn bad_dealer_config_stops_startup() {
    for (config, needle) in [
        (
            "[[live.dealers]]\nname = \"k\"\nmodel = \"M\"\nkind = \"key\"\n",
            "key",
        ),
        ("[live]\nclient_dealers = [\"ghost\"]\n", "ghost"),
        (
            "[[live.dealers]]\nname = \"a\"\nmodel = \"M\"\nkind = \"wat\"\n",
            "wat",
        ),
    ] {
        let err = common::check_config_error(config);
        assert!(err.contains(needle), "{config}: {err}");
    }
}
