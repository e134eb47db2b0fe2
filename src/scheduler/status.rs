//! What the scheduler knows, in words and as the API shows it: each node with its GPUs and
//! Ember's reservations on them (`Scheduler::status`), and a GPU requirement described for
//! placement errors (`describe`). Read-only: nothing here changes a reservation.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde::Serialize;

use super::{Hold, NodeEntry, Scheduler};
use crate::gpu::{GpuDriver, GpuInfo};
use crate::manifest::GpuSpec;
use crate::model::NodeState;

/// A node as the API shows it.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// Name.
    pub name: String,
    /// ready, cordoned, draining or lost.
    pub state: NodeState,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// How containers get GPUs there.
    pub gpu_driver: GpuDriver,
    /// Where its GPU facts come from.
    pub gpu_source: String,
    /// Its GPUs, each with Ember's reservations.
    pub gpus: Vec<GpuStatus>,
    /// Instances placed there.
    pub instances: usize,
    /// Requests in flight there.
    pub in_flight: usize,
    /// When its inventory was last read (RFC 3339).
    pub last_heartbeat: Option<String>,
}

/// A GPU with what Ember holds of it.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize)]
pub struct GpuStatus {
    /// The inventory's facts.
    #[serde(flatten)]
    pub gpu: GpuInfo,
    /// Reservations on the whole GPU.
    pub reserved: Hold,
    /// MIG instances held, by UUID.
    pub mig_held: Vec<String>,
}

/// What an instance needs, in words, for errors.
pub fn describe(needs: &super::Needs) -> String {
    let gpu = describe_gpu(needs.gpu.as_ref());
    if needs.volumes.is_empty() {
        return gpu;
    }
    let volumes: Vec<String> = needs.volumes.iter().map(|v| format!("`{v}`")).collect();
    format!("{gpu} with volume {}", volumes.join(", "))
}

/// The requirement of a GPU section in words.
fn describe_gpu(spec: Option<&GpuSpec>) -> String {
    let Some(s) = spec else {
        return "a node".into();
    };
    let mut parts = vec![
        format!("count = {}", s.count),
        format!("sharing = {}", s.sharing),
    ];
    if let Some(m) = s.memory {
        parts.push(format!("memory = {m}"));
    }
    if let Some(p) = &s.mig_profile {
        parts.push(format!("mig_profile = {p}"));
    }
    if !s.models.is_empty() {
        parts.push(format!("models = {:?}", s.models));
    }
    if let Some(m) = s.min_memory {
        parts.push(format!("min_memory = {m}"));
    }
    format!("gpu {{ {} }}", parts.join(", "))
}

impl Scheduler {
    /// Every node with its GPUs and reservations, for the API.
    pub fn status(&self) -> Vec<NodeStatus> {
        self.snapshot().iter().map(|e| node_status(e)).collect()
    }
}

fn node_status(entry: &NodeEntry) -> NodeStatus {
    let st = entry.lock();
    NodeStatus {
        name: entry.node.name().to_string(),
        state: st.state,
        labels: st.labels.clone(),
        gpu_driver: entry.node.gpu_driver(),
        gpu_source: entry.node.gpu_source(),
        gpus: st
            .gpus
            .iter()
            .map(|g| GpuStatus {
                gpu: g.clone(),
                reserved: st.holds.get(&g.uuid).cloned().unwrap_or_default(),
                mig_held: g
                    .mig
                    .iter()
                    .filter(|m| st.holds.contains_key(&m.uuid))
                    .map(|m| m.uuid.clone())
                    .collect(),
            })
            .collect(),
        instances: st.instances,
        in_flight: entry.in_flight.load(Ordering::Acquire),
        last_heartbeat: st
            .refreshed
            .map(|t| humantime::format_rfc3339_millis(t).to_string()),
    }
}
