//! `POST /api/hightemplar/trigger`: a High-templar trigger over HTTP, with the same body as the
//! RabbitMQ one, `{"rooms": [ROOM, ...], "data": ANY}` (High-templar 2.x's `POST /trigger/`,
//! which 3.x lost, behind the backend key here). Delivered through the broker, so every node's
//! subscribers get it.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use plaza_core::ErrorCode;
use plaza_protocol::hightemplar::parse_trigger;

use super::{ApiError, ApiState, invalid, node_error, read_body};

pub fn routes() -> Router<ApiState> {
    Router::new().route("/api/hightemplar/trigger", post(trigger))
}

async fn trigger(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Some(ht) = &state.hightemplar else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "High-templar is not enabled: add a [hightemplar] table to the configuration",
        ));
    };
    let body = read_body(body)?;
    let trigger = parse_trigger(&body).map_err(|e| invalid(e.to_string()))?;
    ht.trigger(&trigger).await.map_err(node_error)?;
    Ok(axum::Json(serde_json::json!({"rooms": trigger.rooms.len()})).into_response())
}
