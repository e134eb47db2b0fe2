//! WebSockets through `/fn/NAME/...`: the upgrade passes through to the instance, on the
//! embedded node and through an agent's tunnel; an open socket counts as in flight and
//! holds its instance against the idle reaper and the gateway's header timeout; a socket
//! whose instance is retired (a new revision, `ember rm`, a node drain) or whose gateway
//! stops is closed with a Close frame within seconds.
#![allow(clippy::disallowed_methods)] // tasks a test spawns end with the test

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::cluster::{cluster, instance_nodes};
use common::ws::{self, closes_going_away};
use common::{eventually, Gateway};
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::{Error, Message};

/// A gateway that closes silent connections after one second.
async fn impatient_gateway() -> Arc<Gateway> {
    Arc::new(
        Gateway::builder()
            .args(["--header-timeout", "1s"])
            .start()
            .await,
    )
}

/// In-flight requests on the function's instances, and how many instances it has.
async fn in_flight_and_instances(gw: &Gateway, name: &str) -> (u64, usize) {
    let f = gw.function(name).await;
    let in_flight = f["in_flight"].as_u64().unwrap();
    (in_flight, f["instances"].as_array().unwrap().len())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_through_the_gateway_echoes_text_binary_and_pings_until_the_client_closes() {
    require_docker!();
    let gw = impatient_gateway().await;
    gw.deploy("wsecho", &common::echo_manifest("wsecho", "", ""))
        .await;

    let mut socket = ws::open(&gw.url, "/fn/wsecho/ws").await;
    ws::echoes(&mut socket).await;
    let (p50, p99) = ws::latency(&mut socket, 300).await;
    let plain = gw
        .request(http::Method::POST, "/fn/wsecho/x", &[], "beside the socket")
        .await;
    assert_eq!(plain.text(), "beside the socket", "plain requests go on");

    // The same round trips straight to the container, for comparison.
    let f = gw.function("wsecho").await;
    let endpoint = f["instances"][0]["endpoint"].as_str().unwrap().to_string();
    let mut direct = ws::open(&format!("http://{endpoint}"), "/ws").await;
    let (direct_p50, direct_p99) = ws::latency(&mut direct, 300).await;
    eprintln!(
        "WebSocket round trip p50 / p99: through the gateway {p50:?} / {p99:?}, straight to the container {direct_p50:?} / {direct_p99:?}"
    );

    // The client closes: the close is answered, and the slot is free again.
    socket.close(None).await.unwrap();
    assert!(matches!(ws::next(&mut socket).await, Message::Close(_)));
    eventually(Duration::from_secs(5), "nothing in flight", || {
        let gw = gw.clone();
        async move { in_flight_and_instances(&gw, "wsecho").await.0 == 0 }
    })
    .await;

    // An instance that does not switch protocols answers as it would any request.
    match ws::try_open(&gw.url, "/fn/wsecho/status/403").await {
        Err(Error::Http(response)) => assert_eq!(response.status(), 403),
        other => panic!("expected the instance's 403, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_websocket_stays_open_past_the_header_and_idle_timeouts_holding_its_instance() {
    require_docker!();
    let gw = impatient_gateway().await;
    let manifest = common::echo_manifest("held", "", "[scale]\nidle_timeout = \"1s\"");
    gw.deploy("held", &manifest).await;
    let mut socket = ws::open(&gw.url, "/fn/held/ws").await;
    assert_eq!(in_flight_and_instances(&gw, "held").await, (1, 1));
    let container = gw.containers("held");
    assert_eq!(container.len(), 1);

    // Silent for three header timeouts and past the idle timeout.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        in_flight_and_instances(&gw, "held").await,
        (1, 1),
        "the socket counts as in flight, and its instance stays"
    );
    assert_eq!(gw.containers("held"), container);
    ws::round_trip(&mut socket, Message::text("still here")).await;

    // Once it closes, the instance is idle and the reaper takes it.
    socket.close(None).await.unwrap();
    eventually(Duration::from_secs(10), "the idle instance reaped", || {
        let gw = gw.clone();
        async move { gw.containers("held").is_empty() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_revision_ember_rm_or_a_gateway_shutdown_closes_websockets_going_away() {
    require_docker!();
    let mut gw = Gateway::start().await;
    gw.deploy("rolled", &common::echo_manifest("rolled", "", ""))
        .await;
    let mut old = ws::open(&gw.url, "/fn/rolled/ws").await;
    ws::round_trip(&mut old, Message::text("on the first revision")).await;

    let second = common::echo_manifest("rolled", "env = { GREETING = \"v2\" }", "");
    let r = gw.deploy("rolled", &second).await;
    assert!(r.status.is_success(), "{}", r.text());
    let took = closes_going_away(&mut old, Duration::from_secs(10)).await;
    eprintln!("a new revision closed the old instance's socket after {took:?}");
    eventually(Duration::from_secs(10), "the old instance gone", || {
        let gw = &gw;
        async move { in_flight_and_instances(gw, "rolled").await.1 == 1 }
    })
    .await;

    let mut new = ws::open(&gw.url, "/fn/rolled/ws").await;
    ws::round_trip(&mut new, Message::text("on the second revision")).await;
    let out = gw.cli(&["rm", "rolled"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    closes_going_away(&mut new, Duration::from_secs(5)).await;

    // At shutdown, open sockets close too, and do not hold the gateway up.
    gw.deploy("rolled", &second).await;
    let mut last = ws::open(&gw.url, "/fn/rolled/ws").await;
    ws::round_trip(&mut last, Message::text("until the gateway stops")).await;
    gw.terminate();
    closes_going_away(&mut last, Duration::from_secs(5)).await;
    let exit = gw.wait_exit(Duration::from_secs(10));
    assert!(
        exit.is_some_and(|s| s.success()),
        "the gateway exits: {exit:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_passes_through_an_agents_tunnel_and_closes_when_its_node_drains() {
    require_docker!();
    let (gw, _agents) = cluster(&["ws-a", "ws-b"]).await;
    gw.deploy("far", &common::echo_manifest("far", "", ""))
        .await;
    let mut socket = ws::open(&gw.url, "/fn/far/ws").await;
    ws::echoes(&mut socket).await;
    let (p50, p99) = ws::latency(&mut socket, 300).await;
    eprintln!("WebSocket round trip through a tunnel p50 / p99: {p50:?} / {p99:?}");
    let from = instance_nodes(&gw, "far").await.remove(0);
    assert_eq!(in_flight_and_instances(&gw, "far").await.0, 1);

    // Draining the node moves the instance: the replacement starts elsewhere, then the
    // socket on the old one is closed.
    let out = gw.cli(&["drain", &from]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    closes_going_away(&mut socket, Duration::from_secs(20)).await;
    let mut moved = ws::open(&gw.url, "/fn/far/ws").await;
    ws::round_trip(&mut moved, Message::text("from the other node")).await;
    let nodes = instance_nodes(&gw, "far").await;
    assert!(!nodes.contains(&from), "{nodes:?} still has {from}");
    moved.send(Message::Close(None)).await.unwrap();
}
