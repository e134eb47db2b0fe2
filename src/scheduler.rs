//! Placement: which node a new instance goes to.
//!
//! The scheduler owns the list of nodes and a reservation count per node. A placement
//! takes a `Reservation` at once (so two concurrent cold starts see each other) and the
//! reservation is released when the instance holding it is dropped. The score is "least
//! loaded first": fewest instances, ties broken by node order. GPU slots and node load
//! reports will refine the score without changing this shape.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::node::Node;

struct Slot {
    node: Arc<dyn Node>,
    instances: AtomicUsize,
}

/// The nodes instances may be placed on.
pub struct Scheduler {
    slots: Vec<Arc<Slot>>,
}

/// A placement: the chosen node, held for as long as the instance lives.
pub struct Reservation {
    slot: Arc<Slot>,
}

impl Reservation {
    /// The node this reservation is on.
    pub fn node(&self) -> &Arc<dyn Node> {
        &self.slot.node
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.slot.instances.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("node", &self.slot.node.name())
            .finish()
    }
}

impl Scheduler {
    /// A scheduler over `nodes`.
    pub fn new(nodes: Vec<Arc<dyn Node>>) -> Scheduler {
        Scheduler {
            slots: nodes
                .into_iter()
                .map(|node| {
                    Arc::new(Slot {
                        node,
                        instances: AtomicUsize::new(0),
                    })
                })
                .collect(),
        }
    }

    /// Every node.
    pub fn nodes(&self) -> impl Iterator<Item = &Arc<dyn Node>> {
        self.slots.iter().map(|s| &s.node)
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&Arc<dyn Node>> {
        self.nodes().find(|n| n.name() == name)
    }

    /// Places one new instance on the least-loaded node; `None` when there is no node.
    pub fn place(&self) -> Option<Reservation> {
        let slot = self
            .slots
            .iter()
            .min_by_key(|s| s.instances.load(Ordering::Acquire))?;
        slot.instances.fetch_add(1, Ordering::AcqRel);
        Some(Reservation { slot: slot.clone() })
    }

    /// Records an instance found running on `node` (adoption at start).
    pub fn adopt(&self, node: &str) -> Option<Reservation> {
        let slot = self.slots.iter().find(|s| s.node.name() == node)?;
        slot.instances.fetch_add(1, Ordering::AcqRel);
        Some(Reservation { slot: slot.clone() })
    }

    /// Instances placed on the node named `name`.
    pub fn load(&self, name: &str) -> usize {
        self.slots
            .iter()
            .find(|s| s.node.name() == name)
            .map_or(0, |s| s.instances.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::LocalNode;
    use crate::runtime::{ContainerInfo, ContainerRuntime, ContainerSpec, RuntimeError};
    use async_trait::async_trait;
    use bytes::Bytes;
    use tokio::sync::mpsc;

    struct NoRuntime;

    #[async_trait]
    impl ContainerRuntime for NoRuntime {
        async fn ping(&self) -> Result<(), RuntimeError> {
            Ok(())
        }
        async fn image_exists(&self, _: &str) -> Result<bool, RuntimeError> {
            Ok(true)
        }
        async fn build_image(
            &self,
            _: &str,
            _: &str,
            _: Bytes,
            _: mpsc::Sender<String>,
        ) -> Result<(), RuntimeError> {
            Ok(())
        }
        async fn run(&self, _: &ContainerSpec) -> Result<ContainerInfo, RuntimeError> {
            Err(RuntimeError::Build("not here".into()))
        }
        async fn inspect(&self, _: &str) -> Result<Option<ContainerInfo>, RuntimeError> {
            Ok(None)
        }
        async fn logs_tail(&self, _: &str, _: usize) -> Result<String, RuntimeError> {
            Ok(String::new())
        }
        async fn remove(&self, _: &str) -> Result<(), RuntimeError> {
            Ok(())
        }
        async fn list(&self, _: &[(&str, &str)]) -> Result<Vec<ContainerInfo>, RuntimeError> {
            Ok(vec![])
        }
    }

    fn scheduler(names: &[&str]) -> Scheduler {
        Scheduler::new(
            names
                .iter()
                .map(|n| {
                    Arc::new(LocalNode::new(
                        *n,
                        "gw",
                        "127.0.0.1".parse().unwrap(),
                        Arc::new(NoRuntime),
                    )) as Arc<dyn Node>
                })
                .collect(),
        )
    }

    #[test]
    fn placements_spread_to_the_least_loaded_node() {
        let s = scheduler(&["a", "b"]);
        let first = s.place().unwrap();
        let second = s.place().unwrap();
        assert_ne!(first.node().name(), second.node().name());
        assert_eq!(s.load("a") + s.load("b"), 2);
    }

    #[test]
    fn dropping_a_reservation_frees_the_node() {
        let s = scheduler(&["a", "b"]);
        let a = s.place().unwrap();
        let _b = s.place().unwrap();
        let name = a.node().name().to_string();
        drop(a);
        assert_eq!(s.load(&name), 0);
        assert_eq!(s.place().unwrap().node().name(), name);
    }

    #[test]
    fn no_nodes_means_no_placement() {
        assert!(scheduler(&[]).place().is_none());
    }
}
