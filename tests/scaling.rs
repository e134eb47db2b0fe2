//! Autoscaling, warm tiers and overload against a real gateway and real containers:
//! bursts scale out to `max` and no further and back to zero; idle instances pause and
//! resume in the same container; paused instances expire, and are evicted when another
//! function needs their GPU; requests racing the transitions are never lost; a flood is
//! capped gateway-wide and a client that leaves its queue leaves it at once.
#![allow(clippy::disallowed_methods)] // tasks a test spawns end with the test

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{eventually, Gateway};
use http::Method;

fn inspect_paused(container: &str) -> bool {
    let out = std::process::Command::new("docker")
        .args(["inspect", "--format", "{{.State.Paused}}", container])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "true"
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_scales_out_to_max_and_no_further_then_back_to_zero() {
    require_docker!();
    let gw = Arc::new(Gateway::start().await);
    let manifest = common::echo_manifest(
        "bursty",
        "",
        "[scale]\nconcurrency = 2\nmax = 3\nidle_timeout = \"1s\"\nstable_window = \"4s\"\npanic_window = \"1s\"",
    );
    gw.deploy("bursty", &manifest).await;
    let watcher = {
        let gw = gw.clone();
        tokio::spawn(async move {
            let mut most = 0;
            let until = Instant::now() + Duration::from_secs(6);
            while Instant::now() < until {
                most = most.max(gw.containers("bursty").len());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            most
        })
    };
    let statuses = common::concurrent_statuses(&gw, "/fn/bursty/sleep/700", 24).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let status = gw.function("bursty").await;
    assert!(status["starts"].as_u64().unwrap() <= 3, "{status}");
    assert_eq!(
        watcher.await.unwrap(),
        3,
        "scaled out to max = 3, never more"
    );
    eventually(Duration::from_secs(15), "back to zero", || {
        let gw = gw.clone();
        async move { common::docker_ps_all(&[&format!("ember.gateway={}", gw.id)]).is_empty() }
    })
    .await;
    let status = gw.function("bursty").await;
    assert_eq!(status["ready"], 0);
    assert_eq!(status["in_flight"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_instance_pauses_and_the_next_request_resumes_the_same_container() {
    require_docker!();
    let gw = Arc::new(Gateway::start().await);
    let manifest = common::echo_manifest(
        "frozen",
        "",
        "[scale]\non_idle = \"pause\"\nidle_timeout = \"1s\"\npause_timeout = \"1h\"",
    );
    gw.deploy("frozen", &manifest).await;
    let first = gw
        .request(Method::GET, "/fn/frozen/", &[], Bytes::new())
        .await;
    assert_eq!(first.status, 200);
    let container = gw.containers("frozen")[0].clone();
    eventually(Duration::from_secs(8), "paused", || {
        let gw = gw.clone();
        async move { gw.function("frozen").await["paused"] == 1 }
    })
    .await;
    assert!(inspect_paused(&container), "docker says it is paused");
    let t = Instant::now();
    let second = gw
        .request(Method::GET, "/fn/frozen/", &[], Bytes::new())
        .await;
    let resume = t.elapsed();
    assert_eq!(second.status, 200);
    assert_eq!(
        second.header("x-echo-host"),
        first.header("x-echo-host"),
        "same container"
    );
    assert_eq!(gw.containers("frozen"), std::slice::from_ref(&container));
    assert!(!inspect_paused(&container));
    let status = gw.function("frozen").await;
    assert_eq!(status["starts"], 1, "resumed, not cold-started: {status}");
    assert!(
        resume < Duration::from_millis(500),
        "resume took {resume:?}"
    );
    eprintln!("resume from pause to first response: {resume:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_instance_is_removed_after_the_pause_timeout() {
    require_docker!();
    let gw = Arc::new(Gateway::start().await);
    let manifest = common::echo_manifest(
        "expiring",
        "",
        "[scale]\non_idle = \"pause\"\nidle_timeout = \"1s\"\npause_timeout = \"1s\"",
    );
    gw.deploy("expiring", &manifest).await;
    assert_eq!(
        gw.request(Method::GET, "/fn/expiring/", &[], Bytes::new())
            .await
            .status,
        200
    );
    eventually(Duration::from_secs(10), "paused then removed", || {
        let gw = gw.clone();
        async move { common::docker_ps_all(&[&format!("ember.gateway={}", gw.id)]).is_empty() }
    })
    .await;
    assert_eq!(
        gw.request(Method::GET, "/fn/expiring/", &[], Bytes::new())
            .await
            .status,
        200
    );
    assert_eq!(gw.function("expiring").await["starts"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn evicting_a_paused_instance_lets_another_function_start_on_its_gpu() {
    require_docker!();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gpus.toml");
    std::fs::write(
        &file,
        "[[gpu]]\nname = \"NVIDIA L4\"\nuuid = \"GPU-only\"\nmemory = \"24GiB\"\n",
    )
    .unwrap();
    let gw = Arc::new(
        Gateway::builder()
            .args(["--gpu-inventory", file.to_str().unwrap()])
            .start()
            .await,
    );
    let sleeper = common::echo_manifest(
        "sleeper",
        "",
        "[scale]\non_idle = \"pause\"\nidle_timeout = \"1s\"\npause_timeout = \"1h\"\n[gpu]\ncount = 1",
    );
    let newcomer = common::echo_manifest("newcomer", "", "[gpu]\ncount = 1");
    gw.deploy("sleeper", &sleeper).await;
    gw.deploy("newcomer", &newcomer).await;
    assert_eq!(
        gw.request(Method::GET, "/fn/sleeper/", &[], Bytes::new())
            .await
            .status,
        200
    );
    eventually(Duration::from_secs(8), "sleeper paused", || {
        let gw = gw.clone();
        async move { gw.function("sleeper").await["paused"] == 1 }
    })
    .await;
    let r = gw
        .request(Method::GET, "/fn/newcomer/", &[], Bytes::new())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        gw.containers("sleeper").is_empty(),
        "the paused instance was evicted"
    );
    let nodes = gw.get_json("/api/v1/nodes").await;
    assert_eq!(nodes["nodes"][0]["gpus"][0]["reserved"]["exclusive"], true);
    let status = gw.function("newcomer").await;
    assert_eq!(status["instances"][0]["gpus"][0], "GPU-only");
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_racing_pause_and_resume_are_never_lost() {
    require_docker!();
    let gw = Arc::new(Gateway::start().await);
    let manifest = common::echo_manifest(
        "racy",
        "",
        "[scale]\non_idle = \"pause\"\nidle_timeout = \"1s\"\npause_timeout = \"1h\"\nmax = 1",
    );
    gw.deploy("racy", &manifest).await;
    assert_eq!(
        gw.request(Method::GET, "/fn/racy/", &[], Bytes::new())
            .await
            .status,
        200
    );
    // Gaps straddling the idle timeout (and the reaper's tick) land requests just before,
    // during and just after each pause.
    let mut sent = 0;
    for gap_ms in [950u64, 1000, 1050, 1100, 1150, 1200, 1250, 1300] {
        tokio::time::sleep(Duration::from_millis(gap_ms)).await;
        let statuses = common::concurrent_statuses(&gw, "/fn/racy/", 5).await;
        sent += statuses.len();
        assert!(
            statuses.iter().all(|s| *s == 200),
            "after {gap_ms} ms: {statuses:?}"
        );
    }
    let status = gw.function("racy").await;
    assert_eq!(status["starts"], 1, "one container all along: {status}");
    assert_eq!(status["in_flight"], 0);
    assert!(sent >= 40);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_is_capped_gateway_wide_and_leaving_clients_leave_the_queue_at_once() {
    require_docker!();
    let gw = Arc::new(Gateway::builder().args(["--max-queued", "5"]).start().await);
    let manifest = common::echo_manifest(
        "flooded",
        "command = [\"--delay-start\", \"4000\"]",
        "[queue]\ncapacity = 100\ntimeout = \"30s\"",
    );
    gw.deploy("flooded", &manifest).await;
    let waiting: Vec<_> = (0..5)
        .map(|_| {
            let url = format!("{}/fn/flooded/", gw.url);
            tokio::spawn(async move { common::request(Method::GET, &url, &[], Bytes::new()).await })
        })
        .collect();
    eventually(Duration::from_secs(5), "five waiting", || {
        let gw = gw.clone();
        async move { gw.get_json("/api/v1/gateway").await["queued"] == 5 }
    })
    .await;
    let r = gw
        .request(Method::GET, "/fn/flooded/", &[], Bytes::new())
        .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "gateway_full");
    assert!(r.header("retry-after").is_some());
    for w in &waiting[..3] {
        w.abort();
    }
    eventually(Duration::from_secs(2), "the leavers left the queue", || {
        let gw = gw.clone();
        async move {
            gw.get_json("/api/v1/gateway").await["queued"] == 2
                && gw.function("flooded").await["queued"] == 2
        }
    })
    .await;
    for w in waiting.into_iter().skip(3) {
        assert_eq!(
            w.await.unwrap().status,
            200,
            "the ones that stayed are served"
        );
    }
}
