//! The function manifest: what a user writes in `ember.toml` (or sends as JSON).
//!
//! This module owns the manifest types, their defaults, parsing from TOML and JSON
//! (parse errors carry the field path through `serde_path_to_error`), semantic
//! validation (every error names its field path and what was expected), and the
//! revision id, a hash of the validated manifest. It knows nothing of Docker or HTTP.
//!
//! # Layout
//! One file per section, each with its types, defaults, limits and `validate`:
//! - `mod.rs`: [`Manifest`] and its top-level fields (name, image/build/dockerfile, port,
//!   command), parsing, the revision id, errors and shared checks.
//! - `env.rs`: `env`, [`EnvValue`] (a string, or a secret's name).
//! - `volumes.rs`: `[[volumes]]`, [`Volume`] (node volumes and Docker named volumes).
//! - `readiness.rs`: `[readiness]`, [`Readiness`].
//! - `resources.rs`: `[resources]`, [`Resources`].
//! - `scale.rs`: `[scale]`, [`Scale`], [`OnIdle`], [`KeepAliveKind`].
//! - `request.rs`: `[queue]` and `[request]`, [`Queue`], [`RequestLimits`].
//! - `gpu.rs`: `[gpu]`, [`GpuSpec`], [`Sharing`].
//! - `access.rs`: `[access]`, [`Access`] (public or private).
//! - `openai.rs`: `[openai]`, [`OpenAi`] (model ids behind the OpenAI-compatible front door).
//! - `size.rs`: how sizes are written, so that they read back exactly.
//! - `tests.rs`: manifest-wide tests and the revision-id golden values.
//!
//! # Revision ids
//! A revision id is a hash of the manifest's serialised JSON, so it changes whenever a
//! serialised field changes, including when a new Ember version starts serialising a
//! field the user never wrote. That would give every deployed function a new revision
//! on upgrade and roll all its instances. Hence the rule: **every field or section added
//! from now on is skipped when serialising at its default**, with
//! `#[serde(default, skip_serializing_if = "...")]`: an `Option` with `Option::is_none`,
//! or a field with a default and `is_default` (below). A manifest that does not use the new
//! field then hashes exactly as before. The tests pin today's ids and today's keys of a
//! minimal manifest; the ids also depend on how `bytesize` and `humantime` print values
//! (sizes as `size.rs` writes them), so a change there shows up in those tests too.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod access;
mod comfyui;
mod env;
mod gpu;
mod image;
mod jobs;
mod openai;
mod readiness;
mod request;
mod resources;
mod scale;
mod size;
mod volumes;

pub use crate::model::FieldError;
pub use access::Access;
pub use comfyui::ComfyUi;
pub use env::{check_secret_name, EnvValue, MAX_SECRET_NAME_LEN};
pub use gpu::{GpuSpec, Sharing, MAX_GPUS};
pub use image::{valid_image_ref, MAX_IMAGE_REF_LEN};
pub use jobs::{Batch, Jobs, DEFAULT_MAX_ATTEMPTS};
pub use openai::{check_model_id, Models, OpenAi, Routing, DEFAULT_LOAD_FACTOR};
pub use readiness::Readiness;
pub use request::{Queue, RequestLimits, MAX_BODY_LIMIT, MAX_QUEUE_CAPACITY};
pub use resources::{Resources, MAX_MEMORY, MIN_MEMORY};
pub use scale::{KeepAliveKind, OnIdle, Scale, MAX_CONCURRENCY, MAX_SCALE};
pub use volumes::{check_volume_name, Volume, VolumeSource, MAX_VOLUMES};

/// Longest function name: a DNS label.
pub const MAX_NAME_LEN: usize = 63;
/// Longest time any of the manifest's timeouts may be set to.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// A function manifest, as deployed. Every field but `name` and `image`/`build` has a default.
///
/// Fields and sections added from now on must be skipped when serialising at their
/// default (see [Revision ids](self#revision-ids)).
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// Extra environment variables: plain values, or secrets by name.
    #[serde(default, skip_serializing_if = "is_default")]
    pub env: BTreeMap<String, EnvValue>,
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
    /// Who may invoke the function; absent: anyone (public).
    #[serde(default, skip_serializing_if = "is_default")]
    pub access: Access,
    /// Directories of the node mounted into each instance.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// The model ids the function serves behind `/v1/...`; absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openai: Option<OpenAi>,
    /// Marks the function as a pool of ComfyUI servers behind `/comfy/NAME/...`; absent: not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comfyui: Option<ComfyUi>,
    /// How it takes durable jobs; absent: the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<Jobs>,
}

fn default_port() -> u16 {
    8080
}

