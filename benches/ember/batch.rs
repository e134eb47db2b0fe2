//! Batch: jobs per second through `functions/batch-stub` (300 ms a call whatever its size,
//! plus 2 ms an item, one call at a time, as one GPU) with and without `[jobs] batch =
//! { max = 32, wait = "2s" }`, in one run. Each function has one warm instance; N jobs are
//! submitted by 32 clients at once and the clock stops when the last has succeeded (read
//! from the queue's counts). The ratio is the gain of batch mode (goal: 10× or more).

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::common::{self, Gateway};
use crate::probe::{http_client, send};
use crate::report::{row, Row};
use crate::Size;

const FIXED_MS: u32 = 300;
const ITEM_MS: u32 = 2;

async fn deploy(gw: &Gateway, name: &str, image: &str, batch: &str) {
    let manifest = format!(
        "name = \"{name}\"\nimage = \"{image}\"\nport = 8080\n\
         env = {{ FIXED_MS = \"{FIXED_MS}\", ITEM_MS = \"{ITEM_MS}\" }}\n\
         [readiness]\nhttp_path = \"/healthz\"\n\
         [scale]\nmin = 1\nmax = 1\nconcurrency = 1\nidle_timeout = \"1h\"\n{batch}"
    );
    let r = gw.deploy(name, &manifest).await;
    assert!(r.status.is_success(), "{}", r.text());
}

/// Submits `n` jobs to `function` from 32 clients; the time from the first submission to
/// the last job's success, and how long the submissions took.
async fn jobs(gw: &Gateway, function: &str, n: usize) -> (Duration, Duration) {
    let client = http_client();
    let url = format!("{}/api/v1/functions/{function}/jobs", gw.url);
    let began = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (client, url, next) = (client.clone(), url.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let body = Bytes::from(format!("{{\"item\":{i}}}"));
                assert_eq!(send(&client, &url, body).await.0, 202, "job {i} accepted");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let submitted = began.elapsed();
    let counts = format!("/api/v1/functions/{function}/queue");
    loop {
        let c = gw.get_json(&counts).await;
        let ended = ["succeeded", "failed", "cancelled", "expired"]
            .iter()
            .map(|s| c[s].as_u64().unwrap_or(0))
            .sum::<u64>();
        if ended >= n as u64 {
            assert_eq!(c["succeeded"], n as u64, "every job succeeded: {c}");
            return (began.elapsed(), submitted);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run(size: &Size, rows: &mut Vec<Row>) {
    let image = common::function_image("batch-stub");
    let gw = Gateway::start().await;
    deploy(
        &gw,
        "batched",
        &image,
        "[jobs]\nbatch = { max = 32, wait = \"2s\" }",
    )
    .await;
    deploy(&gw, "single", &image, "").await;
    for f in ["batched", "single"] {
        common::eventually(Duration::from_secs(60), "a warm instance", || async {
            gw.function(f).await["ready"] == 1
        })
        .await;
    }
    let n = size.batch_jobs;
    let (batched, submit_batched) = jobs(&gw, "batched", n).await;
    eprintln!("  batch mode: {n} jobs in {batched:?} (submitted in {submit_batched:?})");
    let (single, submit_single) = jobs(&gw, "single", n).await;
    eprintln!("  one by one: {n} jobs in {single:?} (submitted in {submit_single:?})");
    let calls = |f: &str| {
        let gw = &gw;
        let path = format!("/fn/{f}/stats");
        async move { gw.get_json(&path).await["calls"].as_u64().unwrap_or(0) }
    };
    let per_s = |t: Duration| n as f64 / t.as_secs_f64();
    rows.push(row(
        "batch",
        &format!("{n} jobs, batch max 32 vs one by one"),
        per_s(batched),
        Some(per_s(single)),
        "jobs/s",
    ));
    rows.push(row(
        "batch",
        &format!("calls to the function for {n} jobs (batched vs not)"),
        calls("batched").await as f64,
        Some(calls("single").await as f64),
        "calls",
    ));
    rows.push(row(
        "batch",
        &format!("{n} durable submissions from 32 clients"),
        n as f64 / submit_batched.min(submit_single).as_secs_f64(),
        None,
        "jobs/s",
    ));
}
