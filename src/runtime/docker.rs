//! `ContainerRuntime` on the Docker Engine API through bollard. The only module that
//! uses bollard.
//!
//! The container config is built by a pure function (`create_body`) so the exact request
//! sent to Docker is unit-tested without an engine.
#![allow(clippy::disallowed_types)] // the one module that may hold this crate's types

mod images;
mod logs;

use std::collections::HashMap;
use std::net::IpAddr;

use async_trait::async_trait;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, DeviceRequest, HostConfig, MountType,
    PortBinding, ResourcesUlimits,
};
use bollard::query_parameters::{
    BuildImageOptionsBuilder, CreateContainerOptionsBuilder, ListContainersOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use bollard::Docker;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::{
    ContainerInfo, ContainerRuntime, ContainerSpec, DeviceDriver, ImageProgress, ImageTar,
    LogOptions, LogStream, MountSource, RegistryAuth, RuntimeError,
};

/// Docker through bollard.
pub struct DockerRuntime {
    docker: Docker,
}

impl DockerRuntime {
    /// Connects to the engine named by `DOCKER_HOST`, or the local socket, and agrees on an
    /// API version (older engines refuse a client that is newer than they are).
    pub async fn connect() -> Result<DockerRuntime, RuntimeError> {
        let docker =
            Docker::connect_with_defaults().map_err(|e| RuntimeError::Unreachable(e.into()))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| RuntimeError::Unreachable(e.into()))?;
        Ok(DockerRuntime { docker })
    }
}

fn docker_err(op: &'static str) -> impl FnOnce(DockerError) -> RuntimeError {
    move |source| RuntimeError::Docker {
        op,
        source: source.into(),
    }
}

fn is_not_found(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// The `Config` of a container create request for `spec`.
pub fn create_body(spec: &ContainerSpec) -> ContainerCreateBody {
    let port_key = format!("{}/tcp", spec.port);
    let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.push(format!("PORT={}", spec.port));
    let host_config = HostConfig {
        port_bindings: Some(HashMap::from([(
            port_key.clone(),
            Some(vec![PortBinding {
                host_ip: Some(spec.host_ip.to_string()),
                // Empty asks Docker for an ephemeral port.
                host_port: Some(String::new()),
            }]),
        )])),
        nano_cpus: Some((spec.cpus * 1e9) as i64),
        memory: Some(spec.memory_bytes as i64),
        pids_limit: Some(spec.pids_limit),
        shm_size: Some(spec.shm_bytes as i64),
        ulimits: (!spec.ulimits.is_empty()).then(|| {
            spec.ulimits
                .iter()
                .map(|(name, soft, hard)| ResourcesUlimits {
                    name: Some(name.clone()),
                    soft: Some(*soft),
                    hard: Some(*hard),
                })
                .collect()
        }),
        mounts: (!spec.mounts.is_empty()).then(|| spec.mounts.iter().map(mount).collect()),
        privileged: Some(false),
        security_opt: Some(vec!["no-new-privileges".into()]),
        cap_drop: Some(vec!["ALL".into()]),
        device_requests: spec.gpus.as_ref().map(|g| {
            vec![DeviceRequest {
                driver: Some(g.driver.as_str().to_string()),
                device_ids: Some(g.device_ids.clone()),
                capabilities: (g.driver == DeviceDriver::Nvidia)
                    .then(|| vec![vec!["gpu".to_string()]]),
                ..Default::default()
            }]
        }),
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: spec.command.clone(),
        env: Some(env),
        labels: Some(spec.labels.clone()),
        exposed_ports: Some(vec![port_key]),
        host_config: Some(host_config),
        ..Default::default()
    }
}

fn mount(m: &super::Mount) -> bollard::models::Mount {
    let (typ, source) = match &m.source {
        MountSource::Directory(path) => (MountType::BIND, path.display().to_string()),
        MountSource::Volume(name) => (MountType::VOLUME, name.clone()),
    };
    bollard::models::Mount {
        target: Some(m.target.clone()),
        source: Some(source),
        typ: Some(typ),
        read_only: Some(m.read_only),
        ..Default::default()
    }
}

fn info_from_inspect(c: ContainerInspectResponse) -> ContainerInfo {
    let state = c.state.unwrap_or_default();
    // A paused container is still running as far as Ember is concerned: it is alive.
    let running = state.running.unwrap_or(false);
    let paused = state.paused.unwrap_or(false);
    let mut status = state
        .status
        .map(|s| s.to_string())
        .unwrap_or_else(|| "unknown".into());
    if state.oom_killed == Some(true) {
        status = "OOMKilled".into();
    }
    let ip = c
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref())
        .and_then(first_ip);
    let host_port = c.network_settings.and_then(|n| n.ports).and_then(|ports| {
        ports
            .into_values()
            .flatten()
            .flatten()
            .find_map(|b| b.host_port.and_then(|p| p.parse().ok()))
    });
    ContainerInfo {
        id: c.id.unwrap_or_default(),
        labels: c.config.and_then(|c| c.labels).unwrap_or_default(),
        running,
        paused,
        exit_code: if running { None } else { state.exit_code },
        status,
        host_port,
        ip,
    }
}

