//! The embedded node: runs instances on a container runtime in the gateway's process.
//!
//! It turns an `InstanceSpec` into a hardened `ContainerSpec` (labels, limits, `PORT`,
//! the port published on the node's address) and maps runtime answers to node terms.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::{ContainerState, InstanceSpec, ManagedContainer, Node, NodeError, Started};
use crate::runtime::{
    ContainerRuntime, ContainerSpec, RuntimeError, LABEL_FUNCTION, LABEL_GATEWAY, LABEL_INSTANCE,
    LABEL_MANAGED, LABEL_NODE, LABEL_REVISION,
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
        }
    }

    /// The container spec for an instance.
    pub fn container_spec(&self, spec: &InstanceSpec) -> ContainerSpec {
        let m = &spec.manifest;
        let labels = HashMap::from([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_GATEWAY.to_string(), self.gateway_id.clone()),
            (LABEL_NODE.to_string(), self.name.clone()),
            (LABEL_FUNCTION.to_string(), spec.function.clone()),
            (LABEL_REVISION.to_string(), spec.revision.clone()),
            (LABEL_INSTANCE.to_string(), spec.instance.clone()),
        ]);
        ContainerSpec {
            name: format!("ember-{}-{}", spec.function, spec.instance),
            image: m.image.clone().unwrap_or_default(),
            command: m.command.clone(),
            env: m.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            labels,
            port: m.port,
            host_ip: self.host_ip,
            cpus: m.resources.cpus,
            memory_bytes: m.resources.memory.as_u64(),
            pids_limit: PIDS_LIMIT,
        }
    }
}

#[async_trait]
impl Node for LocalNode {
    fn name(&self) -> &str {
        &self.name
    }

    async fn start(&self, spec: &InstanceSpec) -> Result<Started, NodeError> {
        let container = self.runtime.run(&self.container_spec(spec)).await?;
        let Some(port) = container.host_port else {
            let _ = self.runtime.remove(&container.id).await;
            return Err(RuntimeError::NoPort(container.id).into());
        };
        Ok(Started {
            container_id: container.id,
            endpoint: SocketAddr::new(self.host_ip, port),
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
                    endpoint: c.host_port.map(|p| SocketAddr::new(self.host_ip, p)),
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
