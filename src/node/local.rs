//! The embedded node: runs instances on a container runtime in the gateway's process.
//!
//! It turns an `InstanceSpec` into a hardened `ContainerSpec` (labels, limits, `PORT`,
//! the port published on the node's address, GPU devices) and maps runtime answers to
//! node terms.
//!
//! Departure from DESIGN.md: the port is still published, but the embedded node of a
//! Linux gateway reaches its containers at their bridge address (`Endpoints::Direct`):
//! the published port goes through Docker's userland proxy, which halved the warm path's
//! throughput in the benchmark. Agents, reached from another machine, use the published
//! port on their advertised address.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::{
    connect_tcp, ContainerState, InstanceSpec, ManagedContainer, Node, NodeError, Started, Upstream,
};
use crate::gpu::{GpuDriver, GpuInfo, GpuMonitor};
use crate::runtime::{
    ContainerRuntime, ContainerSpec, DeviceDriver, GpuRequest, RuntimeError, LABEL_FUNCTION,
    LABEL_GATEWAY, LABEL_GPUS, LABEL_INSTANCE, LABEL_MANAGED, LABEL_NODE, LABEL_PORT,
    LABEL_REVISION,
};

/// Process limit per container: generous for thread-per-connection servers, still a cap
/// on fork bombs.
pub const PIDS_LIMIT: i64 = 4096;

/// A node backed by a container runtime in this process.
pub struct LocalNode {
    name: String,
    gateway_id: String,
    host_ip: IpAddr,
    runtime: Arc<dyn ContainerRuntime>,
    gpus: GpuMonitor,
    gpu_driver: GpuDriver,
    endpoints: Endpoints,
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
        }
    }

    /// Reaches containers as `endpoints` says.
    pub fn with_endpoints(mut self, endpoints: Endpoints) -> LocalNode {
        self.endpoints = endpoints;
        self
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

    /// The container spec for an instance.
    pub fn container_spec(&self, spec: &InstanceSpec) -> ContainerSpec {
        let m = &spec.manifest;
        let mut labels = HashMap::from([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_GATEWAY.to_string(), self.gateway_id.clone()),
            (LABEL_NODE.to_string(), self.name.clone()),
            (LABEL_FUNCTION.to_string(), spec.function.clone()),
            (LABEL_REVISION.to_string(), spec.revision.clone()),
            (LABEL_INSTANCE.to_string(), spec.instance.clone()),
            (LABEL_PORT.to_string(), m.port.to_string()),
        ]);
        let mut env: Vec<(String, String)> =
            m.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut gpus = None;
        if !spec.gpus.is_empty() {
            let ids: Vec<String> = spec.gpus.iter().map(|g| g.device_id.clone()).collect();
            labels.insert(
                LABEL_GPUS.to_string(),
                serde_json::to_string(&spec.gpus).expect("assignments serialize"),
            );
            // The same in every mode, so code in the container sees what it was given.
            env.push(("NVIDIA_VISIBLE_DEVICES".into(), ids.join(",")));
            env.push(("EMBER_GPU_UUIDS".into(), ids.join(",")));
            gpus = gpu_request(self.gpu_driver, &ids);
        }
        ContainerSpec {
            name: format!("ember-{}-{}", spec.function, spec.instance),
            image: m.image.clone().unwrap_or_default(),
            command: m.command.clone(),
            env,
            labels,
            port: m.port,
            host_ip: self.host_ip,
            cpus: m.resources.cpus,
            memory_bytes: m.resources.memory.as_u64(),
            pids_limit: PIDS_LIMIT,
            gpus,
        }
    }
}

