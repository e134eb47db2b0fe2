//! `ember agent`: a node of a remote gateway.
//!
//! The agent owns the local Docker engine and GPUs. It binds its node API, registers with
//! the gateway (join token), then sends heartbeats with its GPU inventory; the gateway
//! drives it through the node API (`RemoteNode` is the client), which wraps the same
//! `LocalNode` the embedded node uses. Every call must carry the join token. A gateway
//! that has forgotten the node (404 on a heartbeat) gets a fresh registration.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use http::Method;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::wire::{Heartbeat, Registered, Registration, WireErrorBody, PROTOCOL_VERSION};
use super::{InstanceSpec, LocalNode, Node, NodeError};
use crate::client::{render_api_error, ApiClient, ClientError};
use crate::gpu::{GpuDriver, GpuMonitor};
use crate::runtime::{ContainerRuntime, DockerRuntime};

/// `ember agent` settings.
#[derive(Debug, Clone, Args)]
pub struct AgentConfig {
    /// Gateway URL.
    #[arg(long, env = "EMBER_GATEWAY")]
    pub gateway: String,
    /// Join token (the gateway's --join-token).
    #[arg(long, env = "EMBER_JOIN_TOKEN")]
    pub token: String,
    /// Node name (a lower-case DNS label).
    #[arg(long, env = "EMBER_NODE_NAME")]
    pub name: String,
    /// Address the node API listens on.
    #[arg(long, env = "EMBER_AGENT_LISTEN", default_value = "0.0.0.0:8090")]
    pub listen: SocketAddr,
    /// Host or IP the gateway reaches this node and its containers at.
    #[arg(long, env = "EMBER_ADVERTISE")]
    pub advertise: String,
    /// Labels, `k=v,k2=v2`.
    #[arg(long, env = "EMBER_LABELS", value_parser = parse_labels, default_value = "")]
    pub labels: BTreeMap<String, String>,
    /// Declared GPU inventory (simulation mode unless --gpu-driver says otherwise).
    #[arg(long, env = "EMBER_GPU_INVENTORY")]
    pub gpu_inventory: Option<PathBuf>,
    /// How containers get GPUs: nvidia, cdi or simulated.
    #[arg(long, env = "EMBER_GPU_DRIVER", value_enum)]
    pub gpu_driver: Option<GpuDriver>,
    /// Directory for the agent's own files: `agent.json` remembers the gateway it joined,
    /// so joining another one removes the containers the old one left here.
    #[arg(long, env = "EMBER_DATA_DIR", default_value = ".ember-agent")]
    pub data_dir: PathBuf,
}

/// File in the data dir naming the gateway this node last joined.
pub const MEMBERSHIP_FILE: &str = "agent.json";

fn previous_gateway(file: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["gateway_id"].as_str().map(str::to_string)
}

/// Parses `k=v,k2=v2`.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(format!("`{pair}` is not k=v"));
        };
        let k = k.trim();
        if k.is_empty()
            || !k
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        {
            return Err(format!(
                "`{k}` is not a label name (letters, digits, - _ . /)"
            ));
        }
        out.insert(k.to_string(), v.trim().to_string());
    }
    Ok(out)
}

#[derive(Clone)]
struct AgentState {
    node: Arc<LocalNode>,
    token: Arc<str>,
}

/// Runs the agent until `shutdown`.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    if let Err(e) = crate::manifest::check_name(&config.name) {
        anyhow::bail!("--name: {e}");
    }
    if config.token.trim().is_empty() {
        anyhow::bail!("--token: expected the gateway's join token");
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
    let runtime: Arc<dyn ContainerRuntime> = Arc::new(DockerRuntime::connect().await?);
    runtime.ping().await?;
    let (monitor, driver) = GpuMonitor::setup(config.gpu_inventory.as_deref(), config.gpu_driver)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let port = listener.local_addr()?.port();
    let url = format!("http://{}:{port}", config.advertise);
    let client = ApiClient::new(&config.gateway)?;
    let mut registration = Registration {
        protocol: PROTOCOL_VERSION,
        name: config.name.clone(),
        url: url.clone(),
        labels: config.labels.clone(),
        gpu_driver: driver,
        gpu_source: monitor.source(),
        gpus: monitor.read().await,
    };
    let registered = register(&client, &config.token, &registration, &shutdown).await?;
    // Containers are published where the gateway reaches them.
    let publish_ip = config
        .advertise
        .parse::<IpAddr>()
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let membership_file = config.data_dir.join(MEMBERSHIP_FILE);
    if let Some(previous) = previous_gateway(&membership_file) {
        if previous != registered.gateway_id {
            // This machine now belongs to another gateway: what the old one started here
            // would otherwise run forever, since no gateway will ever reconcile it.
            let old = LocalNode::new(&config.name, &previous, publish_ip, runtime.clone());
            for c in old.list_managed().await.unwrap_or_default() {
                tracing::info!(container = %c.container_id, gateway = %previous, "removing a container of the gateway this node left");
                let _ = old.stop(&c.container_id).await;
            }
        }
    }
    let record =
        serde_json::json!({ "gateway": config.gateway, "gateway_id": registered.gateway_id });
    std::fs::write(&membership_file, record.to_string())
        .with_context(|| format!("cannot write {}", membership_file.display()))?;
    let node = Arc::new(
        LocalNode::new(&config.name, &registered.gateway_id, publish_ip, runtime)
            .with_gpus(monitor.clone(), driver),
    );
    println!("ember agent {} serving node API on {url}", config.name);
    tracing::info!(node = %config.name, %url, gateway = %config.gateway, "registered with the gateway");
    let state = AgentState {
        node: node.clone(),
        token: config.token.clone().into(),
    };
    let app = router(state);
    let server =
        axum::serve(listener, app).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let beat = async {
        let interval = Duration::from_millis(registered.heartbeat_ms.max(100));
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(interval) => {}
            }
            registration.gpus = node.gpus().await;
            let hb = Heartbeat {
                gpus: registration.gpus.clone(),
            };
            let path = format!("/api/v1/nodes/{}/heartbeat", config.name);
            match send(&client, &config.token, Method::POST, &path, &hb).await {
                Ok(StatusCode::OK) => {
                    if failing {
                        tracing::info!("gateway reachable again");
                    }
                    failing = false;
                }
                Ok(StatusCode::NOT_FOUND) => {
                    tracing::info!("the gateway does not know this node; registering again");
                    if let Err(e) = register(&client, &config.token, &registration, &shutdown).await
                    {
                        tracing::warn!(error = %e, "registration failed");
                    }
                }
                Ok(status) => {
                    if !failing {
                        tracing::warn!(%status, "gateway refused the heartbeat");
                    }
                    failing = true;
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "cannot reach the gateway; retrying");
                    }
                    failing = true;
                }
            }
        }
    };
    let (served, ()) = tokio::join!(server, beat);
    served?;
    Ok(())
}

