//! Secrets end to end: set from stdin, named in a manifest's `env`, delivered to the
//! container, and found in no API answer, no CLI listing and no log line of the gateway
//! (logging at trace, every crate on). A manifest naming a missing secret is refused at deploy with its
//! field path; a secret in use cannot be removed.

#![allow(clippy::disallowed_methods)] // the harness spawns tasks that end with the test

mod common;

use bytes::Bytes;
use common::Gateway;
use http::Method;

const VALUE: &str = "hf_s3cret-7Q4zX9";
const NEW_VALUE: &str = "hf_r0tated-K2pW8";

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secret_reaches_its_container_and_no_answer_listing_or_log_line() {
    require_docker!();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("gateway.log");
    let gw = Gateway::builder().log_to(&log, "trace").start().await;
    let manifest = common::echo_manifest("sec", "env = { GREETING = { secret = \"greet\" } }", "");

    // Named before it exists: refused, at its field.
    let r = gw.deploy("sec", &manifest).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let details = &r.json()["error"]["details"];
    assert_eq!(details[0]["field"], "env.GREETING.secret", "{}", r.text());
    assert!(
        details[0]["message"]
            .as_str()
            .unwrap()
            .contains("ember secret set greet"),
        "{}",
        r.text()
    );

    // Set from stdin (the trailing newline of `echo` dropped), then deployed.
    let out = gw.cli_input(&["secret", "set", "greet"], format!("{VALUE}\n").as_bytes());
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains(VALUE));
    let r = gw.deploy("sec", &manifest).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = gw.request(Method::GET, "/fn/sec/", &[], Bytes::new()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-greeting").as_deref(), Some(VALUE));

    // No answer or listing shows it; the manifest shows the reference.
    let mut seen = Vec::new();
    for path in [
        "/api/v1/functions",
        "/api/v1/functions/sec",
        "/api/v1/secrets",
    ] {
        seen.push(
            gw.request(Method::GET, path, &[], Bytes::new())
                .await
                .text(),
        );
    }
    assert!(seen[1].contains(r#""secret":"greet""#), "{}", seen[1]);
    assert!(seen[2].contains(r#""used_by":["sec"]"#), "{}", seen[2]);
    for args in [
        &["ls"][..],
        &["secret", "ls"],
        &["ls", "--json"],
        &["secret", "ls", "--json"],
    ] {
        let out = gw.cli(args);
        assert!(out.status.success(), "{}", text(&out));
        seen.push(text(&out));
    }
    for answer in &seen {
        assert!(!answer.contains(VALUE), "the value leaked: {answer}");
    }

    // In use: not removable. Set again: the next instance gets the new value.
    let out = gw.cli(&["secret", "rm", "greet"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("used by sec"), "{}", text(&out));
    let out = gw.cli_input(&["secret", "set", "greet"], NEW_VALUE.as_bytes());
    assert!(text(&out).contains("replaced"), "{}", text(&out));
    assert!(gw.cli(&["rm", "sec"]).status.success());
    assert_eq!(gw.deploy("sec", &manifest).await.status, 201);
    let r = gw.request(Method::GET, "/fn/sec/", &[], Bytes::new()).await;
    assert_eq!(r.header("x-greeting").as_deref(), Some(NEW_VALUE));
    assert!(gw.cli(&["rm", "sec"]).status.success());
    let out = gw.cli(&["secret", "rm", "greet"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = gw.cli(&["secret", "rm", "greet"]);
    assert!(
        text(&out).contains("no secret named `greet`"),
        "{}",
        text(&out)
    );

    // The log, at debug, has the secret's name and never its value.
    drop(gw);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("secret set"),
        "the log is on: {} bytes",
        log.len()
    );
    for value in [VALUE, NEW_VALUE] {
        let leaks: Vec<&str> = log.lines().filter(|l| l.contains(value)).collect();
        assert!(leaks.is_empty(), "the value is in the log: {leaks:#?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn secret_names_and_values_are_checked() {
    require_docker!();
    let gw = Gateway::start().await;
    let put = |name: &str, value: &'static [u8]| {
        let path = format!("/api/v1/secrets/{name}");
        let gw = &gw;
        async move { gw.request(Method::PUT, &path, &[], value).await }
    };
    let r = put("Bad%20Name", b"x").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["details"][0]["field"], "name");
    let r = put("ok", b"").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["details"][0]["field"], "value");
    let r = put("ok", b"\xff\xfe").await;
    assert_eq!(r.status, 400);
    assert_eq!(put("ok", b"fine").await.status, 201);
    assert_eq!(put("ok", b"finer").await.status, 200);
    let out = gw.cli_input(&["secret", "set", "empty"], b"\n");
    assert!(!out.status.success());
    assert!(text(&out).contains("the secret is empty"), "{}", text(&out));
}
