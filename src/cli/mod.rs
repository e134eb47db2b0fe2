//! The client commands: `deploy`, `ls`, `rm`, `invoke`, `gpus`. Each is a client of the gateway's
//! HTTP API (`client.rs`); errors the gateway returns are printed as it wrote them,
//! with the field each one is about.

mod deploy;
mod functions;
mod nodes;

use clap::Args;

pub use crate::client::{render_api_error, ApiClient, ClientError};
pub use deploy::{build_context_tar, deploy};
pub use functions::{invoke, ls, rm};
pub use nodes::{gpus, local_gpus, node_action, nodes};

/// Default gateway URL of the CLI.
pub const DEFAULT_GATEWAY: &str = "http://127.0.0.1:8080";

/// Where the CLI finds the gateway.
#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// Gateway URL.
    #[arg(long, env = "EMBER_GATEWAY", default_value = DEFAULT_GATEWAY, global = true)]
    pub gateway: String,
}
