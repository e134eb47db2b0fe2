//! `RemoteNode`: the `Node` trait driven over an agent's tunnel (`tunnel.rs`). The agent's
//! server (agent/) wraps the same `LocalNode` the embedded node uses.
//!
//! The wire format (wire.rs) is JSON of the node types; errors come back in Ember's one
//! error body and are mapped back to `NodeError`, so a missing image or a container that
//! exits at start reads the same on both paths. GPU facts and liveness come from the
//! gateway's regular inventory calls; without a tunnel the node is unreachable, and every
//! call fails at once instead of waiting.

mod images;
mod logs;

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use axum::body::Body;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::tunnel::{Tunnel, AUTHORITY};
use super::volumes::VolumeInfo;
use super::wire::{Heartbeat, NodeInfo, WireErrorBody};
use super::{
    ContainerState, InstanceSpec, ManagedContainer, Node, NodeError, Started, Upstream,
    CONNECT_TIMEOUT,
};
use crate::client::encode;
use crate::gpu::{GpuDriver, GpuInfo};

/// Time allowed for a container create + start on an agent.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Time allowed for other agent calls.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest answer the gateway reads of a control call (a node's list, logs, state).
pub const MAX_ANSWER: usize = 16 << 20;
/// Largest answer the gateway reads of an image build (its output lines).
pub const MAX_BUILD_ANSWER: usize = 64 << 20;
/// Largest refusal of a CONNECT the gateway reads.
const MAX_REFUSAL: usize = 64 << 10;

struct Facts {
    gpus: Vec<GpuInfo>,
    volumes: Vec<String>,
    driver: GpuDriver,
    source: String,
    last_seen: Option<tokio::time::Instant>,
    /// `last_seen` on the wall clock, for metrics (liveness uses the monotonic one).
    last_seen_at: Option<SystemTime>,
    /// The open tunnel and its number (each new tunnel of the node gets a higher one).
    tunnel: Option<(u64, Tunnel)>,
    tunnels: u64,
}

impl Facts {
    /// The node was heard from now.
    fn seen(&mut self) {
        self.last_seen = Some(tokio::time::Instant::now());
        self.last_seen_at = Some(SystemTime::now());
    }
}

/// A node reached through the tunnel its agent dials.
pub struct RemoteNode {
    name: String,
    facts: Mutex<Facts>,
}

impl RemoteNode {
    /// A node named `name`, not connected yet.
    pub fn new(name: &str) -> RemoteNode {
        RemoteNode {
            name: name.to_string(),
            facts: Mutex::new(Facts {
                gpus: Vec::new(),
                volumes: Vec::new(),
                driver: GpuDriver::Simulated,
                source: "unknown".into(),
                last_seen: None,
                last_seen_at: None,
                tunnel: None,
                tunnels: 0,
            }),
        }
    }

    fn facts(&self) -> std::sync::MutexGuard<'_, Facts> {
        self.facts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a new tunnel (replacing any older one); returns its number.
    pub fn attach(&self, tunnel: Tunnel) -> u64 {
        let mut f = self.facts();
        f.tunnels += 1;
        let id = f.tunnels;
        f.tunnel = Some((id, tunnel));
        f.seen();
        id
    }

    /// Lets go of tunnel `id` if it is still the node's; returns whether it was.
    pub fn detach(&self, id: u64) -> bool {
        let mut f = self.facts();
        if f.tunnel.as_ref().is_some_and(|(current, _)| *current == id) {
            f.tunnel = None;
            return true;
        }
        false
    }

    /// Takes what the agent says of itself.
    pub fn described(&self, info: &NodeInfo) {
        let mut f = self.facts();
        f.gpus = info.gpus.clone();
        f.volumes = info.volumes.clone();
        f.driver = info.gpu_driver;
        f.source = info.gpu_source.clone();
        f.seen();
    }

    /// When the node last answered.
    pub fn last_seen(&self) -> Option<tokio::time::Instant> {
        self.facts().last_seen
    }

    /// When the node last answered, on the wall clock.
    pub fn last_seen_at(&self) -> Option<SystemTime> {
        self.facts().last_seen_at
    }

    /// Takes an inventory report.
    pub fn heartbeat(&self, hb: &Heartbeat) {
        let mut f = self.facts();
        f.gpus = hb.gpus.clone();
        f.volumes = hb.volumes.clone();
        f.seen();
    }

