//! Placement: which node, and which GPUs on it, a new instance gets.
//!
//! The scheduler owns the list of nodes, their last GPU inventory, and the reservations
//! Ember holds on them. A placement looks at every node (`fit.rs` decides whether and how
//! well each fits), takes the best, and records its reservation at once, under one lock,
//! so two concurrent cold starts never get the same exclusive GPU or overbook shared
//! memory. The `Reservation` is released when the instance holding it is dropped, and
//! that wakes whoever waits for capacity.

mod fit;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::Notify;

pub use fit::{fit, Fit, Hold, Misfit, NodeView, Policy};

use crate::gpu::{GpuDriver, GpuInfo};
use crate::manifest::GpuSpec;
use crate::model::{GpuAssignment, NodeState};
use crate::node::Node;

/// Default limit of instances sharing one GPU.
pub const DEFAULT_MAX_SHARERS: u32 = 8;

struct Slot {
    node: Arc<dyn Node>,
    state: Mutex<SlotState>,
    in_flight: AtomicUsize,
    freed: Arc<Notify>,
}

#[derive(Default)]
struct SlotState {
    gpus: Vec<GpuInfo>,
    holds: HashMap<String, Hold>,
    instances: usize,
    refreshed: Option<SystemTime>,
    state: NodeState,
    labels: BTreeMap<String, String>,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why nothing could be placed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlacementError {
    /// No node meets the requirements, even with nothing else running.
    #[error("no node meets {requirement}: {reasons}")]
    Never {
        /// The requirement, as the manifest put it.
        requirement: String,
        /// Why each node refused.
        reasons: String,
    },
    /// Nodes would meet them, but their capacity is held by other instances now.
    #[error("no node has room for {requirement} now: {reasons}")]
    Busy {
        /// The requirement.
        requirement: String,
        /// Why each node refused.
        reasons: String,
    },
    /// There is no node at all.
    #[error("no node can run instances (none is registered)")]
    NoNodes,
}

/// The nodes instances may be placed on.
pub struct Scheduler {
    slots: RwLock<Vec<Arc<Slot>>>,
    policy: Policy,
    max_sharers: u32,
    place_lock: Mutex<()>,
    freed: Arc<Notify>,
}

/// A placement: the chosen node and devices, held for as long as the instance lives.
pub struct Reservation {
    slot: Arc<Slot>,
    gpus: Vec<GpuAssignment>,
}

impl Reservation {
    /// The node this reservation is on.
    pub fn node(&self) -> &Arc<dyn Node> {
        &self.slot.node
    }

    /// The devices given to the instance.
    pub fn gpus(&self) -> &[GpuAssignment] {
        &self.gpus
    }

