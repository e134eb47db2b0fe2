//! Activator rules against a real gateway and real containers: one container for a burst,
//! full queues, queue timeouts, failed starts with back-off, permits released on every path.
#![allow(clippy::disallowed_methods)] // tasks a test spawns end with the test

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{eventually, Gateway};
use http::Method;

#[tokio::test(flavor = "multi_thread")]
async fn a_cold_burst_of_50_requests_starts_exactly_one_container() {
    require_docker!();
    let gw = Gateway::start().await;
    gw.deploy(
        "burst",
        &common::echo_manifest("burst", "", "[scale]\nconcurrency = 50\nmax = 4"),
    )
    .await;
    let gw = std::sync::Arc::new(gw);
    let mut tasks = Vec::new();
    for i in 0..50 {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            gw.request(Method::POST, "/fn/burst/", &[], format!("req {i}"))
                .await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.text(), format!("req {i}"));
    }
    let status = gw.function("burst").await;
    assert_eq!(
        status["starts"], 1,
        "one cold start for the whole burst: {status}"
    );
    assert_eq!(gw.containers("burst").len(), 1);
    assert_eq!(status["in_flight"], 0);
    assert_eq!(status["queued"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_answers_503_with_retry_after() {
    require_docker!();
    let gw = std::sync::Arc::new(Gateway::start().await);
    gw.deploy(
        "full",
        &common::echo_manifest(
            "full",
            "command = [\"--delay-start\", \"1500\"]",
            "[scale]\nconcurrency = 1\nmax = 1\n[queue]\ncapacity = 2\ntimeout = \"30s\"",
        ),
    )
    .await;
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            gw.request(Method::GET, "/fn/full/", &[], Bytes::new())
                .await
        }));
    }
    eventually(Duration::from_secs(5), "two requests queued", || {
        let gw = gw.clone();
        async move { gw.function("full").await["queued"] == 2 }
    })
    .await;
    let r = gw
        .request(Method::GET, "/fn/full/", &[], Bytes::new())
        .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    assert_eq!(r.json()["error"]["code"], "queue_full");
    for t in tasks {
        assert_eq!(
            t.await.unwrap().status,
            200,
            "queued requests are still served"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_waiting_past_the_queue_timeout_answers_504() {
    require_docker!();
    let gw = Gateway::start().await;
    gw.deploy(
        "slow",
        &common::echo_manifest(
            "slow",
            "command = [\"--delay-start\", \"3000\"]",
            "[queue]\ntimeout = \"500ms\"",
        ),
    )
    .await;
    let started = std::time::Instant::now();
    let r = gw
        .request(Method::GET, "/fn/slow/", &[], Bytes::new())
        .await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "queue_timeout");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        gw.function("slow").await["queued"],
        0,
        "the timed-out request left the queue"
    );
    // The start goes on; the next request is served by it.
    let mut served = false;
    for _ in 0..20 {
        if gw
            .request(Method::GET, "/fn/slow/", &[], Bytes::new())
            .await
            .status
            == 200
        {
            served = true;
            break;
        }
    }
    assert!(served);
    assert_eq!(gw.function("slow").await["starts"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_image_answers_503_with_the_reason_and_backs_off() {
    require_docker!();
    let gw = Gateway::start().await;
    let r = gw
        .deploy(
            "ghost",
            "name = \"ghost\"\nimage = \"ember-test/missing:none\"\n",
        )
        .await;
    assert_eq!(r.status, 201);
    assert!(r.json()["warnings"][0]
        .as_str()
        .unwrap()
        .contains("not on node"));
    let r = gw
        .request(Method::GET, "/fn/ghost/", &[], Bytes::new())
        .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "start_failed");
    assert!(r.text().contains("ember-test/missing:none"), "{}", r.text());
    assert!(r.header("retry-after").is_some());

    // Within the back-off, requests fail fast without a new attempt.
    for _ in 0..5 {
        let r = gw
            .request(Method::GET, "/fn/ghost/", &[], Bytes::new())
            .await;
        assert_eq!(r.status, 503);
        assert!(r.text().contains("failed starts in a row"), "{}", r.text());
    }
    let status = gw.function("ghost").await;
    assert_eq!(status["starts"], 1, "no start loop: {status}");
    assert_eq!(status["failure"]["consecutive"], 1);
    let ls = gw.cli(&["ls"]);
    let out = String::from_utf8_lossy(&ls.stdout);
    assert!(out.contains("ghost") && out.contains("failing"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_exiting_at_start_answers_502_with_its_output_and_backs_off() {
    require_docker!();
    let gw = Gateway::start().await;
    gw.deploy(
        "crash",
        &common::echo_manifest("crash", "command = [\"--crash\"]", ""),
    )
    .await;
    let r = gw
        .request(Method::GET, "/fn/crash/", &[], Bytes::new())
        .await;
    assert_eq!(r.status, 502, "{}", r.text());
    let text = r.text();
    assert!(text.contains("code 3"), "{text}");
    assert!(
        text.contains("crashing at start"),
        "the container's output is in the body: {text}"
    );
    assert!(gw.containers("crash").is_empty());
    assert!(
        common::docker_ps_all(&[&format!("ember.gateway={}", gw.id)]).is_empty(),
        "the failed container was removed"
    );
    // After the first back-off (1 s) one more attempt, then a longer pause, during which
    // the crash-looping function keeps answering 502 (its container's fault), not 503.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = gw
        .request(Method::GET, "/fn/crash/", &[], Bytes::new())
        .await;
    assert_eq!(r.status, 502);
    let r = gw
        .request(Method::GET, "/fn/crash/", &[], Bytes::new())
        .await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("failed starts in a row"), "{}", r.text());
    assert_eq!(r.header("retry-after").as_deref(), Some("2"));
    let status = gw.function("crash").await;
    assert_eq!(status["starts"], 2);
    assert_eq!(status["failure"]["consecutive"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn permits_are_released_on_every_path() {
    require_docker!();
    let gw = std::sync::Arc::new(Gateway::start().await);
    gw.deploy(
        "permits",
        &common::echo_manifest("permits", "", "[request]\ntimeout = \"3s\""),
    )
    .await;
    // Success.
    assert_eq!(
        gw.request(Method::GET, "/fn/permits/", &[], Bytes::new())
            .await
            .status,
        200
    );
    // Upstream error status passes through and is still a success for the permit.
    assert_eq!(
        gw.request(Method::GET, "/fn/permits/status/500", &[], Bytes::new())
            .await
            .status,
        500
    );
    // Timeout: the function answers after the request timeout.
    let r = gw
        .request(Method::GET, "/fn/permits/sleep/4000", &[], Bytes::new())
        .await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_timeout");
    // Client disconnect: the client goes away while the function works.
    let url = format!("{}/fn/permits/sleep/800", gw.url);
    let pending =
        tokio::spawn(async move { common::request(Method::GET, &url, &[], Bytes::new()).await });
    eventually(Duration::from_secs(5), "a request in flight", || {
        let gw = gw.clone();
        async move { gw.function("permits").await["in_flight"] == 1 }
    })
    .await;
    pending.abort();
    // Upstream failure: the container dies under a request.
    let r = gw
        .request(Method::GET, "/fn/permits/exit", &[], Bytes::new())
        .await;
    assert_eq!(r.status, 200);
    eventually(Duration::from_secs(10), "in-flight back to zero", || {
        let gw = gw.clone();
        async move {
            let s = gw.function("permits").await;
            s["in_flight"] == 0 && s["queued"] == 0
        }
    })
    .await;
    // The dead instance is retired when it refuses the next request, which is sent again
    // to a new one: the client never sees the crash.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = gw
        .request(Method::GET, "/fn/permits/", &[], Bytes::new())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(gw.function("permits").await["starts"], 2, "replaced once");
    let s = gw.function("permits").await;
    assert_eq!(s["in_flight"], 0, "{s}");
}
