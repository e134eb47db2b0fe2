//! The agent's image routes: a pull with its progress streamed back as NDJSON, and an
//! image saved to, or loaded from, a streamed `docker save` tar (how an image reaches a
//! node that has no registry to pull from).
//!
//! A pull answers `200` at once, then one line per whole percent
//! (`{"progress":{"done":N,"total":M}}`) and a last line, `{"done":true}` or the node
//! error's wire body: the outcome is only known at the end.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::server::{AgentError, AgentState, ImageQuery};
use crate::node::wire::WireErrorBody;
use crate::node::Node;
use crate::runtime::{ImageProgress, RegistryAuth};

/// Header of an export's answer: the image's size in bytes, when known.
pub const SIZE_HEADER: &str = "ember-image-size";

/// A pull request.
#[derive(Debug, Serialize, Deserialize)]
pub struct PullRequest {
    /// The image.
    pub image: String,
    /// The registry login, when the registry wants one.
    #[serde(default)]
    pub auth: Option<RegistryAuth>,
}

/// One line of a pull's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PullLine {
    /// How far it has got.
    Progress {
        /// Bytes.
        progress: ImageProgress,
    },
    /// It is done.
    Done {
        /// Always true.
        done: bool,
    },
    /// It failed.
    Failed(WireErrorBody),
}

/// `POST /node/v1/images/pull`. The pull runs as its answer is read: a gateway that stops
/// reading (its start was cancelled) ends it, and the next start pulls again.
pub(super) async fn pull(State(s): State<AgentState>, Json(req): Json<PullRequest>) -> Response {
    let (tx, rx) = mpsc::channel::<ImageProgress>(16);
    let node = Arc::clone(&s.node);
    let work: Pin<Box<dyn Future<Output = PullLine> + Send>> = Box::pin(async move {
        match node.pull_image(&req.image, req.auth, tx).await {
            Ok(()) => PullLine::Done { done: true },
            Err(e) => {
                tracing::warn!(image = %req.image, error = %crate::model::error_chain(&e), "pull failed");
                PullLine::Failed(WireErrorBody::from_node_error(&e))
            }
        }
    });
    let lines = futures_util::stream::unfold((Some(work), rx), |(work, mut rx)| async move {
        let mut work = work?;
        let line = tokio::select! {
            Some(progress) = rx.recv() => {
                let line = PullLine::Progress { progress };
                return Some((Ok::<_, std::io::Error>(ndjson_line(&line)), (Some(work), rx)));
            }
            last = &mut work => last,
        };
        Some((Ok(ndjson_line(&line)), (None, rx)))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

fn ndjson_line(line: &PullLine) -> String {
    format!("{}\n", serde_json::to_string(line).unwrap_or_default())
}

/// `GET /node/v1/images/export?tag=T`: the image as a `docker save` tar.
pub(super) async fn export(
    State(s): State<AgentState>,
    Query(q): Query<ImageQuery>,
) -> Result<Response, AgentError> {
    let (size, tar) = s.node.export_image(&q.tag).await?;
    let mut resp = ([(header::CONTENT_TYPE, "application/x-tar")], tar).into_response();
    if let Some(size) = size {
        resp.headers_mut().insert(SIZE_HEADER, size.into());
    }
    Ok(resp)
}

/// `POST /node/v1/images/load` with a `docker save` tar.
pub(super) async fn load(State(s): State<AgentState>, tar: Body) -> Result<Response, AgentError> {
    s.node.load_image(tar).await?;
    Ok(Json(serde_json::json!({ "loaded": true })).into_response())
}
