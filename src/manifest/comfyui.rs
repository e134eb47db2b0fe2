//! The `[comfyui]` section: the function is a pool of ComfyUI servers behind the
//! gateway's ComfyUI front door (`/comfy/NAME/...`), which queues prompts itself and sends
//! each to an idle instance, one at a time.
//!
//! ```toml
//! [comfyui]
//! keep = "7d"            # how long finished prompts, their outputs and uploads are kept
//! keep_bytes = "10GiB"   # most bytes of outputs and uploads kept; the oldest go first
//!
//! [scale]
//! concurrency = 1        # required: a ComfyUI server runs one prompt at a time
//! ```

use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// Default retention of finished prompts, their outputs and uploads.
pub const DEFAULT_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default bound on the bytes of outputs and uploads kept per function.
pub const DEFAULT_KEEP_BYTES: ByteSize = ByteSize::gib(10);
/// Shortest retention accepted: a client must be able to fetch what a prompt made.
pub const MIN_KEEP: Duration = Duration::from_secs(60);
/// Longest retention accepted.
pub const MAX_KEEP: Duration = Duration::from_secs(365 * 24 * 3600);

/// The `[comfyui]` section.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComfyUi {
    /// How long a finished prompt's history, outputs, and the uploads are kept.
    #[serde(
        default = "default_keep",
        with = "humantime_serde",
        skip_serializing_if = "is_default_keep"
    )]
    #[schema(value_type = String, example = "7d")]
    pub keep: Duration,
    /// Most bytes of outputs and uploads kept; beyond it the oldest prompts' go first.
    #[serde(
        default = "default_keep_bytes",
        skip_serializing_if = "is_default_keep_bytes",
        serialize_with = "super::size::serialize"
    )]
    #[schema(value_type = String, example = "64MiB")]
    pub keep_bytes: ByteSize,
}

impl Default for ComfyUi {
    fn default() -> Self {
        ComfyUi {
            keep: DEFAULT_KEEP,
            keep_bytes: DEFAULT_KEEP_BYTES,
        }
    }
}

fn default_keep() -> Duration {
    DEFAULT_KEEP
}
fn is_default_keep(d: &Duration) -> bool {
    *d == DEFAULT_KEEP
}
fn default_keep_bytes() -> ByteSize {
    DEFAULT_KEEP_BYTES
}
fn is_default_keep_bytes(b: &ByteSize) -> bool {
    *b == DEFAULT_KEEP_BYTES
}

impl ComfyUi {
    /// Checks the section against the function's per-instance concurrency.
    pub(super) fn validate(&self, concurrency: u32, bad: &mut impl FnMut(&str, String)) {
        if self.keep < MIN_KEEP || self.keep > MAX_KEEP {
            bad(
                "comfyui.keep",
                format!(
                    "must be between 1m and 365d (how long finished prompts and their \
                     outputs are kept), got {}",
                    humantime::format_duration(self.keep)
                ),
            );
        }
        if self.keep_bytes < ByteSize::mib(1) {
            bad(
                "comfyui.keep_bytes",
                format!(
                    "must be at least 1MiB (the outputs and uploads kept), got {}",
                    self.keep_bytes
                ),
            );
        }
        if concurrency != 1 {
            bad(
                "scale.concurrency",
                format!(
                    "a ComfyUI server runs one prompt at a time, so a `[comfyui]` function \
                     needs `concurrency = 1` in `[scale]` (got {concurrency}); more prompts \
                     at once come from more instances (`scale.max`)"
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::manifest::{Format, Manifest};

    #[test]
    fn a_comfyui_function_runs_one_prompt_per_instance_and_keeps_outputs_a_while() {
        let ok = "name = \"c\"\nimage = \"c:1\"\n[comfyui]\n[scale]\nconcurrency = 1\n";
        let m = Manifest::parse(ok, Format::Toml).unwrap();
        let c = m.comfyui.as_ref().unwrap();
        assert_eq!(c.keep, super::DEFAULT_KEEP);
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"comfyui\":{}"), "{json}");

        let text =
            "name = \"c\"\nimage = \"c:1\"\n[comfyui]\nkeep = \"1s\"\nkeep_bytes = \"1KiB\"\n";
        let errors = Manifest::parse(text, Format::Toml)
            .unwrap_err()
            .field_errors();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["comfyui.keep", "comfyui.keep_bytes", "scale.concurrency"]
        );
        assert!(errors[2].message.contains("concurrency = 1"));
    }
}
