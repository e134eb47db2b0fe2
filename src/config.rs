//! Settings of the `serve` process: flags, `EMBER_*` environment variables, defaults.
//! clap parses them; the checks that clap cannot express happen in `ServeConfig::check`,
//! which reports every problem at once.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Args;

use crate::gpu::GpuDriver;
use crate::node::local::Endpoints;
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
    #[arg(long, env = "EMBER_NODE_ENDPOINTS", value_enum, default_value_t = Endpoints::platform_default())]
    pub node_endpoints: Endpoints,
    /// Declared GPU inventory (TOML) of the embedded node; puts it in simulation mode
    /// unless --gpu-driver says otherwise. Without it the node asks NVML.
    #[arg(long, env = "EMBER_GPU_INVENTORY")]
    pub gpu_inventory: Option<PathBuf>,
    /// How containers get GPUs: nvidia (device request), cdi, or simulated (env only).
    /// Default: simulated with --gpu-inventory, nvidia otherwise.
    #[arg(long, env = "EMBER_GPU_DRIVER", value_enum)]
    pub gpu_driver: Option<GpuDriver>,
    /// Directories the embedded node lends to functions by name, `NAME=PATH` (repeatable,
    /// or comma-separated in the variable); `[[volumes]] source = "NAME"` mounts one. The
    /// node also has the directories under DATA_DIR/volumes.
    #[arg(long = "volume", env = "EMBER_VOLUMES", value_delimiter = ',', value_parser = crate::node::volumes::parse_exposed)]
    pub volumes: Vec<(String, PathBuf)>,
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
    /// Serve HTTPS with a certificate Ember makes: a CA kept in the data dir (its pin is
    /// logged, and printed by `ember token create`) and a server certificate for
    /// --tls-san. Or give your own with --tls-cert and --tls-key.
    #[arg(long, env = "EMBER_TLS", value_enum, conflicts_with_all = ["tls_cert", "tls_key"])]
    pub tls: Option<TlsMode>,
    /// PEM certificate chain to serve HTTPS with (with --tls-key).
    #[arg(long, env = "EMBER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "EMBER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Names and addresses the self-signed certificate is valid for, besides localhost,
    /// 127.0.0.1 and ::1 (how agents and clients reach the gateway), `a,b,...`.
    #[arg(long, env = "EMBER_TLS_SAN", value_delimiter = ',')]
    pub tls_san: Vec<String>,
    /// Time a client has to send a request head (and an idle keep-alive connection may
    /// stay open).
    #[arg(long, env = "EMBER_HEADER_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub header_timeout: std::time::Duration,
    /// Client connections open at once; more are closed as they arrive. Default: three
    /// quarters of the process's open-file limit.
    #[arg(long, env = "EMBER_MAX_CONNECTIONS", default_value_t = default_max_connections())]
    pub max_connections: usize,
    /// A second address serving one ComfyUI function at the root (`/prompt`, `/ws`...),
    /// for clients that take only `host:port`; needs --comfyui-function.
    #[arg(long, env = "EMBER_COMFYUI_LISTEN", requires = "comfyui_function")]
    pub comfyui_listen: Option<SocketAddr>,
    /// Serve `/metrics` without the admin token (for a Prometheus on a trusted network).
    #[arg(long, env = "EMBER_METRICS_PUBLIC")]
    pub metrics_public: bool,
    /// Invocation records kept at the most (the oldest go first); 0 keeps no history.
    #[arg(long, env = "EMBER_HISTORY_MAX", default_value_t = 1_000_000)]
    pub history_max: usize,
    /// Invocation and allocation records older than this are removed.
    #[arg(long, env = "EMBER_HISTORY_MAX_AGE", value_parser = humantime::parse_duration, default_value = "30d")]
    pub history_max_age: std::time::Duration,
    /// How long an ended job's input and answer are kept; its result is 410 after that.
    #[arg(long, env = "EMBER_JOB_RESULTS_KEEP", value_parser = humantime::parse_duration, default_value = "24h")]
    pub job_results_keep: std::time::Duration,
    /// Hosts job callbacks may reach though they are private or loopback addresses
    /// (`a,b,...`); others must resolve to public addresses.
    #[arg(long, env = "EMBER_CALLBACK_ALLOW", value_delimiter = ',')]
    pub callback_allow: Vec<String>,
    /// The function (with a `[comfyui]` section) that --comfyui-listen serves.
    #[arg(long, env = "EMBER_COMFYUI_FUNCTION", requires = "comfyui_listen")]
    pub comfyui_function: Option<String>,
}

/// Files the process keeps for itself (store, Docker, logs) below its limit.
const RESERVED_FILES: u64 = 128;

/// A default for `--max-connections`: three quarters of the process's open-file limit
/// (less a reserve for the gateway's own files), or 10,000 where the limit is unknown.
pub fn default_max_connections() -> usize {
    let limit = open_file_limit().unwrap_or(13_500);
    (limit.saturating_sub(RESERVED_FILES) * 3 / 4).max(16) as usize
}

/// The soft limit on open files, from /proc on Linux.
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// How the gateway gets its TLS certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsMode {
    /// Make a CA in the data dir and a server certificate signed by it.
    SelfSigned,
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
        if self.header_timeout < std::time::Duration::from_millis(100) {
            problems.push("--header-timeout: expected at least 100ms".into());
        }
        if let Some(name) = &self.comfyui_function {
            if crate::manifest::check_name(name).is_err() {
                problems.push(format!(
                    "--comfyui-function `{name}`: expected a function name (a lower-case DNS label)"
                ));
            }
        }
        if self.max_connections == 0 {
            problems.push("--max-connections: expected at least 1".into());
        }
        for path in [&self.tls_cert, &self.tls_key].into_iter().flatten() {
            if !path.is_file() {
                problems.push(format!(
                    "{}: no such file (--tls-cert/--tls-key)",
                    path.display()
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_connection_cap_stays_below_the_open_file_limit() {
        let cap = default_max_connections() as u64;
        if let Some(limit) = open_file_limit() {
            assert!(cap < limit, "{cap} < {limit}");
        }
        assert!(cap >= 16);
    }
}
