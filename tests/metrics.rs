//! `GET /metrics` end to end: a real function's cold and warm requests move the counters
//! and histograms, the gauges follow the instances, and the exposition parses with the
//! official Prometheus client's text parser (`prometheus_client`).

#![allow(clippy::disallowed_methods)] // tasks a test spawns end with the test

mod common;

use common::{python, Gateway};
use http::Method;
use serde_json::{json, Value};
use std::time::Duration;

/// The samples of the exposition, parsed by `prometheus_client`:
/// `{"name{label=value,...}": value}` with labels sorted.
fn parse(py: &std::path::PathBuf, text: &str) -> Value {
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out, helps = {}, {}
for family in text_string_to_metric_families(sys.stdin.read()):
    helps[family.name] = bool(family.documentation)
    for s in family.samples:
        labels = ",".join("%s=%s" % kv for kv in sorted(s.labels.items()))
        out["%s{%s}" % (s.name, labels)] = s.value
print(json.dumps({"samples": out, "helps": helps}))
"#;
    let out = std::process::Command::new(py)
        .arg("-c")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(text.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success(), "the parser refused the exposition");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

async fn scrape(gw: &Gateway, py: &std::path::PathBuf) -> Value {
    let r = gw
        .request(
            Method::GET,
            "/metrics",
            &[("authorization", &format!("Bearer {}", gw.token))],
            "",
        )
        .await;
    assert_eq!(r.status, 200);
    parse(py, &r.text())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cold_then_a_warm_request_move_the_counters_and_the_exposition_parses() {
    require_docker!();
    let Some(py) = python::python() else { return };
    let gw = Gateway::start().await;
    let denied = gw.raw_request(Method::GET, "/metrics", &[], "").await;
    assert_eq!(denied.status, 401, "the admin token is needed");
    let manifest = common::echo_manifest("echo", "", "[scale]\nmax = 1");
    assert_eq!(gw.deploy("echo", &manifest).await.status, 201);
    for _ in 0..2 {
        let r = gw.request(Method::POST, "/fn/echo/", &[], "hi").await;
        assert_eq!(r.status, 200);
    }
    let missing = gw.request(Method::GET, "/fn/nope/", &[], "").await;
    assert_eq!(missing.status, 404);
    let m = scrape(&gw, &py).await;
    let s = &m["samples"];
    let get = |k: &str| s.get(k).and_then(Value::as_f64);
    assert_eq!(
        get("ember_requests_total{code=200,cold=true,function=echo}"),
        Some(1.0),
        "{s}"
    );
    assert_eq!(
        get("ember_requests_total{code=200,cold=false,function=echo}"),
        Some(1.0)
    );
    assert_eq!(
        get("ember_request_duration_seconds_count{function=echo}"),
        Some(2.0)
    );
    assert_eq!(
        get("ember_queue_wait_seconds_count{function=echo}"),
        Some(2.0)
    );
    assert_eq!(
        get("ember_cold_starts_total{function=echo,node=local,outcome=ready}"),
        Some(1.0)
    );
    for phase in ["schedule", "create", "ready"] {
        let k = format!("ember_cold_start_seconds_count{{function=echo,phase={phase}}}");
        assert_eq!(get(&k), Some(1.0), "{phase}: {s}");
    }
    // The image was on the node: the container was created at once, nothing pulled.
    let pulled = get("ember_cold_start_seconds_count{function=echo,phase=pull}");
    assert_eq!(pulled, None, "{s}");
    assert_eq!(get("ember_instances{function=echo,state=ready}"), Some(1.0));
    assert_eq!(get("ember_desired_instances{function=echo}"), Some(1.0));
    assert_eq!(get("ember_queued_requests{function=echo}"), Some(0.0));
    assert_eq!(get("ember_node_up{node=local,state=ready}"), Some(1.0));
    assert_eq!(get("ember_gateway_queued_requests{}"), Some(0.0));
    // The embedded node is always heard: its last heartbeat is the scrape's time.
    let heard = get("ember_node_last_heartbeat_seconds{node=local}").expect("a heartbeat");
    assert!((unix_now() - heard).abs() < 30.0, "heard at {heard}");
    // No label carries an instance id, a path or a client address.
    for key in s.as_object().unwrap().keys() {
        assert!(!key.contains("nope") && !key.contains("127.0.0.1"), "{key}");
    }
    for (name, has_help) in m["helps"].as_object().unwrap() {
        if name.starts_with("ember_") {
            assert_eq!(has_help, &json!(true), "{name} has HELP text");
        }
    }
    // Removed: its gauges go at the next scrape.
    gw.request(Method::DELETE, "/api/v1/functions/echo", &[], "")
        .await;
    let m = scrape(&gw, &py).await;
    assert!(m["samples"]
        .get("ember_desired_instances{function=echo}")
        .is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_public_opens_only_the_metrics_route() {
    require_docker!();
    let gw = Gateway::builder().args(["--metrics-public"]).start().await;
    let r = gw.raw_request(Method::GET, "/metrics", &[], "").await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("# HELP ember_gateway_queued_requests"));
    let r = gw
        .raw_request(Method::GET, "/api/v1/functions", &[], "")
        .await;
    assert_eq!(r.status, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agents_last_heartbeat_is_recent_and_stays_put_once_it_is_lost() {
    require_docker!();
    let Some(py) = python::python() else { return };
    let (gw, mut agents) = common::cluster::cluster(&["a1"]).await;
    let key = "ember_node_last_heartbeat_seconds{node=a1}";
    let heard = |m: &Value| m["samples"][key].as_f64();
    // Agents here send a heartbeat every 300 ms.
    let first = heard(&scrape(&gw, &py).await).expect("a heartbeat");
    assert!((unix_now() - first).abs() < 5.0, "heard at {first}");
    agents[0].kill();
    common::eventually(Duration::from_secs(10), "a1 lost", || async {
        common::cluster::node_state(&gw, "a1").await == "lost"
    })
    .await;
    let last = heard(&scrape(&gw, &py).await).expect("still known");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        heard(&scrape(&gw, &py).await),
        Some(last),
        "nothing heard since"
    );
    assert!(
        unix_now() - last > 2.0,
        "silent past the node timeout (2 s)"
    );
}
