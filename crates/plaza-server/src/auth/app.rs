//! Asking the app: on connect (and, where a namespace says so, on subscribe) Plaza POSTs a small
//! JSON document to the app and obeys its answer, as High-templar does. The client's cookies and
//! chosen headers are forwarded as real HTTP headers, so an app with session cookies can decide
//! with the code it already has.
//!
//! The caller must be able to tell "the app said no" from "the app could not answer": the first
//! closes the connection for good, the second asks the client to reconnect later. Hence
//! `Ok(Deny)` for refusals and `Err(AppError::Unavailable | BadAnswer)` for failures. Every call
//! is bounded by `app_timeout_ms`, connection set-up included, and answers are capped in size:
//! a slow or broken app must never pile up stuck connections in Plaza.
//!
//! Error messages name the app URL and are meant for logs; tell the client only to retry.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::StatusCode;
use hyper::http::header::CONTENT_TYPE;
use hyper::http::{HeaderMap, HeaderName, HeaderValue, Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::{AuthConfig, AuthSetupError, parse_app_url, parse_forward_header};

/// Largest answer body read from the app. A decision is a few hundred bytes; the cap keeps a
/// misbehaving app from making Plaza buffer megabytes per connecting client.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Longest deny reason passed on (the app's text may be shown to the client).
const MAX_REASON_LEN: usize = 256;

/// Idle connections to the app are kept this long, so a burst of connects reuses them.
const POOL_IDLE: Duration = Duration::from_secs(30);

/// The part of a client's HTTP upgrade request that is forwarded to the app. Captured once when
/// the WebSocket is accepted ([`AppClient::capture`]) and kept for the connection's life, since
/// `connect` and later `subscribe` calls happen after the upgrade request is gone. Only the
/// configured names are kept, which also bounds the memory per connection.
#[derive(Clone, Default)]
pub struct Forwarded {
    headers: HeaderMap,
    query: Map<String, Value>,
}

/// Hand-written: header values are cookies and credentials and must not reach the logs.
impl std::fmt::Debug for Forwarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarded")
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("query", &self.query.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A connection asking to be let in.
#[derive(Debug, Clone, Copy)]
pub struct AppConnectRequest<'a> {
    /// The connection id Plaza assigned.
    pub client: &'a str,
    /// The wire protocol, e.g. `"native"`.
    pub protocol: &'a str,
    pub forwarded: &'a Forwarded,
    /// The JSON the client sent with `connect`, passed on verbatim.
    pub data: Option<&'a RawValue>,
}

/// A connection asking to join a channel.
#[derive(Debug, Clone, Copy)]
pub struct AppSubscribeRequest<'a> {
    pub client: &'a str,
    /// The connection's user (`""` when anonymous).
    pub user: &'a str,
    pub channel: &'a str,
    pub forwarded: &'a Forwarded,
    pub data: Option<&'a RawValue>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AppConnectDecision {
    Allow {
        /// The user id the app vouches for (`""`: the app admits the client anonymously).
        user: String,
        /// Channels to subscribe the connection to right away.
        channels: Vec<String>,
        info: Option<Value>,
    },
    Deny {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum AppSubscribeDecision {
    Allow { info: Option<Value> },
    Deny { reason: String },
}

/// The app could not decide. The client should be told to reconnect (or retry) later.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppError {
    /// No answer in time, connection refused, reset, 5xx.
    #[error("the app is unavailable: {0}")]
    Unavailable(String),
    /// An answer that is not a valid decision (bad JSON, missing fields, too large, odd status).
    #[error("the app's answer is invalid: {0}")]
    BadAnswer(String),
    /// The URL for this kind of call is not configured (a caller bug or a config mismatch).
    #[error("auth.{0} is not configured")]
    NotConfigured(&'static str),
}

/// HTTP client for `connect_url` and `subscribe_url`.
#[derive(Clone)]
pub struct AppClient {
    http: AppHttp,
    connect_url: Option<Uri>,
    subscribe_url: Option<Uri>,
    forward_headers: Vec<HeaderName>,
    forward_query: Vec<String>,
}

impl std::fmt::Debug for AppClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppClient")
            .field("connect_url", &self.connect_url)
            .field("subscribe_url", &self.subscribe_url)
            .field("timeout", &self.http.timeout)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct ConnectBody<'a> {
    client: &'a str,
    protocol: &'a str,
    query: &'a Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
}

#[derive(Serialize)]
struct SubscribeBody<'a> {
    client: &'a str,
    user: &'a str,
    channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
}

