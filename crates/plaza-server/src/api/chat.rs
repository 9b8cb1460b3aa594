//! `/api/chat/...`: the backend's side of chat. The app sends as the system or as a user,
//! manages groups and members, reads conversations and unread counts, and registers users
//! before their first connection (a direct message to a user nobody registered is refused).

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use plaza_core::chat::Peer;
use plaza_core::{ErrorCode, Payload, ReplyError};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{ApiError, ApiState, invalid, node_error, parse_json, read_body};

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/api/chat/send", post(send))
        .route("/api/chat/users", post(register_users))
        .route("/api/chat/groups", post(create_group).get(list_groups))
        .route("/api/chat/groups/delete", post(delete_group))
        .route("/api/chat/members", post(change_members).get(members))
        .route("/api/chat/history", get(history))
        .route("/api/chat/unread", get(unread))
}

/// The group's canonical name, checked like a channel name (its namespace must exist).
fn group_name(state: &ApiState, group: &str) -> Result<String, ApiError> {
    let (channel, _) = state
        .node
        .resolve_channel(group)
        .map_err(ApiError::bad_request)?;
    Ok(channel.as_str().to_owned())
}

fn peer(state: &ApiState, user: Option<String>, group: Option<String>) -> Result<Peer, ApiError> {
    match (user, group) {
        (Some(user), None) => Ok(Peer::User(user)),
        (None, Some(group)) => Ok(Peer::Group(group_name(state, &group)?)),
        _ => Err(invalid("give exactly one of 'user' and 'group'")),
    }
}

fn json(text: String) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        text,
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody<'a> {
    /// Sends as this user; absent: as the system (no receipts come back).
    from: Option<String>,
    user: Option<String>,
    group: Option<String>,
    id: Option<String>,
    #[serde(borrow)]
    data: &'a RawValue,
}

