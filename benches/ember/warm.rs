//! Warm path: the same requests through the gateway and straight to the container's
//! published port (latency p50/p99, small and 1 MiB bodies), and throughput at concurrency
//! 64 through the gateway, the published port and the container's own address.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::common::{self, Gateway};
use crate::probe::{docker, http_client, published_port, send, HttpClient};
use crate::report::{percentile, row, sorted, Row};
use crate::Size;

/// Where the same request can go.
struct Targets {
    /// Through the gateway.
    via: String,
    /// The container's published port (through Docker's userland proxy).
    direct: String,
    /// The container's bridge address, where Ember itself reaches it.
    bridge: String,
}

pub async fn run(size: &Size, rows: &mut Vec<Row>) {
    let gw = Gateway::start().await;
    let manifest = common::echo_manifest(
        "warm",
        "",
        "[scale]\nmax = 1\nconcurrency = 1000\nidle_timeout = \"1h\"\n[request]\nmax_body = \"8MiB\"",
    );
    assert!(gw.deploy("warm", &manifest).await.status.is_success());
    let client = http_client();
    let targets = targets(&gw, &client).await;
    for (label, body, n) in [
        (
            "small body",
            Bytes::from_static(b"hello"),
            size.latency_requests,
        ),
        (
            "1 MiB body",
            Bytes::from(vec![b'x'; 1 << 20]),
            size.big_requests,
        ),
    ] {
        latency(
            &client,
            "warm",
            (&targets.via, &targets.direct),
            label,
            body,
            n,
            rows,
        )
        .await;
    }
    throughput(&client, &targets, size, rows).await;
}

/// Starts the instance with a first request and finds its addresses.
async fn targets(gw: &Gateway, client: &HttpClient) -> Targets {
    let via = format!("{}/fn/warm/", gw.url);
    assert_eq!(send(client, &via, Bytes::new()).await.0, 200);
    let status = gw.function("warm").await;
    // The baseline the issue names: the container's published port (through Docker's
    // userland proxy). Ember itself reaches the container at its bridge address.
    let container = status["instances"][0]["container_id"]
        .as_str()
        .unwrap()
        .to_string();
    let docker = docker().await;
    let published = published_port(&docker, &container).await;
    let direct = format!("http://127.0.0.1:{published}/");
    let endpoint = status["instances"][0]["endpoint"]
        .as_str()
        .unwrap()
        .to_string();
    let bridge = format!("http://{endpoint}/");
    Targets {
        via,
        direct,
        bridge,
    }
}

/// `n` requests with `body` through the gateway (`via`) and straight to the container
/// (`direct`), interleaved; rows of `scenario`.
pub async fn latency(
    client: &HttpClient,
    scenario: &str,
    (via, direct): (&str, &str),
    label: &str,
    body: Bytes,
    n: usize,
    rows: &mut Vec<Row>,
) {
    // Warm both connection pools, then interleave so drift hits both alike.
    for _ in 0..50 {
        send(client, via, body.clone()).await;
        send(client, direct, body.clone()).await;
    }
    let (mut e, mut b) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let t = Instant::now();
        assert_eq!(send(client, via, body.clone()).await.0, 200);
        e.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        assert_eq!(send(client, direct, body.clone()).await.0, 200);
        b.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (e, b) = (sorted(e), sorted(b));
    for (p, name) in [(0.5, "p50"), (0.99, "p99")] {
        let (pe, pb) = (percentile(&e, p), percentile(&b, p));
        rows.push(row(
            scenario,
            &format!("{label} latency {name}"),
            pe,
            Some(pb),
            "ms",
        ));
        rows.push(row(
            scenario,
            &format!("{label} added latency {name}"),
            (pe - pb) * 1e3,
            None,
            "us",
        ));
    }
}

/// Requests per second at concurrency 64 to each target, then the gateway's against each
/// direct one.
async fn throughput(client: &HttpClient, targets: &Targets, size: &Size, rows: &mut Vec<Row>) {
    let mut rps = Vec::new();
    for (target, url) in [
        ("gateway", &targets.via),
        ("direct, published port", &targets.direct),
        ("direct, container address", &targets.bridge),
    ] {
        let r = requests_per_second(client, url, size).await;
        rows.push(row(
            "warm",
            &format!("throughput c=64 ({target})"),
            r,
            None,
            "req/s",
        ));
        rps.push(r);
    }
    let (g, d, b) = (rps[0], rps[1], rps[2]);
    rows.push(row(
        "warm",
        "throughput c=64 vs published port",
        g,
        Some(d),
        "req/s",
    ));
    rows.push(row(
        "warm",
        "throughput c=64 vs container address",
        g,
        Some(b),
        "req/s",
    ));
}

/// 64 tasks sending small requests to `url` for `size.throughput_for`; the 200s per second.
pub async fn requests_per_second(client: &HttpClient, url: &str, size: &Size) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + size.throughput_for;
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (client, url, done) = (client.clone(), url.to_string(), done.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                if send(&client, &url, Bytes::from_static(b"hello")).await.0 == 200 {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / size.throughput_for.as_secs_f64()
}