fn first_ip(networks: &HashMap<String, bollard::models::EndpointSettings>) -> Option<IpAddr> {
    // Sorted for a stable choice when a container is on several networks.
    let mut names: Vec<&String> = networks.keys().collect();
    names.sort();
    names
        .into_iter()
        .filter_map(|n| networks[n].ip_address.as_deref())
        .find_map(|ip| ip.parse().ok())
}

#[async_trait]
impl ContainerRuntime for DockerRuntime {
    async fn ping(&self) -> Result<(), RuntimeError> {
        self.docker
            .ping()
            .await
            .map(|_| ())
            .map_err(|e| RuntimeError::Unreachable(e.into()))
    }

    async fn image_exists(&self, image: &str) -> Result<bool, RuntimeError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(docker_err("image inspect")(e)),
        }
    }

    async fn build_image(
        &self,
        tag: &str,
        dockerfile: &str,
        context_tar: Bytes,
        progress: mpsc::Sender<String>,
    ) -> Result<(), RuntimeError> {
        let options = BuildImageOptionsBuilder::new()
            .dockerfile(dockerfile)
            .t(tag)
            .rm(true)
            .forcerm(true)
            .build();
        let mut stream =
            self.docker
                .build_image(options, None, Some(bollard::body_full(context_tar)));
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| RuntimeError::Build(e.to_string()))?;
            if let Some(detail) = info.error_detail {
                return Err(RuntimeError::Build(detail.message.unwrap_or_default()));
            }
            let line = info.stream.or(info.status).unwrap_or_default();
            let line = line.trim_end();
            if !line.is_empty() {
                // A closed progress channel means nobody watches; the build goes on.
                let _ = progress.send(line.to_string()).await;
            }
        }
        if !self.image_exists(tag).await? {
            return Err(RuntimeError::Build(format!(
                "the build finished but `{tag}` does not exist"
            )));
        }
        Ok(())
    }

    async fn pull_image(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
        progress: mpsc::Sender<ImageProgress>,
    ) -> Result<(), RuntimeError> {
        images::pull(&self.docker, image, auth, progress).await
    }

    async fn export_image(&self, image: &str) -> Result<(Option<u64>, ImageTar), RuntimeError> {
        images::export(&self.docker, image).await
    }

    async fn load_image(&self, tar: ImageTar) -> Result<(), RuntimeError> {
        images::load(&self.docker, tar).await
    }

    async fn run(&self, spec: &ContainerSpec) -> Result<ContainerInfo, RuntimeError> {
        let options = CreateContainerOptionsBuilder::new()
            .name(&spec.name)
            .build();
        let created = match self
            .docker
            .create_container(Some(options), create_body(spec))
            .await
        {
            Ok(c) => c,
            Err(e) if is_not_found(&e) => {
                return Err(RuntimeError::ImageNotFound(spec.image.clone()))
            }
            Err(e) => return Err(docker_err("container create")(e)),
        };
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            let _ = self.remove(&created.id).await;
            return Err(docker_err("container start")(e));
        }
        let info = self
            .inspect(&created.id)
            .await?
            .ok_or_else(|| RuntimeError::NoPort(created.id.clone()))?;
        Ok(info)
    }

    async fn inspect(&self, id: &str) -> Result<Option<ContainerInfo>, RuntimeError> {
        match self.docker.inspect_container(id, None).await {
            Ok(c) => Ok(Some(info_from_inspect(c))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(docker_err("container inspect")(e)),
        }
    }

    async fn logs_tail(&self, id: &str, lines: usize) -> Result<String, RuntimeError> {
        let options = LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .tail(&lines.to_string())
            .build();
        let mut stream = self.docker.logs(id, Some(options));
        let mut out = String::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(chunk) => out.push_str(&chunk.to_string()),
                Err(e) if is_not_found(&e) => break,
                Err(e) => return Err(docker_err("container logs")(e)),
            }
        }
        Ok(out)
    }

    async fn logs(&self, id: &str, options: &LogOptions) -> Result<LogStream, RuntimeError> {
        Ok(logs::stream(&self.docker, id, options))
    }

    async fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        self.docker
            .pause_container(id)
            .await
            .map_err(docker_err("container pause"))
    }

    async fn unpause(&self, id: &str) -> Result<(), RuntimeError> {
        self.docker
            .unpause_container(id)
            .await
            .map_err(docker_err("container unpause"))
    }

    async fn stop(&self, id: &str, grace: std::time::Duration) -> Result<(), RuntimeError> {
        let seconds = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        let options = StopContainerOptionsBuilder::new().t(seconds).build();
        match self.docker.stop_container(id, Some(options)).await {
            // 304: it was stopped already.
            Ok(())
            | Err(DockerError::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(docker_err("container stop")(e)),
        }
    }

    async fn start(&self, id: &str) -> Result<ContainerInfo, RuntimeError> {
        self.docker
            .start_container(id, None)
            .await
            .map_err(docker_err("container start"))?;
        self.inspect(id).await?.ok_or_else(|| RuntimeError::Docker {
            op: "container start",
            source: "the container was removed as it started".into(),
        })
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptionsBuilder::new().force(true).build();
        match self.docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            // 409: removal already in progress; the container is going away.
            Err(DockerError::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()),
            Err(e) => Err(docker_err("container remove")(e)),
        }
    }

    async fn list(&self, labels: &[(&str, &str)]) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let filters = HashMap::from([(
            "label".to_string(),
            labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
        )]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let summaries = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(docker_err("container list"))?;
        Ok(summaries
            .into_iter()
            .map(|c| {
                let status = c.state.map(|s| s.to_string()).unwrap_or_default();
                ContainerInfo {
                    id: c.id.unwrap_or_default(),
                    labels: c.labels.unwrap_or_default(),
                    running: status == "running" || status == "paused",
                    paused: status == "paused",
                    exit_code: None,
                    host_port: c
                        .ports
                        .unwrap_or_default()
                        .into_iter()
                        .find_map(|p| p.public_port),
                    ip: c
                        .network_settings
                        .as_ref()
                        .and_then(|n| n.networks.as_ref())
                        .and_then(first_ip),
                    status,
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            name: "ember-echo-abc".into(),
            image: "ember/echo:1".into(),
            command: Some(vec!["/echo".into()]),
            env: vec![("GREETING".into(), "hi".into())],
            labels: HashMap::from([("ember.managed".into(), "true".into())]),
            port: 8080,
            host_ip: "127.0.0.1".parse().unwrap(),
            cpus: 0.5,
            memory_bytes: 64 << 20,
            pids_limit: 512,
            shm_bytes: 64 << 20,
            ulimits: Vec::new(),
            mounts: Vec::new(),
            gpus: None,
        }
    }

    #[test]
    fn container_config_publishes_the_port_on_an_ephemeral_host_port() {
        let body = create_body(&spec());
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(json["ExposedPorts"], serde_json::json!({"8080/tcp": {}}));
        assert_eq!(
            json["HostConfig"]["PortBindings"],
            serde_json::json!({"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]})
        );
    }

    #[test]
    fn container_config_sets_port_env_limits_and_hardening() {
        let body = create_body(&spec());
        let env = body.env.unwrap();
        assert!(env.contains(&"PORT=8080".to_string()));
        assert!(env.contains(&"GREETING=hi".to_string()));
        let host = body.host_config.unwrap();
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.memory, Some(64 << 20));
        assert_eq!(host.pids_limit, Some(512));
        assert_eq!(host.privileged, Some(false));
        assert_eq!(host.security_opt, Some(vec!["no-new-privileges".into()]));
        assert_eq!(host.cap_drop, Some(vec!["ALL".into()]));
        assert!(
            host.binds.is_none() && host.mounts.is_none(),
            "nothing, the Docker socket least, is mounted"
        );
        assert_eq!(host.shm_size, Some(64 << 20));
        assert!(host.ulimits.is_none());
    }

    #[test]
    fn container_config_mounts_volumes_and_sets_shm_and_ulimits() {
        let mut s = spec();
        s.shm_bytes = 8 << 30;
        s.ulimits = vec![("memlock".into(), -1, -1)];
        s.mounts = vec![
            crate::runtime::Mount {
                source: MountSource::Directory("/srv/models".into()),
                target: "/models".into(),
                read_only: true,
            },
            crate::runtime::Mount {
                source: MountSource::Volume("hf-cache".into()),
                target: "/cache".into(),
                read_only: false,
            },
        ];
        let json = serde_json::to_value(create_body(&s)).unwrap();
        let host = &json["HostConfig"];
        assert_eq!(host["ShmSize"], 8i64 << 30);
        assert_eq!(
            host["Ulimits"],
            serde_json::json!([{"Name": "memlock", "Soft": -1, "Hard": -1}])
        );
        assert_eq!(
            host["Mounts"],
            serde_json::json!([
                {"Target": "/models", "Source": "/srv/models", "Type": "bind", "ReadOnly": true},
                {"Target": "/cache", "Source": "hf-cache", "Type": "volume", "ReadOnly": false}
            ])
        );
    }
}
