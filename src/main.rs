//! The `ember` binary: parse the command line, dispatch to the gateway or the CLI.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use ember::cli::{self, with_client, GatewayArgs, NewScope};
use ember::config::ServeConfig;

/// mimalloc instead of glibc's malloc: per request, the gateway allocates and frees a few
/// dozen small blocks (headers, the history record, futures), and glibc's allocator took a
/// fifth of the warm path's user-space instructions (README, Performance).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Ember: scale-to-zero functions on your own GPU machines.
#[derive(Parser)]
#[command(name = "ember", version, about)]
struct Cli {
    /// The client commands' gateway and token, given before the command.
    #[command(flatten)]
    client: GatewayArgs,
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
        /// Check the manifest here, as the gateway would, and print the revision id and a
        /// summary of what deploying it would make; deploys and builds nothing and needs no
        /// gateway (whether the image is on the nodes and whether a node can meet [gpu] are
        /// checked only by a deploy). Exits non-zero, naming each field, when invalid.
        #[arg(long)]
        dry_run: bool,
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
    /// The invocation history, newest first: where each request ran (instance, node, GPU),
    /// its status, whether it waited for a cold start, and how long it took.
    History {
        #[command(flatten)]
        args: cli::history::HistoryArgs,
        #[command(flatten)]
        gateway: GatewayArgs,
    },
    /// GPU time per function, node or GPU: allocated (paused apart), busy, their ratio,
    /// invocations and cold starts.
    Usage {
        #[command(flatten)]
        args: cli::history::UsageArgs,
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
    /// List nodes: state, labels, GPUs, instances, last heartbeat; `nodes rm NAME`
    /// removes one.
    Nodes {
        #[command(subcommand)]
        command: Option<NodesCommand>,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        gateway: GatewayArgs,
    },
    /// Make join tokens for agents.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
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
    /// Print a function's output (its instances' stdout and stderr, from any node);
    /// `-f` follows it, `--previous` shows what removed instances last wrote and why.
    Logs(cli::logs::LogsArgs),
    /// Durable jobs: `submit` (stored before it returns; `--wait` follows it), `ls`, `get`,
    /// `result`, `cancel`, `retry`.
    Jobs(cli::jobs::JobsArgs),
    /// List each node's volumes with their size on disk.
    Volumes(cli::volumes::VolumesArgs),
    /// Copy a file into a node volume: `ember cp FILE NODE:VOLUME/PATH`.
    Cp(cli::volumes::CpArgs),
    /// Store, list and forget the registry logins nodes pull private images with.
    Registry {
        #[command(subcommand)]
        command: cli::registry::RegistryCommand,
    },
    /// Set, list and remove secrets that manifests name in `env`.
    Secret {
        #[command(subcommand)]
        command: cli::secrets::SecretCommand,
    },
    /// Make, list and revoke keys for private functions and for the control API.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Check a gateway's admin token (or admin key) and save both for later commands.
    Login {
        /// Gateway URL.
        url: String,
        /// The admin token (the gateway's DATA_DIR/admin.token) or an admin key
        /// [env: EMBER_TOKEN].
        #[arg(long)]
        token: Option<String>,
    },
}

#[derive(Subcommand)]
enum NodesCommand {
    /// Remove an agent's node: its credential is revoked and its tunnel closed at once;
    /// its instances move elsewhere. It needs a new join token to come back.
    Rm {
        /// Node name.
        name: String,
        #[command(flatten)]
        gateway: GatewayArgs,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a join token; printed this once, with the gateway's CA pin when it serves
    /// HTTPS, and the `ember agent` command that uses them.
    Create {
        /// How long the token works.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
        ttl: std::time::Duration,
        #[command(flatten)]
        gateway: GatewayArgs,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make a key; its secret is printed this once.
    #[command(group = clap::ArgGroup::new("scope").required(true).args(["invoke", "admin"]))]
    Create {
        /// The key's name (a lower-case DNS label).
        #[arg(long)]
        name: String,
        /// Functions the key may invoke, comma-separated; `*` for all.
        #[arg(long, value_delimiter = ',')]
        invoke: Vec<String>,
        /// The key may do anything the admin token may.
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        gateway: GatewayArgs,
    },
    /// List keys: names, scopes, when made (never the keys).
    Ls {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        gateway: GatewayArgs,
    },
    /// Revoke a key: it fails from its next request on.
    Revoke {
        /// Key name.
        name: String,
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
    match runtime.block_on(dispatch(cli.command, cli.client)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<ember::node::agent::Refused>().is_some() {
                return ExitCode::from(ember::node::agent::REFUSED_EXIT_CODE);
            }
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command, outer: GatewayArgs) -> anyhow::Result<()> {
    let outer = &outer;
    match command {
        Command::Serve(config) => {
            no_client_flags(outer, "serve")?;
            init_tracing();
            if let Err(problems) = config.check() {
                anyhow::bail!("bad settings:\n  {}", problems.join("\n  "));
            }
            let shutdown = CancellationToken::new();
            until_signal(ember::gateway::run(config, shutdown.clone()), shutdown).await
        }
        Command::Agent(config) => {
            no_client_flags(outer, "agent")?;
            init_tracing();
            let shutdown = CancellationToken::new();
            until_signal(ember::node::agent::run(config, shutdown.clone()), shutdown).await
        }
        Command::Nodes {
            command: None,
            json,
            gateway,
        } => with_client(gateway, outer, async |c| cli::nodes(c, json).await).await,
        Command::Nodes {
            command: Some(NodesCommand::Rm { name, gateway }),
            ..
        } => with_client(gateway, outer, async |c| cli::remove_node(c, &name).await).await,
        Command::Token {
            command: TokenCommand::Create { ttl, gateway },
        } => with_client(gateway, outer, async |c| cli::create_token(c, ttl).await).await,
        Command::Cordon { name, gateway } => {
            with_client(gateway, outer, async |c| {
                cli::node_action(c, &name, "cordon").await
            })
            .await
        }
        Command::Uncordon { name, gateway } => {
            with_client(gateway, outer, async |c| {
                cli::node_action(c, &name, "uncordon").await
            })
            .await
        }
        Command::Drain { name, gateway } => {
            with_client(gateway, outer, async |c| {
                cli::node_action(c, &name, "drain").await
            })
            .await
        }
        Command::Deploy {
            path,
            dry_run: true,
            ..
        } => cli::dry_run(&path),
        Command::Deploy { path, gateway, .. } => {
            with_client(gateway, outer, async |c| cli::deploy(c, &path).await).await
        }
        Command::Ls { json, gateway } => {
            with_client(gateway, outer, async |c| cli::ls(c, json).await).await
        }
        Command::History { args, gateway } => {
            with_client(gateway, outer, async |c| {
                cli::history::history(c, args).await
            })
            .await
        }
        Command::Usage { args, gateway } => {
            with_client(gateway, outer, async |c| cli::history::usage(c, args).await).await
        }
        Command::Gpus {
            json,
            local,
            gpu_inventory,
            gateway,
        } => {
            if local {
                cli::local_gpus(gpu_inventory.as_deref(), json).await
            } else {
                with_client(gateway, outer, async |c| cli::gpus(c, json).await).await
            }
        }
        Command::Rm { name, gateway } => {
            with_client(gateway, outer, async |c| cli::rm(c, &name).await).await
        }
        Command::Invoke {
            name,
            path,
            data,
            method,
            headers,
            gateway,
        } => {
            with_client(gateway, outer, async |c| {
                let (path, data, method) = (path.as_deref(), data.as_deref(), method.as_deref());
                cli::invoke(c, &name, path, data, method, &headers).await
            })
            .await
        }
        Command::Keys { command } => keys(command, outer).await,
        Command::Secret { command } => cli::secrets::run(command, outer).await,
        Command::Registry { command } => cli::registry::run(command, outer).await,
        Command::Jobs(a) => {
            with_client(a.gateway.clone(), outer, async |c| {
                cli::jobs::jobs(c, a.command.clone()).await
            })
            .await
        }
        Command::Logs(a) => {
            with_client(a.gateway.clone(), outer, async |c| {
                cli::logs::logs(c, &a).await
            })
            .await
        }
        Command::Volumes(a) => {
            with_client(a.gateway, outer, async |c| {
                cli::volumes::volumes(c, a.json).await
            })
            .await
        }
        Command::Cp(a) => {
            with_client(a.gateway, outer, async |c| {
                cli::volumes::cp(c, &a.file, &a.target).await
            })
            .await
        }
        Command::Login { url, token } => {
            if outer.gateway.is_some() {
                anyhow::bail!("`ember login URL` takes the gateway as its argument, not --gateway");
            }
            let flags = GatewayArgs {
                token: token.or_else(|| outer.token.clone()),
                ..outer.clone()
            };
            cli::login(&url, &flags, &cli::Places::here()).await
        }
    }
}

async fn keys(command: KeysCommand, outer: &GatewayArgs) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create {
            name,
            invoke,
            admin,
            gateway,
        } => {
            let scope = if admin {
                NewScope::Admin
            } else {
                NewScope::Invoke(invoke)
            };
            with_client(gateway, outer, async |c| {
                cli::keys::create(c, &name, scope).await
            })
            .await
        }
        KeysCommand::Ls { json, gateway } => {
            with_client(gateway, outer, async |c| cli::keys::ls(c, json).await).await
        }
        KeysCommand::Revoke { name, gateway } => {
            with_client(gateway, outer, async |c| cli::keys::revoke(c, &name).await).await
        }
    }
}

/// Refuses the client flags before a command that is not a client, rather than ignoring them.
fn no_client_flags(outer: &GatewayArgs, command: &str) -> anyhow::Result<()> {
    if outer.any() {
        anyhow::bail!(
            "--gateway and --token before the command are for client commands; `ember {command}` takes its own flags (see `ember {command} --help`)"
        );
    }
    Ok(())
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
    // bollard logs whole request and response bodies at debug, the environment of every
    // container created included, secrets among it: never below info, whatever is asked.
    let filter = filter.add_directive("bollard=info".parse().expect("a static directive"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
