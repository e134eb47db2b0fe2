//! A real `ember agent` process for a test, started by a chainable builder
//! (`Agent::builder(gateway, token, name).inventory(..).data_dir(..).start()`), optionally
//! inside a network namespace. It owns the process only: the agent's containers outlive
//! it, as on a dead machine.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use super::spawn_ember;

/// A running `ember agent` process.
pub struct Agent {
    child: Option<Child>,
    pub name: String,
    pub url: String,
    /// How it was started (its data dir filled in), to start it again.
    builder: AgentBuilder,
    /// Holds the declared inventory file and, unless the caller gave one, the data dir.
    dir: tempfile::TempDir,
}

/// How to start an agent: whom it joins, as what, with which GPUs and data dir.
#[must_use = "an agent starts only with `.start().await`"]
#[derive(Clone)]
pub struct AgentBuilder {
    gateway: String,
    token: String,
    name: String,
    inventory: Option<String>,
    data_dir: Option<PathBuf>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    netns: Option<String>,
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

    /// More `ember agent` arguments (`--ca-pin`, …).
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// Sets `key` to `value` in the agent's environment (say, `DOCKER_HOST` for another
    /// engine); `ip netns exec` passes it on to an agent in a namespace.
    pub fn env<K, V>(mut self, key: K, value: V) -> Self
    where
        K: AsRef<str>,
        V: AsRef<str>,
    {
        self.env
            .push((key.as_ref().to_string(), value.as_ref().to_string()));
        self
    }

    /// Runs the agent inside network namespace `ns` (`ip netns exec`; needs root).
    pub fn netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.to_string());
        self
    }

    /// Starts the process and waits until its tunnel is open (it prints the gateway URL).
    pub async fn start(mut self) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        if self.data_dir.is_none() {
            self.data_dir = Some(dir.path().join("agent"));
        }
        let (child, url) = spawn_ember(self.command(dir.path()), &self.name).await;
        Agent {
            child: Some(child),
            name: self.name.clone(),
            url,
            builder: self,
            dir,
        }
    }

    /// The command line, with the inventory file written into `dir`.
    fn command(&self, dir: &Path) -> Command {
        let name = &self.name;
        let mut cmd = match &self.netns {
            None => Command::new(env!("CARGO_BIN_EXE_ember")),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_ember")]);
                c
            }
        };
        cmd.args(["agent", "--gateway", &self.gateway])
            .args(["--token", &self.token, "--name", name])
            .args(["--labels", &format!("name={name}")])
            .args(&self.args)
            .arg("--data-dir")
            .arg(self.data_dir.as_ref().expect("set by start"))
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(inv) = &self.inventory {
            let file = dir.join("gpus.toml");
            std::fs::write(&file, inv).unwrap();
            cmd.arg("--gpu-inventory").arg(file);
        }
        cmd
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
            args: Vec::new(),
            env: Vec::new(),
            netns: None,
        }
    }

    /// The process id (of `ip netns exec`'s child, the agent, once it has exec'd).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
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

    /// Starts the agent again on its data dir (as the same node, with its credential),
    /// killing it first if it runs; `change` may alter how (say, its inventory).
    pub async fn restart_with(&mut self, change: impl FnOnce(AgentBuilder) -> AgentBuilder) {
        self.kill();
        self.builder = change(self.builder.clone());
        let (child, url) = spawn_ember(self.builder.command(self.dir.path()), &self.name).await;
        self.child = Some(child);
        self.url = url;
    }

    /// Starts the agent again on its data dir, as the same node.
    pub async fn restart(&mut self) {
        self.restart_with(|b| b).await;
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
