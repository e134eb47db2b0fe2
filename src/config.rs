//! Settings of the `serve` process: flags, `EMBER_*` environment variables, defaults.
//! clap parses them; the checks that clap cannot express happen in `ServeConfig::check`,
//! which reports every problem at once.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Args;

use crate::gpu::GpuDriver;
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
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}
