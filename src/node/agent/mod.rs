//! `ember agent`: a node of a remote gateway.
//!
//! The agent owns the local Docker engine and GPUs. It binds its node API, registers with
//! the gateway (join token), then sends heartbeats with its GPU inventory; the gateway
//! drives it through the node API (`RemoteNode` is the client), which wraps the same
//! `LocalNode` the embedded node uses. Every call must carry the join token. A gateway
//! that has forgotten the node (404 on a heartbeat) gets a fresh registration.
//!
//! This file owns the settings and the start-up sequence; `server.rs` serves the node API,
//! `heartbeat.rs` registers and keeps the node known to the gateway.

mod heartbeat;
mod server;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use clap::Args;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::wire::{Registration, PROTOCOL_VERSION};
use super::{LocalNode, Node};
use crate::client::ApiClient;
use crate::gpu::{GpuDriver, GpuMonitor};
use crate::runtime::{ContainerRuntime, DockerRuntime};

/// `ember agent` settings.
#[derive(Debug, Clone, Args)]
pub struct AgentConfig {
    /// Gateway URL.
    #[arg(long, env = "EMBER_GATEWAY")]
    pub gateway: String,
    /// Join token (the gateway's --join-token).
    #[arg(long, env = "EMBER_JOIN_TOKEN")]
    pub token: String,
    /// Node name (a lower-case DNS label).
    #[arg(long, env = "EMBER_NODE_NAME")]
    pub name: String,
    /// Address the node API listens on.
    #[arg(long, env = "EMBER_AGENT_LISTEN", default_value = "0.0.0.0:8090")]
    pub listen: SocketAddr,
    /// Host or IP the gateway reaches this node and its containers at.
    #[arg(long, env = "EMBER_ADVERTISE")]
    pub advertise: String,
    /// Labels, `k=v,k2=v2`.
    #[arg(long, env = "EMBER_LABELS", value_parser = parse_labels, default_value = "")]
    pub labels: BTreeMap<String, String>,
    /// Declared GPU inventory (simulation mode unless --gpu-driver says otherwise).
    #[arg(long, env = "EMBER_GPU_INVENTORY")]
    pub gpu_inventory: Option<PathBuf>,
    /// How containers get GPUs: nvidia, cdi or simulated.
    #[arg(long, env = "EMBER_GPU_DRIVER", value_enum)]
    pub gpu_driver: Option<GpuDriver>,
    /// Directory for the agent's own files: `agent.json` remembers the gateway it joined,
    /// so joining another one removes the containers the old one left here.
    #[arg(long, env = "EMBER_DATA_DIR", default_value = ".ember-agent")]
    pub data_dir: PathBuf,
}

/// Shortest wait between heartbeats, whatever the gateway asks.
const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);

/// File in the data dir naming the gateway this node last joined.
pub const MEMBERSHIP_FILE: &str = "agent.json";

fn previous_gateway(file: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["gateway_id"].as_str().map(str::to_string)
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

/// Runs the agent until `shutdown`.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    check(&config)?;
    let (runtime, monitor, driver) = setup(&config).await?;
    let listener = bind(config.listen).await?;
    let port = listener.local_addr()?.port();
    let url = format!("http://{}:{port}", config.advertise);
    let client = ApiClient::new(&config.gateway)?;
    let registration = registration(&config, &url, &monitor, driver).await;
    let registered = heartbeat::register(&client, &config.token, &registration, &shutdown).await?;
    let publish_ip = publish_ip(&config.advertise);
    forget_previous_gateway(&config, &registered.gateway_id, publish_ip, &runtime).await;
    remember_gateway(&config, &registered.gateway_id)?;
    let node = Arc::new(
        LocalNode::new(&config.name, &registered.gateway_id, publish_ip, runtime)
            .with_gpus(monitor, driver),
    );
    println!("ember agent {} serving node API on {url}", config.name);
    tracing::info!(node = %config.name, %url, gateway = %config.gateway, "registered with the gateway");
    let token: Arc<str> = config.token.into();
    let interval = Duration::from_millis(registered.heartbeat_ms).max(MIN_HEARTBEAT_INTERVAL);
    let app = server::router(node.clone(), token.clone());
    let beat = heartbeat::run(
        client,
        token,
        node,
        registration,
        interval,
        shutdown.clone(),
    );
    serve(listener, app, beat, shutdown).await
}

/// Refuses settings the agent cannot run with.
fn check(config: &AgentConfig) -> anyhow::Result<()> {
    if let Err(e) = crate::manifest::check_name(&config.name) {
        anyhow::bail!("--name: {e}");
    }
    if config.token.trim().is_empty() {
        anyhow::bail!("--token: expected the gateway's join token");
    }
    Ok(())
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

/// Binds the node API's address.
async fn bind(listen: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))
}

/// What the gateway is told of this node, reachable at `url`.
async fn registration(
    config: &AgentConfig,
    url: &str,
    monitor: &GpuMonitor,
    driver: GpuDriver,
) -> Registration {
    Registration {
        protocol: PROTOCOL_VERSION,
        name: config.name.clone(),
        url: url.to_string(),
        labels: config.labels.clone(),
        gpu_driver: driver,
        gpu_source: monitor.source(),
        gpus: monitor.read().await,
    }
}

/// Where containers are published: the advertised address, so the gateway reaches them
/// (every interface when it is a host name).
fn publish_ip(advertise: &str) -> IpAddr {
    advertise
        .parse::<IpAddr>()
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// Removes the containers a previous gateway started here, if this node joined another.
async fn forget_previous_gateway(
    config: &AgentConfig,
    gateway_id: &str,
    publish_ip: IpAddr,
    runtime: &Arc<dyn ContainerRuntime>,
) {
    let Some(previous) = previous_gateway(&config.data_dir.join(MEMBERSHIP_FILE)) else {
        return;
    };
    if previous == gateway_id {
        return;
    }
    // This machine now belongs to another gateway: what the old one started here would
    // otherwise run forever, since no gateway will ever reconcile it.
    let old = LocalNode::new(&config.name, &previous, publish_ip, runtime.clone());
    let containers = match old.list_managed().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(gateway = %previous, error = %e, "cannot list the containers the gateway this node left; they stay");
            return;
        }
    };
    for c in containers {
        tracing::info!(container = %c.container_id, gateway = %previous, "removing a container of the gateway this node left");
        if let Err(e) = old.stop(&c.container_id).await {
            tracing::warn!(container = %c.container_id, error = %e, "could not remove it");
        }
    }
}

/// Records the gateway this node joined, for `forget_previous_gateway` on the next start.
fn remember_gateway(config: &AgentConfig, gateway_id: &str) -> anyhow::Result<()> {
    let file = config.data_dir.join(MEMBERSHIP_FILE);
    let record = serde_json::json!({ "gateway": config.gateway, "gateway_id": gateway_id });
    std::fs::write(&file, record.to_string())
        .with_context(|| format!("cannot write {}", file.display()))
}

/// Serves the node API while `beat` runs; both end at `shutdown` (the server once its
/// open calls are answered).
async fn serve(
    listener: TcpListener,
    app: Router,
    beat: impl Future<Output = ()>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
    let (served, ()) = tokio::join!(server, beat);
    served?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
