//! The node seam: a machine that runs instances for the gateway.
//!
//! `Node` is what the activator and scheduler drive: start an instance, look at it, read
//! its logs, stop it, list what it runs, and make sure an image is there. It is also the
//! only way to reach an instance: `connect` hands out the byte stream that the proxy and
//! the readiness prober speak HTTP over, so nothing outside this module dials a container
//! or an agent. `LocalNode` (local.rs) implements the trait in process on a
//! `ContainerRuntime`; `RemoteNode` (remote.rs) as a client of an agent (agent/), whose
//! server wraps the same `LocalNode`, so both paths share the activator.

pub mod agent;
#[cfg(test)]
pub mod fake;
pub mod local;
pub mod remote;
mod spec;
mod transport;
pub mod tunnel;
pub mod volumes;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::gpu::{GpuDriver, GpuInfo};
use crate::manifest::Manifest;
use crate::model::{GpuAssignment, SecretEnv};
use crate::runtime::{ImageProgress, LineStream, LogOptions, RegistryAuth, RuntimeError};
use axum::body::Body;
use volumes::VolumeInfo;

pub use local::LocalNode;
pub use remote::RemoteNode;
pub use transport::{connect_tcp, NodeConnector, NodeStream, Upstream, CONNECT_TIMEOUT};

/// What a node needs to start one instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// Function name.
    pub function: String,
    /// Revision id.
    pub revision: String,
    /// Instance id, unique across the gateway's life.
    pub instance: String,
    /// The revision's manifest.
    pub manifest: Arc<Manifest>,
    /// GPUs (or MIG instances) placed for it.
    pub gpus: Vec<GpuAssignment>,
    /// The values of the manifest's secret variables, filled in by the gateway for this
    /// call only.
    #[serde(default, skip_serializing_if = "SecretEnv::is_empty")]
    pub secrets: SecretEnv,
}

/// A started instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Started {
    /// Container id on the node.
    pub container_id: String,
    /// Address the gateway sends requests to.
    pub endpoint: SocketAddr,
}

/// A container's state as the node sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum ContainerState {
    /// Running.
    Running,
    /// Exited (or dead), with its exit code and the engine's word for why.
    Exited {
        /// Exit code, when known.
        code: Option<i64>,
        /// The engine's status ("exited", "OOMKilled", ...).
        status: String,
    },
    /// No such container.
    Gone,
}

/// A container of this gateway found on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManagedContainer {
    /// Container id.
    pub container_id: String,
    /// `ember.function` label.
    pub function: String,
    /// `ember.revision` label.
    pub revision: String,
    /// `ember.instance` label.
    pub instance: String,
    /// Whether it runs (paused counts as running).
    pub running: bool,
    /// Whether it is paused.
    #[serde(default)]
    pub paused: bool,
    /// Where it answers, if its port is published.
    pub endpoint: Option<SocketAddr>,
    /// The devices it was given (`ember.gpus` label).
    pub gpus: Vec<GpuAssignment>,
}

/// Node failures.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The container engine failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The node could not be reached or answered with an error.
    #[error("node `{node}`: {message}")]
    Remote {
        /// The node.
        node: String,
        /// What went wrong, in the node's words when it answered.
        message: String,
    },
    /// An instance's endpoint could not be reached.
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        /// The endpoint (internal: for logs, never for clients).
        endpoint: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A volume could not be mounted or written.
    #[error(transparent)]
    Volume(#[from] volumes::VolumeError),
    /// The container stopped before it could be reached (it is left for its logs).
    #[error("container exited as it started")]
    ExitedAtStart {
        /// The container, still there for its logs.
        container_id: String,
        /// Exit code, when known.
        code: Option<i64>,
        /// The engine's status word.
        status: String,
    },
}

impl NodeError {
    /// What a client may read: the node's internals (addresses, the engine's words) are
    /// for the gateway's log.
    pub fn public_message(&self) -> String {
        match self {
            NodeError::Runtime(e) => e.public_message(),
            NodeError::Remote { node, .. } => {
                format!("node `{node}` failed; the gateway's log has the details")
            }
            NodeError::Connect { .. } => "the instance could not be reached".into(),
            NodeError::ExitedAtStart { .. } => self.to_string(),
            NodeError::Volume(volumes::VolumeError::Io { volume, .. }) => {
                format!("node volume `{volume}` failed; the node's log has the details")
            }
            NodeError::Volume(e) => e.to_string(),
        }
    }

