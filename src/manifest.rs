//! The function manifest: what a user writes in `ember.toml` (or sends as JSON).
//!
//! This module owns the manifest types, their defaults, parsing from TOML and JSON
//! (parse errors carry the field path through `serde_path_to_error`), semantic
//! validation (every error names its field path and what was expected), and the
//! revision id, a hash of the validated manifest. It knows nothing of Docker or HTTP.

use std::collections::BTreeMap;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::model::{FieldError, Sharing};

/// Longest function name: a DNS label.
pub const MAX_NAME_LEN: usize = 63;
/// Most instances one function may ask for.
pub const MAX_SCALE: u32 = 1000;
/// Most in-flight requests one instance may be given.
pub const MAX_CONCURRENCY: u32 = 10_000;
/// Most requests one function may buffer while it is cold or saturated.
pub const MAX_QUEUE_CAPACITY: u32 = 1_000_000;
/// Smallest memory limit Docker accepts for a container.
pub const MIN_MEMORY: ByteSize = ByteSize::mib(6);
/// Largest request body a function may accept.
pub const MAX_BODY_LIMIT: ByteSize = ByteSize::gib(4);
/// Longest time any of the manifest's timeouts may be set to.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// A function manifest, as deployed. Every field but `name` and `image`/`build` has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Lower-case DNS label; the function is invoked at `/fn/NAME/...`.
    pub name: String,
    /// Image to run. With `build` and no `image`, the CLI names the image after the context's hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Build context, relative to the manifest file; used by the CLI when the image is missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
    /// Dockerfile inside the build context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
    /// Port the server listens on inside the container; `PORT` is set to it.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Command (entrypoint arguments) overriding the image's; absent keeps the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// How Ember decides a new instance is ready.
    #[serde(default)]
    pub readiness: Readiness,
    /// Per-instance CPU and memory limits.
    #[serde(default)]
    pub resources: Resources,
    /// Instance counts, per-instance concurrency and idle retirement.
    #[serde(default)]
    pub scale: Scale,
    /// The buffer of requests waiting for a free instance.
    #[serde(default)]
    pub queue: Queue,
    /// Limits on each request.
    #[serde(default)]
    pub request: RequestLimits,
    /// GPUs each instance needs; absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuSpec>,
}

/// Most GPUs one instance may ask for.
pub const MAX_GPUS: u32 = 16;

/// The `[gpu]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSpec {
    /// GPUs (or MIG instances) per instance.
    #[serde(default = "default_gpu_count")]
    pub count: u32,
    /// GPU memory per GPU the instance uses; required when `sharing = "shared"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    /// exclusive | shared | mig.
    #[serde(default)]
    pub sharing: Sharing,
    /// MIG profile, e.g. `3g.40gb`; required when `sharing = "mig"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig_profile: Option<String>,
    /// Only GPUs whose name contains one of these (case-insensitive), e.g. `["A100", "H100"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// Only GPUs (or MIG instances) with at least this much memory in total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_memory: Option<ByteSize>,
}

fn default_gpu_count() -> u32 {
    1
}

impl GpuSpec {
    fn validate(&self, bad: &mut impl FnMut(&str, String)) {
        if self.count == 0 || self.count > MAX_GPUS {
            bad("gpu.count", format!("must be between 1 and {MAX_GPUS}"));
        }
        if self.memory.is_some_and(|m| m.as_u64() == 0) {
            bad("gpu.memory", "must be more than 0".into());
        }
        if self.min_memory.is_some_and(|m| m.as_u64() == 0) {
            bad("gpu.min_memory", "must be more than 0".into());
        }
        if self.models.iter().any(|m| m.trim().is_empty()) {
            bad(
                "gpu.models",
                "entries must be non-empty model names, e.g. \"A100\"".into(),
            );
        }
        match self.sharing {
            Sharing::Shared if self.memory.is_none() => bad(
                "gpu.memory",
                "required with sharing = \"shared\": the GPU memory each instance uses, e.g. \"8GiB\""
                    .into(),
            ),
            Sharing::Mig => {
                match &self.mig_profile {
                    None => bad(
                        "gpu.mig_profile",
                        "required with sharing = \"mig\", e.g. \"3g.40gb\"".into(),
                    ),
                    Some(p) if !valid_mig_profile(p) => bad(
                        "gpu.mig_profile",
                        format!("`{p}` is not a MIG profile like \"1g.10gb\" or \"3g.40gb\""),
                    ),
                    Some(_) => {}
                }
                if self.count != 1 {
                    bad(
                        "gpu.count",
                        "must be 1 with sharing = \"mig\": CUDA uses one MIG instance per process"
                            .into(),
                    );
                }
                if self.memory.is_some() {
                    bad(
                        "gpu.memory",
                        "not used with sharing = \"mig\": the profile fixes the memory; use min_memory to require more"
                            .into(),
                    );
                }
            }
            _ => {}
        }
        if self.sharing != Sharing::Mig && self.mig_profile.is_some() {
            bad("gpu.mig_profile", "only with sharing = \"mig\"".into());
        }
    }
}

