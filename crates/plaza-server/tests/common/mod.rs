//! Test harness: starts the real `plaza` binary on ephemeral loopback ports and talks to it with
//! tokio-tungstenite and a minimal HTTP/1.1 client.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const KEY: &str = "test-backend-key-0123456789";
/// Bound on every wait in these tests.
pub const WAIT: Duration = Duration::from_secs(20);

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

pub struct Server {
    child: Child,
    pub public: SocketAddr,
    pub backend: SocketAddr,
    pub dir: PathBuf,
    /// Lines of stderr after startup, collected by a thread.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

pub fn temp_dir() -> PathBuf {
    let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("plaza-e2e-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

impl Server {
    /// Starts `plaza serve` with `config` as its TOML file plus `args`.
    pub fn start_with(config: &str, args: &[&str]) -> Server {
        Server::start_in(temp_dir(), config, args)
    }

    /// Like [`Server::start_with`], in `dir` (its data directory is `dir/data`), so a test can
    /// start a second server on the same data after the first one died.
    pub fn start_in(dir: PathBuf, config: &str, args: &[&str]) -> Server {
        let config_path = dir.join("plaza.toml");
        std::fs::write(&config_path, config).expect("write config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_plaza"))
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .args(["--listen", "127.0.0.1:0", "--backend-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn plaza");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let (mut public, mut backend) = (None, None);
        let deadline = Instant::now() + WAIT;
        while public.is_none() || backend.is_none() {
            assert!(Instant::now() < deadline, "plaza did not start in time");
            let Some(Ok(line)) = lines.next() else {
                panic!("plaza exited before listening");
            };
            let addr = || -> SocketAddr {
                let start = line.find("addr=").expect("addr=") + 5;
                let rest = &line[start..];
                let end = rest.find(' ').unwrap_or(rest.len());
                rest[..end].parse().expect("socket address")
            };
            if line.contains("public listener bound") {
                public = Some(addr());
            } else if line.contains("backend listener bound") {
                backend = Some(addr());
            }
        }
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Server {
            child,
            public: public.unwrap(),
            backend: backend.unwrap(),
            dir,
            log,
        }
    }

    pub fn start(config: &str) -> Server {
        Server::start_with(config, &["--backend-key", KEY])
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/plaza/ws", self.public)
    }

    /// SIGKILL: no shutdown code runs. Returns the directory, to restart on the same data.
    pub fn kill9(mut self) -> PathBuf {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = std::mem::take(&mut self.dir);
        std::mem::forget(self);
        dir
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Sends SIGTERM and waits for the exit status (bounded).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "plaza did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Value of one metric line (exact name with labels) from `/metrics`.
    pub async fn metric(&self, name: &str) -> u64 {
        let (_, body) = http(self.backend, "GET", "/metrics", None, None).await;
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("metric {name} missing"))
            .trim()
            .parse()
            .expect("metric value")
    }

    pub async fn publish(&self, channel: &str, data: Value) -> (u16, String) {
        let body = json!({"channel": channel, "data": data}).to_string();
        http(self.backend, "POST", "/api/publish", Some(KEY), Some(&body)).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs `plaza check-config` on `config`, asserts that it is refused, and returns what it printed
/// on stderr.
pub fn check_config_error(config: &str) -> String {
    let dir = temp_dir();
    let file = dir.join("p.toml");
    std::fs::write(&file, config).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_plaza"))
        .arg("check-config")
        .arg(&file)
        .env_remove("PLAZA_CONFIG")
        .output()
        .expect("run check-config");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "accepted: {config}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One HTTP/1.1 request with `Connection: close`; returns status and body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect backend");
    let body = body.unwrap_or("");
    let key_header = key
        .map(|k| format!("X-Plaza-Key: {k}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{key_header}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("http timeout")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text[9..12].parse().expect("status");
    let (head, body) = text.split_once("\r\n\r\n").expect("head");
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A native-protocol client.
pub struct Client {
    pub ws: Ws,
    next_id: u64,
    /// Pushes that arrived while waiting for a reply.
    pub pushes: std::collections::VecDeque<Value>,
    /// Objects of a text frame not returned yet (a frame may carry several, one per line).
    lines: std::collections::VecDeque<Value>,
}

impl Client {
    pub async fn open(url: &str) -> Client {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("ws connect timeout")
            .expect("ws connect");
        Client::from_ws(ws)
    }

    pub fn from_ws(ws: Ws) -> Client {
        Client {
            ws,
            next_id: 1,
            pushes: Default::default(),
            lines: Default::default(),
        }
    }

    /// Opens and sends `connect`.
    pub async fn connect(url: &str) -> Client {
        let mut c = Client::open(url).await;
        let reply = c.request("connect", json!({})).await;
        assert!(reply.get("result").is_some(), "connect failed: {reply}");
        c
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        self.ws
            .send(Message::Text(text.into().into()))
            .await
            .expect("send");
    }

    /// Sends a request and returns the whole reply object.
    pub async fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send_text(json!({"id": id, "method": method, "params": params}).to_string())
            .await;
        self.reply_to(json!(id)).await
    }

    /// Waits for the reply whose id is `id`, keeping pushes aside.
    pub async fn reply_to(&mut self, id: Value) -> Value {
        loop {
            let v = self.next_json().await;
            if v.get("push").is_some() {
                self.pushes.push_back(v);
            } else {
                assert_eq!(v["id"], id, "unexpected reply {v}");
                return v;
            }
        }
    }

    /// The next JSON object the server sent (pings are answered by tungstenite). A text frame
    /// carries one or more, one per line: the rest are kept for the next calls.
    pub async fn next_json(&mut self) -> Value {
        loop {
            if let Some(v) = self.lines.pop_front() {
                return v;
            }
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for a frame")
                .expect("stream ended")
                .expect("ws error");
            match msg {
                Message::Text(t) => self.lines.extend(split_frame(&t)),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// The next publication push.
    pub async fn next_push(&mut self) -> Value {
        if let Some(v) = self.pushes.pop_front() {
            return v;
        }
        let v = self.next_json().await;
        assert_eq!(v["push"], "publication", "not a publication: {v}");
        v
    }

    /// Asserts nothing arrives within `quiet`.
    pub async fn expect_silence(&mut self, quiet: Duration) {
        assert!(self.pushes.is_empty(), "pending pushes: {:?}", self.pushes);
        assert!(self.lines.is_empty(), "pending frames: {:?}", self.lines);
        // Keep-alive pings are not messages: the server may send one at any time.
        let deadline = Instant::now() + quiet;
        while let Ok(Some(Ok(msg))) = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            self.ws.next(),
        )
        .await
        {
            if !matches!(msg, Message::Ping(_) | Message::Pong(_)) {
                panic!("expected silence, got {msg:?}");
            }
        }
    }

    /// Reads until the server closes; returns the close code (None if the socket just ended).
    pub async fn close_code(&mut self) -> Option<u16> {
        read_close_code(&mut self.ws).await
    }
}

/// The JSON objects of one native text frame: one per line (docs/PROTOCOL.md, "Frames").
pub fn split_frame(text: &str) -> Vec<Value> {
    text.split('\n')
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("json line {line:?}: {e}"))
        })
        .collect()
}

/// Reads any WebSocket stream until the server closes; returns the close code (None if the
/// socket ended without a close frame).
pub async fn read_close_code<S>(ws: &mut S) -> Option<u16>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Err(_) => panic!("no close within {WAIT:?}"),
            Ok(None) | Ok(Some(Err(_))) => return None,
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => continue,
        }
    }
}
