//! Logs through the gateway, end to end with the real CLI: `ember logs NAME -f` follows a
//! running container (on the embedded node and on an agent, through its tunnel), takes in
//! instances that start later and ends with the gateway; `ember logs NAME --previous`
//! shows what a crashed instance wrote and why it ended.
//! The echo function prints on demand (`/print/TEXT`, `/eprint/TEXT`) and exits with a
//! chosen code (`/exit?code=N`).
#![allow(clippy::disallowed_methods)] // tasks a test spawns end with the test

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{eventually, Gateway};
use http::Method;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

/// A running `ember logs …` whose stdout is read line by line.
struct Follower {
    child: tokio::process::Child,
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl Follower {
    fn start(gw: &Gateway, args: &[&str]) -> Follower {
        let mut cmd = common::cli_command(&gw.data_dir.join("cli-config"));
        cmd.args(args)
            .env("EMBER_GATEWAY", &gw.url)
            .env("EMBER_TOKEN", &gw.token)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .expect("ember logs starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut out = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = out.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Follower {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line equal to `want`, printed within `within`.
    async fn expect(&mut self, want: &str, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) if line == want => return,
                Ok(Some(line)) => self.seen.push(line),
                Ok(None) => panic!(
                    "`ember logs` ended before printing {want:?}; it printed {:?}",
                    self.seen
                ),
                Err(_) => panic!(
                    "`ember logs` did not print {want:?} within {within:?}; it printed {:?}",
                    self.seen
                ),
            }
        }
    }
}

async fn get(gw: &Gateway, path: &str) -> common::Response {
    gw.request(Method::GET, path, &[], Bytes::new()).await
}

