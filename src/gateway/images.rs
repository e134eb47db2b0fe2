//! `/api/v1/images`: whether an image is on the nodes, and building one from a build
//! context the CLI uploads as a tar, with the build's progress streamed back as NDJSON
//! lines (`{"progress": "..."}`, then `{"done": true}` or `{"error": "..."}`).

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::Instrument;

use super::error::ApiError;
use super::AppState;
use crate::model::{ErrorCode, FieldError};
use crate::node::Node;

/// Builds `tag` on each node in turn, forwarding each node's progress as NDJSON lines;
/// the last line says whether every build succeeded.
async fn build_on_nodes(
    nodes: Vec<Arc<dyn Node>>,
    tag: &str,
    dockerfile: &str,
    context: Bytes,
    out: &mpsc::Sender<String>,
) {
    let mut failed = None;
    for node in nodes {
        let (tx, mut rx) = mpsc::channel::<String>(64);
        let forward = async {
            while let Some(line) = rx.recv().await {
                let json = serde_json::json!({ "node": node.name(), "progress": line });
                let _ = out.send(json.to_string()).await;
            }
        };
        let (result, ()) = tokio::join!(
            node.build_image(tag, dockerfile, context.clone(), tx),
            forward
        );
        if let Err(e) = result {
            tracing::warn!(node = %node.name(), error = %crate::model::error_chain(&e), "image build failed");
            failed = Some(format!("node `{}`: {}", node.name(), e.public_message()));
            break;
        }
    }
    let last = match failed {
        Some(error) => serde_json::json!({ "error": error }),
        None => serde_json::json!({ "done": true, "tag": tag }),
    };
    let _ = out.send(last.to_string()).await;
}

/// Largest build context accepted.
pub const MAX_CONTEXT_BYTES: usize = 1 << 30;

/// Query of the image routes.
#[derive(utoipa::IntoParams, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ImageQuery {
    tag: String,
    #[serde(default)]
    dockerfile: Option<String>,
}

#[derive(utoipa::ToSchema, Serialize)]
struct NodeImage {
    node: String,
    exists: bool,
}

#[derive(utoipa::ToSchema, Serialize)]
struct ImagePresence {
    tag: String,
    exists: bool,
    nodes: Vec<NodeImage>,
}

/// A tag the engine will take, or `400 invalid_tag` saying what one looks like.
fn check_tag(tag: &str) -> Result<(), ApiError> {
    if crate::manifest::valid_image_ref(tag) {
        return Ok(());
    }
    Err(ApiError::BadRequest {
        code: ErrorCode::InvalidTag,
        message: format!(
            "`{tag}` is not an image tag Docker accepts, like `repo/name:tag` (lower case)"
        ),
        details: vec![FieldError {
            field: "tag".into(),
            message: "expected `[registry[:port]/]name[:tag]`, the name in lower case".into(),
        }],
    })
}

/// `GET /api/v1/images?tag=T`: which nodes have the image.
#[utoipa::path(
    get, operation_id = "get_image", path = "/api/v1/images", tag = "images", params(ImageQuery),
    responses((status = 200, description = "Whether each node has the image", body = ImagePresence))
)]
pub async fn get_image(
    State(state): State<AppState>,
    Query(q): Query<ImageQuery>,
) -> Result<Json<impl Serialize>, ApiError> {
    check_tag(&q.tag)?;
    let mut nodes = Vec::new();
    for node in state.activator().scheduler().live_nodes() {
        nodes.push(NodeImage {
            node: node.name().to_string(),
            exists: node.image_exists(&q.tag).await?,
        });
    }
    Ok(Json(ImagePresence {
        exists: !nodes.is_empty() && nodes.iter().all(|n| n.exists),
        tag: q.tag,
        nodes,
    }))
}

/// `POST /api/v1/images?tag=T[&dockerfile=F]` with a tar body: builds on every node
/// that lacks the image.
#[utoipa::path(
    post, operation_id = "build_image", path = "/api/v1/images", tag = "images", params(ImageQuery),
    request_body(content = [u8], content_type = "application/octet-stream", description = "The build context: a tar (at most 1 GiB)"),
    responses((status = 200, description = "Build progress, one JSON object a line (`{node, progress}`), then `{done, tag}` or `{error}`", content_type = "application/x-ndjson"))
)]
pub async fn build_image(
    State(state): State<AppState>,
    Query(q): Query<ImageQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_tag(&q.tag)?;
    let dockerfile = q.dockerfile.unwrap_or_else(|| "Dockerfile".into());
    let nodes = state.activator().scheduler().live_nodes();
    let (lines_tx, lines_rx) = mpsc::channel::<String>(64);
    let shutdown = state.shutdown.clone();
    let span = tracing::info_span!("build", tag = %q.tag);
    state.tracker.spawn(
        async move {
            tokio::select! {
                _ = build_on_nodes(nodes, &q.tag, &dockerfile, body, &lines_tx) => {}
                _ = shutdown.cancelled() => {
                    let stop = serde_json::json!({ "error": "the gateway is shutting down" });
                    let _ = lines_tx.send(stop.to_string()).await;
                }
            }
        }
        .instrument(span),
    );
    Ok(ndjson(lines_rx))
}

