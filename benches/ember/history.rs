//! History: what recording every invocation costs the warm path. Two gateways serve the
//! same warm function, one keeping the invocation history and one with `--history-max 0`;
//! rounds of requests at concurrency 64 go to each in turn (so drift of the machine hits
//! both alike), and the gateway with history must then hold one record per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::common::{self, Gateway};
use crate::probe::{http_client, send, HttpClient};
use crate::report::{row, Row};
use crate::Size;

/// Rounds per gateway; the requests of each is `history_requests / ROUNDS`.
const ROUNDS: usize = 5;

async fn gateway(args: &[&str]) -> Gateway {
    let gw = Gateway::builder().args(args).start().await;
    let manifest = common::echo_manifest(
        "warm",
        "",
        "[scale]\nmax = 1\nconcurrency = 1000\nidle_timeout = \"1h\"",
    );
    assert!(gw.deploy("warm", &manifest).await.status.is_success());
    gw
}

/// `n` small requests to `url` from 64 tasks; the 200s and how long they took.
async fn requests(client: &HttpClient, url: &str, n: usize) -> (u64, Duration) {
    let left = Arc::new(AtomicU64::new(n as u64));
    let ok = Arc::new(AtomicU64::new(0));
    let began = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (client, url, left, ok) = (client.clone(), url.to_string(), left.clone(), ok.clone());
        tasks.push(tokio::spawn(async move {
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1))
                .is_ok()
            {
                if send(&client, &url, Bytes::from_static(b"hello")).await.0 == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (ok.load(Ordering::Relaxed), began.elapsed())
}

pub async fn run(size: &Size, rows: &mut Vec<Row>) {
    let on = gateway(&[]).await;
    let off = gateway(&["--history-max", "0"]).await;
    let client = http_client();
    let urls = [
        format!("{}/fn/warm/", on.url),
        format!("{}/fn/warm/", off.url),
    ];
    // Cold starts and warm-up, then measured rounds, alternating.
    for url in &urls {
        requests(&client, url, 2000).await;
    }
    let per_round = size.history_requests / ROUNDS;
    let mut took = [Duration::ZERO; 2];
    let mut answered = [0u64; 2];
    for _ in 0..ROUNDS {
        for (i, url) in urls.iter().enumerate() {
            let (ok, t) = requests(&client, url, per_round).await;
            answered[i] += ok;
            took[i] += t;
        }
    }
    let rps = |i: usize| answered[i] as f64 / took[i].as_secs_f64();
    rows.push(row(
        "history",
        &format!(
            "throughput c=64, {} requests (history on vs off)",
            answered[0]
        ),
        rps(0),
        Some(rps(1)),
        "req/s",
    ));
    // Every request of the gateway with history left a record: usage counts them.
    let began = Instant::now();
    let usage = on.get_json("/api/v1/usage?since=1h").await;
    let summed = began.elapsed();
    let records = usage["total"]["invocations"].as_u64().unwrap();
    let sent = answered[0] + 2000;
    assert_eq!(records, sent, "one record per request: {usage}");
    rows.push(row(
        "history",
        &format!("records kept of {sent} requests"),
        records as f64,
        Some(sent as f64),
        "records",
    ));
    rows.push(row(
        "history",
        &format!("ember usage over {records} records"),
        summed.as_secs_f64() * 1000.0,
        None,
        "ms",
    ));
}
