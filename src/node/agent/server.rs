//! The node API an agent serves to its gateway over the tunnel it dialed: the axum router
//! of control calls (each a thin wrapper over the agent's `LocalNode`), and CONNECT streams
//! to the node's own containers. The tunnel was authenticated when it opened (the agent
//! dialed the gateway, verified its certificate, and presented its credential), so calls
//! on it carry no credential of their own. `RemoteNode` is the client of these routes.
//!
//! A CONNECT is accepted only to the endpoint of a container Ember manages on this node:
//! the tunnel is never an open relay into the node's network. The managed endpoints are
//! read from the engine and trusted for `ALLOWED_FOR` at most; a miss reads them again,
//! and stopping or pausing a container forgets them, so an address a stopped container
//! left (and another container took) is never reached through a stale list. Node errors become responses
//! here, in `AgentError`, and nowhere else.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tower_service::Service;
use tracing::Instrument;

use crate::node::wire::{Heartbeat, NodeInfo, WireErrorBody};
use crate::node::{InstanceSpec, LocalNode, Node, NodeError};

/// Largest image build context the API accepts, in bytes.
const MAX_BUILD_CONTEXT: usize = 1 << 30;

/// Build progress lines buffered between the build and the response.
const BUILD_PROGRESS_BUFFER: usize = 1024;

/// How long a list of managed endpoints is trusted.
const ALLOWED_FOR: Duration = Duration::from_secs(1);

/// The endpoints of the node's managed containers, as last read.
#[derive(Default)]
pub(super) struct Allowed {
    /// When the read that produced `endpoints` began.
    read_at: Option<Instant>,
    /// When a container last stopped or paused: a list read before is stale.
    forgotten_at: Option<Instant>,
    endpoints: HashSet<SocketAddr>,
}

impl Allowed {
    /// Whether a read that began at `t` is newer than everything known.
    fn newer(&self, t: Instant) -> bool {
        self.read_at.is_none_or(|r| r < t) && self.forgotten_at.is_none_or(|f| f < t)
    }
}

/// The allow-list shared by the CONNECT path and the control routes that change it.
pub(super) type SharedAllowed = Arc<Mutex<Allowed>>;

fn forget(allowed: &SharedAllowed) {
    allowed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .forgotten_at = Some(Instant::now());
}

#[derive(Clone)]
struct AgentState {
    node: Arc<LocalNode>,
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
        .route("/node/v1/containers/{id}/pause", post(pause))
        .route("/node/v1/containers/{id}/resume", post(resume))
        .route(
            "/node/v1/images",
            get(image_exists)
                .post(build_image)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_BUILD_CONTEXT)),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state)
}

/// What the tunnel serves: CONNECT streams to the node's containers, and the node API.
#[derive(Clone)]
pub(super) struct TunnelService {
    app: Router,
    node: Arc<LocalNode>,
    allowed: SharedAllowed,
    tracker: TaskTracker,
}

impl TunnelService {
    pub(super) fn new(
        app: Router,
        node: Arc<LocalNode>,
        allowed: SharedAllowed,
        tracker: TaskTracker,
    ) -> TunnelService {
        TunnelService {
            app,
            node,
            allowed,
            tracker,
        }
    }

    /// Answers one request of the tunnel.
    pub(super) async fn call<B>(mut self, req: Request<B>) -> Result<Response, Infallible>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>,
    {
        if req.method() == Method::CONNECT {
            return Ok(self.connect(req).await);
        }
        self.app.call(req.map(Body::new)).await
    }

    /// Opens a stream to a managed container's endpoint and splices it to the CONNECT
    /// stream once the gateway's side is upgraded.
    async fn connect<B>(&self, mut req: Request<B>) -> Response {
        let target = req
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
        let Some(target) = target else {
            return refuse(StatusCode::BAD_REQUEST, "CONNECT needs ip:port");
        };
        if !self.is_managed_endpoint(target).await {
            tracing::warn!(%target, "refused a CONNECT to an address that is no container of this node");
            return refuse(
                StatusCode::FORBIDDEN,
                "not the endpoint of a managed container",
            );
        }
        let tcp = match crate::node::connect_tcp(target).await {
            Ok(s) => s,
            Err(e) => return refuse(StatusCode::BAD_GATEWAY, &e.to_string()),
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        self.tracker.spawn(
            async move {
                let Ok(upgraded) = on_upgrade.await else {
                    return;
                };
                let mut upgraded = TokioIo::new(upgraded);
                let mut tcp = tcp;
                if let Err(e) = tokio::io::copy_bidirectional(&mut upgraded, &mut tcp).await {
                    tracing::debug!(error = %e, "a container stream ended with an error");
                }
            }
            .instrument(tracing::debug_span!("stream", %target)),
        );
        StatusCode::OK.into_response()
    }

    /// Whether `target` is where a container Ember manages here answers: from a list read
    /// within `ALLOWED_FOR`, else from a fresh one (kept unless a newer read landed first).
    async fn is_managed_endpoint(&self, target: SocketAddr) -> bool {
        {
            let allowed = self.allowed.lock().unwrap_or_else(|e| e.into_inner());
            let fresh = allowed.read_at.is_some_and(|t| {
                t.elapsed() < ALLOWED_FOR && allowed.forgotten_at.is_none_or(|f| f < t)
            });
            if fresh && allowed.endpoints.contains(&target) {
                return true;
            }
        }
        let began = Instant::now();
        let Ok(containers) = self.node.list_managed().await else {
            return false;
        };
        let endpoints: HashSet<_> = containers.into_iter().filter_map(|c| c.endpoint).collect();
        let managed = endpoints.contains(&target);
        let mut allowed = self.allowed.lock().unwrap_or_else(|e| e.into_inner());
        if allowed.newer(began) {
            allowed.read_at = Some(began);
            allowed.endpoints = endpoints;
        }
        managed
    }
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, why.to_string()).into_response()
}

