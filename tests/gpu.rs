//! GPU placement end to end, in simulation mode: a declared inventory of mixed GPUs (two
//! 80 GiB A100s, one of them in MIG mode with two 3g.40gb instances, and a 24 GiB card),
//! real containers, and what each container was given, seen by docker inspect and by the
//! gpu-info function itself.
#![allow(clippy::disallowed_methods)] // tasks a test spawns end with the test

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{eventually, Gateway};
use http::Method;

const INVENTORY: &str = r#"
[[gpu]]
name = "NVIDIA A100-SXM4-80GB"
uuid = "GPU-a100-whole"
memory = "80GiB"

[[gpu]]
name = "NVIDIA A100-SXM4-80GB"
uuid = "GPU-a100-mig"
memory = "80GiB"
[[gpu.mig]]
uuid = "MIG-a100-0"
profile = "3g.40gb"
memory = "40GiB"
[[gpu.mig]]
uuid = "MIG-a100-1"
profile = "3g.40gb"
memory = "40GiB"

[[gpu]]
name = "NVIDIA GeForce RTX 4090"
uuid = "GPU-4090"
memory = "24GiB"
"#;

async fn gateway() -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gpus.toml");
    std::fs::write(&file, INVENTORY).unwrap();
    let gw = Gateway::builder()
        .args(["--gpu-inventory", file.to_str().unwrap()])
        .start()
        .await;
    (gw, dir)
}

fn gpu_info_manifest(name: &str, gpu: &str, sections: &str) -> String {
    format!(
        "name = \"{name}\"\nimage = \"{}\"\n[readiness]\nhttp_path = \"/healthz\"\n[gpu]\n{gpu}\n{sections}\n",
        common::gpu_info_image()
    )
}

fn inspect(container: &str, format: &str) -> serde_json::Value {
    let out = std::process::Command::new("docker")
        .args(["inspect", "--format", format, container])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

fn env_of(container: &str, key: &str) -> Option<String> {
    inspect(container, "{{json .Config.Env}}")
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.as_str())
        .find_map(|e| e.strip_prefix(&format!("{key}=")).map(str::to_string))
}

