//! Node routes: agents join and report in (join token required); operators cordon,
//! drain and uncordon.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::error::ApiError;
use super::AppState;
use crate::membership::NodeAction;
use crate::model::NodeState;
use crate::node::wire::{Heartbeat, Registration};

fn authorize(state: &AppState, headers: &HeaderMap, what: &str) -> Result<(), ApiError> {
    state
        .membership
        .check_token(crate::access::bearer(headers))
        .inspect_err(|e| tracing::warn!(what, error = %e, "refused a node request"))
        .map_err(Into::into)
}

/// `POST /api/v1/nodes/register`.
pub async fn register(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(r): Json<Registration>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, "register")?;
    Ok(Json(state.membership.register(r).await?).into_response())
}

/// `POST /api/v1/nodes/{name}/heartbeat`.
pub async fn heartbeat(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Json(hb): Json<Heartbeat>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, "heartbeat")?;
    state.membership.heartbeat(&name, hb).await?;
    Ok(Json(serde_json::json!({})).into_response())
}

#[derive(Serialize)]
struct Acted {
    node: String,
    state: NodeState,
}

/// `POST /api/v1/nodes/{name}/cordon|uncordon|drain`.
pub async fn act(
    State(state): State<AppState>,
    Path((name, action)): Path<(String, String)>,
) -> Result<Json<impl Serialize>, ApiError> {
    let action = match action.as_str() {
        "cordon" => NodeAction::Cordon,
        "uncordon" => NodeAction::Uncordon,
        "drain" => NodeAction::Drain,
        _ => return Err(ApiError::UnknownAction(action)),
    };
    let state_now = state.membership.act(&name, action).await?;
    Ok(Json(Acted {
        node: name,
        state: state_now,
    }))
}