/// Whether a value is its type's default: the `skip_serializing_if` for defaulted fields,
/// so that adding one keeps every existing revision id (see [Revision ids](self#revision-ids)).
pub(crate) fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
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

    /// Checks every value; returns all problems at once, in field order.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let mut errors = Vec::new();
        let mut bad = |field: &str, message: String| {
            errors.push(FieldError {
                field: field.to_string(),
                message,
            })
        };
        self.validate_source(&mut bad);
        self.validate_process(&mut bad);
        env::validate(&self.env, &mut bad);
        volumes::validate(&self.volumes, &mut bad);
        self.readiness.validate(&mut bad);
        self.resources.validate(&mut bad);
        self.scale.validate(&mut bad);
        self.queue.validate(&mut bad);
        self.request.validate(&mut bad);
        if let Some(gpu) = &self.gpu {
            gpu.validate(&mut bad);
        }
        if let Some(openai) = &self.openai {
            openai.validate(&mut bad);
        }
        if let Some(comfyui) = &self.comfyui {
            comfyui.validate(self.scale.concurrency, &mut bad);
        }
        if let Some(jobs) = &self.jobs {
            jobs.validate(self.scale.concurrency, &mut bad);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ManifestError::Invalid(errors))
        }
    }

    /// The name and where the image comes from: `image`, `build`, `dockerfile`.
    fn validate_source(&self, bad: &mut impl FnMut(&str, String)) {
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
                format!(
                    "`{image}` is not an image reference Docker accepts: \
                     `[registry[:port]/]name[:tag][@digest]`, the name in lower case \
                     (e.g. `ghcr.io/team/model:v1`)"
                ),
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
    }

    /// What the container's process gets: `port`, `command`.
    fn validate_process(&self, bad: &mut impl FnMut(&str, String)) {
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
    }

    /// Every secret the manifest names, each with the field that names it
    /// (`env.VAR.secret`, `jobs.callback_secret`): what a deploy checks is set, and what
    /// keeps a secret from being removed.
    pub fn named_secrets(&self) -> Vec<(String, &str)> {
        let mut named: Vec<(String, &str)> = self
            .secret_refs()
            .map(|(var, s)| (format!("env.{var}.secret"), s))
            .collect();
        if let Some(s) = self
            .jobs
            .as_ref()
            .and_then(|j| j.callback_secret.as_deref())
        {
            named.push(("jobs.callback_secret".into(), s));
        }
        named
    }

    /// The secrets the manifest names, each with the variable it fills.
    pub fn secret_refs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.env
            .iter()
            .filter_map(|(k, v)| v.secret().map(|s| (k.as_str(), s)))
    }

    /// The revision id: a short hash of the manifest's canonical JSON form, so the same
    /// manifest always gives the same revision and any change gives a new one.
    ///
    /// The id is the first 6 bytes, in hex, of the SHA-256 of `serde_json` of the manifest.
    /// Ids of deployed functions must survive Ember upgrades, so every field or section
    /// added from now on must be skipped when serialising at its default
    /// (`#[serde(default, skip_serializing_if = "Option::is_none")]` or
    /// `skip_serializing_if = "is_default"`); see [Revision ids](self#revision-ids).
    pub fn revision_id(&self) -> String {
        let canonical = serde_json::to_vec(self).expect("a manifest always serializes");
        let digest = Sha256::digest(&canonical);
        digest[..6].iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn path_error<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> ManifestError {
    // The root prints as `.`, and a top-level key that is empty as nothing at all.
    let field = match e.path().to_string() {
        root if root == "." => "(document)".to_string(),
        empty if empty.is_empty() => "\"\"".to_string(),
        field => field,
    };
    let message = e.inner().to_string();
    // toml's messages carry a source excerpt (`  |`, `3 | text`) after the first line; the
    // path says where. The message itself may hold a `|`, as in a value quoted back.
    let excerpt = |l: &str| {
        l.trim_start()
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .trim_start()
            .starts_with('|')
    };
    let message = message
        .lines()
        .rfind(|l| !l.trim().is_empty() && !excerpt(l))
        .unwrap_or(&message)
        .trim()
        .to_string();
    ManifestError::Parse(FieldError { field, message })
}

/// Reports `field` unless `value` lies between `min` and [`MAX_TIMEOUT`].
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

#[cfg(test)]
mod test_support {
    use super::{Format, Manifest, ManifestError};

    pub(super) fn toml(text: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse(text, Format::Toml)
    }

    pub(super) fn fields(err: ManifestError) -> Vec<String> {
        err.field_errors().into_iter().map(|e| e.field).collect()
    }
}

#[cfg(test)]
mod tests;

/// A name of `kind` (a secret, a node volume): 1 to `max` of a-z, 0-9, `-`, `_` and `.`,
/// starting with a letter or digit.
fn check_lower_name(kind: &str, max: usize, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a {kind} name: 1 to {max} of a-z, 0-9, `-`, `_` and `.`, starting with a letter or digit"
        ))
    }
}