#[tokio::test(flavor = "multi_thread")]
async fn each_gpu_function_gets_the_gpu_the_rules_say() {
    require_docker!();
    let (gw, _dir) = gateway().await;
    let cases = [
        (
            "heavy",
            "models = [\"A100\"]\nmin_memory = \"40GiB\"",
            "GPU-a100-whole",
        ),
        ("light", "models = [\"RTX\", \"L4\"]", "GPU-4090"),
        (
            "sliced",
            "sharing = \"mig\"\nmig_profile = \"3g.40gb\"",
            "MIG-a100-",
        ),
    ];
    for (name, gpu, _) in cases {
        let r = gw.deploy(name, &gpu_info_manifest(name, gpu, "")).await;
        assert_eq!(r.status, 201, "{}", r.text());
        assert!(r.json()["warnings"].is_null(), "{}", r.text());
    }
    for (name, _, want) in cases {
        let r = gw
            .request(Method::GET, &format!("/fn/{name}/"), &[], Bytes::new())
            .await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        let info = r.json();
        let given = info["ember_gpu_uuids"].as_str().unwrap();
        assert!(
            given.starts_with(want),
            "{name} got {given}, expected {want}"
        );
        assert_eq!(info["nvidia_visible_devices"], given);
        assert!(
            info["nvidia_smi"].is_null(),
            "no NVIDIA runtime in simulation"
        );

        let containers = gw.containers(name);
        assert_eq!(containers.len(), 1);
        let c = &containers[0];
        assert!(info["hostname"].as_str().is_some_and(|h| c.starts_with(h)));
        assert_eq!(env_of(c, "NVIDIA_VISIBLE_DEVICES").as_deref(), Some(given));
        assert_eq!(env_of(c, "EMBER_GPU_UUIDS").as_deref(), Some(given));
        assert!(
            inspect(c, "{{json .HostConfig.DeviceRequests}}").is_null(),
            "simulation sends no device request"
        );
        let labels = inspect(c, "{{json .Config.Labels}}");
        assert!(labels["ember.gpus"].as_str().unwrap().contains(given));
    }

    let nodes = gw.get_json("/api/v1/nodes").await;
    let node = &nodes["nodes"][0];
    assert_eq!(node["name"], "local");
    assert_eq!(node["gpu_driver"], "simulated");
    let gpus = node["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 3);
    for g in gpus {
        for field in ["uuid", "name", "memory_total", "memory_used", "mig"] {
            assert!(!g[field].is_null(), "{field} in {g}");
        }
    }
    assert_eq!(gpus[0]["reserved"]["exclusive"], true);
    assert_eq!(gpus[1]["mig"][0]["profile"], "3g.40gb");
    assert_eq!(gpus[1]["mig_held"].as_array().unwrap().len(), 1);
    assert_eq!(gpus[2]["reserved"]["exclusive"], true);

    let out = gw.cli(&["gpus"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for want in [
        "GPU-a100-whole",
        "GPU-4090",
        "MIG 3g.40gb",
        "MIG-a100-1",
        "exclusive",
    ] {
        assert!(table.contains(want), "{want} missing in\n{table}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn exclusive_gpus_hold_under_concurrent_cold_starts_and_a_freed_gpu_is_reused() {
    require_docker!();
    let (gw, _dir) = gateway().await;
    let gw = Arc::new(gw);
    let gpu = "models = [\"A100\"]";
    for name in ["first", "second"] {
        let sections = "[scale]\nidle_timeout = \"1s\"\n[queue]\ntimeout = \"20s\"";
        gw.deploy(name, &gpu_info_manifest(name, gpu, sections))
            .await;
    }
    let started = Instant::now();
    let calls: Vec<_> = ["first", "second"]
        .into_iter()
        .map(|name| {
            let gw = gw.clone();
            tokio::spawn(async move {
                let r = gw
                    .request(Method::GET, &format!("/fn/{name}/"), &[], Bytes::new())
                    .await;
                (r, started.elapsed())
            })
        })
        .collect();
    let mut answers = Vec::new();
    for c in calls {
        answers.push(c.await.unwrap());
    }
    for (r, _) in &answers {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.json()["ember_gpu_uuids"],
            "GPU-a100-whole",
            "the only whole A100"
        );
    }
    // One waited for the other to go idle and be reaped: never both at once.
    let (fast, slow) = (
        answers[0].1.min(answers[1].1),
        answers[0].1.max(answers[1].1),
    );
    assert!(
        slow - fast >= Duration::from_millis(900),
        "{fast:?} vs {slow:?}"
    );
    assert_eq!(gw.function("first").await["starts"], 1);
    assert_eq!(gw.function("second").await["starts"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_finds_no_room_waits_then_answers_503_saying_why() {
    require_docker!();
    let (gw, _dir) = gateway().await;
    let hold = gpu_info_manifest(
        "holder",
        "models = [\"4090\"]",
        "[scale]\nidle_timeout = \"1h\"",
    );
    gw.deploy("holder", &hold).await;
    assert_eq!(
        gw.request(Method::GET, "/fn/holder/", &[], Bytes::new())
            .await
            .status,
        200
    );
    let waiting = gpu_info_manifest(
        "waiter",
        "models = [\"4090\"]",
        "[queue]\ntimeout = \"700ms\"",
    );
    gw.deploy("waiter", &waiting).await;
    let t = Instant::now();
    let r = gw
        .request(Method::GET, "/fn/waiter/", &[], Bytes::new())
        .await;
    assert!(
        t.elapsed() >= Duration::from_millis(650),
        "it waited for capacity first"
    );
    assert_eq!(r.status, 503, "{}", r.text());
    let body = r.json();
    assert_eq!(body["error"]["code"], "no_capacity");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("models = [\"4090\"]"), "{message}");
    assert!(
        message.contains("GeForce RTX 4090): held by another instance"),
        "{message}"
    );
    assert!(message.contains("model not in"), "{message}");
    assert_eq!(gw.function("waiter").await["starts"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_requirement_no_node_meets_is_refused_at_once_and_warned_at_deploy() {
    require_docker!();
    let (gw, _dir) = gateway().await;
    let r = gw
        .deploy(
            "h100",
            &gpu_info_manifest("h100", "models = [\"H100\"]", ""),
        )
        .await;
    assert_eq!(r.status, 201);
    assert!(r.json()["warnings"][0]
        .as_str()
        .unwrap()
        .contains("no node meets"));
    let t = Instant::now();
    let r = gw
        .request(Method::GET, "/fn/h100/", &[], Bytes::new())
        .await;
    assert!(t.elapsed() < Duration::from_secs(1), "no pointless wait");
    assert_eq!(r.status, 503);
    assert!(r.text().contains("no node meets"), "{}", r.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn shared_gpu_memory_is_never_overbooked_under_concurrent_cold_starts() {
    require_docker!();
    let (gw, _dir) = gateway().await;
    let gw = Arc::new(gw);
    let manifest = common::echo_manifest(
        "shared",
        "",
        "[scale]\nconcurrency = 1\nmax = 4\n[gpu]\nsharing = \"shared\"\nmemory = \"10GiB\"\nmodels = [\"4090\"]",
    );
    gw.deploy("shared", &manifest).await;
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let gw = gw.clone();
            tokio::spawn(async move {
                gw.request(Method::GET, "/fn/shared/sleep/1500", &[], Bytes::new())
                    .await
            })
        })
        .collect();
    eventually(Duration::from_secs(10), "two sharers running", || {
        let gw = gw.clone();
        async move { gw.function("shared").await["ready"] == 2 }
    })
    .await;
    let status = gw.function("shared").await;
    assert!(
        status["unschedulable"]
            .as_str()
            .unwrap()
            .contains("only 4.0 GiB free"),
        "{status}"
    );
    for c in calls {
        assert_eq!(
            c.await.unwrap().status,
            200,
            "all four are served by the two"
        );
    }
    let containers = gw.containers("shared");
    assert_eq!(
        containers.len(),
        2,
        "24 GiB holds two 10 GiB sharers, not three"
    );
    for c in &containers {
        assert_eq!(
            env_of(c, "NVIDIA_VISIBLE_DEVICES").as_deref(),
            Some("GPU-4090")
        );
    }
    assert_eq!(gw.function("shared").await["starts"], 2);
}
