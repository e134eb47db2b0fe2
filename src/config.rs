//! Settings of the `serve` process: flags, `EMBER_*` environment variables, defaults.
//! clap parses them; the checks that clap cannot express happen in `ServeConfig::check`,
//! which reports every problem at once.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Args;

use crate::gpu::GpuDriver;
use crate::node::local::Endpoints;

fn default_endpoints() -> Endpoints {
    if cfg!(target_os = "linux") {
        Endpoints::Direct
    } else {
        Endpoints::Published
    }
}
use crate::scheduler::{Policy, DEFAULT_MAX_SHARERS};

/// Default gateway address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default data dir.
pub const DEFAULT_DATA_DIR: &str = ".ember";

/// `ember serve` settings.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address the gateway listens on (port 0 picks a free one).
    #[arg(long, env = "EMBER_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Directory of the gateway's state (sled).
    #[arg(long, env = "EMBER_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Name of the embedded local node.
    #[arg(long, env = "EMBER_NODE_NAME", default_value = "local")]
    pub node_name: String,
    /// Host address the embedded node publishes container ports on.
    #[arg(long, env = "EMBER_NODE_ADDRESS", default_value = "127.0.0.1")]
    pub node_address: IpAddr,
    /// How the gateway reaches the embedded node's containers: direct (the container's
    /// bridge address, no userland proxy; the default on Linux) or published (the port
    /// published on --node-address).
    #[arg(long, env = "EMBER_NODE_ENDPOINTS", value_enum, default_value_t = default_endpoints())]
    pub node_endpoints: Endpoints,
    /// Declared GPU inventory (TOML) of the embedded node; puts it in simulation mode
    /// unless --gpu-driver says otherwise. Without it the node asks NVML.
    #[arg(long, env = "EMBER_GPU_INVENTORY")]
    pub gpu_inventory: Option<PathBuf>,
    /// How containers get GPUs: nvidia (device request), cdi, or simulated (env only).
    /// Default: simulated with --gpu-inventory, nvidia otherwise.
    #[arg(long, env = "EMBER_GPU_DRIVER", value_enum)]
    pub gpu_driver: Option<GpuDriver>,
    /// Most instances sharing one GPU (sharing = "shared").
    #[arg(long, env = "EMBER_GPU_MAX_SHARERS", default_value_t = DEFAULT_MAX_SHARERS)]
    pub gpu_max_sharers: u32,
    /// Join token agents must present (`ember agent --token`); without it no agent can join.
    #[arg(long, env = "EMBER_JOIN_TOKEN")]
    pub join_token: Option<String>,
    /// Run no embedded node: schedule only onto agents.
    #[arg(long, env = "EMBER_NO_LOCAL_NODE")]
    pub no_local_node: bool,
    /// A node not heard from for this long is lost and its instances replaced elsewhere.
    #[arg(long, env = "EMBER_NODE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub node_timeout: std::time::Duration,
    /// How often agents send heartbeats.
    #[arg(long, env = "EMBER_HEARTBEAT_INTERVAL", value_parser = humantime::parse_duration, default_value = "1s")]
    pub heartbeat_interval: std::time::Duration,
    /// Most requests waiting for an instance across all functions; more answer 503.
    #[arg(long, env = "EMBER_MAX_QUEUED", default_value_t = 10_000)]
    pub max_queued: usize,
    /// Most body bytes (announced lengths, 64 KiB for unknown ones) of waiting requests.
    #[arg(long, env = "EMBER_MAX_QUEUED_BYTES", default_value = "256MiB")]
    pub max_queued_bytes: bytesize::ByteSize,
    /// Placement policy: spread (least loaded first) or binpack.
    #[arg(long, env = "EMBER_PLACEMENT", value_enum, default_value_t = Policy::Spread)]
    pub placement: Policy,
}

impl ServeConfig {
    /// Checks what clap cannot; returns every problem.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if crate::manifest::check_name(&self.node_name).is_err() {
            problems.push(format!(
                "--node-name `{}`: expected a lower-case DNS label (a-z, 0-9, `-`)",
                self.node_name
            ));
        }
        if self.node_address.is_unspecified() {
            problems.push(
                "--node-address: expected an address the gateway can reach containers on, \
                 not 0.0.0.0 or ::"
                    .into(),
            );
        }
        if self.gpu_max_sharers == 0 {
            problems.push("--gpu-max-sharers: expected at least 1".into());
        }
        if let Some(path) = &self.gpu_inventory {
            if !path.is_file() {
                problems.push(format!("--gpu-inventory {}: no such file", path.display()));
            }
        }
        if self
            .join_token
            .as_deref()
            .is_some_and(|t| t.trim().len() < 8)
        {
            problems.push("--join-token: expected at least 8 characters".into());
        }
        if self.heartbeat_interval * 2 > self.node_timeout {
            problems.push(format!(
                "--node-timeout {}: expected at least twice --heartbeat-interval ({})",
                humantime::format_duration(self.node_timeout),
                humantime::format_duration(self.heartbeat_interval)
            ));
        }
        if self.no_local_node && self.join_token.is_none() {
            problems.push(
                "--no-local-node needs --join-token: without either there is no node to run on"
                    .into(),
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}