async fn send(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body)?;
    let req: SendBody = parse_json(&body)?;
    let to = peer(&state, req.user, req.group)?;
    let chat = &state.node.chat;
    let from = req.from.unwrap_or_default();
    if !from.is_empty() {
        chat.register_user(&from).await.map_err(node_error)?;
    }
    let accepted = chat
        .send(&from, &to, req.id, Payload::from_raw(req.data))
        .await
        .map_err(node_error)?;
    Ok(axum::Json(serde_json::json!({
        "status": "accepted",
        "id": accepted.id,
        "ts": accepted.ts,
        "recipients": accepted.recipients,
        "duplicate": accepted.duplicate,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersBody {
    users: Vec<String>,
}

async fn register_users(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body)?;
    let req: UsersBody = parse_json(&body)?;
    for user in &req.users {
        plaza_core::chat::validate_user(user).map_err(|e| invalid(e.to_string()))?;
    }
    for user in &req.users {
        state
            .node
            .chat
            .register_user(user)
            .await
            .map_err(node_error)?;
    }
    Ok(axum::Json(serde_json::json!({ "registered": req.users.len() })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupBody {
    group: String,
    #[serde(default)]
    members: Vec<String>,
}

async fn create_group(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body)?;
    let req: GroupBody = parse_json(&body)?;
    let group = group_name(&state, &req.group)?;
    let chat = &state.node.chat;
    let created = chat.create_group(&group).await.map_err(node_error)?;
    let added = add_members(&state, &group, &req.members).await?;
    Ok(axum::Json(serde_json::json!({ "created": created, "added": added })).into_response())
}

/// Adds users (registering them) who are not members yet; returns how many were added.
async fn add_members(state: &ApiState, group: &str, users: &[String]) -> Result<usize, ApiError> {
    let chat = &state.node.chat;
    for user in users {
        plaza_core::chat::validate_user(user).map_err(|e| invalid(e.to_string()))?;
    }
    let mut added = 0;
    for user in users {
        chat.register_user(user).await.map_err(node_error)?;
        match chat.join(group, user).await {
            Ok(_) => added += 1,
            Err(e) if e.code == ErrorCode::AlreadySubscribed => {}
            Err(e) => return Err(node_error(e)),
        }
    }
    Ok(added)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteGroupBody {
    group: String,
}

async fn delete_group(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body)?;
    let req: DeleteGroupBody = parse_json(&body)?;
    let group = group_name(&state, &req.group)?;
    state
        .node
        .chat
        .delete_group(&group)
        .await
        .map_err(node_error)?;
    Ok(axum::Json(serde_json::json!({})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MembersBody {
    group: String,
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    remove: Vec<String>,
}

async fn change_members(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body)?;
    let req: MembersBody = parse_json(&body)?;
    let group = group_name(&state, &req.group)?;
    let chat = &state.node.chat;
    if chat.members(&group).await.is_err() {
        return Err(node_error(ReplyError::new(
            ErrorCode::NotFound,
            format!("no group '{group}': create it with POST /api/chat/groups"),
        )));
    }
    let added = add_members(&state, &group, &req.add).await?;
    let mut removed = 0;
    for user in &req.remove {
        match chat.leave(&group, user).await {
            Ok(()) => removed += 1,
            Err(e) if e.code == ErrorCode::NotSubscribed => {}
            Err(e) => return Err(node_error(e)),
        }
    }
    Ok(axum::Json(serde_json::json!({ "added": added, "removed": removed })).into_response())
}

#[derive(Deserialize)]
struct GroupQuery {
    group: Option<String>,
}

async fn members(
    State(state): State<ApiState>,
    query: Result<Query<GroupQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| invalid(format!("invalid query: {e}")))?;
    let group = q
        .group
        .ok_or_else(|| invalid("missing query parameter 'group'"))?;
    let group = group_name(&state, &group)?;
    let members = state.node.chat.members(&group).await.map_err(node_error)?;
    let members: Vec<_> = members
        .into_iter()
        .map(|(user, online)| serde_json::json!({ "user": user, "online": online }))
        .collect();
    Ok(axum::Json(serde_json::json!({ "members": members })).into_response())
}

#[derive(Deserialize)]
struct UserQuery {
    user: Option<String>,
}

/// A user's groups, or every group without `?user=`.
async fn list_groups(
    State(state): State<ApiState>,
    query: Result<Query<UserQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| invalid(format!("invalid query: {e}")))?;
    let chat = &state.node.chat;
    let groups = match q.user {
        Some(user) => {
            plaza_core::chat::validate_user(&user).map_err(|e| invalid(e.to_string()))?;
            chat.groups_of(&user).await
        }
        None => chat.all_groups(10_000).await,
    }
    .map_err(node_error)?;
    Ok(axum::Json(serde_json::json!({ "groups": groups })).into_response())
}

#[derive(Deserialize)]
struct HistoryQuery {
    /// With `with`: the direct conversation between `user` and `with`.
    user: Option<String>,
    with: Option<String>,
    group: Option<String>,
    before: Option<u64>,
    limit: Option<usize>,
}

async fn history(
    State(state): State<ApiState>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| invalid(format!("invalid query: {e}")))?;
    let chat = &state.node.chat;
    let (user, with) = match (q.user, q.with, q.group) {
        (Some(user), Some(with), None) => (user, Peer::User(with)),
        (None, None, Some(group)) => (String::new(), Peer::Group(group_name(&state, &group)?)),
        _ => return Err(invalid("give 'user' and 'with', or 'group'")),
    };
    if let Peer::User(with) = &with {
        for u in [&user, with] {
            plaza_core::chat::validate_user(u).map_err(|e| invalid(e.to_string()))?;
        }
    }
    let conversation = chat
        .conversation(&user, &with, true)
        .await
        .map_err(node_error)?;
    let page = chat
        .history(&conversation, q.before, q.limit)
        .await
        .map_err(node_error)?;
    Ok(json(page.as_str().to_owned()))
}

async fn unread(
    State(state): State<ApiState>,
    query: Result<Query<UserQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| invalid(format!("invalid query: {e}")))?;
    let user = q
        .user
        .ok_or_else(|| invalid("missing query parameter 'user'"))?;
    plaza_core::chat::validate_user(&user).map_err(|e| invalid(e.to_string()))?;
    let counts = state.node.chat.unread(&user).await.map_err(node_error)?;
    let conversations: Vec<_> = counts
        .into_iter()
        .map(|(peer, unread)| match peer {
            Peer::User(u) => serde_json::json!({ "user": u, "unread": unread }),
            Peer::Group(g) => serde_json::json!({ "group": g, "unread": unread }),
        })
        .collect();
    Ok(axum::Json(serde_json::json!({ "conversations": conversations })).into_response())
}
