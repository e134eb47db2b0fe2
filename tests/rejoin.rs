//! Nodes that come and go: a restarted gateway gets its agents back and adopts their
//! instances, a wrong join token gets nothing, and a node that joins another gateway
//! removes what the old one left.
#![allow(clippy::disallowed_methods)] // tasks a test spawns end with the test

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::cluster::{gateway_args, wait_ready, TOKEN};
use common::{eventually, Agent, Gateway};
use http::Method;

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_gateway_gets_its_agents_back_and_adopts_their_instances() {
    require_docker!();
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", common::free_port());
    let args = gateway_args(Some(&listen));
    let mut gw = Gateway::builder()
        .args(&args)
        .data_dir(dir.path())
        .start()
        .await;
    let label = format!("ember.gateway={}", gw.id);
    let _cleanup = common::Cleanup(label.clone());
    let _agents = [
        Agent::builder(&gw.url, TOKEN, "n1").start().await,
        Agent::builder(&gw.url, TOKEN, "n2").start().await,
    ];
    let shared = Arc::new(gw);
    wait_ready(&shared, 2).await;
    gw = Arc::try_unwrap(shared).ok().unwrap();
    gw.deploy("kept", &common::echo_manifest("kept", "", ""))
        .await;
    let before = gw
        .request(Method::GET, "/fn/kept/", &[], Bytes::new())
        .await;
    assert_eq!(before.status, 200);
    let containers = gw.containers("kept");
    gw.kill();

    let gw = Arc::new(
        Gateway::builder()
            .args(&args)
            .data_dir(dir.path())
            .start()
            .await,
    );
    eventually(
        Duration::from_secs(10),
        "agents back and the instance adopted",
        || {
            let gw = gw.clone();
            async move { gw.function("kept").await["ready"] == 1 }
        },
    )
    .await;
    // Each node takes placements again once it has been reconciled.
    wait_ready(&gw, 2).await;
    let status = gw.function("kept").await;
    assert_eq!(status["instances"][0]["adopted"], true);
    assert_eq!(gw.containers("kept"), containers, "the same container");
    let after = gw
        .request(Method::GET, "/fn/kept/", &[], Bytes::new())
        .await;
    assert_eq!(after.header("x-echo-host"), before.header("x-echo-host"));
    assert_eq!(
        gw.function("kept").await["starts"],
        0,
        "warm after the restart"
    );
    drop(gw);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_join_token_gets_401_and_nothing_else() {
    require_docker!();
    let args = gateway_args(None);
    let gw = Gateway::builder().args(&args).start().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ember"))
        .args([
            "agent",
            "--gateway",
            &gw.url,
            "--token",
            "wrong-token",
            "--name",
            "intruder",
        ])
        .arg("--data-dir")
        .arg(tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong, expired or missing join token"));
    // A tunnel with a made-up credential is refused before anything is upgraded.
    let r = gw
        .request(
            Method::GET,
            "/api/v1/nodes/tunnel",
            &[
                ("authorization", "Bearer nope"),
                ("ember-node", "intruder"),
                ("connection", "upgrade"),
                ("upgrade", "ember-tunnel/1"),
            ],
            "",
        )
        .await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "unauthorized");
    assert!(gw.get_json("/api/v1/nodes").await["nodes"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_joins_another_gateway_removes_what_the_old_one_left() {
    require_docker!();
    let args = gateway_args(None);
    let agent_dir = tempfile::tempdir().unwrap();
    let data_dir = agent_dir.path().join("agent");
    let old = Arc::new(Gateway::builder().args(&args).start().await);
    let mut agent = Agent::builder(&old.url, TOKEN, "mover")
        .data_dir(&data_dir)
        .start()
        .await;
    wait_ready(&old, 1).await;
    old.deploy("left", &common::echo_manifest("left", "", ""))
        .await;
    assert_eq!(
        old.request(Method::GET, "/fn/left/", &[], Bytes::new())
            .await
            .status,
        200
    );
    assert_eq!(old.containers("left").len(), 1);
    let old_label = format!("ember.gateway={}", old.id);
    let _cleanup = common::Cleanup(old_label.clone());
    agent.kill();

    let new = Arc::new(Gateway::builder().args(&args).start().await);
    let _agent = Agent::builder(&new.url, TOKEN, "mover")
        .data_dir(&data_dir)
        .start()
        .await;
    wait_ready(&new, 1).await;
    assert!(
        common::docker_ps_all(&[&old_label]).is_empty(),
        "the old gateway's container on this node is gone"
    );
}
