//! From an instance to a container: `LocalNode::container_spec` turns an `InstanceSpec`
//! into the `ContainerSpec` the runtime creates: Ember's labels, `PORT`, the manifest's
//! environment with secret values filled in, CPU, memory, process, shared-memory and
//! ulimit settings, the node volumes and Docker volumes it mounts, the port published on
//! the node's address, and the GPU devices. The hardening defaults (no capabilities, no
//! new privileges, not privileged) are the runtime's and no manifest field turns them off.

use std::collections::HashMap;

use super::local::LocalNode;
use super::volumes::VolumeError;
use super::{InstanceSpec, NodeError};
use crate::gpu::GpuDriver;
use crate::manifest::VolumeSource;
use crate::runtime::{
    ContainerSpec, DeviceDriver, GpuRequest, Mount, MountSource, LABEL_FUNCTION, LABEL_GATEWAY,
    LABEL_GPUS, LABEL_INSTANCE, LABEL_MANAGED, LABEL_NODE, LABEL_PORT, LABEL_REVISION,
};

/// What a GPU container may use of the driver unless its manifest says otherwise: CUDA
/// (compute) and nvidia-smi/NVML (utility), as the CUDA images expect.
pub const DRIVER_CAPABILITIES: &str = "compute,utility";

impl LocalNode {
    /// The container spec for an instance (blocking when it mounts node volumes: a
    /// missing writable one is made). Fails when a node volume it needs is not here.
    pub async fn container_spec(&self, spec: &InstanceSpec) -> Result<ContainerSpec, NodeError> {
        let mounts = self.mounts(spec).await?;
        let m = &spec.manifest;
        let mut labels = HashMap::from([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_GATEWAY.to_string(), self.gateway_id().to_string()),
            (LABEL_NODE.to_string(), self.node_name().to_string()),
            (LABEL_FUNCTION.to_string(), spec.function.clone()),
            (LABEL_REVISION.to_string(), spec.revision.clone()),
            (LABEL_INSTANCE.to_string(), spec.instance.clone()),
            (LABEL_PORT.to_string(), m.port.to_string()),
        ]);
        let mut env = environment(spec);
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
            if !m.env.contains_key("NVIDIA_DRIVER_CAPABILITIES") {
                env.push((
                    "NVIDIA_DRIVER_CAPABILITIES".into(),
                    DRIVER_CAPABILITIES.into(),
                ));
            }
            gpus = gpu_request(self.gpu_driver_kind(), &ids);
        }
        let r = &m.resources;
        Ok(ContainerSpec {
            name: format!("ember-{}-{}", spec.function, spec.instance),
            image: m.image.clone().unwrap_or_default(),
            command: m.command.clone(),
            env,
            labels,
            port: m.port,
            host_ip: self.host_ip(),
            cpus: r.cpus,
            memory_bytes: r.memory.as_u64(),
            pids_limit: r.pids(),
            shm_bytes: r.shm().as_u64(),
            ulimits: r
                .ulimits
                .iter()
                .map(|(name, l)| (name.clone(), l.soft, l.hard))
                .collect(),
            mounts,
            gpus,
        })
    }

    /// The mounts of the manifest's volumes, node volumes resolved to their directories.
    async fn mounts(&self, spec: &InstanceSpec) -> Result<Vec<Mount>, NodeError> {
        if spec.manifest.volumes.is_empty() {
            return Ok(Vec::new());
        }
        let volumes = self.node_volumes().clone();
        let wanted = spec.manifest.volumes.clone();
        let resolve = move || {
            wanted
                .iter()
                .map(|v| {
                    let source = match v.source() {
                        VolumeSource::Node(name) => {
                            MountSource::Directory(volumes.mount_dir(name, v.read_only)?)
                        }
                        VolumeSource::Docker(name) => MountSource::Volume(name.to_string()),
                    };
                    Ok(Mount {
                        source,
                        target: v.target.clone(),
                        read_only: v.read_only,
                    })
                })
                .collect::<Result<Vec<_>, VolumeError>>()
        };
        let mounts =
            tokio::task::spawn_blocking(resolve)
                .await
                .map_err(|e| NodeError::Remote {
                    node: self.node_name().to_string(),
                    message: format!("volume lookup failed: {e}"),
                })??;
        Ok(mounts)
    }
}