async fn send<T: serde::Serialize>(
    client: &ApiClient,
    token: &str,
    method: Method,
    path: &str,
    body: &T,
) -> Result<StatusCode, ClientError> {
    let headers = [
        ("authorization".to_string(), format!("Bearer {token}")),
        ("content-type".to_string(), "application/json".to_string()),
    ];
    let body = serde_json::to_vec(body).expect("serializes");
    let resp = client.send(method, path, &headers, body.into()).await?;
    Ok(resp.status())
}

async fn register(
    client: &ApiClient,
    token: &str,
    registration: &Registration,
    shutdown: &CancellationToken,
) -> anyhow::Result<Registered> {
    let headers = [
        ("authorization".to_string(), format!("Bearer {token}")),
        ("content-type".to_string(), "application/json".to_string()),
    ];
    let mut warned = false;
    loop {
        let body = serde_json::to_vec(registration)?;
        match client
            .send(
                Method::POST,
                "/api/v1/nodes/register",
                &headers,
                body.into(),
            )
            .await
        {
            Ok(resp) => {
                let status = resp.status();
                let bytes = http_body_util::BodyExt::collect(resp.into_body())
                    .await?
                    .to_bytes();
                if status.is_success() {
                    return Ok(serde_json::from_slice(&bytes)?);
                }
                let text = render_api_error(status, &bytes);
                if status == StatusCode::UNAUTHORIZED || status == StatusCode::BAD_REQUEST {
                    anyhow::bail!("the gateway refused this node: {text}");
                }
                if !warned {
                    tracing::warn!(%text, "registration refused; retrying");
                }
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "cannot reach the gateway; retrying");
                }
            }
        }
        warned = true;
        tokio::select! {
            _ = shutdown.cancelled() => anyhow::bail!("shut down before registering"),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

fn router(state: AgentState) -> Router {
    Router::new()
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
                .layer(axum::extract::DefaultBodyLimit::max(1 << 30)),
        )
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state)
}

async fn authorize(State(state): State<AgentState>, req: Request, next: Next) -> Response {
    if !crate::access::check_bearer(req.headers(), &state.token) {
        tracing::warn!(path = %req.uri().path(), "refused a call without the join token");
        let body = WireErrorBody::unauthorized("missing or wrong join token");
        return (StatusCode::UNAUTHORIZED, Json(body)).into_response();
    }
    next.run(req).await
}

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
    s.node.stop(&id).await?;
    Ok(Json(serde_json::json!({})).into_response())
}

async fn pause(
    State(s): State<AgentState>,
    Path(id): Path<String>,
) -> Result<Response, AgentError> {
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
    let (tx, mut rx) = mpsc::channel(1024);
    let collect = tokio::spawn(async move {
        let mut lines = Vec::new();
        while let Some(line) = rx.recv().await {
            lines.push(line);
        }
        lines
    });
    let dockerfile = q.dockerfile.unwrap_or_else(|| "Dockerfile".into());
    let result = s.node.build_image(&q.tag, &dockerfile, body, tx).await;
    let lines = collect.await.unwrap_or_default();
    result?;
    Ok(Json(lines).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_from_k_equals_v_lists() {
        let l = parse_labels("zone=a, gpu=high ,").unwrap();
        assert_eq!(l["zone"], "a");
        assert_eq!(l["gpu"], "high");
        assert!(parse_labels("").unwrap().is_empty());
        assert!(parse_labels("novalue").is_err());
        assert!(parse_labels("bad key=1").is_err());
    }
}
