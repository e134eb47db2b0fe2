//! Many machines, one endpoint: a gateway and three agents as separate processes on this
//! machine's Docker engine (each labelling its containers with its node), placement across
//! them, cordon and drain, and the faults: a killed agent, its restart, a dead instance
//! behind a POST, and a node that comes back with fewer GPUs.
#![allow(clippy::disallowed_methods)] // tasks a test spawns end with the test

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cluster::{
    cluster, gateway_args, instance_nodes, node_containers, node_state, wait_ready, TOKEN,
};
use common::{eventually, Agent, Gateway};
use http::Method;

#[tokio::test(flavor = "multi_thread")]
async fn placement_spreads_over_nodes_and_cordon_and_drain_move_work_away() {
    require_docker!();
    let (gw, _agents) = cluster(&["n1", "n2", "n3"]).await;
    let spread = common::echo_manifest("spread", "", "[scale]\nconcurrency = 1\nmax = 3");
    gw.deploy("spread", &spread).await;
    assert!(common::concurrent_statuses(&gw, "/fn/spread/sleep/1200", 3)
        .await
        .iter()
        .all(|s| *s == 200));
    assert_eq!(
        instance_nodes(&gw, "spread").await,
        ["n1", "n2", "n3"],
        "one per node"
    );
    for n in ["n1", "n2", "n3"] {
        let ids = node_containers(&gw, n);
        assert_eq!(
            ids.len(),
            1,
            "{n} runs its own container, labelled with its node"
        );
    }

    let out = gw.cli(&["cordon", "n1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(node_state(&gw, "n1").await, "cordoned");
    let avoid = common::echo_manifest("avoid", "", "[scale]\nconcurrency = 1\nmax = 2");
    gw.deploy("avoid", &avoid).await;
    assert!(common::concurrent_statuses(&gw, "/fn/avoid/sleep/1000", 2)
        .await
        .iter()
        .all(|s| *s == 200));
    assert_eq!(
        instance_nodes(&gw, "avoid").await,
        ["n2", "n3"],
        "never on the cordoned node"
    );

    // Drain the node of a warm function while traffic flows: no request fails, the
    // replacement starts elsewhere first, then the old instance stops.
    let steady = common::echo_manifest("steady", "", "[scale]\nmin = 1\nmax = 1");
    gw.deploy("steady", &steady).await;
    eventually(Duration::from_secs(10), "steady warm", || {
        let gw = gw.clone();
        async move { gw.function("steady").await["ready"] == 1 }
    })
    .await;
    let from = instance_nodes(&gw, "steady").await[0].clone();
    let traffic = {
        let gw = gw.clone();
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            let until = Instant::now() + Duration::from_secs(4);
            while Instant::now() < until {
                statuses.push(
                    gw.request(Method::GET, "/fn/steady/", &[], Bytes::new())
                        .await
                        .status,
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            statuses
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = gw.cli(&["drain", &from]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("draining"));
    let statuses = traffic.await.unwrap();
    assert!(
        statuses.iter().all(|s| *s == 200),
        "no request failed during the drain"
    );
    eventually(Duration::from_secs(10), "steady moved", || {
        let gw = gw.clone();
        let from = from.clone();
        async move {
            let nodes = instance_nodes(&gw, "steady").await;
            nodes.len() == 1 && nodes[0] != from
        }
    })
    .await;
    eventually(
        Duration::from_secs(10),
        "the drained container stopped",
        || {
            let gw = gw.clone();
            let from = from.clone();
            async move {
                !common::docker_ps(&[
                    &format!("ember.gateway={}", gw.id),
                    &format!("ember.node={from}"),
                    "ember.function=steady",
                ])
                .iter()
                .any(|_| true)
            }
        },
    )
    .await;
    assert_eq!(node_state(&gw, &from).await, "draining");

    let out = gw.cli(&["uncordon", "n1"]);
    assert!(out.status.success());
    assert_eq!(node_state(&gw, "n1").await, "ready");
    let out = gw.cli(&["nodes"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("n1") && table.contains("draining") && table.contains("name=n2"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_agent_is_lost_its_work_moves_and_its_restart_is_reconciled() {
    require_docker!();
    let (gw, mut agents) = cluster(&["n1", "n2", "n3"]).await;
    gw.deploy(
        "moving",
        &common::echo_manifest("moving", "", "[scale]\nmax = 1"),
    )
    .await;
    assert_eq!(
        gw.request(Method::GET, "/fn/moving/", &[], Bytes::new())
            .await
            .status,
        200
    );
    let victim = instance_nodes(&gw, "moving").await[0].clone();
    let victim_idx = agents.iter().position(|a| a.name == victim).unwrap();

    // A request in flight when the machine dies answers 502 with a clear body.
    let in_flight = {
        let gw = gw.clone();
        tokio::spawn(async move {
            gw.request(Method::GET, "/fn/moving/sleep/5000", &[], Bytes::new())
                .await
        })
    };
    eventually(Duration::from_secs(5), "request in flight", || {
        let gw = gw.clone();
        async move { gw.function("moving").await["in_flight"] == 1 }
    })
    .await;
    agents[victim_idx].kill();
    for id in node_containers(&gw, &victim) {
        std::process::Command::new("docker")
            .args(["kill", &id])
            .output()
            .unwrap();
    }
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_error");
    assert!(r.text().contains("instance"), "{}", r.text());

    eventually(Duration::from_secs(6), "node lost", || {
        let gw = gw.clone();
        let victim = victim.clone();
        async move { node_state(&gw, &victim).await == "lost" }
    })
    .await;
    let t = Instant::now();
    let r = gw
        .request(Method::GET, "/fn/moving/", &[], Bytes::new())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(t.elapsed() < Duration::from_secs(10));
    let now_on = instance_nodes(&gw, "moving").await;
    assert_eq!(now_on.len(), 1);
    assert_ne!(now_on[0], victim, "replaced on another node");

    // The agent comes back: it registers again and its leftover container is removed.
    assert_eq!(
        node_containers(&gw, &victim).len(),
        1,
        "the dead container is still there"
    );
    agents[victim_idx].restart().await;
    eventually(Duration::from_secs(10), "leftover removed", || {
        let gw = gw.clone();
        let victim = victim.clone();
        async move { node_containers(&gw, &victim).is_empty() }
    })
    .await;
    wait_ready(&gw, 3).await;
    let status = gw.function("moving").await;
    assert_eq!(
        status["instances"].as_array().unwrap().len(),
        1,
        "never duplicated: {status}"
    );
    assert_eq!(gw.containers("moving").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_post_to_an_instance_whose_agent_and_container_died_is_served_by_another_node() {
    require_docker!();
    let (gw, mut agents) = cluster(&["n1", "n2"]).await;
    gw.deploy(
        "survivor",
        &common::echo_manifest("survivor", "", "[scale]\nmax = 1"),
    )
    .await;
    let r = gw
        .request(Method::POST, "/fn/survivor/", &[], "warm up")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let victim = instance_nodes(&gw, "survivor").await[0].clone();
    let victim_idx = agents.iter().position(|a| a.name == victim).unwrap();
    agents[victim_idx].kill();
    for id in node_containers(&gw, &victim) {
        std::process::Command::new("docker")
            .args(["kill", &id])
            .output()
            .unwrap();
    }
    // The gateway has not noticed yet: the instance looks ready, and refuses the
    // connection. The body was never read, so the request goes to a new instance.
    let body = "payload ".repeat(8 * 1024);
    let r = gw
        .request(
            Method::POST,
            "/fn/survivor/upload",
            &[("content-type", "text/plain")],
            body.clone(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), body, "the whole body reached the new instance");
    let now_on = instance_nodes(&gw, "survivor").await;
    assert_eq!(now_on.len(), 1);
    assert_ne!(now_on[0], victim);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_back_with_fewer_gpus_loses_the_instances_on_the_missing_ones() {
    require_docker!();
    let args = gateway_args(None);
    let gw = Arc::new(Gateway::builder().args(&args).start().await);
    let two = "[[gpu]]\nname = \"NVIDIA L4\"\nuuid = \"GPU-x\"\nmemory = \"24GiB\"\n\
               [[gpu]]\nname = \"NVIDIA L4\"\nuuid = \"GPU-y\"\nmemory = \"24GiB\"\n";
    let one = "[[gpu]]\nname = \"NVIDIA L4\"\nuuid = \"GPU-x\"\nmemory = \"24GiB\"\n";
    let mut agent = Agent::builder(&gw.url, TOKEN, "g1")
        .inventory(two)
        .start()
        .await;
    wait_ready(&gw, 1).await;
    let manifest = common::echo_manifest(
        "gpus",
        "",
        "[scale]\nconcurrency = 1\nmax = 2\nidle_timeout = \"1h\"\n[gpu]\nmodels = [\"L4\"]",
    );
    gw.deploy("gpus", &manifest).await;
    assert!(common::concurrent_statuses(&gw, "/fn/gpus/sleep/1000", 2)
        .await
        .iter()
        .all(|s| *s == 200));
    let held = |s: &serde_json::Value| -> Vec<String> {
        let mut v: Vec<String> = s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["gpus"][0].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(held(&gw.function("gpus").await), ["GPU-x", "GPU-y"]);

    agent.restart_with(|b| b.inventory(one)).await;
    eventually(
        Duration::from_secs(10),
        "the instance on GPU-y dropped",
        || {
            let gw = gw.clone();
            async move { held(&gw.function("gpus").await) == ["GPU-x"] }
        },
    )
    .await;
    eventually(Duration::from_secs(10), "its container removed", || {
        let gw = gw.clone();
        async move { gw.containers("gpus").len() == 1 }
    })
    .await;
    assert_eq!(
        gw.request(Method::GET, "/fn/gpus/", &[], Bytes::new())
            .await
            .status,
        200
    );
}