impl AppClient {
    /// `None` when neither `connect_url` nor `subscribe_url` is configured. Needs no runtime;
    /// the calls do.
    pub fn new(config: &AuthConfig) -> Result<Option<Self>, AuthSetupError> {
        if config.connect_url.is_none() && config.subscribe_url.is_none() {
            return Ok(None);
        }
        let url = |key, value: &Option<String>| {
            value
                .as_deref()
                .map(|u| parse_app_url(key, u))
                .transpose()
                .map_err(AuthSetupError::Invalid)
        };
        let connect_url = url("connect_url", &config.connect_url)?;
        let subscribe_url = url("subscribe_url", &config.subscribe_url)?;
        if !(1..=super::MAX_APP_TIMEOUT_MS).contains(&config.app_timeout_ms) {
            return Err(AuthSetupError::Invalid(
                "app_timeout_ms out of range".into(),
            ));
        }
        let timeout = Duration::from_millis(config.app_timeout_ms);
        let forward_headers = config
            .forward_headers
            .iter()
            .map(|name| parse_forward_header(name))
            .collect::<Result<Vec<_>, _>>()
            .map_err(AuthSetupError::Invalid)?;

        Ok(Some(Self {
            http: AppHttp::new(timeout, None),
            connect_url,
            subscribe_url,
            forward_headers,
            forward_query: config.forward_query.clone(),
        }))
    }

    pub fn has_connect(&self) -> bool {
        self.connect_url.is_some()
    }

    pub fn has_subscribe(&self) -> bool {
        self.subscribe_url.is_some()
    }

    /// Keeps what will be forwarded from a client's upgrade request: the configured headers
    /// (all values of each) and the first value of each configured query parameter.
    pub fn capture(&self, headers: &HeaderMap, query: Option<&str>) -> Forwarded {
        let mut kept = HeaderMap::new();
        for name in &self.forward_headers {
            for value in headers.get_all(name) {
                kept.append(name.clone(), value.clone());
            }
        }
        let mut params = Map::new();
        if let Some(query) = query
            && !self.forward_query.is_empty()
        {
            for (name, value) in form_urlencoded::parse(query.as_bytes()) {
                if self.forward_query.iter().any(|n| *n == name) && !params.contains_key(&*name) {
                    params.insert(name.into_owned(), Value::String(value.into_owned()));
                }
            }
        }
        Forwarded {
            headers: kept,
            query: params,
        }
    }

