//! Ember against its baselines, side by side, in one run.
//!
//! `cargo bench --bench ember` runs every scenario at full size; `-- --quick` runs each small
//! enough to finish in about a minute; `-- --only warm,cold,resume,burst,control` picks some. Both print a table (medians, p99s, ratios) and write
//! `target/ember-bench.json`: a list of `{scenario, metric, ember, baseline, ratio, unit}`.
//!
//! Scenarios:
//! 1. warm path: the same requests through the gateway and straight to the container's
//!    published port (latency p50/p99, small and 1 MiB bodies; throughput at concurrency 64);
//! 2. cold start: first response of a scaled-to-zero function through the gateway vs the same
//!    create + start + readiness + first request done here with bollard;
//! 3. burst: N concurrent requests into a cold function: all answered, containers started,
//!    gateway peak memory, time to the last answer;
//! 4. control plane: deploy many functions, list them, restart the gateway.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::query_parameters::{CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder};
use bytes::Bytes;
use common::Gateway;
use http::Method;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

#[derive(Serialize, Clone)]
struct Row {
    scenario: String,
    metric: String,
    ember: f64,
    baseline: Option<f64>,
    ratio: Option<f64>,
    unit: String,
}

fn row(scenario: &str, metric: &str, ember: f64, baseline: Option<f64>, unit: &str) -> Row {
    Row {
        scenario: scenario.into(),
        metric: metric.into(),
        ember,
        baseline,
        ratio: baseline.filter(|b| *b != 0.0).map(|b| ember / b),
        unit: unit.into(),
    }
}

struct Size {
    latency_requests: usize,
    big_requests: usize,
    throughput_for: Duration,
    cold_rounds: usize,
    burst: usize,
    functions: usize,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn http_client() -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(20_000)
        .build(c)
}

async fn send(client: &HttpClient, url: &str, body: Bytes) -> (u16, usize) {
    let req = http::Request::post(url).body(Full::new(body)).unwrap();
    match client.request(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let n = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            (status, n)
        }
        Err(_) => (0, 0),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
}

fn rss_kib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(f64::NAN)
}

async fn docker() -> bollard::Docker {
    bollard::Docker::connect_with_defaults()
        .unwrap()
        .negotiate_version()
        .await
        .unwrap()
}

/// The host port Docker published the container's port 8080 on.
async fn published_port(docker: &bollard::Docker, container: &str) -> u16 {
    let inspect = docker.inspect_container(container, None).await.unwrap();
    inspect.network_settings.unwrap().ports.unwrap()["8080/tcp"]
        .as_ref()
        .unwrap()[0]
        .host_port
        .as_ref()
        .unwrap()
        .parse()
        .unwrap()
}

