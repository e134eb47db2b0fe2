//! The live gateway fuzzed against its OpenAPI document with schemathesis (PyPI, in
//! `target/py-schemathesis`): every operation, with the admin token, on a gateway with
//! three functions (fz-echo warm, fz-victim, fz-private). Checks: no 5xx from the gateway
//! itself (a function's own passes through on the `proxied` routes), status codes,
//! content types, headers and bodies as documented. Then: no panic and no internal error
//! in the gateway's log, and the gateway still answers `/healthz` and fz-echo, warm.
//!
//! CI runs it for `EMBER_FUZZ_TIME` seconds (100 by default) with seed `EMBER_FUZZ_SEED`
//! (16); a longer run: `EMBER_FUZZ_TIME=1800 EMBER_FUZZ_SEED=$RANDOM cargo test --test
//! schemathesis -- --nocapture`. Settings: tests/schemathesis/ (schemathesis.toml, and
//! hooks.py, which keeps pulls local and steers names).
#![allow(clippy::disallowed_methods)] // the shared harness spawns its helpers

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::Gateway;
use http::Method;

const PACKAGES: &[&str] = &["schemathesis>=4.32,<5"];

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_operation_fuzzed_answers_as_documented_and_the_gateway_stays_up() {
    require_docker!();
    let Some(python) = common::python::venv("py-schemathesis", PACKAGES) else {
        return;
    };
    let st = python.with_file_name("st");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("gateway.log");
    let gw = Gateway::builder().log_to(&log, "info").start().await;
    let warm = "[scale]\nmin = 1\n[request]\ntimeout = \"5s\"";
    for (name, sections) in [
        ("fz-echo", warm),
        ("fz-victim", warm),
        ("fz-private", "[access]\nprivate = true"),
    ] {
        let r = gw
            .deploy(name, &common::echo_manifest(name, "", sections))
            .await;
        assert_eq!(r.status, 201, "{}", r.text());
    }
    common::eventually(Duration::from_secs(60), "fz-echo is warm", || async {
        gw.function("fz-echo").await["ready"] == 1
    })
    .await;

    let seconds = env_or("EMBER_FUZZ_TIME", 100);
    let seed = env_or("EMBER_FUZZ_SEED", 16);
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let report = repo.join("target/schemathesis");
    let mut cmd = Command::new(&st);
    cmd.current_dir(repo)
        .env("SCHEMATHESIS_HOOKS", "tests/schemathesis/hooks.py")
        .args([
            "--config-file",
            "tests/schemathesis/schemathesis.toml",
            "run",
        ])
        .arg("docs/openapi.json")
        .args(["--url", &gw.url])
        .args(["-H", &format!("Authorization: Bearer {}", gw.token)])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance",
            "--phases",
            "examples,coverage,fuzzing",
            "--mode",
            "all",
            "--max-examples",
            "50",
            "--generation-database",
            "none",
            "--workers",
            "2",
            "--request-timeout",
            "15",
            "--exclude-path",
            "/api/v1/nodes/tunnel",
            "--report",
            "junit",
            "--no-color",
        ])
        .args(["--max-time", &seconds.to_string()])
        .args(["--seed", &seed.to_string()])
        .arg("--report-dir")
        .arg(&report)
        .stdin(Stdio::null());
    let out = tokio::time::timeout(
        Duration::from_secs(seconds + 180),
        tokio::task::spawn_blocking(move || cmd.output()),
    )
    .await
    .expect("schemathesis ends within its time and some")
    .unwrap()
    .expect("schemathesis runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let tail: String = text
        .lines()
        .rev()
        .take(60)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    let summary = text
        .lines()
        .find(|l| l.contains(" generated,"))
        .unwrap_or("")
        .trim();
    println!("schemathesis, seed {seed}, {seconds} s: {summary}");
    assert!(
        out.status.success(),
        "schemathesis found failures (report in {}):\n{tail}\n{}",
        report.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(summary.contains("generated"), "{tail}");

    // The gateway after it: nothing panicked or failed inside, and it still serves.
    let logged = std::fs::read_to_string(&log).unwrap();
    for bad in ["panicked", "internal error"] {
        let hits: Vec<&str> = logged.lines().filter(|l| l.contains(bad)).collect();
        assert!(
            hits.is_empty(),
            "`{bad}` in the gateway's log:\n{}",
            hits.join("\n")
        );
    }
    let health = gw.raw_request(Method::GET, "/healthz", &[], "").await;
    assert_eq!(health.status, 200);
    assert_eq!(health.text(), "ok\n");
    let r = gw
        .request(Method::POST, "/fn/fz-echo/", &[], "still here")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_ne!(
        r.header("ember-cold-start").as_deref(),
        Some("true"),
        "fz-echo stayed warm"
    );
}
