//! What the jobs tests share: waiting for a job's state, deploying the echo function.

use std::time::Duration;

use serde_json::Value;

use super::Gateway;

/// The job's record once it is in `state` (fails after `within`).
pub async fn wait_for(gw: &Gateway, id: &str, state: &str, within: Duration) -> Value {
    let deadline = std::time::Instant::now() + within;
    loop {
        let job = gw.get_json(&format!("/api/v1/jobs/{id}")).await;
        if job["state"] == state {
            return job;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job {id} never got {state}: {job}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Deploys the echo function as `name` with extra manifest `sections`.
pub async fn deploy_echo(gw: &Gateway, name: &str, sections: &str) {
    let r = gw
        .deploy(name, &super::echo_manifest(name, "", sections))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
}
