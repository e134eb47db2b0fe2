//! The invoke path end to end: real gateway, real Docker, the echo function.
#![allow(clippy::disallowed_methods)] // tasks a test spawns end with the test

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Gateway;
use http::Method;
use http_body_util::BodyExt;

#[tokio::test(flavor = "multi_thread")]
async fn a_cold_request_starts_a_container_and_passes_everything_through() {
    require_docker!();
    let gw = Gateway::start().await;
    let r = gw
        .deploy(
            "pass",
            &common::echo_manifest("pass", "env = { GREETING = \"hello\" }", ""),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(
        gw.containers("pass").is_empty(),
        "nothing runs before the first request"
    );

    let r = gw
        .request(
            Method::PUT,
            "/fn/pass/any/path?x=1&y=two",
            &[("x-custom", "value"), ("content-type", "text/plain")],
            "hi there",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "hi there");
    assert_eq!(r.header("x-echo-method").as_deref(), Some("PUT"));
    assert_eq!(
        r.header("x-echo-uri").as_deref(),
        Some("/any/path?x=1&y=two")
    );
    assert_eq!(r.header("x-echo-h-x-custom").as_deref(), Some("value"));
    assert_eq!(r.header("x-greeting").as_deref(), Some("hello"));
    assert_eq!(r.header("content-type").as_deref(), Some("text/plain"));

    let running = gw.containers("pass");
    assert_eq!(running.len(), 1, "exactly one container now runs");
    assert!(running[0].starts_with(&r.header("x-echo-host").unwrap()));
    let labels = std::process::Command::new("docker")
        .args([
            "inspect",
            "--format",
            "{{json .Config.Labels}}",
            &running[0],
        ])
        .output()
        .unwrap();
    let labels: serde_json::Value = serde_json::from_slice(&labels.stdout).unwrap();
    assert_eq!(labels["ember.managed"], "true");
    assert_eq!(labels["ember.function"], "pass");
    assert_eq!(labels["ember.gateway"], gw.id.as_str());
    assert_eq!(labels["ember.node"], "local");
    assert!(labels["ember.revision"].is_string() && labels["ember.instance"].is_string());

    let r = gw.request(Method::GET, "/fn/pass", &[], Bytes::new()).await;
    assert_eq!(
        r.header("x-echo-uri").as_deref(),
        Some("/"),
        "the bare function path is /"
    );
    let r = gw
        .request(Method::DELETE, "/fn/pass/", &[], Bytes::new())
        .await;
    assert_eq!(r.header("x-echo-method").as_deref(), Some("DELETE"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_response_reaches_the_client_as_it_is_produced() {
    require_docker!();
    let gw = Gateway::start().await;
    gw.deploy("stream", &common::echo_manifest("stream", "", ""))
        .await;
    // Warm it first so the timing measures streaming, not the cold start.
    assert_eq!(
        gw.request(Method::GET, "/fn/stream/", &[], Bytes::new())
            .await
            .status,
        200
    );

    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<Bytes>>();
    let sent = Instant::now();
    let resp = client
        .get(
            format!("{}/fn/stream/stream/4?interval_ms=400", gw.url)
                .parse()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.unwrap().data_ref() {
            arrivals.push(sent.elapsed());
            text.push_str(&String::from_utf8_lossy(d));
        }
    }
    assert_eq!(text, "chunk 0\nchunk 1\nchunk 2\nchunk 3\n");
    assert!(
        arrivals[0] < Duration::from_millis(300),
        "the first chunk came after {:?}, not as it was produced",
        arrivals[0]
    );
    assert!(*arrivals.last().unwrap() >= Duration::from_millis(1200));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_body_answers_413_and_an_unknown_function_404() {
    require_docker!();
    let gw = Gateway::start().await;
    gw.deploy(
        "small",
        &common::echo_manifest("small", "", "[request]\nmax_body = \"1KiB\""),
    )
    .await;
    let big = vec![b'x'; 2048];
    let r = gw
        .request(Method::POST, "/fn/small/", &[], big.clone())
        .await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "body_too_large");
    assert_eq!(
        gw.function("small").await["starts"],
        0,
        "no cold start for a refused body"
    );

    // A chunked body announces no length: it is cut off while streaming.
    let (tx, body) = {
        let (tx, rx) =
            tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(4);
        (tx, http_body_util::StreamBody::new(tokio_stream_from(rx)))
    };
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let req = http::Request::post(format!("{}/fn/small/", gw.url))
        .body(body)
        .unwrap();
    let send = tokio::spawn(async move { client.request(req).await });
    for _ in 0..4 {
        if tx
            .send(Ok(http_body::Frame::data(Bytes::from(vec![b'y'; 600]))))
            .await
            .is_err()
        {
            break;
        }
    }
    drop(tx);
    let resp = send.await.unwrap().unwrap();
    assert_eq!(resp.status(), 413);

    let small = gw
        .request(Method::POST, "/fn/small/", &[], vec![b'z'; 1000])
        .await;
    assert_eq!(small.status, 200);

    let r = gw
        .request(Method::GET, "/fn/nope/", &[], Bytes::new())
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "function_not_found");
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_manifests_answer_400_with_the_field_path() {
    require_docker!();
    let gw = Gateway::start().await;
    let r = gw
        .deploy(
            "bad",
            "name = \"bad\"\nimage = \"x:1\"\n[scale]\nmax = 0\nconcurrency = -1\n",
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let body = r.json();
    assert_eq!(body["error"]["code"], "invalid_manifest");
    assert_eq!(body["error"]["details"][0]["field"], "scale.concurrency");

    let r = gw
        .deploy("bad", "name = \"bad\"\nimage = \"x:1\"\n[scale]\nmax = 0\n")
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["details"][0]["field"], "scale.max");

    let r = gw
        .deploy("other", "name = \"bad\"\nimage = \"x:1\"\n")
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["details"][0]["field"], "name");

    let r = gw
        .request(
            Method::PUT,
            "/api/v1/functions/js",
            &[("content-type", "application/json")],
            r#"{"name":"js","image":"x:1","scale":{"idle":"1s"}}"#,
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["details"][0]["field"], "scale.idle");
    let listed = gw.get_json("/api/v1/functions").await;
    assert_eq!(
        listed["functions"].as_array().unwrap().len(),
        0,
        "nothing was deployed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_post_whose_container_just_died_is_served_by_a_new_instance() {
    require_docker!();
    let gw = Gateway::start().await;
    gw.deploy("phoenix", &common::echo_manifest("phoenix", "", ""))
        .await;
    let r = gw.request(Method::POST, "/fn/phoenix/", &[], "first").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let first = r.header("x-echo-host").unwrap();
    for id in gw.containers("phoenix") {
        std::process::Command::new("docker")
            .args(["kill", &id])
            .output()
            .unwrap();
    }
    let body = "0123456789".repeat(10_000);
    let r = gw
        .request(Method::POST, "/fn/phoenix/again", &[], body.clone())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), body);
    assert_ne!(r.header("x-echo-host").unwrap(), first, "a new container");
}
