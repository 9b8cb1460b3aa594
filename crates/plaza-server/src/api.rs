//! The backend HTTP API: what the app's backend calls to publish and inspect. Every `/api/...`
//! route needs the backend key; `/metrics` and `/healthz` do not.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use plaza_core::{
    ChannelName, CloseCode, ErrorCode, NamespaceOptions, Payload, Position, ReplyError,
};
use serde::Deserialize;
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;

use crate::node::Node;

mod chat;
mod hightemplar;

#[derive(Clone)]
struct ApiState {
    node: Arc<Node>,
    key: Arc<str>,
    /// Set when `[hightemplar]` is configured.
    hightemplar: Option<Arc<crate::hightemplar::HighTemplar>>,
}

pub fn router(
    node: Arc<Node>,
    key: Arc<str>,
    hightemplar: Option<Arc<crate::hightemplar::HighTemplar>>,
) -> Router {
    let body_limit = node.settings.limits.max_api_body_size;
    let state = ApiState {
        node,
        key,
        hightemplar,
    };
    let api = Router::new()
        .route("/api/publish", post(publish))
        .route("/api/broadcast", post(broadcast))
        .route("/api/channels", get(channels))
        .route("/api/info", get(info))
        .route("/api/history", get(history))
        .route("/api/presence", get(presence))
        .route("/api/disconnect", post(disconnect))
        .route("/api/live/authorize", post(live_authorize))
        .route("/api/deltas", post(deltas))
        .route("/api/presence_stats", get(presence_stats))
        .merge(chat::routes())
        .merge(hightemplar::routes())
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .merge(api)
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

/// An API error: an HTTP status and the native protocol's error body.
struct ApiError {
    status: StatusCode,
    error: ReplyError,
}

impl ApiError {
    fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            error: ReplyError::new(code, message),
        }
    }

    fn bad_request(error: ReplyError) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            error,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": {"code": self.error.code.code(), "message": self.error.message}
        });
        let mut response = (self.status, axum::Json(body)).into_response();
        // Lets the counting middleware attribute the error to its kind.
        response.extensions_mut().insert(self.error.code);
        response
    }
}

async fn require_key(
    State(state): State<ApiState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let given = headers
        .get("x-plaza-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("apikey "))
        });
    let Some(given) = given else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "missing backend key: send 'X-Plaza-Key: <key>' or 'Authorization: apikey <key>'",
        )
        .into_response();
    };
    if !bool::from(given.trim().as_bytes().ct_eq(state.key.as_bytes())) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "wrong backend key",
        )
        .into_response();
    }
    next.run(request).await
}

async fn count_requests(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let endpoint = match request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str)
    {
        Some("/api/publish") => "/api/publish",
        Some("/api/broadcast") => "/api/broadcast",
        Some("/api/channels") => "/api/channels",
        Some("/api/info") => "/api/info",
        Some("/api/history") => "/api/history",
        Some("/api/presence") => "/api/presence",
        Some("/api/disconnect") => "/api/disconnect",
        Some("/api/live/authorize") => "/api/live/authorize",
        Some("/api/deltas") => "/api/deltas",
        Some("/api/presence_stats") => "/api/presence_stats",
        Some(path) if path.starts_with("/api/chat/") => "/api/chat",
        Some("/api/hightemplar/trigger") => "/api/hightemplar/trigger",
        Some("/metrics") => "/metrics",
        Some("/healthz") => "/healthz",
        _ => "other",
    };
    let response = next.run(request).await;
    let metrics = &state.node.hub.metrics;
    metrics.api_request(endpoint, response.status().as_u16());
    if let Some(code) = response.extensions().get::<ErrorCode>() {
        metrics.error(*code);
    }
    response
}

/// A 400 with the bad-request code.
fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
}

/// Resolves the required `?channel=` parameter.
fn channel_param(
    node: &Node,
    name: Option<String>,
) -> Result<(ChannelName, &NamespaceOptions), ApiError> {
    let name = name.ok_or_else(|| invalid("missing query parameter 'channel'"))?;
    resolve(node, &name)
}

fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::LimitExceeded,
                "request body is larger than limits.max_api_body_size",
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                format!("cannot read body: {e}"),
            )
        }
    })
}

fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    let raw: &RawValue =
        serde_json::from_slice(body).map_err(|e| invalid(format!("invalid JSON: {e}")))?;
    if !raw.get().starts_with('{') {
        return Err(invalid("the body must be a JSON object"));
    }
    serde_json::from_str(raw.get()).map_err(|e| invalid(format!("invalid request: {e}")))
}

#[derive(Deserialize)]
struct PublishBody<'a> {
    channel: String,
    #[serde(borrow)]
    data: &'a RawValue,
    idempotency_key: Option<String>,
}

#[derive(Deserialize)]
struct BroadcastBody<'a> {
    channels: Vec<String>,
    #[serde(borrow)]
    data: &'a RawValue,
}

fn resolve<'n>(
    node: &'n Node,
    name: &str,
) -> Result<(ChannelName, &'n NamespaceOptions), ApiError> {
    node.resolve_channel(name).map_err(ApiError::bad_request)
}

/// Maps a node error: the caller's mistakes are 400, the server's are 500.
fn node_error(error: ReplyError) -> ApiError {
    let status = match error.code {
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorCode::AlreadySubscribed => StatusCode::CONFLICT,
        _ => StatusCode::BAD_REQUEST,
    };
    ApiError { status, error }
}

fn position_json(position: Option<&Position>) -> serde_json::Value {
    match position {
        Some(p) => serde_json::json!({"epoch": p.epoch, "offset": p.offset}),
        None => serde_json::json!({}),
    }
}

async fn publish(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body)?;
    let req: PublishBody = parse_json(&body)?;
    let (channel, options) = resolve(&state.node, &req.channel)?;
    let position = state
        .node
        .publish(
            channel,
            options,
            Payload::from_raw(req.data),
            req.idempotency_key.as_deref(),
        )
        .await
        .map_err(node_error)?;
    Ok(axum::Json(position_json(position.as_ref())).into_response())
}

async fn broadcast(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body)?;
    let req: BroadcastBody = parse_json(&body)?;
    let max = state.node.settings.limits.max_broadcast_channels;
    if req.channels.is_empty() || req.channels.len() > max {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            if req.channels.is_empty() {
                ErrorCode::BadRequest
            } else {
                ErrorCode::LimitExceeded
            },
            format!(
                "channels must hold 1 to {max} names, it has {}",
                req.channels.len()
            ),
        ));
    }
    // Every name is checked before anything is published.
    let channels = req
        .channels
        .iter()
        .map(|name| resolve(&state.node, name))
        .collect::<Result<Vec<_>, _>>()?;
    let data = Payload::from_raw(req.data);
    let mut results = Vec::with_capacity(channels.len());
    for (channel, options) in channels {
        let name = channel.to_string();
        let position = state
            .node
            .publish(channel, options, data.clone(), None)
            .await
            .map_err(node_error)?;
        let mut result = position_json(position.as_ref());
        result["channel"] = serde_json::Value::String(name);
        results.push(result);
    }
    Ok(axum::Json(serde_json::json!({ "results": results })).into_response())
}

#[derive(Deserialize)]
struct HistoryQuery {
    channel: Option<String>,
    /// Return publications after this offset (of `epoch`, if given).
    since: Option<u64>,
    epoch: Option<String>,
    limit: Option<usize>,
}

