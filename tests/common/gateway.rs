//! A real `ember serve` process for a test, started by a chainable builder
//! (`Gateway::builder().args(..).data_dir(..).start()`), and the calls tests make on it.
//! It owns the process and, when the harness made its data dir, the containers it started.
//!
//! The harness reads the gateway's admin token (`DATA_DIR/admin.token`) once it starts and
//! sends it with every `/api/` request and CLI run, as an operator would; `raw_request`
//! sends only the headers it is given, for tests of credentials.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use bytes::Bytes;
use http::Method;

use super::{
    cli_command, client, client_trusting, docker_ps, remove_containers, repo, request_via,
    spawn_ember_logged, HttpClient, Response,
};

/// A running gateway process.
pub struct Gateway {
    child: Option<Child>,
    pub url: String,
    pub data_dir: PathBuf,
    /// The data dir the harness made. Only then does dropping the gateway remove its
    /// containers: a caller that keeps the dir restarts on it and cleans up itself.
    own_dir: Option<tempfile::TempDir>,
    pub id: String,
    /// The admin token the gateway made on its first start.
    pub token: String,
    /// The client of this gateway (trusting its own CA when it serves HTTPS).
    http: HttpClient,
}

/// How to start a gateway: extra `serve` arguments and the data dir.
#[must_use = "a gateway starts only with `.start().await`"]
#[derive(Default)]
pub struct GatewayBuilder {
    args: Vec<String>,
    data_dir: Option<PathBuf>,
    cwd: Option<PathBuf>,
    netns: Option<String>,
    log: Option<(PathBuf, String)>,
}

impl GatewayBuilder {
    /// Adds `serve` arguments, after `--data-dir`. Without `--listen` among them the
    /// gateway listens on 127.0.0.1:0.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// Runs on `dir`, which the caller keeps (and whose containers the caller removes);
    /// without it the gateway gets a fresh temporary data dir.
    pub fn data_dir(mut self, dir: &Path) -> Self {
        self.data_dir = Some(dir.to_path_buf());
        self
    }

    /// Runs in `dir` with the default data dir (`dir/.ember`), as someone following the
    /// README would; the caller keeps `dir` and removes the containers.
    pub fn in_dir(mut self, dir: &Path) -> Self {
        self.cwd = Some(dir.to_path_buf());
        self
    }

    /// Writes the gateway's log, at `level` (an `EMBER_LOG` filter), to `file`.
    pub fn log_to(mut self, file: &Path, level: &str) -> Self {
        self.log = Some((file.to_path_buf(), level.to_string()));
        self
    }

    /// Runs the gateway inside network namespace `ns` (`ip netns exec`; needs root).
    pub fn netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.to_string());
        self
    }

    /// Starts the process and waits until it serves its API.
    pub async fn start(self) -> Gateway {
        let own_dir = match (&self.data_dir, &self.cwd) {
            (None, None) => Some(tempfile::tempdir().unwrap()),
            _ => None,
        };
        let mut cmd = match &self.netns {
            None => Command::new(env!("CARGO_BIN_EXE_ember")),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_ember")]);
                c
            }
        };
        cmd.arg("serve");
        if !self.args.iter().any(|a| a == "--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        let data_dir = match (&self.cwd, self.data_dir) {
            (Some(cwd), None) => {
                cmd.current_dir(cwd).env_remove("EMBER_DATA_DIR");
                cwd.join(".ember")
            }
            (_, data_dir) => {
                let dir =
                    data_dir.unwrap_or_else(|| own_dir.as_ref().unwrap().path().to_path_buf());
                cmd.arg("--data-dir").arg(&dir);
                dir
            }
        };
        cmd.args(&self.args);
        let log = self
            .log
            .as_ref()
            .map(|(f, level)| (f.as_path(), level.as_str()));
        let (child, url) = spawn_ember_logged(cmd, "gateway", log).await;
        let token = std::fs::read_to_string(data_dir.join("admin.token"))
            .expect("the gateway writes its admin token before it listens");
        let http = if url.starts_with("https://") {
            let ca = data_dir.join("tls").join(ember::tls::CA_CERT_FILE);
            client_trusting(&ember::tls::Trust::CaFile(ca))
        } else {
            client()
        };
        let mut g = Gateway {
            child: Some(child),
            url,
            data_dir,
            own_dir,
            id: String::new(),
            token: token.trim().to_string(),
            http,
        };
        let info = g.get_json("/api/v1/gateway").await;
        g.id = info["id"].as_str().unwrap().to_string();
        g
    }
}

