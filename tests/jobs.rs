//! Durable jobs end to end: 200 jobs (100 ms each) submitted at once survive a SIGKILL of
//! the gateway right after the last 202 and all succeed after the restart, those that were
//! running as their second attempt (a job for a function at zero cold-starts it); a failing
//! function's job is retried and ends `failed` with the function's answer, a final 4xx is
//! not retried; jobs are cancelled, retried, listed, counted, purged and keyed.
//! (`jobs_delivery.rs`: access, low priority, retention, callbacks.)
#![allow(clippy::disallowed_methods)] // tasks a test spawns end with the test

mod common;

use std::time::Duration;

use common::jobs::{deploy_echo, wait_for};
use common::Gateway;
use http::Method;
use serde_json::Value;

const JOBS: usize = 200;

#[tokio::test(flavor = "multi_thread")]
async fn jobs_acknowledged_before_a_sigkill_all_run_after_the_restart() {
    require_docker!();
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::builder().data_dir(dir.path()).start().await;
    let _cleanup = common::Cleanup(format!("ember.gateway={}", gw.id));
    deploy_echo(&gw, "echo", "[scale]\nmax = 2\nconcurrency = 4").await;
    let submits = (0..JOBS).map(|i| {
        let gw = &gw;
        async move {
            let body = format!("job {i}");
            let r = gw
                .request(
                    Method::POST,
                    "/api/v1/functions/echo/jobs?path=/sleep/100",
                    &[("content-type", "text/plain")],
                    body.clone(),
                )
                .await;
            assert_eq!(r.status, 202, "{}", r.text());
            let id = r.json()["id"].as_str().unwrap().to_string();
            assert_eq!(
                r.header("location").as_deref(),
                Some(format!("/api/v1/jobs/{id}").as_str())
            );
            (id, body)
        }
    });
    let accepted = futures_util::future::join_all(submits).await;
    gw.kill();

    let gw = Gateway::builder().data_dir(dir.path()).start().await;
    let mut again = 0;
    for (id, body) in &accepted {
        let last = wait_for(&gw, id, "succeeded", Duration::from_secs(60)).await;
        let attempt = last["attempt"].as_u64().unwrap();
        assert!((1..=2).contains(&attempt), "{last}");
        again += usize::from(attempt == 2);
        let r = gw
            .request(Method::GET, &format!("/api/v1/jobs/{id}/result"), &[], "")
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), *body, "the function's answer is the result");
        assert_eq!(r.header("x-echo-uri").as_deref(), Some("/sleep/100"));
        assert_eq!(
            r.header("x-echo-h-ember-job-id").as_deref(),
            Some(id.as_str())
        );
        let told = r.header("x-echo-h-ember-attempt").unwrap();
        assert_eq!(
            told,
            attempt.to_string(),
            "the function is told its attempt"
        );
    }
    // The jobs that were running when the gateway died ran again, as attempt 2.
    assert!(again > 0, "no job was running at the kill");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_job_is_retried_then_fails_and_a_final_4xx_is_not_retried() {
    require_docker!();
    let gw = Gateway::start().await;
    deploy_echo(&gw, "echo", "").await;
    let submit = |path: &'static str| {
        let gw = &gw;
        async move {
            let r = gw
                .request(
                    Method::POST,
                    &format!("/api/v1/functions/echo/jobs?path={path}"),
                    &[],
                    "x",
                )
                .await;
            assert_eq!(r.status, 202, "{}", r.text());
            r.json()["id"].as_str().unwrap().to_string()
        }
    };
    let failing = submit("/status/503").await;
    // Its events: one per change of state or attempt, ending with the job.
    let events = {
        let response = gw.stream(&format!("/api/v1/jobs/{failing}/events")).await;
        assert_eq!(response.status(), 200);
        tokio::spawn(async move {
            use http_body_util::BodyExt;
            let body = response.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8_lossy(&body)
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .map(|d| {
                    let j: Value = serde_json::from_str(d).unwrap();
                    format!("{}:{}", j["state"].as_str().unwrap(), j["attempt"])
                })
                .collect::<Vec<_>>()
        })
    };
    let refused = submit("/status/404").await;
    let early = gw
        .request(
            Method::GET,
            &format!("/api/v1/jobs/{failing}/result"),
            &[],
            "",
        )
        .await;
    assert_eq!(
        early.status,
        409,
        "no result until it ends: {}",
        early.text()
    );
    assert_eq!(early.json()["error"]["code"], "job_not_finished");
    for (id, attempts) in [(&refused, 1), (&failing, 3)] {
        let last = wait_for(&gw, id, "failed", Duration::from_secs(30)).await;
        assert_eq!(last["attempt"], attempts, "{last}");
        let r = gw
            .request(Method::GET, &format!("/api/v1/jobs/{id}/result"), &[], "")
            .await;
        assert!(
            r.text().starts_with("status "),
            "the function's answer is kept"
        );
    }
    let seen = tokio::time::timeout(Duration::from_secs(10), events)
        .await
        .expect("the event stream ends with the job")
        .unwrap();
    let want = [
        "running:1",
        "queued:1",
        "running:2",
        "queued:2",
        "running:3",
        "failed:3",
    ];
    let tail: Vec<&str> = seen.iter().map(String::as_str).collect();
    assert!(tail.ends_with(&want), "{seen:?}");

    // `Prefer: respond-async` on the invoke route makes a job of the request.
    let r = gw
        .request(
            Method::POST,
            "/fn/echo/in?x=1",
            &[("prefer", "respond-async")],
            "later",
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(
        r.header("preference-applied").as_deref(),
        Some("respond-async")
    );
    let id = r.json()["id"].as_str().unwrap().to_string();
    wait_for(&gw, &id, "succeeded", Duration::from_secs(20)).await;
    let r = gw
        .request(Method::GET, &format!("/api/v1/jobs/{id}/result"), &[], "")
        .await;
    assert_eq!(r.header("x-echo-uri").as_deref(), Some("/in?x=1"));
    // The CLI submits, follows and prints the result.
    let out = gw.cli(&["jobs", "submit", "echo", "-d", "from the cli", "--wait"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from the cli");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("succeeded"),
        "{out:?}"
    );

    let missing = gw
        .request(Method::GET, "/api/v1/jobs/0000000000000000", &[], "")
        .await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["code"], "job_not_found");
    let nowhere = gw
        .request(Method::POST, "/api/v1/functions/nope/jobs", &[], "x")
        .await;
    assert_eq!(nowhere.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_are_cancelled_retried_listed_counted_purged_and_keyed() {
    require_docker!();
    let gw = Gateway::start().await;
    deploy_echo(&gw, "echo", "[scale]\nmax = 1\nconcurrency = 1").await;
    let submit = |path: &'static str, body: &'static str, key: Option<&'static str>| {
        let gw = &gw;
        async move {
            let mut headers = vec![];
            if let Some(k) = key {
                headers.push(("idempotency-key", k));
            }
            gw.request(
                Method::POST,
                &format!("/api/v1/functions/echo/jobs?path={path}"),
                &headers,
                body,
            )
            .await
        }
    };
    let id = |r: &common::Response| r.json()["id"].as_str().unwrap().to_string();
    let post = |path: String| {
        let gw = &gw;
        async move { gw.request(Method::POST, &path, &[], "").await }
    };

    // One runs (3 s), one waits behind it: both cancelled, the waiting one at once.
    let long = id(&submit("/sleep/3000", "a", None).await);
    wait_for(&gw, &long, "running", Duration::from_secs(20)).await;
    let behind = id(&submit("/sleep/10", "b", None).await);
    // An id is its store key and 64 random bits: a neighbour's key with a guess is unknown.
    assert_eq!(behind.len(), 32, "{behind}");
    let guessed = format!("{}{}", &behind[..16], "0".repeat(16));
    let r = gw
        .request(Method::GET, &format!("/api/v1/jobs/{guessed}"), &[], "")
        .await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = post(format!("/api/v1/jobs/{behind}/cancel")).await;
    assert_eq!(r.json()["state"], "cancelled", "{}", r.text());
    let refused = post(format!("/api/v1/jobs/{long}/retry")).await;
    assert_eq!(refused.status, 409);
    assert_eq!(refused.json()["error"]["code"], "job_state_conflict");
    let began = std::time::Instant::now();
    let r = post(format!("/api/v1/jobs/{long}/cancel")).await;
    assert_eq!(r.json()["state"], "cancelled", "{}", r.text());
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "the running request was dropped"
    );

    // A cancelled job runs again when retried.
    let r = post(format!("/api/v1/jobs/{behind}/retry")).await;
    assert_eq!(r.status, 202, "{}", r.text());
    let done = wait_for(&gw, &behind, "succeeded", Duration::from_secs(20)).await;
    assert_eq!(done["attempt"], 1);

    // The same key and input: the same job; another input: refused.
    let first = submit("/", "same", Some("k1")).await;
    let again = submit("/", "same", Some("k1")).await;
    assert_eq!(id(&first), id(&again));
    let other = submit("/", "other", Some("k1")).await;
    assert_eq!(other.status, 422);
    assert_eq!(other.json()["error"]["code"], "idempotency_key_reused");

    // Purge: the queued go, the running one goes on.
    wait_for(&gw, &id(&first), "succeeded", Duration::from_secs(20)).await;
    let running = id(&submit("/sleep/1500", "r", None).await);
    wait_for(&gw, &running, "running", Duration::from_secs(20)).await;
    let queued = [
        id(&submit("/", "q1", None).await),
        id(&submit("/", "q2", None).await),
    ];
    let r = post("/api/v1/functions/echo/queue/purge".into()).await;
    assert_eq!(r.json()["purged"], 2, "{}", r.text());
    wait_for(&gw, &running, "succeeded", Duration::from_secs(20)).await;
    let counts = gw.get_json("/api/v1/functions/echo/queue").await;
    assert_eq!(counts["cancelled"], 3, "{counts}");
    assert_eq!(counts["succeeded"], 3, "{counts}");
    assert_eq!(counts["queued"], 0, "{counts}");
    let listed = gw
        .get_json("/api/v1/jobs?function=echo&state=cancelled")
        .await;
    let ids: Vec<&str> = listed["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [&queued[1], &queued[0], &long], "newest first");
    let bad = gw
        .request(Method::GET, "/api/v1/jobs?state=sleeping", &[], "")
        .await;
    assert_eq!(bad.status, 400);
}
