//! `POST {backend_path}` on the backend listener: one Snorky envelope in, the service's answer
//! envelope out, with `X-Backend-Key` checked in constant time. Statuses as the reference: 401
//! without the key or with a wrong one, 400 for a body that is not JSON, 405 for other methods;
//! but every request gets a JSON answer (the reference never answered an unknown service).

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use axum::routing::post;
use plaza_protocol::snorky as proto;

use super::Snorky;
use crate::backend_key;

#[derive(Clone)]
struct BackendState {
    snorky: Arc<Snorky>,
    key: Arc<str>,
}

pub fn router(snorky: Arc<Snorky>, key: Arc<str>) -> Router {
    let limit = snorky.node.settings.limits.max_api_body_size;
    let path = snorky.config.backend_path.clone();
    Router::new()
        .route(&path, post(handle).fallback(method_not_allowed))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(BackendState { snorky, key })
}

fn json(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=UTF-8")],
        body,
    )
        .into_response()
}

async fn method_not_allowed(State(state): State<BackendState>) -> Response {
    state
        .snorky
        .node
        .hub
        .metrics
        .api_request("/snorky/backend", 405);
    json(
        StatusCode::METHOD_NOT_ALLOWED,
        proto::error_without_service("Method not allowed: POST an envelope"),
    )
}

async fn handle(
    State(state): State<BackendState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (status, answer) = answer(&state, &headers, body).await;
    state
        .snorky
        .node
        .hub
        .metrics
        .api_request("/snorky/backend", status.as_u16());
    json(status, answer)
}

async fn answer(
    state: &BackendState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> (StatusCode, String) {
    let metrics = &state.snorky.node.hub.metrics;
    let given = headers
        .get("x-backend-key")
        .map(|v| v.as_bytes())
        .filter(|v| backend_key::matches(v, &state.key));
    if given.is_none() {
        metrics.error(plaza_core::ErrorCode::Unauthorized);
        let why = if headers.contains_key("x-backend-key") {
            "Wrong X-Backend-Key"
        } else {
            "Missing X-Backend-Key"
        };
        return (StatusCode::UNAUTHORIZED, proto::error_without_service(why));
    }
    let body = match body {
        Ok(body) => body,
        Err(e) => {
            metrics.error(plaza_core::ErrorCode::BadRequest);
            let status = e.status();
            return (status, proto::error_without_service(&e.body_text()));
        }
    };
    if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
        metrics.error(plaza_core::ErrorCode::BadRequest);
        return (
            StatusCode::BAD_REQUEST,
            proto::error_without_service("Invalid JSON"),
        );
    }
    (StatusCode::OK, state.snorky.handle_backend(&body).await)
}