/// One node's pre-pull, sampled into NDJSON lines for `out` until it ends.
async fn pull_on_node(
    state: &AppState,
    node: Arc<dyn Node>,
    image: &str,
    out: &mpsc::Sender<String>,
) -> bool {
    let name = node.name().to_string();
    let meter = std::sync::Mutex::new(None);
    let work = state.activator().ensure_image(&node, image, |m| {
        *meter.lock().unwrap_or_else(|e| e.into_inner()) = Some(m);
    });
    tokio::pin!(work);
    let mut shown = None;
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = tick.tick() => {
                let now = meter.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|m| m.status());
                if let Some(now) = now.filter(|n| Some(*n) != shown) {
                    shown = Some(now);
                    let line = serde_json::json!({ "node": name, "image_progress": now });
                    // A client that reads slowly misses progress lines; the supply, which
                    // holds its node's turn, never waits for it.
                    let _ = out.try_send(line.to_string());
                }
            }
        }
    };
    let supplied = meter.lock().unwrap_or_else(|e| e.into_inner()).is_some();
    let line = match &result {
        Ok(()) => serde_json::json!({ "node": name, "ready": true, "supplied": supplied }),
        Err(e) => {
            tracing::warn!(node = %name, %image, error = %crate::model::error_chain(e), "pre-pull failed");
            serde_json::json!({ "node": name, "error": e.public_message() })
        }
    };
    let _ = out.send(line.to_string()).await;
    result.is_ok()
}

/// How often a pre-pull's progress is sampled.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// `POST /api/v1/images/pull` with a manifest (JSON): makes its image present on every
/// reachable node that could run it (pulled, or copied from a node that has it), all at
/// once, answering NDJSON lines: `{"node","image_progress"}` as it goes, `{"node","ready"}`
/// or `{"node","error"}` per node, and `{"done":true,"nodes":N,"failed":K}` last.
#[utoipa::path(
    post, operation_id = "pull_image", path = "/api/v1/images/pull", tag = "images",
    request_body(content((crate::manifest::Manifest = "application/json"), (String = "text/plain")), description = "A manifest: its image (and registry) is pulled onto every node"),
    responses((status = 200, description = "Pull progress, one JSON object a line, then `{done, nodes, failed}` or `{error}`", content_type = "application/x-ndjson"))
)]
pub async fn pull_image(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let text = String::from_utf8_lossy(&body);
    let manifest = crate::manifest::Manifest::parse(&text, crate::manifest::Format::Json)?;
    let Some(image) = manifest.image.clone() else {
        return Err(ApiError::BadRequest {
            code: ErrorCode::InvalidManifest,
            message: "image: missing; there is nothing to pull".into(),
            details: vec![FieldError {
                field: "image".into(),
                message: "missing".into(),
            }],
        });
    };
    let nodes = state
        .activator()
        .scheduler()
        .capable_nodes(crate::scheduler::Needs::of(&manifest));
    let (lines_tx, lines_rx) = mpsc::channel::<String>(64);
    let shutdown = state.shutdown.clone();
    let span = tracing::info_span!("pre_pull", %image);
    let task_state = state.clone();
    state.tracker.spawn(
        async move {
            let all = futures_util::future::join_all(
                nodes
                    .iter()
                    .map(|n| pull_on_node(&task_state, n.clone(), &image, &lines_tx)),
            );
            tokio::select! {
                results = all => {
                    let failed = results.iter().filter(|ok| !**ok).count();
                    let last = serde_json::json!({ "done": true, "nodes": results.len(), "failed": failed });
                    let _ = lines_tx.send(last.to_string()).await;
                }
                _ = shutdown.cancelled() => {
                    let stop = serde_json::json!({ "error": "the gateway is shutting down" });
                    let _ = lines_tx.send(stop.to_string()).await;
                }
            }
        }
        .instrument(span),
    );
    Ok(ndjson(lines_rx))
}

/// An NDJSON answer of the lines `rx` brings.
fn ndjson(rx: mpsc::Receiver<String>) -> Response {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|line| (Ok::<_, std::io::Error>(format!("{line}\n")), rx))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}
