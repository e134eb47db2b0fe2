//! Monitoring end to end: the Grafana dashboard (`deploy/grafana/ember.json`) charts only
//! metrics a real gateway exports, and every one it exports; a real Prometheus, run with
//! the shipped scrape config (`deploy/prometheus.yml`), scrapes a gateway that served a
//! GPU function and answers every query of the dashboard; `promtool` accepts the config.

#![allow(clippy::disallowed_methods)] // tasks a test spawns end with the test

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::dashboard;
use common::prometheus::{self, Prometheus};
use common::Gateway;
use http::Method;
use serde_json::Value;

/// Simulated GPUs: a whole A100 with utilization reported, and one in MIG mode.
const INVENTORY: &str = r#"
[[gpu]]
name = "NVIDIA A100-SXM4-80GB"
uuid = "GPU-a100-whole"
memory = "80GiB"
used = "1GiB"
utilization = 40

[[gpu]]
name = "NVIDIA A100-SXM4-80GB"
uuid = "GPU-a100-mig"
memory = "80GiB"
[[gpu.mig]]
uuid = "MIG-a100-0"
profile = "3g.40gb"
memory = "40GiB"
"#;

/// Grafana's `$__rate_interval` for a 1 s scrape: at least four scrapes.
const RATE_INTERVAL: &str = "10s";

/// How long Prometheus may take to have what a query needs.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// A gateway on simulated GPUs that deployed `echo` with a GPU and served it twice (a cold
/// request, then a warm one), so that every metric family has a series.
async fn busy_gateway() -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gpus.toml");
    std::fs::write(&file, INVENTORY).unwrap();
    let gw = Gateway::builder()
        .args(["--gpu-inventory", file.to_str().unwrap()])
        .start()
        .await;
    let manifest = common::echo_manifest("echo", "", "[gpu]\ncount = 1\n[scale]\nmax = 1");
    assert_eq!(gw.deploy("echo", &manifest).await.status, 201);
    for _ in 0..2 {
        let r = gw.request(Method::POST, "/fn/echo/", &[], "hi").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    (gw, dir)
}

/// The metric families the gateway's `/metrics` declares now, name to type.
async fn declared(gw: &Gateway) -> BTreeMap<String, String> {
    let auth = format!("Bearer {}", gw.token);
    let r = gw
        .request(Method::GET, "/metrics", &[("authorization", &auth)], "")
        .await;
    assert_eq!(r.status, 200);
    dashboard::declared(&r.text())
}

/// Every query of the dashboard: panel targets, then template variables.
fn all_queries() -> Vec<String> {
    let d = dashboard::load();
    let mut queries = dashboard::panel_queries(&d);
    queries.extend(dashboard::variable_queries(&d));
    queries
}

