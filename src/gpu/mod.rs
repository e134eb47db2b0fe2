//! GPU inventory: what GPUs (and MIG instances) a node has, how much of their memory is
//! used, and how busy they are.
//!
//! `GpuInventory` is the seam: `nvml.rs` reads real GPUs through nvml-wrapper (the only
//! place NVML is touched), `declared.rs` reads a list from a TOML file for nodes in
//! simulation mode and for tests. `GpuMonitor` wraps either one, smooths utilisation over
//! time, and turns failures into one clear warning and an empty list instead of a crash.

pub mod declared;
pub mod nvml;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub use declared::DeclaredInventory;
pub use nvml::NvmlInventory;

/// Weight of a new utilisation sample in the moving average.
pub const UTILIZATION_ALPHA: f64 = 0.3;

/// One GPU as a node sees it.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// Index on the node.
    pub index: u32,
    /// `GPU-…` UUID.
    pub uuid: String,
    /// Model name, e.g. `NVIDIA A100-SXM4-80GB`.
    pub name: String,
    /// Total memory in bytes.
    pub memory_total: u64,
    /// Used memory in bytes (by anything, Ember's instances included).
    pub memory_used: u64,
    /// Utilisation in percent, smoothed; `None` when unknown.
    pub utilization: Option<f64>,
    /// Compute processes on it.
    #[serde(default)]
    pub processes: Vec<GpuProcess>,
    /// Whether MIG mode is on (then only its MIG instances can be handed out).
    pub mig_enabled: bool,
    /// MIG instances.
    #[serde(default)]
    pub mig: Vec<MigInstance>,
}

/// Every device id `gpus` can hand out: GPU UUIDs and MIG UUIDs.
pub fn device_ids(gpus: &[GpuInfo]) -> std::collections::HashSet<String> {
    gpus.iter()
        .flat_map(|g| std::iter::once(&g.uuid).chain(g.mig.iter().map(|m| &m.uuid)))
        .cloned()
        .collect()
}

/// A process using a GPU.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuProcess {
    /// Host process id.
    pub pid: u32,
    /// GPU memory it uses, when the driver says.
    pub memory_used: Option<u64>,
}

/// A MIG instance of a GPU.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigInstance {
    /// `MIG-…` UUID.
    pub uuid: String,
    /// Profile, e.g. `3g.40gb`.
    pub profile: String,
    /// Its memory in bytes.
    pub memory_total: u64,
    /// Used memory in bytes.
    #[serde(default)]
    pub memory_used: u64,
}

/// GPU inventory failures.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// NVML could not be loaded or initialised (no driver, no GPU, no libnvidia-ml).
    #[error("NVML is unavailable: {0}")]
    NvmlUnavailable(String),
    /// An NVML query failed.
    #[error("NVML query `{query}` failed: {reason}")]
    Nvml {
        /// The query.
        query: &'static str,
        /// NVML's words.
        reason: String,
    },
    /// The declared inventory file cannot be read.
    #[error("cannot read the GPU inventory {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The declared inventory is invalid.
    #[error("the GPU inventory {path} is invalid:\n  {}", .problems.join("\n  "))]
    Invalid {
        /// The file.
        path: String,
        /// Each problem, with its field path.
        problems: Vec<String>,
    },
}

/// A source of GPU facts.
pub trait GpuInventory: Send + Sync + 'static {
    /// Where the facts come from (`nvml`, `declared FILE`).
    fn source(&self) -> String;
    /// The GPUs now. Blocking: call it off the async runtime.
    fn read(&self) -> Result<Vec<GpuInfo>, GpuError>;
}

/// How containers are given their GPUs.
#[derive(
    utoipa::ToSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum GpuDriver {
    /// No device request; only `NVIDIA_VISIBLE_DEVICES` and `EMBER_GPU_UUIDS` are set.
    Simulated,
    /// A Docker device request with driver `nvidia` and the slot UUIDs.
    Nvidia,
    /// A Docker device request with CDI device names (`nvidia.com/gpu=UUID`).
    Cdi,
}

impl std::fmt::Display for GpuDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GpuDriver::Simulated => "simulated",
            GpuDriver::Nvidia => "nvidia",
            GpuDriver::Cdi => "cdi",
        })
    }
}

/// An inventory with smoothing and failure handling, shared by a node.
#[derive(Clone)]
pub struct GpuMonitor {
    inventory: Option<Arc<dyn GpuInventory>>,
    state: Arc<Mutex<MonitorState>>,
}

