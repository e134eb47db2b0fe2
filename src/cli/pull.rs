//! The deploy's pre-pull: before a new revision goes live, its image is made present on
//! every reachable node that could run it (pulled from its registry, or copied from a
//! node that has it), each node's progress printed as it goes. Also the reader of the
//! gateway's NDJSON progress answers, which the build uses too.

use std::collections::HashMap;
use std::io::Write;

use anyhow::{bail, Context};
use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;

use crate::client::{render_api_error, ApiClient};
use crate::manifest::Manifest;

/// Sends a request whose answer is NDJSON and hands each line to `each` as it comes.
pub(super) async fn ndjson_call(
    client: &ApiClient,
    path: &str,
    content_type: &str,
    body: Bytes,
    mut each: impl FnMut(serde_json::Value) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let resp = client
        .send(
            Method::POST,
            path,
            &[("content-type".into(), content_type.into())],
            body,
        )
        .await?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let bytes = body.collect().await?.to_bytes();
        bail!("{}", render_api_error(status, &bytes));
    }
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("the gateway's progress stream broke")?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        pending.extend_from_slice(data);
        while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) {
                each(v)?;
            }
        }
    }
    Ok(())
}

/// Makes the manifest's image present on the nodes that could run it. Fails when no
/// node could get it; a node that could not is a warning (its starts would fail).
pub async fn pre_pull(client: &ApiClient, manifest: &Manifest) -> anyhow::Result<()> {
    let Some(image) = manifest.image.as_deref() else {
        return Ok(());
    };
    let body = Bytes::from(serde_json::to_vec(manifest)?);
    let mut shown: HashMap<String, String> = HashMap::new();
    let mut errors = Vec::new();
    let mut last = None;
    ndjson_call(
        client,
        "/api/v1/images/pull",
        "application/json",
        body,
        |v| {
            let node = v["node"].as_str().unwrap_or("?").to_string();
            if let Some(p) = v.get("image_progress") {
                let line = progress_line(p);
                if shown.get(&node) != Some(&line) {
                    eprintln!("  {node}: {line}");
                    let _ = std::io::stderr().flush();
                    shown.insert(node, line);
                }
            } else if v["ready"].as_bool() == Some(true) {
                if v["supplied"].as_bool() == Some(true) {
                    eprintln!("  {node}: {image} is there");
                }
            } else if v["done"].as_bool() == Some(true) {
                last = Some(v);
            } else if let Some(e) = v["error"].as_str() {
                errors.push(format!("{node}: {e}"));
            }
            Ok(())
        },
    )
    .await?;
    let Some(last) = last else {
        bail!(
            "getting {image} onto the nodes: the gateway stopped before it finished{}",
            errors
                .iter()
                .map(|e| format!("\n  {e}"))
                .collect::<String>()
        );
    };
    let (nodes, failed) = (
        last["nodes"].as_u64().unwrap_or(0),
        last["failed"].as_u64().unwrap_or(0),
    );
    if nodes > 0 && failed == nodes {
        bail!(
            "no node could get {image}, so nothing was deployed:{}",
            errors
                .iter()
                .map(|e| format!("\n  {e}"))
                .collect::<String>()
        );
    }
    for e in errors {
        eprintln!("warning: {e}; instances there will fail to start until it can get the image");
    }
    Ok(())
}

/// `pulling 45% (120 MiB of 260 MiB)`.
fn progress_line(p: &serde_json::Value) -> String {
    let action = p["action"].as_str().unwrap_or("pulling");
    let mib = |k: &str| p[k].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64;
    match p["percent"].as_u64() {
        // Whole tenths: a line per 10% keeps a log readable.
        Some(pc) => format!(
            "{action} {}% ({:.0} MiB of {:.0} MiB)",
            pc / 10 * 10,
            mib("done_bytes"),
            mib("total_bytes")
        ),
        None => action.to_string(),
    }
}
