//! The agent's log route: a container's output streamed to the gateway as NDJSON, one
//! frame per line, `{"stream":"stdout","line":"…"}`, read by `RemoteNode::stream_logs`.
//! A failure after the answer began is its last frame, the node error's wire body.
//!
//! `GET /node/v1/containers/{id}/logs/stream?follow=true&since=S&tail=N&timestamps=true`
//! (`LogOptions`); with `follow` the answer stays open until the container stops or the
//! gateway lets go of it.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::server::{AgentError, AgentState};
use crate::node::wire::WireErrorBody;
use crate::node::Node;
use crate::runtime::{LogLine, LogOptions};

/// One frame of a log answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LogFrame {
    /// A line of output.
    Line(LogLine),
    /// Reading the output failed; nothing follows.
    Failed(WireErrorBody),
}

impl LogFrame {
    /// The frame as one NDJSON line.
    pub fn ndjson(&self) -> String {
        format!("{}\n", serde_json::to_string(self).unwrap_or_default())
    }
}

/// `GET /node/v1/containers/{id}/logs/stream`.
pub(super) async fn stream(
    State(s): State<AgentState>,
    Path(id): Path<String>,
    Query(options): Query<LogOptions>,
) -> Result<Response, AgentError> {
    let lines = s.node.stream_logs(&id, &options).await?;
    let frames = lines.map(move |item| {
        let frame = match item {
            Ok(line) => LogFrame::Line(line),
            Err(e) => {
                tracing::warn!(container = %id, error = %crate::model::error_chain(&e), "reading a container's output failed");
                LogFrame::Failed(WireErrorBody::from_node_error(&e))
            }
        };
        Ok::<_, std::convert::Infallible>(frame.ndjson())
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(frames),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;

    use axum::http::{Request, StatusCode};
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tower_service::Service;

    use super::*;
    use crate::node::agent::connect::SharedAllowed;
    use crate::node::LocalNode;
    use crate::runtime::fake::FakeRuntime;
    use crate::runtime::{LogChunk, OutputStream};

    #[tokio::test]
    async fn the_agent_streams_a_containers_output_as_one_frame_per_line() {
        let chunk = |stream, data: &'static str| LogChunk {
            stream,
            data: Bytes::from_static(data.as_bytes()),
        };
        let runtime = Arc::new(FakeRuntime {
            output: vec![
                chunk(OutputStream::Stdout, "ready\nser"),
                chunk(OutputStream::Stderr, "warn\n"),
                chunk(OutputStream::Stdout, "ving\n"),
            ],
            ..Default::default()
        });
        let node = LocalNode::new("n1", "gw", IpAddr::V4(Ipv4Addr::LOCALHOST), runtime);
        let info = crate::node::wire::NodeInfo {
            protocol: 1,
            name: "n1".into(),
            labels: Default::default(),
            gpu_driver: crate::gpu::GpuDriver::Simulated,
            gpu_source: "none".into(),
            gpus: Vec::new(),
            volumes: Vec::new(),
        };
        let mut app = super::super::server::router(Arc::new(node), info, SharedAllowed::default());
        let req = Request::get("/node/v1/containers/c1/logs/stream?follow=true&tail=10")
            .body(Body::empty())
            .unwrap();
        let resp = app.call(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert_eq!(
            text,
            "{\"stream\":\"stdout\",\"line\":\"ready\"}\n\
             {\"stream\":\"stderr\",\"line\":\"warn\"}\n\
             {\"stream\":\"stdout\",\"line\":\"serving\"}\n"
        );
    }
}
