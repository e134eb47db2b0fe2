//! `ember registry login / ls / logout`: the logins nodes pull private images with. The
//! password is read from stdin (`--password-stdin`), never from the command line, where it
//! would land in the shell's history and the process list; nothing prints it back.

use std::io::Read;

use anyhow::Context;
use bytes::Bytes;
use clap::Subcommand;
use http::Method;

use super::{with_client, GatewayArgs};
use crate::client::{encode, ApiClient};

/// `ember registry ...`.
#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Store a login for a registry (replacing one stored before); every node's pull of an
    /// image from HOST uses it.
    Login {
        /// The registry as images name it: `ghcr.io`, `registry.example.com:5000`,
        /// `docker.io`.
        host: String,
        /// User name.
        #[arg(long, short = 'u')]
        username: String,
        /// Read the password (or access token) from stdin. Required: a password on the
        /// command line would be in the shell's history.
        #[arg(long, required = true)]
        password_stdin: bool,
        /// Where the gateway is.
        #[command(flatten)]
        gateway: GatewayArgs,
    },
    /// List stored logins: hosts and user names (never passwords).
    Ls {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
        /// Where the gateway is.
        #[command(flatten)]
        gateway: GatewayArgs,
    },
    /// Forget a registry's login.
    Logout {
        /// The registry.
        host: String,
        /// Where the gateway is.
        #[command(flatten)]
        gateway: GatewayArgs,
    },
}

/// Runs a `registry` command.
pub async fn run(command: RegistryCommand, outer: &GatewayArgs) -> anyhow::Result<()> {
    match command {
        RegistryCommand::Login {
            host,
            username,
            password_stdin: _,
            gateway,
        } => {
            let password = read_password()?;
            with_client(gateway, outer, async |c| {
                login(c, &host, &username, password).await
            })
            .await
        }
        RegistryCommand::Ls { json, gateway } => {
            with_client(gateway, outer, async |c| ls(c, json).await).await
        }
        RegistryCommand::Logout { host, gateway } => {
            with_client(gateway, outer, async |c| {
                let path = format!("/api/v1/registries/{}", encode(&host));
                client_delete(c, &path).await?;
                println!("forgot the login for {host}");
                Ok(())
            })
            .await
        }
    }
}

fn read_password() -> anyhow::Result<String> {
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        eprintln!("reading the password from stdin; end with Ctrl-D");
    }
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("cannot read the password from stdin (is it UTF-8 text?)")?;
    let password = text.strip_suffix('\n').unwrap_or(&text);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        anyhow::bail!("the password is empty: pipe it in (`printf %s TOKEN | ember registry login HOST -u USER --password-stdin`)");
    }
    Ok(password.to_string())
}

async fn login(
    client: &ApiClient,
    host: &str,
    username: &str,
    password: String,
) -> anyhow::Result<()> {
    let body = serde_json::json!({ "username": username, "password": password });
    let answer = client
        .call(
            Method::PUT,
            &format!("/api/v1/registries/{}", encode(host)),
            Some("application/json"),
            Bytes::from(body.to_string()),
        )
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&answer)?;
    let stored_as = v["host"].as_str().unwrap_or(host);
    println!("stored the login of {username} for {stored_as}; pulls of {stored_as}/... images use it (checked at the first pull)");
    Ok(())
}

async fn client_delete(client: &ApiClient, path: &str) -> anyhow::Result<()> {
    client
        .call(Method::DELETE, path, None, Bytes::new())
        .await?;
    Ok(())
}

async fn ls(client: &ApiClient, json: bool) -> anyhow::Result<()> {
    let v = client.get_json("/api/v1/registries").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let logins = v["registries"].as_array().cloned().unwrap_or_default();
    if logins.is_empty() {
        println!(
            "no registry logins; `ember registry login HOST -u USER --password-stdin` stores one"
        );
        return Ok(());
    }
    println!("{:<40} USERNAME", "REGISTRY");
    for l in logins {
        println!(
            "{:<40} {}",
            l["host"].as_str().unwrap_or("?"),
            l["username"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}
