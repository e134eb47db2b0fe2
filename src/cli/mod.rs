//! The client commands: `deploy` (and `deploy --dry-run`, which needs no gateway), `ls`,
//! `rm`, `invoke`, `logs`, `gpus`, `nodes`, `volumes`, `cp`, `keys`, `secret`, `login`,
//! `history`, `usage`, `jobs`.
//! Each is a client of the gateway's HTTP API (`client.rs`) that sends the token it finds
//! (login.rs); errors the gateway returns are printed as it wrote them, with the field
//! each one is about.

mod deploy;
mod dry_run;
mod functions;
pub mod history;
pub mod jobs;
pub mod keys;
mod login;
pub mod logs;
mod nodes;
mod pull;
pub mod registry;
pub mod secrets;
pub mod volumes;

use clap::Args;

pub use crate::client::{render_api_error, ApiClient, ClientError};
pub use deploy::{build_context_tar, deploy};
pub use dry_run::dry_run;
pub use functions::{invoke, ls, rm};
pub use keys::NewScope;
pub use login::{is_loopback, login, login_file, Login, Places, Target, TokenSource};
pub use nodes::{create_token, gpus, local_gpus, node_action, nodes, remove_node};

/// Runs a client command with a client of the gateway that `flags` (falling back to
/// `outer`), the environment and the saved login name; a 401 says where the token came from.
pub async fn with_client(
    flags: GatewayArgs,
    outer: &GatewayArgs,
    command: impl AsyncFnOnce(&ApiClient) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let target = Target::resolve(&flags.or(outer), &Places::here())?;
    let client = target.client()?;
    command(&client).await.map_err(|e| target.explain(e))
}

/// Default gateway URL of the CLI.
pub const DEFAULT_GATEWAY: &str = "http://127.0.0.1:8080";

/// Where the CLI finds the gateway and its credential. Accepted before the command
/// (`ember --gateway URL ls`) and after it (`ember ls --gateway URL`); after wins.
#[derive(Debug, Clone, Default, Args)]
pub struct GatewayArgs {
    /// Gateway URL [env: EMBER_GATEWAY; default: the saved login's, else http://127.0.0.1:8080].
    #[arg(long)]
    pub gateway: Option<String>,
    /// Admin token or key [env: EMBER_TOKEN; default: the saved login's, else
    /// ./.ember/admin.token for a gateway on loopback].
    #[arg(long)]
    pub token: Option<String>,
    /// Trust an https gateway whose CA has this pin (`ember token create` prints it)
    /// [env: EMBER_CA_PIN; default: the saved login's].
    #[arg(long)]
    pub ca_pin: Option<String>,
    /// Trust an https gateway whose certificate a CA in this PEM file signed
    /// [env: EMBER_CA_FILE].
    #[arg(long)]
    pub ca_file: Option<std::path::PathBuf>,
}

impl GatewayArgs {
    /// These flags, each falling back to `outer`'s (the ones given before the command).
    pub fn or(self, outer: &GatewayArgs) -> GatewayArgs {
        GatewayArgs {
            gateway: self.gateway.or_else(|| outer.gateway.clone()),
            token: self.token.or_else(|| outer.token.clone()),
            ca_pin: self.ca_pin.or_else(|| outer.ca_pin.clone()),
            ca_file: self.ca_file.or_else(|| outer.ca_file.clone()),
        }
    }

    /// Whether any flag was given.
    pub fn any(&self) -> bool {
        self.gateway.is_some()
            || self.token.is_some()
            || self.ca_pin.is_some()
            || self.ca_file.is_some()
    }
}
