//! Node membership: which nodes belong to the gateway, and whether they are alive.
//!
//! An agent joins once with a join token (`join.rs`) and gets a node credential; from then
//! on it dials a tunnel with that credential (`tunnel.rs`), over which the gateway learns
//! the node, reconciles what it runs, and asks for its GPUs every heartbeat interval. A
//! node whose tunnel drops is `disconnected` at once (no placements, its instances take no
//! requests) and `lost` after the node timeout (its instances are replaced elsewhere); one
//! that comes back is reconciled (adopt, never duplicate) before it takes placements.
//! Operators cordon, drain, uncordon and remove nodes; marks survive restarts. Liveness
//! runs on tokio's clock, so the loss timeout is tested with paused time.

mod join;
mod tunnel;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::activator::Activator;
use crate::model::NodeState;
use crate::node::{Node, RemoteNode};
use crate::store::{NodeAddress, NodeMark, NodeRecord, RemovedNode, Store, StoreError};

/// Membership failures.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// Wrong, expired or missing join token.
    #[error("wrong, expired or missing join token: make one with `ember token create` and pass it to `ember agent --token`")]
    BadToken,
    /// The node was removed, and the credential presented was the one it held.
    #[error("node `{0}` was removed from this gateway (`ember nodes rm`); to bring it back, join again with a new join token (`ember token create`)")]
    NodeRemoved(String),
    /// The node credential is wrong, or the node unknown.
    #[error("node `{0}` is not accepted with this credential: this gateway does not know the node, or another agent joined under its name since. Join with a new join token (`ember token create`) under a free --name")]
    BadCredential(String),
    /// No such node.
    #[error("node `{0}` is not known; `ember nodes` lists the known ones")]
    UnknownNode(String),
    /// The join or tunnel request is unusable.
    #[error("bad registration: {0}")]
    BadRegistration(String),
    /// The node name belongs to the embedded node.
    #[error("node `{0}` is the gateway's embedded node; give the agent another --name")]
    NameTaken(String),
    /// A joined node holds the name.
    #[error("node `{0}` has joined already; give this agent another --name, or, if it is that machine and lost its data dir, remove the old node first (`ember nodes rm {0}`) and join again with a new token")]
    NodeExists(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An operator's action on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeAction {
    /// No new instances.
    Cordon,
    /// No new instances, and move the existing ones away.
    Drain,
    /// Back to ready.
    Uncordon,
}

impl NodeAction {
    /// The mark the action leaves.
    fn mark(self) -> NodeMark {
        match self {
            NodeAction::Cordon => NodeMark::Cordoned,
            NodeAction::Drain => NodeMark::Draining,
            NodeAction::Uncordon => NodeMark::None,
        }
    }
}

/// Timing of membership.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// A node silent (or disconnected) this long is lost.
    pub node_timeout: Duration,
    /// How often a node's GPUs are asked for.
    pub heartbeat: Duration,
}

/// The gateway's view of its nodes.
pub struct Membership {
    activator: Activator,
    store: Store,
    /// The hash of the long-lived join token of `serve --join-token`, if any.
    join_token_hash: Option<String>,
    /// Joins one at a time: a join token is spent, and a name taken, exactly once.
    joining: tokio::sync::Mutex<()>,
    gateway_id: String,
    timing: Timing,
    remotes: RwLock<HashMap<String, Arc<RemoteNode>>>,
    /// Each node's open tunnel session, to close it (a newer tunnel, a removal). Its lock
    /// orders tunnels: a session is checked, attached and recorded under it.
    sessions: Mutex<HashMap<String, (u64, CancellationToken)>>,
    /// The tunnel sessions' tasks. They outlive the gateway's shutdown signal: requests
    /// that finish during the shutdown grace may need them; `close_tunnels` ends them.
    tunnels: TaskTracker,
    /// Cancelled by `close_tunnels`.
    closing: CancellationToken,
}

impl Membership {
    /// Membership over the activator's scheduler. Known agents are loaded as lost until
    /// their tunnel opens; the embedded node's marks are applied.
    pub async fn load(
        activator: Activator,
        join_token: Option<String>,
        gateway_id: String,
        timing: Timing,
    ) -> Result<Membership, MembershipError> {
        let store = activator.store().clone();
        let m = Membership {
            activator,
            store,
            join_token_hash: join_token.as_deref().map(crate::access::hash_secret),
            joining: tokio::sync::Mutex::default(),
            gateway_id,
            timing,
            remotes: RwLock::default(),
            sessions: Mutex::default(),
            tunnels: TaskTracker::new(),
            closing: CancellationToken::new(),
        };
        for record in m.store.nodes().await? {
            if record.address == NodeAddress::Embedded {
                m.scheduler().set_state(&record.name, record.mark.state());
                continue;
            }
            m.remote_or_new(&record.name, &record);
        }
        Ok(m)
    }

