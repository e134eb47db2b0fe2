//! `RemoteNode`: the `Node` trait as an HTTP client of an agent (`ember agent`), whose
//! server (agent.rs) wraps the same `LocalNode` the embedded node uses.
//!
//! The wire format (wire.rs) is JSON of the node types; errors come back in Ember's one
//! error body and are mapped back to `NodeError`, so a missing image or a container that
//! exits at start reads the same on both paths. GPU facts and liveness come from the
//! agent's heartbeats, not from calls.

use std::net::SocketAddr;
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::wire::{Heartbeat, Registration, WireErrorBody};
use super::{
    connect_tcp, ContainerState, InstanceSpec, ManagedContainer, Node, NodeError, Started, Upstream,
};
use crate::client::encode;
use crate::gpu::{GpuDriver, GpuInfo};

/// Time allowed for a container create + start on an agent.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Time allowed for other agent calls.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

struct Facts {
    gpus: Vec<GpuInfo>,
    driver: GpuDriver,
    source: String,
    last_seen: Option<tokio::time::Instant>,
}

/// A node reached over HTTP.
pub struct RemoteNode {
    name: String,
    url: RwLock<String>,
    token: String,
    client: Client<HttpConnector, Full<Bytes>>,
    facts: Mutex<Facts>,
}

impl RemoteNode {
    /// A node named `name` whose agent answers at `url`, called with `token`.
    pub fn new(name: &str, url: &str, token: &str) -> RemoteNode {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(3)));
        connector.set_nodelay(true);
        RemoteNode {
            name: name.to_string(),
            url: RwLock::new(url.trim_end_matches('/').to_string()),
            token: token.to_string(),
            client: Client::builder(TokioExecutor::new()).build(connector),
            facts: Mutex::new(Facts {
                gpus: Vec::new(),
                driver: GpuDriver::Simulated,
                source: "unknown".into(),
                last_seen: None,
            }),
        }
    }

    /// The agent's URL.
    pub fn url(&self) -> String {
        self.url.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Takes a (re-)registration: new URL and facts.
    pub fn registered(&self, r: &Registration) {
        *self.url.write().unwrap_or_else(|e| e.into_inner()) =
            r.url.trim_end_matches('/').to_string();
        let mut f = self.facts.lock().unwrap_or_else(|e| e.into_inner());
        f.gpus = r.gpus.clone();
        f.driver = r.gpu_driver;
        f.source = r.gpu_source.clone();
        f.last_seen = Some(tokio::time::Instant::now());
    }

    /// When the node was last heard from.
    pub fn last_seen(&self) -> Option<tokio::time::Instant> {
        self.facts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_seen
    }

    /// Takes a heartbeat.
    pub fn heartbeat(&self, hb: &Heartbeat) {
        let mut f = self.facts.lock().unwrap_or_else(|e| e.into_inner());
        f.gpus = hb.gpus.clone();
        f.last_seen = Some(tokio::time::Instant::now());
    }

    async fn call_raw(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), NodeError> {
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url()))
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| self.remote(e.to_string()))?;
        let resp = tokio::time::timeout(timeout, self.client.request(req))
            .await
            .map_err(|_| self.remote(format!("no answer within {timeout:?}")))?
            .map_err(|e| self.remote(format!("unreachable: {e}")))?;
        let status = resp.status();
        let body = tokio::time::timeout(timeout, resp.into_body().collect())
            .await
            .map_err(|_| self.remote("answer cut off".into()))?
            .map_err(|e| self.remote(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<T, NodeError> {
        let (status, body) = self.call_raw(method, path, body, timeout).await?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<WireErrorBody>(&body) {
                Ok(e) => e.into_node_error(&self.name),
                Err(_) => self.remote(format!(
                    "answered {status}: {}",
                    String::from_utf8_lossy(&body).trim()
                )),
            });
        }
        serde_json::from_slice(&body).map_err(|e| self.remote(format!("bad answer: {e}")))
    }

    fn remote(&self, message: String) -> NodeError {
        NodeError::Remote {
            node: self.name.clone(),
            message,
        }
    }
}

#[async_trait]
impl Node for RemoteNode {
    fn name(&self) -> &str {
        &self.name
    }

    fn gpu_driver(&self) -> GpuDriver {
        self.facts.lock().unwrap_or_else(|e| e.into_inner()).driver
    }

    fn gpu_source(&self) -> String {
        self.facts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .source
            .clone()
    }

    async fn gpus(&self) -> Vec<GpuInfo> {
        self.facts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .gpus
            .clone()
    }

    async fn connect(&self, endpoint: SocketAddr) -> Result<Upstream, NodeError> {
        // The agent publishes its containers on the address it advertised.
        connect_tcp(endpoint).await
    }

    async fn start(&self, spec: &InstanceSpec) -> Result<Started, NodeError> {
        let body = serde_json::to_vec(spec).expect("specs serialize");
        self.call(
            Method::POST,
            "/node/v1/instances",
            body.into(),
            START_TIMEOUT,
        )
        .await
    }

    async fn state(&self, container_id: &str) -> Result<ContainerState, NodeError> {
        let path = format!("/node/v1/containers/{}", encode(container_id));
        self.call(Method::GET, &path, Bytes::new(), CALL_TIMEOUT)
            .await
    }

    async fn logs(&self, container_id: &str, lines: usize) -> Result<String, NodeError> {
        let path = format!(
            "/node/v1/containers/{}/logs?lines={lines}",
            encode(container_id)
        );
        self.call(Method::GET, &path, Bytes::new(), CALL_TIMEOUT)
            .await
    }

    async fn pause(&self, container_id: &str) -> Result<(), NodeError> {
        let path = format!("/node/v1/containers/{}/pause", encode(container_id));
        let _: serde_json::Value = self
            .call(Method::POST, &path, Bytes::new(), CALL_TIMEOUT)
            .await?;
        Ok(())
    }

    async fn resume(&self, container_id: &str) -> Result<(), NodeError> {
        let path = format!("/node/v1/containers/{}/resume", encode(container_id));
        let _: serde_json::Value = self
            .call(Method::POST, &path, Bytes::new(), CALL_TIMEOUT)
            .await?;
        Ok(())
    }

    async fn stop(&self, container_id: &str) -> Result<(), NodeError> {
        let path = format!("/node/v1/containers/{}", encode(container_id));
        let _: serde_json::Value = self
            .call(Method::DELETE, &path, Bytes::new(), CALL_TIMEOUT)
            .await?;
        Ok(())
    }

    async fn list_managed(&self) -> Result<Vec<ManagedContainer>, NodeError> {
        self.call(
            Method::GET,
            "/node/v1/containers",
            Bytes::new(),
            CALL_TIMEOUT,
        )
        .await
    }

    async fn image_exists(&self, image: &str) -> Result<bool, NodeError> {
        let path = format!("/node/v1/images?tag={}", encode(image));
        self.call(Method::GET, &path, Bytes::new(), CALL_TIMEOUT)
            .await
    }

    async fn build_image(
        &self,
        tag: &str,
        dockerfile: &str,
        context_tar: Bytes,
        progress: mpsc::Sender<String>,
    ) -> Result<(), NodeError> {
        let path = format!(
            "/node/v1/images?tag={}&dockerfile={}",
            encode(tag),
            encode(dockerfile)
        );
        // The agent answers with the build's output lines once it is done.
        let lines: Vec<String> = self
            .call(Method::POST, &path, context_tar, START_TIMEOUT * 5)
            .await?;
        for line in lines {
            let _ = progress.send(line).await;
        }
        Ok(())
    }
}