    fn tunnel(&self) -> Result<Tunnel, NodeError> {
        self.facts()
            .tunnel
            .as_ref()
            .map(|(_, t)| t.clone())
            .ok_or_else(|| self.remote("not connected: its agent's tunnel is down".into()))
    }

    /// What the agent says of itself, asked over the tunnel.
    pub async fn info(&self) -> Result<NodeInfo, NodeError> {
        self.call(Method::GET, "/node/v1/info", Body::empty(), CALL_TIMEOUT)
            .await
    }

    /// The agent's GPUs now, asked over the tunnel.
    pub async fn inventory(&self, timeout: Duration) -> Result<Heartbeat, NodeError> {
        self.call(Method::GET, "/node/v1/gpus", Body::empty(), timeout)
            .await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Body,
        timeout: Duration,
    ) -> Result<T, NodeError> {
        self.call_limited(method, path, body, timeout, MAX_ANSWER)
            .await
    }

    /// One control call, its answer read up to `limit` bytes.
    async fn call_limited<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Body,
        timeout: Duration,
        limit: usize,
    ) -> Result<T, NodeError> {
        let tunnel = self.tunnel()?;
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{AUTHORITY}{path}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body)
            .map_err(|e| self.remote(e.to_string()))?;
        let answered = tokio::time::timeout(timeout, async {
            let resp = tunnel.send(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), limit)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, body))
        });
        let (status, body) = answered
            .await
            .map_err(|_| self.remote(format!("no answer within {timeout:?}")))?
            .map_err(|e| {
                self.remote(format!(
                    "the call failed (answers stop at {limit} bytes): {e}"
                ))
            })?;
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

    /// Asks the agent to `verb` (pause, resume, park) a container.
    async fn container_action(&self, container_id: &str, verb: &str) -> Result<(), NodeError> {
        let path = format!("/node/v1/containers/{}/{verb}", encode(container_id));
        let _: serde_json::Value = self
            .call(Method::POST, &path, Body::empty(), CALL_TIMEOUT)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Node for RemoteNode {
    fn name(&self) -> &str {
        &self.name
    }

    fn gpu_driver(&self) -> GpuDriver {
        self.facts().driver
    }

    fn reachable(&self) -> bool {
        self.facts()
            .tunnel
            .as_ref()
            .is_some_and(|(_, t)| !t.is_closed())
    }

    fn gpu_source(&self) -> String {
        self.facts().source.clone()
    }

    async fn gpus(&self) -> Vec<GpuInfo> {
        self.facts().gpus.clone()
    }

    /// A stream to `endpoint` over the tunnel. When the agent says no (the container
    /// refuses, or is no longer there) the error is the instance's (`ConnectionRefused`);
    /// when the tunnel itself fails, it is the path's (`NotConnected`), and the instance is
    /// not blamed for it.
    async fn connect(&self, endpoint: SocketAddr) -> Result<Upstream, NodeError> {
        let failed = |kind, why: String| NodeError::Connect {
            endpoint,
            source: std::io::Error::new(kind, why),
        };
        let path = |why: String| failed(std::io::ErrorKind::NotConnected, why);
        let tunnel = self.tunnel().map_err(|e| path(e.to_string()))?;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(endpoint.to_string())
            .body(Body::empty())
            .map_err(|e| path(e.to_string()))?;
        let resp = tokio::time::timeout(CONNECT_TIMEOUT * 2, tunnel.send(req))
            .await
            .map_err(|_| path("the node did not open the stream in time".into()))?
            .map_err(|e| path(format!("the tunnel failed: {e}")))?;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let text = http_body_util::Limited::new(resp.into_body(), MAX_REFUSAL)
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string());
            return Err(failed(
                std::io::ErrorKind::ConnectionRefused,
                format!("the node answered {status}: {}", text.unwrap_or_default()),
            ));
        }
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|e| path(format!("the stream did not open: {e}")))?;
        Ok(Box::new(TokioIo::new(upgraded)))
    }

    async fn start(&self, spec: &InstanceSpec) -> Result<Started, NodeError> {
        let body = serde_json::to_vec(spec).expect("specs serialize");
        self.call(
            Method::POST,
            "/node/v1/instances",
            Body::from(body),
            START_TIMEOUT,
        )
        .await
    }

    async fn state(&self, container_id: &str) -> Result<ContainerState, NodeError> {
        let path = format!("/node/v1/containers/{}", encode(container_id));
        self.call(Method::GET, &path, Body::empty(), CALL_TIMEOUT)
            .await
    }

    async fn logs(&self, container_id: &str, lines: usize) -> Result<String, NodeError> {
        let path = format!(
            "/node/v1/containers/{}/logs?lines={lines}",
            encode(container_id)
        );
        self.call(Method::GET, &path, Body::empty(), CALL_TIMEOUT)
            .await
    }

    async fn stream_logs(
        &self,
        container_id: &str,
        options: &crate::runtime::LogOptions,
    ) -> Result<crate::runtime::LineStream<NodeError>, NodeError> {
        self.logs_over_tunnel(container_id, options).await
    }

    async fn pause(&self, container_id: &str) -> Result<(), NodeError> {
        self.container_action(container_id, "pause").await
    }

    async fn resume(&self, container_id: &str) -> Result<(), NodeError> {
        self.container_action(container_id, "resume").await
    }

    async fn park(&self, container_id: &str) -> Result<(), NodeError> {
        self.container_action(container_id, "park").await
    }

    async fn unpark(&self, container_id: &str, port: u16) -> Result<Started, NodeError> {
        let path = format!(
            "/node/v1/containers/{}/unpark?port={port}",
            encode(container_id)
        );
        self.call(Method::POST, &path, Body::empty(), START_TIMEOUT)
            .await
    }

    async fn stop(&self, container_id: &str) -> Result<(), NodeError> {
        let path = format!("/node/v1/containers/{}", encode(container_id));
        let _: serde_json::Value = self
            .call(Method::DELETE, &path, Body::empty(), CALL_TIMEOUT)
            .await?;
        Ok(())
    }

    async fn list_managed(&self) -> Result<Vec<ManagedContainer>, NodeError> {
        self.call(
            Method::GET,
            "/node/v1/containers",
            Body::empty(),
            CALL_TIMEOUT,
        )
        .await
    }

    async fn volume_names(&self) -> Vec<String> {
        self.facts().volumes.clone()
    }

    async fn volumes(&self) -> Result<Vec<VolumeInfo>, NodeError> {
        // Sizes come from walking each volume's tree: big trees take a while.
        self.call(
            Method::GET,
            "/node/v1/volumes",
            Body::empty(),
            START_TIMEOUT,
        )
        .await
    }

    async fn put_file(&self, volume: &str, path: &str, body: Body) -> Result<u64, NodeError> {
        let tunnel = self.tunnel()?;
        let uri = format!(
            "http://{AUTHORITY}/node/v1/volumes/{}/files/{}",
            encode(volume),
            path.split('/').map(encode).collect::<Vec<_>>().join("/")
        );
        let req = Request::put(uri)
            .body(body)
            .map_err(|e| self.remote(e.to_string()))?;
        // No overall timeout: weights take as long as the link takes; a dead tunnel ends it.
        let resp = tunnel
            .send(req)
            .await
            .map_err(|e| self.remote(format!("the upload failed: {e}")))?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_REFUSAL)
            .collect()
            .await
            .map_err(|e| self.remote(format!("the upload's answer failed: {e}")))?
            .to_bytes();
        if !status.is_success() {
            return Err(match serde_json::from_slice::<WireErrorBody>(&body) {
                Ok(e) => e.into_node_error(&self.name),
                Err(_) => self.remote(format!("answered {status}")),
            });
        }
        let answer: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| self.remote(format!("bad answer: {e}")))?;
        Ok(answer["bytes"].as_u64().unwrap_or_default())
    }

    async fn image_exists(&self, image: &str) -> Result<bool, NodeError> {
        let path = format!("/node/v1/images?tag={}", encode(image));
        self.call(Method::GET, &path, Body::empty(), CALL_TIMEOUT)
            .await
    }

    async fn pull_image(
        &self,
        image: &str,
        auth: Option<crate::runtime::RegistryAuth>,
        progress: mpsc::Sender<crate::runtime::ImageProgress>,
    ) -> Result<(), NodeError> {
        self.pull_over_tunnel(image, auth, progress).await
    }

    async fn export_image(&self, image: &str) -> Result<(Option<u64>, Body), NodeError> {
        self.export_over_tunnel(image).await
    }

    async fn load_image(&self, tar: Body) -> Result<(), NodeError> {
        self.load_over_tunnel(tar).await
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
            .call_limited(
                Method::POST,
                &path,
                Body::from(context_tar),
                START_TIMEOUT * 5,
                MAX_BUILD_ANSWER,
            )
            .await?;
        for line in lines {
            let _ = progress.send(line).await;
        }
        Ok(())
    }
}
