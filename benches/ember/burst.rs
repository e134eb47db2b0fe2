//! Burst: N concurrent requests into a cold function with a slow start: all answered,
//! containers started, the gateway's memory per parked request and at its peak, and the
//! time to the last answer.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::task::JoinHandle;

use crate::common::{self, Gateway};
use crate::probe::{http_client, rss_kib, send, HttpClient};
use crate::report::{row, Row};
use crate::Size;

/// Requests one instance takes at a time: a burst of N needs N / this containers.
const CONCURRENCY: usize = 1000;

/// What one burst showed.
struct Outcome {
    /// Requests answered 200.
    ok: usize,
    /// Seconds from the first request sent to the last answer.
    elapsed: f64,
    /// Gateway RSS (KiB) with the function deployed and nothing in flight.
    idle_rss: f64,
    /// Gateway RSS (KiB) with every request parked; NaN if they never all were.
    parked_rss: f64,
    /// Gateway peak RSS (KiB).
    peak: f64,
    /// Containers the function started.
    starts: f64,
}

pub async fn run(size: &Size, rows: &mut Vec<Row>) {
    let gw = Gateway::start().await;
    let pid = gw.pid().unwrap();
    // A slow start keeps every request parked long enough to weigh them.
    let manifest = common::echo_manifest(
        "burst",
        "command = [\"--delay-start\", \"2000\"]",
        &format!(
            "[scale]\nmax = 20\nconcurrency = {CONCURRENCY}\n[queue]\ncapacity = 20000\ntimeout = \"120s\""
        ),
    );
    assert!(gw.deploy("burst", &manifest).await.status.is_success());
    let idle_rss = rss_kib(pid, "VmRSS:");
    let client = http_client();
    let url = format!("{}/fn/burst/sleep/200", gw.url);
    let t = Instant::now();
    let tasks = fire(&client, &url, size.burst);
    let parked_rss = parked_rss(&gw, pid, size.burst).await;
    let mut ok = 0;
    for task in tasks {
        if task.await.unwrap() == 200 {
            ok += 1;
        }
    }
    let outcome = Outcome {
        ok,
        elapsed: t.elapsed().as_secs_f64(),
        idle_rss,
        parked_rss,
        peak: rss_kib(pid, "VmHWM:"),
        starts: gw.function("burst").await["starts"].as_f64().unwrap(),
    };
    report(&outcome, size.burst, rows);
}

/// Sends `n` requests to `url` at once, each on its own task; the tasks answer their statuses.
fn fire(client: &HttpClient, url: &str, n: usize) -> Vec<JoinHandle<u16>> {
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (client, url) = (client.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            send(&client, &url, Bytes::from_static(b"x")).await.0
        }));
    }
    tasks
}

/// The gateway's RSS once all `n` requests are queued; NaN if an instance became ready
/// first or 30 s passed.
async fn parked_rss(gw: &Gateway, pid: u32, n: usize) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let f = gw.function("burst").await;
        if f["queued"].as_u64() == Some(n as u64) {
            return rss_kib(pid, "VmRSS:");
        }
        if f["ready"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f64::NAN
}

fn report(o: &Outcome, burst: usize, rows: &mut Vec<Row>) {
    let n = burst as f64;
    rows.push(row(
        "burst",
        &format!("answered 200 of {burst}"),
        o.ok as f64,
        Some(n),
        "requests",
    ));
    rows.push(row(
        "burst",
        &format!("containers started (concurrency {CONCURRENCY})"),
        o.starts,
        Some((n / CONCURRENCY as f64).ceil()),
        "containers",
    ));
    rows.push(row(
        "burst",
        "time to last answer (2 s cold start)",
        o.elapsed * 1e3,
        None,
        "ms",
    ));
    rows.push(row(
        "burst",
        "gateway memory per parked request",
        (o.parked_rss - o.idle_rss) / n,
        None,
        "KiB",
    ));
    rows.push(row(
        "burst",
        "gateway peak RSS",
        o.peak / 1024.0,
        None,
        "MiB",
    ));
    rows.push(row(
        "burst",
        "gateway peak memory per request (all in flight)",
        (o.peak - o.idle_rss) / n,
        None,
        "KiB",
    ));
}
