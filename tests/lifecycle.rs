//! Lifecycle end to end: scale to zero, redeploys, removal, restart with adoption, the CLI.
#![allow(clippy::disallowed_methods)] // tasks a test spawns end with the test

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{eventually, Gateway};
use http::Method;

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_container_is_reaped_and_the_next_request_cold_starts_again() {
    require_docker!();
    let gw = std::sync::Arc::new(Gateway::start().await);
    gw.deploy(
        "idle",
        &common::echo_manifest("idle", "", "[scale]\nidle_timeout = \"1s\""),
    )
    .await;
    let first = gw
        .request(Method::GET, "/fn/idle/", &[], Bytes::new())
        .await;
    assert_eq!(first.status, 200);
    assert_eq!(gw.containers("idle").len(), 1);
    eventually(Duration::from_secs(6), "the idle container is gone", || {
        let gw = gw.clone();
        async move { common::docker_ps_all(&[&format!("ember.gateway={}", gw.id)]).is_empty() }
    })
    .await;
    assert_eq!(gw.function("idle").await["ready"], 0);
    let second = gw
        .request(Method::GET, "/fn/idle/", &[], Bytes::new())
        .await;
    assert_eq!(second.status, 200);
    assert_ne!(
        first.header("x-echo-host"),
        second.header("x-echo-host"),
        "a new container"
    );
    assert_eq!(gw.function("idle").await["starts"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn min_instances_stay_warm_without_traffic() {
    require_docker!();
    let gw = std::sync::Arc::new(Gateway::start().await);
    gw.deploy(
        "warm",
        &common::echo_manifest("warm", "", "[scale]\nmin = 1\nidle_timeout = \"1s\""),
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "one instance ready without a request",
        || {
            let gw = gw.clone();
            async move { gw.function("warm").await["ready"] == 1 }
        },
    )
    .await;
    gw.request(Method::GET, "/fn/warm/", &[], Bytes::new())
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(gw.containers("warm").len(), 1, "min = 1 is never reaped");
}

#[tokio::test(flavor = "multi_thread")]
async fn redeploying_the_same_manifest_is_a_no_op_and_a_change_drains_old_instances() {
    require_docker!();
    let gw = std::sync::Arc::new(Gateway::start().await);
    let v1 = common::echo_manifest("roll", "env = { GREETING = \"one\" }", "");
    let r = gw.deploy("roll", &v1).await;
    assert_eq!(r.status, 201);
    let rev1 = r.json()["revision"].as_str().unwrap().to_string();
    let old = gw
        .request(Method::GET, "/fn/roll/", &[], Bytes::new())
        .await;
    assert_eq!(old.header("x-greeting").as_deref(), Some("one"));

    let again = gw.deploy("roll", &v1).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["changed"], false);
    assert_eq!(again.json()["revision"], rev1.as_str());
    assert_eq!(
        gw.function("roll").await["starts"],
        1,
        "a no-op deploy starts nothing"
    );

    let v2 = common::echo_manifest("roll", "env = { GREETING = \"two\" }", "");
    let r = gw.deploy("roll", &v2).await;
    assert_eq!(r.json()["changed"], true);
    assert_ne!(r.json()["revision"], rev1.as_str());
    // Until the new revision is ready the old one serves; after, only the new one.
    eventually(
        Duration::from_secs(10),
        "traffic moves to the new revision",
        || {
            let gw = gw.clone();
            async move {
                let r = gw
                    .request(Method::GET, "/fn/roll/", &[], Bytes::new())
                    .await;
                assert_eq!(r.status, 200, "no request fails during the roll-over");
                r.header("x-greeting").as_deref() == Some("two")
            }
        },
    )
    .await;
    let old_host = old.header("x-echo-host").unwrap();
    eventually(
        Duration::from_secs(10),
        "the old container drains away",
        || {
            let gw = gw.clone();
            let old_host = old_host.clone();
            async move {
                !gw.containers("roll")
                    .iter()
                    .any(|c| c.starts_with(&old_host))
            }
        },
    )
    .await;
    assert_eq!(gw.containers("roll").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn removing_a_function_removes_its_containers() {
    require_docker!();
    let gw = Gateway::start().await;
    gw.deploy("gone", &common::echo_manifest("gone", "", ""))
        .await;
    assert_eq!(
        gw.request(Method::GET, "/fn/gone/", &[], Bytes::new())
            .await
            .status,
        200
    );
    assert_eq!(gw.containers("gone").len(), 1);
    let out = gw.cli(&["rm", "gone"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed gone (1 container removed)"));
    assert!(gw.containers("gone").is_empty());
    assert_eq!(
        gw.request(Method::GET, "/fn/gone/", &[], Bytes::new())
            .await
            .status,
        404
    );
    let out = gw.cli(&["rm", "gone"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not deployed"));
}

#[tokio::test(flavor = "multi_thread")]
async fn after_sigkill_a_restarted_gateway_adopts_the_warm_container_and_removes_orphans() {
    require_docker!();
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::builder().data_dir(dir.path()).start().await;
    let gateway_label = format!("ember.gateway={}", gw.id);
    let _cleanup = common::Cleanup(gateway_label.clone());
    gw.deploy("keep", &common::echo_manifest("keep", "", ""))
        .await;
    let before = gw
        .request(Method::GET, "/fn/keep/", &[], Bytes::new())
        .await;
    assert_eq!(before.status, 200);
    let running = gw.containers("keep");
    assert_eq!(running.len(), 1);
    gw.kill();

    // A container of this gateway that no record explains, as if left by a crash mid-start.
    let orphan = std::process::Command::new("docker")
        .args([
            "run",
            "-d",
            "--label",
            "ember.managed=true",
            "--label",
            &gateway_label,
        ])
        .args([
            "--label",
            "ember.node=local",
            "--label",
            "ember.function=keep",
        ])
        .args([
            "--label",
            "ember.revision=old",
            "--label",
            "ember.instance=orphan",
        ])
        .arg(common::echo_image())
        .output()
        .unwrap();
    assert!(orphan.status.success());
    let orphan_id = String::from_utf8_lossy(&orphan.stdout).trim().to_string();

    let gw = Gateway::builder().data_dir(dir.path()).start().await;
    assert_eq!(
        format!("ember.gateway={}", gw.id),
        gateway_label,
        "same gateway identity"
    );
    let status = gw.function("keep").await;
    assert_eq!(status["ready"], 1, "adopted: {status}");
    assert_eq!(status["instances"][0]["adopted"], true);
    assert_eq!(
        gw.containers("keep"),
        running,
        "the same container, not a new one"
    );
    assert!(
        !common::docker_ps_all(&[&gateway_label]).contains(&orphan_id),
        "the orphan was removed"
    );
    let after = gw
        .request(Method::GET, "/fn/keep/", &[], Bytes::new())
        .await;
    assert_eq!(after.status, 200);
    assert_eq!(after.header("x-echo-host"), before.header("x-echo-host"));
    assert_eq!(
        gw.function("keep").await["starts"],
        0,
        "the request was warm"
    );
    drop(gw);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_deploys_a_folder_building_its_image_then_lists_and_invokes() {
    require_docker!();
    // Make sure the echo binary exists (the image itself is built by the gateway here).
    common::echo_image();
    let gw = Gateway::start().await;
    let out = gw.cli(&["deploy", "functions/echo"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("deployed echo"), "{stdout}");
    let image = gw.function("echo").await["image"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(image.starts_with("ember/echo:"), "{image}");

    let out = gw.cli(&["deploy", "functions/echo/ember.toml"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("unchanged"));

    let out = gw.cli(&["invoke", "echo", "/x?y=1", "-d", "hi from the cli"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi from the cli");

    let out = gw.cli(&["ls"]);
    let table = String::from_utf8_lossy(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with("echo "))
        .expect("echo listed");
    let cols: Vec<&str> = row.split_whitespace().collect();
    // DESIRED READY STARTING PAUSED PARKED IN-FLIGHT QUEUED STARTS STATUS
    assert_eq!(
        &cols[3..11],
        ["1", "0", "0", "0", "0", "0", "1", "ok"],
        "{table}"
    );

    let out = gw.cli(&["ls", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["functions"][0]["name"], "echo");

    let out = gw.cli(&["invoke", "echo", "/status/404"]);
    assert!(
        !out.status.success(),
        "a 404 from the function fails the command"
    );

    let bad = tempfile::tempdir().unwrap();
    std::fs::write(
        bad.path().join("ember.toml"),
        "name = \"Bad\"\nimage = \"x\"\n[scale]\nmax = 0\n",
    )
    .unwrap();
    let out = gw.cli(&["deploy", bad.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("  name: `Bad` is not a lower-case DNS label"),
        "{err}"
    );
    assert!(
        err.contains("  scale.max: must be between 1 and 1000"),
        "{err}"
    );
}