#[test]
fn a_made_up_or_misspelt_metric_name_is_rejected() {
    let declared = BTreeMap::from([
        ("ember_requests_total".to_string(), "counter".to_string()),
        (
            "ember_request_duration_seconds".to_string(),
            "histogram".to_string(),
        ),
    ]);
    let q = |s: &str| vec![s.to_string()];
    let known = r#"histogram_quantile(0.95, sum by (le) (rate(ember_request_duration_seconds_bucket{function=~"ember_x"}[5m]))) / sum(rate(ember_requests_total[1e1s]))"#;
    assert_eq!(
        dashboard::unknown(&q(known), &declared),
        Vec::<String>::new()
    );
    for wrong in [
        "rate(ember_made_up_total[5m])",
        "ember_requests_total_bucket", // a counter has no buckets
        "ember_request_duration_seconds_total",
    ] {
        assert_eq!(dashboard::unknown(&q(wrong), &declared).len(), 1, "{wrong}");
    }
    assert_eq!(
        dashboard::metric_names(r#"label_values(ember_node_up, node) + on(x) 'ember_a' "#),
        BTreeSet::from(["ember_node_up".to_string()])
    );
}

#[test]
fn the_dashboard_is_grafana_json_whose_panels_query_the_chosen_data_source() {
    let d = dashboard::load();
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36);
    let vars = d["templating"]["list"].as_array().unwrap();
    let var = |name: &str| vars.iter().find(|v| v["name"] == name).unwrap();
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for name in ["function", "node"] {
        assert_eq!(var(name)["type"], "query", "{name}");
        assert_eq!(var(name)["datasource"]["uid"], "${datasource}", "{name}");
    }
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        let title = p["title"].as_str().unwrap();
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "{title}: its id is taken"
        );
        let g = &p["gridPos"];
        assert!(
            g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
            "{title}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has queries");
        let refs: BTreeSet<_> = targets
            .iter()
            .map(|t| t["refId"].as_str().unwrap())
            .collect();
        assert_eq!(refs.len(), targets.len(), "{title}: refIds are unique");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            assert!(t["expr"].as_str().is_some_and(|e| !e.is_empty()), "{title}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_charts_every_metric_the_gateway_exports_and_no_other() {
    require_docker!();
    let (gw, _dir) = busy_gateway().await;
    let declared = declared(&gw).await;
    let queries = all_queries();
    let unknown = dashboard::unknown(&queries, &declared);
    assert!(unknown.is_empty(), "not exported: {unknown:#?}");
    let charted: BTreeSet<String> = queries
        .iter()
        .flat_map(|q| dashboard::metric_names(q))
        .filter_map(|n| dashboard::family(&n, &declared).map(str::to_string))
        .collect();
    let missing: Vec<_> = declared
        .keys()
        .filter(|n| n.starts_with("ember_") && !charted.contains(*n))
        .collect();
    assert!(missing.is_empty(), "no panel charts {missing:?}");
    assert!(charted.contains("ember_node_last_heartbeat_seconds"));
}

/// The value of an instant query's sample.
fn value(sample: &Value) -> f64 {
    sample["value"][1].as_str().unwrap().parse().unwrap()
}

/// `query`'s result once it has a series (or `QUERY_TIMEOUT` passed: then empty).
async fn first_result(prom: &Prometheus, query: &str) -> Vec<Value> {
    let deadline = Instant::now() + QUERY_TIMEOUT;
    loop {
        let result = prom.query(query).await;
        if !result.is_empty() || Instant::now() > deadline {
            return result;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_the_gateway_with_the_shipped_config_and_answers_every_panel() {
    require_docker!();
    if !prometheus::installed(prometheus::BINARY) {
        return;
    }
    let (gw, _dir) = busy_gateway().await;
    let prom = Prometheus::scraping(&gw).await;
    let began = Instant::now();
    let requests = first_result(&prom, r#"ember_requests_total{function="echo"}"#).await;
    assert!(!requests.is_empty(), "never scraped:\n{}", prom.log());
    assert_eq!(requests.iter().map(value).sum::<f64>(), 2.0, "{requests:?}");
    eprintln!("first scrape seen after {:?}", began.elapsed());

    // Every panel's query has a series.
    let d = dashboard::load();
    for query in dashboard::panel_queries(&d) {
        let expr = dashboard::evaluable(&query, RATE_INTERVAL);
        let result = first_result(&prom, &expr).await;
        assert!(!result.is_empty(), "`{expr}` has no series");
    }
    for query in dashboard::variable_queries(&d) {
        let (metric, label) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.split_once(", "))
            .unwrap_or_else(|| panic!("`{query}` is label_values(METRIC, LABEL)"));
        let result = first_result(&prom, metric).await;
        assert!(
            result.iter().any(|s| s["metric"].get(label).is_some()),
            "`{query}` finds no value: {result:?}"
        );
    }
    let heard = first_result(
        &prom,
        r#"time() - ember_node_last_heartbeat_seconds{node="local"}"#,
    )
    .await;
    assert!(
        value(&heard[0]) < 10.0,
        "the embedded node is always heard: {heard:?}"
    );
}

#[test]
fn the_shipped_scrape_config_passes_promtool() {
    if !prometheus::installed(prometheus::PROMTOOL) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // promtool checks that the token file exists.
    let token = dir.path().join("ember.token");
    std::fs::write(&token, "secret").unwrap();
    let file = dir.path().join("prometheus.yml");
    std::fs::write(&file, prometheus::config("127.0.0.1:8080", &token, "15s")).unwrap();
    let (ok, out) = prometheus::check_config(&file);
    assert!(ok, "{out}");
}