#[derive(Default)]
struct MonitorState {
    smoothed: HashMap<String, f64>,
    last: Vec<GpuInfo>,
    warned: bool,
}

impl GpuMonitor {
    /// A monitor over `inventory`; `None` means a node without GPUs.
    pub fn new(inventory: Option<Arc<dyn GpuInventory>>) -> GpuMonitor {
        GpuMonitor {
            inventory,
            state: Arc::default(),
        }
    }

    /// The GPU source and driver of a node: a declared inventory (simulation unless told
    /// otherwise), else NVML (nvidia); without NVML, one clear warning and no GPUs.
    pub fn setup(
        inventory: Option<&std::path::Path>,
        driver: Option<GpuDriver>,
    ) -> Result<(GpuMonitor, GpuDriver), GpuError> {
        if let Some(path) = inventory {
            let declared = DeclaredInventory::load(path)?;
            let driver = driver.unwrap_or(GpuDriver::Simulated);
            return Ok((GpuMonitor::new(Some(Arc::new(declared))), driver));
        }
        let driver = driver.unwrap_or(GpuDriver::Nvidia);
        match NvmlInventory::new() {
            Ok(nvml) => Ok((GpuMonitor::new(Some(Arc::new(nvml))), driver)),
            Err(e) => {
                tracing::warn!(error = %e, "no GPUs on this node: functions with a [gpu] section cannot run here");
                Ok((GpuMonitor::new(None), driver))
            }
        }
    }

    /// Where the facts come from.
    pub fn source(&self) -> String {
        self.inventory
            .as_ref()
            .map_or_else(|| "none".to_string(), |i| i.source())
    }

    /// Reads the inventory (off the runtime), smooths utilisation, and on failure warns once
    /// and answers with the last good list.
    pub async fn read(&self) -> Vec<GpuInfo> {
        let Some(inventory) = self.inventory.clone() else {
            return Vec::new();
        };
        let result = tokio::task::spawn_blocking(move || inventory.read())
            .await
            .unwrap_or_else(|e| {
                Err(GpuError::Nvml {
                    query: "read",
                    reason: e.to_string(),
                })
            });
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(mut gpus) => {
                for gpu in &mut gpus {
                    if let Some(sample) = gpu.utilization {
                        let avg = st.smoothed.entry(gpu.uuid.clone()).or_insert(sample);
                        *avg = smooth(*avg, sample);
                        gpu.utilization = Some(*avg);
                    }
                }
                st.warned = false;
                st.last = gpus.clone();
                gpus
            }
            Err(e) => {
                if !st.warned {
                    tracing::warn!(source = %self.source(), error = %e, "cannot read GPUs; keeping the last known list");
                    st.warned = true;
                }
                st.last.clone()
            }
        }
    }
}

/// One step of the exponential moving average of utilisation.
pub fn smooth(previous: f64, sample: f64) -> f64 {
    previous + UTILIZATION_ALPHA * (sample - previous)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scripted(Mutex<Vec<Result<Vec<GpuInfo>, GpuError>>>);

    impl GpuInventory for Scripted {
        fn source(&self) -> String {
            "scripted".into()
        }
        fn read(&self) -> Result<Vec<GpuInfo>, GpuError> {
            self.0.lock().unwrap().remove(0)
        }
    }

    fn gpu(util: f64) -> GpuInfo {
        GpuInfo {
            index: 0,
            uuid: "GPU-1".into(),
            name: "T".into(),
            memory_total: 1,
            memory_used: 0,
            utilization: Some(util),
            processes: vec![],
            mig_enabled: false,
            mig: vec![],
        }
    }

    #[tokio::test]
    async fn utilisation_is_smoothed_and_failures_keep_the_last_list() {
        let script = Scripted(Mutex::new(vec![
            Ok(vec![gpu(0.0)]),
            Ok(vec![gpu(100.0)]),
            Err(GpuError::Nvml {
                query: "x",
                reason: "gone".into(),
            }),
        ]));
        let m = GpuMonitor::new(Some(Arc::new(script)));
        assert_eq!(m.read().await[0].utilization, Some(0.0));
        let second = m.read().await[0].utilization.unwrap();
        assert!(
            (second - 30.0).abs() < 1e-9,
            "a spike moves the average by alpha: {second}"
        );
        assert_eq!(
            m.read().await[0].utilization,
            Some(second),
            "the last list survives a failure"
        );
    }

    #[tokio::test]
    async fn a_node_without_inventory_has_no_gpus() {
        assert!(GpuMonitor::new(None).read().await.is_empty());
    }
}
