//! A real Prometheus for tests: Debian's `prometheus` (and its `promtool`) on
//! `127.0.0.1:PORT`, never the service's :9090, with its config, token and storage in a
//! temporary directory it owns. Its config is `deploy/prometheus.yml` itself, pointed at
//! the test's gateway, its token and a 1 s scrape interval.
//!
//! `.ci/run` installs the package. Without it a test skips, saying so, except under
//! `CI=true`, where it fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::Method;
use serde_json::Value;

use super::{free_port, skip_unless_ci, Gateway};

/// Where Debian's `prometheus` puts its binaries.
pub const BINARY: &str = "/usr/bin/prometheus";
pub const PROMTOOL: &str = "/usr/bin/promtool";

/// The shipped scrape config, relative to the repository root.
pub const CONFIG: &str = "deploy/prometheus.yml";

/// How long Prometheus may take to be ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether `binary` is installed; `false` after a `SKIPPED` note (a panic under CI).
pub fn installed(binary: &str) -> bool {
    if Path::new(binary).exists() {
        return true;
    }
    skip_unless_ci(&format!(
        "{binary} is missing; `apt-get install prometheus` provides it"
    ));
    false
}

/// `deploy/prometheus.yml` scraping `target` (`host:port`) every `interval` with the
/// token in `token_file`. Panics if the shipped file no longer has what is replaced.
pub fn config(target: &str, token_file: &Path, interval: &str) -> String {
    let shipped = std::fs::read_to_string(super::repo().join(CONFIG)).unwrap();
    let mut text = shipped.clone();
    for (from, to) in [
        (
            "scrape_interval: 15s",
            format!("scrape_interval: {interval}"),
        ),
        (
            "/etc/prometheus/ember.token",
            token_file.display().to_string(),
        ),
        ("127.0.0.1:8080", target.to_string()),
    ] {
        assert_eq!(text.matches(from).count(), 1, "{CONFIG} has `{from}` once");
        text = text.replace(from, &to);
    }
    text
}

/// A running Prometheus; killed, its storage deleted, when dropped.
pub struct Prometheus {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `gw`'s `/metrics` every second with its admin token,
    /// and waits until it is ready. See [`installed`] first.
    pub async fn scraping(gw: &Gateway) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("ember.token");
        std::fs::write(&token, &gw.token).unwrap();
        let target = gw.url.trim_start_matches("http://");
        let file = dir.path().join("prometheus.yml");
        std::fs::write(&file, config(target, &token, "1s")).unwrap();
        // A port freed by `free_port` can be taken again before Prometheus binds it.
        for _ in 0..3 {
            let port = free_port();
            let mut child = spawn(dir.path(), &file, port);
            let url = format!("http://127.0.0.1:{port}");
            match wait_ready(&mut child, &url, &dir.path().join("log.txt")).await {
                Ok(()) => return Prometheus { child, url, dir },
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    assert!(
                        why.contains("address already in use"),
                        "prometheus did not start: {why}"
                    );
                }
            }
        }
        panic!("prometheus found no free port in 3 tries");
    }

    /// An instant query's `data.result`; panics, with the log, unless it succeeds.
    pub async fn query(&self, expr: &str) -> Vec<Value> {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", expr)
            .finish();
        let url = format!("{}/api/v1/query?{query}", self.url);
        let r = super::request(Method::GET, &url, &[], "").await;
        let body = r.json();
        assert!(
            r.status.is_success() && body["status"] == "success",
            "`{expr}` failed ({}): {body}\n{}",
            r.status,
            self.log()
        );
        body["data"]["result"].as_array().unwrap().clone()
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log.txt")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(dir: &Path, config: &Path, port: u16) -> Child {
    let path = |name: &str| -> PathBuf { dir.join(name) };
    let log = std::fs::File::create(path("log.txt")).unwrap();
    Command::new(BINARY)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", path("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("{BINARY} does not start: {e}"))
}

/// Waits until `GET /-/ready` answers 200; why not (with the log at `log`) when the
/// process exits or never gets ready.
async fn wait_ready(child: &mut Child, url: &str, log: &Path) -> Result<(), String> {
    let log = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + START_TIMEOUT;
    let addr = url.trim_start_matches("http://");
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Err(format!("it exited ({status}):\n{}", log()));
        }
        if std::net::TcpStream::connect(addr).is_ok() {
            let r = super::request(Method::GET, &format!("{url}/-/ready"), &[], "").await;
            if r.status == 200 {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("/-/ready never answered 200:\n{}", log()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `promtool check config` of `file`: its success and output.
pub fn check_config(file: &Path) -> (bool, String) {
    let out = Command::new(PROMTOOL)
        .args(["check", "config"])
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("{PROMTOOL} does not run: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}
