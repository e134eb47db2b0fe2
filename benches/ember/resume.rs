//! Resume from pause: the first response of a paused instance through the gateway, against
//! the same `docker unpause` and first request done here by hand.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::common::{self, Gateway};
use crate::probe::{docker, http_client, send, HttpClient};
use crate::report::{percentile, row, sorted, Row};
use crate::Size;

pub async fn run(size: &Size, rows: &mut Vec<Row>) {
    let gw = Gateway::start().await;
    let manifest = common::echo_manifest(
        "paused",
        "",
        "[scale]\non_idle = \"pause\"\nidle_timeout = \"1s\"\npause_timeout = \"1h\"",
    );
    assert!(gw.deploy("paused", &manifest).await.status.is_success());
    let client = http_client();
    let ember = through_gateway(&gw, &client, size.cold_rounds).await;
    let starts = gw.function("paused").await["starts"].as_u64().unwrap();
    assert_eq!(starts, 1, "every round resumed the same container");
    // Baseline: the same docker unpause done directly, then the first request.
    let container = gw.containers("paused")[0].clone();
    let endpoint = gw.function("paused").await["instances"][0]["endpoint"]
        .as_str()
        .unwrap()
        .to_string();
    let docker = docker().await;
    let direct_url = format!("http://{endpoint}/");
    // Stop the gateway first so it does not pause or resume under the baseline.
    let mut gw = gw;
    gw.kill();
    let baseline = by_hand(&docker, &client, &container, &direct_url, size.cold_rounds).await;
    let (e, b) = (sorted(ember), sorted(baseline));
    rows.push(row(
        "resume",
        "time to first response p50",
        percentile(&e, 0.5),
        Some(percentile(&b, 0.5)),
        "ms",
    ));
    rows.push(row(
        "resume",
        "time to first response max",
        *e.last().unwrap(),
        Some(*b.last().unwrap()),
        "ms",
    ));
    common::remove_containers(&format!("ember.gateway={}", gw.id));
}

/// Starts the instance, then `rounds` times waits for it to pause and times the request
/// that resumes it.
async fn through_gateway(gw: &Gateway, client: &HttpClient, rounds: usize) -> Vec<f64> {
    let url = format!("{}/fn/paused/", gw.url);
    let mut ember = Vec::new();
    assert_eq!(send(client, &url, Bytes::new()).await.0, 200);
    for _ in 0..rounds {
        let deadline = Instant::now() + Duration::from_secs(10);
        while gw.function("paused").await["paused"] != 1 {
            assert!(Instant::now() < deadline, "the instance never paused");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Let the pause settle in Docker before timing the resume.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        assert_eq!(send(client, &url, Bytes::new()).await.0, 200);
        ember.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ember
}

/// `rounds` times: pause `container`, then time unpause and the first request to `url`.
async fn by_hand(
    docker: &bollard::Docker,
    client: &HttpClient,
    container: &str,
    url: &str,
    rounds: usize,
) -> Vec<f64> {
    let mut baseline = Vec::new();
    for _ in 0..rounds {
        docker.pause_container(container).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        docker.unpause_container(container).await.unwrap();
        assert_eq!(send(client, url, Bytes::new()).await.0, 200);
        baseline.push(t.elapsed().as_secs_f64() * 1e3);
    }
    baseline
}
