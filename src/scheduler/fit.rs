//! Whether (and how well) one node fits one instance: the placement filters and score,
//! as pure functions of the node's GPUs, the reservations on them, and the request.
//!
//! Filters: GPU model, minimum memory, and per sharing mode: exclusive (a GPU no instance
//! holds, not in MIG mode, with the asked memory free of other users), shared (declared
//! memory fits in what is free after NVML's used memory and other reservations, under the
//! node's limit of sharers per GPU), mig (a free MIG instance of the asked profile; whole
//! GPUs are never used for it). A refusal says whether it is for good (`Never`: no amount
//! of waiting helps) or for now (`Busy`: held by instances that may go away).

use std::collections::HashMap;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use crate::gpu::GpuInfo;
use crate::manifest::GpuSpec;
use crate::model::{GpuAssignment, Sharing};

/// How nodes and GPUs are chosen among those that fit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Least loaded first: most free GPU memory, least utilisation, fewest requests.
    #[default]
    Spread,
    /// Pack onto busy GPUs and nodes, keeping whole GPUs free for large jobs.
    Binpack,
}

/// What Ember's own instances hold of one device (a GPU UUID or a MIG UUID).
#[derive(utoipa::ToSchema, Debug, Clone, Default, PartialEq, Serialize)]
pub struct Hold {
    /// Held whole by one instance.
    pub exclusive: bool,
    /// Instances sharing it.
    pub sharers: u32,
    /// Memory reserved on it by those instances.
    pub memory: u64,
}

/// What the fit needs to know of a node.
pub struct NodeView<'a> {
    /// Node name.
    pub name: &'a str,
    /// Its GPUs.
    pub gpus: &'a [GpuInfo],
    /// Reservations, by device id.
    pub holds: &'a HashMap<String, Hold>,
    /// Instances placed on it.
    pub instances: usize,
    /// Requests in flight on it.
    pub in_flight: usize,
    /// Most instances sharing one GPU.
    pub max_sharers: u32,
}

/// A node that fits, with the devices to use and how good the choice is (higher is better).
#[derive(Debug, Clone, PartialEq)]
pub struct Fit {
    /// Devices for the instance (empty without a GPU section).
    pub gpus: Vec<GpuAssignment>,
    /// Score under the policy.
    pub score: f64,
}

/// Why a node does not fit.
#[derive(Debug, Clone, PartialEq)]
pub enum Misfit {
    /// It never will with its GPUs.
    Never(String),
    /// It would if reservations went away.
    Busy(String),
}

struct Candidate {
    assignment: GpuAssignment,
    score: f64,
}

fn model_matches(name: &str, models: &[String]) -> bool {
    models.is_empty() || {
        let name = name.to_lowercase();
        models.iter().any(|m| name.contains(&m.to_lowercase()))
    }
}

/// Load of a node by in-flight requests, in 0..1.
fn in_flight_load(in_flight: usize) -> f64 {
    in_flight as f64 / (in_flight as f64 + 50.0)
}

fn device_score(policy: Policy, free_after: f64, utilization: f64) -> f64 {
    let idle = 1.0 - (utilization / 100.0).clamp(0.0, 1.0);
    match policy {
        Policy::Spread => 0.6 * free_after + 0.4 * idle,
        Policy::Binpack => 0.6 * (1.0 - free_after) + 0.4 * (1.0 - idle),
    }
}

