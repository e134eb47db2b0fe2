//! Agents that dial out: nothing of the agent listens, every call and every byte of user
//! traffic goes through its one tunnel, a cut tunnel comes back and loses nothing, a killed
//! agent cuts its streams visibly, a removed node is refused, and TLS is verified by pin.
#![allow(clippy::disallowed_methods)] // tasks a test spawns end with the test

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cluster::{gateway_args, instance_nodes, node_state, wait_ready, TOKEN};
use common::net::{listening_ports, CutRelay};
use common::{eventually, Agent, Gateway};
use http::Method;
use http_body_util::BodyExt;

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_listens_on_nothing_and_carries_streams_and_large_downloads() {
    require_docker!();
    let gw = Arc::new(Gateway::builder().args(gateway_args(None)).start().await);
    let agent = Agent::builder(&gw.url, TOKEN, "far").start().await;
    wait_ready(&gw, 1).await;
    assert_eq!(
        listening_ports(agent.pid().unwrap()),
        Vec::<u16>::new(),
        "the agent has no listening socket"
    );
    gw.deploy("far", &common::echo_manifest("far", "", ""))
        .await;

    let r = gw
        .request(Method::POST, "/fn/far/x", &[], "through the tunnel")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "through the tunnel");
    assert_eq!(instance_nodes(&gw, "far").await, ["far"]);

    // 20 MiB, every byte checked.
    let size = 20 << 20;
    let r = gw
        .request(
            Method::GET,
            &format!("/fn/far/bytes/{size}"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), size);
    assert!(r
        .body
        .iter()
        .enumerate()
        .all(|(i, b)| *b == (i % 251) as u8));

    // A stream arrives as it is produced, not at the end.
    let resp = gw.stream("/fn/far/stream/5?interval_ms=300").await;
    let mut body = resp.into_body();
    let started = Instant::now();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().unwrap().starts_with(b"chunk 0"));
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "the first chunk came at once"
    );
    let mut chunks = 1;
    while let Some(frame) = body.frame().await {
        if frame.unwrap().data_ref().is_some_and(|d| !d.is_empty()) {
            chunks += 1;
        }
    }
    assert!(chunks >= 2, "more chunks followed over time");
    assert!(started.elapsed() >= Duration::from_millis(1000));
    drop(agent);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cut_tunnel_disconnects_the_node_then_it_comes_back_and_adopts_without_losing_a_request()
{
    require_docker!();
    let args = gateway_args(None)
        .into_iter()
        .map(|a| if a == "2s" { "30s".to_string() } else { a });
    let gw = Arc::new(Gateway::builder().args(args).start().await);
    let gw_addr = gw.url.trim_start_matches("http://").parse().unwrap();
    let relay = CutRelay::start(gw_addr).await;
    let _agent = Agent::builder(&format!("http://{}", relay.addr), TOKEN, "cut")
        .start()
        .await;
    wait_ready(&gw, 1).await;
    gw.deploy(
        "kept",
        &common::echo_manifest("kept", "", "[scale]\nidle_timeout = \"10m\""),
    )
    .await;
    let before = gw
        .request(Method::GET, "/fn/kept/", &[], Bytes::new())
        .await;
    assert_eq!(before.status, 200);
    let container = gw.containers("kept");

    // The agent stays away until the request below is waiting: it dials again within
    // 100 ms, which a loaded machine's status polls could miss entirely.
    relay.refuse_new(true);
    let cut_at = Instant::now();
    relay.cut();
    eventually(Duration::from_secs(5), "node disconnected", || {
        let gw = gw.clone();
        async move { node_state(&gw, "cut").await == "disconnected" }
    })
    .await;
    let to_disconnected = cut_at.elapsed();
    // A request sent while the node is away waits for it instead of failing.
    let waiting = {
        let gw = gw.clone();
        tokio::spawn(async move {
            gw.request(Method::GET, "/fn/kept/", &[], Bytes::new())
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    relay.refuse_new(false);
    eventually(Duration::from_secs(20), "node back", || {
        let gw = gw.clone();
        async move { node_state(&gw, "cut").await == "ready" }
    })
    .await;
    let to_ready = cut_at.elapsed();
    let r = waiting.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-echo-host"),
        before.header("x-echo-host"),
        "the same container"
    );
    assert_eq!(
        r.header("ember-cold-start"),
        None,
        "it waited for its node to come back, not for a start"
    );
    assert_eq!(gw.containers("kept"), container, "adopted, not duplicated");
    let status = gw.function("kept").await;
    assert_eq!(status["instances"].as_array().unwrap().len(), 1);
    assert_eq!(status["starts"], 1);
    eprintln!("tunnel cut: disconnected after {to_disconnected:?}, ready again after {to_ready:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkilled_agent_cuts_its_stream_visibly_and_the_next_request_is_served_elsewhere() {
    require_docker!();
    let gw = Arc::new(Gateway::builder().args(gateway_args(None)).start().await);
    let mut doomed = Agent::builder(&gw.url, TOKEN, "doomed").start().await;
    wait_ready(&gw, 1).await;
    gw.deploy(
        "mover",
        &common::echo_manifest("mover", "", "[scale]\nmax = 1"),
    )
    .await;
    assert_eq!(
        gw.request(Method::GET, "/fn/mover/", &[], Bytes::new())
            .await
            .status,
        200
    );
    let _survivor = Agent::builder(&gw.url, TOKEN, "survivor").start().await;
    wait_ready(&gw, 2).await;

    let resp = gw.stream("/fn/mover/stream/50?interval_ms=100").await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    doomed.kill();
    for id in common::docker_ps(&[&format!("ember.gateway={}", gw.id), "ember.node=doomed"]) {
        std::process::Command::new("docker")
            .args(["kill", &id])
            .output()
            .unwrap();
    }
    let rest = tokio::time::timeout(Duration::from_secs(15), async {
        let mut frames = 0;
        loop {
            match body.frame().await {
                Some(Ok(_)) => frames += 1,
                Some(Err(_)) => return Err(frames),
                None => return Ok(frames),
            }
        }
    })
    .await
    .expect("the stream ends, never hangs");
    assert!(
        rest.is_err(),
        "the cut is visible, not a short 200: {rest:?}"
    );

    let r = gw
        .request(Method::GET, "/fn/mover/", &[], Bytes::new())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(instance_nodes(&gw, "mover").await, ["survivor"]);
}

/// A new join token from `ember token create`.
fn new_token(gw: &Gateway) -> String {
    let out = gw.cli(&["token", "create", "--ttl", "1h"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("join token:"))
        .map(|t| t.trim().to_string())
        .expect("a join token")
}

/// Runs `ember agent` to its exit: its exit code and what it said.
fn agent_exit(
    gw: &Gateway,
    name: &str,
    token: &str,
    data_dir: &std::path::Path,
) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ember"))
        .args([
            "agent",
            "--gateway",
            &gw.url,
            "--token",
            token,
            "--name",
            name,
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_node_is_refused_cleans_up_and_needs_a_new_join_token() {
    require_docker!();
    let gw = Arc::new(Gateway::builder().args(gateway_args(None)).start().await);
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::builder(&gw.url, TOKEN, "gone")
        .data_dir(dir.path())
        .start()
        .await;
    wait_ready(&gw, 1).await;
    gw.deploy("left", &common::echo_manifest("left", "", ""))
        .await;
    assert_eq!(
        gw.request(Method::GET, "/fn/left/", &[], Bytes::new())
            .await
            .status,
        200
    );
    assert!(
        dir.path().join("node.json").exists(),
        "the credential is kept"
    );
    // A copy of the credential, stale once the name is given to another join.
    let stale = tempfile::tempdir().unwrap();
    std::fs::copy(dir.path().join("node.json"), stale.path().join("node.json")).unwrap();

    // Another join under a name a node holds is refused, and says what to do.
    let (code, said) = agent_exit(&gw, "gone", TOKEN, tempfile::tempdir().unwrap().path());
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("ember nodes rm gone"), "{said}");

    let out = gw.cli(&["nodes", "rm", "gone"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Its tunnel closes; its next dial is refused, and it cleans up and exits.
    let exited = agent.wait_exit(Duration::from_secs(15));
    assert_eq!(
        exited.and_then(|s| s.code()),
        Some(3),
        "the refused agent exits with the code its service manager does not restart"
    );
    assert!(
        !dir.path().join("node.json").exists(),
        "and forgets its credential"
    );
    eventually(Duration::from_secs(10), "its containers removed", || {
        let gw = gw.clone();
        async move { gw.containers("left").is_empty() }
    })
    .await;
    let nodes = gw.get_json("/api/v1/nodes").await;
    assert!(nodes["nodes"].as_array().unwrap().is_empty());
    agent.kill();

    // Started again with the same (long-lived) token, it stays removed, and says why.
    let (code, said) = agent_exit(&gw, "gone", TOKEN, dir.path());
    assert_eq!(code, Some(3), "{said}");
    assert!(
        said.contains("was removed") && said.contains("ember token create"),
        "{said}"
    );
    assert!(gw.get_json("/api/v1/nodes").await["nodes"]
        .as_array()
        .unwrap()
        .is_empty());

    // A new token brings it back; that token is spent by the join.
    let token = new_token(&gw);
    let _back = Agent::builder(&gw.url, &token, "gone")
        .data_dir(dir.path())
        .start()
        .await;
    wait_ready(&gw, 1).await;
    let (code, said) = agent_exit(&gw, "other", &token, tempfile::tempdir().unwrap().path());
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("join token"), "{said}");
    assert_eq!(
        gw.request(Method::GET, "/fn/left/", &[], Bytes::new())
            .await
            .status,
        200
    );
    assert_eq!(gw.containers("left").len(), 1);

    // The stale credential is refused; that agent leaves the name's containers alone.
    let (code, said) = agent_exit(&gw, "gone", TOKEN, stale.path());
    assert_eq!(code, Some(3), "{said}");
    assert!(said.contains("left running"), "{said}");
    assert_eq!(
        gw.containers("left").len(),
        1,
        "the new node's container stays"
    );
    assert_eq!(
        gw.request(Method::GET, "/fn/left/", &[], Bytes::new())
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_and_the_cli_trust_a_gateway_by_its_pin_and_refuse_a_wrong_one_saying_why() {
    require_docker!();
    let gw = Arc::new(
        Gateway::builder()
            .args(gateway_args(None))
            .args(["--tls", "self-signed"])
            .start()
            .await,
    );
    assert!(gw.url.starts_with("https://127.0.0.1:"), "{}", gw.url);

    // `ember token create` prints a token, the pin, and the agent command that uses them.
    let out = gw.cli(&["token", "create", "--ttl", "1h"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    let token = field("join token:");
    let pin = field("CA pin:");
    assert!(pin.starts_with("sha256:") && pin.len() == 7 + 64, "{pin}");
    assert!(text.contains(&format!("--ca-pin {pin}")), "{text}");

    let wrong = format!("sha256:{}", "0".repeat(64));
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_ember"))
        .args([
            "agent",
            "--gateway",
            &gw.url,
            "--token",
            &token,
            "--name",
            "spoofed",
        ])
        .args(["--ca-pin", &wrong, "--data-dir"])
        .arg(tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("does not match --ca-pin"), "{why}");

    let _agent = Agent::builder(&gw.url, &token, "pinned")
        .args(["--ca-pin", &pin])
        .start()
        .await;
    wait_ready(&gw, 1).await;
    gw.deploy("secure", &common::echo_manifest("secure", "", ""))
        .await;
    let out = gw.cli(&["invoke", "secure", "/", "-d", "over TLS"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "over TLS");

    // The CLI with a wrong pin refuses too, and says why; without any trust it refuses.
    let out = common::cli_command(&gw.data_dir.join("cli-config"))
        .args([
            "--gateway",
            &gw.url,
            "--token",
            &gw.token,
            "--ca-pin",
            &wrong,
            "ls",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not match --ca-pin"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = common::cli_command(&gw.data_dir.join("cli-config"))
        .args(["--gateway", &gw.url, "--token", &gw.token, "ls"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "no trust, no answer");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_tunnel_is_noticed_within_twenty_seconds_even_when_idle() {
    require_docker!();
    let args = gateway_args(None)
        .into_iter()
        .map(|a| if a == "2s" { "60s".to_string() } else { a });
    let gw = Arc::new(Gateway::builder().args(args).start().await);
    let gw_addr = gw.url.trim_start_matches("http://").parse().unwrap();
    let relay = CutRelay::start(gw_addr).await;
    let _agent = Agent::builder(&format!("http://{}", relay.addr), TOKEN, "quiet")
        .start()
        .await;
    wait_ready(&gw, 1).await;
    // The network goes silent: nothing flows, nothing closes, and the agent cannot dial
    // again; only the gateway's pings can tell.
    relay.refuse_new(true);
    let frozen_at = Instant::now();
    relay.freeze();
    eventually(Duration::from_secs(25), "node disconnected", || {
        let gw = gw.clone();
        async move { node_state(&gw, "quiet").await == "disconnected" }
    })
    .await;
    let noticed = frozen_at.elapsed();
    assert!(
        noticed <= Duration::from_secs(20),
        "noticed after {noticed:?}"
    );
    relay.refuse_new(false);
    eventually(Duration::from_secs(45), "node back", || {
        let gw = gw.clone();
        async move { node_state(&gw, "quiet").await == "ready" }
    })
    .await;
    eprintln!(
        "silent tunnel: disconnected after {noticed:?}, ready again {:?} after the network came back",
        frozen_at.elapsed() - noticed
    );
}