impl Gateway {
    /// A builder for a gateway with extra arguments or a data dir of the caller's.
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder::default()
    }

    /// Starts a gateway with a fresh data dir and no extra arguments.
    pub async fn start() -> Gateway {
        Gateway::builder().start().await
    }

    /// The gateway's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Kills the process with SIGKILL (no graceful anything) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM: the gateway shuts down gracefully.
    pub fn terminate(&self) {
        let pid = self.pid().expect("the gateway runs").to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success(), "kill -TERM {pid}");
    }

    /// Waits up to `within` for the process to exit by itself; its status if it did.
    pub fn wait_exit(&mut self, within: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        let child = self.child.as_mut()?;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        None
    }

    /// Sends a request to the gateway, with the admin token when `path` is under `/api/`
    /// and `headers` has no `Authorization` of its own.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Response {
        let bearer = format!("Bearer {}", self.token);
        let mut headers = headers.to_vec();
        let own = headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("authorization"));
        if path.starts_with("/api/") && !own {
            headers.push(("authorization", &bearer));
        }
        self.raw_request(method, path, &headers, body).await
    }

    /// Sends a request with exactly these headers: no admin token is added.
    pub async fn raw_request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Response {
        request_via(
            &self.http,
            method,
            &format!("{}{path}", self.url),
            headers,
            body,
        )
        .await
    }

    /// GET `path` with the gateway's own client (its CA trusted): the response, its body
    /// left for the caller to read as it streams.
    pub async fn stream(&self, path: &str) -> http::Response<hyper::body::Incoming> {
        let req = http::Request::get(format!("{}{path}", self.url))
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        self.http
            .request(req)
            .await
            .unwrap_or_else(|e| panic!("GET {path} failed: {e:?}"))
    }

    /// GET and decode JSON (panics on error statuses).
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let r = self.request(Method::GET, path, &[], Bytes::new()).await;
        assert!(
            r.status.is_success(),
            "GET {path}: {} {}",
            r.status,
            r.text()
        );
        r.json()
    }

    /// Deploys a TOML manifest; returns the answer.
    pub async fn deploy(&self, name: &str, toml: &str) -> Response {
        self.request(
            Method::PUT,
            &format!("/api/v1/functions/{name}"),
            &[("content-type", "application/toml")],
            toml.to_string(),
        )
        .await
    }

    /// The function's status from the API.
    pub async fn function(&self, name: &str) -> serde_json::Value {
        self.get_json(&format!("/api/v1/functions/{name}")).await
    }

    /// Running containers of this gateway for `function`.
    pub fn containers(&self, function: &str) -> Vec<String> {
        docker_ps(&[
            &format!("ember.gateway={}", self.id),
            &format!("ember.function={function}"),
        ])
    }

    /// Runs the CLI against this gateway, with its admin token.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_command(args).output().unwrap()
    }

    /// Runs the CLI as `cli` does, with `input` on its stdin.
    pub fn cli_input(&self, args: &[&str], input: &[u8]) -> std::process::Output {
        use std::io::Write;
        let mut child = self
            .cli_command(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }

    fn cli_command(&self, args: &[&str]) -> Command {
        let mut cmd = cli_command(&self.data_dir.join("cli-config"));
        cmd.args(args)
            .env("EMBER_GATEWAY", &self.url)
            .env("EMBER_TOKEN", &self.token)
            .current_dir(repo());
        if self.url.starts_with("https://") {
            cmd.env("EMBER_CA_FILE", self.ca_file());
        }
        cmd
    }

    /// The CA certificate of a gateway started with `--tls self-signed`.
    pub fn ca_file(&self) -> PathBuf {
        self.data_dir.join("tls").join(ember::tls::CA_CERT_FILE)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
        if !self.id.is_empty() && self.own_dir.is_some() {
            remove_containers(&format!("ember.gateway={}", self.id));
        }
    }
}
