//! Durable jobs, who sees them and how they come back: a private function's jobs need its
//! key (and listing needs the admin); a low-priority job waits at zero until a request
//! warms the function; an ended job's result goes after its retention; a callback arrives
//! once, signed.
#![allow(clippy::disallowed_methods)] // tasks a test spawns end with the test

mod common;

use std::time::Duration;

use common::jobs::{deploy_echo, wait_for};
use common::Gateway;
use http::Method;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread")]
async fn a_private_functions_jobs_need_its_key_and_listing_them_needs_the_admin() {
    require_docker!();
    let gw = Gateway::start().await;
    deploy_echo(&gw, "sealed", "[access]\nprivate = true").await;
    let made = gw
        .request(
            Method::POST,
            "/api/v1/keys",
            &[("content-type", "application/json")],
            r#"{"name": "client", "invoke": ["sealed"]}"#,
        )
        .await;
    assert_eq!(made.status, 201, "{}", made.text());
    let key = format!("Bearer {}", made.json()["key"].as_str().unwrap());
    let path = "/api/v1/functions/sealed/jobs";
    let anonymous = gw.raw_request(Method::POST, path, &[], "x").await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());
    let r = gw
        .raw_request(Method::POST, path, &[("authorization", &key)], "x")
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let record = format!("/api/v1/jobs/{id}");
    let seen = gw
        .raw_request(Method::GET, &record, &[("authorization", &key)], "")
        .await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    assert_eq!(
        gw.raw_request(Method::GET, &record, &[], "").await.status,
        401
    );
    let listed = gw
        .raw_request(Method::GET, "/api/v1/jobs", &[("authorization", &key)], "")
        .await;
    assert_eq!(listed.status, 401, "listing is the admin's");
    wait_for(&gw, &id, "succeeded", Duration::from_secs(20)).await;
    // Another private function's job answers this key as an unknown id does.
    deploy_echo(&gw, "other", "[access]\nprivate = true").await;
    let r = gw
        .request(Method::POST, "/api/v1/functions/other/jobs", &[], "y")
        .await;
    let theirs = format!("/api/v1/jobs/{}", r.json()["id"].as_str().unwrap());
    let as_key = |path: String| {
        let (gw, key) = (&gw, key.clone());
        async move {
            gw.raw_request(Method::GET, &path, &[("authorization", &key)], "")
                .await
        }
    };
    let known = as_key(theirs).await;
    let unknown = as_key("/api/v1/jobs/0000000000000001".into()).await;
    assert_eq!(known.status, 401);
    assert_eq!(
        known.text(),
        unknown.text(),
        "nothing tells a known job from an unknown one"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_low_priority_job_waits_at_zero_and_runs_once_a_request_warmed_the_function() {
    require_docker!();
    let gw = Gateway::start().await;
    deploy_echo(&gw, "echo", "").await;
    let r = gw
        .request(
            Method::POST,
            "/api/v1/functions/echo/jobs",
            &[("x-ember-priority", "low")],
            "idle work",
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let waiting = gw.get_json(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(waiting["state"], "queued", "{waiting}");
    assert_eq!(waiting["attempt"], 0, "waiting for room is no attempt");
    assert!(gw.containers("echo").is_empty(), "it started nothing");
    let warm = gw.request(Method::GET, "/fn/echo/", &[], "").await;
    assert_eq!(warm.status, 200);
    let done = wait_for(&gw, &id, "succeeded", Duration::from_secs(10)).await;
    assert_eq!(done["priority"], "low");
    assert_eq!(
        gw.containers("echo").len(),
        1,
        "on the instance the request warmed"
    );
    let bad = gw
        .request(
            Method::POST,
            "/api/v1/functions/echo/jobs",
            &[("x-ember-priority", "urgent")],
            "x",
        )
        .await;
    assert_eq!(bad.status, 400, "{}", bad.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ended_jobs_result_goes_after_its_retention_and_its_record_stays() {
    require_docker!();
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        Gateway::builder()
            .data_dir(dir.path())
            .args(["--job-results-keep", "1s"])
            .start()
    };
    let mut gw = start().await;
    let _cleanup = common::Cleanup(format!("ember.gateway={}", gw.id));
    deploy_echo(&gw, "echo", "").await;
    let r = gw
        .request(Method::POST, "/api/v1/functions/echo/jobs", &[], "kept")
        .await;
    let id = r.json()["id"].as_str().unwrap().to_string();
    wait_for(&gw, &id, "succeeded", Duration::from_secs(20)).await;
    let result = format!("/api/v1/jobs/{id}/result");
    assert_eq!(
        gw.request(Method::GET, &result, &[], "").await.text(),
        "kept"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Past its retention the result is gone at once, swept or not.
    let gone = gw.request(Method::GET, &result, &[], "").await;
    assert_eq!(gone.status, 410, "{}", gone.text());
    // A start sweeps (as the gateway does every 10 minutes) before it answers.
    gw.terminate();
    assert!(gw.wait_exit(Duration::from_secs(30)).is_some());
    let gw = start().await;
    let gone = gw.request(Method::GET, &result, &[], "").await;
    assert_eq!(gone.status, 410, "{}", gone.text());
    assert_eq!(gone.json()["error"]["code"], "job_result_expired");
    let record = gw.get_json(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(record["state"], "succeeded");
}

/// A callback receiver on 127.0.0.1: every request's headers and body.
async fn receiver() -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<(http::HeaderMap, bytes::Bytes)>>>,
) {
    use http_body_util::BodyExt;
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let keep = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let keep = keep.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let keep = keep.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            keep.lock().unwrap().push((parts.headers, body));
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::new()),
                            ))
                        }
                    });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    (url, got)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_callback_arrives_once_with_a_valid_signature_and_needs_a_signing_secret() {
    require_docker!();
    let (url, got) = receiver().await;
    let gw = Gateway::builder()
        .args(["--callback-allow", "127.0.0.1"])
        .start()
        .await;
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let unset = gw
        .deploy(
            "early",
            &common::echo_manifest("early", "", "[jobs]\ncallback_secret = \"hooks\""),
        )
        .await;
    assert_eq!(unset.status, 400, "{}", unset.text());
    assert!(
        unset.text().contains("jobs.callback_secret"),
        "{}",
        unset.text()
    );
    let r = gw
        .request(Method::PUT, "/api/v1/secrets/hooks", &[], secret)
        .await;
    assert!(r.status.is_success(), "{}", r.text());
    deploy_echo(&gw, "plain", "").await;
    let refused = gw
        .request(
            Method::POST,
            "/api/v1/functions/plain/jobs",
            &[("x-callback-url", url.as_str())],
            "x",
        )
        .await;
    assert_eq!(
        refused.status,
        400,
        "no secret to sign with: {}",
        refused.text()
    );
    deploy_echo(&gw, "echo", "[jobs]\ncallback_secret = \"hooks\"").await;
    let r = gw
        .request(
            Method::POST,
            "/api/v1/functions/echo/jobs",
            &[("x-callback-url", url.as_str())],
            "call me",
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let in_use = gw
        .request(Method::DELETE, "/api/v1/secrets/hooks", &[], "")
        .await;
    assert_eq!(
        in_use.status,
        409,
        "signing echo's callbacks: {}",
        in_use.text()
    );
    let done = wait_for(&gw, &id, "succeeded", Duration::from_secs(20)).await;
    common::eventually(Duration::from_secs(10), "a callback came", || async {
        !got.lock().unwrap().is_empty()
    })
    .await;
    // Past the first redelivery's time (5 s): a delivery that was not recorded as done
    // would come again.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "exactly once");
    let (headers, body) = &got[0];
    let msg_id = headers["webhook-id"].to_str().unwrap();
    assert_eq!(
        msg_id,
        format!("{id}.{}", done["finished_ms"]),
        "one id per ending"
    );
    let ts: u64 = headers["webhook-timestamp"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let want = ember::jobs::callback::sign(secret, msg_id, ts, body);
    assert_eq!(headers["webhook-signature"].to_str().unwrap(), want);
    let v: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["data"]["state"], "succeeded");
    assert_eq!(v["result"], "call me");
}