    /// Counts one request in flight on the node until the guard drops.
    pub fn track_request(&self) -> InFlight {
        self.slot.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight {
            slot: self.slot.clone(),
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        {
            let mut st = self.slot.lock();
            st.instances = st.instances.saturating_sub(1);
            fit::apply(&mut st.holds, &self.gpus, false);
        }
        self.slot.freed.notify_waiters();
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("node", &self.slot.node.name())
            .field("gpus", &self.gpus)
            .finish()
    }
}

/// One request in flight on a node.
pub struct InFlight {
    slot: Arc<Slot>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.slot.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A node as the API shows it.
#[derive(Debug, Clone, Serialize)]
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
#[derive(Debug, Clone, Serialize)]
pub struct GpuStatus {
    /// The inventory's facts.
    #[serde(flatten)]
    pub gpu: GpuInfo,
    /// Reservations on the whole GPU.
    pub reserved: Hold,
    /// MIG instances held, by UUID.
    pub mig_held: Vec<String>,
}

/// The requirement of a GPU section in words, for errors.
pub fn describe(spec: Option<&GpuSpec>) -> String {
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
    /// A scheduler over `nodes` (all ready); more join with `add_node`.
    pub fn new(nodes: Vec<Arc<dyn Node>>, policy: Policy, max_sharers: u32) -> Scheduler {
        let s = Scheduler {
            slots: RwLock::new(Vec::new()),
            policy,
            max_sharers,
            place_lock: Mutex::new(()),
            freed: Arc::new(Notify::new()),
        };
        for node in nodes {
            s.add_node(node, BTreeMap::new(), NodeState::Ready);
        }
        s
    }

    fn slots(&self) -> Vec<Arc<Slot>> {
        self.slots.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn slot(&self, name: &str) -> Option<Arc<Slot>> {
        self.slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|s| s.node.name() == name)
            .cloned()
    }

    /// Adds a node, or updates the labels and state of the node of that name (keeping its
    /// reservations). Returns the node now known under the name.
    pub fn add_node(
        &self,
        node: Arc<dyn Node>,
        labels: BTreeMap<String, String>,
        state: NodeState,
    ) -> Arc<dyn Node> {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.iter().find(|s| s.node.name() == node.name()) {
            let mut st = slot.lock();
            st.labels = labels;
            st.state = state;
            return slot.node.clone();
        }
        slots.push(Arc::new(Slot {
            node: node.clone(),
            state: Mutex::new(SlotState {
                labels,
                state,
                ..Default::default()
            }),
            in_flight: AtomicUsize::new(0),
            freed: self.freed.clone(),
        }));
        node
    }

    /// Sets a node's state; returns the previous one, or `None` for an unknown node.
    pub fn set_state(&self, name: &str, state: NodeState) -> Option<NodeState> {
        let slot = self.slot(name)?;
        let mut st = slot.lock();
        let before = st.state;
        st.state = state;
        Some(before)
    }

    /// A node's state.
    pub fn state(&self, name: &str) -> Option<NodeState> {
        self.slot(name).map(|s| s.lock().state)
    }

    /// Notified whenever a reservation is released.
    pub fn freed(&self) -> &Notify {
        &self.freed
    }

    /// Every node.
    pub fn nodes(&self) -> Vec<Arc<dyn Node>> {
        self.slots().into_iter().map(|s| s.node.clone()).collect()
    }

    /// Every node that is not lost.
    pub fn live_nodes(&self) -> Vec<Arc<dyn Node>> {
        self.slots()
            .into_iter()
            .filter(|s| s.lock().state != NodeState::Lost)
            .map(|s| s.node.clone())
            .collect()
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<Arc<dyn Node>> {
        self.slot(name).map(|s| s.node.clone())
    }

    /// Takes a node's GPU inventory as it just reported it.
    /// Returns whether the devices it can hand out changed.
    pub fn update_gpus(&self, name: &str, gpus: Vec<GpuInfo>) -> bool {
        let Some(slot) = self.slot(name) else {
            return false;
        };
        let mut st = slot.lock();
        let changed = crate::gpu::device_ids(&st.gpus) != crate::gpu::device_ids(&gpus);
        st.gpus = gpus;
        st.refreshed = Some(SystemTime::now());
        changed
    }

    /// Reads every node's GPU inventory (agents' as their last heartbeat reported it).
    /// Returns the nodes whose devices changed, so their instances can be checked.
    pub async fn refresh(&self) -> Vec<Arc<dyn Node>> {
        let mut changed = Vec::new();
        for slot in &self.slots() {
            let gpus = slot.node.gpus().await;
            if self.update_gpus(slot.node.name(), gpus) {
                changed.push(slot.node.clone());
            }
        }
        changed
    }

    /// Places one instance needing `spec` (or no GPU) on the best node under the policy.
    pub fn place(&self, spec: Option<&GpuSpec>) -> Result<Reservation, PlacementError> {
        let slots = self.slots();
        if slots.is_empty() {
            return Err(PlacementError::NoNodes);
        }
        let _one_at_a_time = self.place_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut best: Option<(usize, Fit, usize)> = None;
        let mut never = Vec::new();
        let mut busy = Vec::new();
        for (i, slot) in slots.iter().enumerate() {
            let st = slot.lock();
            if !st.state.schedulable() {
                // Cordoned, draining and lost nodes may come back: a wait, not a never.
                busy.push(format!("node {}: {}", slot.node.name(), st.state));
                continue;
            }
            let view = NodeView {
                name: slot.node.name(),
                gpus: &st.gpus,
                holds: &st.holds,
                instances: st.instances,
                in_flight: slot.in_flight.load(Ordering::Acquire),
                max_sharers: self.max_sharers,
            };
            match fit(&view, spec, self.policy) {
                Ok(f) => {
                    let mine = st.instances;
                    let better = match &best {
                        None => true,
                        Some((_, b, theirs)) => {
                            let theirs = *theirs;
                            f.score > b.score + 1e-9
                                || ((f.score - b.score).abs() <= 1e-9
                                    && match self.policy {
                                        Policy::Spread => mine < theirs,
                                        Policy::Binpack => mine > theirs,
                                    })
                        }
                    };
                    if better {
                        best = Some((i, f, mine));
                    }
                }
                Err(Misfit::Never(r)) => never.push(r),
                Err(Misfit::Busy(r)) => busy.push(r),
            }
        }
        let Some((i, chosen, _)) = best else {
            let requirement = describe(spec);
            let all_never = busy.is_empty();
            return Err(if all_never {
                PlacementError::Never {
                    requirement,
                    reasons: never.join("; "),
                }
            } else {
                busy.extend(never);
                PlacementError::Busy {
                    requirement,
                    reasons: busy.join("; "),
                }
            });
        };
        Ok(self.hold(&slots[i], chosen.gpus))
    }

    /// Whether some node could ever place `spec` (reservations aside).
    pub fn feasible(&self, spec: Option<&GpuSpec>) -> Result<(), PlacementError> {
        let slots = self.slots();
        if slots.is_empty() {
            return Err(PlacementError::NoNodes);
        }
        let empty = HashMap::new();
        let mut reasons = Vec::new();
        for slot in &slots {
            let st = slot.lock();
            let view = NodeView {
                name: slot.node.name(),
                gpus: &st.gpus,
                holds: &empty,
                instances: 0,
                in_flight: 0,
                max_sharers: self.max_sharers,
            };
            match fit(&view, spec, self.policy) {
                Ok(_) => return Ok(()),
                Err(Misfit::Never(r) | Misfit::Busy(r)) => reasons.push(r),
            }
        }
        Err(PlacementError::Never {
            requirement: describe(spec),
            reasons: reasons.join("; "),
        })
    }

    /// Whether `spec` would fit on the reservation's node if that reservation were released
    /// (to choose which paused instance to evict for a waiting placement).
    pub fn fits_without(&self, spec: Option<&GpuSpec>, r: &Reservation) -> bool {
        let st = r.slot.lock();
        if !st.state.schedulable() {
            return false;
        }
        let mut holds = st.holds.clone();
        fit::apply(&mut holds, &r.gpus, false);
        let view = NodeView {
            name: r.slot.node.name(),
            gpus: &st.gpus,
            holds: &holds,
            instances: st.instances.saturating_sub(1),
            in_flight: r.slot.in_flight.load(Ordering::Acquire),
            max_sharers: self.max_sharers,
        };
        fit(&view, spec, self.policy).is_ok()
    }

    fn hold(&self, slot: &Arc<Slot>, gpus: Vec<GpuAssignment>) -> Reservation {
        let mut st = slot.lock();
        st.instances += 1;
        fit::apply(&mut st.holds, &gpus, true);
        Reservation {
            slot: slot.clone(),
            gpus,
        }
    }

    /// Records an instance found running on `node` with `gpus` (adoption at start).
    pub fn adopt(&self, node: &str, gpus: Vec<GpuAssignment>) -> Option<Reservation> {
        let slot = self.slot(node)?;
        Some(self.hold(&slot, gpus))
    }

    /// Instances placed on the node named `name`.
    #[cfg(test)]
    pub fn load(&self, name: &str) -> usize {
        self.slot(name).map_or(0, |s| s.lock().instances)
    }

    /// Every node with its GPUs and reservations, for the API.
    pub fn status(&self) -> Vec<NodeStatus> {
        self.slots()
            .iter()
            .map(|slot| {
                let st = slot.lock();
                NodeStatus {
                    name: slot.node.name().to_string(),
                    state: st.state,
                    labels: st.labels.clone(),
                    gpu_driver: slot.node.gpu_driver(),
                    gpu_source: slot.node.gpu_source(),
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
                    in_flight: slot.in_flight.load(Ordering::Acquire),
                    last_heartbeat: st
                        .refreshed
                        .map(|t| humantime::format_rfc3339_millis(t).to_string()),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