    /// Asks the app whether a connection may connect, and as whom.
    pub async fn connect(
        &self,
        req: AppConnectRequest<'_>,
    ) -> Result<AppConnectDecision, AppError> {
        let url = self
            .connect_url
            .as_ref()
            .ok_or(AppError::NotConfigured("connect_url"))?;
        let body = ConnectBody {
            client: req.client,
            protocol: req.protocol,
            query: &req.forwarded.query,
            data: req.data,
        };
        match self.call(url, &body, req.forwarded).await? {
            Answer::Denied(reason) => Ok(AppConnectDecision::Deny { reason }),
            Answer::Decision(mut answer) => {
                if !read_allow(&answer)? {
                    return Ok(AppConnectDecision::Deny {
                        reason: read_reason(&answer),
                    });
                }
                let user = match answer.remove("user") {
                    Some(Value::String(user)) => user,
                    _ => {
                        return Err(AppError::BadAnswer(
                            "`user` (a string) is required when `allow` is true".into(),
                        ));
                    }
                };
                let channels = match answer.remove("channels") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::Array(items)) => items
                        .into_iter()
                        .map(|item| match item {
                            Value::String(s) => Ok(s),
                            _ => Err(AppError::BadAnswer(
                                "`channels` must be an array of strings".into(),
                            )),
                        })
                        .collect::<Result<_, _>>()?,
                    Some(_) => {
                        return Err(AppError::BadAnswer(
                            "`channels` must be an array of strings".into(),
                        ));
                    }
                };
                Ok(AppConnectDecision::Allow {
                    user,
                    channels,
                    info: answer.remove("info").filter(|v| !v.is_null()),
                })
            }
        }
    }

    /// Asks the app whether a connection may subscribe to a channel.
    pub async fn subscribe(
        &self,
        req: AppSubscribeRequest<'_>,
    ) -> Result<AppSubscribeDecision, AppError> {
        let url = self
            .subscribe_url
            .as_ref()
            .ok_or(AppError::NotConfigured("subscribe_url"))?;
        let body = SubscribeBody {
            client: req.client,
            user: req.user,
            channel: req.channel,
            data: req.data,
        };
        match self.call(url, &body, req.forwarded).await? {
            Answer::Denied(reason) => Ok(AppSubscribeDecision::Deny { reason }),
            Answer::Decision(mut answer) => {
                if read_allow(&answer)? {
                    Ok(AppSubscribeDecision::Allow {
                        info: answer.remove("info").filter(|v| !v.is_null()),
                    })
                } else {
                    Ok(AppSubscribeDecision::Deny {
                        reason: read_reason(&answer),
                    })
                }
            }
        }
    }

    /// One POST, bounded by the timeout from the first byte of connecting to the last byte of
    /// the answer.
    async fn call(
        &self,
        url: &Uri,
        body: &impl Serialize,
        forwarded: &Forwarded,
    ) -> Result<Answer, AppError> {
        let body = serde_json::to_vec(body)
            .map_err(|e| AppError::BadAnswer(format!("cannot encode the request: {e}")))?;
        let mut request = Request::post(url.clone())
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| AppError::Unavailable(format!("cannot build a request to {url}: {e}")))?;
        let headers = request.headers_mut();
        for (name, value) in &forwarded.headers {
            headers.append(name, value.clone());
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));

        let response = self.http.send(request, MAX_ANSWER_BYTES).await?;
        let status = response.status;
        if status.is_server_error() {
            return Err(AppError::Unavailable(format!(
                "POST {url}: status {status}"
            )));
        }
        if status.is_client_error() {
            return Ok(Answer::Denied(format!(
                "the application refused (status {})",
                status.as_u16()
            )));
        }
        if status != StatusCode::OK {
            return Err(AppError::BadAnswer(format!(
                "POST {url}: status {status}; expected 200 with a JSON decision \
                 (redirects are not followed)"
            )));
        }
        let answer: Map<String, Value> = serde_json::from_slice(&response.body).map_err(|_| {
            AppError::BadAnswer(format!("POST {url}: the answer is not a JSON object"))
        })?;
        Ok(Answer::Decision(answer))
    }
}

/// An answer of the app: its status, and its body when the status is 200 (other bodies are not
/// read).
#[derive(Debug)]
pub struct AppResponse {
    pub status: StatusCode,
    pub body: Bytes,
}

/// One HTTP/1.1 exchange with the app, bounded in time from the first byte of connecting to the
/// last byte of the answer, and in answer size. Shared by the `connect`/`subscribe` calls and
/// High-templar's bootstrap call. Over TCP (pooled connections) or, with `unix_socket`, over a
/// unix socket (one connection per call; the URL still gives the path and the `Host` header).
#[derive(Clone)]
pub struct AppHttp {
    client: Client<HttpConnector, Full<Bytes>>,
    unix_socket: Option<std::sync::Arc<std::path::Path>>,
    timeout: Duration,
}