async fn warm_path(size: &Size, rows: &mut Vec<Row>) {
    let gw = Gateway::start().await;
    let manifest = common::echo_manifest(
        "warm",
        "",
        "[scale]\nmax = 1\nconcurrency = 1000\nidle_timeout = \"1h\"\n[request]\nmax_body = \"8MiB\"",
    );
    assert!(gw.deploy("warm", &manifest).await.status.is_success());
    let client = http_client();
    let via = format!("{}/fn/warm/", gw.url);
    assert_eq!(send(&client, &via, Bytes::new()).await.0, 200);
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
        // Warm both connection pools, then interleave so drift hits both alike.
        for _ in 0..50 {
            send(&client, &via, body.clone()).await;
            send(&client, &direct, body.clone()).await;
        }
        let (mut e, mut b) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..n {
            let t = Instant::now();
            assert_eq!(send(&client, &via, body.clone()).await.0, 200);
            e.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            assert_eq!(send(&client, &direct, body.clone()).await.0, 200);
            b.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (e, b) = (sorted(e), sorted(b));
        for (p, name) in [(0.5, "p50"), (0.99, "p99")] {
            let (pe, pb) = (percentile(&e, p), percentile(&b, p));
            rows.push(row(
                "warm",
                &format!("{label} latency {name}"),
                pe,
                Some(pb),
                "ms",
            ));
            rows.push(row(
                "warm",
                &format!("{label} added latency {name}"),
                (pe - pb) * 1e3,
                None,
                "us",
            ));
        }
    }

    for (target, url) in [
        ("gateway", via.clone()),
        ("direct, published port", direct.clone()),
        ("direct, container address", bridge.clone()),
    ] {
        let _ = target;
        let done = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + size.throughput_for;
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (client, url, done) = (client.clone(), url.clone(), done.clone());
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
        let rps = done.load(Ordering::Relaxed) as f64 / size.throughput_for.as_secs_f64();
        rows.push(row(
            "warm",
            &format!("throughput c=64 ({target})"),
            rps,
            None,
            "req/s",
        ));
    }
    let n = rows.len();
    let (g, d, b) = (rows[n - 3].ember, rows[n - 2].ember, rows[n - 1].ember);
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

async fn cold_start(size: &Size, rows: &mut Vec<Row>) {
    let gw = Gateway::start().await;
    let client = http_client();
    let mut ember = Vec::new();
    for i in 0..size.cold_rounds {
        let name = format!("cold{i}");
        let manifest = common::echo_manifest(&name, "", "");
        assert!(gw.deploy(&name, &manifest).await.status.is_success());
        let t = Instant::now();
        let (status, _) = send(&client, &format!("{}/fn/{name}/", gw.url), Bytes::new()).await;
        ember.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(status, 200);
        gw.request(
            Method::DELETE,
            &format!("/api/v1/functions/{name}"),
            &[],
            Bytes::new(),
        )
        .await;
    }

    // The same sequence by hand: create (same config), start, inspect, poll, first request.
    let docker = docker().await;
    let manifest = ember::manifest::Manifest::parse(
        &common::echo_manifest("direct", "", ""),
        ember::manifest::Format::Toml,
    )
    .unwrap();
    let mut baseline = Vec::new();
    for i in 0..size.cold_rounds {
        let spec = ember::runtime::ContainerSpec {
            name: format!("ember-bench-direct-{}-{i}", std::process::id()),
            image: manifest.image.clone().unwrap(),
            command: None,
            env: vec![],
            labels: HashMap::from([("ember.bench".to_string(), "direct".to_string())]),
            port: manifest.port,
            host_ip: "127.0.0.1".parse().unwrap(),
            cpus: manifest.resources.cpus,
            memory_bytes: manifest.resources.memory.as_u64(),
            pids_limit: 4096,
            gpus: None,
        };
        let t = Instant::now();
        let created = docker
            .create_container(
                Some(
                    CreateContainerOptionsBuilder::new()
                        .name(&spec.name)
                        .build(),
                ),
                ember::runtime::docker::create_body(&spec),
            )
            .await
            .unwrap();
        docker.start_container(&created.id, None).await.unwrap();
        let port = published_port(&docker, &created.id).await;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let health = format!("http://{addr}/healthz");
        let probe = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build_http::<Full<Bytes>>();
        let mut interval = Duration::from_millis(2);
        loop {
            let req = http::Request::get(&health)
                .body(Full::new(Bytes::new()))
                .unwrap();
            if let Ok(r) = probe.request(req).await {
                if r.status().is_success() {
                    break;
                }
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 3 / 2).min(Duration::from_millis(50));
        }
        let (status, _) = send(&client, &format!("http://{addr}/"), Bytes::new()).await;
        baseline.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(status, 200);
        docker
            .remove_container(
                &created.id,
                Some(RemoveContainerOptionsBuilder::new().force(true).build()),
            )
            .await
            .unwrap();
    }
    let (e, b) = (sorted(ember), sorted(baseline));
    let (me, mb) = (percentile(&e, 0.5), percentile(&b, 0.5));
    rows.push(row(
        "cold start",
        "time to first response p50",
        me,
        Some(mb),
        "ms",
    ));
    rows.push(row(
        "cold start",
        "time to first response max",
        *e.last().unwrap(),
        Some(*b.last().unwrap()),
        "ms",
    ));
    rows.push(row(
        "cold start",
        "overhead over direct p50",
        me - mb,
        None,
        "ms",
    ));
}

async fn resume_from_pause(size: &Size, rows: &mut Vec<Row>) {
    let gw = Gateway::start().await;
    let manifest = common::echo_manifest(
        "paused",
        "",
        "[scale]\non_idle = \"pause\"\nidle_timeout = \"1s\"\npause_timeout = \"1h\"",
    );
    assert!(gw.deploy("paused", &manifest).await.status.is_success());
    let client = http_client();
    let url = format!("{}/fn/paused/", gw.url);
    let mut ember = Vec::new();
    assert_eq!(send(&client, &url, Bytes::new()).await.0, 200);
    for _ in 0..size.cold_rounds {
        let deadline = Instant::now() + Duration::from_secs(10);
        while gw.function("paused").await["paused"] != 1 {
            assert!(Instant::now() < deadline, "the instance never paused");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Let the pause settle in Docker before timing the resume.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        assert_eq!(send(&client, &url, Bytes::new()).await.0, 200);
        ember.push(t.elapsed().as_secs_f64() * 1e3);
    }
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
    let mut baseline = Vec::new();
    // Stop the gateway first so it does not pause or resume under the baseline.
    let mut gw = gw;
    gw.kill();
    for _ in 0..size.cold_rounds {
        docker.pause_container(&container).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        docker.unpause_container(&container).await.unwrap();
        assert_eq!(send(&client, &direct_url, Bytes::new()).await.0, 200);
        baseline.push(t.elapsed().as_secs_f64() * 1e3);
    }
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

async fn burst(size: &Size, rows: &mut Vec<Row>) {
    let gw = Gateway::start().await;
    let pid = gw.pid().unwrap();
    let concurrency = 1000;
    // A slow start keeps every request parked long enough to weigh them.
    let manifest = common::echo_manifest(
        "burst",
        "command = [\"--delay-start\", \"2000\"]",
        &format!(
            "[scale]\nmax = 20\nconcurrency = {concurrency}\n[queue]\ncapacity = 20000\ntimeout = \"120s\""
        ),
    );
    assert!(gw.deploy("burst", &manifest).await.status.is_success());
    let idle_rss = rss_kib(pid, "VmRSS:");
    let client = http_client();
    let url = format!("{}/fn/burst/sleep/200", gw.url);
    let t = Instant::now();
    let mut tasks = Vec::with_capacity(size.burst);
    for _ in 0..size.burst {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            send(&client, &url, Bytes::from_static(b"x")).await.0
        }));
    }
    let mut parked_rss = f64::NAN;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let f = gw.function("burst").await;
        if f["queued"].as_u64() == Some(size.burst as u64) {
            parked_rss = rss_kib(pid, "VmRSS:");
            break;
        }
        if f["ready"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut ok = 0;
    for task in tasks {
        if task.await.unwrap() == 200 {
            ok += 1;
        }
    }
    let elapsed = t.elapsed().as_secs_f64();
    let peak = rss_kib(pid, "VmHWM:");
    let starts = gw.function("burst").await["starts"].as_f64().unwrap();
    let n = size.burst as f64;
    rows.push(row(
        "burst",
        &format!("answered 200 of {}", size.burst),
        ok as f64,
        Some(n),
        "requests",
    ));
    rows.push(row(
        "burst",
        &format!("containers started (concurrency {concurrency})"),
        starts,
        Some((n / concurrency as f64).ceil()),
        "containers",
    ));
    rows.push(row(
        "burst",
        "time to last answer (2 s cold start)",
        elapsed * 1e3,
        None,
        "ms",
    ));
    rows.push(row(
        "burst",
        "gateway memory per parked request",
        (parked_rss - idle_rss) / n,
        None,
        "KiB",
    ));
    rows.push(row("burst", "gateway peak RSS", peak / 1024.0, None, "MiB"));
    rows.push(row(
        "burst",
        "gateway peak memory per request (all in flight)",
        (peak - idle_rss) / n,
        None,
        "KiB",
    ));
}

async fn control_plane(size: &Size, rows: &mut Vec<Row>) {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::builder().data_dir(dir.path()).start().await;
    let t = Instant::now();
    for i in 0..size.functions {
        let name = format!("f{i}");
        let r = gw
            .deploy(
                &name,
                &format!("name = \"{name}\"\nimage = \"{}\"\n", common::echo_image()),
            )
            .await;
        assert!(r.status.is_success(), "{}", r.text());
    }
    let deploy = t.elapsed().as_secs_f64() * 1e3;
    rows.push(row(
        "control plane",
        &format!("deploy {} functions", size.functions),
        deploy,
        None,
        "ms",
    ));
    rows.push(row(
        "control plane",
        "deploy, per function",
        deploy / size.functions as f64,
        None,
        "ms",
    ));
    let t = Instant::now();
    let list = gw.get_json("/api/v1/functions").await;
    rows.push(row(
        "control plane",
        "list",
        t.elapsed().as_secs_f64() * 1e3,
        None,
        "ms",
    ));
    assert_eq!(list["functions"].as_array().unwrap().len(), size.functions);
    rows.push(row(
        "control plane",
        "gateway RSS",
        rss_kib(gw.pid().unwrap(), "VmRSS:") / 1024.0,
        None,
        "MiB",
    ));
    gw.kill();
    let t = Instant::now();
    let gw = Gateway::builder().data_dir(dir.path()).start().await;
    rows.push(row(
        "control plane",
        "restart until serving",
        t.elapsed().as_secs_f64() * 1e3,
        None,
        "ms",
    ));
    let list = gw.get_json("/api/v1/functions").await;
    assert_eq!(list["functions"].as_array().unwrap().len(), size.functions);
}

fn print_table(rows: &[Row]) {
    println!(
        "\n{:<14} {:<44} {:>12} {:>12} {:>8}  unit",
        "scenario", "metric", "ember", "baseline", "ratio"
    );
    for r in rows {
        let b = r.baseline.map_or("-".into(), |b| format!("{b:.3}"));
        let ratio = r.ratio.map_or("-".into(), |x| format!("{x:.3}"));
        println!(
            "{:<14} {:<44} {:>12.3} {:>12} {:>8}  {}",
            r.scenario, r.metric, r.ember, b, ratio, r.unit
        );
    }
}

/// 10 000, or as many as the open-file limit allows: the gateway holds two sockets per
/// request in flight (client and instance), and this process one.
fn burst_size() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|line| line.starts_with("Max open files"))
                .and_then(|line| line.split_whitespace().nth(3))
                .and_then(|v| v.parse::<usize>().ok())
        })
        .unwrap_or(1024);
    10_000.min(soft.saturating_sub(1024) / 2)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let size = if quick {
        Size {
            latency_requests: 1000,
            big_requests: 100,
            throughput_for: Duration::from_secs(3),
            cold_rounds: 10,
            burst: 1000,
            functions: 200,
        }
    } else {
        Size {
            latency_requests: 10_000,
            big_requests: 1000,
            throughput_for: Duration::from_secs(10),
            cold_rounds: 20,
            burst: burst_size(),
            functions: 1000,
        }
    };
    if !common::docker_available() {
        eprintln!("the benchmark needs Docker");
        std::process::exit(1);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    // `--only warm,burst` runs some scenarios (for profiling one at a time).
    let only: Option<Vec<String>> = std::env::args()
        .skip_while(|a| a != "--only")
        .nth(1)
        .map(|v| v.split(',').map(str::to_string).collect());
    let wanted = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|w| w == name));
    rt.block_on(async {
        common::echo_image();
        if wanted("warm") {
            eprintln!("warm path…");
            warm_path(&size, &mut rows).await;
        }
        if wanted("cold") {
            eprintln!("cold start…");
            cold_start(&size, &mut rows).await;
        }
        if wanted("resume") {
            eprintln!("resume from pause…");
            resume_from_pause(&size, &mut rows).await;
        }
        if wanted("burst") {
            eprintln!("burst of {}…", size.burst);
            burst(&size, &mut rows).await;
        }
        if wanted("control") {
            eprintln!("control plane…");
            control_plane(&size, &mut rows).await;
        }
    });
    print_table(&rows);
    let out = common::repo().join("target/ember-bench.json");
    std::fs::write(&out, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    println!("\nwritten to {}", out.display());
}
