//! ember-shim for tests: the binary (built by functions/build.sh), Debian's static
//! busybox, the image of the shim's example function (runtimes/shim/example, the README's
//! example) made from them, the shim run directly on this machine, and an image of busybox
//! alone serving files (no Rust build: quick to make, push and move between engines).
//!
//! The images need `/bin/busybox` from Debian's `busybox-static` (`.ci/run` installs it).
//! Without it the tests that need the image are skipped, saying so, except under
//! `CI=true`, where they fail.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{build_static_programs, docker_build, free_port, repo, short_hash};

/// Where Debian's `busybox-static` puts its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// The ember-shim binary, built if needed.
pub fn binary() -> PathBuf {
    build_static_programs();
    repo().join("runtimes/shim/bin/ember-shim")
}

/// Whether `/bin/busybox` is there and statically linked (a `FROM scratch` image has no
/// dynamic loader). Under CI its absence fails the test; elsewhere the test is skipped.
pub fn busybox_available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    let ok = *OK.get_or_init(|| std::fs::read(BUSYBOX).is_ok_and(|elf| is_static_elf(&elf)));
    if !ok {
        let why = format!(
            "{BUSYBOX} is missing or not statically linked; \
             `apt-get install busybox-static` provides it"
        );
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("CI=true: the shim's image needs a static busybox: {why}");
        }
        eprintln!("SKIPPED: {why}");
    }
    ok
}

/// Skips the test (returns) when Docker or a static busybox is missing outside CI.
#[macro_export]
macro_rules! require_shim_image {
    () => {
        if !common::docker_available() || !common::shim::busybox_available() {
            return;
        }
    };
}

/// Whether a 64-bit little-endian ELF file has no program interpreter (`PT_INTERP`).
fn is_static_elf(elf: &[u8]) -> bool {
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(size), Some(count)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    const PT_INTERP: u32 = 3;
    (0..usize::from(count)).all(|i| {
        let at = phoff as usize + i * usize::from(size);
        elf.get(at..at + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().unwrap()) != PT_INTERP)
    })
}

/// A copy of runtimes/shim/example with `ember-shim` and `busybox` beside its files: the
/// folder the README has you make.
pub fn example_context() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let example = repo().join("runtimes/shim/example");
    for entry in std::fs::read_dir(&example).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        if name != "ember-shim" && name != "busybox" {
            std::fs::copy(&path, dir.path().join(name)).unwrap();
        }
    }
    std::fs::copy(binary(), dir.path().join("ember-shim")).unwrap();
    std::fs::copy(BUSYBOX, dir.path().join("busybox")).unwrap();
    dir
}

/// The example's image, built once per test binary, tagged by its context's content.
pub fn example_image() -> String {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let dir = example_context();
        let tar = ember::cli::build_context_tar(dir.path(), None).unwrap();
        let tag = format!("ember-test/shim-example:{}", short_hash(&tar));
        docker_build(dir.path(), &tag);
        tag
    })
    .clone()
}

/// Port the busybox image's httpd listens on (Ember's default function port).
pub const BUSYBOX_PORT: u16 = 8080;

/// A `FROM scratch` image of busybox alone, its httpd serving `/healthz` and
/// `/index.html` (both `ok`) on [`BUSYBOX_PORT`]; built once per test binary, tagged by
/// its content. Needs [`busybox_available`].
pub fn busybox_image() -> String {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let dockerfile = format!(
            "FROM scratch\nCOPY busybox /bin/busybox\nCOPY www /www\nEXPOSE {BUSYBOX_PORT}\n\
             ENTRYPOINT [\"/bin/busybox\"]\n\
             CMD [\"httpd\", \"-f\", \"-p\", \"{BUSYBOX_PORT}\", \"-h\", \"/www\"]\n"
        );
        let mut content = std::fs::read(BUSYBOX).unwrap();
        content.extend_from_slice(dockerfile.as_bytes());
        let tag = format!("ember-test/busybox-httpd:{}", short_hash(&content));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Dockerfile"), dockerfile).unwrap();
        // `copy` keeps the executable bit, which `COPY` keeps in the image.
        std::fs::copy(BUSYBOX, dir.path().join("busybox")).unwrap();
        std::fs::create_dir(dir.path().join("www")).unwrap();
        std::fs::write(dir.path().join("www/healthz"), "ok\n").unwrap();
        std::fs::write(dir.path().join("www/index.html"), "ok\n").unwrap();
        docker_build(dir.path(), &tag);
        tag
    })
    .clone()
}

/// A manifest for the example image with the shim's settings in `env` and `sections`
/// (TOML) appended.
pub fn example_manifest(name: &str, env: &[(&str, &str)], sections: &str) -> String {
    let env: Vec<String> = env.iter().map(|(k, v)| format!("{k} = \"{v}\"")).collect();
    format!(
        "name = \"{name}\"\nimage = \"{}\"\nenv = {{ {} }}\n\
         [readiness]\nhttp_path = \"/healthz\"\nstart_timeout = \"20s\"\n{sections}\n",
        example_image(),
        env.join(", ")
    )
}

/// ember-shim run directly on this machine (not in a container), on a free port.
pub struct LocalShim {
    child: Child,
    pub url: String,
    /// Holds its log (stderr), `log.txt`.
    dir: tempfile::TempDir,
}

impl LocalShim {
    /// Starts `ember-shim ARGS` with `env` added and waits until `/healthz` answers.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> LocalShim {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("log.txt")).unwrap();
        let child = Command::new(binary())
            .args(["--port", &port.to_string()])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("ember-shim starts");
        let shim = LocalShim {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "ember-shim never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        shim
    }

    /// The shim's address, `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// What it has logged so far (its stderr: the container log).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log.txt")).unwrap()
    }

    /// Sends SIGTERM, as `docker stop` does.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for LocalShim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `text` to an executable script in `dir` and returns its path.
pub fn script(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{text}")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}
