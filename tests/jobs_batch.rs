//! Batch mode (`[jobs] batch`): queued jobs go to the function in JSON arrays, each job
//! keeping its own record and result; a refused batch's jobs run again one by one so only
//! the bad input fails; a batch function takes only JSON inputs.
#![allow(clippy::disallowed_methods)] // tasks a test spawns end with the test

mod common;

use std::time::Duration;

use common::jobs::wait_for;
use common::Gateway;
use http::Method;
use serde_json::{json, Value};

/// Deploys `functions/batch-stub` as `name`: 200 ms a call, one call at a time, batches
/// of `max` filled for at most `wait`.
async fn deploy_batcher(gw: &Gateway, name: &str, max: u32, wait: &str) {
    let image = common::function_image("batch-stub");
    let manifest = format!(
        "name = \"{name}\"\nimage = \"{image}\"\nport = 8080\nenv = {{ FIXED_MS = \"200\", ITEM_MS = \"1\" }}\n\
         [readiness]\nhttp_path = \"/healthz\"\n[scale]\nmax = 1\nconcurrency = 1\n\
         [jobs]\nbatch = {{ max = {max}, wait = \"{wait}\" }}\n"
    );
    let r = gw.deploy(name, &manifest).await;
    assert_eq!(r.status, 201, "{}", r.text());
}

/// Submits `inputs` at once to `function` (`NAME` or `NAME/jobs?path=/p`); their job ids,
/// in order.
async fn submit_all(gw: &Gateway, function: &str, inputs: &[Value]) -> Vec<String> {
    let path = match function.split_once('/') {
        Some((name, rest)) => format!("/api/v1/functions/{name}/{rest}"),
        None => format!("/api/v1/functions/{function}/jobs"),
    };
    let submits = inputs.iter().map(|input| {
        let (path, body) = (path.clone(), input.to_string());
        async move {
            let r = gw
                .request(
                    Method::POST,
                    &path,
                    &[("content-type", "application/json")],
                    body,
                )
                .await;
            assert_eq!(r.status, 202, "{}", r.text());
            r.json()["id"].as_str().unwrap().to_string()
        }
    });
    futures_util::future::join_all(submits).await
}

#[tokio::test(flavor = "multi_thread")]
async fn queued_jobs_go_in_few_batched_calls_and_each_keeps_its_own_result() {
    require_docker!();
    let gw = Gateway::start().await;
    deploy_batcher(&gw, "batcher", 8, "300ms").await;
    let refused = gw
        .request(
            Method::POST,
            "/api/v1/functions/batcher/jobs",
            &[],
            "not json",
        )
        .await;
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert!(
        refused.text().contains("[jobs] batch"),
        "{}",
        refused.text()
    );
    let inputs: Vec<Value> = (0..20).map(|n| json!({ "n": n })).collect();
    let ids = submit_all(&gw, "batcher", &inputs).await;
    for (n, id) in ids.iter().enumerate() {
        let job = wait_for(&gw, id, "succeeded", Duration::from_secs(60)).await;
        assert_eq!(job["attempt"], 1, "{job}");
        let r = gw
            .request(Method::GET, &format!("/api/v1/jobs/{id}/result"), &[], "")
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/json")
        );
        let result = r.json();
        assert_eq!(result["input"]["n"], n, "job {n}'s own result: {result}");
        let (batch, index) = (result["batch"].as_u64(), result["index"].as_u64());
        assert!(batch.unwrap() > index.unwrap(), "{result}");
    }
    let stats = gw.request(Method::GET, "/fn/batcher/stats", &[], "").await;
    let stats = stats.json();
    assert_eq!(stats["items"], 20, "{stats}");
    let calls = stats["calls"].as_u64().unwrap();
    assert!(
        (3..=6).contains(&calls),
        "20 jobs in batches of 8 take 3 calls or a few more, not 20: {stats}"
    );
    let token = format!("Bearer {}", gw.token);
    let metrics = gw
        .request(Method::GET, "/metrics", &[("authorization", &token)], "")
        .await
        .text();
    for line in [
        "ember_jobs_finished_total{function=\"batcher\",state=\"succeeded\"} 20".to_string(),
        format!("ember_job_batch_size_count{{function=\"batcher\"}} {calls}"),
        "ember_job_batch_size_sum{function=\"batcher\"} 20".to_string(),
        "ember_jobs{function=\"batcher\",state=\"queued\"} 0".to_string(),
    ] {
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_batch_runs_its_jobs_one_by_one_and_only_the_bad_input_fails() {
    require_docker!();
    let gw = Gateway::start().await;
    // All five fill the batch (max 5) long before it could go partial.
    deploy_batcher(&gw, "picky", 5, "30s").await;
    let mut inputs: Vec<Value> = (0..5).map(|n| json!({ "n": n })).collect();
    inputs[2] = json!({ "n": 2, "fail": true });
    let ids = submit_all(&gw, "picky", &inputs).await;
    for (n, id) in ids.iter().enumerate() {
        let want = if n == 2 { "failed" } else { "succeeded" };
        let job = wait_for(&gw, id, want, Duration::from_secs(60)).await;
        assert_eq!(
            job["attempt"], 1,
            "the refused batch counted no attempt: {job}"
        );
        if n == 2 {
            assert_eq!(job["status"], 400, "{job}");
            let result = gw
                .request(Method::GET, &format!("/api/v1/jobs/{id}/result"), &[], "")
                .await;
            assert!(result.text().contains("asked to fail"), "{}", result.text());
        } else {
            let result = gw
                .request(Method::GET, &format!("/api/v1/jobs/{id}/result"), &[], "")
                .await
                .json();
            assert_eq!(result["input"]["n"], n);
            assert_eq!(
                result["batch"], 1,
                "run again in a batch of its own: {result}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_still_filling_holds_up_no_other_path() {
    require_docker!();
    let gw = Gateway::start().await;
    deploy_batcher(&gw, "mixed", 4, "60s").await;
    // One job to /a waits (a minute) for three more; four to /b fill a batch and go.
    let a = submit_all(&gw, "mixed/jobs?path=/a", &[json!({ "n": 0 })]).await;
    let inputs: Vec<Value> = (1..5).map(|n| json!({ "n": n })).collect();
    let b = submit_all(&gw, "mixed/jobs?path=/b", &inputs).await;
    for id in &b {
        wait_for(&gw, id, "succeeded", Duration::from_secs(30)).await;
        let result = gw
            .request(Method::GET, &format!("/api/v1/jobs/{id}/result"), &[], "")
            .await
            .json();
        assert_eq!(result["batch"], 4, "{result}");
    }
    let waiting = gw.get_json(&format!("/api/v1/jobs/{}", a[0])).await;
    assert_eq!(waiting["state"], "queued", "still filling: {waiting}");
}
