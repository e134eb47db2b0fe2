//! Images on every node, end to end, with a real registry (Debian's `docker-registry` on
//! 127.0.0.1 with htpasswd auth) and a second Docker engine for an agent that never had
//! the image:
//! - a registry image is pulled on the first cold start, with the login stored by
//!   `ember registry login`, its progress in the API (`image_progress`, `pulling N%`);
//!   `ember deploy` pre-pulls with per-node progress; the password is in no answer and no
//!   log line; the cold start with the pull and without it are printed;
//! - a wrong or missing login is a start failure in the registry's words, and a deploy
//!   that no node can pull for is refused;
//! - an image that is only on the gateway's node reaches an agent on another engine by
//!   save and load through the gateway, on its first placement there.

#![allow(clippy::disallowed_methods)] // the harness spawns tasks that end with the test

mod common;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cluster::{wait_ready, TOKEN};
use common::dockerd::SecondDocker;
use common::registry::Registry;
use common::shim::{busybox_available, busybox_image};
use common::{Agent, Gateway};
use http::Method;

const USER: &str = "ember";
const PASSWORD: &str = "pw-Zq81-registry";

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `ember registry login` for `registry` with `password` on stdin.
fn login(gw: &Gateway, registry: &Registry, password: impl AsRef<[u8]>) {
    let args = [
        "registry",
        "login",
        registry.host(),
        "-u",
        USER,
        "--password-stdin",
    ];
    let out = gw.cli_input(&args, password.as_ref());
    assert!(out.status.success(), "{}", text(&out));
}

fn manifest(name: &str, image: &str) -> String {
    format!(
        "name = \"{name}\"\nimage = \"{image}\"\n\
         [readiness]\nhttp_path = \"/healthz\"\nstart_timeout = \"20s\"\n"
    )
}

fn main_has_image(image: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", image])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

fn docker(args: &[&str]) {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(out.status.success(), "docker {args:?}: {}", text(&out));
}

/// An image of busybox and `mib` MiB of random bytes (a layer a pull must really
/// download), pushed to `registry` and then gone from the engine entirely. Returns its
/// reference in the registry.
fn heavy_image(registry: &Registry, mib: usize) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut weights = vec![0u8; mib << 20];
    let mut seed = std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    for chunk in weights.chunks_mut(8) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        chunk.copy_from_slice(&seed.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(dir.path().join("weights.bin"), &weights).unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!("FROM {}\nCOPY weights.bin /weights.bin\n", busybox_image()),
    )
    .unwrap();
    let local = format!("ember-test/heavy:{}", std::process::id());
    common::docker_build(dir.path(), &local);
    let reference = registry.push(&local, &format!("images/heavy:{}", std::process::id()));
    docker(&["rmi", &local]);
    assert!(!main_has_image(&reference));
    reference
}

