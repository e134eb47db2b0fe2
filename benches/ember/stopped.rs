//! The stopped tier: how long a stopped (not removed) container takes to answer after
//! `docker start`, against a fresh create + start of the same container, by hand in
//! alternating rounds (Ember offers the tier because this is the faster way back); then
//! a parked instance (`on_idle = "park"`) through the gateway against that same
//! `docker start` done by hand.

use std::time::{Duration, Instant};

use bollard::query_parameters::StopContainerOptionsBuilder;
use bytes::Bytes;
use ember::manifest::Manifest;

use crate::cold::{remove, spec, start_by_hand, wait_healthy};
use crate::common::{self, Gateway};
use crate::probe::{bridge_address, docker, http_client, send, HttpClient};
use crate::report::{percentile, row, sorted, Row};
use crate::Size;

pub async fn run(size: &Size, rows: &mut Vec<Row>) {
    let docker = docker().await;
    let client = http_client();
    let manifest = Manifest::parse(
        &common::echo_manifest("direct", "", ""),
        ember::manifest::Format::Toml,
    )
    .unwrap();
    let (mut fresh, mut restarted) = (Vec::new(), Vec::new());
    for i in 0..size.cold_rounds {
        let (ms, id) =
            start_by_hand(&docker, &client, &spec(&manifest, &format!("stopped-{i}"))).await;
        fresh.push(ms);
        // Killed at once: the wait for a graceful stop is not on the way back.
        let stop = StopContainerOptionsBuilder::new().t(0).build();
        docker.stop_container(&id, Some(stop)).await.unwrap();
        restarted.push(restart(&docker, &client, &id).await);
        remove(&docker, &id).await;
    }
    let ember = through_gateway(&client, size.cold_rounds).await;
    let (r, f, e) = (sorted(restarted), sorted(fresh), sorted(ember));
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        rows.push(row(
            "stopped tier",
            &format!(
                "docker start of a stopped container to first response {name} (vs create+start)"
            ),
            percentile(&r, p),
            Some(percentile(&f, p)),
            "ms",
        ));
    }
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        rows.push(row(
            "stopped tier",
            &format!("parked instance to first response through Ember {name} (vs docker start)"),
            percentile(&e, p),
            Some(percentile(&r, p)),
            "ms",
        ));
    }
}

/// Milliseconds from `docker start` of the stopped container `id` to its first response.
async fn restart(docker: &bollard::Docker, client: &HttpClient, id: &str) -> f64 {
    let t = Instant::now();
    docker.start_container(id, None).await.unwrap();
    // Its bridge address may change with the restart.
    let addr = bridge_address(docker, id).await;
    wait_healthy(addr).await;
    let (status, _) = send(client, &format!("http://{addr}/"), Bytes::new()).await;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(status, 200);
    ms
}

/// The parked tier through the gateway: `rounds` times, waits for the instance to park,
/// then times the request that starts it again.
async fn through_gateway(client: &HttpClient, rounds: usize) -> Vec<f64> {
    let gw = Gateway::start().await;
    let manifest = common::echo_manifest(
        "parked",
        "",
        "[scale]\non_idle = \"park\"\nidle_timeout = \"1s\"\npause_timeout = \"1h\"",
    );
    assert!(gw.deploy("parked", &manifest).await.status.is_success());
    let url = format!("{}/fn/parked/", gw.url);
    assert_eq!(send(client, &url, Bytes::new()).await.0, 200);
    let mut ember = Vec::new();
    for _ in 0..rounds {
        common::eventually(Duration::from_secs(15), "the instance parks", || async {
            gw.function("parked").await["instances"][0]["phase"] == "parked"
        })
        .await;
        let t = Instant::now();
        assert_eq!(send(client, &url, Bytes::new()).await.0, 200);
        ember.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let starts = gw.function("parked").await["starts"].as_u64().unwrap();
    assert_eq!(starts, 1, "every round started the same container again");
    ember
}
