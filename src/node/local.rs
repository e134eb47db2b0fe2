//! The embedded node: runs instances on a container runtime in the gateway's process.
//!
//! It turns an `InstanceSpec` into a hardened `ContainerSpec` (spec.rs: labels, limits,
//! `PORT`, secrets, mounts, the port published on the node's address, GPU devices) and
//! maps runtime answers to node terms.
//!
//! Departure from DESIGN.md: the port is still published, but the embedded node of a
//! Linux gateway reaches its containers at their bridge address (`Endpoints::Direct`):
//! the published port goes through Docker's userland proxy, which halved the warm path's
//! throughput in the benchmark. Agents, reached from another machine, use the published
//! port on their advertised address.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use tokio::sync::mpsc;

use super::volumes::{NodeVolumes, VolumeInfo};
use super::{
    connect_tcp, ContainerState, InstanceSpec, ManagedContainer, Node, NodeError, Started, Upstream,
};
use crate::gpu::{GpuDriver, GpuInfo, GpuMonitor};
use crate::runtime::{
    into_lines, ContainerInfo, ContainerRuntime, ImageProgress, LineStream, LogOptions,
    RegistryAuth, RuntimeError, LABEL_FUNCTION, LABEL_GATEWAY, LABEL_GPUS, LABEL_INSTANCE,
    LABEL_MANAGED, LABEL_NODE, LABEL_PORT, LABEL_REVISION,
};
use axum::body::Body;

/// How long a parked container's server gets to exit after SIGTERM before it is killed:
/// short, since a request that arrives meanwhile waits for the stop before the restart.
const PARK_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// A node backed by a container runtime in this process.
pub struct LocalNode {
    name: String,
    gateway_id: String,
    host_ip: IpAddr,
    runtime: Arc<dyn ContainerRuntime>,
    gpus: GpuMonitor,
    gpu_driver: GpuDriver,
    endpoints: Endpoints,
    volumes: NodeVolumes,
}

/// How the gateway reaches a local node's containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Endpoints {
    /// The port published on the node's address (works from anywhere that address does;
    /// goes through Docker's userland proxy).
    #[default]
    Published,
    /// The container's own address and port on its bridge network: no proxy in between.
    /// Only where the gateway shares the host's network with Docker (Linux).
    Direct,
}

impl Endpoints {
    /// Direct where the gateway shares the host's network with Docker (Linux), published
    /// elsewhere (Docker Desktop).
    pub fn platform_default() -> Endpoints {
        if cfg!(target_os = "linux") {
            Endpoints::Direct
        } else {
            Endpoints::Published
        }
    }
}

impl LocalNode {
    /// A node named `name`, publishing container ports on `host_ip`, labelling its
    /// containers as owned by `gateway_id`.
    pub fn new(
        name: impl Into<String>,
        gateway_id: impl Into<String>,
        host_ip: IpAddr,
        runtime: Arc<dyn ContainerRuntime>,
    ) -> LocalNode {
        LocalNode {
            name: name.into(),
            gateway_id: gateway_id.into(),
            host_ip,
            runtime,
            gpus: GpuMonitor::new(None),
            gpu_driver: GpuDriver::Simulated,
            endpoints: Endpoints::Published,
            volumes: NodeVolumes::default(),
        }
    }

    fn failed(&self, message: String) -> NodeError {
        NodeError::Remote {
            node: self.name.clone(),
            message,
        }
    }

    /// The node's name.
    pub fn node_name(&self) -> &str {
        &self.name
    }

    /// The id of the gateway its containers belong to.
    pub fn gateway_id(&self) -> &str {
        &self.gateway_id
    }

    /// Where container ports are published.
    pub fn host_ip(&self) -> IpAddr {
        self.host_ip
    }

    /// How containers get GPUs here.
    pub fn gpu_driver_kind(&self) -> GpuDriver {
        self.gpu_driver
    }

    /// The node's volumes.
    pub fn node_volumes(&self) -> &NodeVolumes {
        &self.volumes
    }

    /// Lends instances the node's volumes.
    pub fn with_volumes(mut self, volumes: NodeVolumes) -> LocalNode {
        self.volumes = volumes;
        self
    }

