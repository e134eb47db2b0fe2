//! A private image registry for tests: Debian's `docker-registry` (distribution 2.8) on
//! `127.0.0.1:PORT`, storing in a temporary directory it owns, with htpasswd (bcrypt)
//! auth when asked. It owns the process, its storage and the docker CLI logins made for
//! it; it never touches the user's `~/.docker`.
//!
//! Plain HTTP is enough, auth included: the Docker engine treats registries on
//! 127.0.0.0/8 as insecure (no TLS) without any `insecure-registries` setting, and
//! distribution 2.8's htpasswd auth does not insist on TLS (its docs only advise it).
//! `docker login`, push and pull all work against `http://127.0.0.1:PORT`, a second
//! engine's too; without a login a pull fails with "no basic auth credentials".
//!
//! Needs `/usr/bin/docker-registry` (package `docker-registry`) and, for auth, `htpasswd`
//! (package `apache2-utils`); `.ci/run` installs both. Without them a test skips, saying
//! so, except under `CI=true`, where it fails.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, skip_unless_ci};

/// Where Debian's `docker-registry` puts its binary.
pub const BINARY: &str = "/usr/bin/docker-registry";

/// How long the registry may take to answer `/v2/`.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running registry; killed, its storage deleted, when dropped.
pub struct Registry {
    child: Child,
    host: String,
    auth: Option<(String, String)>,
    /// Holds the config, the htpasswd file, the storage and the log.
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry on a free port of 127.0.0.1, requiring `auth` (user, password)
    /// when given, and waits until `/v2/` answers (401 with auth, 200 without). `None`
    /// (with a `SKIPPED` note) when the registry or `htpasswd` is missing outside CI.
    pub fn start(auth: Option<(&str, &str)>) -> Option<Registry> {
        if !Path::new(BINARY).exists() {
            skip_unless_ci(&format!(
                "{BINARY} is missing; `apt-get install docker-registry` provides it"
            ));
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        if let Some((user, password)) = auth {
            let Some(entry) = htpasswd_entry(user, password) else {
                skip_unless_ci("htpasswd is missing; `apt-get install apache2-utils` provides it");
                return None;
            };
            std::fs::write(dir.path().join("htpasswd"), entry).unwrap();
        }
        let auth = auth.map(|(u, p)| (u.to_string(), p.to_string()));
        let want = if auth.is_some() { 401 } else { 200 };
        // A port freed by `free_port` can be taken again before the registry binds it.
        for _ in 0..3 {
            let port = free_port();
            let host = format!("127.0.0.1:{port}");
            let mut child = spawn(dir.path(), port, auth.is_some());
            match wait_ready(&mut child, &host, want, &dir.path().join("log.txt")) {
                Ok(()) => {
                    return Some(Registry {
                        child,
                        host,
                        auth,
                        dir,
                    })
                }
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    assert!(
                        why.contains("address already in use"),
                        "docker-registry did not start: {why}"
                    );
                }
            }
        }
        panic!("docker-registry found no free port in 3 tries");
    }

    /// `127.0.0.1:PORT`, the registry part of its image references.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The user and password it requires, if any.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.auth.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// `HOST/repo_tag`.
    pub fn reference(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.host)
    }

    /// What it has logged (warnings and errors) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log.txt")).unwrap_or_default()
    }

    /// A fresh docker CLI config directory (for `DOCKER_CONFIG`) logged in to this
    /// registry; empty when it needs no login.
    pub fn login(&self) -> tempfile::TempDir {
        let config = tempfile::tempdir().unwrap();
        if let Some((user, password)) = self.credentials() {
            let mut child = docker(config.path())
                .args(["login", "--username", user, "--password-stdin", &self.host])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(password.as_bytes())
                .unwrap();
            check("docker login", child.wait_with_output().unwrap());
        }
        config
    }

    /// Tags `local_image` as `HOST/repo_tag`, pushes it (logged in when the registry wants
    /// it), and removes that tag again, so that the engine no longer has the reference
    /// (its layers stay under `local_image`). Returns the reference.
    pub fn push(&self, local_image: &str, repo_tag: &str) -> String {
        let reference = self.reference(repo_tag);
        let config = self.login();
        let run = |args: &[&str]| {
            let out = docker(config.path()).args(args).output().unwrap();
            check(&format!("docker {}", args.join(" ")), out);
        };
        run(&["tag", local_image, &reference]);
        run(&["push", "--quiet", &reference]);
        run(&["rmi", &reference]);
        reference
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `GET /v2/` on `host` answers `want`; why not (with the log at `log`) when
/// the process exits, answers something else, or never answers.
fn wait_ready(child: &mut Child, host: &str, want: u16, log: &Path) -> Result<(), String> {
    let log = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Err(format!("it exited ({status}):\n{}", log()));
        }
        match v2_status(host) {
            Some(status) if status == want => return Ok(()),
            Some(status) => return Err(format!("/v2/ answered {status}, not {want}")),
            None if Instant::now() > deadline => {
                return Err(format!("/v2/ never answered:\n{}", log()))
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// `user:BCRYPT` for the htpasswd file; `None` when `htpasswd` is missing.
fn htpasswd_entry(user: &str, password: &str) -> Option<Vec<u8>> {
    let out = Command::new("htpasswd")
        .args(["-B", "-b", "-n", user, password])
        .output()
        .ok()?;
    Some(check("htpasswd", out).stdout)
}

/// Writes the config for `port` into `dir` and starts the registry on it.
fn spawn(dir: &Path, port: u16, auth: bool) -> Child {
    let path = |name: &str| -> PathBuf { dir.join(name) };
    // `http.secret` set quiets the warning about a random one (a single instance needs no
    // shared secret); the access log would be one line per request.
    let mut config = format!(
        "version: 0.1\n\
         log:\n  level: warn\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {:?}\n  delete:\n    enabled: true\n\
         http:\n  addr: 127.0.0.1:{port}\n  secret: ember-test-registry\n",
        path("storage").display().to_string(),
    );
    if auth {
        config += &format!(
            "auth:\n  htpasswd:\n    realm: ember-test\n    path: {:?}\n",
            path("htpasswd").display().to_string()
        );
    }
    std::fs::write(path("config.yml"), config).unwrap();
    let log = std::fs::File::create(path("log.txt")).unwrap();
    Command::new(BINARY)
        .arg("serve")
        .arg(path("config.yml"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("{BINARY} does not start: {e}"))
}

/// The status of `GET /v2/` on `host`, or `None` when nothing answers.
fn v2_status(host: &str) -> Option<u16> {
    let mut conn = std::net::TcpStream::connect(host).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(conn, "GET /v2/ HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    conn.read_exact(&mut head).ok()?;
    // "HTTP/1.1 200"
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// The docker CLI with `config` as its config directory (logins), never `~/.docker`.
fn docker(config: &Path) -> Command {
    let mut cmd = Command::new("docker");
    cmd.env("DOCKER_CONFIG", config);
    cmd
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
