//! `ember volumes` and `ember cp`: node volumes seen from the CLI. `volumes` lists each
//! node's volumes with their size on disk; `cp FILE NODE:VOLUME/PATH` streams a file into
//! one through the gateway (and the node's tunnel), with progress, so model weights can be
//! seeded without logging into the node.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use futures_util::StreamExt;
use http::Method;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

use super::GatewayArgs;
use crate::client::{encode, render_api_error, ApiClient};

/// `ember volumes`.
#[derive(Debug, Args)]
pub struct VolumesArgs {
    /// Print the API's JSON.
    #[arg(long)]
    pub json: bool,
    /// Where the gateway is.
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

/// `ember cp FILE NODE:VOLUME/PATH`.
#[derive(Debug, Args)]
pub struct CpArgs {
    /// The local file to upload.
    pub file: PathBuf,
    /// Where it goes: NODE:VOLUME/PATH (the volume is made on the node when missing).
    pub target: String,
    /// Where the gateway is.
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

/// Lists every node's volumes.
pub async fn volumes(client: &ApiClient, json: bool) -> anyhow::Result<()> {
    let v = client.get_json("/api/v1/volumes").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<20} {:>10} {:>7}  WHERE",
        "NODE", "VOLUME", "SIZE", "FILES"
    );
    let mut any = false;
    for node in v["nodes"].as_array().into_iter().flatten() {
        let name = node["node"].as_str().unwrap_or("?");
        if let Some(error) = node["error"].as_str() {
            println!("{name:<16} ({error})");
            continue;
        }
        for vol in node["volumes"].as_array().into_iter().flatten() {
            any = true;
            let size = bytesize::ByteSize(vol["bytes"].as_u64().unwrap_or(0));
            let kind = if vol["exposed"].as_bool() == Some(true) {
                "exposed"
            } else {
                "data dir"
            };
            println!(
                "{name:<16} {:<20} {:>10} {:>7}  {} ({kind})",
                vol["name"].as_str().unwrap_or("?"),
                size.to_string(),
                vol["files"].as_u64().unwrap_or(0),
                vol["path"].as_str().unwrap_or("?"),
            );
        }
    }
    if !any {
        println!("no volumes yet: expose a directory with `ember agent --volume NAME=PATH` (or `ember serve --volume`), or copy a file in with `ember cp FILE NODE:NAME/PATH`");
    }
    Ok(())
}

/// `NODE:VOLUME/PATH` split in three.
pub fn parse_target(target: &str) -> anyhow::Result<(&str, &str, &str)> {
    let usage = || {
        anyhow::anyhow!(
            "`{target}` is not NODE:VOLUME/PATH, e.g. gpu1:models/sd/v1-5.safetensors (`ember nodes` lists the nodes)"
        )
    };
    let (node, rest) = target.split_once(':').ok_or_else(usage)?;
    let (volume, path) = rest.split_once('/').ok_or_else(usage)?;
    if node.is_empty() || volume.is_empty() || path.is_empty() {
        return Err(usage());
    }
    Ok((node, volume, path))
}

/// Streams `file` to `target`, printing progress on stderr.
pub async fn cp(client: &ApiClient, file: &std::path::Path, target: &str) -> anyhow::Result<()> {
    let (node, volume, path) = parse_target(target)?;
    let f = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("cannot read {}", file.display()))?;
    let total = f.metadata().await?.len();
    let mut progress = Progress::new(total);
    let stream = tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024).map(move |chunk| {
        if let Ok(c) = &chunk {
            progress.advance(c.len() as u64);
        }
        chunk.map(Frame::data)
    });
    let body = BodyExt::boxed(StreamBody::new(stream));
    let url_path = format!(
        "/api/v1/nodes/{}/volumes/{}/files/{}",
        encode(node),
        encode(volume),
        path.split('/').map(encode).collect::<Vec<_>>().join("/")
    );
    let headers = [
        (
            "content-type".to_string(),
            "application/octet-stream".to_string(),
        ),
        ("content-length".to_string(), total.to_string()),
    ];
    let started = Instant::now();
    let resp = client
        .send_body(Method::PUT, &url_path, &headers, body)
        .await?;
    let status = resp.status();
    let answer: Bytes = resp.into_body().collect().await?.to_bytes();
    eprintln!();
    if !status.is_success() {
        anyhow::bail!("{}", render_api_error(status, &answer));
    }
    let v: serde_json::Value = serde_json::from_slice(&answer)?;
    let bytes = v["bytes"].as_u64().unwrap_or(0);
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    println!(
        "copied {} to {node}:{volume}/{path} ({}, {}/s)",
        file.display(),
        bytesize::ByteSize(bytes),
        bytesize::ByteSize((bytes as f64 / secs) as u64)
    );
    Ok(())
}

/// Progress of an upload on stderr: a line at most every half second.
struct Progress {
    total: u64,
    sent: u64,
    started: Instant,
    shown: Option<Instant>,
}

impl Progress {
    fn new(total: u64) -> Progress {
        Progress {
            total,
            sent: 0,
            started: Instant::now(),
            shown: None,
        }
    }

    fn advance(&mut self, n: u64) {
        self.sent += n;
        let due = self
            .shown
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(500));
        if !due && self.sent < self.total {
            return;
        }
        self.shown = Some(Instant::now());
        let pct = (self.sent * 100).checked_div(self.total).unwrap_or(100);
        let rate = self.sent as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
        eprint!(
            "\ruploading: {pct:>3}% ({} of {}, {}/s)   ",
            bytesize::ByteSize(self.sent),
            bytesize::ByteSize(self.total),
            bytesize::ByteSize(rate as u64)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_node_volume_and_path() {
        assert_eq!(
            parse_target("gpu1:models/sd/v1.safetensors").unwrap(),
            ("gpu1", "models", "sd/v1.safetensors")
        );
        for bad in [
            "gpu1",
            "gpu1:models",
            ":models/x",
            "gpu1:/x",
            "gpu1:models/",
        ] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }
}