    /// Reaches containers as `endpoints` says.
    pub fn with_endpoints(mut self, endpoints: Endpoints) -> LocalNode {
        self.endpoints = endpoints;
        self
    }

    /// A container just started (created or parked before), listening on `port` inside:
    /// where to reach it, or why it cannot be reached.
    fn started(&self, port: u16, container: ContainerInfo) -> Result<Started, NodeError> {
        if !container.running {
            // Docker unpublishes the port of a stopped container: it exited already.
            return Err(NodeError::ExitedAtStart {
                container_id: container.id,
                code: container.exit_code,
                status: container.status,
            });
        }
        match self.endpoint(port, container.host_port, container.ip) {
            Some(endpoint) => Ok(Started {
                container_id: container.id,
                endpoint,
            }),
            None => Err(RuntimeError::NoPort(container.id).into()),
        }
    }

    fn endpoint(
        &self,
        container_port: u16,
        host_port: Option<u16>,
        ip: Option<IpAddr>,
    ) -> Option<SocketAddr> {
        match (self.endpoints, ip) {
            (Endpoints::Direct, Some(ip)) => Some(SocketAddr::new(ip, container_port)),
            _ => host_port.map(|p| SocketAddr::new(self.host_ip, p)),
        }
    }

    /// Gives the node GPUs from `monitor`, handed to containers by `driver`.
    pub fn with_gpus(mut self, monitor: GpuMonitor, driver: GpuDriver) -> LocalNode {
        self.gpus = monitor;
        self.gpu_driver = driver;
        self
    }
}

#[async_trait]
impl Node for LocalNode {
    fn name(&self) -> &str {
        &self.name
    }

    fn gpu_driver(&self) -> GpuDriver {
        self.gpu_driver
    }

    fn gpu_source(&self) -> String {
        self.gpus.source()
    }

    async fn gpus(&self) -> Vec<GpuInfo> {
        self.gpus.read().await
    }

    async fn connect(&self, endpoint: SocketAddr) -> Result<Upstream, NodeError> {
        connect_tcp(endpoint).await
    }

    async fn start(&self, spec: &InstanceSpec) -> Result<Started, NodeError> {
        let container_spec = self.container_spec(spec).await?;
        let container = self.runtime.run(&container_spec).await?;
        let started = self.started(spec.manifest.port, container);
        if let Err(NodeError::Runtime(RuntimeError::NoPort(id))) = &started {
            if let Err(e) = self.runtime.remove(id).await {
                tracing::warn!(container = %id, error = %e, "could not remove a container without a published port");
            }
        }
        started
    }

    async fn state(&self, container_id: &str) -> Result<ContainerState, NodeError> {
        Ok(match self.runtime.inspect(container_id).await? {
            None => ContainerState::Gone,
            Some(c) if c.running => ContainerState::Running,
            Some(c) => ContainerState::Exited {
                code: c.exit_code,
                status: c.status,
            },
        })
    }

    async fn logs(&self, container_id: &str, lines: usize) -> Result<String, NodeError> {
        Ok(self.runtime.logs_tail(container_id, lines).await?)
    }

    async fn stream_logs(
        &self,
        container_id: &str,
        options: &LogOptions,
    ) -> Result<LineStream<NodeError>, NodeError> {
        let chunks = self.runtime.logs(container_id, options).await?;
        Ok(into_lines(chunks).map_err(NodeError::from).boxed())
    }

    async fn pause(&self, container_id: &str) -> Result<(), NodeError> {
        Ok(self.runtime.pause(container_id).await?)
    }

    async fn resume(&self, container_id: &str) -> Result<(), NodeError> {
        Ok(self.runtime.unpause(container_id).await?)
    }

    async fn park(&self, container_id: &str) -> Result<(), NodeError> {
        Ok(self.runtime.stop(container_id, PARK_GRACE).await?)
    }

    async fn unpark(&self, container_id: &str, port: u16) -> Result<Started, NodeError> {
        let container = self.runtime.start(container_id).await?;
        self.started(port, container)
    }

    async fn stop(&self, container_id: &str) -> Result<(), NodeError> {
        Ok(self.runtime.remove(container_id).await?)
    }

