//! The container runtime seam: what a node needs from a container engine.
//!
//! `ContainerRuntime` is the small trait a node drives; `docker.rs` implements it with
//! bollard (the only place bollard is used). The trait speaks in Ember's terms
//! (a `ContainerSpec` in, a `ContainerInfo` out) so nothing above it sees Docker types.

pub mod docker;
#[cfg(test)]
pub mod fake;
mod images;
mod logs;

use std::collections::HashMap;
use std::net::IpAddr;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use tokio::sync::mpsc;

pub use docker::DockerRuntime;
pub use images::{names_registry, registry_host, ImageProgress, RegistryAuth, DOCKER_HUB};
pub use logs::{
    into_lines, keep_last, LineStream, LogChunk, LogLine, LogOptions, LogStream, OutputStream,
    MAX_LINE_BYTES,
};

/// An image as a `docker save` tar, streamed.
pub type ImageTar = BoxStream<'static, Result<Bytes, RuntimeError>>;

/// Label every Ember container carries.
pub const LABEL_MANAGED: &str = "ember.managed";
/// Label naming the gateway that owns the container.
pub const LABEL_GATEWAY: &str = "ember.gateway";
/// Label naming the node that started the container.
pub const LABEL_NODE: &str = "ember.node";
/// Label naming the function.
pub const LABEL_FUNCTION: &str = "ember.function";
/// Label naming the revision.
pub const LABEL_REVISION: &str = "ember.revision";
/// Label naming the instance.
pub const LABEL_INSTANCE: &str = "ember.instance";
/// Label holding the port the server listens on inside the container.
pub const LABEL_PORT: &str = "ember.port";
/// Label holding the instance's GPU assignments (JSON), so a restart can re-reserve them.
pub const LABEL_GPUS: &str = "ember.gpus";

/// Everything needed to create and start one container. `Debug` shows the environment's
/// names only: values may be secrets.
#[derive(Clone, PartialEq)]
pub struct ContainerSpec {
    /// Container name.
    pub name: String,
    /// Image reference.
    pub image: String,
    /// Command override; `None` keeps the image's.
    pub command: Option<Vec<String>>,
    /// Environment, `KEY=VALUE` pairs.
    pub env: Vec<(String, String)>,
    /// Labels.
    pub labels: HashMap<String, String>,
    /// Port inside the container, published on an ephemeral host port.
    pub port: u16,
    /// Host address the port is published on.
    pub host_ip: IpAddr,
    /// CPU cores.
    pub cpus: f64,
    /// Memory limit in bytes.
    pub memory_bytes: u64,
    /// Process limit.
    pub pids_limit: i64,
    /// Size of `/dev/shm` in bytes.
    pub shm_bytes: u64,
    /// Ulimits: name, soft, hard (-1: unlimited).
    pub ulimits: Vec<(String, i64, i64)>,
    /// What is mounted.
    pub mounts: Vec<Mount>,
    /// GPUs to hand to the container through the engine, if any.
    pub gpus: Option<GpuRequest>,
}

impl std::fmt::Debug for ContainerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let env: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("ContainerSpec")
            .field("name", &self.name)
            .field("image", &self.image)
            .field("command", &self.command)
            .field("env (names)", &env)
            .field("labels", &self.labels)
            .field("port", &self.port)
            .field("host_ip", &self.host_ip)
            .field("cpus", &self.cpus)
            .field("memory_bytes", &self.memory_bytes)
            .field("pids_limit", &self.pids_limit)
            .field("shm_bytes", &self.shm_bytes)
            .field("ulimits", &self.ulimits)
            .field("mounts", &self.mounts)
            .field("gpus", &self.gpus)
            .finish()
    }
}

/// One mount of a container.
#[derive(Debug, Clone, PartialEq)]
pub struct Mount {
    /// What is mounted.
    pub source: MountSource,
    /// Where, inside the container.
    pub target: String,
    /// Whether the container may only read it.
    pub read_only: bool,
}

/// What a mount brings in.
#[derive(Debug, Clone, PartialEq)]
pub enum MountSource {
    /// A directory of the host (a node volume), which exists.
    Directory(std::path::PathBuf),
    /// A Docker named volume (made by Docker when missing).
    Volume(String),
}

/// The engine driver a device request names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceDriver {
    /// The NVIDIA container runtime: device ids are `GPU-…`/`MIG-…` UUIDs.
    Nvidia,
    /// The Container Device Interface: device ids are CDI names.
    Cdi,
}

impl DeviceDriver {
    /// The driver's name in the Docker API.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceDriver::Nvidia => "nvidia",
            DeviceDriver::Cdi => "cdi",
        }
    }
}

/// GPUs given to a container through a Docker device request.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuRequest {
    /// Which driver hands them over.
    pub driver: DeviceDriver,
    /// The devices.
    pub device_ids: Vec<String>,
}

