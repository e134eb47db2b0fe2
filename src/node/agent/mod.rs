//! `ember agent`: a node of a remote gateway, with no port open.
//!
//! The agent owns the local Docker engine and GPUs. On its first start it trades a join
//! token for a node credential (`credential.rs`), then dials the gateway and keeps one
//! tunnel open (`dial.rs`), over which the gateway drives the node (`server.rs`: the node
//! API over the same `LocalNode` the embedded node uses, and CONNECT streams to its
//! containers). Containers are published on the node's loopback only.

mod connect;
mod credential;
mod dial;
pub mod images;
pub mod logs;
mod server;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::local::Endpoints;
use super::volumes::NodeVolumes;
use super::wire::{NodeInfo, PROTOCOL_VERSION};
use super::{LocalNode, Node};
use crate::client::ApiClient;
use crate::gpu::{GpuDriver, GpuMonitor};
use crate::runtime::{ContainerRuntime, DockerRuntime};
use crate::tls::Trust;

pub use credential::CREDENTIAL_FILE;

/// `ember agent` settings.
#[derive(Debug, Clone, Args)]
pub struct AgentConfig {
    /// Gateway URL (https:// when it serves TLS).
    #[arg(long, env = "EMBER_GATEWAY")]
    pub gateway: String,
    /// Join token (`ember token create`), traded once for this node's credential; not
    /// needed again while the data dir keeps the credential.
    #[arg(long, env = "EMBER_JOIN_TOKEN")]
    pub token: Option<String>,
    /// Node name (a lower-case DNS label); the host name by default.
    #[arg(long, env = "EMBER_NODE_NAME")]
    pub name: Option<String>,
    /// Labels, `k=v,k2=v2`.
    #[arg(long, env = "EMBER_LABELS", value_parser = parse_labels, default_value = "")]
    pub labels: BTreeMap<String, String>,
    /// Declared GPU inventory (simulation mode unless --gpu-driver says otherwise).
    #[arg(long, env = "EMBER_GPU_INVENTORY")]
    pub gpu_inventory: Option<PathBuf>,
    /// How containers get GPUs: nvidia, cdi or simulated.
    #[arg(long, env = "EMBER_GPU_DRIVER", value_enum)]
    pub gpu_driver: Option<GpuDriver>,
    /// Trust an https gateway whose CA has this pin (`ember token create` prints it).
    #[arg(long, env = "EMBER_CA_PIN")]
    pub ca_pin: Option<String>,
    /// Trust an https gateway whose certificate a CA in this PEM file signed.
    #[arg(long, env = "EMBER_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// How the agent reaches its containers: direct (their bridge address; the default on
    /// Linux) or published (the port published on the node's loopback).
    #[arg(long, env = "EMBER_NODE_ENDPOINTS", value_enum, default_value_t = Endpoints::platform_default())]
    pub endpoints: Endpoints,
    /// Directories this node lends to functions by name, `NAME=PATH` (repeatable, or
    /// comma-separated in the variable); `[[volumes]] source = "NAME"` mounts one. The node
    /// also has the directories under DATA_DIR/volumes.
    #[arg(long = "volume", env = "EMBER_VOLUMES", value_delimiter = ',', value_parser = crate::node::volumes::parse_exposed)]
    pub volumes: Vec<(String, PathBuf)>,
    /// Directory for the agent's own files: its credential (`node.json`, 0600), and its
    /// node volumes (`volumes/`).
    #[arg(long, env = "EMBER_DATA_DIR", default_value = ".ember-agent")]
    pub data_dir: PathBuf,
    /// Dial a gateway past the loopback over plain http (only on a private network: the
    /// join token and the node credential cross it in the clear).
    #[arg(long, env = "EMBER_ALLOW_PLAIN_HTTP")]
    pub allow_plain_http: bool,
}

/// Parses `k=v,k2=v2`.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(format!("`{pair}` is not k=v"));
        };
        let k = k.trim();
        if k.is_empty()
            || !k
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        {
            return Err(format!(
                "`{k}` is not a label name (letters, digits, - _ . /)"
            ));
        }
        out.insert(k.to_string(), v.trim().to_string());
    }
    Ok(out)
}

