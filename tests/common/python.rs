//! Real Python clients for tests: a virtualenv under `target/py-clients` with the packages
//! a test names, pip-installed from PyPI on first use. Without `python3` (or without
//! PyPI) the test is skipped saying so, and fails under `CI=true`.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

/// The packages every test's virtualenv gets, pinned to a major version.
pub const PACKAGES: &[&str] = &[
    "openai>=1.40,<4",
    "httpx",
    "websocket-client>=1.6,<2",
    "prometheus_client>=0.20,<1",
];

/// The virtualenv's python, made (once, for every test binary) with [`PACKAGES`];
/// `None` after saying why when it cannot be made.
pub fn python() -> Option<PathBuf> {
    venv("py-clients", PACKAGES)
}

/// The python of the virtualenv `target/NAME`, made (once) with `packages`; `None` after
/// saying why when it cannot be made.
pub fn venv(name: &str, packages: &[&str]) -> Option<PathBuf> {
    static MAKING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = super::repo().join("target").join(name);
    let python = dir.join("bin/python");
    let marker = dir.join(format!(
        "installed-{}",
        super::short_hash(packages.join(" ").as_bytes())
    ));
    if marker.exists() {
        return Some(python);
    }
    if !python.exists() {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&dir)
            .status();
        if !made.is_ok_and(|s| s.success()) {
            super::skip_unless_ci(
                "python3 with venv is needed for the client tests (apt install python3-venv)",
            );
            return None;
        }
    }
    let installed = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(packages)
        .stdout(Stdio::null())
        .output();
    match installed {
        Ok(out) if out.status.success() => {
            std::fs::write(&marker, "").unwrap();
            Some(python)
        }
        Ok(out) => {
            super::skip_unless_ci(&format!(
                "pip could not install {packages:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
            None
        }
        Err(e) => {
            super::skip_unless_ci(&format!("pip did not run: {e}"));
            None
        }
    }
}

/// Runs `script` with the virtualenv's python and `env`; panics with its output unless
/// it exits 0. Returns its stdout.
pub fn run(python: &PathBuf, script: &str, env: &[(&str, &str)]) -> String {
    let out: Output = Command::new(python)
        .arg("-c")
        .arg(script)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "the python client failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
