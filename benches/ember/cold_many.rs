//! Cold-100: many different functions cold at once, one request each. The time to each
//! first response through the gateway, against as many create + start + readiness + first
//! request done with bollard by as many concurrent tasks.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ember::manifest::Manifest;
use http::Method;

use crate::cold::{remove, spec, start_by_hand};
use crate::common::{self, Gateway};
use crate::probe::{docker, http_client, send, HttpClient};
use crate::report::{percentile, row, sorted, Row};
use crate::Size;

/// Long enough for a hundred starts at once on two cores.
const START_TIMEOUT: &str = "120s";

pub async fn run(size: &Size, rows: &mut Vec<Row>) {
    let n = size.cold_many;
    let gw = Gateway::start().await;
    let client = http_client();
    for i in 0..n {
        let name = format!("many{i}");
        assert!(gw.deploy(&name, &manifest(&name)).await.status.is_success());
    }
    let ember = through_gateway(&gw, &client, n).await;
    for i in 0..n {
        let path = format!("/api/v1/functions/many{i}");
        gw.request(Method::DELETE, &path, &[], Bytes::new()).await;
    }
    wait_gone(&gw).await;
    drop(gw);
    let baseline = by_hand(&client, n).await;
    let (e, b) = (sorted(ember), sorted(baseline));
    let scenario = format!("cold-{n}");
    for (name, p) in [("p50", 0.5), ("p95", 0.95)] {
        rows.push(row(
            &scenario,
            &format!("time to first response {name}"),
            percentile(&e, p),
            Some(percentile(&b, p)),
            "ms",
        ));
    }
    rows.push(row(
        &scenario,
        "time to the last response",
        *e.last().unwrap(),
        Some(*b.last().unwrap()),
        "ms",
    ));
}

fn manifest(name: &str) -> String {
    format!(
        "name = \"{name}\"\nimage = \"{}\"\n[readiness]\nhttp_path = \"/healthz\"\nstart_timeout = \"{START_TIMEOUT}\"\n[queue]\ntimeout = \"{START_TIMEOUT}\"\n",
        common::echo_image()
    )
}

/// Milliseconds from the moment all `n` requests are sent to each one's answer.
async fn through_gateway(gw: &Gateway, client: &HttpClient, n: usize) -> Vec<f64> {
    let t = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (client, url) = (client.clone(), format!("{}/fn/many{i}/", gw.url));
            tokio::spawn(async move {
                let (status, _) = send(&client, &url, Bytes::new()).await;
                assert_eq!(status, 200, "{url}");
                t.elapsed().as_secs_f64() * 1e3
            })
        })
        .collect();
    let mut ms = Vec::new();
    for task in tasks {
        ms.push(task.await.unwrap());
    }
    ms
}

/// `n` tasks at once, each creating, starting and asking its own container; all are
/// removed once every one has answered.
async fn by_hand(client: &HttpClient, n: usize) -> Vec<f64> {
    let docker = docker().await;
    let manifest = Manifest::parse(&manifest("direct"), ember::manifest::Format::Toml).unwrap();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (docker, client) = (docker.clone(), client.clone());
            let spec = spec(&manifest, &format!("many-{i}"));
            tokio::spawn(async move { start_by_hand(&docker, &client, &spec).await })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    for (_, id) in &answers {
        remove(&docker, id).await;
    }
    answers.into_iter().map(|(ms, _)| ms).collect()
}

/// Waits until the gateway's containers are all removed, so the baseline starts on an
/// engine as quiet as Ember's run did.
async fn wait_gone(gw: &Gateway) {
    let label = format!("ember.gateway={}", gw.id);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !common::docker_ps_all(&[&label]).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the functions' containers stayed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