/// Runs the agent until `shutdown`, or until the gateway refuses its credential.
pub async fn run(mut config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.gateway = credential::normalize_url(&config.gateway).to_string();
    let name = node_name(&config)?;
    let trust = Trust::from_settings(config.ca_pin.as_deref(), config.ca_file.as_deref())?;
    let target = dial::Target::new(&config.gateway, &trust, config.allow_plain_http)?;
    let (runtime, monitor, driver) = setup(&config).await?;
    let previous = credential::previous_gateway_id(&config.data_dir);
    let credential = credential(&config, &name, &trust).await?;
    // Kept before anything else can fail: a spent join token cannot be traded again.
    credential.save(&config.data_dir)?;
    credential::clear_removed(&config.data_dir);
    if let Some(previous) = previous.filter(|p| *p != credential.gateway_id) {
        remove_containers_of(&LocalNode::new(&name, &previous, LOOPBACK, runtime.clone())).await;
    }
    let node = Arc::new(
        LocalNode::new(&name, &credential.gateway_id, LOOPBACK, runtime)
            .with_gpus(monitor.clone(), driver)
            .with_endpoints(config.endpoints)
            .with_volumes(NodeVolumes::new(&config.data_dir, config.volumes.clone())),
    );
    let info = NodeInfo {
        protocol: PROTOCOL_VERSION,
        name: name.clone(),
        labels: config.labels.clone(),
        gpu_driver: driver,
        gpu_source: monitor.source(),
        gpus: Vec::new(),
        volumes: Vec::new(),
    };
    let tracker = TaskTracker::new();
    let allowed = connect::SharedAllowed::default();
    let service = connect::TunnelService::new(
        server::router(node.clone(), info, allowed.clone()),
        node.clone(),
        allowed,
        tracker.clone(),
    );
    let announce = {
        let (name, gateway) = (name.clone(), config.gateway.clone());
        // One plain line on stdout for scripts and tests; the log goes to stderr.
        Box::new(move || println!("ember agent {name} connected to {gateway}"))
    };
    let ended = dial::run(&target, &credential, service, &shutdown, Some(announce)).await;
    tracker.close();
    if tokio::time::timeout(STREAMS_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?STREAMS_GRACE, "streams still open at exit; they are cut");
    }
    match ended {
        dial::Ended::Shutdown => Ok(()),
        dial::Ended::Removed(why) => {
            remove_containers_of(&node).await;
            credential.forget_removed(&config.data_dir)?;
            Err(Refused(format!(
                "the gateway no longer accepts this node: {why}; its containers were removed"
            ))
            .into())
        }
        dial::Ended::Refused(why) => Err(Refused(format!(
            "the gateway does not accept this node's credential: {why}; its containers are left running, with the label ember.node={name}"
        ))
        .into()),
    }
}

/// How long an agent that stops waits for the streams it serves to end.
const STREAMS_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// The gateway refused this node: it was removed (`ember nodes rm`), or another agent
/// holds its name now. The agent exits with `REFUSED_EXIT_CODE`, which its service
/// manager should not restart: only an operator can bring it back.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(String);

/// The exit code of an agent the gateway refused.
pub const REFUSED_EXIT_CODE: u8 = 3;

/// Containers of agent nodes are published on the loopback only, never outside.
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// `--name`, or the host name made into a DNS label.
fn node_name(config: &AgentConfig) -> anyhow::Result<String> {
    let name = match &config.name {
        Some(n) => n.clone(),
        None => host_name(),
    };
    crate::manifest::check_name(&name).map_err(|e| anyhow::anyhow!("--name: {e}"))?;
    Ok(name)
}

/// The machine's name as a DNS label (`node` when it has none usable).
fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_default();
    let label: String = raw
        .trim()
        .split('.')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let label = label.trim_matches('-');
    if label.is_empty() || !label.starts_with(|c: char| c.is_ascii_lowercase()) {
        return "node".into();
    }
    label.chars().take(crate::manifest::MAX_NAME_LEN).collect()
}

/// Prepares the data dir, the Docker engine and the GPUs.
async fn setup(
    config: &AgentConfig,
) -> anyhow::Result<(Arc<dyn ContainerRuntime>, GpuMonitor, GpuDriver)> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
    let runtime: Arc<dyn ContainerRuntime> = Arc::new(DockerRuntime::connect().await?);
    runtime.ping().await?;
    let (monitor, driver) = GpuMonitor::setup(config.gpu_inventory.as_deref(), config.gpu_driver)?;
    Ok((runtime, monitor, driver))
}

/// The credential kept in the data dir, or a new one for the join token.
async fn credential(
    config: &AgentConfig,
    name: &str,
    trust: &Trust,
) -> anyhow::Result<credential::Credential> {
    if let Some(kept) = credential::Credential::load(&config.data_dir, &config.gateway, name) {
        return Ok(kept);
    }
    let Some(token) = config.token.as_deref().filter(|t| !t.trim().is_empty()) else {
        anyhow::bail!(
            "--token: this node has not joined {} yet; give it a join token (`ember token create` on the gateway)",
            config.gateway
        );
    };
    credential::check_not_removed(&config.data_dir, token).map_err(|e| Refused(e.to_string()))?;
    let client = ApiClient::with_trust(&config.gateway, trust)?;
    let joined = credential::join(&client, &config.gateway, token, name, &config.labels).await?;
    tracing::info!(node = %name, gateway = %config.gateway, "joined the gateway");
    Ok(joined)
}

/// Removes every container `node`'s gateway left on this machine.
async fn remove_containers_of(node: &LocalNode) {
    let containers = match node.list_managed().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list this gateway's containers here; they stay");
            return;
        }
    };
    for c in containers {
        tracing::info!(container = %c.container_id, function = %c.function, "removing a container no gateway will reconcile");
        if let Err(e) = node.stop(&c.container_id).await {
            tracing::warn!(container = %c.container_id, error = %e, "could not remove it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_become_dns_labels() {
        let name = host_name();
        assert!(crate::manifest::check_name(&name).is_ok(), "{name}");
    }

    #[test]
    fn labels_parse_from_k_equals_v_lists() {
        let l = parse_labels("zone=a, gpu=high ,").unwrap();
        assert_eq!(l["zone"], "a");
        assert_eq!(l["gpu"], "high");
        assert!(parse_labels("").unwrap().is_empty());
        assert!(parse_labels("novalue").is_err());
        assert!(parse_labels("bad key=1").is_err());
    }
}
