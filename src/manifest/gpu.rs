//! The `[gpu]` section: how many GPUs an instance needs, how it holds them (whole,
//! time-shared or a MIG instance) and which GPUs qualify. It checks the section's own
//! combinations; whether a node can satisfy them is the scheduler's business.

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// Most GPUs one instance may ask for.
pub const MAX_GPUS: u32 = 16;

pub use crate::model::Sharing;

/// The `[gpu]` section.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSpec {
    /// GPUs (or MIG instances) per instance.
    #[serde(default = "default_gpu_count")]
    pub count: u32,
    /// GPU memory per GPU the instance uses; required when `sharing = "shared"`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "super::size::serialize_opt"
    )]
    #[schema(value_type = Option<String>, example = "64MiB")]
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
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "super::size::serialize_opt"
    )]
    #[schema(value_type = Option<String>, example = "64MiB")]
    pub min_memory: Option<ByteSize>,
}

fn default_gpu_count() -> u32 {
    1
}

impl GpuSpec {
    /// Reports every problem in the section, each at its `gpu.` field path.
    pub(super) fn validate(&self, bad: &mut impl FnMut(&str, String)) {
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
            Sharing::Mig => self.validate_mig(bad),
            _ => {}
        }
        if self.sharing != Sharing::Mig && self.mig_profile.is_some() {
            bad("gpu.mig_profile", "only with sharing = \"mig\"".into());
        }
    }

    /// What `sharing = "mig"` requires: a valid profile, one instance, no `memory`.
    fn validate_mig(&self, bad: &mut impl FnMut(&str, String)) {
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
                "must be 1 with sharing = \"mig\": CUDA uses one MIG instance per process".into(),
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
}

/// A MIG profile name: `<slices>g.<memory>gb`, e.g. `1g.10gb`.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::test_support::{fields, toml};

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
    fn mig_profiles_are_slices_and_gigabytes() {
        for good in ["1g.10gb", "3g.40gb", "7g.80gb"] {
            assert!(valid_mig_profile(good), "{good}");
        }
        for bad in ["big", "g.10gb", "1g.gb", "1g.10GB", "1g.10", "xg.10gb"] {
            assert!(!valid_mig_profile(bad), "{bad}");
        }
    }

    #[test]
    fn a_manifest_without_gpu_keeps_its_revision_id() {
        let m = toml("name = \"echo\"\nimage = \"e:1\"").unwrap();
        let json = serde_json::to_string(&m).unwrap();
        assert!(!json.contains("gpu"), "{json}");
    }
}
