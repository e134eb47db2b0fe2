//! `RemoteNode`'s log stream over the tunnel (the agent's side is agent/logs.rs): NDJSON
//! frames read as they come, not bounded as a whole like control answers (a followed
//! container writes for as long as it runs), only line by line.

use futures_util::StreamExt;
use http::Method;
use http_body_util::BodyExt;

use super::{RemoteNode, CALL_TIMEOUT};
use crate::client::encode;
use crate::node::agent::logs::LogFrame;
use crate::node::NodeError;
use crate::runtime::{LineStream, LogLine, LogOptions, MAX_LINE_BYTES};

/// Longest frame the gateway reads: a longest line with every byte escaped.
const MAX_FRAME: usize = 8 * MAX_LINE_BYTES;

/// The query of a log call.
fn query(options: &LogOptions) -> String {
    let mut q = format!(
        "follow={}&timestamps={}",
        options.follow, options.timestamps
    );
    if let Some(since) = options.since {
        q.push_str(&format!("&since={since}"));
    }
    if let Some(tail) = options.tail {
        q.push_str(&format!("&tail={tail}"));
    }
    q
}

impl RemoteNode {
    pub(super) async fn logs_over_tunnel(
        &self,
        container_id: &str,
        options: &LogOptions,
    ) -> Result<LineStream<NodeError>, NodeError> {
        let path = format!(
            "/node/v1/containers/{}/logs/stream?{}",
            encode(container_id),
            query(options)
        );
        let send = self.send(
            Method::GET,
            &path,
            "application/json",
            axum::body::Body::empty(),
        );
        let resp = tokio::time::timeout(CALL_TIMEOUT, send)
            .await
            .map_err(|_| self.remote(format!("no answer within {CALL_TIMEOUT:?}")))??;
        let node = self.name.clone();
        let frames = Frames {
            body: resp.into_body(),
            pending: Vec::new(),
            node,
            done: false,
        };
        Ok(futures_util::stream::unfold(frames, |mut f| async move {
            let item = f.next_line().await?;
            Some((item, f))
        })
        .boxed())
    }
}

/// The NDJSON frames of a log answer, read as they come.
struct Frames {
    body: hyper::body::Incoming,
    pending: Vec<u8>,
    node: String,
    done: bool,
}

impl Frames {
    fn failed(&mut self, message: String) -> Option<Result<LogLine, NodeError>> {
        self.done = true;
        Some(Err(NodeError::Remote {
            node: self.node.clone(),
            message,
        }))
    }

    /// The next line, an error (after which nothing comes), or the end.
    async fn next_line(&mut self) -> Option<Result<LogLine, NodeError>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let frame: Vec<u8> = self.pending.drain(..=end).collect();
                return match serde_json::from_slice::<LogFrame>(&frame) {
                    Ok(LogFrame::Line(line)) => Some(Ok(line)),
                    Ok(LogFrame::Failed(e)) => {
                        self.done = true;
                        Some(Err(e.into_node_error(&self.node)))
                    }
                    Err(e) => self.failed(format!("bad log frame: {e}")),
                };
            }
            if self.pending.len() > MAX_FRAME {
                return self.failed("a log frame is too long".into());
            }
            match self.body.frame().await {
                None => return None,
                Some(Err(e)) => return self.failed(format!("the log stream broke off: {e}")),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.pending.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_says_only_what_is_asked() {
        assert_eq!(
            query(&LogOptions::default()),
            "follow=false&timestamps=false"
        );
        let q = query(&LogOptions {
            follow: true,
            since: Some(5),
            tail: Some(100),
            timestamps: false,
        });
        assert_eq!(q, "follow=true&timestamps=false&since=5&tail=100");
    }
}