async fn history(
    State(state): State<ApiState>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| invalid(format!("invalid query: {e}")))?;
    let (channel, options) = channel_param(&state.node, q.channel)?;
    if !options.has_history() {
        return Err(invalid(format!(
            "channel '{channel}' has no history: its namespace sets no history_size"
        )));
    }
    let max = state.node.settings.limits.max_history_limit;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > max {
        return Err(invalid(format!("limit must be 1 to {max}")));
    }
    let since = match (q.since, q.epoch) {
        (None, None) => None,
        (None, Some(_)) => return Err(invalid("'epoch' needs 'since'")),
        (Some(offset), Some(epoch)) => Some(Position { epoch, offset }),
        // Without an epoch, the offset is taken in the channel's current epoch.
        (Some(offset), None) => {
            let top = state
                .node
                .history(&channel, None, 0)
                .await
                .map_err(node_error)?
                .top;
            Some(Position {
                epoch: top.epoch,
                offset,
            })
        }
    };
    let read = state
        .node
        .history(&channel, since, limit)
        .await
        .map_err(node_error)?;
    let publications: Vec<serde_json::Value> = read
        .publications
        .iter()
        .map(|(offset, data)| {
            // The store re-validates what it reads back, so this parse does not fail.
            let data: serde_json::Value =
                serde_json::from_str(data.as_str()).unwrap_or(serde_json::Value::Null);
            serde_json::json!({"offset": offset, "data": data})
        })
        .collect();
    Ok(axum::Json(serde_json::json!({
        "channel": channel.as_str(),
        "epoch": read.top.epoch,
        "offset": read.top.offset,
        "complete": read.complete,
        "publications": publications,
    }))
    .into_response())
}

#[derive(Deserialize)]
struct AuthorizeItem {
    dealer: String,
    query: serde_json::Value,
}

#[derive(Deserialize)]
struct AuthorizeBody {
    items: Vec<AuthorizeItem>,
    /// When set, only a connection of this user may redeem the token.
    user: Option<String>,
}

/// Grants live views under one single-use token for the app to hand to its client.
async fn live_authorize(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body)?;
    let req: AuthorizeBody = parse_json(&body)?;
    let max = state.node.settings.limits.max_channels_per_connection;
    if req.items.is_empty() || req.items.len() > max {
        return Err(invalid(format!("items must hold 1 to {max} entries")));
    }
    let items: Vec<(String, serde_json::Value)> =
        req.items.into_iter().map(|i| (i.dealer, i.query)).collect();
    let token = crate::backend_key::random_hex(16).map_err(|e| internal_error(e.to_string()))?;
    let live = &state.node.live;
    let token = live
        .authorize(&items, req.user, token, std::time::Instant::now())
        .map_err(|e| invalid(e.to_string()))?;
    Ok(axum::Json(serde_json::json!({
        "token": token,
        "expires_in": live.token_ttl().as_secs(),
    }))
    .into_response())
}

/// Routes the app's changes to the live views: the whole batch is checked first.
async fn deltas(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body)?;
    let value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| invalid(format!("invalid JSON: {e}")))?;
    let items = match value {
        serde_json::Value::Array(items) => items,
        serde_json::Value::Object(mut object) => match object.remove("deltas") {
            Some(serde_json::Value::Array(items)) => items,
            _ => {
                return Err(invalid(
                    "the body must be a list of deltas or {\"deltas\": [...]}",
                ));
            }
        },
        _ => {
            return Err(invalid(
                "the body must be a list of deltas or {\"deltas\": [...]}",
            ));
        }
    };
    let batch = plaza_core::live::parse_batch(items).map_err(|e| invalid(e.to_string()))?;
    let delivered = state.node.live.route(&batch);
    state
        .node
        .hub
        .metrics
        .deliveries_total
        .fetch_add(delivered, std::sync::atomic::Ordering::Relaxed);
    Ok(
        axum::Json(serde_json::json!({"deltas": batch.len(), "deliveries": delivered}))
            .into_response(),
    )
}

fn internal_error(message: String) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Internal,
        message,
    )
}

#[derive(Deserialize)]
struct DisconnectBody {
    user: String,
}

