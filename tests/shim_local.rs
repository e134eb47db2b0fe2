//! ember-shim run directly on this machine with `/bin/sh` scripts (no Docker): streaming,
//! cut streams, the body limit, clients that leave, SIGTERM, and the shim's own unit
//! tests. What it does behind a gateway, in its container, is in tests/shim.rs.

#![allow(clippy::disallowed_methods)] // tasks a test spawns end with the test

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::shim::{script, LocalShim};
use http::Method;

/// Sends a raw HTTP/1.1 request that asks the shim to close afterwards.
fn send(addr: &str, target: &str, extra: &str) -> TcpStream {
    let mut conn = TcpStream::connect(addr).unwrap();
    let head = format!("GET {target} HTTP/1.1\r\nhost: shim\r\nconnection: close\r\n{extra}\r\n");
    conn.write_all(head.as_bytes()).unwrap();
    conn
}

/// Reads until `needle` has arrived (or the connection ends); all that was read.
fn read_until(conn: &mut TcpStream, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[test]
fn streamed_output_reaches_the_client_as_the_command_prints_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = script(
        dir.path(),
        "frames.sh",
        "echo frame-1; sleep 1; echo frame-2\n",
    );
    let shim = LocalShim::start(&["--stream", "--", &run], &[]);
    let started = Instant::now();
    let mut conn = send(shim.addr(), "/", "");
    let first = read_until(&mut conn, "frame-1");
    assert!(first.contains("transfer-encoding: chunked"), "{first}");
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "the first frame came before the command ended: {:?}",
        started.elapsed()
    );
    let rest = read_until(&mut conn, "never");
    assert!(rest.contains("frame-2"), "{rest}");
    assert!(rest.ends_with("0\r\n\r\n"), "a finished stream: {rest:?}");
}

#[test]
fn a_streamed_command_that_fails_after_printing_has_its_response_cut() {
    let dir = tempfile::tempdir().unwrap();
    let run = script(
        dir.path(),
        "half.sh",
        "echo frame-1; echo disk full >&2; exit 4\n",
    );
    let shim = LocalShim::start(&["--stream", "--", &run], &[]);
    let mut conn = send(shim.addr(), "/", "");
    let all = read_until(&mut conn, "never");
    assert!(all.starts_with("HTTP/1.1 200 OK"), "{all}");
    assert!(all.contains("frame-1"), "{all}");
    assert!(!all.ends_with("0\r\n\r\n"), "no final chunk: {all:?}");
    let log = shim.log();
    assert!(log.contains("] disk full"), "stderr goes to the log: {log}");
    assert!(
        log.contains("-> 200 cut (the command exited with code 4)"),
        "{log}"
    );
}

#[test]
fn a_streamed_command_that_fails_before_printing_still_answers_500() {
    let dir = tempfile::tempdir().unwrap();
    let run = script(dir.path(), "early.sh", "echo no scene given >&2; exit 2\n");
    let shim = LocalShim::start(&["--stream", "--", &run], &[]);
    let mut conn = send(shim.addr(), "/", "");
    let all = read_until(&mut conn, "never");
    assert!(all.starts_with("HTTP/1.1 500"), "{all}");
    assert!(all.contains("no scene given"), "{all}");
}

#[tokio::test]
async fn a_body_over_max_body_answers_413_and_the_command_never_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let run = script(dir.path(), "mark.sh", "touch \"$MARKER\"\n");
    let env = [("MARKER", marker.to_str().unwrap())];
    let shim = LocalShim::start(&["--max-body", "1KiB", "--", &run], &env);
    let r = common::request(Method::POST, &shim.url, &[], vec![b'x'; 2048]).await;
    assert_eq!(r.status, 413);
    assert!(r.text().contains("--max-body (1024 bytes)"), "{}", r.text());
    assert!(!marker.exists());
    let ok = common::request(Method::POST, &shim.url, &[], vec![b'x'; 1024]).await;
    assert_eq!(ok.status, 200);
    assert!(marker.exists());
}

#[test]
fn a_client_that_goes_away_has_its_command_killed() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let run = script(dir.path(), "long.sh", "echo $$ > \"$PID_FILE\"; sleep 30\n");
    let shim = LocalShim::start(&["--", &run], &[("PID_FILE", pid_file.to_str().unwrap())]);
    let conn = send(shim.addr(), "/", "");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(&pid_file).map_or(true, |p| p.trim().is_empty()) {
        assert!(Instant::now() < deadline, "the command never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_string();
    drop(conn);
    let proc_dir = format!("/proc/{pid}");
    while std::path::Path::new(&proc_dir).exists() {
        assert!(Instant::now() < deadline, "the command still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The shim logs once it has reaped the command, a moment after /proc/PID is gone.
    while !shim.log().contains("the client went away") {
        assert!(Instant::now() < deadline, "{}", shim.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn sigterm_lets_the_running_command_finish_then_the_shim_exits() {
    let dir = tempfile::tempdir().unwrap();
    let run = script(dir.path(), "render.sh", "sleep 1; echo rendered\n");
    let mut shim = LocalShim::start(&["--grace", "5s", "--", &run], &[]);
    let url = shim.url.clone();
    let running =
        tokio::spawn(async move { common::request(Method::GET, &url, &[], Bytes::new()).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    shim.terminate();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        TcpStream::connect(shim.addr()).is_err(),
        "no new connections once stopping"
    );
    let r = running.await.unwrap();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "rendered\n"));
    let status = shim
        .wait_exit(Duration::from_secs(3))
        .expect("the shim exits");
    assert!(status.success(), "{status:?}");
}

#[test]
fn the_shims_unit_tests_pass() {
    let shim = common::repo().join("runtimes/shim/main.rs");
    let out_dir = tempfile::tempdir().unwrap();
    let bin = out_dir.path().join("shim-unit-tests");
    let built = std::process::Command::new("rustc")
        .args(["--edition", "2021", "--test", "-o"])
        .arg(&bin)
        .arg(&shim)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let run = std::process::Command::new(&bin).output().unwrap();
    assert!(
        run.status.success(),
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
}
