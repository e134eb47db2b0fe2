//! The client commands: `deploy`, `ls`, `rm`, `invoke`, `gpus`, `nodes`, `keys`, `login`.
//! Each is a client of the gateway's HTTP API (`client.rs`) that sends the token it finds
//! (login.rs); errors the gateway returns are printed as it wrote them, with the field
//! each one is about.

mod deploy;
mod functions;
pub mod keys;
mod login;
mod nodes;

use clap::Args;

pub use crate::client::{render_api_error, ApiClient, ClientError};
pub use deploy::{build_context_tar, deploy};
pub use functions::{invoke, ls, rm};
pub use keys::NewScope;
pub use login::{is_loopback, login, login_file, Login, Places, Target, TokenSource};
pub use nodes::{gpus, local_gpus, node_action, nodes};

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
}

impl GatewayArgs {
    /// These flags, each falling back to `outer`'s (the ones given before the command).
    pub fn or(self, outer: &GatewayArgs) -> GatewayArgs {
        GatewayArgs {
            gateway: self.gateway.or_else(|| outer.gateway.clone()),
            token: self.token.or_else(|| outer.token.clone()),
        }
    }

    /// Whether any flag was given.
    pub fn any(&self) -> bool {
        self.gateway.is_some() || self.token.is_some()
    }
}
