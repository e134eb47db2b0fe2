//! Node membership: which nodes belong to the gateway, and whether they are alive.
//!
//! Agents join with the join token and then send heartbeats. A node not heard from within
//! the timeout is lost: its instances are dropped and replaced elsewhere. A node that
//! reports in after being lost, after a gateway restart, or for the first time is
//! reconciled (its containers adopted or removed) before it takes placements. Operators
//! cordon, drain and uncordon nodes; those marks are stored, so they survive restarts.
//! Liveness runs on tokio's clock, so the loss timeout is tested with paused time.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::activator::Activator;
use crate::gpu::GpuInfo;
use crate::model::NodeState;
use crate::node::wire::{Heartbeat, Registered, Registration};
use crate::node::{Node, RemoteNode};
use crate::store::{NodeAddress, NodeMark, NodeRecord, Store, StoreError};

/// Membership failures.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The gateway takes no agents.
    #[error("this gateway takes no agents: start it with --join-token (or EMBER_JOIN_TOKEN)")]
    NoJoinToken,
    /// Wrong or missing token.
    #[error("wrong or missing join token")]
    BadToken,
    /// No such node.
    #[error("node `{0}` is not known; `ember nodes` lists the known ones")]
    UnknownNode(String),
    /// The registration is unusable.
    #[error("bad registration: {0}")]
    BadRegistration(String),
    /// The node name belongs to the embedded node.
    #[error("node `{0}` is the gateway's embedded node; give the agent another --name")]
    NameTaken(String),
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
    /// A node silent this long is lost.
    pub node_timeout: Duration,
    /// How often agents send heartbeats.
    pub heartbeat: Duration,
}

/// The gateway's view of its nodes.
pub struct Membership {
    activator: Activator,
    store: Store,
    token: Option<String>,
    gateway_id: String,
    timing: Timing,
    remotes: RwLock<HashMap<String, Arc<RemoteNode>>>,
}

impl Membership {
    /// Membership over the activator's scheduler. Known remote nodes are loaded as lost
    /// until they report in; the embedded node's marks are applied.
    pub async fn load(
        activator: Activator,
        token: Option<String>,
        gateway_id: String,
        timing: Timing,
    ) -> Result<Membership, MembershipError> {
        let store = activator.store().clone();
        let m = Membership {
            activator,
            store,
            token,
            gateway_id,
            timing,
            remotes: RwLock::default(),
        };
        for record in m.store.nodes().await? {
            let NodeAddress::Agent { url } = &record.address else {
                m.scheduler().set_state(&record.name, record.mark.state());
                continue;
            };
            let remote = Arc::new(RemoteNode::new(
                &record.name,
                url,
                m.token.as_deref().unwrap_or(""),
            ));
            m.scheduler()
                .add_node(remote.clone(), record.labels.clone(), NodeState::Lost);
            m.write().insert(record.name.clone(), remote);
        }
        Ok(m)
    }

    fn scheduler(&self) -> &crate::scheduler::Scheduler {
        self.activator.scheduler()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<RemoteNode>>> {
        self.remotes.write().unwrap_or_else(|e| e.into_inner())
    }

    fn remote(&self, name: &str) -> Option<Arc<RemoteNode>> {
        self.remotes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Checks a presented join token, in constant time.
    pub fn check_token(&self, presented: Option<&str>) -> Result<(), MembershipError> {
        let Some(token) = &self.token else {
            return Err(MembershipError::NoJoinToken);
        };
        if !presented.is_some_and(|p| crate::access::same_secret(p, token)) {
            return Err(MembershipError::BadToken);
        }
        Ok(())
    }

    /// A node joins (or rejoins).
    pub async fn register(&self, r: Registration) -> Result<Registered, MembershipError> {
        check_registration(&r)?;
        let stored = self.store.node(&r.name)?;
        if stored
            .as_ref()
            .is_some_and(|n| n.address == NodeAddress::Embedded)
            || (self.remote(&r.name).is_none() && self.scheduler().node(&r.name).is_some())
        {
            return Err(MembershipError::NameTaken(r.name));
        }
        let record = NodeRecord {
            name: r.name.clone(),
            address: NodeAddress::Agent { url: r.url.clone() },
            labels: r.labels.clone(),
            mark: stored.map(|n| n.mark).unwrap_or_default(),
        };
        self.store.put_node(&record).await?;
        let remote = match self.remote(&r.name) {
            Some(remote) => remote,
            None => {
                let token = self.token.as_deref().unwrap_or("");
                let remote = Arc::new(RemoteNode::new(&r.name, &r.url, token));
                self.write().insert(r.name.clone(), remote.clone());
                remote
            }
        };
        remote.registered(&r);
        let before = self.scheduler().state(&r.name);
        // A node new or back from lost takes no placement until reconciled.
        let hold = matches!(before, None | Some(NodeState::Lost));
        let state = if hold {
            NodeState::Lost
        } else {
            record.mark.state()
        };
        self.scheduler()
            .add_node(remote.clone(), r.labels.clone(), state);
        tracing::info!(node = %r.name, url = %r.url, gpus = r.gpus.len(), "node registered");
        // A (re)registration always reconciles: an agent restarted within the timeout
        // lost nothing, but one listing makes sure.
        self.after_contact(remote, true, hold, &r.gpus);
        Ok(Registered {
            gateway_id: self.gateway_id.clone(),
            heartbeat_ms: self.timing.heartbeat.as_millis() as u64,
        })
    }

    /// A heartbeat from a node.
    pub async fn heartbeat(&self, name: &str, hb: Heartbeat) -> Result<(), MembershipError> {
        let remote = self
            .remote(name)
            .ok_or_else(|| MembershipError::UnknownNode(name.to_string()))?;
        remote.heartbeat(&hb);
        let lost = self.scheduler().state(name) == Some(NodeState::Lost);
        if lost {
            tracing::info!(node = name, "node reported in");
        }
        self.after_contact(remote, lost, lost, &hb.gpus);
        Ok(())
    }

    /// Takes a node's GPUs at once; then, off the request path (during a registration the
    /// agent only serves its node API once it has the answer, so calling it from here would
    /// wait on ourselves), drops instances on vanished GPUs, reconciles what the node runs
    /// when asked, and, when `hold`, makes it schedulable again only after that.
    fn after_contact(
        &self,
        remote: Arc<RemoteNode>,
        reconcile: bool,
        hold: bool,
        gpus: &[GpuInfo],
    ) {
        let name = remote.name().to_string();
        if self.scheduler().update_gpus(&name, gpus.to_vec()) {
            self.activator.drop_missing_gpus(&name, gpus);
        }
        let guard = if reconcile {
            self.activator.begin_reconcile(&name)
        } else {
            None
        };
        let Some(guard) = guard else {
            // The usual heartbeat, or a reconcile of this node is under way already.
            return;
        };
        let activator = self.activator.clone();
        let store = self.store.clone();
        let gpus = gpus.to_vec();
        let span = tracing::info_span!("reconcile", node = %name);
        self.activator.tracker().spawn(
            async move {
                // The inventory loop may have taken the new list first; check anyway.
                activator.drop_missing_gpus(&name, &gpus);
                let reconciled = guard.reconcile(remote).await;
                // Unreconciled, it stays lost; its next heartbeat tries again.
                if hold && reconciled {
                    let mark = match store.node(&name) {
                        Ok(record) => record.map(|r| r.mark).unwrap_or_default(),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read the node's mark; taking it as ready");
                            NodeMark::None
                        }
                    };
                    activator.scheduler().set_state(&name, mark.state());
                }
            }
            .instrument(span),
        );
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
        });
        record.mark = action.mark();
        self.store.put_node(&record).await?;
        let state = if current == NodeState::Lost {
            NodeState::Lost
        } else {
            record.mark.state()
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

    /// Marks nodes lost when their heartbeats stop; runs until `shutdown`.
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

    /// One liveness pass: every reachable node silent past the timeout at `now` is lost.
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
                tracing::warn!(node = %remote.name(), silent_ms = silent.as_millis() as u64, "no heartbeat within the timeout: node lost");
                self.scheduler().set_state(remote.name(), NodeState::Lost);
                self.activator.forget_node(remote.name()).await;
            }
        }
    }
}

