//! A second Docker engine on this machine, for tests that move images between engines:
//! `dockerd` with its own socket, `--data-root`, `--exec-root` and pidfile in a temporary
//! directory, and a Linux bridge of its own on a free `10.197.N.0/24`. It must not disturb
//! the main engine: it writes no iptables rules (`--iptables=false --ip6tables=false`),
//! and its containerd (its own, started by it under its exec-root) uses a namespace of its
//! own. It owns the process, the bridge and the directory: `Drop` removes its containers,
//! stops it (SIGTERM, then waits) and deletes the bridge and the directory.
//!
//! - It is given an empty `--config-file`: the main engine's `/etc/docker/daemon.json`
//!   sets `data-root`, and dockerd refuses a setting given both as a flag and in its file.
//! - Published ports (`-p 127.0.0.1::PORT`) are reached through `docker-proxy`, there
//!   being no NAT rule. Both engines hand out host ports from 32768 up, each unaware of
//!   the other's; when a port is taken, docker-proxy cannot bind it and dockerd tries the
//!   next one, so they do not clash.
//! - Storage: `overlay2` on the temporary directory (it works on ext4 even where the main
//!   engine runs fuse-overlayfs), falling back to `vfs` where overlay cannot be mounted.
//!
//! Needs root, `dockerd` and `ip`; without them a test skips, saying so, except under
//! `CI=true`, where it fails.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::skip_unless_ci;

/// Storage drivers to try, in order.
const STORAGE_DRIVERS: [&str; 2] = ["overlay2", "vfs"];

/// How long the engine may take to answer `/_ping`.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long it may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Engines started by this test process, to name their bridges apart.
static STARTED: AtomicU32 = AtomicU32::new(0);

/// A running second engine.
pub struct SecondDocker {
    child: Option<Child>,
    socket: PathBuf,
    bridge: String,
    /// The bridge's address, the containers' gateway (`10.197.N.1`).
    pub gateway_ip: String,
    /// The storage driver it runs with.
    pub storage_driver: &'static str,
    /// Holds its config, data-root, exec-root, pidfile, socket and log.
    dir: tempfile::TempDir,
}