/// Fits an instance needing `spec` (or no GPU) on `node`.
pub fn fit(node: &NodeView, spec: Option<&GpuSpec>, policy: Policy) -> Result<Fit, Misfit> {
    let held_share = if node.gpus.is_empty() {
        0.0
    } else {
        node.gpus
            .iter()
            .filter(|g| {
                node.holds.contains_key(&g.uuid)
                    || g.mig.iter().any(|m| node.holds.contains_key(&m.uuid))
            })
            .count() as f64
            / node.gpus.len() as f64
    };
    let node_term = match policy {
        Policy::Spread => -0.3 * in_flight_load(node.in_flight) - 0.2 * held_share,
        Policy::Binpack => 0.3 * in_flight_load(node.in_flight) + 0.2 * held_share,
    };
    let Some(spec) = spec else {
        return Ok(Fit {
            gpus: Vec::new(),
            score: node_term,
        });
    };
    let mut candidates = Vec::new();
    let mut busy = 0;
    let mut reasons = Vec::new();
    for gpu in node.gpus {
        match fit_gpu(node, gpu, spec, policy, &mut candidates) {
            Ok(()) => {}
            Err(Misfit::Busy(r)) => {
                busy += 1;
                reasons.push(format!("GPU {} ({}): {r}", gpu.index, gpu.name));
            }
            Err(Misfit::Never(r)) => reasons.push(format!("GPU {} ({}): {r}", gpu.index, gpu.name)),
        }
    }
    let count = spec.count as usize;
    if candidates.len() >= count {
        candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
        candidates.truncate(count);
        let score = candidates.iter().map(|c| c.score).sum::<f64>() / count as f64 + node_term;
        return Ok(Fit {
            gpus: candidates.into_iter().map(|c| c.assignment).collect(),
            score,
        });
    }
    if node.gpus.is_empty() {
        reasons.push("no GPUs".into());
    } else if candidates.len() + busy >= count {
        let why = format!(
            "node {}: {} of the {count} GPUs needed are free; {}",
            node.name,
            candidates.len(),
            reasons.join("; ")
        );
        return Err(Misfit::Busy(why));
    }
    Err(Misfit::Never(format!(
        "node {}: {}",
        node.name,
        reasons.join("; ")
    )))
}

/// Fits one GPU of `node`, adding the devices it offers to `out`.
fn fit_gpu(
    node: &NodeView,
    gpu: &GpuInfo,
    spec: &GpuSpec,
    policy: Policy,
    out: &mut Vec<Candidate>,
) -> Result<(), Misfit> {
    if !model_matches(&gpu.name, &spec.models) {
        return Err(Misfit::Never(format!("model not in {:?}", spec.models)));
    }
    match spec.sharing {
        Sharing::Exclusive => out.push(fit_exclusive(node, gpu, spec, policy)?),
        Sharing::Shared => out.push(fit_shared(node, gpu, spec, policy)?),
        Sharing::Mig => out.extend(fit_mig(node, gpu, spec, policy)?),
    }
    Ok(())
}

/// Memory the spec asks of one device (0 when it declares none).
fn wanted_memory(spec: &GpuSpec) -> u64 {
    spec.memory.map_or(0, |m| m.as_u64())
}

/// Smallest device memory the spec accepts (0 when it names none).
fn min_memory(spec: &GpuSpec) -> u64 {
    spec.min_memory.map_or(0, |m| m.as_u64())
}

/// Whether a whole GPU could ever serve the spec (exclusive and shared modes).
fn whole_gpu_usable(gpu: &GpuInfo, spec: &GpuSpec) -> Result<(), Misfit> {
    if gpu.mig_enabled {
        return Err(Misfit::Never(
            "in MIG mode; only its MIG instances can be used".into(),
        ));
    }
    let needed = min_memory(spec).max(wanted_memory(spec));
    if gpu.memory_total < needed {
        return Err(Misfit::Never(format!(
            "{} in total, less than the {} asked",
            ByteSize(gpu.memory_total),
            ByteSize(needed)
        )));
    }
    Ok(())
}

/// A whole GPU no other instance holds, with the asked memory free of other users.
fn fit_exclusive(
    node: &NodeView,
    gpu: &GpuInfo,
    spec: &GpuSpec,
    policy: Policy,
) -> Result<Candidate, Misfit> {
    whole_gpu_usable(gpu, spec)?;
    let hold = node.holds.get(&gpu.uuid).cloned().unwrap_or_default();
    if hold.exclusive || hold.sharers > 0 {
        return Err(Misfit::Busy("held by another instance".into()));
    }
    let total = gpu.memory_total;
    let want = wanted_memory(spec);
    let available = total.saturating_sub(gpu.memory_used);
    if want > available {
        return Err(Misfit::Busy(format!("only {} free", ByteSize(available))));
    }
    let util = gpu.utilization.unwrap_or(0.0);
    Ok(Candidate {
        assignment: GpuAssignment {
            gpu_uuid: gpu.uuid.clone(),
            device_id: gpu.uuid.clone(),
            sharing: Sharing::Exclusive,
            memory: want,
        },
        score: device_score(policy, available as f64 / total.max(1) as f64, util),
    })
}