/// A registration's name and URL make sense.
fn check_registration(r: &Registration) -> Result<(), MembershipError> {
    crate::manifest::check_name(&r.name).map_err(MembershipError::BadRegistration)?;
    let url: http::Uri = r
        .url
        .parse()
        .map_err(|_| MembershipError::BadRegistration(format!("url `{}`", r.url)))?;
    if url.scheme_str() != Some("http") {
        return Err(MembershipError::BadRegistration(format!(
            "url `{}` must be http://",
            r.url
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activator::Limits;
    use crate::scheduler::{Policy, Scheduler};
    use tokio_util::task::TaskTracker;

    async fn membership(dir: &std::path::Path) -> Membership {
        let store = Store::open(dir).unwrap();
        // An agent the gateway knew before a restart: it comes back as lost.
        store
            .put_node(&NodeRecord {
                name: "gpu1".into(),
                address: NodeAddress::Agent {
                    url: "http://127.0.0.1:1".into(),
                },
                labels: Default::default(),
                mark: NodeMark::None,
            })
            .await
            .unwrap();
        let activator = Activator::new(
            Scheduler::new(Vec::new(), Policy::Spread, 8),
            store,
            TaskTracker::new(),
            CancellationToken::new(),
            Limits::default(),
        );
        let timing = Timing {
            node_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(1),
        };
        Membership::load(activator, Some("token-123".into()), "gw".into(), timing)
            .await
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_is_lost_only_once_it_has_been_silent_past_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let m = membership(dir.path()).await;
        assert_eq!(m.scheduler().state("gpu1"), Some(NodeState::Lost));
        m.scheduler().set_state("gpu1", NodeState::Ready);
        m.heartbeat("gpu1", Heartbeat::default()).await.unwrap();

        tokio::time::advance(Duration::from_secs(9)).await;
        m.sweep(Instant::now()).await;
        assert_eq!(m.scheduler().state("gpu1"), Some(NodeState::Ready));

        m.heartbeat("gpu1", Heartbeat::default()).await.unwrap();
        tokio::time::advance(Duration::from_secs(9)).await;
        m.sweep(Instant::now()).await;
        assert_eq!(
            m.scheduler().state("gpu1"),
            Some(NodeState::Ready),
            "each heartbeat restarts the clock"
        );

        tokio::time::advance(Duration::from_secs(2)).await;
        m.sweep(Instant::now()).await;
        assert_eq!(m.scheduler().state("gpu1"), Some(NodeState::Lost));
    }

    #[tokio::test]
    async fn join_tokens_are_checked_and_unknown_nodes_refused() {
        let dir = tempfile::tempdir().unwrap();
        let m = membership(dir.path()).await;
        assert!(m.check_token(Some("token-123")).is_ok());
        assert!(matches!(
            m.check_token(Some("token-12")),
            Err(MembershipError::BadToken)
        ));
        assert!(matches!(
            m.check_token(None),
            Err(MembershipError::BadToken)
        ));
        assert!(matches!(
            m.heartbeat("stranger", Heartbeat::default()).await,
            Err(MembershipError::UnknownNode(_))
        ));
    }
}