/// The device request for `ids` under `driver`; none in simulation.
pub fn gpu_request(driver: GpuDriver, ids: &[String]) -> Option<GpuRequest> {
    match driver {
        GpuDriver::Simulated => None,
        GpuDriver::Nvidia => Some(GpuRequest {
            driver: DeviceDriver::Nvidia,
            device_ids: ids.to_vec(),
        }),
        GpuDriver::Cdi => Some(GpuRequest {
            driver: DeviceDriver::Cdi,
            device_ids: ids
                .iter()
                .map(|id| format!("nvidia.com/gpu={id}"))
                .collect(),
        }),
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
        let container = self.runtime.run(&self.container_spec(spec)).await?;
        let endpoint = self.endpoint(spec.manifest.port, container.host_port, container.ip);
        let Some(endpoint) = endpoint.filter(|_| container.running) else {
            if !container.running {
                // Docker unpublishes the port of a stopped container: it exited already.
                return Err(NodeError::ExitedAtStart {
                    container_id: container.id,
                    code: container.exit_code,
                    status: container.status,
                });
            }
            if let Err(e) = self.runtime.remove(&container.id).await {
                tracing::warn!(container = %container.id, error = %e, "could not remove a container without a published port");
            }
            return Err(RuntimeError::NoPort(container.id).into());
        };
        Ok(Started {
            container_id: container.id,
            endpoint,
        })
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

    async fn pause(&self, container_id: &str) -> Result<(), NodeError> {
        Ok(self.runtime.pause(container_id).await?)
    }

    async fn resume(&self, container_id: &str) -> Result<(), NodeError> {
        Ok(self.runtime.unpause(container_id).await?)
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

    async fn image_exists(&self, image: &str) -> Result<bool, NodeError> {
        Ok(self.runtime.image_exists(image).await?)
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
    use crate::manifest::{Format, Manifest};
    use crate::model::GpuAssignment;
    use crate::model::Sharing;
    use crate::runtime::fake::FakeRuntime;

    fn spec_with(gpus: Vec<GpuAssignment>) -> InstanceSpec {
        InstanceSpec {
            function: "f".into(),
            revision: "r".into(),
            instance: "i".into(),
            manifest: Arc::new(
                Manifest::parse("name = \"f\"\nimage = \"e:1\"", Format::Toml).unwrap(),
            ),
            gpus,
        }
    }

    fn node(driver: GpuDriver) -> LocalNode {
        LocalNode::new(
            "n",
            "gw",
            "127.0.0.1".parse().unwrap(),
            Arc::new(FakeRuntime::default()),
        )
        .with_gpus(GpuMonitor::new(None), driver)
    }

    fn mig() -> GpuAssignment {
        GpuAssignment {
            gpu_uuid: "GPU-p".into(),
            device_id: "MIG-1".into(),
            sharing: Sharing::Mig,
            memory: 40 << 30,
        }
    }

    #[test]
    fn simulation_sets_the_env_and_sends_no_device_request() {
        let spec = node(GpuDriver::Simulated).container_spec(&spec_with(vec![mig()]));
        assert!(spec.gpus.is_none());
        assert!(spec
            .env
            .contains(&("NVIDIA_VISIBLE_DEVICES".into(), "MIG-1".into())));
        assert!(spec
            .env
            .contains(&("EMBER_GPU_UUIDS".into(), "MIG-1".into())));
        let label: Vec<GpuAssignment> = serde_json::from_str(&spec.labels[LABEL_GPUS]).unwrap();
        assert_eq!(label, vec![mig()]);
    }

    #[test]
    fn nvidia_and_cdi_nodes_request_the_devices() {
        let nv = node(GpuDriver::Nvidia).container_spec(&spec_with(vec![mig()]));
        assert_eq!(nv.gpus.unwrap().device_ids, ["MIG-1"]);
        let cdi = node(GpuDriver::Cdi).container_spec(&spec_with(vec![mig()]));
        let cdi = cdi.gpus.unwrap();
        assert_eq!(cdi.driver, DeviceDriver::Cdi);
        assert_eq!(cdi.device_ids, ["nvidia.com/gpu=MIG-1"]);
    }

    #[test]
    fn direct_endpoints_use_the_container_address_and_published_ones_the_host_port() {
        let ip: IpAddr = "172.17.0.5".parse().unwrap();
        let published = node(GpuDriver::Simulated);
        assert_eq!(
            published.endpoint(8080, Some(32768), Some(ip)),
            Some("127.0.0.1:32768".parse().unwrap())
        );
        let direct = node(GpuDriver::Simulated).with_endpoints(Endpoints::Direct);
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

    #[test]
    fn instances_without_gpus_get_no_gpu_env() {
        let spec = node(GpuDriver::Nvidia).container_spec(&spec_with(vec![]));
        assert!(spec.gpus.is_none());
        assert!(!spec.env.iter().any(|(k, _)| k == "NVIDIA_VISIBLE_DEVICES"));
        assert!(!spec.labels.contains_key(LABEL_GPUS));
    }
}
