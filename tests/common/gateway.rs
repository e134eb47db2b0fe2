//! A real `ember serve` process for a test, started by a chainable builder
//! (`Gateway::builder().args(..).data_dir(..).start()`), and the calls tests make on it.
//! It owns the process and, when the harness made its data dir, the containers it started.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use bytes::Bytes;
use http::Method;

use super::{docker_ps, remove_containers, repo, request, spawn_ember, Response};

/// A running gateway process.
pub struct Gateway {
    child: Option<Child>,
    pub url: String,
    pub data_dir: PathBuf,
    /// The data dir the harness made. Only then does dropping the gateway remove its
    /// containers: a caller that keeps the dir restarts on it and cleans up itself.
    own_dir: Option<tempfile::TempDir>,
    pub id: String,
}

/// How to start a gateway: extra `serve` arguments and the data dir.
#[must_use = "a gateway starts only with `.start().await`"]
#[derive(Default)]
pub struct GatewayBuilder {
    args: Vec<String>,
    data_dir: Option<PathBuf>,
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

    /// Starts the process and waits until it serves its API.
    pub async fn start(self) -> Gateway {
        let own_dir = match self.data_dir {
            Some(_) => None,
            None => Some(tempfile::tempdir().unwrap()),
        };
        let data_dir = self
            .data_dir
            .unwrap_or_else(|| own_dir.as_ref().unwrap().path().to_path_buf());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember"));
        cmd.arg("serve");
        if !self.args.iter().any(|a| a == "--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.arg("--data-dir").arg(&data_dir).args(&self.args);
        let (child, url) = spawn_ember(cmd, "gateway").await;
        let mut g = Gateway {
            child: Some(child),
            url,
            data_dir,
            own_dir,
            id: String::new(),
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

    /// Sends a request to the gateway.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Response {
        request(method, &format!("{}{path}", self.url), headers, body).await
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

    /// Runs the CLI against this gateway.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_ember"))
            .args(args)
            .env("EMBER_GATEWAY", &self.url)
            .current_dir(repo())
            .output()
            .unwrap()
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
