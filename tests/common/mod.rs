//! Shared test harness: real `ember serve` and `ember agent` processes on 127.0.0.1:0
//! with their own data dirs, the echo image built locally (no registry), a small HTTP
//! client, and docker CLI helpers to look at what really runs.
//!
//! # Layout
//! - `gateway`: [`Gateway`] and its builder, `Gateway::builder().args(..).start()`;
//! - `agent`: [`Agent`] and its builder, `Agent::builder(url, token, name).start()`;
//! - `cluster`: a gateway of agents only, and what the API says of nodes;
//! - `ws`: a WebSocket client, an echo check, and the close of a retired instance's socket;
//! - `shim`: ember-shim, Debian's static busybox, the shim example's image, and a busybox
//!   httpd image;
//! - `registry`: a private registry (Debian's `docker-registry`) to push images to, with
//!   htpasswd auth when asked;
//! - `dockerd`: a second Docker engine on this machine, to move images between engines;
//! - `python`: a virtualenv with real Python clients (`openai`) from PyPI;
//! - `prometheus`: a real Prometheus (Debian's) scraping a gateway, and `promtool`;
//! - `dashboard`: the Grafana dashboard's queries and the metric names they use;
//! - here: images, the HTTP client, docker helpers, `eventually`.
#![allow(dead_code)]

mod agent;
pub mod cluster;
pub mod dashboard;
pub mod dockerd;
mod gateway;
pub mod jobs;
pub mod net;
pub mod netns;
pub mod prometheus;
pub mod python;
pub mod registry;
pub mod shim;
pub mod ws;

// Only the multi-node tests start agents; the other binaries leave this unused.
#[allow(unused_imports)]
pub use agent::Agent;
pub use gateway::Gateway;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

/// Repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether Docker answers. Under CI a missing engine fails the test; elsewhere the test
/// is skipped with a note.
pub fn docker_available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    let ok = *OK.get_or_init(|| {
        Command::new("docker")
            .args(["info", "--format", "{{.ServerVersion}}"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    });
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("Docker is not reachable, and CI=true: these tests need a Docker engine");
        }
        eprintln!("SKIPPED: Docker is not reachable; start it to run this test");
    }
    ok
}

/// Whether `CI` is set to `true` or `1`: what a test needs must then be there.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Says why a test cannot run here: a failure under CI, a `SKIPPED` note elsewhere.
pub fn skip_unless_ci(why: &str) {
    if under_ci() {
        panic!("CI=true: {why}");
    }
    eprintln!("SKIPPED: {why}");
}

/// Skips the test (returns) when Docker is missing outside CI.
#[macro_export]
macro_rules! require_docker {
    () => {
        if !common::docker_available() {
            return;
        }
    };
}

/// The echo image, built once per test binary.
pub fn echo_image() -> String {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| function_image("echo")).clone()
}

/// The gpu-info image, built once per test binary.
pub fn gpu_info_image() -> String {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| function_image("gpu-info")).clone()
}

/// Runs functions/build.sh (the static binaries of functions/ and runtimes/), one test
/// thread at a time.
pub fn build_static_programs() {
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let status = Command::new("bash")
        .arg(repo().join("functions/build.sh"))
        .stdout(Stdio::null())
        .status()
        .expect("bash runs");
    assert!(status.success(), "functions/build.sh failed");
}

/// Builds functions/NAME: the static binary by functions/build.sh, the image by
/// `docker build`, tagged by the binary's hash so a changed server rebuilds.
pub fn function_image(name: &str) -> String {
    build_static_programs();
    let bin = std::fs::read(repo().join(format!("functions/{name}/bin/{name}"))).unwrap();
    let tag = format!("ember-test/{name}:{}", short_hash(&bin));
    docker_build(&repo().join(format!("functions/{name}")), &tag);
    tag
}

