//! Agents where no inbound connection can reach them: the gateway and each agent run in a
//! network namespace of their own; the agents' namespaces drop every inbound TCP
//! connection, so they can only dial out (to the gateway, and to their own containers on
//! Docker's bridge). Placement, streaming, a 20 MiB download and a WebSocket over TLS all
//! work through the tunnel, and the agent's namespace has no listening socket at all.
//! Needs root.
#![allow(clippy::disallowed_methods)] // tasks a test spawns end with the test

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cluster::{instance_nodes, wait_ready, TOKEN};
use common::netns::{self, Netns};
use common::{Agent, Gateway};
use http::Method;
use http_body_util::BodyExt;

#[tokio::test(flavor = "multi_thread")]
async fn agents_that_cannot_be_reached_serve_everything_through_the_tunnel_they_dial() {
    require_docker!();
    if !netns::available() {
        return;
    }
    let gw_ns = Netns::new("gw", 1);
    let ag_ns = Netns::new("ag", 2);
    ag_ns.drop_inbound_tcp();
    let listen = format!("{}:0", gw_ns.ip);
    let gw = Arc::new(
        Gateway::builder()
            .netns(&gw_ns.name)
            .args([
                "--listen",
                &listen,
                "--no-local-node",
                "--join-token",
                TOKEN,
                "--tls",
                "self-signed",
            ])
            .args(["--node-timeout", "5s", "--heartbeat-interval", "300ms"])
            .start()
            .await,
    );
    let _cleanup = common::Cleanup(format!("ember.gateway={}", gw.id));
    assert!(gw.url.starts_with("https://"), "{}", gw.url);
    let ca = gw.ca_file();
    let agent = Agent::builder(&gw.url, TOKEN, "walled")
        .args(["--ca-file", ca.to_str().unwrap()])
        .netns(&ag_ns.name)
        .start()
        .await;
    wait_ready(&gw, 1).await;

    // Nothing listens in the agent's namespace, and nothing from outside gets in.
    let listening = ag_ns.output(&["ss", "-Hltn"]);
    assert_eq!(listening.trim(), "", "listening sockets: {listening}");
    assert_eq!(
        common::net::listening_ports(agent.pid().unwrap()),
        Vec::<u16>::new()
    );
    let probe = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(format!("{}:8080", ag_ns.ip)),
    )
    .await;
    assert!(
        probe.is_err(),
        "inbound TCP is dropped, not even refused: {probe:?}"
    );

    gw.deploy("walled", &common::echo_manifest("walled", "", ""))
        .await;
    let r = gw
        .request(Method::POST, "/fn/walled/in", &[], "from outside")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "from outside");
    assert_eq!(instance_nodes(&gw, "walled").await, ["walled"]);

    let size = 20 << 20;
    let started = Instant::now();
    let r = gw
        .request(
            Method::GET,
            &format!("/fn/walled/bytes/{size}"),
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
    eprintln!("20 MiB through the tunnel in {:?}", started.elapsed());

    let resp = gw.stream("/fn/walled/stream/4?interval_ms=200").await;
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().unwrap().starts_with(b"chunk 0"));
    let mut rest = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.unwrap().data_ref() {
            rest.extend_from_slice(d);
        }
    }
    assert!(String::from_utf8_lossy(&rest).contains("chunk 3"));

    // A WebSocket over the gateway's TLS, through the tunnel, to the container.
    let mut socket = common::ws::open_tls(&gw, "/fn/walled/ws").await;
    common::ws::echoes(&mut socket).await;
    let (p50, p99) = common::ws::latency(&mut socket, 200).await;
    eprintln!("WebSocket round trip over TLS and the tunnel p50 / p99: {p50:?} / {p99:?}");
    drop(agent);
}
