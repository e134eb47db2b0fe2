//! A real `ember agent` process for a test, started by a chainable builder
//! (`Agent::builder(gateway, token, name).inventory(..).data_dir(..).start()`).
//! It owns the process only: the agent's containers outlive it, as on a dead machine.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use super::spawn_ember;

/// A running `ember agent` process.
pub struct Agent {
    child: Option<Child>,
    pub name: String,
    pub url: String,
    /// Holds the declared inventory file and, unless the caller gave one, the data dir.
    _dir: tempfile::TempDir,
}

/// How to start an agent: whom it joins, as what, with which GPUs and data dir.
#[must_use = "an agent starts only with `.start().await`"]
pub struct AgentBuilder {
    gateway: String,
    token: String,
    name: String,
    inventory: Option<String>,
    data_dir: Option<PathBuf>,
}

impl AgentBuilder {
    /// Declares the agent's GPUs (TOML text, as for `--gpu-inventory`).
    pub fn inventory(mut self, toml: &str) -> Self {
        self.inventory = Some(toml.to_string());
        self
    }

    /// Runs on `dir`, kept by the caller (say, to come back on the same node identity);
    /// without it the agent gets a fresh temporary data dir.
    pub fn data_dir(mut self, dir: &Path) -> Self {
        self.data_dir = Some(dir.to_path_buf());
        self
    }

    /// Starts the process and waits until it prints its URL.
    pub async fn start(self) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = self.data_dir.unwrap_or_else(|| dir.path().join("agent"));
        let name = &self.name;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember"));
        cmd.args(["agent", "--gateway", &self.gateway])
            .args(["--token", &self.token, "--name", name])
            .args(["--listen", "127.0.0.1:0", "--advertise", "127.0.0.1"])
            .args(["--labels", &format!("name={name}")])
            .arg("--data-dir")
            .arg(data_dir);
        if let Some(inv) = &self.inventory {
            let file = dir.path().join("gpus.toml");
            std::fs::write(&file, inv).unwrap();
            cmd.arg("--gpu-inventory").arg(file);
        }
        let (child, url) = spawn_ember(cmd, name).await;
        Agent {
            child: Some(child),
            name: self.name,
            url,
            _dir: dir,
        }
    }
}

impl Agent {
    /// A builder for an agent named `name` joining the gateway at `gateway` with `token`.
    pub fn builder(gateway: &str, token: &str, name: &str) -> AgentBuilder {
        AgentBuilder {
            gateway: gateway.to_string(),
            token: token.to_string(),
            name: name.to_string(),
            inventory: None,
            data_dir: None,
        }
    }

    /// SIGKILL, as if the machine died (its containers stay unless the test removes them).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}
