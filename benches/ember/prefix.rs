//! Prefix: the OpenAI front door's `prefix` routing against `least_loaded`, in one run.
//!
//! Two functions of `functions/llm-stub`, each with 4 ready instances, one per routing.
//! The same 2 000 chat requests (concurrency 16) go to each: 20 system prompts of about
//! 2 KiB, picked by a Zipf law (s = 1), each with its own short question. The stub
//! charges 2 µs of simulated prefill per prompt byte not in its prefix cache (the last
//! `CACHE_ENTRIES` prompts it saw, each instance its own, as a KV cache holds a few
//! prefixes) and reports what it found cached. Rows: the share of prompt bytes served
//! from cache, the mean simulated time to first token, the mean latency seen here, the
//! busiest instance's requests in flight (sampled every 20 ms from the gateway's status)
//! against the mean, and the most requests one instance served against the mean.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::common::{self, Gateway};
use crate::probe::{http_client, HttpClient};
use crate::report::{row, Row};
use crate::Size;

const INSTANCES: usize = 4;
const PROMPTS: usize = 20;
const CONCURRENCY: usize = 16;
/// Prompt prefixes each instance's cache holds: 40% of them.
const CACHE_ENTRIES: usize = 8;

/// What one routing did with the requests.
struct Outcome {
    cached_ratio: f64,
    mean_ttft_ms: f64,
    mean_latency_ms: f64,
    /// The busiest instance's mean requests in flight over the mean of all instances.
    max_load_over_mean: f64,
    /// The instance that served the most requests: its count over the mean count.
    max_served_over_mean: f64,
}

pub async fn run(size: &Size, rows: &mut Vec<Row>) {
    let image = common::function_image("llm-stub");
    let gw = Gateway::start().await;
    let requests = requests(size.prefix_requests);
    let mut outcomes = Vec::new();
    for routing in ["prefix", "least_loaded"] {
        let name = routing.replace('_', "-");
        let manifest = format!(
            "name = \"{name}\"\nimage = \"{image}\"\n\
             env = {{ MODELS = \"{name}\", PREFILL_US_PER_BYTE = \"2\", DECODE_US_PER_TOKEN = \"500\", CACHE_ENTRIES = \"{CACHE_ENTRIES}\" }}\n\
             [openai]\nmodels = [\"{name}\"]\nrouting = \"{routing}\"\n\
             [readiness]\nhttp_path = \"/healthz\"\n\
             [scale]\nmin = {INSTANCES}\nmax = {INSTANCES}\nconcurrency = 64\nidle_timeout = \"1h\"\n"
        );
        assert!(gw.deploy(&name, &manifest).await.status.is_success());
        common::eventually(
            std::time::Duration::from_secs(60),
            "4 ready instances",
            || async { gw.function(&name).await["ready"] == INSTANCES },
        )
        .await;
        outcomes.push(drive(&gw, &name, &requests).await);
        gw.request(
            http::Method::DELETE,
            &format!("/api/v1/functions/{name}"),
            &[],
            Bytes::new(),
        )
        .await;
    }
    let (p, l) = (&outcomes[0], &outcomes[1]);
    let n = requests.len();
    rows.push(row(
        "prefix",
        &format!("prompt bytes from cache, {n} req (vs least)"),
        p.cached_ratio * 100.0,
        Some(l.cached_ratio * 100.0),
        "%",
    ));
    rows.push(row(
        "prefix",
        "mean simulated TTFT (vs least_loaded)",
        p.mean_ttft_ms,
        Some(l.mean_ttft_ms),
        "ms",
    ));
    rows.push(row(
        "prefix",
        "mean latency c=16 (vs least_loaded)",
        p.mean_latency_ms,
        Some(l.mean_latency_ms),
        "ms",
    ));
    rows.push(row(
        "prefix",
        "busiest instance in flight / mean (vs least)",
        p.max_load_over_mean,
        Some(l.max_load_over_mean),
        "x",
    ));
    rows.push(row(
        "prefix",
        "most requests served / mean (vs least)",
        p.max_served_over_mean,
        Some(l.max_served_over_mean),
        "x",
    ));
}