/// Closes every connection of a user with code 3503 (do not reconnect).
async fn disconnect(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body)?;
    let req: DisconnectBody = parse_json(&body)?;
    if req.user.is_empty() {
        return Err(invalid("user must not be empty"));
    }
    let mut closed = 0u64;
    state.node.hub.for_each_connection(|conn| {
        if conn.is_connected() && conn.user() == req.user && conn.close(CloseCode::Disconnected) {
            closed += 1;
        }
    });
    Ok(axum::Json(serde_json::json!({ "disconnected": closed })).into_response())
}

#[derive(Deserialize)]
struct ChannelQuery {
    channel: Option<String>,
}

/// The channel named by `?channel=`, which must keep presence.
fn presence_channel(
    node: &Node,
    query: Result<Query<ChannelQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<(ChannelName, &NamespaceOptions), ApiError> {
    let Query(q) = query.map_err(|e| invalid(format!("invalid query: {e}")))?;
    let (channel, options) = channel_param(node, q.channel)?;
    if !options.presence {
        return Err(invalid(format!(
            "channel '{channel}' keeps no presence: its namespace does not set presence"
        )));
    }
    Ok((channel, options))
}

async fn presence(
    State(state): State<ApiState>,
    query: Result<Query<ChannelQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let (channel, options) = presence_channel(&state.node, query)?;
    let clients: Vec<serde_json::Value> = state
        .node
        .presence(options, channel.as_str())
        .await
        .map_err(node_error)?
        .unwrap_or_default()
        .into_iter()
        .map(|c| {
            let info = c
                .info
                .and_then(|i| serde_json::from_str::<serde_json::Value>(i.as_str()).ok());
            serde_json::json!({"user": c.user, "client": c.client.to_string(), "info": info})
        })
        .collect();
    Ok(
        axum::Json(serde_json::json!({"channel": channel.as_str(), "clients": clients}))
            .into_response(),
    )
}

async fn presence_stats(
    State(state): State<ApiState>,
    query: Result<Query<ChannelQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let (channel, options) = presence_channel(&state.node, query)?;
    let (clients, users) = state
        .node
        .presence_stats(options, channel.as_str())
        .await
        .map_err(node_error)?
        .unwrap_or((0, 0));
    Ok(axum::Json(serde_json::json!({
        "channel": channel.as_str(), "num_clients": clients, "num_users": users
    }))
    .into_response())
}

#[derive(Deserialize)]
struct ChannelsQuery {
    prefix: Option<String>,
}

async fn channels(State(state): State<ApiState>, Query(q): Query<ChannelsQuery>) -> Response {
    let prefix = q.prefix.unwrap_or_default();
    let list: Vec<serde_json::Value> = state
        .node
        .hub
        .channels()
        .into_iter()
        .filter(|(name, _)| {
            name.starts_with(prefix.as_str()) && !plaza_core::channel::is_internal_name(name)
        })
        .map(|(name, n)| serde_json::json!({"channel": &*name, "subscribers": n}))
        .collect();
    axum::Json(serde_json::json!({ "channels": list })).into_response()
}

async fn info(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let node = &state.node;
    let metrics = &node.hub.metrics;
    // The nodes the broker knows to be alive; alone, just this one.
    let nodes = node
        .broker
        .nodes()
        .await
        .map_err(|e| internal_error(e.to_string()))?
        .unwrap_or_else(|| vec![node.id.clone()]);
    Ok(axum::Json(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "node": node.id,
        "nodes": nodes,
        "broker": node.broker.name(),
        "uptime_seconds": node.started.elapsed().as_secs(),
        "connections": node.hub.connection_count(),
        "subscriptions": metrics.subscriptions.load(std::sync::atomic::Ordering::Relaxed),
        "channels": node.hub.channel_count(),
        "live_views": node.live.len(),
    }))
    .into_response())
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let node = &state.node;
    let text = node
        .hub
        .metrics
        .render(&node.id, node.hub.channel_count(), node.store.stats());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        Body::from(text),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::UnknownMethod,
        "no such endpoint",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::UnknownMethod,
        "method not allowed for this endpoint",
    )
}