/// The manifest's variables with their values: plain ones as written, secret ones from
/// the values the gateway sent with this start (a missing one is left unset, loudly).
fn environment(spec: &InstanceSpec) -> Vec<(String, String)> {
    let mut env = Vec::with_capacity(spec.manifest.env.len() + 4);
    for (k, v) in &spec.manifest.env {
        let value = match v.plain() {
            Some(plain) => Some(plain.to_string()),
            None => spec.secrets.0.get(k).cloned(),
        };
        match value {
            Some(value) => env.push((k.clone(), value)),
            None => {
                tracing::warn!(function = %spec.function, variable = %k, "no value came for a secret variable; it is left unset")
            }
        }
    }
    env
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::gpu::GpuMonitor;
    use crate::manifest::{Format, Manifest};
    use crate::model::{GpuAssignment, SecretEnv, Sharing};
    use crate::node::volumes::NodeVolumes;
    use crate::runtime::fake::FakeRuntime;

    fn spec_of(toml: &str, gpus: Vec<GpuAssignment>) -> InstanceSpec {
        let text = format!("name = \"f\"\nimage = \"e:1\"\n{toml}");
        InstanceSpec {
            function: "f".into(),
            revision: "r".into(),
            instance: "i".into(),
            manifest: Arc::new(Manifest::parse(&text, Format::Toml).unwrap()),
            gpus,
            secrets: SecretEnv::default(),
        }
    }

    fn spec_with(gpus: Vec<GpuAssignment>) -> InstanceSpec {
        spec_of("", gpus)
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

    fn has(spec: &ContainerSpec, key: &str, value: &str) -> bool {
        spec.env.contains(&(key.into(), value.into()))
    }

    #[tokio::test]
    async fn simulation_sets_the_env_and_sends_no_device_request() {
        let spec = node(GpuDriver::Simulated)
            .container_spec(&spec_with(vec![mig()]))
            .await
            .unwrap();
        assert!(spec.gpus.is_none());
        assert!(has(&spec, "NVIDIA_VISIBLE_DEVICES", "MIG-1"));
        assert!(has(&spec, "EMBER_GPU_UUIDS", "MIG-1"));
        assert!(has(&spec, "NVIDIA_DRIVER_CAPABILITIES", "compute,utility"));
        let label: Vec<GpuAssignment> = serde_json::from_str(&spec.labels[LABEL_GPUS]).unwrap();
        assert_eq!(label, vec![mig()]);
    }

    #[tokio::test]
    async fn nvidia_and_cdi_nodes_request_the_devices() {
        let nv = node(GpuDriver::Nvidia)
            .container_spec(&spec_with(vec![mig()]))
            .await
            .unwrap();
        assert_eq!(nv.gpus.unwrap().device_ids, ["MIG-1"]);
        let cdi = node(GpuDriver::Cdi)
            .container_spec(&spec_with(vec![mig()]))
            .await
            .unwrap();
        let cdi = cdi.gpus.unwrap();
        assert_eq!(cdi.driver, DeviceDriver::Cdi);
        assert_eq!(cdi.device_ids, ["nvidia.com/gpu=MIG-1"]);
    }

    #[tokio::test]
    async fn instances_without_gpus_get_no_gpu_env() {
        let spec = node(GpuDriver::Nvidia)
            .container_spec(&spec_with(vec![]))
            .await
            .unwrap();
        assert!(spec.gpus.is_none());
        assert!(!spec.env.iter().any(|(k, _)| k.starts_with("NVIDIA_")));
        assert!(!spec.labels.contains_key(LABEL_GPUS));
    }

    #[tokio::test]
    async fn resources_secrets_and_a_manifests_driver_capabilities_reach_the_spec() {
        let mut instance = spec_of(
            "env = { TOKEN = { secret = \"hf\" }, NVIDIA_DRIVER_CAPABILITIES = \"all\" }\n[resources]\nshm = \"2GiB\"\npids = 100\nulimits = { memlock = -1 }",
            vec![mig()],
        );
        instance.secrets.0.insert("TOKEN".into(), "s3cret".into());
        let spec = node(GpuDriver::Nvidia)
            .container_spec(&instance)
            .await
            .unwrap();
        assert!(has(&spec, "TOKEN", "s3cret"));
        assert!(has(&spec, "NVIDIA_DRIVER_CAPABILITIES", "all"));
        assert!(!has(
            &spec,
            "NVIDIA_DRIVER_CAPABILITIES",
            DRIVER_CAPABILITIES
        ));
        assert_eq!((spec.shm_bytes, spec.pids_limit), (2 << 30, 100));
        assert_eq!(spec.ulimits, [("memlock".to_string(), -1, -1)]);
        for shown in [format!("{spec:?}"), format!("{instance:?}")] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("TOKEN"), "{shown}");
        }
        let plain = node(GpuDriver::Nvidia)
            .container_spec(&spec_with(vec![]))
            .await
            .unwrap();
        assert_eq!((plain.shm_bytes, plain.pids_limit), (64 << 20, 4096));
    }

    #[tokio::test]
    async fn node_volumes_mount_their_directory_and_docker_volumes_their_name() {
        let tmp = tempfile::tempdir().unwrap();
        let models = tmp.path().join("models");
        std::fs::create_dir_all(&models).unwrap();
        let volumes = NodeVolumes::new(
            &tmp.path().join("data"),
            [("models".into(), models.clone())],
        );
        let n = node(GpuDriver::Simulated).with_volumes(volumes);
        let instance = spec_of(
            "[[volumes]]\nsource = \"models\"\ntarget = \"/models\"\n[[volumes]]\nsource = \"out\"\ntarget = \"/out\"\nread_only = false\n[[volumes]]\nsource = \"docker:cache\"\ntarget = \"/cache\"",
            vec![],
        );
        let spec = n.container_spec(&instance).await.unwrap();
        assert_eq!(spec.mounts[0].source, MountSource::Directory(models));
        assert!(spec.mounts[0].read_only);
        let out = tmp.path().join("data/volumes/out");
        assert_eq!(spec.mounts[1].source, MountSource::Directory(out.clone()));
        assert!(out.is_dir(), "a writable volume is made");
        assert_eq!(spec.mounts[2].source, MountSource::Volume("cache".into()));

        let missing = spec_of("[[volumes]]\nsource = \"weights\"\ntarget = \"/w\"", vec![]);
        let err = n.container_spec(&missing).await.unwrap_err();
        assert!(
            err.public_message().contains("--volume weights=PATH"),
            "{err}"
        );
    }
}
