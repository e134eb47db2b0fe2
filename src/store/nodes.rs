//! The `nodes` tree: every node the gateway knows, with where it is and what an operator
//! set (cordon, drain), so both survive restarts. The `removed_nodes` tree keeps the
//! credential hash of each removed agent until its name joins again: an agent proves with
//! its old credential that it is the one removed, and only then removes its containers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{encode, Change, Store, StoreError, TreeId};
use crate::model::NodeState;

/// How the gateway reaches a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum NodeAddress {
    /// The gateway's own embedded node.
    Embedded,
    /// An agent, over the tunnel it dials.
    Agent,
}

/// What an operator set on a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeMark {
    /// Nothing: the node takes placements.
    #[default]
    None,
    /// No new instances.
    Cordoned,
    /// No new instances, and the existing ones move away.
    Draining,
}

impl NodeMark {
    /// The state a reachable node with this mark is in.
    pub fn state(self) -> NodeState {
        match self {
            NodeMark::None => NodeState::Ready,
            NodeMark::Cordoned => NodeState::Cordoned,
            NodeMark::Draining => NodeState::Draining,
        }
    }
}

/// A node the gateway knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node name.
    pub name: String,
    /// How it is reached.
    pub address: NodeAddress,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// What an operator set.
    #[serde(default)]
    pub mark: NodeMark,
    /// The hash of the agent's node credential (`access::hash_secret`); none for the
    /// embedded node, and for an agent that must join again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// An agent's node that was removed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemovedNode {
    /// Node name.
    pub name: String,
    /// The hash of the credential it held.
    pub credential: String,
    /// When it was removed (unix ms).
    pub removed_ms: u64,
}

impl Store {
    /// Records a node, durably.
    pub async fn put_node(&self, node: &NodeRecord) -> Result<(), StoreError> {
        let k = node.name.as_bytes().to_vec();
        self.write(vec![Change::Put(TreeId::Nodes, k, encode(node))])
            .await
    }

    /// One node.
    pub fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        self.get(TreeId::Nodes, name.as_bytes())
    }

    /// Every node.
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.scan(TreeId::Nodes, Vec::new()).await
    }

    /// Records a node that joins, forgetting any removal of its name, durably.
    pub async fn join_node(&self, node: &NodeRecord) -> Result<(), StoreError> {
        let k = node.name.as_bytes().to_vec();
        self.write(vec![
            Change::Remove(TreeId::RemovedNodes, k.clone()),
            Change::Put(TreeId::Nodes, k, encode(node)),
        ])
        .await
    }

    /// Forgets a node, keeping the removal of an agent's, durably and at once.
    pub async fn delete_node(
        &self,
        name: &str,
        removed: Option<&RemovedNode>,
    ) -> Result<(), StoreError> {
        // In this order, a crash between the two leaves a state that reads safely.
        let k = name.as_bytes().to_vec();
        let mut changes = Vec::new();
        if let Some(r) = removed {
            changes.push(Change::Put(TreeId::RemovedNodes, k.clone(), encode(r)));
        }
        changes.push(Change::Remove(TreeId::Nodes, k));
        self.write(changes).await
    }

    /// The removal of an agent's node of that name, if it was removed.
    pub fn removed_node(&self, name: &str) -> Result<Option<RemovedNode>, StoreError> {
        self.get(TreeId::RemovedNodes, name.as_bytes())
    }
}