/// What the runtime knows of one container.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerInfo {
    /// Container id.
    pub id: String,
    /// Labels.
    pub labels: HashMap<String, String>,
    /// Whether it is running now (a paused container runs: it is alive, frozen).
    pub running: bool,
    /// Whether it is paused.
    pub paused: bool,
    /// Exit code, once it has exited.
    pub exit_code: Option<i64>,
    /// The engine's own words for its state ("running", "exited", "OOMKilled", ...).
    pub status: String,
    /// Host port the container port is published on.
    pub host_port: Option<u16>,
    /// The container's own address on its network, when it has one.
    pub ip: Option<IpAddr>,
}

/// An engine's own error, kept as the cause without its type leaking past this module
/// (bollard stays inside docker.rs).
pub type EngineError = Box<dyn std::error::Error + Send + Sync>;

/// Runtime failures.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The image is not on this engine and cannot be pulled.
    #[error("image `{0}` is not on this node; build it (`ember deploy` with a `build` context) or load it with `docker load`")]
    ImageNotFound(String),
    /// The engine cannot be reached.
    #[error("cannot reach the Docker engine: {0}; is Docker running and is DOCKER_HOST right?")]
    Unreachable(#[source] EngineError),
    /// An engine call failed.
    #[error("docker {op} failed: {source}")]
    Docker {
        /// The call that failed.
        op: &'static str,
        /// The engine's error.
        #[source]
        source: EngineError,
    },
    /// An image build failed.
    #[error("image build failed: {0}")]
    Build(String),
    /// A pull failed; `reason` is the registry's (or the engine's) own words.
    #[error("pulling `{image}` failed: {reason}")]
    Pull {
        /// The image.
        image: String,
        /// Why, as the registry said it.
        reason: String,
    },
    /// Saving or loading an image failed.
    #[error("{0}")]
    Transfer(String),
    /// The container started but its port was not published.
    #[error("container {0} has no published port")]
    NoPort(String),
}

impl RuntimeError {
    /// What a client may read: the engine's own words are for the log.
    pub fn public_message(&self) -> String {
        match self {
            RuntimeError::ImageNotFound(_)
            | RuntimeError::Build(_)
            | RuntimeError::Pull { .. }
            | RuntimeError::Transfer(_) => self.to_string(),
            RuntimeError::Unreachable(_) => "the node's Docker engine is unreachable".into(),
            RuntimeError::Docker { op, .. } => format!("docker {op} failed on the node"),
            RuntimeError::NoPort(_) => "the container's port was not published".into(),
        }
    }
}

/// A container engine, as a node uses it.
#[async_trait]
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Checks that the engine answers.
    async fn ping(&self) -> Result<(), RuntimeError>;
    /// Whether the image exists locally.
    async fn image_exists(&self, image: &str) -> Result<bool, RuntimeError>;
    /// Builds `tag` from a tar of the build context; progress lines go to `progress`.
    async fn build_image(
        &self,
        tag: &str,
        dockerfile: &str,
        context_tar: Bytes,
        progress: mpsc::Sender<String>,
    ) -> Result<(), RuntimeError>;
    /// Pulls `image` from its registry, with `auth` when the registry wants a login;
    /// byte counts of the download go to `progress`.
    async fn pull_image(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
        progress: mpsc::Sender<ImageProgress>,
    ) -> Result<(), RuntimeError>;
    /// `image` as a `docker save` tar, and its size when known (the tar is about as big).
    async fn export_image(&self, image: &str) -> Result<(Option<u64>, ImageTar), RuntimeError>;
    /// Loads a `docker save` tar (`docker load`).
    async fn load_image(&self, tar: ImageTar) -> Result<(), RuntimeError>;
    /// Creates and starts a container; returns it with its published host port.
    async fn run(&self, spec: &ContainerSpec) -> Result<ContainerInfo, RuntimeError>;
    /// The container's state, or `None` when it does not exist.
    async fn inspect(&self, id: &str) -> Result<Option<ContainerInfo>, RuntimeError>;
    /// The last `lines` lines of the container's output.
    async fn logs_tail(&self, id: &str, lines: usize) -> Result<String, RuntimeError>;
    /// The container's output as `options` asks, stdout and stderr apart, streamed: with
    /// `follow`, until the container stops or the stream is dropped. A container that is
    /// not there has no output (the stream ends).
    async fn logs(&self, id: &str, options: &LogOptions) -> Result<LogStream, RuntimeError>;
    /// Freezes the container (cgroup freezer): no CPU, memory and GPU memory kept.
    async fn pause(&self, id: &str) -> Result<(), RuntimeError>;
    /// Thaws a paused container.
    async fn unpause(&self, id: &str) -> Result<(), RuntimeError>;
    /// Stops the container and keeps it: SIGTERM, SIGKILL after `grace`.
    async fn stop(&self, id: &str, grace: std::time::Duration) -> Result<(), RuntimeError>;
    /// Starts a stopped container again (no create) and inspects it.
    async fn start(&self, id: &str) -> Result<ContainerInfo, RuntimeError>;
    /// Removes the container, killing it if it runs. A missing container is not an error.
    async fn remove(&self, id: &str) -> Result<(), RuntimeError>;
    /// Every container (running or not) carrying all of `labels`.
    async fn list(&self, labels: &[(&str, &str)]) -> Result<Vec<ContainerInfo>, RuntimeError>;
}