/// The id of the function's only instance.
async fn only_instance(gw: &Gateway, name: &str) -> String {
    let f = gw.function(name).await;
    let instances = f["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 1, "{f}");
    instances[0]["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn ember_logs_follow_prints_what_a_running_container_writes_after_it_began() {
    require_docker!();
    let gw = Gateway::start().await;
    gw.deploy("chatty", &common::echo_manifest("chatty", "", ""))
        .await;
    assert_eq!(
        get(&gw, "/fn/chatty/print/before-the-follow").await.status,
        200
    );
    let id = only_instance(&gw, "chatty").await;

    let mut follower = Follower::start(&gw, &["logs", "chatty", "-f"]);
    // The tail first: the start line and what was printed before.
    follower
        .expect(
            &format!("[{id}] echo listening on 0.0.0.0:8080"),
            Duration::from_secs(10),
        )
        .await;
    follower
        .expect(&format!("[{id}] before-the-follow"), Duration::from_secs(5))
        .await;
    // Then what the container writes from now on, stderr marked.
    assert_eq!(
        get(&gw, "/fn/chatty/print/after-the-follow").await.status,
        200
    );
    follower
        .expect(&format!("[{id}] after-the-follow"), Duration::from_secs(5))
        .await;
    assert_eq!(get(&gw, "/fn/chatty/eprint/on-stderr").await.status, 200);
    follower
        .expect(&format!("[{id} stderr] on-stderr"), Duration::from_secs(5))
        .await;
    assert!(
        follower.child.try_wait().unwrap().is_none(),
        "a follow stays open"
    );

    // Without -f: the tail of each instance, then the command ends.
    let out = gw.cli(&["logs", "chatty", "--tail", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("[{id}] after-the-follow\n[{id} stderr] on-stderr\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follow_takes_in_instances_that_start_later_and_ends_with_the_gateway() {
    require_docker!();
    let mut gw = Gateway::start().await;
    gw.deploy("later", &common::echo_manifest("later", "", ""))
        .await;
    let mut follower = Follower::start(&gw, &["logs", "later", "-f"]);
    // Scaled to zero when the follow begins: the request starts an instance.
    assert_eq!(get(&gw, "/fn/later/print/first-words").await.status, 200);
    let id = only_instance(&gw, "later").await;
    follower
        .expect(
            &format!("[{id}] echo listening on 0.0.0.0:8080"),
            Duration::from_secs(10),
        )
        .await;
    follower
        .expect(&format!("[{id}] first-words"), Duration::from_secs(5))
        .await;

    gw.terminate();
    let ended = tokio::time::timeout(Duration::from_secs(10), follower.child.wait()).await;
    let status = ended
        .expect("the follow ends when the gateway shuts down")
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(gw.wait_exit(Duration::from_secs(15)).is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn ember_logs_previous_shows_what_a_crashed_instance_wrote_and_why_it_ended() {
    require_docker!();
    let gw = Arc::new(Gateway::start().await);
    gw.deploy("crashy", &common::echo_manifest("crashy", "", ""))
        .await;
    assert_eq!(get(&gw, "/fn/crashy/print/last-words").await.status, 200);
    let id = only_instance(&gw, "crashy").await;
    assert_eq!(get(&gw, "/fn/crashy/exit?code=7").await.status, 200);

    // The health check finds the container gone, keeps its output and removes it.
    eventually(
        Duration::from_secs(20),
        "the crashed instance's output is kept",
        || {
            let gw = gw.clone();
            async move {
                let out = gw.cli(&["logs", "crashy", "--previous"]);
                String::from_utf8_lossy(&out.stdout).contains("last-words")
            }
        },
    )
    .await;
    let out = gw.cli(&["logs", "crashy", "--previous"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let header = lines[0];
    assert!(
        header.starts_with(&format!("=== instance {id} on node local (revision ")),
        "{text}"
    );
    assert!(
        header.ends_with(": container stopped; exit code 7 (exited)"),
        "{text}"
    );
    assert_eq!(
        lines[1..],
        [
            format!("[{id}] echo listening on 0.0.0.0:8080"),
            format!("[{id}] last-words"),
            format!("[{id} stderr] echo: exiting with code 7 as asked (/exit)"),
        ],
        "{text}"
    );
    assert!(gw.containers("crashy").is_empty(), "the container is gone");

    // One instance's record by its id; an unknown one is named with those kept.
    let out = gw.cli(&["logs", "crashy", "--previous", "--instance", &id]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("last-words"));
    let out = gw.cli(&["logs", "crashy", "--previous", "--instance", "nope"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`nope`") && err.contains(&id), "{err}");

    // The records go with their function.
    assert!(gw.cli(&["rm", "crashy"]).status.success());
    gw.deploy("crashy", &common::echo_manifest("crashy", "", ""))
        .await;
    let out = gw.cli(&["logs", "crashy", "--previous"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "no output of removed instances is kept (yet)\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_of_an_instance_on_an_agent_come_through_its_tunnel() {
    require_docker!();
    let (gw, _agents) = common::cluster::cluster(&["far"]).await;
    gw.deploy("remote", &common::echo_manifest("remote", "", ""))
        .await;
    assert_eq!(get(&gw, "/fn/remote/print/from-far-away").await.status, 200);
    let id = only_instance(&gw, "remote").await;
    let mut follower = Follower::start(&gw, &["logs", "remote", "--follow"]);
    follower
        .expect(&format!("[{id}] from-far-away"), Duration::from_secs(10))
        .await;
    assert_eq!(get(&gw, "/fn/remote/eprint/still-here").await.status, 200);
    follower
        .expect(&format!("[{id} stderr] still-here"), Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_errors_name_the_function_the_instance_or_the_field() {
    require_docker!();
    let gw = Gateway::start().await;
    gw.deploy("quiet", &common::echo_manifest("quiet", "", ""))
        .await;

    let r = get(&gw, "/api/v1/functions/nope/logs").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "function_not_found");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`nope`"));

    let r = get(&gw, "/api/v1/functions/quiet/logs?instance=zz").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "instance_not_found");
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("`zz`") && message.contains("none now"),
        "{message}"
    );

    let r = get(&gw, "/api/v1/functions/quiet/logs?since=yesterday").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["details"][0]["field"], "since");
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("10m") && message.contains("RFC 3339"),
        "{message}"
    );

    // No instance, no follow: nothing to print, and done.
    let out = gw.cli(&["logs", "quiet"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    let out = gw.cli(&["logs", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("function `nope` is not deployed"));
}