async fn describe(State(s): State<AgentState>) -> Json<NodeInfo> {
    let mut info = (*s.info).clone();
    info.gpus = s.node.gpus().await;
    Json(info)
}

async fn gpus(State(s): State<AgentState>) -> Json<Heartbeat> {
    Json(Heartbeat {
        gpus: s.node.gpus().await,
    })
}

/// A node error as the node API answers it.
struct AgentError(NodeError);

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let status = match &self.0 {
            NodeError::Runtime(crate::runtime::RuntimeError::ImageNotFound(_)) => {
                StatusCode::NOT_FOUND
            }
            NodeError::ExitedAtStart { .. } => StatusCode::CONFLICT,
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
struct ImageQuery {
    tag: String,
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

    use http_body_util::BodyExt;
    use tower_service::Service;

    use super::*;
    use crate::node::local::Endpoints;
    use crate::runtime::fake::FakeRuntime;
    use crate::runtime::{ContainerInfo, LABEL_PORT};

    fn info() -> NodeInfo {
        NodeInfo {
            protocol: 1,
            name: "n1".into(),
            labels: Default::default(),
            gpu_driver: crate::gpu::GpuDriver::Simulated,
            gpu_source: "none".into(),
            gpus: Vec::new(),
        }
    }

    fn container(id: &str, host_port: u16) -> ContainerInfo {
        ContainerInfo {
            id: id.into(),
            labels: [(LABEL_PORT.to_string(), "8080".to_string())].into(),
            running: true,
            paused: false,
            exit_code: None,
            status: "running".into(),
            host_port: Some(host_port),
            ip: None,
        }
    }

    /// The status a CONNECT to `target` gets (403: refused by the allow-list).
    async fn connect_status(service: &TunnelService, target: &str) -> StatusCode {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(target)
            .body(Body::empty())
            .unwrap();
        service.clone().call(req).await.unwrap().status()
    }

    #[tokio::test]
    async fn connects_reach_only_managed_containers_and_never_a_stopped_ones_address() {
        // A port nothing listens on: an allowed CONNECT gets as far as dialing (502).
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let runtime = Arc::new(FakeRuntime::default());
        runtime
            .containers
            .lock()
            .unwrap()
            .push(container("c1", port));
        let node = Arc::new(
            LocalNode::new("n1", "gw", IpAddr::V4(Ipv4Addr::LOCALHOST), runtime.clone())
                .with_endpoints(Endpoints::Published),
        );
        let allowed = SharedAllowed::default();
        let app = router(node.clone(), info(), allowed.clone());
        let service = TunnelService::new(app.clone(), node, allowed, TaskTracker::new());
        let target = format!("127.0.0.1:{port}");

        assert_eq!(
            connect_status(&service, &target).await,
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            connect_status(&service, "127.0.0.1:1").await,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            connect_status(&service, "10.0.0.1:80").await,
            StatusCode::FORBIDDEN
        );

        // Stopped: its address is refused at once, within the list's lifetime.
        let stop = Request::delete("/node/v1/containers/c1")
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            app.clone().call(stop).await.unwrap().status(),
            StatusCode::OK
        );
        assert_eq!(
            connect_status(&service, &target).await,
            StatusCode::FORBIDDEN
        );

        // A container that appears is reachable without waiting for the list to age.
        runtime
            .containers
            .lock()
            .unwrap()
            .push(container("c2", port));
        assert_eq!(
            connect_status(&service, &target).await,
            StatusCode::BAD_GATEWAY
        );
        // One that vanishes behind Ember's back is refused once the list aged.
        runtime.containers.lock().unwrap().clear();
        tokio::time::sleep(ALLOWED_FOR + Duration::from_millis(50)).await;
        assert_eq!(
            connect_status(&service, &target).await,
            StatusCode::FORBIDDEN
        );
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