impl SecondDocker {
    /// Starts a second engine and waits until it answers. `None` (with a `SKIPPED` note)
    /// when this is not root, or `dockerd` or `ip` is missing, outside CI.
    pub fn start() -> Option<SecondDocker> {
        if !available() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("daemon.json"), "{}\n").unwrap();
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let mut engine = SecondDocker {
            child: None,
            socket: dir.path().join("docker.sock"),
            bridge: format!("emd{}n{n}", std::process::id()),
            gateway_ip: String::new(),
            storage_driver: STORAGE_DRIVERS[0],
            dir,
        };
        // Made after `engine`, whose `Drop` deletes it, should this panic half-way.
        engine.gateway_ip = make_bridge(&engine.bridge, n);
        let mut failures = String::new();
        for driver in STORAGE_DRIVERS {
            engine.storage_driver = driver;
            engine.child = Some(engine.spawn());
            match engine.wait_ready() {
                Ok(()) => return Some(engine),
                Err(why) => {
                    failures += &format!("with {driver}: {why}\n");
                    engine.stop();
                }
            }
        }
        panic!("the second dockerd did not start:\n{failures}");
    }

    /// `unix:///…/docker.sock`, for `DOCKER_HOST`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Its bridge's name.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// What the daemon has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log.txt")).unwrap_or_default()
    }

    /// The docker CLI talking to this engine.
    pub fn docker(&self) -> Command {
        let mut cmd = Command::new("docker");
        cmd.env("DOCKER_HOST", self.host())
            .env_remove("DOCKER_CONTEXT");
        cmd
    }

    /// Runs `docker ARGS` on this engine; its stdout, trimmed, or a panic with its stderr.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.docker().args(args).output().unwrap();
        String::from_utf8_lossy(&check(&format!("docker {}", args.join(" ")), out).stdout)
            .trim()
            .to_string()
    }

    /// Whether this engine has `image`.
    pub fn has_image(&self, image: &str) -> bool {
        self.docker()
            .args(["image", "inspect", image])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    /// Copies `image` from the main engine into this one (`docker save | docker load`).
    pub fn load_from_main(&self, image: &str) {
        let mut save = Command::new("docker")
            .args(["save", image])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let load = self
            .docker()
            .args(["load", "--quiet"])
            .stdin(save.stdout.take().unwrap())
            .output()
            .unwrap();
        check(
            &format!("docker save {image}"),
            save.wait_with_output().unwrap(),
        );
        check("docker load", load);
    }

    /// Starts `dockerd` with `self.storage_driver` on a fresh data-root.
    fn spawn(&self) -> Child {
        let path = |name: &str| self.dir.path().join(name);
        let data_root = path(&format!("data-{}", self.storage_driver));
        let namespace = format!("ember-test-{}", self.bridge);
        let log = std::fs::File::create(path("log.txt")).unwrap();
        Command::new("dockerd")
            .arg("--config-file")
            .arg(path("daemon.json"))
            .arg("--host")
            .arg(self.host())
            .arg("--data-root")
            .arg(data_root)
            .arg("--exec-root")
            .arg(path("exec"))
            .arg("--pidfile")
            .arg(path("docker.pid"))
            .args(["--storage-driver", self.storage_driver])
            .args(["--bridge", &self.bridge])
            .args(["--iptables=false", "--ip6tables=false", "--ip-masq=false"])
            .arg("--userland-proxy=true")
            .args(["--containerd-namespace", &namespace])
            .args(["--containerd-plugins-namespace", &format!("{namespace}-p")])
            .args(["--shutdown-timeout", "2"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("dockerd does not start: {e}"))
    }

    /// Waits until `/_ping` answers `OK`; why not when the daemon exits or never answers.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("spawned");
            if let Some(status) = child.try_wait().unwrap() {
                return Err(format!("it exited ({status}):\n{}", self.log()));
            }
            if ping(&self.socket) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("/_ping never answered:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Removes its containers, then stops the daemon: SIGTERM, and SIGKILL (its
    /// containerd too) if it has not exited within [`STOP_TIMEOUT`].
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Its id may be another process's once it has been reaped.
        if child.try_wait().ok().flatten().is_some() {
            unmount_under(self.dir.path());
            return;
        }
        if let Ok(out) = self.docker().args(["ps", "-aq"]).output() {
            let ids = String::from_utf8_lossy(&out.stdout);
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let _ = self
                    .docker()
                    .args(["rm", "-f"])
                    .args(&ids)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                eprintln!("the second dockerd ignored SIGTERM; killing it");
                let containerd = self.dir.path().join("exec/containerd/containerd.pid");
                if let Ok(pid) = std::fs::read_to_string(containerd) {
                    let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
                }
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        unmount_under(self.dir.path());
    }
}

impl Drop for SecondDocker {
    fn drop(&mut self) {
        self.stop();
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
    }
}

/// Whether a second engine can run here: root, `dockerd` and `ip`.
fn available() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let tools = [("dockerd", "--version"), ("ip", "-V")]
        .iter()
        .all(|(t, a)| {
            Command::new(t)
                .arg(a)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok()
        });
    if !(root && tools) {
        skip_unless_ci("a second Docker engine needs root, `dockerd` and `ip`");
    }
    root && tools
}

/// Makes bridge `name` with the first free `10.197.N.1/24` (N from the process id and
/// `n`, so that parallel tests pick apart), up; returns its address.
fn make_bridge(name: &str, n: u32) -> String {
    let taken = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["-4", "-o", "addr"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    let start = (std::process::id() * 7 + n) % 250;
    let net = (0..250)
        .map(|i| format!("10.197.{}.", (start + i) % 250 + 1))
        .find(|net| !taken.contains(&format!(" {net}")))
        .expect("a free 10.197.N.0/24");
    let ip = format!("{net}1");
    // One left by a test that was killed, in a process with this same id.
    let _ = Command::new("ip")
        .args(["link", "del", name])
        .stderr(Stdio::null())
        .status();
    run(&["ip", "link", "add", name, "type", "bridge"]);
    run(&["ip", "addr", "add", &format!("{ip}/24"), "dev", name]);
    run(&["ip", "link", "set", name, "up"]);
    ip
}

/// Whether the engine at `socket` answers `GET /_ping` with `OK`.
fn ping(socket: &Path) -> bool {
    let Ok(mut conn) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let mut answer = String::new();
    conn.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .and_then(|()| conn.read_to_string(&mut answer))
        .is_ok()
        && answer.starts_with("HTTP/1.")
        && answer.ends_with("\r\n\r\nOK")
}

/// Unmounts whatever is still mounted under `dir` (after a daemon that was killed),
/// deepest first.
fn unmount_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").args(["-l", p]).status();
    }
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    check(&args.join(" "), out);
}

/// `out` when its command succeeded; otherwise a panic with its stderr.
fn check(what: &str, out: Output) -> Output {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
