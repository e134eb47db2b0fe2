//! Holding a streaming request through a cold start. A `"stream": true` request whose
//! answer has not begun after [`GRACE`] is answered 200 `text/event-stream` at once, and
//! an SSE comment (`: ...`, which OpenAI clients skip) goes out every [`KEEPALIVE`] while
//! the model starts, so neither the client nor a proxy between gives up on a silent
//! connection. Once the instance answers, its stream follows on the same response.
//!
//! What is lost by answering early is the status: an error after that point (a start
//! that fails, a queue timeout, the instance's own error status) comes as one
//! `data: {"error":{...}}` event, which the official client raises as `APIError`, and is
//! not retried. Errors that come at once (a full queue: 429, an unknown model) come
//! before the grace ends, with their status, so clients still retry those.

use std::future::Future;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use super::error::FrontError;

/// How long a streaming request waits for its answer before the hold begins.
pub const GRACE: Duration = Duration::from_secs(2);
/// How often a held stream gets a comment.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// Most bytes of an instance's error body put into the error event.
const MAX_ERROR_BODY: usize = 16 << 10;

type Chunk = Result<Bytes, std::io::Error>;

/// Runs `call`; when it takes longer than [`GRACE`], answers 200 `text/event-stream`
/// and keeps the stream alive until it ends.
pub async fn hold<F>(call: F, model: String, tracker: &TaskTracker) -> Response
where
    F: Future<Output = Result<Response, FrontError>> + Send + 'static,
{
    let mut call = Box::pin(call);
    tokio::select! {
        done = &mut call => return done.unwrap_or_else(IntoResponse::into_response),
        () = tokio::time::sleep(GRACE) => {}
    }
    let (tx, mut rx) = mpsc::channel::<Chunk>(16);
    tracker.spawn(async move {
        let waiting = Bytes::from(format!(": ember: model {model} is starting\n\n"));
        let mut tick = tokio::time::interval(KEEPALIVE);
        loop {
            tokio::select! {
                done = &mut call => {
                    relay(done, &tx).await;
                    return;
                }
                _ = tick.tick() => {
                    if tx.send(Ok(waiting.clone())).await.is_err() {
                        return;
                    }
                }
                () = tx.closed() => return,
            }
        }
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    super::super::event_stream(Body::from_stream(stream))
}

/// Sends the answer's stream on, or its error as one event.
async fn relay(done: Result<Response, FrontError>, tx: &mpsc::Sender<Chunk>) {
    let response = done.unwrap_or_else(IntoResponse::into_response);
    let status = response.status();
    let mut body = response.into_body().into_data_stream();
    if status.is_success() {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(std::io::Error::other);
            let failed = chunk.is_err();
            if tx.send(chunk).await.is_err() || failed {
                return;
            }
        }
        return;
    }
    let mut bytes = Vec::new();
    while let Some(Ok(chunk)) = body.next().await {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > MAX_ERROR_BODY {
            bytes.truncate(MAX_ERROR_BODY);
            break;
        }
    }
    let _ = tx.send(Ok(error_event(status, &bytes))).await;
}

/// `data: {"error":...}`: the body itself when it is an OpenAI error already (the
/// front door's, or an OpenAI-compatible server's), else one made of its text.
fn error_event(status: StatusCode, body: &[u8]) -> Bytes {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let error = match parsed {
        Some(v) if v.get("error").is_some_and(|e| e.is_object()) => v,
        _ => serde_json::json!({"error": {
            "message": format!(
                "the model's server answered {status}: {}",
                String::from_utf8_lossy(body).trim()
            ),
            "type": "server_error",
            "param": null,
            "code": "upstream_error",
        }}),
    };
    Bytes::from(format!("data: {error}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn text(r: Response) -> String {
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    fn ok(body: &'static str) -> Result<Response, FrontError> {
        Ok(Response::new(Body::from(body)))
    }

    #[tokio::test(start_paused = true)]
    async fn a_quick_answer_passes_as_it_is_and_a_slow_one_is_held_with_comments() {
        let tracker = TaskTracker::new();
        let quick = hold(async { ok("data: 1\n\n") }, "m".into(), &tracker).await;
        assert!(quick.headers().get(http::header::CONTENT_TYPE).is_none());
        assert_eq!(text(quick).await, "data: 1\n\n");

        let slow = async {
            tokio::time::sleep(Duration::from_secs(11)).await;
            ok("data: 2\n\ndata: [DONE]\n\n")
        };
        let held = hold(slow, "m".into(), &tracker).await;
        assert_eq!(held.status(), StatusCode::OK);
        assert_eq!(
            held.headers()[http::header::CONTENT_TYPE],
            "text/event-stream"
        );
        let body = text(held).await;
        assert_eq!(
            body,
            ": ember: model m is starting\n\n".repeat(2) + "data: 2\n\ndata: [DONE]\n\n"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_after_the_hold_began_comes_as_an_error_event() {
        let tracker = TaskTracker::new();
        let failing = async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let mut r = Response::new(Body::from("model weights missing"));
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            Ok(r)
        };
        let body = text(hold(failing, "m".into(), &tracker).await).await;
        let event = body.lines().find(|l| l.starts_with("data: ")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&event["data: ".len()..]).unwrap();
        assert_eq!(v["error"]["code"], "upstream_error");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains("500") && message.contains("model weights missing"));
    }
}
