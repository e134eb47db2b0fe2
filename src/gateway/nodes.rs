//! Node routes: agents join and report in (join token required); operators cordon,
//! drain and uncordon.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::AppState;
use crate::membership::{MembershipError, NodeAction};
use crate::node::remote::{Heartbeat, Registration};

impl IntoResponse for MembershipError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            MembershipError::NoJoinToken => (StatusCode::FORBIDDEN, "no_join_token"),
            MembershipError::BadToken => (StatusCode::UNAUTHORIZED, "unauthorized"),
            MembershipError::UnknownNode(_) => (StatusCode::NOT_FOUND, "node_not_found"),
            MembershipError::BadRegistration(_) => (StatusCode::BAD_REQUEST, "bad_registration"),
            MembershipError::NameTaken(_) => (StatusCode::CONFLICT, "node_name_taken"),
            MembershipError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, "membership failed");
            "internal error; the gateway's log has the details".to_string()
        } else {
            self.to_string()
        };
        (
            status,
            Json(serde_json::json!({ "error": { "code": code, "message": message } })),
        )
            .into_response()
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

fn authorize(state: &AppState, headers: &HeaderMap, what: &str) -> Result<(), MembershipError> {
    state
        .membership
        .check_token(bearer(headers))
        .inspect_err(|e| {
            tracing::warn!(what, error = %e, "refused a node request");
        })
}

/// `POST /api/v1/nodes/register`.
pub async fn register(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(r): Json<Registration>,
) -> Result<Response, MembershipError> {
    authorize(&state, &headers, "register")?;
    Ok(Json(state.membership.register(r).await?).into_response())
}

/// `POST /api/v1/nodes/{name}/heartbeat`.
pub async fn heartbeat(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Json(hb): Json<Heartbeat>,
) -> Result<Response, MembershipError> {
    authorize(&state, &headers, "heartbeat")?;
    state.membership.heartbeat(&name, hb).await?;
    Ok(Json(serde_json::json!({})).into_response())
}

/// `POST /api/v1/nodes/{name}/cordon|uncordon|drain`.
pub async fn act(
    State(state): State<AppState>,
    Path((name, action)): Path<(String, String)>,
) -> Result<Response, Response> {
    let action =
        match action.as_str() {
            "cordon" => NodeAction::Cordon,
            "uncordon" => NodeAction::Uncordon,
            "drain" => NodeAction::Drain,
            other => return Err((
                StatusCode::NOT_FOUND,
                Json(serde_json::json!({ "error": {
                    "code": "unknown_action",
                    "message": format!("`{other}` is not a node action: cordon, uncordon or drain"),
                }})),
            )
                .into_response()),
        };
    let state_now = state
        .membership
        .act(&name, action)
        .await
        .map_err(IntoResponse::into_response)?;
    Ok(Json(serde_json::json!({ "node": name, "state": state_now })).into_response())
}