    fn scheduler(&self) -> &crate::scheduler::Scheduler {
        self.activator.scheduler()
    }

    fn remote(&self, name: &str) -> Option<Arc<RemoteNode>> {
        self.remotes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// When node `name` was last heard from, on the wall clock: its agent's last answer or
    /// heartbeat, `None` before the first since the gateway started. The embedded node is
    /// always heard: now.
    pub fn last_heard(&self, name: &str) -> Option<SystemTime> {
        match self.remote(name) {
            Some(remote) => remote.last_seen_at(),
            None => Some(SystemTime::now()),
        }
    }

    /// The node of that name, added to the scheduler as lost when it is new.
    fn remote_or_new(&self, name: &str, record: &NodeRecord) -> Arc<RemoteNode> {
        let mut remotes = self.remotes.write().unwrap_or_else(|e| e.into_inner());
        if let Some(remote) = remotes.get(name) {
            return remote.clone();
        }
        let remote = Arc::new(RemoteNode::new(name));
        self.scheduler()
            .add_node(remote.clone(), record.labels.clone(), NodeState::Lost);
        remotes.insert(name.to_string(), remote.clone());
        remote
    }

    /// Cordon, drain or uncordon a node (the embedded one included).
    pub async fn act(&self, name: &str, action: NodeAction) -> Result<NodeState, MembershipError> {
        let current = self
            .scheduler()
            .state(name)
            .ok_or_else(|| MembershipError::UnknownNode(name.to_string()))?;
        let mut record = self.store.node(name)?.unwrap_or(NodeRecord {
            name: name.to_string(),
            address: NodeAddress::Embedded,
            labels: Default::default(),
            mark: NodeMark::None,
            credential: None,
        });
        record.mark = action.mark();
        self.store.put_node(&record).await?;
        let state = if current.reachable() {
            record.mark.state()
        } else {
            current
        };
        self.scheduler().set_state(name, state);
        match action {
            NodeAction::Drain => self.activator.drain_node(name),
            NodeAction::Uncordon => self.activator.undrain_node(name),
            NodeAction::Cordon => {}
        }
        tracing::info!(node = name, ?action, "node marked");
        Ok(state)
    }

    /// Removes an agent's node: its credential is revoked, its tunnel closed at once, its
    /// instances replaced elsewhere. The agent cannot come back without a new join token.
    pub async fn remove(&self, name: &str) -> Result<(), MembershipError> {
        let record = self
            .store
            .node(name)?
            .ok_or_else(|| MembershipError::UnknownNode(name.to_string()))?;
        if record.address == NodeAddress::Embedded {
            return Err(MembershipError::NameTaken(name.to_string()));
        }
        let removed = record.credential.map(|credential| RemovedNode {
            name: name.to_string(),
            credential,
            removed_ms: crate::store::now_ms(),
        });
        self.store.delete_node(name, removed.as_ref()).await?;
        self.close_session(name);
        self.remotes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        self.scheduler().set_state(name, NodeState::Lost);
        self.activator.forget_node(name).await;
        self.scheduler().remove_node(name);
        tracing::warn!(node = name, "node removed: its credential is revoked");
        Ok(())
    }

    /// Closes every tunnel, once the gateway has finished the requests it had in flight
    /// (they may need them), and waits for their sessions to end.
    pub async fn close_tunnels(&self) {
        self.closing.cancel();
        self.tunnels.close();
        self.tunnels.wait().await;
    }

    /// Closes the node's tunnel session, if one is open.
    fn close_session(&self, name: &str) {
        let session = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if let Some((_, stop)) = session {
            stop.cancel();
        }
    }

    /// Marks nodes lost when they stay silent or disconnected; runs until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let every = (self.timing.node_timeout / 4).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
            self.sweep(Instant::now()).await;
        }
    }

    /// One liveness pass: every node not lost and silent past the timeout at `now` is lost
    /// (an open tunnel of a silent node is closed, so its agent dials a fresh one).
    pub async fn sweep(&self, now: Instant) {
        let remotes: Vec<_> = self
            .remotes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for remote in remotes {
            let state = self.scheduler().state(remote.name());
            if matches!(state, None | Some(NodeState::Lost)) {
                continue;
            }
            let silent = remote
                .last_seen()
                .map_or(Duration::MAX, |t| now.saturating_duration_since(t));
            if silent > self.timing.node_timeout {
                tracing::warn!(node = %remote.name(), silent_ms = silent.as_millis() as u64, "not heard from within the node timeout: node lost");
                self.scheduler().set_state(remote.name(), NodeState::Lost);
                self.close_session(remote.name());
                self.activator.forget_node(remote.name()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests;
