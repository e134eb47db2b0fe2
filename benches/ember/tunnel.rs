//! Tunnel: warm requests to a function on an agent node, through the gateway and the
//! agent's tunnel, against the same container reached directly at its address on the node
//! (where the agent itself reaches it): added latency p50/p99 and the throughput ratio at
//! concurrency 64.

use std::time::Duration;

use bytes::Bytes;

use crate::common::cluster::TOKEN;
use crate::common::{self, Agent, Gateway};
use crate::probe::{http_client, send};
use crate::report::{row, Row};
use crate::warm::{latency, requests_per_second};
use crate::Size;

pub async fn run(size: &Size, rows: &mut Vec<Row>) {
    let gw = Gateway::builder()
        .args(["--no-local-node", "--join-token", TOKEN])
        .start()
        .await;
    let _agent = Agent::builder(&gw.url, TOKEN, "bench").start().await;
    common::eventually(Duration::from_secs(10), "the agent ready", || async {
        gw.get_json("/api/v1/nodes").await["nodes"][0]["state"] == "ready"
    })
    .await;
    let manifest = common::echo_manifest(
        "tunnel",
        "",
        "[scale]\nmax = 1\nconcurrency = 1000\nidle_timeout = \"1h\"",
    );
    assert!(gw.deploy("tunnel", &manifest).await.status.is_success());
    let client = http_client();
    let via = format!("{}/fn/tunnel/", gw.url);
    assert_eq!(send(&client, &via, Bytes::new()).await.0, 200);
    let status = gw.function("tunnel").await;
    let endpoint = status["instances"][0]["endpoint"].as_str().unwrap();
    let direct = format!("http://{endpoint}/");
    let body = Bytes::from_static(b"hello");
    let n = size.latency_requests;
    latency(
        &client,
        "tunnel",
        (&via, &direct),
        "small body",
        body,
        n,
        rows,
    )
    .await;
    let through = requests_per_second(&client, &via, size).await;
    let straight = requests_per_second(&client, &direct, size).await;
    rows.push(row(
        "tunnel",
        "throughput c=64 (tunnel)",
        through,
        None,
        "req/s",
    ));
    rows.push(row(
        "tunnel",
        "throughput c=64 (direct, container address)",
        straight,
        None,
        "req/s",
    ));
    rows.push(row(
        "tunnel",
        "throughput c=64 vs direct",
        through,
        Some(straight),
        "req/s",
    ));
}
