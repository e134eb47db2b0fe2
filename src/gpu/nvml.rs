//! Real GPUs through NVML (nvml-wrapper). The only module that touches NVML.
//!
//! nvml-wrapper loads `libnvidia-ml.so` at run time, so this builds and runs on machines
//! without a GPU: `NvmlInventory::new` fails there with a message saying what is missing.
//! The conversions from NVML's raw values are plain functions, unit-tested without a GPU.
#![allow(clippy::disallowed_types)] // the one module that may hold this crate's types

use nvml_wrapper::enum_wrappers::device::Brand;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};

use super::{GpuError, GpuInfo, GpuInventory, GpuProcess, MigInstance};

/// NVML's MIG mode value for "enabled".
const MIG_ENABLED: u32 = 1;

/// GPUs read through NVML.
pub struct NvmlInventory {
    nvml: Nvml,
}

impl NvmlInventory {
    /// Loads and initialises NVML.
    pub fn new() -> Result<NvmlInventory, GpuError> {
        Nvml::init()
            .map(|nvml| NvmlInventory { nvml })
            .map_err(|e| GpuError::NvmlUnavailable(unavailable_hint(&e)))
    }
}

fn unavailable_hint(e: &NvmlError) -> String {
    match e {
        NvmlError::LibloadingError(_) => format!(
            "{e} (libnvidia-ml.so is not installed: this machine has no NVIDIA driver; \
             declare GPUs with --gpu-inventory FILE to simulate them)"
        ),
        NvmlError::DriverNotLoaded => format!("{e} (the NVIDIA kernel driver is not loaded)"),
        _ => e.to_string(),
    }
}

fn query(name: &'static str) -> impl FnOnce(NvmlError) -> GpuError {
    move |e| GpuError::Nvml {
        query: name,
        reason: e.to_string(),
    }
}

/// NVML's per-process memory, when it is reported.
pub fn process_memory(used: &UsedGpuMemory) -> Option<u64> {
    match used {
        UsedGpuMemory::Used(bytes) => Some(*bytes),
        UsedGpuMemory::Unavailable => None,
    }
}

/// The profile name of a MIG instance, as `nvidia-smi` prints it: GPU slices and memory
/// in GB rounded up (`3g.40gb` for 3 slices and 40 192 MiB).
pub fn mig_profile_name(gpu_slices: u32, memory_mib: u64) -> String {
    format!("{gpu_slices}g.{}gb", memory_mib.div_ceil(1024))
}

/// Whether NVML's MIG mode value means enabled.
pub fn mig_enabled(current: u32) -> bool {
    current == MIG_ENABLED
}

fn read_mig(device: &Device) -> Result<Vec<MigInstance>, GpuError> {
    let max = device
        .mig_device_count()
        .map_err(query("mig_device_count"))?;
    let mut out = Vec::new();
    for i in 0..max {
        // Empty slots answer NotFound; they are not instances.
        let Ok(mig) = device.mig_device_by_index(i) else {
            continue;
        };
        let uuid = mig.uuid().map_err(query("mig uuid"))?;
        let memory = mig.memory_info().map_err(query("mig memory_info"))?;
        let profile = match mig.attributes() {
            Ok(a) => mig_profile_name(a.gpu_instance_slice_count, a.memory_size_mb),
            Err(_) => mig_profile_name(0, memory.total >> 20),
        };
        out.push(MigInstance {
            uuid,
            profile,
            memory_total: memory.total,
            memory_used: memory.used,
        });
    }
    Ok(out)
}

impl GpuInventory for NvmlInventory {
    fn source(&self) -> String {
        "nvml".into()
    }

    fn read(&self) -> Result<Vec<GpuInfo>, GpuError> {
        let count = self.nvml.device_count().map_err(query("device_count"))?;
        let mut gpus = Vec::with_capacity(count as usize);
        for i in 0..count {
            let device = self
                .nvml
                .device_by_index(i)
                .map_err(query("device_by_index"))?;
            let memory = device.memory_info().map_err(query("memory_info"))?;
            let mig_on = device
                .mig_mode()
                .map(|m| mig_enabled(m.current))
                .unwrap_or(false);
            let processes = device
                .running_compute_processes()
                .map(|ps| {
                    ps.iter()
                        .map(|p| GpuProcess {
                            pid: p.pid,
                            memory_used: process_memory(&p.used_gpu_memory),
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut name = device.name().map_err(query("name"))?;
            if name.is_empty() {
                name = format!("{:?}", device.brand().unwrap_or(Brand::Unknown));
            }
            gpus.push(GpuInfo {
                index: device.index().unwrap_or(i),
                uuid: device.uuid().map_err(query("uuid"))?,
                name,
                memory_total: memory.total,
                memory_used: memory.used,
                // Utilisation is not reported per GPU in MIG mode.
                utilization: device.utilization_rates().ok().map(|u| f64::from(u.gpu)),
                processes,
                mig_enabled: mig_on,
                mig: if mig_on {
                    read_mig(&device)?
                } else {
                    Vec::new()
                },
            });
        }
        Ok(gpus)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mig_profiles_are_named_like_nvidia_smi() {
        assert_eq!(mig_profile_name(3, 40_192), "3g.40gb");
        assert_eq!(mig_profile_name(1, 9_856), "1g.10gb");
        assert_eq!(mig_profile_name(1, 4_864), "1g.5gb");
        assert_eq!(mig_profile_name(2, 11_904), "2g.12gb");
        assert_eq!(mig_profile_name(7, 144_384), "7g.141gb");
    }

    #[test]
    fn process_memory_is_none_when_the_driver_does_not_say() {
        assert_eq!(process_memory(&UsedGpuMemory::Used(5)), Some(5));
        assert_eq!(process_memory(&UsedGpuMemory::Unavailable), None);
    }

    #[test]
    fn mig_mode_one_means_enabled() {
        assert!(mig_enabled(1));
        assert!(!mig_enabled(0));
    }

    #[test]
    fn without_a_driver_nvml_fails_with_a_hint_instead_of_crashing() {
        // On a machine with a GPU this succeeds; both outcomes are fine, a panic is not.
        match NvmlInventory::new() {
            Ok(inv) => {
                let _ = inv.read();
            }
            Err(e) => assert!(e.to_string().contains("NVML is unavailable"), "{e}"),
        }
    }
}
