//! The invocation history and GPU usage end to end, on real containers with a declared GPU
//! inventory: a cold and a warm request leave records with the GPU they ran on and say so
//! in their headers, Ember's own error answers are recorded and tagged too, the GPU-seconds
//! counters grow while the instance lives, `ember usage` sums match the history, and the
//! history survives a restart of the gateway.
#![allow(clippy::disallowed_methods)] // tasks a test spawns end with the test

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::Gateway;
use http::Method;
use serde_json::Value;

const INVENTORY: &str = r#"
[[gpu]]
name = "NVIDIA GeForce RTX 4090"
uuid = "GPU-4090"
memory = "24GiB"
"#;

fn manifest() -> String {
    format!(
        "name = \"gpu\"\nimage = \"{}\"\n[readiness]\nhttp_path = \"/healthz\"\n[gpu]\nmodels = [\"RTX\"]\n[request]\nmax_body = \"1KiB\"\n",
        common::gpu_info_image()
    )
}

/// The value of the sample of `metric` whose labels include every one of `labels`.
fn sample(text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn scrape(gw: &Gateway) -> String {
    let bearer = format!("Bearer {}", gw.token);
    let r = gw
        .request(Method::GET, "/metrics", &[("authorization", &bearer)], "")
        .await;
    assert_eq!(r.status, 200);
    r.text()
}

async fn invocations(gw: &Gateway, query: &str) -> Vec<Value> {
    let v = gw.get_json(&format!("/api/v1/invocations?{query}")).await;
    v["invocations"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_leave_records_with_their_gpu_usage_sums_them_and_a_restart_keeps_them() {
    require_docker!();
    let dir = tempfile::tempdir().unwrap();
    let inventory = dir.path().join("gpus.toml");
    std::fs::write(&inventory, INVENTORY).unwrap();
    let data = dir.path().join("data");
    let start = || {
        Gateway::builder()
            .data_dir(&data)
            .args(["--gpu-inventory", inventory.to_str().unwrap()])
            .start()
    };
    let mut gw = start().await;
    let _cleanup = common::Cleanup(format!("ember.gateway={}", gw.id));
    let r = gw.deploy("gpu", &manifest()).await;
    assert_eq!(r.status, 201, "{}", r.text());

    let cold = gw.request(Method::GET, "/fn/gpu/", &[], Bytes::new()).await;
    assert_eq!(cold.status, 200, "{}", cold.text());
    assert_eq!(cold.header("ember-cold-start").as_deref(), Some("true"));
    let queue_ms: u64 = cold.header("ember-queue-ms").unwrap().parse().unwrap();
    assert!(queue_ms > 0, "a cold start takes time");
    let warm = gw.request(Method::GET, "/fn/gpu/", &[], Bytes::new()).await;
    assert_eq!(warm.status, 200);
    assert_eq!(warm.header("ember-cold-start"), None);
    // Ember's own answer (the body is over the function's limit) is tagged and recorded.
    let big = gw
        .request(Method::POST, "/fn/gpu/", &[], vec![b'x'; 4096])
        .await;
    assert_eq!(big.status, 413);
    let ids: Vec<String> = [&cold, &warm, &big]
        .iter()
        .map(|r| {
            r.header("ember-invocation-id")
                .expect("every answer names its invocation")
        })
        .collect();

    // The GPU-seconds counters grow while the instance lives.
    let labels = ["function=\"gpu\"", "gpu=\"GPU-4090\""];
    let first = scrape(&gw).await;
    let allocated = sample(&first, "ember_gpu_allocated_seconds_total", &labels).unwrap();
    let busy = sample(&first, "ember_gpu_busy_seconds_total", &labels).unwrap();
    assert!(
        busy > 0.0 && busy < allocated,
        "busy {busy}, allocated {allocated}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = sample(
        &scrape(&gw).await,
        "ember_gpu_allocated_seconds_total",
        &labels,
    )
    .unwrap();
    assert!(later >= allocated + 1.4, "{allocated} then {later}");

    // The history, newest first, with where each ran.
    let records = invocations(&gw, "function=gpu").await;
    let got: Vec<&str> = records.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(got, [&ids[2], &ids[1], &ids[0]], "{records:?}");
    let (too_big, warm_r, cold_r) = (&records[0], &records[1], &records[2]);
    assert_eq!(cold_r["cold"], true);
    assert_eq!(warm_r["cold"], false);
    for r in [cold_r, warm_r] {
        assert_eq!(r["gpus"], serde_json::json!(["GPU-4090"]), "{r}");
        assert_eq!(r["node"], "local");
        assert_eq!(r["status"], 200);
        assert_eq!(r["path"], "/");
        assert!(r["bytes_out"].as_u64().unwrap() > 0);
    }
    assert_eq!(cold_r["instance"], warm_r["instance"]);
    assert_eq!(too_big["status"], 413);
    assert_eq!(too_big["error"], "body_too_large");
    assert!(too_big["instance"].is_null());
    // Filters.
    assert_eq!(invocations(&gw, "gpu=GPU-4090").await.len(), 2);
    assert_eq!(invocations(&gw, "gpu=GPU-other").await.len(), 0);
    assert_eq!(invocations(&gw, "status=4xx").await.len(), 1);
    assert_eq!(invocations(&gw, "function=gpu&limit=2").await.len(), 2);
    let bad = gw
        .request(Method::GET, "/api/v1/invocations?since=yesterday", &[], "")
        .await;
    assert_eq!(bad.status, 400);
    assert_eq!(
        bad.json()["error"]["details"][0]["field"],
        "since",
        "{}",
        bad.text()
    );
    let listed = gw.cli(&["history", "--function", "gpu"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{listed:?}");
    assert!(
        text.contains(&ids[0]) && text.contains("GPU-4090"),
        "{text}"
    );

    // Usage sums match the history: invocations, cold ones, and busy time (the two
    // requests ran one after the other, so their spans add up).
    let out = gw.cli(&["usage", "--json", "--since", "1h"]);
    assert!(out.status.success(), "{out:?}");
    let usage: Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = usage["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == "gpu")
        .unwrap_or_else(|| panic!("{usage}"));
    assert_eq!(row["invocations"], 3);
    assert_eq!(row["cold_invocations"], 1);
    assert_eq!(row["cold_starts"], 1);
    let span = |r: &Value| {
        (r["finished_at_us"].as_u64().unwrap() - r["started_at_us"].as_u64().unwrap()) as f64
    };
    let busy_from_history = (span(cold_r) + span(warm_r)) / 1e6;
    let busy = row["gpu_seconds_busy"].as_f64().unwrap();
    assert!(
        (busy - busy_from_history).abs() < 1e-6,
        "{busy} vs {busy_from_history}"
    );
    assert!(
        row["gpu_seconds_allocated"].as_f64().unwrap() >= 1.5,
        "{row}"
    );
    // By GPU: the refused request ran on none (`-`).
    let by_gpu = gw.get_json("/api/v1/usage?by=gpu&since=1h").await;
    let keys: Vec<&str> = by_gpu["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["-", "GPU-4090"], "{by_gpu}");
    assert_eq!(by_gpu["rows"][1]["invocations"], 2);

    // A restart keeps the history.
    gw.terminate();
    assert!(gw.wait_exit(Duration::from_secs(30)).is_some());
    let gw = start().await;
    let after = invocations(&gw, "function=gpu").await;
    let kept: Vec<&str> = after.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(kept, got);
    let again = gw.request(Method::GET, "/fn/gpu/", &[], Bytes::new()).await;
    assert_eq!(again.status, 200);
    assert_eq!(
        again.header("ember-cold-start"),
        None,
        "the instance was adopted"
    );
    assert_eq!(invocations(&gw, "function=gpu").await.len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_instance_sees_the_invocation_id_the_client_gets_never_a_forged_one() {
    require_docker!();
    let gw = Gateway::start().await;
    let r = gw
        .deploy("echo", &common::echo_manifest("echo", "", ""))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = gw
        .request(
            Method::POST,
            "/fn/echo/",
            &[("ember-invocation-id", "forged")],
            "hi",
        )
        .await;
    assert_eq!(r.status, 200);
    let id = r.header("ember-invocation-id").unwrap();
    assert_eq!(id.len(), 16);
    assert_eq!(r.header("x-echo-h-ember-invocation-id"), Some(id));
}