fn valid_mig_profile(p: &str) -> bool {
    let Some((g, mem)) = p.split_once("g.") else {
        return false;
    };
    let Some(gb) = mem.strip_suffix("gb") else {
        return false;
    };
    !g.is_empty()
        && !gb.is_empty()
        && g.chars().all(|c| c.is_ascii_digit())
        && gb.chars().all(|c| c.is_ascii_digit())
}

/// Readiness probe of a new instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Readiness {
    /// HTTP path polled with GET until it answers 2xx; absent: a TCP connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_path: Option<String>,
    /// How long an instance may take to become ready.
    #[serde(default = "default_start_timeout", with = "humantime_serde")]
    pub start_timeout: Duration,
}

/// Per-instance limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU cores (fractions allowed).
    #[serde(default = "default_cpus")]
    pub cpus: f64,
    /// Memory limit.
    #[serde(default = "default_memory")]
    pub memory: ByteSize,
}

/// Scaling bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scale {
    /// Instances kept warm even without traffic.
    #[serde(default)]
    pub min: u32,
    /// Instances never exceeded.
    #[serde(default = "default_max")]
    pub max: u32,
    /// In-flight requests one instance is given at most.
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// An instance idle this long is retired (down to `min`); with `keep_alive =
    /// "adaptive"`, the fallback while the function's history is too short.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Share of `concurrency` the autoscaler aims at per instance (0 to 1).
    #[serde(default = "default_target_utilization")]
    pub target_utilization: f64,
    /// Window over which observed concurrency is averaged to scale (and to scale down).
    #[serde(default = "default_stable_window", with = "humantime_serde")]
    pub stable_window: Duration,
    /// Short window: demand over `panic_threshold` times capacity there scales up at once.
    #[serde(default = "default_panic_window", with = "humantime_serde")]
    pub panic_window: Duration,
    /// Ratio of short-window demand to capacity that starts panic mode.
    #[serde(default = "default_panic_threshold")]
    pub panic_threshold: f64,
    /// What an idle instance becomes: `stop` (removed) or `pause` (frozen, resumed on the
    /// next request in milliseconds, removed after `pause_timeout`).
    #[serde(default)]
    pub on_idle: OnIdle,
    /// How long a paused instance is kept before it is removed.
    #[serde(default = "default_pause_timeout", with = "humantime_serde")]
    pub pause_timeout: Duration,
    /// Keep-alive policy: `fixed` (`idle_timeout`) or `adaptive` (learned from the
    /// function's idle gaps, with pre-warming).
    #[serde(default)]
    pub keep_alive: KeepAliveKind,
}

/// What an idle instance becomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnIdle {
    /// Removed.
    #[default]
    Stop,
    /// Frozen with Docker pause; resumed on the next request.
    Pause,
}

/// Which keep-alive policy decides how long idle instances stay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeepAliveKind {
    /// `idle_timeout`.
    #[default]
    Fixed,
    /// The hybrid histogram policy (Shahrad et al., ATC 2020).
    Adaptive,
}

/// The per-function request buffer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Queue {
    /// Requests buffered at most; one more answers 503.
    #[serde(default = "default_queue_capacity")]
    pub capacity: u32,
    /// How long a request may wait for an instance before it answers 504.
    #[serde(default = "default_queue_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

/// Per-request limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestLimits {
    /// How long the function may take to start answering a request.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Largest request body; a larger one answers 413.
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
}