    async fn list_managed(&self) -> Result<Vec<ManagedContainer>, NodeError> {
        let containers = self
            .runtime
            .list(&[
                (LABEL_MANAGED, "true"),
                (LABEL_GATEWAY, &self.gateway_id),
                (LABEL_NODE, &self.name),
            ])
            .await?;
        Ok(containers
            .into_iter()
            .map(|c| {
                let label = |k: &str| c.labels.get(k).cloned().unwrap_or_default();
                ManagedContainer {
                    function: label(LABEL_FUNCTION),
                    revision: label(LABEL_REVISION),
                    instance: label(LABEL_INSTANCE),
                    running: c.running,
                    paused: c.paused,
                    endpoint: c
                        .labels
                        .get(LABEL_PORT)
                        .and_then(|p| p.parse().ok())
                        .and_then(|port| self.endpoint(port, c.host_port, c.ip)),
                    gpus: c
                        .labels
                        .get(LABEL_GPUS)
                        .and_then(|j| serde_json::from_str(j).ok())
                        .unwrap_or_default(),
                    container_id: c.id,
                }
            })
            .collect())
    }

    async fn volume_names(&self) -> Vec<String> {
        let volumes = self.volumes.clone();
        tokio::task::spawn_blocking(move || volumes.names())
            .await
            .unwrap_or_default()
    }

    async fn volumes(&self) -> Result<Vec<VolumeInfo>, NodeError> {
        let volumes = self.volumes.clone();
        tokio::task::spawn_blocking(move || volumes.list())
            .await
            .map_err(|e| self.failed(format!("listing volumes failed: {e}")))
    }

    async fn put_file(&self, volume: &str, path: &str, body: Body) -> Result<u64, NodeError> {
        let volumes = self.volumes.clone();
        let (v, p) = (volume.to_string(), path.to_string());
        let target = tokio::task::spawn_blocking(move || volumes.file_target(&v, &p))
            .await
            .map_err(|e| self.failed(format!("volume lookup failed: {e}")))??;
        Ok(super::volumes::write_file(volume, &target, body).await?)
    }

    async fn image_exists(&self, image: &str) -> Result<bool, NodeError> {
        Ok(self.runtime.image_exists(image).await?)
    }

    async fn pull_image(
        &self,
        image: &str,
        auth: Option<RegistryAuth>,
        progress: mpsc::Sender<ImageProgress>,
    ) -> Result<(), NodeError> {
        Ok(self
            .runtime
            .pull_image(image, auth.as_ref(), progress)
            .await?)
    }

    async fn export_image(&self, image: &str) -> Result<(Option<u64>, Body), NodeError> {
        let (size, tar) = self.runtime.export_image(image).await?;
        Ok((size, Body::from_stream(tar)))
    }

    async fn load_image(&self, tar: Body) -> Result<(), NodeError> {
        use futures_util::TryStreamExt;
        let tar = tar
            .into_data_stream()
            .map_err(|e| RuntimeError::Transfer(format!("the image's bytes stopped coming: {e}")));
        Ok(self.runtime.load_image(Box::pin(tar)).await?)
    }

    async fn build_image(
        &self,
        tag: &str,
        dockerfile: &str,
        context_tar: Bytes,
        progress: mpsc::Sender<String>,
    ) -> Result<(), NodeError> {
        Ok(self
            .runtime
            .build_image(tag, dockerfile, context_tar, progress)
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::fake::FakeRuntime;

    fn node() -> LocalNode {
        LocalNode::new(
            "n",
            "gw",
            "127.0.0.1".parse().unwrap(),
            Arc::new(FakeRuntime::default()),
        )
    }

    #[test]
    fn direct_endpoints_use_the_container_address_and_published_ones_the_host_port() {
        let ip: IpAddr = "172.17.0.5".parse().unwrap();
        let published = node();
        assert_eq!(
            published.endpoint(8080, Some(32768), Some(ip)),
            Some("127.0.0.1:32768".parse().unwrap())
        );
        let direct = node().with_endpoints(Endpoints::Direct);
        assert_eq!(
            direct.endpoint(8080, Some(32768), Some(ip)),
            Some("172.17.0.5:8080".parse().unwrap())
        );
        assert_eq!(
            direct.endpoint(8080, Some(32768), None),
            Some("127.0.0.1:32768".parse().unwrap()),
            "no bridge address (host network): the published port"
        );
        assert_eq!(published.endpoint(8080, None, None), None);
    }
}
