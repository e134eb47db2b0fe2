//! Self-check of the images tests' harness: a registry with htpasswd auth over plain HTTP
//! serves what was pushed to it to logged-in clients only; a second Docker engine starts
//! empty, runs an image moved into it on a port the host reaches, leaves the main engine's
//! containers and iptables rules alone, and is gone after drop; an agent given that engine
//! (`DOCKER_HOST`) runs its containers there. The second engine needs root.
#![allow(clippy::disallowed_methods)] // the harness spawns tasks that end with the test

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cluster::{gateway_args, wait_ready, TOKEN};
use common::dockerd::SecondDocker;
use common::registry::Registry;
use common::shim::{busybox_available, busybox_image, BUSYBOX_PORT};
use common::{Agent, Gateway};
use http::Method;

#[test]
fn a_registry_with_auth_serves_a_pushed_image_only_to_logged_in_clients() {
    require_docker!();
    if !busybox_available() {
        return;
    }
    let image = busybox_image();
    let t = Instant::now();
    let Some(registry) = Registry::start(Some(("ember", "s3cret pass"))) else {
        return;
    };
    eprintln!("registry answers in {:?}", t.elapsed());

    let t = Instant::now();
    let reference = registry.push(&image, "harness/busybox:1");
    eprintln!("push (login, tag, push, untag) in {:?}", t.elapsed());
    assert_eq!(reference, format!("{}/harness/busybox:1", registry.host()));
    assert!(!main_has_image(&reference), "the pushed tag is left behind");

    let anonymous = tempfile::tempdir().unwrap();
    let out = docker_with_config(anonymous.path(), &["pull", &reference]);
    assert!(!out.status.success(), "pulled without a login");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no basic auth credentials"), "{stderr}");

    let logged_in = registry.login();
    let t = Instant::now();
    let out = docker_with_config(logged_in.path(), &["pull", "--quiet", &reference]);
    eprintln!("pull in {:?}", t.elapsed());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(main_has_image(&reference));
    docker_with_config(logged_in.path(), &["rmi", &reference]);
}

