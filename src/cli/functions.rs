//! `ember ls`, `ember rm`, `ember invoke`.

use std::io::Write;

use anyhow::{bail, Context};
use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;

use crate::client::ApiClient;

/// `ember ls [--json]`.
pub async fn ls(client: &ApiClient, json: bool) -> anyhow::Result<()> {
    let v = client.get_json("/api/v1/functions").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let functions = v["functions"].as_array().cloned().unwrap_or_default();
    if functions.is_empty() {
        println!("no functions deployed; `ember deploy PATH` deploys one");
        return Ok(());
    }
    println!(
        "{:<20} {:<13} {:>7} {:>5} {:>8} {:>6} {:>6} {:>9} {:>6} {:>6}  STATUS",
        "NAME",
        "REVISION",
        "DESIRED",
        "READY",
        "STARTING",
        "PAUSED",
        "PARKED",
        "IN-FLIGHT",
        "QUEUED",
        "STARTS"
    );
    for f in functions {
        let status = match f["failure"].as_object() {
            None if f["unschedulable"].is_string() => format!(
                "waiting for room: {}",
                f["unschedulable"].as_str().unwrap_or("")
            ),
            None => match (f["starting_ms"].as_u64(), f.get("image_progress")) {
                (Some(_), Some(p)) => image_line(p),
                (Some(ms), None) => format!("starting {}", short_duration(ms)),
                (None, _) => "ok".to_string(),
            },
            Some(fl) => {
                let message = fl["message"].as_str().unwrap_or("");
                let first_line = message.lines().next().unwrap_or("");
                format!(
                    "failing ({}x, retry in {}s): {first_line}",
                    fl["consecutive"],
                    fl["retry_in_ms"].as_u64().unwrap_or(0).div_ceil(1000)
                )
            }
        };
        println!(
            "{:<20} {:<13} {:>7} {:>5} {:>8} {:>6} {:>6} {:>9} {:>6} {:>6}  {status}",
            f["name"].as_str().unwrap_or("?"),
            f["revision"].as_str().unwrap_or("?"),
            f["desired"].as_u64().unwrap_or(0),
            f["ready"].as_u64().unwrap_or(0),
            f["starting"].as_u64().unwrap_or(0),
            f["paused"].as_u64().unwrap_or(0),
            f["parked"].as_u64().unwrap_or(0),
            f["in_flight"].as_u64().unwrap_or(0),
            f["queued"].as_u64().unwrap_or(0),
            f["starts"].as_u64().unwrap_or(0),
        );
    }
    Ok(())
}

/// `4m12s`, `38s`, `1h3m`: how long something has been going, to the second.
fn short_duration(ms: u64) -> String {
    let s = ms / 1000;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, min, sec) => format!("{min}m{sec:02}s"),
        (h, min, _) => format!("{h}h{min:02}m"),
    }
}

/// `ember rm NAME`.
pub async fn rm(client: &ApiClient, name: &str) -> anyhow::Result<()> {
    let body = client
        .call(
            Method::DELETE,
            &format!("/api/v1/functions/{name}"),
            None,
            Bytes::new(),
        )
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    println!(
        "removed {name} ({} container{} removed)",
        v["containers"],
        if v["containers"] == 1 { "" } else { "s" }
    );
    Ok(())
}

/// `ember invoke NAME [PATH] [-d BODY] [-X METHOD] [-H 'K: V']`: the answer's body goes to
/// stdout as it streams; a non-2xx status is reported on stderr and fails the command.
pub async fn invoke(
    client: &ApiClient,
    name: &str,
    path: Option<&str>,
    data: Option<&str>,
    method: Option<&str>,
    headers: &[String],
) -> anyhow::Result<()> {
    let body = match data {
        Some(d) if d.starts_with('@') => {
            Bytes::from(std::fs::read(&d[1..]).with_context(|| format!("cannot read -d {d}"))?)
        }
        Some(d) => Bytes::from(d.to_string()),
        None => Bytes::new(),
    };
    let method = match method {
        Some(m) => Method::from_bytes(m.to_uppercase().as_bytes())
            .with_context(|| format!("-X {m} is not an HTTP method"))?,
        None if data.is_some() => Method::POST,
        None => Method::GET,
    };
    let mut pairs = Vec::new();
    for h in headers {
        let Some((k, v)) = h.split_once(':') else {
            bail!("-H `{h}`: expected `Name: value`");
        };
        pairs.push((k.trim().to_string(), v.trim().to_string()));
    }
    let path = path.unwrap_or("/");
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    let resp = client
        .send(method, &format!("/fn/{name}{path}"), &pairs, body)
        .await?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut out = std::io::stdout().lock();
    let mut collected = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("the answer broke off")?;
        if let Some(data) = frame.data_ref() {
            if status.is_success() {
                out.write_all(data)?;
                out.flush()?;
            } else {
                collected.extend_from_slice(data);
            }
        }
    }
    if !status.is_success() {
        let body = collected.into();
        return Err(crate::client::ClientError::Api { status, body }.into());
    }
    Ok(())
}

/// `pulling 45%`, `copying image 12%`, `checking image`: a start waiting for its image.
fn image_line(p: &serde_json::Value) -> String {
    let action = match p["action"].as_str() {
        Some("pulling") => "pulling",
        Some("copying") => "copying image",
        _ => "checking image",
    };
    match p["percent"].as_u64() {
        Some(pc) => format!("{action} {pc}%"),
        None => action.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::short_duration;

    #[test]
    fn durations_read_like_a_clock_to_the_second() {
        assert_eq!(short_duration(38_400), "38s");
        assert_eq!(short_duration(252_000), "4m12s");
        assert_eq!(short_duration(3_780_000), "1h03m");
    }
}
