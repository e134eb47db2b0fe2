//! The node API an agent serves to its gateway over the tunnel it dialed: the axum router
//! of control calls, each a thin wrapper over the agent's `LocalNode` (CONNECT streams to
//! containers are connect.rs's). The tunnel was authenticated when it opened (the agent
//! dialed the gateway, verified its certificate, and presented its credential), so calls
//! on it carry no credential of their own. `RemoteNode` is the client of these routes.
//! Node errors become responses here, in `AgentError`, and nowhere else.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::connect::{forget, SharedAllowed};
use crate::node::wire::{Heartbeat, NodeInfo, WireErrorBody};
use crate::node::{InstanceSpec, LocalNode, Node, NodeError};

/// Largest image build context the API accepts, in bytes.
const MAX_BUILD_CONTEXT: usize = 1 << 30;

/// Build progress lines buffered between the build and the response.
const BUILD_PROGRESS_BUFFER: usize = 1024;

#[derive(Clone)]
pub(super) struct AgentState {
    pub(super) node: Arc<LocalNode>,
    info: Arc<NodeInfo>,
    allowed: SharedAllowed,
}

/// The node API over `node`, which describes itself as `info` (its GPUs read fresh);
/// stopping or pausing a container forgets `allowed`.
pub(super) fn router(node: Arc<LocalNode>, info: NodeInfo, allowed: SharedAllowed) -> Router {
    let state = AgentState {
        node,
        info: Arc::new(info),
        allowed,
    };
    Router::new()
        .route("/node/v1/info", get(describe))
        .route("/node/v1/gpus", get(gpus))
        .route("/node/v1/instances", post(start))
        .route("/node/v1/containers", get(list))
        .route(
            "/node/v1/containers/{id}",
            get(container_state).delete(stop),
        )
        .route("/node/v1/containers/{id}/logs", get(logs))
        .route(
            "/node/v1/containers/{id}/logs/stream",
            get(super::logs::stream),
        )
        .route("/node/v1/containers/{id}/pause", post(pause))
        .route("/node/v1/containers/{id}/resume", post(resume))
        .route("/node/v1/containers/{id}/park", post(park))
        .route("/node/v1/containers/{id}/unpark", post(unpark))
        .route(
            "/node/v1/images",
            get(image_exists)
                .post(build_image)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_BUILD_CONTEXT)),
        )
        .route("/node/v1/images/pull", post(super::images::pull))
        .route("/node/v1/images/export", get(super::images::export))
        .route(
            "/node/v1/images/load",
            post(super::images::load).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/node/v1/volumes", get(volumes))
        .route(
            "/node/v1/volumes/{volume}/files/{*path}",
            axum::routing::put(put_file).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state)
}

async fn describe(State(s): State<AgentState>) -> Json<NodeInfo> {
    let mut info = (*s.info).clone();
    info.gpus = s.node.gpus().await;
    info.volumes = s.node.volume_names().await;
    Json(info)
}

async fn gpus(State(s): State<AgentState>) -> Json<Heartbeat> {
    Json(Heartbeat {
        gpus: s.node.gpus().await,
        volumes: s.node.volume_names().await,
    })
}

/// A node error as the node API answers it.
pub(super) struct AgentError(NodeError);

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let status = match &self.0 {
            NodeError::Runtime(crate::runtime::RuntimeError::ImageNotFound(_)) => {
                StatusCode::NOT_FOUND
            }
            NodeError::ExitedAtStart { .. } => StatusCode::CONFLICT,
            NodeError::Runtime(crate::runtime::RuntimeError::Pull { .. }) => {
                StatusCode::BAD_GATEWAY
            }
            NodeError::Volume(crate::node::volumes::VolumeError::Io { .. }) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            NodeError::Volume(crate::node::volumes::VolumeError::BadPath(_)) => {
                StatusCode::BAD_REQUEST
            }
            NodeError::Volume(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, Json(WireErrorBody::from_node_error(&self.0))).into_response()
    }
}

impl From<NodeError> for AgentError {
    fn from(e: NodeError) -> Self {
        AgentError(e)
    }
}

async fn start(
    State(s): State<AgentState>,
    Json(spec): Json<InstanceSpec>,
) -> Result<Response, AgentError> {
    Ok(Json(s.node.start(&spec).await?).into_response())
}

async fn list(State(s): State<AgentState>) -> Result<Response, AgentError> {
    Ok(Json(s.node.list_managed().await?).into_response())
}

async fn container_state(
    State(s): State<AgentState>,
    Path(id): Path<String>,
) -> Result<Response, AgentError> {
    Ok(Json(s.node.state(&id).await?).into_response())
}

