//! The permit that hands one request to one instance: where to send it, and the slot it
//! holds, given back (and handed to the next queued request) when it is dropped.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::function::{release_slot, FnState, Function};
use super::instance::Instance;
use super::Revision;
use crate::node::Node;
use crate::scheduler::InFlight;

/// The right to send one request to one instance. Dropping it frees the slot, updates
/// the instance's last use, and hands the slot to the next queued request.
pub struct Permit {
    function: Arc<Function>,
    instance: String,
    endpoint: SocketAddr,
    node: Arc<dyn Node>,
    container_id: String,
    retired: CancellationToken,
    revision: Arc<Revision>,
    devices: Arc<[String]>,
    _in_flight: InFlight,
    armed: bool,
    cold: bool,
}

impl Permit {
    /// A permit on a ready instance of `function`; `armed`: it holds a slot, given back on
    /// drop; `cold`: its request waited for the instance to come up.
    pub(super) fn new(function: Arc<Function>, inst: &Instance, armed: bool, cold: bool) -> Permit {
        Permit {
            function,
            instance: inst.id.clone(),
            endpoint: inst.endpoint.expect("ready instances have an endpoint"),
            node: inst.reservation.node().clone(),
            container_id: inst.container_id.clone().unwrap_or_default(),
            retired: inst.retired.token().clone(),
            revision: inst.revision.clone(),
            devices: inst.meter.devices().clone(),
            _in_flight: inst.reservation.track_request(),
            armed,
            cold,
        }
    }

    /// Where to send the request.
    pub fn endpoint(&self) -> SocketAddr {
        self.endpoint
    }

    /// The instance id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The node running the instance.
    pub fn node(&self) -> &Arc<dyn Node> {
        &self.node
    }

    /// The container id on that node.
    pub fn container_id(&self) -> &str {
        &self.container_id
    }

    /// Cancelled when the instance leaves service (drains, stops, is removed or lost):
    /// whatever holds the permit past one response (an upgraded connection) ends then.
    pub fn retired(&self) -> &CancellationToken {
        &self.retired
    }

    /// The revision of the instance.
    pub fn revision(&self) -> &str {
        &self.revision.id
    }

    /// The GPU slots (GPU or MIG uuids) the instance holds.
    pub fn devices(&self) -> &[String] {
        &self.devices
    }

    /// Whether its request waited for an instance to start (or resume, or start again):
    /// it queued, and its instance came up after that (`Instance::came_up`). A request that queued while an
    /// instance started but was served by one that had a slot free up, or by a running
    /// container adopted meanwhile, is not cold.
    pub fn cold(&self) -> bool {
        self.cold
    }

    /// The function the permit is for.
    pub(super) fn function(&self) -> &Arc<Function> {
        &self.function
    }

    /// Gives the slot back under a lock the caller holds (dropping the permit would take
    /// that lock again), without handing it on: the caller dispatches.
    pub(super) fn disarm(mut self, st: &mut FnState) {
        if self.armed {
            self.armed = false;
            release_slot(st, &self.instance);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.armed {
            self.function.release(&self.instance);
        }
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("function", &self.function.name())
            .field("instance", &self.instance)
            .field("endpoint", &self.endpoint)
            .finish()
    }
}
