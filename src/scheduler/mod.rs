//! Placement: which node, and which GPUs on it, a new instance gets.
//!
//! The scheduler owns the list of nodes, their last GPU inventory, and the reservations
//! Ember holds on them. A placement looks at every node (`fit.rs` decides whether and how
//! well each fits), takes the best, and records its reservation at once, under one lock,
//! so two concurrent cold starts never get the same exclusive GPU or overbook shared
//! memory. The `Reservation` is released when the instance holding it is dropped, and
//! that wakes whoever waits for capacity.
//!
//! `fit.rs` holds the placement filters and score, `reservation.rs` the RAII holds
//! (`Reservation`, `InFlight`), `status.rs` what the API shows of nodes and GPUs.

mod fit;
mod reservation;
mod status;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::SystemTime;

use tokio::sync::Notify;

pub use fit::{fit, Fit, Hold, Misfit, NodeView, Policy};
pub use reservation::{InFlight, Reservation};
pub use status::{describe, GpuStatus, NodeStatus};

use crate::gpu::GpuInfo;
use crate::manifest::GpuSpec;
use crate::model::{GpuAssignment, NodeState};
use crate::node::Node;

/// Default limit of instances sharing one GPU.
pub const DEFAULT_MAX_SHARERS: u32 = 8;

/// What the scheduler keeps of one node (not a GPU slot: a node entry holds all its GPUs).
struct NodeEntry {
    node: Arc<dyn Node>,
    state: Mutex<EntryState>,
    in_flight: AtomicUsize,
    freed: Arc<Notify>,
}

/// The part of a node entry that changes under its lock.
#[derive(Default)]
struct EntryState {
    gpus: Vec<GpuInfo>,
    holds: HashMap<String, Hold>,
    instances: usize,
    refreshed: Option<SystemTime>,
    state: NodeState,
    labels: BTreeMap<String, String>,
    /// The node volumes it has, as last read.
    volumes: Vec<String>,
}

impl NodeEntry {
    fn lock(&self) -> MutexGuard<'_, EntryState> {
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

/// What an instance needs of a node: GPUs (or none) and the node volumes that must be
/// there already (the read-only ones it mounts).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Needs {
    /// The GPU section, if any.
    pub gpu: Option<GpuSpec>,
    /// Node volumes the node must have.
    pub volumes: Vec<String>,
}

impl Needs {
    /// What instances of `manifest` need.
    pub fn of(manifest: &crate::manifest::Manifest) -> Needs {
        Needs {
            gpu: manifest.gpu.clone(),
            volumes: manifest
                .volumes
                .iter()
                .filter_map(|v| v.required_node_volume().map(str::to_string))
                .collect(),
        }
    }

    /// The first volume `st`'s node lacks, as a reason.
    fn missing_volume(&self, name: &str, st: &EntryState) -> Option<String> {
        self.volumes
            .iter()
            .find(|v| !st.volumes.contains(v))
            .map(|v| format!("node {name}: no volume `{v}` (expose one with `--volume {v}=PATH`, or copy files in with `ember cp FILE {name}:{v}/PATH`)"))
    }
}

impl From<Option<&GpuSpec>> for Needs {
    fn from(gpu: Option<&GpuSpec>) -> Needs {
        Needs {
            gpu: gpu.cloned(),
            volumes: Vec::new(),
        }
    }
}

/// Why no node took a placement: `Never` when no node would even if every reservation
/// went away, `Busy` (waiting nodes' reasons first) when one might later.
fn refusal(needs: &Needs, never: Vec<String>, mut busy: Vec<String>) -> PlacementError {
    let requirement = describe(needs);
    if busy.is_empty() {
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
    }
}

/// The nodes instances may be placed on.
pub struct Scheduler {
    entries: RwLock<Vec<Arc<NodeEntry>>>,
    policy: Policy,
    max_sharers: u32,
    place_lock: Mutex<()>,
    freed: Arc<Notify>,
}

