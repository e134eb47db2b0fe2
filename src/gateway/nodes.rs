//! Node routes: agents join (join token) and dial their tunnel (node credential); operators
//! make join tokens, cordon, drain, uncordon and remove nodes.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::AppState;
use crate::membership::NodeAction;
use crate::model::{ErrorCode, NodeState};
use crate::node::tunnel::{NODE_HEADER, PROTOCOL};
use crate::node::wire::{JoinRequest, Joined};

/// `POST /api/v1/nodes/join` with `Authorization: Bearer JOIN_TOKEN`: an agent trades its
/// join token for a node credential.
#[utoipa::path(
    post, operation_id = "join_node", path = "/api/v1/nodes/join", tag = "nodes",
    request_body = JoinRequest,
    responses((status = 200, description = "The node's credential (the bearer is a join token)", body = Joined))
)]
pub async fn join(
    State(state): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Json(request): Json<JoinRequest>,
) -> Result<Json<Joined>, ApiError> {
    let presented = crate::access::bearer(&headers);
    let joined = state
        .membership
        .join(presented, request)
        .await
        .inspect_err(|e| tracing::warn!(%client, error = %e, "refused a join"))?;
    Ok(Json(joined))
}

/// `GET /api/v1/nodes/tunnel` with `Upgrade: ember-tunnel/1`, `Ember-Node: NAME` and the
/// node credential: answers 101, then serves the node's tunnel on the connection.
#[utoipa::path(
    get, operation_id = "node_tunnel", path = "/api/v1/nodes/tunnel", tag = "nodes",
    params(
        ("upgrade" = String, Header, description = "`ember-tunnel/1`"),
        ("ember-node" = String, Header, description = "The node's name"),
    ),
    responses((status = 101, description = "The agent's tunnel (the bearer is its node credential)"))
)]
pub async fn tunnel(
    State(state): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    mut req: Request,
) -> Result<Response, ApiError> {
    let name = req
        .headers()
        .get(NODE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let credential = state
        .membership
        .check_credential(&name, crate::access::bearer(req.headers()))
        .inspect_err(|e| tracing::warn!(%client, node = %name, error = %e, "refused a tunnel"))?;
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok());
    if upgrade != Some(PROTOCOL) {
        return Err(ApiError::BadRequest {
            code: ErrorCode::BadRequest,
            message: format!("a tunnel is an `Upgrade: {PROTOCOL}` request"),
            details: Vec::new(),
        });
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    state
        .membership
        .clone()
        .spawn_session(name, credential, on_upgrade);
    let switching = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, PROTOCOL)
        .body(Body::empty());
    Ok(switching.expect("a static response"))
}

/// The body of `POST /api/v1/tokens`.
#[derive(utoipa::ToSchema, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// How long the token works (`24h` when absent).
    #[serde(default, with = "humantime_serde")]
    #[schema(value_type = Option<String>, example = "30s")]
    ttl: Option<Duration>,
}

#[derive(utoipa::ToSchema, Serialize)]
struct TokenAnswer {
    token: String,
    expires: String,
    /// The pin agents verify the gateway's certificate with, when it serves HTTPS.
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_pin: Option<String>,
}

/// `POST /api/v1/tokens`: a join token, shown once, with the CA pin when TLS is on.
#[utoipa::path(
    post, operation_id = "create_join_token", path = "/api/v1/tokens", tag = "nodes",
    request_body(content = Option<TokenRequest>, description = "How long the token works (24h when absent)"),
    responses((status = 200, description = "A join token, shown once", body = TokenAnswer))
)]
pub async fn create_token(
    State(state): State<AppState>,
    body: Option<Json<TokenRequest>>,
) -> Result<Json<impl Serialize>, ApiError> {
    let ttl = body
        .and_then(|Json(b)| b.ttl)
        .unwrap_or(Duration::from_secs(24 * 3600));
    let made = state.membership.create_token(ttl).await?;
    let expires = std::time::UNIX_EPOCH + Duration::from_millis(made.expires_ms);
    Ok(Json(TokenAnswer {
        token: made.token,
        expires: humantime::format_rfc3339_seconds(expires).to_string(),
        ca_pin: state.ca_pin.clone(),
    }))
}

/// `DELETE /api/v1/nodes/{name}`: revokes an agent's credential and closes its tunnel.
#[utoipa::path(
    delete, operation_id = "remove_node", path = "/api/v1/nodes/{name}", tag = "nodes",
    params(("name" = String, Path, description = "The node's name")),
    responses((status = 200, description = "Its credential revoked, its tunnel closed", body = super::openapi::Removal))
)]
pub async fn remove(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<super::openapi::Removal>, ApiError> {
    state.membership.remove(&name).await?;
    Ok(Json(super::openapi::Removal { removed: name }))
}

#[derive(utoipa::ToSchema, Serialize)]
#[schema(as = NodeAction)]
struct Acted {
    node: String,
    state: NodeState,
}

/// `POST /api/v1/nodes/{name}/cordon|uncordon|drain`.
#[utoipa::path(
    post, operation_id = "node_action", path = "/api/v1/nodes/{name}/{action}", tag = "nodes",
    params(
        ("name" = String, Path, description = "The node's name"),
        ("action" = String, Path, description = "`cordon`, `uncordon` or `drain`"),
    ),
    responses((status = 200, description = "The node's state now", body = Acted))
)]
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