impl AppHttp {
    /// Needs no runtime; the calls do.
    pub fn new(timeout: Duration, unix_socket: Option<std::path::PathBuf>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE)
            .http1_max_buf_size(MAX_ANSWER_BYTES)
            .build(connector);
        Self {
            client,
            unix_socket: unix_socket.map(std::sync::Arc::from),
            timeout,
        }
    }

    /// Sends `request` (an absolute `http://` URI) and reads a 200's body, at most `max_body`
    /// bytes. Any status is an `Ok`; the caller decides what it means.
    pub async fn send(
        &self,
        request: Request<Full<Bytes>>,
        max_body: usize,
    ) -> Result<AppResponse, AppError> {
        let label = format!("{} {}", request.method(), request.uri());
        let exchange = async {
            let response = match &self.unix_socket {
                None => self
                    .client
                    .request(request)
                    .await
                    .map_err(|e| error_chain(&e)),
                Some(path) => send_unix(path, request).await,
            }
            .map_err(|e| AppError::Unavailable(format!("{label}: {e}")))?;
            let status = response.status();
            if status != StatusCode::OK {
                return Ok(AppResponse {
                    status,
                    body: Bytes::new(),
                });
            }
            let body = Limited::new(response.into_body(), max_body)
                .collect()
                .await
                .map_err(|e| {
                    if e.downcast_ref::<LengthLimitError>().is_some() {
                        AppError::BadAnswer(format!(
                            "{label}: the answer is larger than {max_body} bytes"
                        ))
                    } else {
                        AppError::Unavailable(format!(
                            "{label}: reading the answer: {}",
                            error_chain(e.as_ref())
                        ))
                    }
                })?
                .to_bytes();
            Ok(AppResponse { status, body })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| {
                AppError::Unavailable(format!(
                    "{label}: no answer within {} ms",
                    self.timeout.as_millis()
                ))
            })?
    }
}

/// One request over a new unix-socket connection: origin-form target, `Host` from the URL.
async fn send_unix(
    path: &std::path::Path,
    mut request: Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| error_chain(&e))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    if let Some(authority) = request.uri().authority().cloned()
        && !request.headers().contains_key(hyper::http::header::HOST)
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        request
            .headers_mut()
            .insert(hyper::http::header::HOST, host);
    }
    let target = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse::<Uri>()
        .map_err(|e| e.to_string())?;
    *request.uri_mut() = target;
    sender
        .send_request(request)
        .await
        .map_err(|e| error_chain(&e))
}

enum Answer {
    /// A 4xx status: a refusal, whatever the body says.
    Denied(String),
    /// A 200 with a JSON object, to be read as a decision.
    Decision(Map<String, Value>),
}

fn read_allow(answer: &Map<String, Value>) -> Result<bool, AppError> {
    match answer.get("allow") {
        Some(Value::Bool(allow)) => Ok(*allow),
        _ => Err(AppError::BadAnswer(
            "the answer needs `allow`: true or false".into(),
        )),
    }
}

fn read_reason(answer: &Map<String, Value>) -> String {
    match answer.get("reason") {
        Some(Value::String(reason)) if !reason.is_empty() => {
            reason.chars().take(MAX_REASON_LEN).collect()
        }
        _ => "denied by the application".into(),
    }
}