#[test]
fn a_registry_without_auth_serves_anyone() {
    require_docker!();
    if !busybox_available() {
        return;
    }
    let Some(registry) = Registry::start(None) else {
        return;
    };
    assert_eq!(registry.credentials(), None);
    let reference = registry.push(&busybox_image(), "harness/open:1");
    let anonymous = tempfile::tempdir().unwrap();
    let out = docker_with_config(anonymous.path(), &["pull", "--quiet", &reference]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    docker_with_config(anonymous.path(), &["rmi", &reference]);
}

#[test]
fn a_second_engine_starts_empty_and_runs_a_loaded_image_on_a_port_the_host_reaches() {
    require_docker!();
    if !busybox_available() {
        return;
    }
    let image = busybox_image();
    let rules = iptables_rules();
    let t = Instant::now();
    let Some(engine) = SecondDocker::start() else {
        return;
    };
    eprintln!(
        "second dockerd ({}) answers in {:?}",
        engine.storage_driver,
        t.elapsed()
    );
    assert!(!engine.has_image(&image));

    let t = Instant::now();
    engine.load_from_main(&image);
    eprintln!("save | load in {:?}", t.elapsed());
    assert!(engine.has_image(&image));

    let name = format!("ember-harness-{}", std::process::id());
    let t = Instant::now();
    let publish = format!("127.0.0.1::{BUSYBOX_PORT}");
    engine.run(&["run", "-d", "--name", &name, "-p", &publish, &image]);
    let ports = engine.run(&["port", &name, &BUSYBOX_PORT.to_string()]);
    let addr = ports.lines().next().unwrap().to_string();
    let body = get_eventually(&addr, "/healthz");
    eprintln!("run and first answer in {:?}", t.elapsed());
    assert_eq!(body, "ok\n");
    let ip = engine.run(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", &name]);
    let subnet = engine.gateway_ip.trim_end_matches('1');
    assert!(ip.starts_with(subnet), "{ip} is not on {}", engine.bridge());
    assert!(
        !main_lists_container(&name),
        "the main engine sees the second's container"
    );

    let pid = engine.pid().unwrap();
    let (host, bridge) = (engine.host(), engine.bridge().to_string());
    let t = Instant::now();
    drop(engine);
    eprintln!("drop (rm -f, SIGTERM, wait, cleanup) in {:?}", t.elapsed());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "dockerd runs on"
    );
    let socket = host.trim_start_matches("unix://");
    assert!(!Path::new(socket).exists(), "its directory is left");
    assert!(!ip_link_exists(&bridge), "its bridge {bridge} is left");
    assert!(get(&addr, "/healthz").is_none(), "its container answers on");
    assert_eq!(iptables_rules(), rules, "iptables rules changed");
}

#[test]
fn a_second_engine_pulls_from_the_registry_with_a_login() {
    require_docker!();
    if !busybox_available() {
        return;
    }
    let image = busybox_image();
    let Some(registry) = Registry::start(Some(("ember", "pw"))) else {
        return;
    };
    let Some(engine) = SecondDocker::start() else {
        return;
    };
    let reference = registry.push(&image, "harness/moved:1");
    let logged_in = registry.login();
    let t = Instant::now();
    let out = engine
        .docker()
        .env("DOCKER_CONFIG", logged_in.path())
        .args(["pull", "--quiet", &reference])
        .output()
        .unwrap();
    eprintln!("pull into the second engine in {:?}", t.elapsed());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(engine.has_image(&reference));
    assert!(!main_has_image(&reference));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_given_the_second_engine_runs_its_containers_there() {
    require_docker!();
    if !busybox_available() {
        return;
    }
    let image = busybox_image();
    let Some(engine) = SecondDocker::start() else {
        return;
    };
    engine.load_from_main(&image);
    let gw = Arc::new(Gateway::builder().args(gateway_args(None)).start().await);
    let _agent = Agent::builder(&gw.url, TOKEN, "second")
        .env("DOCKER_HOST", engine.host())
        .start()
        .await;
    wait_ready(&gw, 1).await;
    let manifest = format!(
        "name = \"bb\"\nimage = \"{image}\"\n\
         [readiness]\nhttp_path = \"/healthz\"\nstart_timeout = \"20s\"\n"
    );
    let r = gw.deploy("bb", &manifest).await;
    assert!(r.status.is_success(), "{} {}", r.status, r.text());

    let t = Instant::now();
    let r = gw
        .request(Method::GET, "/fn/bb/index.html", &[], Bytes::new())
        .await;
    eprintln!("cold start on the second engine in {:?}", t.elapsed());
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok\n"));
    assert!(gw.containers("bb").is_empty(), "ran on the main engine");
    let there = engine.run(&["ps", "-q", "--filter", "label=ember.function=bb"]);
    assert!(!there.is_empty(), "no container on the second engine");
}

fn docker_with_config(config: &Path, args: &[&str]) -> Output {
    Command::new("docker")
        .env("DOCKER_CONFIG", config)
        .args(args)
        .output()
        .unwrap()
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

fn main_lists_container(name: &str) -> bool {
    let out = Command::new("docker")
        .args(["ps", "-a", "--format", "{{.Names}}"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|n| n == name)
}

fn ip_link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// The iptables rules (without counters); empty where `iptables-save` is missing.
fn iptables_rules() -> String {
    let Ok(out) = Command::new("iptables-save").output() else {
        return String::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with(':'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The body of `GET path` from `addr` (`127.0.0.1:PORT`) when it answers 200.
fn get(addr: &str, path: &str) -> Option<String> {
    let mut conn = std::net::TcpStream::connect(addr).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?;
    (status == "200").then(|| body.to_string())
}

/// `get`, tried for up to 10 s while the container starts.
fn get_eventually(addr: &str, path: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(body) = get(addr, path) {
            return body;
        }
        assert!(Instant::now() < deadline, "nothing answers on {addr}{path}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
