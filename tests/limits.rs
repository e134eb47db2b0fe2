//! Slow and idle clients cannot hold the gateway: connections that never finish their
//! request head are closed after `--header-timeout`, connections past
//! `--max-connections` are closed at once, and normal requests are served throughout.
#![allow(clippy::disallowed_methods)] // tasks a test spawns end with the test

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Gateway;
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Opens a connection that sends half a request head and then nothing.
async fn slow_client(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: slow\r\nX-Waiting: ")
        .await
        .unwrap();
    s
}

/// Whether the server closes `s` within `within` (a read of 0 bytes or a reset).
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(within, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // hyper may answer 408 before closing.
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn half_sent_heads_are_closed_after_the_header_timeout_while_others_are_served() {
    require_docker!();
    let gw = Gateway::builder()
        .args(["--header-timeout", "1s", "--max-connections", "400"])
        .start()
        .await;
    let addr = gw.url.trim_start_matches("http://").to_string();
    let opened = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..300 {
        slow.push(slow_client(&addr).await);
    }
    // Normal requests go through while 300 connections dawdle.
    for _ in 0..20 {
        let r = gw.request(Method::GET, "/healthz", &[], Bytes::new()).await;
        assert_eq!(r.status, 200);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut closed = 0;
    for s in &mut slow {
        if closed_within(s, Duration::from_secs(3)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 300, "every half-sent head was closed");
    assert!(
        opened.elapsed() < Duration::from_secs(5),
        "within about the header timeout: {:?}",
        opened.elapsed()
    );
    let r = gw.request(Method::GET, "/healthz", &[], Bytes::new()).await;
    assert_eq!(r.status, 200, "and the gateway serves on");
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_cap_are_closed_at_once_and_the_cap_frees_up() {
    require_docker!();
    let gw = Gateway::builder()
        .args(["--header-timeout", "2s", "--max-connections", "50"])
        .start()
        .await;
    let addr = gw.url.trim_start_matches("http://").to_string();
    let mut held = Vec::new();
    for _ in 0..50 {
        held.push(slow_client(&addr).await);
    }
    // Give the gateway a moment to take all fifty.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = slow_client(&addr).await;
    assert!(
        closed_within(&mut extra, Duration::from_millis(500)).await,
        "the 51st connection is closed at once, not left to the header timeout"
    );
    drop(held);
    let mut served = false;
    for _ in 0..50 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut answer)).await;
        if answer.starts_with(b"HTTP/1.1 200") {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "closed connections give their place back");
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_sockets_and_idle_http2_connections_are_closed_too() {
    require_docker!();
    let gw = Gateway::builder()
        .args(["--header-timeout", "1s", "--max-connections", "100"])
        .start()
        .await;
    let addr = gw.url.trim_start_matches("http://").to_string();
    // A socket that never sends a byte.
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    // An HTTP/2 client that sends its preface and settings, then nothing.
    let mut preface = TcpStream::connect(&addr).await.unwrap();
    preface
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let started = Instant::now();
    assert!(
        closed_within(&mut silent, Duration::from_secs(4)).await,
        "silent socket"
    );
    assert!(
        closed_within(&mut preface, Duration::from_secs(4)).await,
        "idle HTTP/2"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    // A request that takes longer than the header timeout is not idle: it is answered.
    gw.deploy("slow", &common::echo_manifest("slow", "", ""))
        .await;
    let r = gw
        .request(Method::GET, "/fn/slow/sleep/2500", &[], Bytes::new())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}
