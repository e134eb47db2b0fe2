//! Cold start: the first response of a scaled-to-zero function through the gateway, against
//! the same create + start + readiness + first request done here by hand with bollard.

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
use crate::probe::{docker, http_client, published_port, send, HttpClient};
use crate::report::{percentile, row, sorted, Row};
use crate::Size;

pub async fn run(size: &Size, rows: &mut Vec<Row>) {
    let gw = Gateway::start().await;
    let client = http_client();
    let ember = through_gateway(&gw, &client, size.cold_rounds).await;
    let baseline = by_hand(&client, size.cold_rounds).await;
    let (e, b) = (sorted(ember), sorted(baseline));
    let (me, mb) = (percentile(&e, 0.5), percentile(&b, 0.5));
    rows.push(row(
        "cold start",
        "time to first response p50",
        me,
        Some(mb),
        "ms",
    ));
    rows.push(row(
        "cold start",
        "time to first response max",
        *e.last().unwrap(),
        Some(*b.last().unwrap()),
        "ms",
    ));
    rows.push(row(
        "cold start",
        "overhead over direct p50",
        me - mb,
        None,
        "ms",
    ));
}

/// Milliseconds to the first response of `rounds` freshly deployed functions, each
/// removed after.
async fn through_gateway(gw: &Gateway, client: &HttpClient, rounds: usize) -> Vec<f64> {
    let mut ember = Vec::new();
    for i in 0..rounds {
        let name = format!("cold{i}");
        let manifest = common::echo_manifest(&name, "", "");
        assert!(gw.deploy(&name, &manifest).await.status.is_success());
        let t = Instant::now();
        let (status, _) = send(client, &format!("{}/fn/{name}/", gw.url), Bytes::new()).await;
        ember.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(status, 200);
        gw.request(
            Method::DELETE,
            &format!("/api/v1/functions/{name}"),
            &[],
            Bytes::new(),
        )
        .await;
    }
    ember
}

/// The same sequence by hand, `rounds` times: create (same config), start, inspect, poll,
/// first request.
async fn by_hand(client: &HttpClient, rounds: usize) -> Vec<f64> {
    let docker = docker().await;
    let manifest = Manifest::parse(
        &common::echo_manifest("direct", "", ""),
        ember::manifest::Format::Toml,
    )
    .unwrap();
    let mut baseline = Vec::new();
    for i in 0..rounds {
        baseline.push(one_by_hand(&docker, client, &spec(&manifest, i)).await);
    }
    baseline
}

/// The container the gateway would create for `manifest`, named for round `i`.
fn spec(manifest: &Manifest, i: usize) -> ContainerSpec {
    ContainerSpec {
        name: format!("ember-bench-direct-{}-{i}", std::process::id()),
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

/// Milliseconds from create to the first response of one container, removed after.
async fn one_by_hand(docker: &bollard::Docker, client: &HttpClient, spec: &ContainerSpec) -> f64 {
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
    let port = published_port(docker, &created.id).await;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    wait_healthy(addr).await;
    let (status, _) = send(client, &format!("http://{addr}/"), Bytes::new()).await;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(status, 200);
    docker
        .remove_container(
            &created.id,
            Some(RemoveContainerOptionsBuilder::new().force(true).build()),
        )
        .await
        .unwrap();
    ms
}

/// Polls `/healthz` on fresh connections, backing off from 2 ms to 50 ms.
async fn wait_healthy(addr: SocketAddr) {
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
