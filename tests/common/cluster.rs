//! Helpers of the multi-node tests: a gateway that takes only agents, a cluster of agents,
//! and what the API says of nodes and instances.

use std::sync::Arc;
use std::time::Duration;

use super::{eventually, Agent, Gateway};

/// The join token of the test gateways.
pub const TOKEN: &str = "join-token-for-tests";

pub fn gateway_args(listen: Option<&str>) -> Vec<String> {
    let mut args: Vec<String> = [
        "--join-token",
        TOKEN,
        "--no-local-node",
        "--node-timeout",
        "2s",
        "--heartbeat-interval",
        "300ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(l) = listen {
        args.extend(["--listen".to_string(), l.to_string()]);
    }
    args
}

pub async fn cluster(names: &[&str]) -> (Arc<Gateway>, Vec<Agent>) {
    let args = gateway_args(None);
    let gw = Arc::new(Gateway::builder().args(&args).start().await);
    let mut agents = Vec::new();
    for name in names {
        agents.push(Agent::builder(&gw.url, TOKEN, name).start().await);
    }
    wait_ready(&gw, names.len()).await;
    (gw, agents)
}

pub async fn wait_ready(gw: &Arc<Gateway>, n: usize) {
    eventually(Duration::from_secs(10), "agents ready", || {
        let gw = gw.clone();
        async move {
            let nodes = gw.get_json("/api/v1/nodes").await;
            nodes["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| n["state"] == "ready")
                .count()
                == n
        }
    })
    .await;
}

pub async fn node_state(gw: &Gateway, name: &str) -> String {
    let nodes = gw.get_json("/api/v1/nodes").await;
    nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .map(|n| n["state"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

pub async fn instance_nodes(gw: &Gateway, function: &str) -> Vec<String> {
    let f = gw.function(function).await;
    let mut nodes: Vec<String> = f["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["phase"] == "ready")
        .map(|i| i["node"].as_str().unwrap().to_string())
        .collect();
    nodes.sort();
    nodes
}

pub fn node_containers(gw: &Gateway, node: &str) -> Vec<String> {
    super::docker_ps_all(&[
        &format!("ember.gateway={}", gw.id),
        &format!("ember.node={node}"),
    ])
}
