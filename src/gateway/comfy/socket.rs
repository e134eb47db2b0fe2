//! `GET /ws?clientId=X`: the gateway holds the client's socket. It gets `status` (with
//! its `sid`) first, the last `executing` of its running prompts (so a client that
//! reconnects sees where they are), then its prompts' messages as their instances send
//! them, and the gateway's `status` on every queue change. Of what the client sends, only
//! `feature_flags` is answered, as ComfyUI does.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::query_map;
use crate::activator::Function;
use crate::comfy::Owner;
use crate::gateway::error::ApiError;
use crate::gateway::AppState;

/// How often an idle socket is pinged, so that it never goes silent behind a proxy.
const PING_EVERY: Duration = Duration::from_secs(30);
/// Largest message a client may send (ComfyUI clients send small JSON only).
const MAX_CLIENT_MESSAGE: usize = 1 << 20;

/// Answers the upgrade and serves the socket in the background.
pub fn upgrade(
    state: &AppState,
    f: &Arc<Function>,
    owner: Owner,
    mut req: Request<Body>,
) -> Result<Response, ApiError> {
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let on_upgrade = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
    let (Some(key), true, Some(on_upgrade)) = (key, wants, on_upgrade) else {
        let message = "/ws is a WebSocket: connect with `Upgrade: websocket` over HTTP/1.1";
        return Ok((StatusCode::BAD_REQUEST, message).into_response());
    };
    let client_id = query_map(req.uri())
        .get("clientId")
        .filter(|c| !c.is_empty() && c.len() <= 256)
        .cloned()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let (state2, function) = (state.clone(), f.name().to_string());
    state.tracker.spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let config = WebSocketConfig::default().max_message_size(Some(MAX_CLIENT_MESSAGE));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        serve(state2, function, owner, client_id, ws).await;
    });
    let accept = derive_accept_key(key.as_bytes());
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_str(&accept).expect("base64 is a header value"),
        )
        .body(Body::empty())
        .expect("a static response is valid"))
}

async fn serve(
    state: AppState,
    function: String,
    owner: Owner,
    client_id: String,
    ws: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
) {
    let door = state.comfy.clone();
    let (subscription, first, mut rx) = door.connect(&function, &owner, &client_id);
    let (mut sink, mut stream) = ws.split();
    for message in first {
        if sink.send(message).await.is_err() {
            return;
        }
    }
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(message) => {
                    if sink.send(message).await.is_err() {
                        break;
                    }
                }
                // Replaced by a reconnect with the same id, or fell too far behind.
                None => {
                    let _ = sink.send(close(CloseCode::Policy, "replaced by a newer socket with this clientId")).await;
                    break;
                }
            },
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    if let Some(answer) = feature_flags(&state, &function, text.as_str()) {
                        if sink.send(answer).await.is_err() {
                            break;
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            _ = ping.tick() => {
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    break;
                }
            }
            _ = state.shutdown.cancelled() => {
                let _ = sink.send(close(CloseCode::Away, "the gateway is shutting down")).await;
                break;
            }
        }
    }
    drop(subscription);
}

fn close(code: CloseCode, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// The answer to a client's `feature_flags`: the gateway's flags.
fn feature_flags(state: &AppState, function: &str, text: &str) -> Option<Message> {
    let value: Value = serde_json::from_str(text).ok()?;
    if value["type"] != "feature_flags" {
        return None;
    }
    let max = state
        .activator()
        .function(function)
        .map_or(0, |f| f.revision().manifest.request.max_body.as_u64());
    let data = json!({"supports_preview_metadata": false, "max_upload_size": max});
    Some(Message::text(
        json!({"type": "feature_flags", "data": data}).to_string(),
    ))
}
