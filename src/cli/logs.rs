//! `ember logs NAME`: a function's output through the gateway, from whichever nodes run
//! its instances, printed as it arrives, each line prefixed by its instance (`[ID] `, or
//! `[ID stderr] ` for stderr). `--previous` prints what removed instances last wrote and
//! why they ended.

use std::io::Write;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use http::Method;
use http_body_util::BodyExt;

use super::GatewayArgs;
use crate::client::{encode, ApiClient, ClientError};

/// `ember logs NAME [--instance ID] [-f] [--since 10m] [--tail 100] [--previous]`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Function name.
    pub name: String,
    /// Only this instance (`ember ls --json` lists them, and each line names its own).
    #[arg(long)]
    pub instance: Option<String>,
    /// Keep printing what the instances write, and what instances that start later
    /// write, until interrupted.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only output from then on: a duration back (`10m`, `1h30m`) or an RFC 3339 time in
    /// UTC (`2025-01-02T15:04:05Z`).
    #[arg(long)]
    pub since: Option<String>,
    /// Lines per instance to start with, or `all`.
    #[arg(long, default_value = "100")]
    pub tail: String,
    /// Start each line with the time the container wrote it.
    #[arg(long)]
    pub timestamps: bool,
    /// What removed instances (crashed, reaped, failed to start) last wrote, and why
    /// each ended.
    #[arg(long, conflicts_with = "follow")]
    pub previous: bool,
    /// Where the gateway is.
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

impl LogsArgs {
    /// The API path with its query.
    fn path(&self) -> String {
        let mut q = vec![format!("tail={}", encode(&self.tail))];
        if let Some(id) = &self.instance {
            q.push(format!("instance={}", encode(id)));
        }
        if let Some(since) = &self.since {
            q.push(format!("since={}", encode(since)));
        }
        for (set, name) in [
            (self.follow, "follow"),
            (self.timestamps, "timestamps"),
            (self.previous, "previous"),
        ] {
            if set {
                q.push(format!("{name}=true"));
            }
        }
        format!(
            "/api/v1/functions/{}/logs?{}",
            encode(&self.name),
            q.join("&")
        )
    }
}

/// Prints the function's logs as they arrive.
pub async fn logs(client: &ApiClient, args: &LogsArgs) -> anyhow::Result<()> {
    let resp = client
        .send(Method::GET, &args.path(), &[], Bytes::new())
        .await?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let body = body
            .collect()
            .await
            .map_err(|e| ClientError::Read(e.to_string()))?
            .to_bytes();
        return Err(ClientError::Api { status, body }.into());
    }
    let mut out = std::io::stdout().lock();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("the log stream broke off")?;
        if let Some(data) = frame.data_ref() {
            out.write_all(data)?;
            out.flush()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        logs: LogsArgs,
    }

    #[test]
    fn flags_become_the_query() {
        let cli = Cli::parse_from(["logs", "echo", "-f", "--since", "10m", "--instance", "a1"]);
        assert_eq!(
            cli.logs.path(),
            "/api/v1/functions/echo/logs?tail=100&instance=a1&since=10m&follow=true"
        );
        let cli = Cli::parse_from(["logs", "echo", "--previous", "--tail", "all"]);
        assert_eq!(
            cli.logs.path(),
            "/api/v1/functions/echo/logs?tail=all&previous=true"
        );
    }

    #[test]
    fn previous_and_follow_do_not_go_together() {
        assert!(Cli::try_parse_from(["logs", "echo", "-f", "--previous"]).is_err());
    }
}
