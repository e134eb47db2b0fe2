//! The agent's side of membership: registering with the gateway and sending it heartbeats
//! with the node's GPU inventory until shutdown.
//!
//! A gateway that has forgotten the node (404 on a heartbeat) gets a fresh registration.
//! Failures are logged when they start and when they end, not on every beat. Nothing here
//! serves the node API; that is `server.rs`.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use http::Method;
use tokio_util::sync::CancellationToken;

use crate::client::{render_api_error, ApiClient, ClientError};
use crate::node::wire::{Heartbeat, Registered, Registration};
use crate::node::{LocalNode, Node};

/// Wait between registration attempts while the gateway refuses or cannot be reached.
const REGISTER_RETRY: Duration = Duration::from_secs(1);

/// Sends a heartbeat every `interval` until `shutdown`, registering `registration` again
/// (with the node's latest GPUs) whenever the gateway no longer knows the node.
pub async fn run(
    client: ApiClient,
    token: Arc<str>,
    node: Arc<LocalNode>,
    mut registration: Registration,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let path = format!("/api/v1/nodes/{}/heartbeat", registration.name);
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
        match send(&client, &token, Method::POST, &path, &hb).await {
            Ok(StatusCode::OK) => {
                if failing {
                    tracing::info!("gateway reachable again");
                }
                failing = false;
            }
            Ok(StatusCode::NOT_FOUND) => {
                tracing::info!("the gateway does not know this node; registering again");
                if let Err(e) = register(&client, &token, &registration, &shutdown).await {
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
}

fn headers(token: &str) -> [(String, String); 2] {
    [
        ("authorization".to_string(), format!("Bearer {token}")),
        ("content-type".to_string(), "application/json".to_string()),
    ]
}

async fn send<T: serde::Serialize>(
    client: &ApiClient,
    token: &str,
    method: Method,
    path: &str,
    body: &T,
) -> Result<StatusCode, ClientError> {
    let body = serde_json::to_vec(body).expect("serializes");
    let resp = client
        .send(method, path, &headers(token), body.into())
        .await?;
    Ok(resp.status())
}

/// Registers the node, retrying until the gateway accepts it, refuses it for good (a wrong
/// token or a bad registration), or `shutdown`.
pub(super) async fn register(
    client: &ApiClient,
    token: &str,
    registration: &Registration,
    shutdown: &CancellationToken,
) -> anyhow::Result<Registered> {
    let headers = headers(token);
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
            _ = tokio::time::sleep(REGISTER_RETRY) => {}
        }
    }
}
