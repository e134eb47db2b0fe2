//! ember-shim behind a real gateway: the example function (a busybox shell script in a
//! `FROM scratch` image with the shim as its entrypoint) deployed as the README says, and
//! invoked through `/fn/NAME/`: the body reaches the script's stdin, the request its
//! environment, stdout comes back; failures, the concurrency limit, the timeout and the
//! readiness probe behave as documented. Needs Docker and Debian's `busybox-static`.
#![allow(clippy::disallowed_methods)] // tasks a test spawns end with the test

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::shim::{example_context, example_manifest};
use common::Gateway;
use http::Method;

/// Deploys the example image as `name` and waits for its first (cold) answer.
async fn deploy_warm(gw: &Gateway, name: &str, env: &[(&str, &str)], sections: &str) {
    let r = gw
        .deploy(name, &example_manifest(name, env, sections))
        .await;
    assert!(r.status.is_success(), "{}", r.text());
    let warm = gw
        .request(Method::GET, &format!("/fn/{name}/"), &[], Bytes::new())
        .await;
    assert_eq!(warm.status, 200, "{}", warm.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_example_deploys_and_answers_with_the_scripts_stdout() {
    require_shim_image!();
    let gw = Gateway::start().await;
    let dir = example_context();
    let out = gw.cli(&["deploy", dir.path().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("deployed wordcount"));

    let r = gw
        .request(
            Method::POST,
            "/fn/wordcount/render/frame?scene=a&frame=3",
            &[("x-scene", "cube")],
            "hello",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.text(),
        "bytes=5\nmethod=POST path=/render/frame query=scene=a&frame=3\nscene=cube\n",
        "the body on stdin, the request in the environment, stdout as the answer"
    );
    assert_eq!(r.header("content-type").as_deref(), Some("text/plain"));
    assert_eq!(r.header("x-ember-exit-code").as_deref(), Some("0"));

    let health = gw
        .request(Method::GET, "/fn/wordcount/healthz", &[], Bytes::new())
        .await;
    assert_eq!(
        (health.status.as_u16(), health.text().as_str()),
        (200, "ok")
    );
    assert_eq!(gw.function("wordcount").await["ready"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_that_exits_non_zero_answers_500_with_its_stderr() {
    require_shim_image!();
    let gw = Gateway::start().await;
    deploy_warm(&gw, "fails", &[], "").await;
    let r = gw
        .request(Method::GET, "/fn/fails/?fail", &[], Bytes::new())
        .await;
    assert_eq!(r.status, 500);
    assert_eq!(r.header("x-ember-exit-code").as_deref(), Some("3"));
    let text = r.text();
    assert!(
        text.starts_with("the command exited with code 3\n"),
        "{text}"
    );
    assert!(text.contains("asked to fail (query: fail)"), "{text}");
    let next = gw
        .request(Method::GET, "/fn/fails/", &[], Bytes::new())
        .await;
    assert_eq!(next.status, 200, "a failed run leaves the instance serving");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_request_past_the_shims_concurrency_is_refused_with_429() {
    require_shim_image!();
    let gw = Arc::new(Gateway::start().await);
    // The gateway lets 10 through to the one instance; the shim runs 2.
    let scale = "[scale]\nmax = 1\nconcurrency = 10";
    deploy_warm(&gw, "busy", &[("EMBER_SHIM_CONCURRENCY", "2")], scale).await;
    let answers = common::concurrent_requests(&gw, "/fn/busy/?sleep=2", 3).await;
    let mut statuses: Vec<u16> = answers.iter().map(|r| r.status.as_u16()).collect();
    statuses.sort();
    assert_eq!(statuses, [200, 200, 429]);
    let refused = answers.iter().find(|r| r.status == 429).unwrap();
    assert_eq!(refused.header("retry-after").as_deref(), Some("1"));
    assert!(
        refused.text().contains("--concurrency 2"),
        "{}",
        refused.text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_scale_concurrency_equal_to_the_shims_the_gateway_queues_the_extra_request() {
    require_shim_image!();
    let gw = Arc::new(Gateway::start().await);
    let scale = "[scale]\nmax = 1\nconcurrency = 2";
    deploy_warm(&gw, "queued", &[("EMBER_SHIM_CONCURRENCY", "2")], scale).await;
    let started = Instant::now();
    let answers = common::concurrent_requests(&gw, "/fn/queued/?sleep=1", 3).await;
    let statuses: Vec<u16> = answers.iter().map(|r| r.status.as_u16()).collect();
    assert_eq!(statuses, [200, 200, 200]);
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "the third waited for a slot: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_past_the_timeout_is_killed_with_its_children_and_answers_504() {
    require_shim_image!();
    let gw = Gateway::start().await;
    deploy_warm(&gw, "slow", &[("EMBER_SHIM_TIMEOUT", "1s")], "").await;
    let started = Instant::now();
    let r = gw
        .request(Method::GET, "/fn/slow/?sleep=30", &[], Bytes::new())
        .await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(r.text().contains("ran past --timeout (1s)"), "{}", r.text());
    assert!(started.elapsed() < Duration::from_secs(5));

    // The shell and its `sleep` are gone, reaped by the shim's init: only the init (PID 1)
    // and the server remain in the container.
    let container = gw.containers("slow").pop().unwrap();
    let top = std::process::Command::new("docker")
        .args(["top", &container, "-o", "pid,stat,args"])
        .output()
        .unwrap();
    let top = String::from_utf8_lossy(&top.stdout).into_owned();
    let processes: Vec<&str> = top.lines().skip(1).collect();
    assert_eq!(processes.len(), 2, "{top}");
    assert!(processes.iter().all(|p| p.contains("/ember-shim")), "{top}");
}
