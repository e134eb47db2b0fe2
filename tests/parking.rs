//! The stopped tier (`on_idle = "park"`) against a real gateway and real containers: an
//! idle instance is stopped with its container kept, the next request starts that same
//! container again (no create) and is answered; a parked instance is removed after
//! `pause_timeout`; a gateway restarted on the same data dir adopts a parked container;
//! an agent parks and starts its instances again through its tunnel.
#![allow(clippy::disallowed_methods)] // tasks a test spawns end with the test

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{eventually, Gateway};
use http::Method;

fn manifest(name: &str, pause_timeout: &str) -> String {
    common::echo_manifest(
        name,
        "",
        &format!(
            "[scale]\non_idle = \"park\"\nidle_timeout = \"1s\"\npause_timeout = \"{pause_timeout}\""
        ),
    )
}

/// Docker's word for the container's state (`running`, `exited`), empty when it is gone.
fn docker_state(container: &str) -> String {
    let out = std::process::Command::new("docker")
        .args(["inspect", "--format", "{{.State.Status}}", container])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Waits until the function's one instance is parked (stopped, not still stopping).
async fn parked(gw: &Arc<Gateway>, name: &str) {
    eventually(Duration::from_secs(10), "parked", || {
        let (gw, name) = (gw.clone(), name.to_string());
        async move {
            let status = gw.function(&name).await;
            status["parked"] == 1 && status["instances"][0]["phase"] == "parked"
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_instance_parks_and_the_next_request_starts_the_same_container_again() {
    require_docker!();
    let gw = Arc::new(Gateway::start().await);
    gw.deploy("parker", &manifest("parker", "1h")).await;
    let first = gw
        .request(Method::GET, "/fn/parker/", &[], Bytes::new())
        .await;
    assert_eq!(first.status, 200);
    let container = gw.containers("parker")[0].clone();
    parked(&gw, "parker").await;
    assert_eq!(docker_state(&container), "exited", "stopped, and kept");
    let second = gw
        .request(Method::GET, "/fn/parker/", &[], Bytes::new())
        .await;
    assert_eq!(second.status, 200);
    assert_eq!(second.header("ember-cold-start"), Some("true".into()));
    assert_eq!(
        second.header("x-echo-host"),
        first.header("x-echo-host"),
        "the same container answers"
    );
    assert_eq!(gw.containers("parker"), std::slice::from_ref(&container));
    assert_eq!(docker_state(&container), "running");
    let status = gw.function("parker").await;
    assert_eq!(status["starts"], 1, "started again, not created: {status}");
    assert_eq!(status["ready"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parked_instance_is_removed_after_the_pause_timeout() {
    require_docker!();
    let gw = Arc::new(Gateway::start().await);
    gw.deploy("expiring", &manifest("expiring", "1s")).await;
    let first = gw
        .request(Method::GET, "/fn/expiring/", &[], Bytes::new())
        .await;
    assert_eq!(first.status, 200);
    let container = gw.containers("expiring")[0].clone();
    eventually(Duration::from_secs(15), "parked then removed", || {
        let gw = gw.clone();
        async move { common::docker_ps_all(&[&format!("ember.gateway={}", gw.id)]).is_empty() }
    })
    .await;
    assert_eq!(docker_state(&container), "", "the container is gone");
    let again = gw
        .request(Method::GET, "/fn/expiring/", &[], Bytes::new())
        .await;
    assert_eq!(again.status, 200);
    assert_eq!(gw.function("expiring").await["starts"], 2, "a fresh start");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_restarted_on_its_data_dir_adopts_a_parked_container() {
    require_docker!();
    let dir = tempfile::tempdir().unwrap();
    let gw = Arc::new(Gateway::builder().data_dir(dir.path()).start().await);
    gw.deploy("kept", &manifest("kept", "1h")).await;
    let first = gw
        .request(Method::GET, "/fn/kept/", &[], Bytes::new())
        .await;
    assert_eq!(first.status, 200);
    let container = gw.containers("kept")[0].clone();
    parked(&gw, "kept").await;
    let label = format!("ember.gateway={}", gw.id);
    drop(Arc::into_inner(gw).expect("no other holder"));
    let gw = Arc::new(Gateway::builder().data_dir(dir.path()).start().await);
    parked(&gw, "kept").await;
    let again = gw
        .request(Method::GET, "/fn/kept/", &[], Bytes::new())
        .await;
    assert_eq!(again.status, 200);
    assert_eq!(again.header("x-echo-host"), first.header("x-echo-host"));
    assert_eq!(gw.containers("kept"), std::slice::from_ref(&container));
    assert_eq!(
        gw.function("kept").await["starts"],
        0,
        "adopted, not started"
    );
    common::remove_containers(&label);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_on_an_agent_parks_and_starts_again_through_its_tunnel() {
    require_docker!();
    let (gw, _agents) = common::cluster::cluster(&["far"]).await;
    let _cleanup = common::Cleanup(format!("ember.gateway={}", gw.id));
    gw.deploy("remote", &manifest("remote", "1h")).await;
    let first = gw
        .request(Method::GET, "/fn/remote/", &[], Bytes::new())
        .await;
    assert_eq!(first.status, 200);
    let container = gw.containers("remote")[0].clone();
    parked(&gw, "remote").await;
    assert_eq!(
        docker_state(&container),
        "exited",
        "stopped by the agent, kept"
    );
    let second = gw
        .request(Method::GET, "/fn/remote/", &[], Bytes::new())
        .await;
    assert_eq!(second.status, 200);
    assert_eq!(second.header("ember-cold-start"), Some("true".into()));
    assert_eq!(second.header("x-echo-host"), first.header("x-echo-host"));
    assert_eq!(gw.containers("remote"), std::slice::from_ref(&container));
    assert_eq!(docker_state(&container), "running");
    let status = gw.function("remote").await;
    assert_eq!(status["starts"], 1, "started again by the agent: {status}");
    assert_eq!(status["instances"][0]["node"], "far");
}