fn default_port() -> u16 {
    8080
}
fn default_start_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_cpus() -> f64 {
    1.0
}
fn default_memory() -> ByteSize {
    ByteSize::mib(512)
}
fn default_max() -> u32 {
    4
}
fn default_concurrency() -> u32 {
    50
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_target_utilization() -> f64 {
    0.7
}
fn default_stable_window() -> Duration {
    Duration::from_secs(60)
}
fn default_panic_window() -> Duration {
    Duration::from_secs(6)
}
fn default_panic_threshold() -> f64 {
    2.0
}
fn default_pause_timeout() -> Duration {
    Duration::from_secs(30 * 60)
}
fn default_queue_capacity() -> u32 {
    1000
}
fn default_queue_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_max_body() -> ByteSize {
    ByteSize::mib(32)
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            http_path: None,
            start_timeout: default_start_timeout(),
        }
    }
}
impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpus: default_cpus(),
            memory: default_memory(),
        }
    }
}
impl Default for Scale {
    fn default() -> Self {
        Scale {
            min: 0,
            max: default_max(),
            concurrency: default_concurrency(),
            idle_timeout: default_idle_timeout(),
            target_utilization: default_target_utilization(),
            stable_window: default_stable_window(),
            panic_window: default_panic_window(),
            panic_threshold: default_panic_threshold(),
            on_idle: OnIdle::Stop,
            pause_timeout: default_pause_timeout(),
            keep_alive: KeepAliveKind::Fixed,
        }
    }
}
impl Default for Queue {
    fn default() -> Self {
        Queue {
            capacity: default_queue_capacity(),
            timeout: default_queue_timeout(),
        }
    }
}
impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            timeout: default_request_timeout(),
            max_body: default_max_body(),
        }
    }
}

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The text is not valid TOML/JSON or a field has the wrong type or is unknown.
    #[error("manifest does not parse: {0}")]
    Parse(FieldError),
    /// The manifest parses but some values make no sense.
    #[error("manifest is invalid: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldError>),
}

impl ManifestError {
    /// Every field error, for API bodies and CLI output.
    pub fn field_errors(&self) -> Vec<FieldError> {
        match self {
            ManifestError::Parse(e) => vec![e.clone()],
            ManifestError::Invalid(errors) => errors.clone(),
        }
    }
}

/// The text format of a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `ember.toml`.
    Toml,
    /// The API's JSON form.
    Json,
}