/// A GPU not held whole, under the node's limit of sharers, with the declared memory free
/// after NVML's used memory and other reservations.
fn fit_shared(
    node: &NodeView,
    gpu: &GpuInfo,
    spec: &GpuSpec,
    policy: Policy,
) -> Result<Candidate, Misfit> {
    whole_gpu_usable(gpu, spec)?;
    let hold = node.holds.get(&gpu.uuid).cloned().unwrap_or_default();
    if hold.exclusive {
        return Err(Misfit::Busy("held whole by another instance".into()));
    }
    if hold.sharers >= node.max_sharers {
        return Err(Misfit::Busy(format!(
            "{} instances share it already, the node's limit",
            hold.sharers
        )));
    }
    let total = gpu.memory_total;
    let want = wanted_memory(spec);
    // NVML's used memory includes Ember's own instances; count what is larger.
    let available = total.saturating_sub(gpu.memory_used.max(hold.memory));
    if want > available {
        return Err(Misfit::Busy(format!(
            "only {} free after other users and reservations",
            ByteSize(available)
        )));
    }
    let util = gpu.utilization.unwrap_or(0.0);
    Ok(Candidate {
        assignment: GpuAssignment {
            gpu_uuid: gpu.uuid.clone(),
            device_id: gpu.uuid.clone(),
            sharing: Sharing::Shared,
            memory: want,
        },
        score: device_score(
            policy,
            (available - want) as f64 / total.max(1) as f64,
            util,
        ),
    })
}

/// Every free MIG instance of the asked profile; whole GPUs are never used for it.
fn fit_mig(
    node: &NodeView,
    gpu: &GpuInfo,
    spec: &GpuSpec,
    policy: Policy,
) -> Result<Vec<Candidate>, Misfit> {
    if !gpu.mig_enabled {
        return Err(Misfit::Never("not in MIG mode".into()));
    }
    let profile = spec.mig_profile.as_deref().unwrap_or("");
    let min_memory = min_memory(spec);
    let matching: Vec<_> = gpu
        .mig
        .iter()
        .filter(|m| m.profile == profile && m.memory_total >= min_memory)
        .collect();
    if matching.is_empty() {
        return Err(Misfit::Never(format!(
            "no MIG instance of profile {profile}"
        )));
    }
    let free: Vec<_> = matching
        .iter()
        .filter(|m| !node.holds.get(&m.uuid).is_some_and(|h| h.exclusive))
        .collect();
    if free.is_empty() {
        return Err(Misfit::Busy(format!(
            "its {} MIG instances of profile {profile} are held",
            matching.len()
        )));
    }
    let free_share = free.len() as f64 / gpu.mig.len() as f64;
    let util = gpu.utilization.unwrap_or(0.0);
    Ok(free
        .into_iter()
        .map(|m| Candidate {
            assignment: GpuAssignment {
                gpu_uuid: gpu.uuid.clone(),
                device_id: m.uuid.clone(),
                sharing: Sharing::Mig,
                memory: m.memory_total,
            },
            score: device_score(policy, free_share, util),
        })
        .collect())
}

/// Takes (`take`) or releases an instance's holds. The assignments of adopted instances
/// come from an agent (its containers' labels), so their memory may be anything: sums
/// saturate rather than overflow.
pub fn apply(holds: &mut HashMap<String, Hold>, gpus: &[GpuAssignment], take: bool) {
    for a in gpus {
        let hold = holds.entry(a.device_id.clone()).or_default();
        match (a.sharing, take) {
            (Sharing::Shared, true) => {
                hold.sharers = hold.sharers.saturating_add(1);
                hold.memory = hold.memory.saturating_add(a.memory);
            }
            (Sharing::Shared, false) => {
                hold.sharers = hold.sharers.saturating_sub(1);
                hold.memory = hold.memory.saturating_sub(a.memory);
            }
            (_, true) => {
                hold.exclusive = true;
                hold.memory = hold.memory.saturating_add(a.memory);
            }
            (_, false) => {
                hold.exclusive = false;
                hold.memory = hold.memory.saturating_sub(a.memory);
            }
        }
        if !hold.exclusive && hold.sharers == 0 {
            holds.remove(&a.device_id);
        }
    }
}