    /// Whether a connect failed on the way to the node (its tunnel), not at the instance:
    /// the instance is not to blame.
    pub fn is_path_failure(&self) -> bool {
        matches!(self, NodeError::Connect { source, .. } if source.kind() == std::io::ErrorKind::NotConnected)
    }

    /// Whether the failure is a missing image (a deploy problem, not a node problem).
    pub fn is_image_missing(&self) -> bool {
        matches!(self, NodeError::Runtime(RuntimeError::ImageNotFound(_)))
    }
}

/// A machine that runs instances.
#[async_trait]
pub trait Node: Send + Sync + 'static {
    /// The node's name (`ember.node` label).
    fn name(&self) -> &str;
    /// How containers are given GPUs on this node.
    fn gpu_driver(&self) -> GpuDriver;
    /// Where the node's GPU facts come from.
    fn gpu_source(&self) -> String;
    /// The node's GPUs now (empty when it has none or cannot tell).
    async fn gpus(&self) -> Vec<GpuInfo>;
    /// Whether the gateway can reach the node now (an agent whose tunnel is down cannot).
    fn reachable(&self) -> bool {
        true
    }
    /// Opens a byte stream to `endpoint`, the address this node gave for one of its
    /// instances (`Started::endpoint`). The only way the gateway reaches an instance.
    async fn connect(&self, endpoint: SocketAddr) -> Result<Upstream, NodeError>;
    /// Creates and starts the instance's container; readiness is the caller's to check.
    async fn start(&self, spec: &InstanceSpec) -> Result<Started, NodeError>;
    /// The state of a container this node started.
    async fn state(&self, container_id: &str) -> Result<ContainerState, NodeError>;
    /// The last lines of a container's output.
    async fn logs(&self, container_id: &str, lines: usize) -> Result<String, NodeError>;
    /// A container's output as `options` asks, line by line, stdout and stderr apart;
    /// with `follow`, streamed until the container stops or the stream is dropped. A
    /// container that is not there has no output.
    async fn stream_logs(
        &self,
        container_id: &str,
        options: &LogOptions,
    ) -> Result<LineStream<NodeError>, NodeError>;
    /// Freezes a container (Docker pause): no CPU, its memory and GPU memory kept.
    async fn pause(&self, container_id: &str) -> Result<(), NodeError>;
    /// Thaws a paused container.
    async fn resume(&self, container_id: &str) -> Result<(), NodeError>;
    /// Stops a container and keeps it, to be started again by `unpark`.
    async fn park(&self, container_id: &str) -> Result<(), NodeError>;
    /// Starts a parked container again (no create); it listens on `port` inside, and may
    /// have a new endpoint.
    async fn unpark(&self, container_id: &str, port: u16) -> Result<Started, NodeError>;
    /// Stops and removes a container; a missing one is not an error.
    async fn stop(&self, container_id: &str) -> Result<(), NodeError>;
    /// Every container of this gateway on this node.
    async fn list_managed(&self) -> Result<Vec<ManagedContainer>, NodeError>;
    /// Whether an image is present on the node.
    async fn image_exists(&self, image: &str) -> Result<bool, NodeError>;
    /// The names of the node volumes it has (`volumes.rs`).
    async fn volume_names(&self) -> Vec<String> {
        Vec::new()
    }
    /// Its node volumes with their size on disk.
    async fn volumes(&self) -> Result<Vec<VolumeInfo>, NodeError> {
        Ok(Vec::new())
    }
    /// Writes `body` to `path` inside node volume `volume` (made when missing); returns the
    /// bytes written.
    async fn put_file(&self, volume: &str, path: &str, body: Body) -> Result<u64, NodeError> {
        let _ = (path, body);
        Err(volumes::VolumeError::Missing(volume.to_string()).into())
    }
    /// Pulls `image` from its registry (with `auth` when given); progress goes to
    /// `progress`.
    async fn pull_image(
        &self,
        image: &str,
        auth: Option<RegistryAuth>,
        progress: mpsc::Sender<ImageProgress>,
    ) -> Result<(), NodeError>;
    /// `image` as a `docker save` tar, streamed, with its size when known.
    async fn export_image(&self, image: &str) -> Result<(Option<u64>, Body), NodeError>;
    /// Loads a `docker save` tar.
    async fn load_image(&self, tar: Body) -> Result<(), NodeError>;
    /// Builds an image on the node from a tar of its build context.
    async fn build_image(
        &self,
        tag: &str,
        dockerfile: &str,
        context_tar: Bytes,
        progress: mpsc::Sender<String>,
    ) -> Result<(), NodeError>;
}
