//! The `ember` binary: parse the command line, dispatch to the gateway or the CLI.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use ember::cli::{self, ApiClient, GatewayArgs};
use ember::config::ServeConfig;

/// Ember: scale-to-zero functions on your own GPU machines.
#[derive(Parser)]
#[command(name = "ember", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (with an embedded local node on this machine's Docker engine).
    Serve(ServeConfig),
    /// Run a node agent: join a gateway and run its instances on this machine's Docker.
    Agent(ember::node::agent::AgentConfig),
    /// Deploy a function from a manifest file or a folder holding ember.toml.
    Deploy {
        /// Manifest file or folder.
        path: PathBuf,
        #[command(flatten)]
        gateway: GatewayArgs,
    },
    /// List functions with their revision, instances, in-flight and queued requests.
    Ls {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        gateway: GatewayArgs,
    },
    /// Remove a function and its containers.
    Rm {
        /// Function name.
        name: String,
        #[command(flatten)]
        gateway: GatewayArgs,
    },
    /// List nodes: state, labels, GPUs, instances, last heartbeat.
    Nodes {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        gateway: GatewayArgs,
    },
    /// Stop new placements on a node.
    Cordon {
        /// Node name.
        name: String,
        #[command(flatten)]
        gateway: GatewayArgs,
    },
    /// Allow placements on a node again.
    Uncordon {
        /// Node name.
        name: String,
        #[command(flatten)]
        gateway: GatewayArgs,
    },
    /// Move a node's traffic away: replacements elsewhere first, then its instances stop.
    Drain {
        /// Node name.
        name: String,
        #[command(flatten)]
        gateway: GatewayArgs,
    },
    /// Show the GPUs of every node, with Ember's reservations on them.
    Gpus {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
        /// Read this machine's GPUs here (NVML) instead of asking the gateway.
        #[arg(long)]
        local: bool,
        /// With --local: read this declared inventory instead of NVML.
        #[arg(long, requires = "local")]
        gpu_inventory: Option<PathBuf>,
        #[command(flatten)]
        gateway: GatewayArgs,
    },
    /// Send a request to a function and print its answer.
    Invoke {
        /// Function name.
        name: String,
        /// Path after /fn/NAME (default /).
        path: Option<String>,
        /// Request body (`@FILE` reads a file); makes the method POST.
        #[arg(short = 'd', long = "data")]
        data: Option<String>,
        /// HTTP method.
        #[arg(short = 'X', long = "request")]
        method: Option<String>,
        /// Extra header, `Name: value` (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        #[command(flatten)]
        gateway: GatewayArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(config) => {
            init_tracing();
            if let Err(problems) = config.check() {
                anyhow::bail!("bad settings:\n  {}", problems.join("\n  "));
            }
            let shutdown = CancellationToken::new();
            until_signal(ember::gateway::run(config, shutdown.clone()), shutdown).await
        }
        Command::Agent(config) => {
            init_tracing();
            let shutdown = CancellationToken::new();
            until_signal(ember::node::agent::run(config, shutdown.clone()), shutdown).await
        }
        Command::Nodes { json, gateway } => {
            cli::nodes(&ApiClient::new(&gateway.gateway)?, json).await
        }
        Command::Cordon { name, gateway } => {
            cli::node_action(&ApiClient::new(&gateway.gateway)?, &name, "cordon").await
        }
        Command::Uncordon { name, gateway } => {
            cli::node_action(&ApiClient::new(&gateway.gateway)?, &name, "uncordon").await
        }
        Command::Drain { name, gateway } => {
            cli::node_action(&ApiClient::new(&gateway.gateway)?, &name, "drain").await
        }
        Command::Deploy { path, gateway } => {
            cli::deploy(&ApiClient::new(&gateway.gateway)?, &path).await
        }
        Command::Ls { json, gateway } => cli::ls(&ApiClient::new(&gateway.gateway)?, json).await,
        Command::Gpus {
            json,
            local,
            gpu_inventory,
            gateway,
        } => {
            if local {
                cli::local_gpus(gpu_inventory.as_deref(), json).await
            } else {
                cli::gpus(&ApiClient::new(&gateway.gateway)?, json).await
            }
        }
        Command::Rm { name, gateway } => cli::rm(&ApiClient::new(&gateway.gateway)?, &name).await,
        Command::Invoke {
            name,
            path,
            data,
            method,
            headers,
            gateway,
        } => {
            cli::invoke(
                &ApiClient::new(&gateway.gateway)?,
                &name,
                path.as_deref(),
                data.as_deref(),
                method.as_deref(),
                &headers,
            )
            .await
        }
    }
}

/// Runs `work`; a SIGINT or SIGTERM cancels `shutdown`, and `work` then ends gracefully.
async fn until_signal(
    work: impl std::future::Future<Output = anyhow::Result<()>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tokio::pin!(work);
    tokio::select! {
        result = &mut work => return result,
        () = ember::gateway::cancel_on_signal(shutdown) => {}
    }
    work.await
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("EMBER_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