/// "client error (Connect): tcp connect error: Connection refused": the top-level hyper error
/// alone says too little to debug a misconfigured URL.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::net::SocketAddr;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    /// One request as the test server saw it.
    #[derive(Debug)]
    struct Seen {
        request_line: String,
        /// Lowercased names, in order.
        headers: Vec<(String, String)>,
        body: Value,
    }

    impl Seen {
        fn header(&self, name: &str) -> Vec<&str> {
            self.headers
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
                .collect()
        }
    }

    #[derive(Clone)]
    enum Reply {
        /// Status and body, with Content-Length.
        Status(u16, String),
        /// Exactly these bytes.
        Raw(String),
        /// Nothing for this long, then a valid allow.
        Slow(Duration),
        /// Headers at once, then the body never completes.
        StalledBody,
    }

    /// A tiny HTTP/1.1 server: reads one request per connection, reports it, answers `reply`.
    async fn app(reply: Reply) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(handle(stream, reply.clone(), tx.clone()));
            }
        });
        (addr, rx)
    }

    async fn handle(mut stream: TcpStream, reply: Reply, tx: mpsc::UnboundedSender<Seen>) {
        let mut buf = Vec::new();
        let head_end = loop {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap().to_string();
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or(0);
        let mut body = buf[head_end + 4..].to_vec();
        while body.len() < len {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "request body cut short");
            body.extend_from_slice(&chunk[..n]);
        }
        let _ = tx.send(Seen {
            request_line,
            headers,
            body: serde_json::from_slice(&body).unwrap(),
        });
        let response = match reply {
            Reply::Status(status, body) => http_response(status, &body),
            Reply::Raw(raw) => raw,
            Reply::Slow(delay) => {
                tokio::time::sleep(delay).await;
                http_response(200, r#"{"allow":true,"user":"late"}"#)
            }
            Reply::StalledBody => {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"allow\":")
                    .await;
                tokio::time::sleep(Duration::from_secs(30)).await;
                return;
            }
        };
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    }

    fn http_response(status: u16, body: &str) -> String {
        format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    fn config(addr: SocketAddr, timeout_ms: u64) -> AuthConfig {
        AuthConfig {
            connect_url: Some(format!("http://{addr}/plaza/connect")),
            subscribe_url: Some(format!("http://{addr}/plaza/subscribe?v=1")),
            app_timeout_ms: timeout_ms,
            forward_query: vec!["token".into(), "room".into()],
            ..AuthConfig::default()
        }
    }

    fn client(addr: SocketAddr, timeout_ms: u64) -> AppClient {
        AppClient::new(&config(addr, timeout_ms)).unwrap().unwrap()
    }

    fn browser_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("cookie", HeaderValue::from_static("session=abc"));
        h.append("cookie", HeaderValue::from_static("theme=dark"));
        h.insert("authorization", HeaderValue::from_static("Bearer xyz"));
        h.insert("user-agent", HeaderValue::from_static("test-browser"));
        h.insert("x-secret-internal", HeaderValue::from_static("nope"));
        h.insert("host", HeaderValue::from_static("plaza.example"));
        h.insert("content-length", HeaderValue::from_static("12345"));
        h
    }

    async fn connect(client: &AppClient) -> Result<AppConnectDecision, AppError> {
        let forwarded = client.capture(
            &browser_headers(),
            Some("token=t%201&other=x&token=second&room"),
        );
        let data: Box<RawValue> = serde_json::from_str(r#"{"hello": [1, 2]}"#).unwrap();
        client
            .connect(AppConnectRequest {
                client: "c-1",
                protocol: "native",
                forwarded: &forwarded,
                data: Some(&data),
            })
            .await
    }

    async fn subscribe(client: &AppClient) -> Result<AppSubscribeDecision, AppError> {
        let forwarded = client.capture(&browser_headers(), None);
        client
            .subscribe(AppSubscribeRequest {
                client: "c-1",
                user: "42",
                channel: "chat:1",
                forwarded: &forwarded,
                data: None,
            })
            .await
    }

    #[tokio::test]
    async fn allow_forwards_headers_query_and_data() {
        let (addr, mut seen) = app(Reply::Status(
            200,
            r#"{"allow":true,"user":"42","channels":["a","b"],"info":{"name":"Ada"},"extra":1}"#
                .into(),
        ))
        .await;
        let decision = connect(&client(addr, 2000)).await.unwrap();
        assert_eq!(
            decision,
            AppConnectDecision::Allow {
                user: "42".into(),
                channels: vec!["a".into(), "b".into()],
                info: Some(json!({"name": "Ada"})),
            }
        );
        let req = seen.recv().await.unwrap();
        assert_eq!(req.request_line, "POST /plaza/connect HTTP/1.1");
        assert_eq!(req.header("cookie"), ["session=abc", "theme=dark"]);
        assert_eq!(req.header("authorization"), ["Bearer xyz"]);
        assert_eq!(req.header("user-agent"), ["test-browser"]);
        assert!(req.header("x-secret-internal").is_empty());
        assert_eq!(req.header("content-type"), ["application/json"]);
        assert_eq!(req.header("host"), [addr.to_string().as_str()]);
        assert_ne!(req.header("content-length"), ["12345"]);
        assert_eq!(
            req.body,
            json!({
                "client": "c-1",
                "protocol": "native",
                "query": {"token": "t 1", "room": ""},
                "data": {"hello": [1, 2]}
            })
        );
    }

    #[tokio::test]
    async fn connect_without_data_or_query() {
        let (addr, mut seen) = app(Reply::Status(200, r#"{"allow":true,"user":""}"#.into())).await;
        let client = client(addr, 2000);
        let forwarded = client.capture(&HeaderMap::new(), None);
        let decision = client
            .connect(AppConnectRequest {
                client: "c-2",
                protocol: "native",
                forwarded: &forwarded,
                data: None,
            })
            .await
            .unwrap();
        assert_eq!(
            decision,
            AppConnectDecision::Allow {
                user: String::new(),
                channels: vec![],
                info: None
            }
        );
        let req = seen.recv().await.unwrap();
        assert_eq!(
            req.body,
            json!({"client": "c-2", "protocol": "native", "query": {}})
        );
        assert!(req.header("cookie").is_empty());
    }

    #[tokio::test]
    async fn deny_by_answer_or_by_4xx() {
        let (addr, _seen) = app(Reply::Status(
            200,
            r#"{"allow":false,"reason":"banned"}"#.into(),
        ))
        .await;
        assert_eq!(
            connect(&client(addr, 2000)).await,
            Ok(AppConnectDecision::Deny {
                reason: "banned".into()
            })
        );
        let (addr, _seen) = app(Reply::Status(200, r#"{"allow":false}"#.into())).await;
        assert_eq!(
            connect(&client(addr, 2000)).await,
            Ok(AppConnectDecision::Deny {
                reason: "denied by the application".into()
            })
        );
        for status in [401, 403, 404] {
            let (addr, _seen) = app(Reply::Status(status, "no".into())).await;
            assert!(
                matches!(
                    connect(&client(addr, 2000)).await,
                    Ok(AppConnectDecision::Deny { ref reason }) if reason.contains(&status.to_string())
                ),
                "{status}"
            );
        }
    }

    #[tokio::test]
    async fn server_errors_are_unavailable() {
        for status in [500, 502, 503] {
            let (addr, _seen) = app(Reply::Status(status, "oops".into())).await;
            let err = connect(&client(addr, 2000)).await.unwrap_err();
            assert!(matches!(err, AppError::Unavailable(_)), "{status}: {err}");
        }
    }

    #[tokio::test]
    async fn refused_port_is_unavailable() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = connect(&client(addr, 2000)).await.unwrap_err();
        assert!(matches!(err, AppError::Unavailable(_)), "{err}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }

    #[tokio::test]
    async fn slow_app_times_out_within_the_bound() {
        for reply in [Reply::Slow(Duration::from_secs(10)), Reply::StalledBody] {
            let (addr, _seen) = app(reply).await;
            let client = client(addr, 300);
            let started = Instant::now();
            let err = connect(&client).await.unwrap_err();
            let elapsed = started.elapsed();
            assert!(matches!(err, AppError::Unavailable(_)), "{err}");
            assert!(err.to_string().contains("300 ms"), "{err}");
            assert!(
                elapsed >= Duration::from_millis(290) && elapsed < Duration::from_millis(1300),
                "{elapsed:?}"
            );
        }
    }

    #[tokio::test]
    async fn invalid_answers_are_bad_answers() {
        let big = format!(
            r#"{{"allow":true,"user":"{}"}}"#,
            "x".repeat(MAX_ANSWER_BYTES)
        );
        let cases = [
            Reply::Status(200, "this is not json".into()),
            Reply::Status(200, "[true]".into()),
            Reply::Status(200, r#"{"user":"42"}"#.into()),
            Reply::Status(200, r#"{"allow":"yes","user":"42"}"#.into()),
            Reply::Status(200, r#"{"allow":true}"#.into()),
            Reply::Status(200, r#"{"allow":true,"user":42}"#.into()),
            Reply::Status(200, r#"{"allow":true,"user":"42","channels":"a"}"#.into()),
            Reply::Status(200, r#"{"allow":true,"user":"42","channels":[1]}"#.into()),
            Reply::Status(200, big),
            Reply::Status(204, String::new()),
            Reply::Raw(
                "HTTP/1.1 302 Found\r\nlocation: http://elsewhere/\r\ncontent-length: 0\r\n\r\n"
                    .into(),
            ),
        ];
        for reply in cases {
            let (addr, _seen) = app(reply).await;
            let err = connect(&client(addr, 2000)).await.unwrap_err();
            assert!(matches!(err, AppError::BadAnswer(_)), "{err}");
        }
        // Not HTTP at all: an error either way, and quickly.
        let (addr, _seen) = app(Reply::Raw("garbage\r\n\r\n".into())).await;
        assert!(connect(&client(addr, 2000)).await.is_err());
    }

    #[tokio::test]
    async fn subscribe_calls() {
        let (addr, mut seen) = app(Reply::Status(
            200,
            r#"{"allow":true,"info":{"role":"mod"}}"#.into(),
        ))
        .await;
        assert_eq!(
            subscribe(&client(addr, 2000)).await,
            Ok(AppSubscribeDecision::Allow {
                info: Some(json!({"role": "mod"}))
            })
        );
        let req = seen.recv().await.unwrap();
        assert_eq!(req.request_line, "POST /plaza/subscribe?v=1 HTTP/1.1");
        assert_eq!(req.header("cookie"), ["session=abc", "theme=dark"]);
        assert_eq!(
            req.body,
            json!({"client": "c-1", "user": "42", "channel": "chat:1"})
        );

        let (addr, _seen) = app(Reply::Status(
            200,
            r#"{"allow":false,"reason":"members only"}"#.into(),
        ))
        .await;
        assert_eq!(
            subscribe(&client(addr, 2000)).await,
            Ok(AppSubscribeDecision::Deny {
                reason: "members only".into()
            })
        );
        let (addr, _seen) = app(Reply::Status(403, String::new())).await;
        assert!(matches!(
            subscribe(&client(addr, 2000)).await,
            Ok(AppSubscribeDecision::Deny { .. })
        ));
        let (addr, _seen) = app(Reply::Status(503, String::new())).await;
        assert!(matches!(
            subscribe(&client(addr, 2000)).await,
            Err(AppError::Unavailable(_))
        ));
        let (addr, _seen) = app(Reply::Status(200, "{".into())).await;
        assert!(matches!(
            subscribe(&client(addr, 2000)).await,
            Err(AppError::BadAnswer(_))
        ));
    }

    #[tokio::test]
    async fn keeps_the_connection_alive_between_calls() {
        // Two calls in a row to an app that keeps connections open both succeed.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let body = r#"{"allow":true,"user":"42"}"#;
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let mut buf = vec![0u8; 65536];
            for _ in 0..2 {
                let mut got = Vec::new();
                while !got.windows(3).any(|w| w == b"]}}") {
                    let n = stream.read(&mut buf).await.unwrap();
                    assert!(n > 0);
                    got.extend_from_slice(&buf[..n]);
                }
                stream.write_all(response.as_bytes()).await.unwrap();
            }
        });
        let client = client(addr, 2000);
        for _ in 0..2 {
            assert!(matches!(
                connect(&client).await,
                Ok(AppConnectDecision::Allow { .. })
            ));
        }
    }

    #[test]
    fn setup() {
        assert!(AppClient::new(&AuthConfig::default()).unwrap().is_none());
        let only_subscribe = AuthConfig {
            subscribe_url: Some("http://127.0.0.1:9/sub".into()),
            ..AuthConfig::default()
        };
        let client = AppClient::new(&only_subscribe).unwrap().unwrap();
        assert!(!client.has_connect());
        assert!(client.has_subscribe());
        let https = AuthConfig {
            connect_url: Some("https://app.example/connect".into()),
            ..AuthConfig::default()
        };
        let err = AppClient::new(&https).unwrap_err().to_string();
        assert!(err.contains("https is not supported"), "{err}");
    }

    #[tokio::test]
    async fn unconfigured_calls_and_private_debug() {
        let only_subscribe = AuthConfig {
            subscribe_url: Some("http://127.0.0.1:9/sub".into()),
            ..AuthConfig::default()
        };
        let client = AppClient::new(&only_subscribe).unwrap().unwrap();
        let forwarded = client.capture(&browser_headers(), Some("token=abc"));
        let shown = format!("{forwarded:?}");
        assert!(
            shown.contains("cookie") && !shown.contains("session=abc"),
            "{shown}"
        );
        assert_eq!(
            client
                .connect(AppConnectRequest {
                    client: "c",
                    protocol: "native",
                    forwarded: &forwarded,
                    data: None,
                })
                .await,
            Err(AppError::NotConfigured("connect_url"))
        );
    }
}