/// The first 6 bytes of the SHA-256 of `data`, in hex: tags images by their content.
pub fn short_hash(data: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(data);
    digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// Builds the image `tag` from the context `dir` with `docker build`, unless it exists.
pub fn docker_build(dir: &std::path::Path, tag: &str) {
    let exists = Command::new("docker")
        .args(["image", "inspect", tag])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    if !exists {
        let out = Command::new("docker")
            .args(["build", "-q", "-t", tag])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "docker build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A manifest for the echo image with `extra` TOML appended (sections allowed).
pub fn echo_manifest(name: &str, top: &str, sections: &str) -> String {
    format!(
        "name = \"{name}\"\nimage = \"{}\"\n{top}\n[readiness]\nhttp_path = \"/healthz\"\nstart_timeout = \"20s\"\n{sections}\n",
        echo_image()
    )
}

/// Starts `ember serve` or `ember agent` (logging at `EMBER_TEST_LOG`, `error` by
/// default) and returns it with the URL it prints as the last word of its first stdout line.
pub async fn spawn_ember(cmd: Command, what: &str) -> (Child, String) {
    spawn_ember_logged(cmd, what, None).await
}

/// `spawn_ember`, its log at `level` written to `file` when `log` is given.
pub async fn spawn_ember_logged(
    mut cmd: Command,
    what: &str,
    log: Option<(&std::path::Path, &str)>,
) -> (Child, String) {
    match log {
        Some((file, level)) => {
            let file = std::fs::File::create(file).unwrap();
            cmd.env("EMBER_LOG", level).stderr(file);
        }
        None => {
            let level = std::env::var("EMBER_TEST_LOG").unwrap_or_else(|_| "error".into());
            cmd.env("EMBER_LOG", level).stderr(Stdio::inherit());
        }
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what} does not start: {e}"));
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    let url = line
        .trim()
        .rsplit(' ')
        .next()
        .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
        .unwrap_or_else(|| panic!("{what} did not start: {line:?}"))
        .to_string();
    (child, url)
}

/// The `ember` CLI with none of the caller's gateway, token or saved login: its config
/// directory is `config_home` (`XDG_CONFIG_HOME`), and `EMBER_GATEWAY` and `EMBER_TOKEN`
/// are unset.
pub fn cli_command(config_home: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember"));
    cmd.env("XDG_CONFIG_HOME", config_home)
        .env_remove("EMBER_GATEWAY")
        .env_remove("EMBER_TOKEN")
        .env_remove("EMBER_CA_PIN")
        .env_remove("EMBER_CA_FILE");
    cmd
}

/// Sends `n` concurrent GETs of `path` to the gateway; returns their statuses in order.
pub async fn concurrent_statuses(gw: &std::sync::Arc<Gateway>, path: &str, n: usize) -> Vec<u16> {
    concurrent_requests(gw, path, n)
        .await
        .iter()
        .map(|r| r.status.as_u16())
        .collect()
}

/// Sends `n` concurrent GETs of `path` to the gateway; returns the responses in order.
pub async fn concurrent_requests(
    gw: &std::sync::Arc<Gateway>,
    path: &str,
    n: usize,
) -> Vec<Response> {
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let gw = gw.clone();
            let path = path.to_string();
            tokio::spawn(async move { gw.request(Method::GET, &path, &[], Bytes::new()).await })
        })
        .collect();
    let mut out = Vec::new();
    for c in calls {
        out.push(c.await.unwrap());
    }
    out
}

/// A free port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Removes every container with its label filter when dropped, panics included.
pub struct Cleanup(pub String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_containers(&self.0);
    }
}

/// Removes every container with the label filter.
pub fn remove_containers(label: &str) {
    let ids = docker_ps_all(&[label]);
    if !ids.is_empty() {
        let _ = Command::new("docker")
            .args(["rm", "-f"])
            .args(&ids)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Ids of running containers matching every label filter.
pub fn docker_ps(labels: &[&str]) -> Vec<String> {
    docker_ps_args(labels, false)
}

/// Ids of all containers (running or not) matching every label filter.
pub fn docker_ps_all(labels: &[&str]) -> Vec<String> {
    docker_ps_args(labels, true)
}

fn docker_ps_args(labels: &[&str], all: bool) -> Vec<String> {
    let mut cmd = Command::new("docker");
    cmd.args(["ps", "-q", "--no-trunc"]);
    if all {
        cmd.arg("-a");
    }
    for l in labels {
        cmd.args(["--filter", &format!("label={l}")]);
    }
    let out = cmd.output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|s| s.to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A collected response.
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("").to_string())
    }
}

/// The harness's HTTP client (https too, trusting what it was made with).
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

pub fn client() -> HttpClient {
    static CLIENT: OnceLock<HttpClient> = OnceLock::new();
    CLIENT
        .get_or_init(|| client_trusting(&ember::tls::Trust::PublicRoots))
        .clone()
}

/// A client that trusts https gateways as `trust` says.
pub fn client_trusting(trust: &ember::tls::Trust) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let tls = trust.client_config(&[]).expect("a usable trust");
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// One HTTP request, collected.
pub async fn request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response {
    request_via(&client(), method, url, headers, body).await
}

/// One HTTP request through `client`, collected.
pub async fn request_via(
    client: &HttpClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Full::new(body.into())).unwrap())
        .await
        .unwrap_or_else(|e| panic!("request to {url} failed: {e:?}"));
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Response {
        status,
        headers,
        body,
    }
}

/// Polls `check` until it is true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
