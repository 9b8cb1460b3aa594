//! Keep-alive, connect timeout, graceful shutdown, key generation and the CLI, against the real
//! binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Client, KEY, Server, http};
use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn unanswered_pings_close_with_3002_and_answered_ones_keep_the_connection() {
    let server = Server::start("ping_interval_secs = 1\n");
    let mut lively = Client::connect(&server.ws_url()).await;
    let mut silent = Client::connect(&server.ws_url()).await;

    // The lively client keeps reading (tungstenite answers each ping) for 3.5 intervals.
    let deadline = Instant::now() + Duration::from_millis(3500);
    let mut pings = 0;
    while let Ok(next) = tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()),
        lively.ws.next(),
    )
    .await
    {
        match next {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("lively client got {other:?}"),
        }
    }
    assert!(pings >= 2, "only {pings} pings in 3.5 s");
    assert_eq!(lively.request("ping", json!({})).await["result"], json!({}));

    // The silent one read nothing meanwhile, so it answered no ping.
    assert_eq!(silent.close_code().await, Some(3002));
    assert_eq!(
        server
            .metric("plaza_disconnects_total{code=\"3002\",reason=\"no pong\"}")
            .await,
        1
    );
}

#[tokio::test]
async fn a_connection_without_connect_is_closed_with_3003() {
    let server = Server::start("connect_timeout_secs = 1\nping_interval_secs = 0\n");
    let mut idle = Client::open(&server.ws_url()).await;
    let started = Instant::now();
    let mut ok = Client::connect(&server.ws_url()).await;
    assert_eq!(idle.close_code().await, Some(3003));
    assert!(started.elapsed() < Duration::from_secs(5));
    // A connected client is not affected.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(ok.request("ping", json!({})).await["result"], json!({}));
}

#[tokio::test]
async fn sigterm_closes_connections_with_3000_and_exits_0() {
    let mut server = Server::start("");
    let mut a = Client::connect(&server.ws_url()).await;
    let mut b = Client::connect(&server.ws_url()).await;
    b.request("subscribe", json!({"channel": "x"})).await;
    let status = server.terminate();
    assert!(status.success(), "exit status {status}");
    assert_eq!(a.close_code().await, Some(3000));
    assert_eq!(b.close_code().await, Some(3000));
    assert!(
        server.log().iter().any(|l| l.contains("shutting down")),
        "{:?}",
        server.log()
    );
}

#[tokio::test]
async fn without_a_key_one_is_generated_and_required() {
    let server = Server::start_with("", &[]);
    let key_file = server.dir.join("data").join("backend.key");
    let key = std::fs::read_to_string(&key_file).expect("generated key file");
    let key = key.trim();
    assert_eq!(key.len(), 64);
    let body = r#"{"channel":"a","data":1}"#;
    let (status, _) = http(server.backend, "POST", "/api/publish", None, Some(body)).await;
    assert_eq!(status, 401);
    let (status, _) = http(
        server.backend,
        "POST",
        "/api/publish",
        Some(key),
        Some(body),
    )
    .await;
    assert_eq!(status, 200);
    assert!(server.log().is_empty() || !server.log().iter().any(|l| l.contains(key)));
}

fn plaza() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_plaza"));
    for var in [
        "PLAZA_CONFIG",
        "PLAZA_LISTEN",
        "PLAZA_BACKEND_LISTEN",
        "PLAZA_DATA_DIR",
        "PLAZA_BACKEND_KEY",
    ] {
        c.env_remove(var);
    }
    c
}

#[test]
fn version_flag() {
    let out = plaza().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("plaza {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_config_layers_file_env_and_flags() {
    let dir = common::temp_dir();
    let file = dir.join("p.toml");
    std::fs::write(
        &file,
        "listen = \"0.0.0.0:9000\"\nbackend_key = \"s3cret-value\"\n[namespaces.chat]\nclient_publish = true\n",
    )
    .unwrap();
    let out = plaza()
        .arg("check-config")
        .arg(&file)
        .env("PLAZA_LISTEN", "127.0.0.1:9100")
        .env("PLAZA_DATA_DIR", "/var/lib/plaza")
        .args(["--data-dir", "/srv/plaza"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("listen = \"127.0.0.1:9100\""), "{text}"); // env over file
    assert!(text.contains("data_dir = \"/srv/plaza\""), "{text}"); // flag over env
    assert!(text.contains("[namespaces.chat]"), "{text}");
    assert!(!text.contains("s3cret-value"), "{text}");

    std::fs::write(&file, "[limits]\nmax_frame_size = 0\n").unwrap();
    let out = plaza().arg("check-config").arg(&file).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_frame_size"));

    std::fs::write(&file, "listn = 1\n").unwrap();
    let out = plaza().arg("check-config").arg(&file).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field"));

    let out = plaza()
        .arg("check-config")
        .arg(dir.join("missing.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serve_fails_clearly_when_the_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = common::temp_dir();
    let out = plaza()
        .args([
            "serve",
            "--listen",
            &addr,
            "--backend-listen",
            "127.0.0.1:0",
        ])
        .args(["--backend-key", KEY])
        .arg("--data-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("cannot listen on {addr}")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
