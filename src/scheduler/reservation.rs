//! The holds a placement leaves behind: a `Reservation` keeps an instance's node and devices
//! reserved for as long as the instance lives, an `InFlight` counts one request on a node.
//!
//! Both are RAII guards: dropping them gives the capacity back (and a released reservation
//! wakes whoever waits for room). They never decide placement; that is the scheduler's.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{fit, NodeEntry};
use crate::model::GpuAssignment;
use crate::node::Node;

/// A placement: the chosen node and devices, held for as long as the instance lives.
pub struct Reservation {
    pub(super) entry: Arc<NodeEntry>,
    pub(super) gpus: Vec<GpuAssignment>,
}

impl Reservation {
    /// The node this reservation is on.
    pub fn node(&self) -> &Arc<dyn Node> {
        &self.entry.node
    }

    /// The devices given to the instance.
    pub fn gpus(&self) -> &[GpuAssignment] {
        &self.gpus
    }

    /// Counts one request in flight on the node until the guard drops.
    pub fn track_request(&self) -> InFlight {
        self.entry.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight {
            entry: self.entry.clone(),
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        {
            let mut st = self.entry.lock();
            st.instances = st.instances.saturating_sub(1);
            fit::apply(&mut st.holds, &self.gpus, false);
        }
        self.entry.freed.notify_waiters();
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("node", &self.entry.node.name())
            .field("gpus", &self.gpus)
            .finish()
    }
}

/// One request in flight on a node.
pub struct InFlight {
    entry: Arc<NodeEntry>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.entry.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}