/// Every `image_progress` the API shows for `function` while `work` runs.
async fn watch_progress<T>(
    gw: &Arc<Gateway>,
    function: &str,
    work: impl std::future::Future<Output = T>,
) -> (T, Vec<serde_json::Value>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let poller = {
        let (gw, seen, stop, path) = (
            gw.clone(),
            seen.clone(),
            stop.clone(),
            format!("/api/v1/functions/{function}"),
        );
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let r = gw.request(Method::GET, &path, &[], Bytes::new()).await;
                if let Some(p) = r.json().get("image_progress") {
                    seen.lock().unwrap().push(p.clone());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let out = work.await;
    stop.cancel();
    poller.await.unwrap();
    let seen = seen.lock().unwrap().clone();
    (out, seen)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_image_is_pulled_at_its_first_cold_start_with_progress_and_the_stored_login() {
    require_docker!();
    if !busybox_available() {
        return;
    }
    let Some(registry) = Registry::start(Some((USER, PASSWORD))) else {
        return;
    };
    let image = heavy_image(&registry, 96);
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("gateway.log");
    let gw = Arc::new(Gateway::builder().log_to(&log, "debug").start().await);

    login(&gw, &registry, format!("{PASSWORD}\n"));
    let out = gw.cli(&["registry", "ls"]);
    assert!(text(&out).contains(registry.host()), "{}", text(&out));
    assert!(text(&out).contains(USER), "{}", text(&out));
    let listing = gw
        .request(Method::GET, "/api/v1/registries", &[], Bytes::new())
        .await
        .text();
    assert!(!listing.contains(PASSWORD), "{listing}");

    // Deployed through the API (no pre-pull): the first request's start pulls.
    let r = gw.deploy("heavy", &manifest("heavy", &image)).await;
    assert!(r.status.is_success(), "{} {}", r.status, r.text());
    assert!(r.text().contains("pulls it"), "{}", r.text());
    let began = Instant::now();
    let (r, seen) = watch_progress(&gw, "heavy", async {
        gw.request(Method::GET, "/fn/heavy/index.html", &[], Bytes::new())
            .await
    })
    .await;
    let cold_pulled = began.elapsed();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok\n"));
    assert!(main_has_image(&image));
    let pulling: Vec<u64> = seen
        .iter()
        .filter(|p| p["action"] == "pulling")
        .filter_map(|p| p["percent"].as_u64())
        .collect();
    assert!(
        pulling.iter().any(|p| (1..100).contains(p)),
        "no pull progress between 0 and 100% seen: {seen:?}"
    );
    assert!(
        seen.iter()
            .filter_map(|p| p["total_bytes"].as_u64())
            .any(|t| t >= 96 << 20),
        "{seen:?}"
    );

    // The same image, present now: a cold start without the pull.
    let out = gw.cli(&["rm", "heavy"]);
    assert!(out.status.success(), "{}", text(&out));
    let r = gw.deploy("present", &manifest("present", &image)).await;
    assert!(r.status.is_success(), "{}", r.text());
    let began = Instant::now();
    let r = gw
        .request(Method::GET, "/fn/present/index.html", &[], Bytes::new())
        .await;
    let cold_present = began.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    eprintln!(
        "cold start of a 98 MiB image: pulled {cold_pulled:?}, present {cold_present:?} \
         (ratio {:.1})",
        cold_pulled.as_secs_f64() / cold_present.as_secs_f64()
    );

    // `ember deploy` pulls before the revision goes live, and says how far it got.
    let out = gw.cli(&["rm", "present"]);
    assert!(out.status.success(), "{}", text(&out));
    docker(&["rmi", &image]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ember.toml");
    std::fs::write(&file, manifest("prepulled", &image)).unwrap();
    let out = gw.cli(&["deploy", file.to_str().unwrap()]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("local: pulling"), "{said}");
    assert!(said.contains(&format!("local: {image} is there")), "{said}");
    assert!(main_has_image(&image), "deployed without the image");

    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("image pulled"), "the pull is not logged");
    assert!(!logged.contains(PASSWORD), "the password is in the log");
    docker(&["rmi", &image]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_or_missing_registry_login_is_a_clear_start_failure() {
    require_docker!();
    if !busybox_available() {
        return;
    }
    let Some(registry) = Registry::start(Some((USER, PASSWORD))) else {
        return;
    };
    let image = registry.push(&busybox_image(), "images/private:1");
    let gw = Arc::new(Gateway::start().await);

    // No login: the registry's own refusal.
    let r = gw.deploy("private", &manifest("private", &image)).await;
    assert!(r.status.is_success(), "{}", r.text());
    let r = gw
        .request(Method::GET, "/fn/private/index.html", &[], Bytes::new())
        .await;
    let body = r.json();
    assert_eq!(body["error"]["code"], "start_failed", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("pulling `{image}` failed")),
        "{message}"
    );
    assert!(message.contains("no basic auth credentials"), "{message}");

    // A wrong password: the same, in the registry's words, and the deploy's pre-pull
    // refuses to go live.
    login(&gw, &registry, b"not-the-password");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ember.toml");
    std::fs::write(&file, manifest("refused", &image)).unwrap();
    let out = gw.cli(&["deploy", file.to_str().unwrap()]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("no node could get"), "{said}");
    assert!(said.contains("unauthorized"), "{said}");
    let r = gw
        .request(Method::GET, "/api/v1/functions/refused", &[], Bytes::new())
        .await;
    assert_eq!(r.status, 404, "deployed although no node could pull");

    let status = gw.function("private").await;
    assert!(status["failure"].is_object(), "{status}");
    common::eventually(
        Duration::from_secs(10),
        "the wrong login fails a start",
        || {
            let gw = gw.clone();
            async move {
                let r = gw
                    .request(Method::GET, "/fn/private/index.html", &[], Bytes::new())
                    .await;
                r.text().contains("unauthorized")
            }
        },
    )
    .await;

    // The right one: the next start pulls and serves.
    login(&gw, &registry, PASSWORD);
    common::eventually(Duration::from_secs(15), "the right login serves", || {
        let gw = gw.clone();
        async move {
            let r = gw
                .request(Method::GET, "/fn/private/index.html", &[], Bytes::new())
                .await;
            r.status == 200
        }
    })
    .await;
    let out = gw.cli(&["registry", "logout", registry.host()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&gw.cli(&["registry", "ls"])).contains(registry.host()));
    docker(&["rmi", &image]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_only_on_the_gateways_node_runs_on_an_agent_that_never_had_it() {
    require_docker!();
    if !busybox_available() {
        return;
    }
    let image = busybox_image();
    let Some(engine) = SecondDocker::start() else {
        return;
    };
    assert!(!engine.has_image(&image));
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("gateway.log");
    let args = [
        "--join-token",
        TOKEN,
        "--node-timeout",
        "2s",
        "--heartbeat-interval",
        "300ms",
    ];
    let gw = Arc::new(
        Gateway::builder()
            .args(args)
            .log_to(&log, "info")
            .start()
            .await,
    );
    // Only the agent has the volume the function needs, so it runs there.
    let models = tempfile::tempdir().unwrap();
    std::fs::write(models.path().join("w.bin"), "weights\n").unwrap();
    let _agent = Agent::builder(&gw.url, TOKEN, "far")
        .env("DOCKER_HOST", engine.host())
        .args(["--volume", &format!("models={}", models.path().display())])
        .start()
        .await;
    wait_ready(&gw, 2).await;
    let toml = format!(
        "{}[[volumes]]\nsource = \"models\"\ntarget = \"/www/models\"\n",
        manifest("far", &image)
    );
    let r = gw.deploy("far", &toml).await;
    assert!(r.status.is_success(), "{}", r.text());
    assert!(
        r.text().contains("is not on node `far`"),
        "no warning for the agent: {}",
        r.text()
    );

    let began = Instant::now();
    let r = gw
        .request(Method::GET, "/fn/far/models/w.bin", &[], Bytes::new())
        .await;
    let cold_copied = began.elapsed();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "weights\n"));
    assert!(
        engine.has_image(&image),
        "the agent's engine lacks the image"
    );
    let there = engine.run(&["ps", "-q", "--filter", "label=ember.function=far"]);
    assert!(!there.is_empty(), "it did not run on the agent");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("image copied"), "no copy logged");

    // Present now: the next cold start there copies nothing.
    let out = gw.cli(&["rm", "far"]);
    assert!(out.status.success(), "{}", text(&out));
    let r = gw
        .deploy("far2", &toml.replace("\"far\"", "\"far2\""))
        .await;
    assert!(r.status.is_success(), "{}", r.text());
    let began = Instant::now();
    let r = gw
        .request(Method::GET, "/fn/far2/models/w.bin", &[], Bytes::new())
        .await;
    let cold_present = began.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    let copies = std::fs::read_to_string(&log)
        .unwrap()
        .matches("image copied")
        .count();
    assert_eq!(copies, 1, "copied again");
    eprintln!(
        "cold start on an agent of an image copied from the gateway's node: {cold_copied:?}; \
         present: {cold_present:?}"
    );

    // A registry image is pulled by the agent itself, with the login sent over its tunnel.
    let Some(registry) = Registry::start(Some((USER, PASSWORD))) else {
        return;
    };
    let pulled = registry.push(&image, "images/far:1");
    login(&gw, &registry, PASSWORD);
    let toml = toml
        .replace("\"far\"", "\"farpull\"")
        .replace(&format!("\"{image}\""), &format!("\"{pulled}\""));
    let r = gw.deploy("farpull", &toml).await;
    assert!(r.status.is_success(), "{}", r.text());
    let r = gw
        .request(Method::GET, "/fn/farpull/models/w.bin", &[], Bytes::new())
        .await;
    assert_eq!(
        r.status,
        200,
        "{}\n{}",
        r.text(),
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(engine.has_image(&pulled), "the agent did not pull");
    assert!(
        !main_has_image(&pulled),
        "pulled on the gateway's node instead"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("image pulled node=far"),
        "no pull logged on `far`"
    );
}