impl Manifest {
    /// Parses and validates a manifest.
    pub fn parse(text: &str, format: Format) -> Result<Manifest, ManifestError> {
        let manifest: Manifest = match format {
            Format::Toml => {
                let de = toml::Deserializer::parse(text).map_err(|e| {
                    ManifestError::Parse(FieldError {
                        field: "(document)".into(),
                        message: e.message().trim().to_string(),
                    })
                })?;
                serde_path_to_error::deserialize(de).map_err(path_error)?
            }
            Format::Json => {
                let mut de = serde_json::Deserializer::from_str(text);
                serde_path_to_error::deserialize(&mut de).map_err(path_error)?
            }
        };
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks every value; returns all problems at once.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let mut errors = Vec::new();
        let mut bad = |field: &str, message: String| {
            errors.push(FieldError {
                field: field.to_string(),
                message,
            })
        };
        if let Err(m) = check_name(&self.name) {
            bad("name", m);
        }
        match (&self.image, &self.build) {
            (None, None) => bad(
                "image",
                "missing: set `image` to an image on the node, or `build` to a build context"
                    .into(),
            ),
            (Some(image), _) if !valid_image_ref(image) => bad(
                "image",
                format!("`{image}` is not an image reference like `repo/name:tag`"),
            ),
            _ => {}
        }
        if self.build.as_deref().is_some_and(|b| b.trim().is_empty()) {
            bad(
                "build",
                "must be a path to a build context, e.g. \".\"".into(),
            );
        }
        if self.dockerfile.is_some() && self.build.is_none() {
            bad(
                "dockerfile",
                "only makes sense together with `build`".into(),
            );
        }
        if self.port == 0 {
            bad("port", "must be between 1 and 65535".into());
        }
        if let Some(command) = &self.command {
            if command.is_empty() || command.iter().any(|c| c.is_empty()) {
                bad(
                    "command",
                    "must be a non-empty list of non-empty strings, or left out".into(),
                );
            }
        }
        for key in self.env.keys() {
            if !valid_env_name(key) {
                bad(
                    &format!("env.{key}"),
                    "variable names are letters, digits and `_`, not starting with a digit".into(),
                );
            } else if key == "PORT" {
                bad(
                    "env.PORT",
                    "is set by Ember from `port`; set `port` instead".into(),
                );
            }
        }
        if let Some(path) = &self.readiness.http_path {
            if !path.starts_with('/') {
                bad(
                    "readiness.http_path",
                    format!("`{path}` must start with `/`"),
                );
            }
        }
        check_duration(
            &mut bad,
            "readiness.start_timeout",
            self.readiness.start_timeout,
            Duration::from_secs(1),
        );
        if !(self.resources.cpus > 0.0 && self.resources.cpus <= 1024.0) {
            bad(
                "resources.cpus",
                format!(
                    "{} is not between 0 (excluded) and 1024",
                    self.resources.cpus
                ),
            );
        }
        if self.resources.memory < MIN_MEMORY {
            bad(
                "resources.memory",
                format!(
                    "{} is below Docker's minimum of {MIN_MEMORY}",
                    self.resources.memory
                ),
            );
        }
        let scale = &self.scale;
        if scale.max == 0 || scale.max > MAX_SCALE {
            bad("scale.max", format!("must be between 1 and {MAX_SCALE}"));
        }
        if scale.min > scale.max {
            bad(
                "scale.min",
                format!("{} is above scale.max ({})", scale.min, scale.max),
            );
        }
        if scale.concurrency == 0 || scale.concurrency > MAX_CONCURRENCY {
            bad(
                "scale.concurrency",
                format!("must be between 1 and {MAX_CONCURRENCY}"),
            );
        }
        check_duration(
            &mut bad,
            "scale.idle_timeout",
            scale.idle_timeout,
            Duration::from_secs(1),
        );
        if !(scale.target_utilization > 0.0 && scale.target_utilization <= 1.0) {
            bad(
                "scale.target_utilization",
                format!(
                    "{} is not between 0 (excluded) and 1",
                    scale.target_utilization
                ),
            );
        }
        check_duration(
            &mut bad,
            "scale.stable_window",
            scale.stable_window,
            Duration::from_secs(1),
        );
        check_duration(
            &mut bad,
            "scale.panic_window",
            scale.panic_window,
            Duration::from_millis(500),
        );
        if scale.panic_window > scale.stable_window {
            bad(
                "scale.panic_window",
                "must not be longer than scale.stable_window".into(),
            );
        }
        if !(scale.panic_threshold >= 1.0 && scale.panic_threshold <= 100.0) {
            bad(
                "scale.panic_threshold",
                format!("{} is not between 1 and 100", scale.panic_threshold),
            );
        }
        check_duration(
            &mut bad,
            "scale.pause_timeout",
            scale.pause_timeout,
            Duration::from_secs(1),
        );
        if self.queue.capacity == 0 || self.queue.capacity > MAX_QUEUE_CAPACITY {
            bad(
                "queue.capacity",
                format!("must be between 1 and {MAX_QUEUE_CAPACITY}"),
            );
        }
        check_duration(
            &mut bad,
            "queue.timeout",
            self.queue.timeout,
            Duration::from_millis(100),
        );
        check_duration(
            &mut bad,
            "request.timeout",
            self.request.timeout,
            Duration::from_secs(1),
        );
        if self.request.max_body > MAX_BODY_LIMIT {
            bad(
                "request.max_body",
                format!("must be at most {MAX_BODY_LIMIT}"),
            );
        }
        if let Some(gpu) = &self.gpu {
            gpu.validate(&mut bad);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ManifestError::Invalid(errors))
        }
    }

    /// The revision id: a short hash of the manifest's canonical JSON form, so the same
    /// manifest always gives the same revision and any change gives a new one.
    pub fn revision_id(&self) -> String {
        let canonical = serde_json::to_vec(self).expect("a manifest always serializes");
        let digest = Sha256::digest(&canonical);
        digest[..6].iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn path_error<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> ManifestError {
    let field = e.path().to_string();
    let field = if field == "." {
        "(document)".to_string()
    } else {
        field
    };
    let message = e.inner().to_string();
    // toml's messages carry a source excerpt after the first line; the path says where.
    let message = message
        .lines()
        .rfind(|l| !l.trim().is_empty() && !l.contains('|'))
        .unwrap_or(&message)
        .trim()
        .to_string();
    ManifestError::Parse(FieldError { field, message })
}

fn check_duration(bad: &mut impl FnMut(&str, String), field: &str, value: Duration, min: Duration) {
    if value < min || value > MAX_TIMEOUT {
        bad(
            field,
            format!(
                "{} is not between {} and {}",
                humantime::format_duration(value),
                humantime::format_duration(min),
                humantime::format_duration(MAX_TIMEOUT)
            ),
        );
    }
}

/// A function name must be a lower-case DNS label: it goes into URLs and container names.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !ok_chars
        || !name.starts_with(|c: char| c.is_ascii_lowercase())
        || name.ends_with('-')
    {
        return Err(format!(
            "`{name}` is not a lower-case DNS label: 1 to {MAX_NAME_LEN} of a-z, 0-9 and `-`, \
             starting with a letter and not ending with `-`"
        ));
    }
    Ok(())
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn valid_image_ref(image: &str) -> bool {
    !image.is_empty()
        && image.len() <= 255
        && !image.chars().any(|c| c.is_whitespace() || c.is_control())
        && !image.starts_with(['-', ':', '/', '@'])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toml(text: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse(text, Format::Toml)
    }

    fn fields(err: ManifestError) -> Vec<String> {
        err.field_errors().into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn minimal_manifest_gets_the_documented_defaults() {
        let m = toml("name = \"echo\"\nimage = \"ember/echo:latest\"").unwrap();
        assert_eq!(m.port, 8080);
        assert_eq!(m.scale.max, 4);
        assert_eq!(m.scale.concurrency, 50);
        assert_eq!(m.scale.idle_timeout, Duration::from_secs(300));
        assert_eq!(m.queue.capacity, 1000);
        assert_eq!(m.queue.timeout, Duration::from_secs(60));
        assert_eq!(m.request.max_body, ByteSize::mib(32));
        assert_eq!(m.resources.memory, ByteSize::mib(512));
        assert_eq!(m.readiness.start_timeout, Duration::from_secs(120));
    }

    #[test]
    fn full_manifest_from_the_reference_parses() {
        let m = toml(
            r#"
            name = "echo"
            image = "ember/echo:latest"
            build = "."
            port = 8080
            command = ["/echo"]
            env = { GREETING = "hi" }
            [readiness]
            http_path = "/healthz"
            start_timeout = "120s"
            [resources]
            cpus = 1.0
            memory = "512MiB"
            [scale]
            min = 0
            max = 4
            concurrency = 50
            idle_timeout = "5m"
            [queue]
            capacity = 1000
            timeout = "60s"
            [request]
            timeout = "300s"
            max_body = "32MiB"
            "#,
        )
        .unwrap();
        assert_eq!(m.env["GREETING"], "hi");
        assert_eq!(m.readiness.http_path.as_deref(), Some("/healthz"));
    }

    #[test]
    fn unknown_fields_are_errors_with_their_path() {
        let err = toml("name = \"a\"\nimage = \"x\"\n[scale]\nmaxx = 3").unwrap_err();
        let e = &err.field_errors()[0];
        assert_eq!(e.field, "scale.maxx");
        assert!(e.message.contains("unknown field `maxx`"), "{}", e.message);
    }

    #[test]
    fn wrong_types_name_the_field() {
        let err = toml("name = \"a\"\nimage = \"x\"\n[scale]\nmax = \"four\"").unwrap_err();
        assert_eq!(fields(err), ["scale.max"]);
        let err = toml("name = \"a\"\nimage = \"x\"\n[queue]\ntimeout = \"soon\"").unwrap_err();
        assert_eq!(fields(err), ["queue.timeout"]);
        let err = toml("name = \"a\"\nimage = \"x\"\n[resources]\nmemory = \"lots\"").unwrap_err();
        assert_eq!(fields(err), ["resources.memory"]);
    }

    #[test]
    fn json_manifests_parse_the_same_way() {
        let m = Manifest::parse(
            r#"{"name":"echo","image":"e:1","scale":{"idle_timeout":"2s"}}"#,
            Format::Json,
        )
        .unwrap();
        assert_eq!(m.scale.idle_timeout, Duration::from_secs(2));
        let err =
            Manifest::parse(r#"{"name":"echo","image":"e:1","prot":1}"#, Format::Json).unwrap_err();
        assert!(err.field_errors()[0]
            .message
            .contains("unknown field `prot`"));
    }

    #[test]
    fn nonsense_values_are_all_reported_at_once() {
        let err = toml(
            r#"
            name = "Echo_1"
            port = 0
            env = { PORT = "1", "1BAD" = "x" }
            [readiness]
            http_path = "healthz"
            [scale]
            min = 5
            max = 2
            concurrency = 0
            [queue]
            capacity = 0
            "#,
        )
        .unwrap_err();
        let f = fields(err);
        for expected in [
            "name",
            "image",
            "port",
            "env.PORT",
            "env.1BAD",
            "readiness.http_path",
            "scale.min",
            "scale.concurrency",
            "queue.capacity",
        ] {
            assert!(
                f.contains(&expected.to_string()),
                "{expected} missing in {f:?}"
            );
        }
    }

    #[test]
    fn names_must_be_dns_labels() {
        for good in ["a", "echo", "llm-7b", "x1"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Echo", "1abc", "a_b", "end-", &"a".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn revision_changes_with_the_manifest_and_only_then() {
        let a = toml("name = \"echo\"\nimage = \"e:1\"").unwrap();
        let same = toml("image = \"e:1\"\nname = \"echo\"\nport = 8080").unwrap();
        let changed = toml("name = \"echo\"\nimage = \"e:1\"\nenv = { A = \"1\" }").unwrap();
        assert_eq!(a.revision_id(), same.revision_id());
        assert_ne!(a.revision_id(), changed.revision_id());
        assert_eq!(a.revision_id().len(), 12);
    }

    #[test]
    fn scaling_windows_and_warm_tiers_are_checked() {
        let m = toml("name = \"a\"\nimage = \"e:1\"\n[scale]\non_idle = \"pause\"\nkeep_alive = \"adaptive\"")
            .unwrap();
        assert_eq!(m.scale.on_idle, OnIdle::Pause);
        assert_eq!(m.scale.keep_alive, KeepAliveKind::Adaptive);
        assert_eq!(m.scale.stable_window, Duration::from_secs(60));
        let err = toml(
            "name = \"a\"\nimage = \"e:1\"\n[scale]\ntarget_utilization = 1.5\npanic_window = \"2m\"\npanic_threshold = 0.5",
        )
        .unwrap_err();
        let f = fields(err);
        for field in [
            "scale.target_utilization",
            "scale.panic_window",
            "scale.panic_threshold",
        ] {
            assert!(f.contains(&field.to_string()), "{field} in {f:?}");
        }
    }

    #[test]
    fn gpu_sections_parse_with_defaults() {
        let m = toml("name = \"g\"\nimage = \"e:1\"\n[gpu]\nmodels = [\"A100\"]").unwrap();
        let gpu = m.gpu.unwrap();
        assert_eq!(gpu.count, 1);
        assert_eq!(gpu.sharing, Sharing::Exclusive);
        let m = toml(
            "name = \"g\"\nimage = \"e:1\"\n[gpu]\nsharing = \"mig\"\nmig_profile = \"3g.40gb\"",
        )
        .unwrap();
        assert_eq!(m.gpu.unwrap().mig_profile.as_deref(), Some("3g.40gb"));
    }

    #[test]
    fn gpu_combinations_that_make_no_sense_are_refused_with_their_path() {
        let cases = [
            ("sharing = \"shared\"", "gpu.memory"),
            ("sharing = \"mig\"", "gpu.mig_profile"),
            (
                "sharing = \"mig\"\nmig_profile = \"big\"",
                "gpu.mig_profile",
            ),
            (
                "sharing = \"mig\"\nmig_profile = \"1g.10gb\"\ncount = 2",
                "gpu.count",
            ),
            (
                "sharing = \"mig\"\nmig_profile = \"1g.10gb\"\nmemory = \"5GiB\"",
                "gpu.memory",
            ),
            ("mig_profile = \"1g.10gb\"", "gpu.mig_profile"),
            ("count = 0", "gpu.count"),
            ("count = 17", "gpu.count"),
            ("models = [\"\"]", "gpu.models"),
            ("sharing = \"sliced\"", "gpu.sharing"),
        ];
        for (section, field) in cases {
            let err = toml(&format!("name = \"g\"\nimage = \"e:1\"\n[gpu]\n{section}"))
                .expect_err(section);
            assert!(
                fields(err).contains(&field.to_string()),
                "{section}: expected {field}"
            );
        }
    }

    #[test]
    fn a_manifest_without_gpu_keeps_its_revision_id() {
        let m = toml("name = \"echo\"\nimage = \"e:1\"").unwrap();
        let json = serde_json::to_string(&m).unwrap();
        assert!(!json.contains("gpu"), "{json}");
    }

    #[test]
    fn build_without_image_is_accepted() {
        let m = toml("name = \"echo\"\nbuild = \".\"").unwrap();
        assert_eq!(m.build.as_deref(), Some("."));
        assert!(m.image.is_none());
    }
}