async fn stop(State(s): State<AgentState>, Path(id): Path<String>) -> Result<Response, AgentError> {
    forget(&s.allowed);
    let stopped = s.node.stop(&id).await;
    forget(&s.allowed);
    stopped?;
    Ok(Json(serde_json::json!({})).into_response())
}

async fn pause(
    State(s): State<AgentState>,
    Path(id): Path<String>,
) -> Result<Response, AgentError> {
    forget(&s.allowed);
    s.node.pause(&id).await?;
    Ok(Json(serde_json::json!({})).into_response())
}

async fn resume(
    State(s): State<AgentState>,
    Path(id): Path<String>,
) -> Result<Response, AgentError> {
    s.node.resume(&id).await?;
    Ok(Json(serde_json::json!({})).into_response())
}

async fn park(State(s): State<AgentState>, Path(id): Path<String>) -> Result<Response, AgentError> {
    forget(&s.allowed);
    let parked = s.node.park(&id).await;
    forget(&s.allowed);
    parked?;
    Ok(Json(serde_json::json!({})).into_response())
}

#[derive(serde::Deserialize)]
struct UnparkQuery {
    port: u16,
}

async fn unpark(
    State(s): State<AgentState>,
    Path(id): Path<String>,
    Query(q): Query<UnparkQuery>,
) -> Result<Response, AgentError> {
    // Its endpoint may be new: the tunnel's list of reachable containers is read again.
    let started = s.node.unpark(&id, q.port).await;
    forget(&s.allowed);
    Ok(Json(started?).into_response())
}

async fn volumes(State(s): State<AgentState>) -> Result<Response, AgentError> {
    Ok(Json(s.node.volumes().await?).into_response())
}

async fn put_file(
    State(s): State<AgentState>,
    Path((volume, path)): Path<(String, String)>,
    body: Body,
) -> Result<Response, AgentError> {
    let bytes = s.node.put_file(&volume, &path, body).await?;
    Ok(Json(serde_json::json!({ "bytes": bytes })).into_response())
}

#[derive(Deserialize)]
struct LogsQuery {
    #[serde(default = "default_lines")]
    lines: usize,
}

fn default_lines() -> usize {
    50
}

async fn logs(
    State(s): State<AgentState>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, AgentError> {
    Ok(Json(s.node.logs(&id, q.lines).await?).into_response())
}

#[derive(Deserialize)]
pub(super) struct ImageQuery {
    pub(super) tag: String,
    #[serde(default)]
    dockerfile: Option<String>,
}

async fn image_exists(
    State(s): State<AgentState>,
    Query(q): Query<ImageQuery>,
) -> Result<Response, AgentError> {
    Ok(Json(s.node.image_exists(&q.tag).await?).into_response())
}

async fn build_image(
    State(s): State<AgentState>,
    Query(q): Query<ImageQuery>,
    body: Bytes,
) -> Result<Response, AgentError> {
    let (tx, mut rx) = mpsc::channel(BUILD_PROGRESS_BUFFER);
    let dockerfile = q.dockerfile.unwrap_or_else(|| "Dockerfile".into());
    let collect = async move {
        let mut lines = Vec::new();
        while let Some(line) = rx.recv().await {
            lines.push(line);
        }
        lines
    };
    // The channel is bounded, so the lines are read while the build runs; the build drops
    // its sender when it ends, which ends the collection.
    let (result, lines) = tokio::join!(s.node.build_image(&q.tag, &dockerfile, body, tx), collect);
    result?;
    Ok(Json(lines).into_response())
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower_service::Service;

    use super::*;
    use crate::runtime::fake::FakeRuntime;

    fn info() -> NodeInfo {
        NodeInfo {
            protocol: 1,
            name: "n1".into(),
            labels: Default::default(),
            gpu_driver: crate::gpu::GpuDriver::Simulated,
            gpu_source: "none".into(),
            gpus: Vec::new(),
            volumes: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_build_answers_every_progress_line_even_past_the_buffer() {
        let lines = 3 * BUILD_PROGRESS_BUFFER;
        let runtime = Arc::new(FakeRuntime {
            build_lines: lines,
            ..Default::default()
        });
        let node = LocalNode::new("n1", "gw", IpAddr::V4(Ipv4Addr::LOCALHOST), runtime);
        let mut app = router(Arc::new(node), info(), SharedAllowed::default());
        let req = Request::builder()
            .method("POST")
            .uri("/node/v1/images?tag=t:1")
            .body(axum::body::Body::from("context"))
            .unwrap();
        let resp = app.call(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let got: Vec<String> = serde_json::from_slice(&body).unwrap();
        assert_eq!(got.len(), lines);
        assert_eq!(got.last(), Some(&format!("step {}", lines - 1)));
    }
}