/// The request bodies (without `model`): Zipf-picked system prompts, each with a
/// question of its own. The same every run.
fn requests(n: usize) -> Vec<(String, String)> {
    let systems: Vec<String> = (0..PROMPTS)
        .map(|i| format!("You are assistant number {i}; follow house style rule {i}. ").repeat(32))
        .collect();
    let weights: Vec<f64> = (1..=PROMPTS).map(|k| 1.0 / k as f64).collect();
    let total: f64 = weights.iter().sum();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|i| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut x = (seed >> 11) as f64 / (1u64 << 53) as f64 * total;
            let pick = weights
                .iter()
                .position(|w| {
                    x -= w;
                    x < 0.0
                })
                .unwrap_or(PROMPTS - 1);
            (
                systems[pick].clone(),
                format!("Question {i}: what is {i} squared?"),
            )
        })
        .collect()
}

async fn drive(gw: &Gateway, model: &str, requests: &[(String, String)]) -> Outcome {
    let client = http_client();
    let url = format!("{}/v1/chat/completions", gw.url);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let bodies: Arc<Vec<Bytes>> = Arc::new(
        requests
            .iter()
            .map(|(system, user)| {
                let body = serde_json::json!({
                    "model": model,
                    "max_tokens": 4,
                    "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
                });
                Bytes::from(body.to_string())
            })
            .collect(),
    );
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (client, url, next, bodies) =
            (client.clone(), url.clone(), next.clone(), bodies.clone());
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(body) = bodies.get(i) else {
                    return seen;
                };
                seen.push(chat(&client, &url, body.clone()).await);
            }
        }));
    }
    // Samples each instance's requests in flight while the requests run.
    let mut load: HashMap<String, u64> = HashMap::new();
    while tasks.iter().any(|t| !t.is_finished()) {
        let status = gw.function(model).await;
        for i in status["instances"].as_array().into_iter().flatten() {
            let id = i["id"].as_str().unwrap_or("").to_string();
            *load.entry(id).or_default() += i["in_flight"].as_u64().unwrap_or(0);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let busiest = load.values().copied().max().unwrap_or(0) as f64;
    let mean_load = load.values().sum::<u64>() as f64 / INSTANCES as f64;
    let mut served: HashMap<String, usize> = HashMap::new();
    let (mut cached, mut prompt, mut ttft_us, mut latency_ms) = (0u64, 0u64, 0u64, 0f64);
    let mut count = 0usize;
    for t in tasks {
        for s in t.await.unwrap() {
            *served.entry(s.instance).or_default() += 1;
            cached += s.cached_bytes;
            prompt += s.prompt_bytes;
            ttft_us += s.ttft_us;
            latency_ms += s.latency_ms;
            count += 1;
        }
    }
    let mean_share = count as f64 / INSTANCES as f64;
    let most_served = served.values().copied().max().unwrap_or(0) as f64;
    Outcome {
        cached_ratio: cached as f64 / prompt.max(1) as f64,
        mean_ttft_ms: ttft_us as f64 / count.max(1) as f64 / 1000.0,
        mean_latency_ms: latency_ms / count.max(1) as f64,
        max_load_over_mean: busiest / mean_load.max(f64::MIN_POSITIVE),
        max_served_over_mean: most_served / mean_share,
    }
}

/// What the stub reported of one answer.
struct Served {
    instance: String,
    prompt_bytes: u64,
    cached_bytes: u64,
    ttft_us: u64,
    latency_ms: f64,
}

async fn chat(client: &HttpClient, url: &str, body: Bytes) -> Served {
    let started = Instant::now();
    let req = http::Request::post(url).body(Full::new(body)).unwrap();
    let resp = client.request(req).await.expect("the gateway answers");
    assert_eq!(resp.status(), 200, "a chat request failed");
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let stub = &v["usage"]["stub"];
    let n = |k: &str| stub[k].as_u64().unwrap_or(0);
    Served {
        instance: stub["instance"].as_str().unwrap_or("").to_string(),
        prompt_bytes: n("prompt_bytes"),
        cached_bytes: n("cached_bytes"),
        ttft_us: n("ttft_us"),
        latency_ms,
    }
}
