//! ComfyUI: the front door against one ComfyUI server reached directly, in one run.
//!
//! `functions/comfyui-stub` with 20 sampler steps of 100 ms: 2 s prompts. One client
//! queues N prompts at once and reads its socket until each has its final `executing`;
//! prompts per minute through `/comfy/NAME` with 1 and with 3 warm instances, against the
//! same client on one stub container reached on its published port. Then, one at a time on
//! a warm idle instance, the time from `POST /prompt` to the socket's `execution_start`:
//! the front door's added time (queue record, socket to the instance, the prompt sent on).

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{self, Gateway};
use crate::probe::{http_client, send, HttpClient};
use crate::report::{percentile, row, Row};
use crate::Size;

const STEP_MS: u32 = 100;
const STEPS: u32 = 20;

fn graph(seed: u64, steps: u32) -> Value {
    json!({
        "3": {"class_type": "KSampler", "inputs": {"seed": seed, "steps": steps, "cfg": 8, "sampler_name": "euler",
              "scheduler": "normal", "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
              "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "stub.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "bench", "images": ["8", 0]}},
    })
}

pub async fn run(size: &Size, rows: &mut Vec<Row>) {
    let image = common::function_image("comfyui-stub");
    let container = docker(&[
        "run",
        "-d",
        "--rm",
        "-p",
        "127.0.0.1::8188",
        "-e",
        &format!("STEP_MS={STEP_MS}"),
        &image,
    ]);
    let port = docker(&["port", &container, "8188/tcp"]);
    let direct = format!("http://{}", port.lines().next().unwrap().trim());
    let http = http_client();
    common::eventually(Duration::from_secs(30), "the stub answers", || async {
        get_ok(&http, &format!("{direct}/system_stats")).await
    })
    .await;
    let gw = Gateway::start().await;
    for n in [1, 3] {
        let manifest = format!(
            "name = \"comfy{n}\"\nimage = \"{image}\"\nport = 8188\nenv = {{ STEP_MS = \"{STEP_MS}\" }}\n\
             [comfyui]\n[readiness]\nhttp_path = \"/system_stats\"\n\
             [scale]\nmin = {n}\nmax = {n}\nconcurrency = 1\nidle_timeout = \"1h\"\n"
        );
        assert!(gw
            .deploy(&format!("comfy{n}"), &manifest)
            .await
            .status
            .is_success());
        common::eventually(Duration::from_secs(60), "ready instances", || async {
            gw.function(&format!("comfy{n}")).await["ready"] == n
        })
        .await;
    }
    let prompts = size.comfy_prompts;
    let alone = throughput(&http, &direct, prompts).await;
    let one = throughput(&http, &format!("{}/comfy/comfy1", gw.url), prompts).await;
    let three = throughput(&http, &format!("{}/comfy/comfy3", gw.url), prompts).await;
    rows.push(row(
        "comfyui",
        &format!("prompts/min, 1 instance, {prompts} × 2 s (vs ComfyUI alone)"),
        one,
        Some(alone),
        "/min",
    ));
    rows.push(row(
        "comfyui",
        &format!("prompts/min, 3 instances, {prompts} × 2 s (vs ComfyUI alone)"),
        three,
        Some(alone),
        "/min",
    ));
    let samples = size.comfy_prompts * 2;
    let mut direct_ms = start_times(&http, &direct, samples).await;
    let mut ember_ms = start_times(&http, &format!("{}/comfy/comfy1", gw.url), samples).await;
    direct_ms.sort_by(f64::total_cmp);
    ember_ms.sort_by(f64::total_cmp);
    rows.push(row(
        "comfyui",
        &format!("POST /prompt → execution_start p50, warm, {samples} prompts (vs direct)"),
        percentile(&ember_ms, 0.5),
        Some(percentile(&direct_ms, 0.5)),
        "ms",
    ));
    docker(&["rm", "-f", &container]);
}

fn docker(args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn get_ok(http: &HttpClient, url: &str) -> bool {
    let req = http::Request::get(url).body(Default::default()).unwrap();
    http.request(req)
        .await
        .is_ok_and(|r| r.status().is_success())
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(base: &str, client_id: &str) -> Socket {
    let url = format!(
        "{}/ws?clientId={client_id}",
        base.replacen("http://", "ws://", 1)
    );
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

async fn queue(
    http: &HttpClient,
    base: &str,
    client_id: &str,
    prompt_id: &str,
    seed: u64,
    steps: u32,
) {
    let body =
        json!({"prompt": graph(seed, steps), "client_id": client_id, "prompt_id": prompt_id});
    let (status, _) = send(
        http,
        &format!("{base}/prompt"),
        Bytes::from(body.to_string()),
    )
    .await;
    assert_eq!(status, 200, "POST {base}/prompt");
}

/// The next JSON message of the socket (previews skipped).
async fn next_event(ws: &mut Socket) -> Value {
    loop {
        match ws.next().await.expect("the socket stays open").unwrap() {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            _ => continue,
        }
    }
}

fn is_done(m: &Value) -> bool {
    m["type"] == "executing" && m["data"]["node"].is_null()
}

/// Prompts per minute: `n` queued at once, until every one has finished.
async fn throughput(http: &HttpClient, base: &str, n: usize) -> f64 {
    let cid = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let mut ws = connect(base, &cid).await;
    let started = Instant::now();
    for i in 0..n {
        let id = format!("{cid}-{i}");
        queue(http, base, &cid, &id, i as u64, STEPS).await;
    }
    let mut done = 0;
    while done < n {
        if is_done(&next_event(&mut ws).await) {
            done += 1;
        }
    }
    n as f64 / started.elapsed().as_secs_f64() * 60.0
}

/// Milliseconds from `POST /prompt` to `execution_start`, one prompt at a time.
async fn start_times(http: &HttpClient, base: &str, n: usize) -> Vec<f64> {
    let cid = format!("lat-{}", uuid::Uuid::new_v4().simple());
    let mut ws = connect(base, &cid).await;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("{cid}-{i}");
        let t0 = Instant::now();
        queue(http, base, &cid, &id, 1000 + i as u64, 1).await;
        let mut started = None;
        loop {
            let m = next_event(&mut ws).await;
            if m["data"]["prompt_id"] != id.as_str() {
                continue;
            }
            if m["type"] == "execution_start" && started.is_none() {
                started = Some(t0.elapsed());
            }
            if is_done(&m) {
                break;
            }
        }
        out.push(started.expect("execution_start came").as_secs_f64() * 1000.0);
    }
    out
}
