//! A declared GPU inventory: a TOML list of GPUs for nodes in simulation mode and tests.
//!
//! ```toml
//! [[gpu]]
//! name = "NVIDIA A100-SXM4-80GB"
//! uuid = "GPU-…"
//! memory = "80GiB"
//! used = "0GiB"            # optional: memory used by others, as NVML would report it
//! utilization = 0          # optional: percent
//! [[gpu.mig]]              # optional; present means MIG mode is on for this GPU
//! uuid = "MIG-…"
//! profile = "3g.40gb"
//! memory = "40GiB"
//! ```

use std::collections::HashSet;
use std::path::Path;

use bytesize::ByteSize;
use serde::Deserialize;

use super::{GpuError, GpuInfo, GpuInventory, MigInstance};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    gpu: Vec<DeclaredGpu>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeclaredGpu {
    name: String,
    uuid: String,
    memory: ByteSize,
    #[serde(default)]
    used: Option<ByteSize>,
    #[serde(default)]
    utilization: Option<f64>,
    #[serde(default)]
    mig: Vec<DeclaredMig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeclaredMig {
    uuid: String,
    profile: String,
    memory: ByteSize,
}

/// GPUs read once from a file.
#[derive(Debug, Clone)]
pub struct DeclaredInventory {
    path: String,
    gpus: Vec<GpuInfo>,
}

impl DeclaredInventory {
    /// Reads and checks the file.
    pub fn load(path: &Path) -> Result<DeclaredInventory, GpuError> {
        let text = std::fs::read_to_string(path).map_err(|e| GpuError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// Parses and checks inventory text; `path` names it in errors.
    pub fn parse(path: &str, text: &str) -> Result<DeclaredInventory, GpuError> {
        let invalid = |problems| GpuError::Invalid {
            path: path.to_string(),
            problems,
        };
        let de = toml::Deserializer::parse(text)
            .map_err(|e| invalid(vec![e.message().trim().to_string()]))?;
        let file: File = serde_path_to_error::deserialize(de)
            .map_err(|e| invalid(vec![format!("{}: {}", e.path(), e.inner().message())]))?;
        let mut problems = Vec::new();
        let mut seen = HashSet::new();
        for (i, g) in file.gpu.iter().enumerate() {
            let at = format!("gpu[{i}]");
            if !g.uuid.starts_with("GPU-") {
                problems.push(format!("{at}.uuid: `{}` must start with `GPU-`", g.uuid));
            }
            if !seen.insert(g.uuid.clone()) {
                problems.push(format!("{at}.uuid: `{}` appears twice", g.uuid));
            }
            if g.memory.as_u64() == 0 {
                problems.push(format!("{at}.memory: must be more than 0"));
            }
            if g.used.is_some_and(|u| u > g.memory) {
                problems.push(format!("{at}.used: more than the GPU's memory"));
            }
            if g.utilization.is_some_and(|u| !(0.0..=100.0).contains(&u)) {
                problems.push(format!("{at}.utilization: expected a percent, 0 to 100"));
            }
            let mut mig_total = 0;
            for (j, m) in g.mig.iter().enumerate() {
                let at = format!("{at}.mig[{j}]");
                if !m.uuid.starts_with("MIG-") {
                    problems.push(format!("{at}.uuid: `{}` must start with `MIG-`", m.uuid));
                }
                if !seen.insert(m.uuid.clone()) {
                    problems.push(format!("{at}.uuid: `{}` appears twice", m.uuid));
                }
                if m.profile.trim().is_empty() {
                    problems.push(format!("{at}.profile: expected a profile like `3g.40gb`"));
                }
                mig_total += m.memory.as_u64();
            }
            if mig_total > g.memory.as_u64() {
                problems.push(format!(
                    "{at}.mig: its instances add up to more memory than the GPU has"
                ));
            }
        }
        if !problems.is_empty() {
            return Err(invalid(problems));
        }
        let gpus = file
            .gpu
            .into_iter()
            .enumerate()
            .map(|(i, g)| GpuInfo {
                index: i as u32,
                uuid: g.uuid,
                name: g.name,
                memory_total: g.memory.as_u64(),
                memory_used: g.used.map_or(0, |u| u.as_u64()),
                utilization: Some(g.utilization.unwrap_or(0.0)),
                processes: Vec::new(),
                mig_enabled: !g.mig.is_empty(),
                mig: g
                    .mig
                    .into_iter()
                    .map(|m| MigInstance {
                        uuid: m.uuid,
                        profile: m.profile,
                        memory_total: m.memory.as_u64(),
                        memory_used: 0,
                    })
                    .collect(),
            })
            .collect();
        Ok(DeclaredInventory {
            path: path.to_string(),
            gpus,
        })
    }
}

impl GpuInventory for DeclaredInventory {
    fn source(&self) -> String {
        format!("declared {}", self.path)
    }

    fn read(&self) -> Result<Vec<GpuInfo>, GpuError> {
        Ok(self.gpus.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIXED: &str = r#"
        [[gpu]]
        name = "NVIDIA A100-SXM4-80GB"
        uuid = "GPU-a"
        memory = "80GiB"
        [[gpu]]
        name = "NVIDIA A100-SXM4-80GB"
        uuid = "GPU-b"
        memory = "80GiB"
        [[gpu.mig]]
        uuid = "MIG-b1"
        profile = "3g.40gb"
        memory = "40GiB"
        [[gpu.mig]]
        uuid = "MIG-b2"
        profile = "3g.40gb"
        memory = "40GiB"
        [[gpu]]
        name = "NVIDIA GeForce RTX 4090"
        uuid = "GPU-c"
        memory = "24GiB"
        used = "2GiB"
    "#;

    #[test]
    fn a_mixed_inventory_reads_with_mig_mode_from_its_instances() {
        let inv = DeclaredInventory::parse("t.toml", MIXED).unwrap();
        let gpus = inv.read().unwrap();
        assert_eq!(gpus.len(), 3);
        assert!(!gpus[0].mig_enabled);
        assert!(gpus[1].mig_enabled);
        assert_eq!(gpus[1].mig[1].uuid, "MIG-b2");
        assert_eq!(gpus[2].memory_used, 2 << 30);
        assert_eq!(gpus[2].index, 2);
    }

    #[test]
    fn bad_inventories_name_every_problem_with_its_path() {
        let err = DeclaredInventory::parse(
            "t.toml",
            r#"
            [[gpu]]
            name = "x"
            uuid = "a"
            memory = "1GiB"
            [[gpu.mig]]
            uuid = "GPU-x"
            profile = ""
            memory = "2GiB"
            "#,
        )
        .unwrap_err()
        .to_string();
        for expected in [
            "gpu[0].uuid",
            "gpu[0].mig[0].uuid",
            "gpu[0].mig[0].profile",
            "gpu[0].mig: its instances add up",
        ] {
            assert!(err.contains(expected), "{expected} missing in {err}");
        }
        let err = DeclaredInventory::parse("t.toml", "[[gpu]]\nname = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("gpu[0].name"), "{err}");
    }
}
