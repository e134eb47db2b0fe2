//! What real GPU servers need of the invoke path: a model load that takes long is shown
//! (`starting 7s`) and survives a gateway restart (the loading container is adopted, not
//! thrown away), and no request with a body is lost when instances die between requests,
//! on the embedded node and through an agent's tunnel.

#![allow(clippy::disallowed_methods)] // the harness spawns tasks that end with the test

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cluster::{gateway_args, wait_ready, TOKEN};
use common::{eventually, Agent, Gateway};
use http::Method;

/// An echo function whose server binds its port `load_ms` after it starts, as a model
/// server does once its weights are loaded.
fn loading_manifest(name: &str, load_ms: u64) -> String {
    format!(
        "name = \"{name}\"\nimage = \"{}\"\ncommand = [\"--delay-start\", \"{load_ms}\"]\n\
         [readiness]\nhttp_path = \"/healthz\"\nstart_timeout = \"2m\"\n[queue]\ntimeout = \"2m\"\n",
        common::echo_image()
    )
}

fn ls(gw: &Gateway) -> String {
    let out = gw.cli(&["ls"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_killed_during_a_long_load_adopts_the_loading_container_on_restart() {
    require_docker!();
    const LOAD_MS: u64 = 8000;
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::builder().data_dir(dir.path()).start().await;
    let _cleanup = common::Cleanup(format!("ember.gateway={}", gw.id));
    gw.deploy("llm", &loading_manifest("llm", LOAD_MS)).await;
    let began = Instant::now();
    let url = format!("{}/fn/llm/", gw.url);
    let waiting =
        tokio::spawn(async move { common::request(Method::GET, &url, &[], Bytes::new()).await });
    eventually(Duration::from_secs(5), "a container loading", || {
        let gw = &gw;
        async move { gw.containers("llm").len() == 1 }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let listing = ls(&gw);
    // The age shown is the load's, whole seconds: at least the pause above, at most the
    // time since the request (a loaded machine may take a while to create the container).
    let shown: u64 = listing
        .split("starting ")
        .nth(1)
        .and_then(|rest| rest.split('s').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `starting Ns` in {listing}"));
    assert!(
        (1..=began.elapsed().as_secs()).contains(&shown),
        "starting {shown}s after {:?}: {listing}",
        began.elapsed()
    );
    let loading = gw.containers("llm");

    // The gateway dies mid-load; its waiting request with it.
    waiting.abort();
    gw.kill();
    let gw = Gateway::builder().data_dir(dir.path()).start().await;
    let status = gw.function("llm").await;
    assert_eq!(status["starting"], 1, "adopted while loading: {status}");
    assert_eq!(status["instances"][0]["adopted"], true, "{status}");
    assert_eq!(status["starts"], 0, "no new start: {status}");
    let listing = ls(&gw);
    assert!(listing.contains("starting "), "{listing}");

    // The next request waits for the same container to finish its load.
    let r = gw.request(Method::GET, "/fn/llm/", &[], Bytes::new()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let took = began.elapsed();
    assert!(
        took < Duration::from_millis(2 * LOAD_MS),
        "served by the first load, not a second one: {took:?}"
    );
    assert_eq!(
        gw.containers("llm"),
        loading,
        "the same container, and only it"
    );
    assert_eq!(gw.function("llm").await["starts"], 0);
    eprintln!(
        "load of {LOAD_MS} ms across a gateway restart: served {took:?} after the first request"
    );
}

/// POSTs `n` numbered bodies to `path`; every `kill_every` requests, kills the containers
/// of `function` first. Returns the failures (status and body) and how many kills.
async fn posts_with_kills(
    gw: &Gateway,
    function: &str,
    n: usize,
    kill_every: usize,
) -> (Vec<String>, usize) {
    let mut failures = Vec::new();
    let mut kills = 0;
    for i in 0..n {
        if i > 0 && i % kill_every == 0 {
            for id in gw.containers(function) {
                let out = std::process::Command::new("docker")
                    .args(["kill", &id])
                    .output()
                    .unwrap();
                kills += usize::from(out.status.success());
            }
        }
        let body = format!("request {i}: {}", "x".repeat(i * 97 % 4096));
        let r = gw
            .request(
                Method::POST,
                &format!("/fn/{function}/n/{i}"),
                &[],
                body.clone(),
            )
            .await;
        if r.status != 200 || r.text() != body {
            failures.push(format!("#{i}: {} {}", r.status, r.text()));
        }
    }
    (failures, kills)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_posts_lose_nothing_while_their_containers_are_killed_between_requests() {
    require_docker!();
    let gw = Gateway::start().await;
    let manifest = common::echo_manifest("phoenix", "", "[scale]\nmax = 2");
    assert_eq!(gw.deploy("phoenix", &manifest).await.status, 201);
    let started = Instant::now();
    let (failures, kills) = posts_with_kills(&gw, "phoenix", 200, 20).await;
    assert!(
        failures.is_empty(),
        "{} failed: {failures:#?}",
        failures.len()
    );
    assert!(kills >= 9, "containers were killed: {kills}");
    let starts = gw.function("phoenix").await["starts"].as_u64().unwrap();
    assert!(
        starts as usize > kills / 2,
        "replaced after kills: {starts} starts"
    );
    eprintln!(
        "200 POSTs, {kills} containers killed between them: 0 errors in {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn posts_through_a_tunnel_lose_nothing_when_the_container_dies_between_requests() {
    require_docker!();
    let gw = Arc::new(Gateway::builder().args(gateway_args(None)).start().await);
    let _agent = Agent::builder(&gw.url, TOKEN, "far").start().await;
    wait_ready(&gw, 1).await;
    let manifest = common::echo_manifest("far-echo", "", "");
    assert_eq!(gw.deploy("far-echo", &manifest).await.status, 201);
    let (failures, kills) = posts_with_kills(&gw, "far-echo", 60, 15).await;
    assert!(
        failures.is_empty(),
        "{} failed: {failures:#?}",
        failures.len()
    );
    assert!(kills >= 3, "containers were killed: {kills}");
}
