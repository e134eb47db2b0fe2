//! `ember jobs`: submit a job, follow it, read its result; list, cancel and retry jobs.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, Subcommand};
use http::Method;

use super::GatewayArgs;
use crate::client::ApiClient;

/// `ember jobs ...`.
#[derive(Debug, Clone, Args)]
pub struct JobsArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: JobsCommand,
    /// Which gateway, with which token.
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

/// What `ember jobs` does.
#[derive(Debug, Clone, Subcommand)]
pub enum JobsCommand {
    /// Submit a job: stored before this returns, run when an instance is free.
    Submit {
        /// Function name.
        name: String,
        /// The input (`@FILE` reads a file).
        #[arg(short = 'd', long = "data")]
        data: Option<String>,
        /// The path the function is sent (default /).
        #[arg(long)]
        path: Option<String>,
        /// The input's content type.
        #[arg(long)]
        content_type: Option<String>,
        /// A key that makes a retried submit return the same job.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Wait for the job to end (a progress line on stderr), then print its result.
        #[arg(long)]
        wait: bool,
    },
    /// List jobs, newest first.
    Ls {
        /// Only this function's.
        #[arg(long)]
        function: Option<String>,
        /// Only in this state (queued, running, succeeded, failed, cancelled, expired).
        #[arg(long)]
        state: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// A job's record.
    Get {
        /// Job id.
        id: String,
    },
    /// A finished job's result: the function's answer body (to stdout, or `-o FILE`).
    Result {
        /// Job id.
        id: String,
        /// Write it to this file.
        #[arg(short = 'o', long)]
        output: Option<std::path::PathBuf>,
    },
    /// Cancel a job (a running one's request is dropped).
    Cancel {
        /// Job id.
        id: String,
    },
    /// Run a failed, expired or cancelled job again.
    Retry {
        /// Job id.
        id: String,
    },
}

/// Runs `ember jobs`.
pub async fn jobs(client: &ApiClient, command: JobsCommand) -> anyhow::Result<()> {
    match command {
        JobsCommand::Submit {
            name,
            data,
            path,
            content_type,
            idempotency_key,
            wait,
        } => {
            let body = match data.as_deref() {
                Some(d) if d.starts_with('@') => Bytes::from(
                    std::fs::read(&d[1..]).with_context(|| format!("cannot read -d {d}"))?,
                ),
                Some(d) => Bytes::from(d.to_string()),
                None => Bytes::new(),
            };
            let mut query = form_urlencoded::Serializer::new(String::new());
            if let Some(p) = &path {
                query.append_pair("path", p);
            }
            let mut headers = Vec::new();
            if let Some(ct) = content_type {
                headers.push(("content-type".to_string(), ct));
            }
            if let Some(k) = idempotency_key {
                headers.push(("idempotency-key".to_string(), k));
            }
            let url = format!("/api/v1/functions/{name}/jobs?{}", query.finish());
            let job = read_json(client.send(Method::POST, &url, &headers, body).await?).await?;
            let id = job["id"].as_str().unwrap_or_default().to_string();
            if !wait {
                println!("{id}");
                return Ok(());
            }
            eprintln!("job {id} submitted");
            let done = follow(client, &id).await?;
            if done["state"] != "succeeded" {
                anyhow::bail!(
                    "job {id} ended {}: {}",
                    done["state"].as_str().unwrap_or("?"),
                    done["error"].as_str().unwrap_or("")
                );
            }
            result(client, &id, None).await
        }
        JobsCommand::Ls {
            function,
            state,
            limit,
            json,
        } => {
            let mut query = form_urlencoded::Serializer::new(String::new());
            for (k, v) in [("function", function), ("state", state)] {
                if let Some(v) = v {
                    query.append_pair(k, &v);
                }
            }
            query.append_pair("limit", &limit.min(1000).to_string());
            let v = client
                .get_json(&format!("/api/v1/jobs?{}", query.finish()))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!(
                "{:<16} {:<24} {:<10} {:>7} {:>6}  {:<12} {:<10} ERROR",
                "ID", "FUNCTION", "STATE", "ATTEMPT", "STATUS", "INSTANCE", "NODE"
            );
            for j in v["jobs"].as_array().into_iter().flatten() {
                println!(
                    "{:<16} {:<24} {:<10} {:>7} {:>6}  {:<12} {:<10} {}",
                    j["id"].as_str().unwrap_or("?"),
                    j["function"].as_str().unwrap_or("?"),
                    j["state"].as_str().unwrap_or("?"),
                    format!("{}/{}", j["attempt"], j["max_attempts"]),
                    j["status"].as_u64().map_or("-".into(), |s| s.to_string()),
                    j["instance"].as_str().unwrap_or("-"),
                    j["node"].as_str().unwrap_or("-"),
                    j["error"].as_str().unwrap_or(""),
                );
            }
            Ok(())
        }
        JobsCommand::Get { id } => {
            let v = client.get_json(&format!("/api/v1/jobs/{id}")).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        JobsCommand::Result { id, output } => result(client, &id, output.as_deref()).await,
        JobsCommand::Cancel { id } => change(client, &id, "cancel").await,
        JobsCommand::Retry { id } => change(client, &id, "retry").await,
    }
}

async fn read_json(
    resp: http::Response<hyper::body::Incoming>,
) -> anyhow::Result<serde_json::Value> {
    use http_body_util::BodyExt;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(crate::client::ClientError::Api { status, body }.into());
    }
    Ok(serde_json::from_slice(&body)?)
}

/// Polls the job until it ends, with a progress line on stderr; returns its record.
async fn follow(client: &ApiClient, id: &str) -> anyhow::Result<serde_json::Value> {
    let mut last = String::new();
    loop {
        let job = client.get_json(&format!("/api/v1/jobs/{id}")).await?;
        let state = job["state"].as_str().unwrap_or("?").to_string();
        let line = match state.as_str() {
            "running" => format!(
                "running, attempt {}/{}",
                job["attempt"], job["max_attempts"]
            ),
            "queued" if job["attempt"].as_u64() > Some(0) => format!(
                "queued for attempt {} after: {}",
                job["attempt"].as_u64().unwrap_or(0) + 1,
                job["error"].as_str().unwrap_or("")
            ),
            other => other.to_string(),
        };
        if line != last {
            eprintln!("job {id}: {line}");
            last = line;
        }
        if !matches!(state.as_str(), "queued" | "running") {
            return Ok(job);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn result(
    client: &ApiClient,
    id: &str,
    output: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let body = client
        .call(
            Method::GET,
            &format!("/api/v1/jobs/{id}/result"),
            None,
            Bytes::new(),
        )
        .await?;
    match output {
        Some(path) => {
            std::fs::write(path, &body)
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("wrote {} bytes to {}", body.len(), path.display());
        }
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(&body)?;
            out.flush()?;
        }
    }
    Ok(())
}

async fn change(client: &ApiClient, id: &str, what: &str) -> anyhow::Result<()> {
    let body = client
        .call(
            Method::POST,
            &format!("/api/v1/jobs/{id}/{what}"),
            None,
            Bytes::new(),
        )
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    println!("job {id}: {}", v["state"].as_str().unwrap_or("?"));
    Ok(())
}
