//! `ember nodes`, `ember cordon / uncordon / drain`, and `ember gpus`: the nodes, their
//! state, and the GPUs of each with Ember's reservations on them.

use bytesize::ByteSize;

use crate::client::ApiClient;

fn gib(v: &serde_json::Value) -> String {
    ByteSize(v.as_u64().unwrap_or(0))
        .display()
        .iec()
        .to_string()
}

/// `ember nodes [--json]`.
pub async fn nodes(client: &ApiClient, json: bool) -> anyhow::Result<()> {
    let v = client.get_json("/api/v1/nodes").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<9} {:<24} {:<34} {:>9} {:>9}  LAST HEARTBEAT",
        "NAME", "STATE", "LABELS", "GPUS (free/total, util)", "INSTANCES", "IN-FLIGHT"
    );
    for n in v["nodes"].as_array().into_iter().flatten() {
        let labels: Vec<String> = n["labels"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
            .collect();
        let gpus: Vec<String> = n["gpus"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|g| {
                let total = g["memory_total"].as_u64().unwrap_or(0);
                let used = g["memory_used"]
                    .as_u64()
                    .unwrap_or(0)
                    .max(g["reserved"]["memory"].as_u64().unwrap_or(0));
                let util = g["utilization"]
                    .as_f64()
                    .map_or("-".into(), |u| format!("{u:.0}%"));
                format!(
                    "{}/{} {util}",
                    ByteSize(total.saturating_sub(used)).display().iec_short(),
                    ByteSize(total).display().iec_short()
                )
            })
            .collect();
        println!(
            "{:<16} {:<9} {:<24} {:<34} {:>9} {:>9}  {}",
            n["name"].as_str().unwrap_or("?"),
            n["state"].as_str().unwrap_or("?"),
            if labels.is_empty() {
                "-".into()
            } else {
                labels.join(",")
            },
            if gpus.is_empty() {
                "-".into()
            } else {
                gpus.join("; ")
            },
            n["instances"].as_u64().unwrap_or(0),
            n["in_flight"].as_u64().unwrap_or(0),
            n["last_heartbeat"].as_str().unwrap_or("never"),
        );
    }
    Ok(())
}

/// `ember nodes rm NAME`.
pub async fn remove_node(client: &ApiClient, name: &str) -> anyhow::Result<()> {
    client
        .call(
            http::Method::DELETE,
            &format!("/api/v1/nodes/{}", crate::client::encode(name)),
            None,
            bytes::Bytes::new(),
        )
        .await?;
    println!("node {name} removed: its credential is revoked and its tunnel closed");
    Ok(())
}

/// `ember token create [--ttl 24h]`: the token, the pin, and the command that uses them.
pub async fn create_token(client: &ApiClient, ttl: std::time::Duration) -> anyhow::Result<()> {
    let body = serde_json::json!({ "ttl": humantime::format_duration(ttl).to_string() });
    let answer = client
        .call(
            http::Method::POST,
            "/api/v1/tokens",
            Some("application/json"),
            serde_json::to_vec(&body)?.into(),
        )
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&answer)?;
    let token = v["token"].as_str().unwrap_or_default();
    println!("join token: {token}");
    println!("expires:    {}", v["expires"].as_str().unwrap_or("?"));
    let mut command = format!("ember agent --gateway {} --token {token}", client.url());
    if let Some(pin) = v["ca_pin"].as_str() {
        println!("CA pin:     {pin}");
        command.push_str(&format!(" --ca-pin {pin}"));
    }
    println!("on the node: {command}");
    Ok(())
}

/// `ember cordon|uncordon|drain NAME`.
pub async fn node_action(client: &ApiClient, name: &str, action: &str) -> anyhow::Result<()> {
    let body = client
        .call(
            http::Method::POST,
            &format!("/api/v1/nodes/{name}/{action}"),
            None,
            bytes::Bytes::new(),
        )
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    println!("node {name} is {}", v["state"].as_str().unwrap_or("?"));
    Ok(())
}

/// `ember gpus [--json]`: every node's GPUs, from the gateway.
pub async fn gpus(client: &ApiClient, json: bool) -> anyhow::Result<()> {
    let v = client.get_json("/api/v1/nodes").await?;
    print_gpus(&v, json)
}

/// `ember gpus --local [--gpu-inventory FILE]`: this machine's GPUs, read here (NVML, or
/// the declared file), without a gateway: what a node would report if it joined.
pub async fn local_gpus(inventory: Option<&std::path::Path>, json: bool) -> anyhow::Result<()> {
    use crate::gpu::{DeclaredInventory, GpuInventory, GpuMonitor, NvmlInventory};
    let source: std::sync::Arc<dyn GpuInventory> = match inventory {
        Some(path) => std::sync::Arc::new(DeclaredInventory::load(path)?),
        None => std::sync::Arc::new(NvmlInventory::new()?),
    };
    let monitor = GpuMonitor::new(Some(source));
    let gpus = monitor.read().await;
    let v = serde_json::json!({
        "nodes": [{
            "name": "(here)",
            "gpu_source": monitor.source(),
            "gpu_driver": "-",
            "gpus": gpus,
        }]
    });
    print_gpus(&v, json)
}

fn print_gpus(v: &serde_json::Value, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
    println!(
        "{:<12} {:>3} {:<28} {:<44} {:>10} {:>10} {:>6}  HELD BY EMBER",
        "NODE", "IDX", "NAME", "UUID", "MEMORY", "USED", "UTIL"
    );
    for node in nodes {
        let name = node["name"].as_str().unwrap_or("?");
        let gpus = node["gpus"].as_array().cloned().unwrap_or_default();
        if gpus.is_empty() {
            println!(
                "{name:<12} {:>3} no GPUs (source: {}, driver: {})",
                "-",
                node["gpu_source"].as_str().unwrap_or("?"),
                node["gpu_driver"].as_str().unwrap_or("?")
            );
        }
        for g in gpus {
            let util = g["utilization"]
                .as_f64()
                .map_or("-".to_string(), |u| format!("{u:.0}%"));
            let r = &g["reserved"];
            let held = if r["exclusive"].as_bool() == Some(true) {
                "exclusive".to_string()
            } else if r["sharers"].as_u64().unwrap_or(0) > 0 {
                format!("{} sharers, {}", r["sharers"], gib(&r["memory"]))
            } else {
                "-".to_string()
            };
            println!(
                "{name:<12} {:>3} {:<28} {:<44} {:>10} {:>10} {:>6}  {held}",
                g["index"].as_u64().unwrap_or(0),
                g["name"].as_str().unwrap_or("?"),
                g["uuid"].as_str().unwrap_or("?"),
                gib(&g["memory_total"]),
                gib(&g["memory_used"]),
                util,
            );
            let held_mig: Vec<&str> = g["mig_held"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m.as_str())
                .collect();
            for m in g["mig"].as_array().into_iter().flatten() {
                let uuid = m["uuid"].as_str().unwrap_or("?");
                println!(
                    "{:<12} {:>3} {:<28} {:<44} {:>10} {:>10} {:>6}  {}",
                    "",
                    "",
                    format!("  MIG {}", m["profile"].as_str().unwrap_or("?")),
                    uuid,
                    gib(&m["memory_total"]),
                    gib(&m["memory_used"]),
                    "",
                    if held_mig.contains(&uuid) {
                        "exclusive"
                    } else {
                        "-"
                    }
                );
            }
        }
    }
    Ok(())
}
