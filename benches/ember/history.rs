//! History: what recording every invocation costs the warm path. Two gateways serve the
//! same warm function, one keeping the invocation history and one with `--history-max 0`;
//! rounds of requests at concurrency 64 go to each in turn (so drift of the machine hits
//! both alike), and the gateway with history must then hold one record per request.

use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{self, Gateway};
use crate::probe::{http_client, send, HttpClient};
use crate::report::{row, Row};
use crate::Size;

/// Rounds per gateway; the requests of each is `history_requests / ROUNDS`. The order
/// alternates (on, off, then off, on) so neither gateway always goes first.
const ROUNDS: usize = 10;

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
    let mut answered = [0u64; 2];
    let mut rounds = [Vec::new(), Vec::new()];
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            // What a round leaves behind (connections closing, a batch written) settles
            // before the next begins.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (ok, t) = requests(&client, &urls[i], per_round).await;
            answered[i] += ok;
            rounds[i].push(ok as f64 / t.as_secs_f64());
        }
    }
    // Each pair of rounds (one per gateway, back to back) gives a ratio; their median is
    // the cost of the history, with the machine's drift and the order cancelled out.
    let pairs: Vec<f64> = rounds[0]
        .iter()
        .zip(&rounds[1])
        .map(|(on, off)| on / off)
        .collect();
    // Each gateway's median round: a round slowed by the machine moves it little.
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for (i, what) in ["on", "off"].iter().enumerate() {
        let each: Vec<u64> = rounds[i].iter().map(|r| *r as u64).collect();
        eprintln!("  history {what}: req/s per round {each:?}");
    }
    rows.push(row(
        "history",
        &format!(
            "throughput c=64, {} requests (history on vs off, median round)",
            answered[0]
        ),
        median(&rounds[0]),
        Some(median(&rounds[1])),
        "req/s",
    ));
    rows.push(row(
        "history",
        &format!("throughput on/off, median of {ROUNDS} paired rounds"),
        median(&pairs),
        Some(1.0),
        "ratio",
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