impl Scheduler {
    /// A scheduler over `nodes` (all ready); more join with `add_node`.
    pub fn new(nodes: Vec<Arc<dyn Node>>, policy: Policy, max_sharers: u32) -> Scheduler {
        let s = Scheduler {
            entries: RwLock::new(Vec::new()),
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

    /// The entries as they are now; the list lock is not held while each node is looked at.
    fn snapshot(&self) -> Vec<Arc<NodeEntry>> {
        self.entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn entry(&self, name: &str) -> Option<Arc<NodeEntry>> {
        self.entries
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
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = entries.iter().find(|s| s.node.name() == node.name()) {
            let mut st = entry.lock();
            st.labels = labels;
            st.state = state;
            return entry.node.clone();
        }
        entries.push(Arc::new(NodeEntry {
            node: node.clone(),
            state: Mutex::new(EntryState {
                labels,
                state,
                ..Default::default()
            }),
            in_flight: AtomicUsize::new(0),
            freed: self.freed.clone(),
        }));
        node
    }

    /// Forgets a node; its instances' reservations keep its entry alive until they go.
    pub fn remove_node(&self, name: &str) -> bool {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        let before = entries.len();
        entries.retain(|e| e.node.name() != name);
        entries.len() != before
    }

    /// Sets a node's state; returns the previous one, or `None` for an unknown node.
    pub fn set_state(&self, name: &str, state: NodeState) -> Option<NodeState> {
        let entry = self.entry(name)?;
        let mut st = entry.lock();
        let before = st.state;
        st.state = state;
        Some(before)
    }

    /// A node's state.
    pub fn state(&self, name: &str) -> Option<NodeState> {
        self.entry(name).map(|s| s.lock().state)
    }

    /// Notified whenever a reservation is released.
    pub fn freed(&self) -> &Notify {
        &self.freed
    }

    /// Every node.
    pub fn nodes(&self) -> Vec<Arc<dyn Node>> {
        self.snapshot()
            .into_iter()
            .map(|s| s.node.clone())
            .collect()
    }

    /// Every node the gateway can talk to now (not disconnected, not lost).
    pub fn live_nodes(&self) -> Vec<Arc<dyn Node>> {
        self.snapshot()
            .into_iter()
            .filter(|s| s.lock().state.reachable())
            .map(|s| s.node.clone())
            .collect()
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<Arc<dyn Node>> {
        self.entry(name).map(|s| s.node.clone())
    }

    /// Takes the node volumes a node has now.
    pub fn update_volumes(&self, name: &str, volumes: Vec<String>) {
        if let Some(entry) = self.entry(name) {
            entry.lock().volumes = volumes;
        }
    }

    /// Takes a node's GPU inventory as it just reported it.
    /// Returns whether the devices it can hand out changed.
    pub fn update_gpus(&self, name: &str, gpus: Vec<GpuInfo>) -> bool {
        let Some(entry) = self.entry(name) else {
            return false;
        };
        let mut st = entry.lock();
        let changed = crate::gpu::device_ids(&st.gpus) != crate::gpu::device_ids(&gpus);
        st.gpus = gpus;
        st.refreshed = Some(SystemTime::now());
        changed
    }

    /// Reads every node's GPU inventory (agents' as their last heartbeat reported it).
    /// Returns the nodes whose devices changed, so their instances can be checked.
    pub async fn refresh(&self) -> Vec<Arc<dyn Node>> {
        let mut changed = Vec::new();
        for entry in &self.snapshot() {
            let gpus = entry.node.gpus().await;
            let volumes = entry.node.volume_names().await;
            self.update_volumes(entry.node.name(), volumes);
            if self.update_gpus(entry.node.name(), gpus) {
                changed.push(entry.node.clone());
            }
        }
        changed
    }

    /// Places one instance needing `needs` on the best node under the policy.
    pub fn place(&self, needs: impl Into<Needs>) -> Result<Reservation, PlacementError> {
        let needs = needs.into();
        let spec = needs.gpu.as_ref();
        let entries = self.snapshot();
        if entries.is_empty() {
            return Err(PlacementError::NoNodes);
        }
        let _one_at_a_time = self.place_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut best: Option<(usize, Fit, usize)> = None;
        let mut never = Vec::new();
        let mut busy = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let st = entry.lock();
            if !st.state.schedulable() {
                // Cordoned, draining and lost nodes may come back: a wait, not a never.
                busy.push(format!("node {}: {}", entry.node.name(), st.state));
                continue;
            }
            if let Some(why) = needs.missing_volume(entry.node.name(), &st) {
                never.push(why);
                continue;
            }
            let view = NodeView {
                name: entry.node.name(),
                gpus: &st.gpus,
                holds: &st.holds,
                instances: st.instances,
                in_flight: entry.in_flight.load(Ordering::Acquire),
                max_sharers: self.max_sharers,
            };
            match fit(&view, spec, self.policy) {
                Ok(f) => {
                    let mine = st.instances;
                    let better = match &best {
                        None => true,
                        Some((_, b, theirs)) => self.beats(&f, mine, b, *theirs),
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
            return Err(refusal(&needs, never, busy));
        };
        Ok(self.hold(&entries[i], chosen.gpus))
    }

    /// Whether a fit with `mine` instances on its node beats the best so far: a higher
    /// score, or an equal one with the node the policy prefers by instance count.
    fn beats(&self, f: &Fit, mine: usize, best: &Fit, theirs: usize) -> bool {
        f.score > best.score + 1e-9
            || ((f.score - best.score).abs() <= 1e-9
                && match self.policy {
                    Policy::Spread => mine < theirs,
                    Policy::Binpack => mine > theirs,
                })
    }

    /// Whether some node could ever place `needs` (reservations aside).
    pub fn feasible(&self, needs: impl Into<Needs>) -> Result<(), PlacementError> {
        let needs = needs.into();
        let entries = self.snapshot();
        if entries.is_empty() {
            return Err(PlacementError::NoNodes);
        }
        let mut reasons = Vec::new();
        for entry in &entries {
            match self.could_place(entry, &needs) {
                Ok(()) => return Ok(()),
                Err(r) => reasons.push(r),
            }
        }
        Err(PlacementError::Never {
            requirement: describe(&needs),
            reasons: reasons.join("; "),
        })
    }

    /// The reachable nodes that could ever place `needs` (reservations aside): where a
    /// deploy pre-pulls its image.
    pub fn capable_nodes(&self, needs: impl Into<Needs>) -> Vec<Arc<dyn Node>> {
        let needs = needs.into();
        self.snapshot()
            .into_iter()
            .filter(|e| e.lock().state.reachable() && self.could_place(e, &needs).is_ok())
            .map(|e| e.node.clone())
            .collect()
    }

    /// Whether the entry's node could ever place `needs`; why not.
    fn could_place(&self, entry: &NodeEntry, needs: &Needs) -> Result<(), String> {
        let st = entry.lock();
        if let Some(why) = needs.missing_volume(entry.node.name(), &st) {
            return Err(why);
        }
        let empty = HashMap::new();
        let view = NodeView {
            name: entry.node.name(),
            gpus: &st.gpus,
            holds: &empty,
            instances: 0,
            in_flight: 0,
            max_sharers: self.max_sharers,
        };
        match fit(&view, needs.gpu.as_ref(), self.policy) {
            Ok(_) => Ok(()),
            Err(Misfit::Never(r) | Misfit::Busy(r)) => Err(r),
        }
    }

    /// Whether `needs` would fit on the reservation's node if that reservation were
    /// released (to choose which paused instance to evict for a waiting placement).
    pub fn fits_without(&self, needs: &Needs, r: &Reservation) -> bool {
        let spec = needs.gpu.as_ref();
        let st = r.entry.lock();
        if !st.state.schedulable() || needs.missing_volume(r.entry.node.name(), &st).is_some() {
            return false;
        }
        let mut holds = st.holds.clone();
        fit::apply(&mut holds, &r.gpus, false);
        let view = NodeView {
            name: r.entry.node.name(),
            gpus: &st.gpus,
            holds: &holds,
            instances: st.instances.saturating_sub(1),
            in_flight: r.entry.in_flight.load(Ordering::Acquire),
            max_sharers: self.max_sharers,
        };
        fit(&view, spec, self.policy).is_ok()
    }

    fn hold(&self, entry: &Arc<NodeEntry>, gpus: Vec<GpuAssignment>) -> Reservation {
        let mut st = entry.lock();
        st.instances += 1;
        fit::apply(&mut st.holds, &gpus, true);
        Reservation {
            entry: entry.clone(),
            gpus,
        }
    }

    /// Records an instance found running on `node` with `gpus` (adoption at start). The
    /// assignments come from the containers' labels, so each holds at most its device's
    /// memory: a label claiming more cannot make the GPU look fuller than full, and what
    /// the instance's end releases is what it took.
    pub fn adopt(&self, node: &str, mut gpus: Vec<GpuAssignment>) -> Option<Reservation> {
        let entry = self.entry(node)?;
        {
            let st = entry.lock();
            for a in &mut gpus {
                let total = st.gpus.iter().find_map(|g| {
                    if g.uuid == a.device_id {
                        Some(g.memory_total)
                    } else {
                        g.mig
                            .iter()
                            .find(|m| m.uuid == a.device_id)
                            .map(|m| m.memory_total)
                    }
                });
                if let Some(total) = total {
                    a.memory = a.memory.min(total);
                }
            }
        }
        Some(self.hold(&entry, gpus))
    }

    /// Instances placed on the node named `name`.
    #[cfg(test)]
    pub fn load(&self, name: &str) -> usize {
        self.entry(name).map_or(0, |s| s.lock().instances)
    }
}

#[cfg(test)]
mod tests;
