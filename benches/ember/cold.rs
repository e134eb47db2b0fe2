//! Cold start: the first response of a scaled-to-zero function through the gateway, against
//! the same create + start + readiness + first request done here by hand with bollard,
//! reaching the container at its bridge address as the gateway's embedded node does on
//! Linux; the two alternate, round by round.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bollard::query_parameters::{CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder};
use bytes::Bytes;
use ember::manifest::Manifest;
use ember::runtime::ContainerSpec;
use http::Method;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::common::{self, Gateway};
use crate::probe::{bridge_address, docker, http_client, send, HttpClient};
use crate::report::{percentile, row, sorted, Row};
use crate::Size;

pub async fn run(size: &Size, rows: &mut Vec<Row>) {
    let gw = Gateway::start().await;
    let client = http_client();
    let docker = docker().await;
    let manifest = Manifest::parse(
        &common::echo_manifest("direct", "", ""),
        ember::manifest::Format::Toml,
    )
    .unwrap();
    // Alternating rounds: whatever else loads the machine weighs on both sides alike.
    let (mut ember, mut baseline) = (Vec::new(), Vec::new());
    for i in 0..size.cold_rounds {
        ember.push(through_gateway(&gw, &client, i).await);
        let spec = spec(&manifest, &format!("cold-{i}"));
        let (ms, id) = start_by_hand(&docker, &client, &spec).await;
        baseline.push(ms);
        remove(&docker, &id).await;
    }
    let (e, b) = (sorted(ember), sorted(baseline));
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        rows.push(row(
            "cold start",
            &format!("time to first response {name}"),
            percentile(&e, p),
            Some(percentile(&b, p)),
            "ms",
        ));
    }
    rows.push(row(
        "cold start",
        "time to first response max",
        *e.last().unwrap(),
        Some(*b.last().unwrap()),
        "ms",
    ));
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        rows.push(row(
            "cold start",
            &format!("overhead over direct {name}"),
            percentile(&e, p) - percentile(&b, p),
            None,
            "ms",
        ));
    }
}

/// Milliseconds to the first response of a freshly deployed function (round `i`),
/// removed after.
async fn through_gateway(gw: &Gateway, client: &HttpClient, i: usize) -> f64 {
    let name = format!("cold{i}");
    let manifest = common::echo_manifest(&name, "", "");
    assert!(gw.deploy(&name, &manifest).await.status.is_success());
    let t = Instant::now();
    let (status, _) = send(client, &format!("{}/fn/{name}/", gw.url), Bytes::new()).await;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(status, 200);
    gw.request(
        Method::DELETE,
        &format!("/api/v1/functions/{name}"),
        &[],
        Bytes::new(),
    )
    .await;
    ms
}

/// The container the gateway would create for `manifest`, its name ending in `suffix`.
pub fn spec(manifest: &Manifest, suffix: &str) -> ContainerSpec {
    ContainerSpec {
        name: format!("ember-bench-direct-{}-{suffix}", std::process::id()),
        image: manifest.image.clone().unwrap(),
        command: None,
        env: vec![],
        labels: HashMap::from([("ember.bench".to_string(), "direct".to_string())]),
        port: manifest.port,
        host_ip: "127.0.0.1".parse().unwrap(),
        cpus: manifest.resources.cpus,
        memory_bytes: manifest.resources.memory.as_u64(),
        pids_limit: manifest.resources.pids(),
        shm_bytes: manifest.resources.shm().as_u64(),
        ulimits: Vec::new(),
        mounts: Vec::new(),
        gpus: None,
    }
}

/// Milliseconds from create to the first response of one container, and its id.
pub async fn start_by_hand(
    docker: &bollard::Docker,
    client: &HttpClient,
    spec: &ContainerSpec,
) -> (f64, String) {
    let t = Instant::now();
    let created = docker
        .create_container(
            Some(
                CreateContainerOptionsBuilder::new()
                    .name(&spec.name)
                    .build(),
            ),
            ember::runtime::docker::create_body(spec),
        )
        .await
        .unwrap();
    docker.start_container(&created.id, None).await.unwrap();
    // Reached as the gateway's embedded node reaches its containers.
    let addr = bridge_address(docker, &created.id).await;
    wait_healthy(addr).await;
    let (status, _) = send(client, &format!("http://{addr}/"), Bytes::new()).await;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(status, 200);
    (ms, created.id)
}

/// Removes a container started by hand.
pub async fn remove(docker: &bollard::Docker, id: &str) {
    docker
        .remove_container(
            id,
            Some(RemoveContainerOptionsBuilder::new().force(true).build()),
        )
        .await
        .unwrap();
}

/// Polls `/healthz` on fresh connections, backing off from 2 ms to 50 ms.
pub async fn wait_healthy(addr: SocketAddr) {
    let health = format!("http://{addr}/healthz");
    let probe = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http::<Full<Bytes>>();
    let mut interval = Duration::from_millis(2);
    loop {
        let req = http::Request::get(&health)
            .body(Full::new(Bytes::new()))
            .unwrap();
        if let Ok(r) = probe.request(req).await {
            if r.status().is_success() {
                break;
            }
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 3 / 2).min(Duration::from_millis(50));
    }
}
