//! `RemoteNode`'s image calls over the tunnel (the agent's side is agent/images.rs): a
//! pull read line by line as it goes, an export handed on as the stream it is, a load sent
//! as one. None has an overall timeout: images take as long as the link takes, and a dead
//! tunnel ends them.

use axum::body::Body;
use http::{Method, Request};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use super::RemoteNode;
use crate::client::encode;
use crate::node::agent::images::{PullLine, PullRequest, SIZE_HEADER};
use crate::node::tunnel::AUTHORITY;
use crate::node::wire::WireErrorBody;
use crate::node::NodeError;
use crate::runtime::{ImageProgress, RegistryAuth};

/// Longest line of a pull's answer the gateway reads.
const MAX_LINE: usize = 64 << 10;

impl RemoteNode {
    /// One call whose answer is read as it comes (a stream); an error answer is read
    /// whole and mapped back to the node error it stands for.
    pub(super) async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Body,
    ) -> Result<http::Response<hyper::body::Incoming>, NodeError> {
        let tunnel = self.tunnel()?;
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{AUTHORITY}{path}"))
            .header(http::header::CONTENT_TYPE, content_type)
            .body(body)
            .map_err(|e| self.remote(e.to_string()))?;
        let resp = tunnel
            .send(req)
            .await
            .map_err(|e| self.remote(format!("the call failed: {e}")))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_LINE)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Err(match serde_json::from_slice::<WireErrorBody>(&body) {
            Ok(e) => e.into_node_error(&self.name),
            Err(_) => self.remote(format!("answered {status}")),
        })
    }

    pub(super) async fn pull_over_tunnel(
        &self,
        image: &str,
        auth: Option<RegistryAuth>,
        progress: mpsc::Sender<ImageProgress>,
    ) -> Result<(), NodeError> {
        let req = PullRequest {
            image: image.to_string(),
            auth,
        };
        let json = serde_json::to_vec(&req).map_err(|e| self.remote(e.to_string()))?;
        let resp = self
            .send(
                Method::POST,
                "/node/v1/images/pull",
                "application/json",
                Body::from(json),
            )
            .await?;
        let mut body = resp.into_body();
        let mut pending = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| self.remote(format!("the pull's answer broke off: {e}")))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                match serde_json::from_slice::<PullLine>(&line) {
                    Ok(PullLine::Progress { progress: p }) => {
                        let _ = progress.try_send(p);
                    }
                    Ok(PullLine::Done { .. }) => return Ok(()),
                    Ok(PullLine::Failed(e)) => return Err(e.into_node_error(&self.name)),
                    Err(e) => return Err(self.remote(format!("bad pull answer: {e}"))),
                }
            }
            if pending.len() > MAX_LINE {
                return Err(self.remote("a pull answer line is too long".into()));
            }
        }
        Err(self.remote("the pull's answer ended before the pull did".into()))
    }

    pub(super) async fn export_over_tunnel(
        &self,
        image: &str,
    ) -> Result<(Option<u64>, Body), NodeError> {
        let path = format!("/node/v1/images/export?tag={}", encode(image));
        let resp = self
            .send(Method::GET, &path, "application/json", Body::empty())
            .await?;
        let size = resp
            .headers()
            .get(SIZE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Ok((size, Body::new(resp.into_body())))
    }

    pub(super) async fn load_over_tunnel(&self, tar: Body) -> Result<(), NodeError> {
        let resp = self
            .send(
                Method::POST,
                "/node/v1/images/load",
                "application/x-tar",
                tar,
            )
            .await?;
        // The answer comes once the load is done; its body says nothing more.
        let _ = http_body_util::Limited::new(resp.into_body(), MAX_LINE)
            .collect()
            .await;
        Ok(())
    }
}
