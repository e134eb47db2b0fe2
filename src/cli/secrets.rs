//! `ember secret set / ls / rm`: the secrets manifests name in `env`. `set` reads the value
//! from stdin (or `--from-file`), never from the command line, where it would land in the
//! shell's history and the process list; nothing ever prints a value back.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use bytes::Bytes;
use clap::Subcommand;
use http::Method;

use super::{with_client, GatewayArgs};
use crate::client::{encode, ApiClient};

/// `ember secret ...`.
#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Set a secret (made, or replaced) from stdin, or from a file; one trailing newline
    /// is dropped. Running instances keep the value they started with; new instances get
    /// the new one.
    Set {
        /// Secret name (a-z, 0-9, `-`, `_`, `.`).
        name: String,
        /// Read the value from this file instead of stdin.
        #[arg(long)]
        from_file: Option<PathBuf>,
        /// Where the gateway is.
        #[command(flatten)]
        gateway: GatewayArgs,
    },
    /// List secrets: names, when set, and the functions that use them (never values).
    Ls {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
        /// Where the gateway is.
        #[command(flatten)]
        gateway: GatewayArgs,
    },
    /// Remove a secret (refused while a function's manifest names it).
    Rm {
        /// Secret name.
        name: String,
        /// Where the gateway is.
        #[command(flatten)]
        gateway: GatewayArgs,
    },
}

/// Runs a `secret` command.
pub async fn run(command: SecretCommand, outer: &GatewayArgs) -> anyhow::Result<()> {
    match command {
        SecretCommand::Set {
            name,
            from_file,
            gateway,
        } => {
            let value = read_value(from_file.as_deref())?;
            with_client(gateway, outer, async |c| set(c, &name, value).await).await
        }
        SecretCommand::Ls { json, gateway } => {
            with_client(gateway, outer, async |c| ls(c, json).await).await
        }
        SecretCommand::Rm { name, gateway } => {
            with_client(gateway, outer, async |c| rm(c, &name).await).await
        }
    }
}

/// The value, from the file or stdin, without the one trailing newline `echo` adds.
fn read_value(file: Option<&std::path::Path>) -> anyhow::Result<Vec<u8>> {
    let mut value = match file {
        Some(f) => std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?,
        None => {
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprintln!("reading the secret from stdin; end with Ctrl-D");
            }
            let mut v = Vec::new();
            std::io::stdin()
                .read_to_end(&mut v)
                .context("cannot read the secret from stdin")?;
            v
        }
    };
    if value.ends_with(b"\n") {
        value.pop();
        if value.ends_with(b"\r") {
            value.pop();
        }
    }
    if value.is_empty() {
        anyhow::bail!("the secret is empty: pipe the value in (`printf %s VALUE | ember secret set NAME`) or pass --from-file");
    }
    Ok(value)
}

async fn set(client: &ApiClient, name: &str, value: Vec<u8>) -> anyhow::Result<()> {
    let answer = client
        .call(
            Method::PUT,
            &format!("/api/v1/secrets/{}", encode(name)),
            Some("application/octet-stream"),
            Bytes::from(value),
        )
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&answer)?;
    let verb = if v["created"].as_bool() == Some(true) {
        "set"
    } else {
        "replaced"
    };
    println!("{verb} secret {name}; reference it as `env = {{ VAR = {{ secret = \"{name}\" }} }}`");
    Ok(())
}

async fn ls(client: &ApiClient, json: bool) -> anyhow::Result<()> {
    let v = client.get_json("/api/v1/secrets").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let secrets = v["secrets"].as_array().cloned().unwrap_or_default();
    if secrets.is_empty() {
        println!("no secrets; `printf %s VALUE | ember secret set NAME` sets one");
        return Ok(());
    }
    println!("{:<32} {:<22} USED BY", "NAME", "UPDATED");
    for s in secrets {
        let updated = s["updated_ms"]
            .as_u64()
            .map(|ms| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
            .map_or("?".to_string(), |t| {
                humantime::format_rfc3339_seconds(t).to_string()
            });
        let used: Vec<&str> = s["used_by"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f.as_str())
            .collect();
        let used = if used.is_empty() {
            "-".to_string()
        } else {
            used.join(",")
        };
        println!(
            "{:<32} {updated:<22} {used}",
            s["name"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

async fn rm(client: &ApiClient, name: &str) -> anyhow::Result<()> {
    client
        .call(
            Method::DELETE,
            &format!("/api/v1/secrets/{}", encode(name)),
            None,
            Bytes::new(),
        )
        .await?;
    println!("removed secret {name}");
    Ok(())
}
