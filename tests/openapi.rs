//! The OpenAPI document: generated from the handlers and types (src/gateway/openapi.rs),
//! checked in as docs/openapi.json, served without a token, and covering every route the
//! gateway serves and every stable error code.
//!
//! After a route or type change: `UPDATE_OPENAPI=1 cargo test --test openapi` rewrites
//! docs/openapi.json; review and commit it.

#![allow(clippy::disallowed_methods)] // the shared harness spawns its helpers

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

fn checked_in() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json")
}

fn document() -> Value {
    serde_json::from_str(ember::gateway::openapi::document()).unwrap()
}

#[test]
fn the_checked_in_document_is_the_generated_one() {
    let generated = ember::gateway::openapi::document();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(checked_in(), generated).unwrap();
    }
    let on_disk = std::fs::read_to_string(checked_in()).unwrap_or_default();
    assert!(
        on_disk == generated,
        "docs/openapi.json is not the document the code generates: run \
         `UPDATE_OPENAPI=1 cargo test --test openapi`, review the change and commit it"
    );
}

#[test]
fn it_is_openapi_3_1_with_every_error_code_and_a_default_answer_everywhere() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    let codes: BTreeSet<&str> = doc["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .expect("ErrorCode lists its values")
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let stable: BTreeSet<&str> = ember::model::ERROR_CODES.iter().map(|(_, c)| *c).collect();
    assert_eq!(
        codes, stable,
        "the document lists every stable error code, and only those"
    );
    let mut ids = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"].as_str().unwrap_or_default();
            assert!(
                ids.insert(id.to_string()),
                "{method} {path}: operationId `{id}` is not unique"
            );
            let responses = op["responses"].as_object().unwrap();
            assert!(
                responses.contains_key("default"),
                "{method} {path} says what its errors look like"
            );
            assert!(
                responses
                    .keys()
                    .any(|s| s.starts_with('1') || s.starts_with('2')),
                "{method} {path} has a success answer"
            );
        }
    }
}

/// Every path the router serves, from the source: `.route("...")` strings under
/// src/gateway, with the constants they name.
fn routes() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let consts = [
        ("metrics::PATH", "/metrics"),
        ("openapi::PATH", "/api/v1/openapi.json"),
        ("crate::node::tunnel::TUNNEL_PATH", "/api/v1/nodes/tunnel"),
    ];
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gateway")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for part in text.split(".route(").skip(1) {
                let arg = part.trim_start();
                let route = if let Some(rest) = arg.strip_prefix('"') {
                    rest.split('"').next().unwrap().to_string()
                } else if let Some((_, value)) = consts.iter().find(|(c, _)| arg.starts_with(c)) {
                    value.to_string()
                } else {
                    // `route` in a loop over openai::ROUTES.
                    continue;
                };
                out.insert(route.replace("{*", "{"));
            }
        }
    }
    for r in ember_openai_routes() {
        out.insert(r.to_string());
    }
    // The second listener (`serve --comfyui-listen`) serves one function at its root: not
    // the API.
    out.remove("/");
    out.remove("/{rest}");
    out
}

fn ember_openai_routes() -> Vec<&'static str> {
    let text = include_str!("../src/gateway/openai/mod.rs");
    let start = text.find("pub const ROUTES").unwrap();
    let end = start + text[start..].find("];").unwrap();
    text[start..end]
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with("/v1/"))
        .collect()
}

#[test]
fn every_route_the_gateway_serves_is_in_the_document() {
    let doc = document();
    let documented: BTreeSet<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
    let served = routes();
    assert!(served.len() > 40, "the scan found the routes: {served:?}");
    let missing: Vec<&String> = served.difference(&documented).collect();
    assert!(missing.is_empty(), "served but not documented: {missing:?}");
    let extra: Vec<&String> = documented.difference(&served).collect();
    assert!(extra.is_empty(), "documented but not served: {extra:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_serves_it_without_a_token() {
    require_docker!();
    let gw = common::Gateway::start().await;
    let r = gw
        .raw_request(http::Method::GET, "/api/v1/openapi.json", &[], "")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(r.text(), ember::gateway::openapi::document());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_control_apis_refusals_answer_embers_error_body_and_functions_are_left_alone() {
    require_docker!();
    let gw = common::Gateway::start().await;
    let error_code = |r: &common::Response| {
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/json"),
            "{}",
            r.text()
        );
        r.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let bad_query = gw
        .request(http::Method::GET, "/api/v1/images?tag=x:1&nope=1", &[], "")
        .await;
    assert_eq!(bad_query.status, 400);
    assert_eq!(error_code(&bad_query), "bad_request");
    let no_json = gw
        .request(http::Method::PUT, "/api/v1/registries/r.example", &[], "{}")
        .await;
    assert_eq!(no_json.status, 415);
    assert_eq!(error_code(&no_json), "bad_request");
    let method = gw
        .request(http::Method::PATCH, "/api/v1/keys", &[], "")
        .await;
    assert_eq!(method.status, 405);
    assert_eq!(error_code(&method), "bad_request");
    // A function's own plain-text 4xx passes through as it is.
    let r = gw
        .deploy("plain", &common::echo_manifest("plain", "", ""))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let theirs = gw
        .request(http::Method::GET, "/fn/plain/status/418", &[], "")
        .await;
    assert_eq!(theirs.status, 418);
    assert_ne!(
        theirs.header("content-type").as_deref(),
        Some("application/json")
    );
}
