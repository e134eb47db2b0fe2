//! Node volumes end to end, with a shell function (ember-shim and busybox): a read-only
//! volume's file is readable in the container and a write to it fails, a writable one
//! takes writes the node sees; a manifest naming a host path is refused; a function
//! needing a volume no node has is refused with the reason until `ember cp` seeds one;
//! files reach an agent's volume through its tunnel; `ember volumes` lists them.

#![allow(clippy::disallowed_methods)] // the harness spawns tasks that end with the test

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::cluster::{gateway_args, wait_ready, TOKEN};
use common::{eventually, Agent, Gateway};
use http::Method;

/// A shim function running `script` (busybox sh) per request, mounting `volumes` (TOML).
fn manifest(name: &str, script: &str, volumes: &str) -> String {
    format!(
        "name = \"{name}\"\nimage = \"{}\"\ncommand = [\"--\", \"/bin/busybox\", \"sh\", \"-c\", {script:?}]\n\
         [readiness]\nhttp_path = \"/healthz\"\nstart_timeout = \"20s\"\n{volumes}\n",
        common::shim::example_image()
    )
}

const READER: &str = "cat /models/hello.txt; \
    if echo x > /models/new 2>/dev/null; then echo ro-write-ok; else echo ro-write-refused; fi; \
    echo \"$EMBER_QUERY\" >> /out/log && echo out-write-ok";

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn volumes_mount_read_only_or_writable_and_host_paths_are_refused() {
    require_shim_image!();
    let models = tempfile::tempdir().unwrap();
    std::fs::write(models.path().join("hello.txt"), "weights v1\n").unwrap();
    let exposed = format!("models={}", models.path().display());
    let gw = Gateway::builder()
        .args(["--volume", &exposed])
        .start()
        .await;
    let volumes = "[[volumes]]\nsource = \"models\"\ntarget = \"/models\"\n\
                   [[volumes]]\nsource = \"out\"\ntarget = \"/out\"\nread_only = false";
    let r = gw.deploy("vol", &manifest("vol", READER, volumes)).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = gw
        .request(Method::POST, "/fn/vol/?run=1", &[], Bytes::new())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "weights v1\nro-write-refused\nout-write-ok\n");
    assert!(!models.path().join("new").exists());
    let log = gw.data_dir.join("volumes/out/log");
    assert_eq!(std::fs::read_to_string(log).unwrap(), "run=1\n");

    // Never a host path, nor the Docker socket.
    let bad = "[[volumes]]\nsource = \"/var/run/docker.sock\"\ntarget = \"/sock\"";
    let r = gw.deploy("bad", &manifest("bad", "true", bad)).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let detail = &r.json()["error"]["details"][0];
    assert_eq!(detail["field"], "volumes[0].source");
    assert!(detail["message"].as_str().unwrap().contains("--volume"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_read_only_volume_is_the_reason_until_ember_cp_seeds_it() {
    require_shim_image!();
    let gw = Gateway::start().await;
    let volumes = "[[volumes]]\nsource = \"weights\"\ntarget = \"/w\"";
    let r = gw
        .deploy("needs", &manifest("needs", "cat /w/sd/v1.bin", volumes))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(r.text().contains("no volume `weights`"), "{}", r.text());
    let r = gw
        .request(Method::GET, "/fn/needs/", &[], Bytes::new())
        .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "no_capacity");
    assert!(r.text().contains("ember cp"), "{}", r.text());

    // Seed it: the node has the volume, the function runs and reads the file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("v1.bin");
    std::fs::write(&file, "sd weights\n").unwrap();
    let out = gw.cli(&["cp", file.to_str().unwrap(), "local:weights/sd/v1.bin"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("copied"), "{}", text(&out));
    eventually(
        Duration::from_secs(10),
        "served once the volume is there",
        || {
            let gw = &gw;
            async move {
                let r = gw
                    .request(Method::GET, "/fn/needs/", &[], Bytes::new())
                    .await;
                r.status == 200 && r.text() == "sd weights\n"
            }
        },
    )
    .await;
    let out = gw.cli(&["volumes"]);
    let listing = text(&out);
    assert!(out.status.success(), "{listing}");
    let line = listing.lines().find(|l| l.contains("weights")).unwrap();
    assert!(
        line.starts_with("local") && line.contains("11 B"),
        "{listing}"
    );

    // Paths stay inside their volume.
    let out = gw.cli(&["cp", file.to_str().unwrap(), "local:weights/../escape"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("invalid_path"), "{}", text(&out));
    assert!(!gw.data_dir.join("volumes/escape").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn files_reach_an_agents_volume_through_its_tunnel_and_its_instances_read_them() {
    require_shim_image!();
    let gw = Arc::new(Gateway::builder().args(gateway_args(None)).start().await);
    let _agent = Agent::builder(&gw.url, TOKEN, "far").start().await;
    wait_ready(&gw, 1).await;

    // 20 MiB of varied bytes, streamed through the gateway and the tunnel.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.bin");
    let data: Vec<u8> = (0..20 << 20).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let out = gw.cli(&["cp", file.to_str().unwrap(), "far:models/llm/big.bin"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("100%"),
        "progress is shown: {}",
        text(&out)
    );

    let volumes = gw.get_json("/api/v1/volumes").await;
    let far = volumes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "far")
        .unwrap();
    assert_eq!(far["volumes"][0]["name"], "models");
    assert_eq!(far["volumes"][0]["bytes"], 20 << 20);

    let script = "wc -c < /models/llm/big.bin; md5sum < /models/llm/big.bin";
    let mounts = "[[volumes]]\nsource = \"models\"\ntarget = \"/models\"";
    eventually(
        Duration::from_secs(10),
        "the agent reports the volume",
        || {
            let gw = gw.clone();
            async move {
                let nodes = gw.get_json("/api/v1/volumes").await;
                nodes.to_string().contains("\"models\"")
            }
        },
    )
    .await;
    let r = gw
        .deploy("reader", &manifest("reader", script, mounts))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = gw
        .request(Method::GET, "/fn/reader/", &[], Bytes::new())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let digest = md5_of(&data);
    assert_eq!(r.text(), format!("{}\n{digest}  -\n", 20 << 20));
}

/// MD5 of `data` in hex, by busybox on this machine (the test needs it anyway).
fn md5_of(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new(common::shim::BUSYBOX)
        .arg("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}
