//! Membership: which nodes belong to the gateway, and what state each is in.
//!
//! Agents join with the join token (`register`) and then send heartbeats with their GPU
//! inventory. A node not heard from within the timeout is lost: its instances are dropped
//! and replaced elsewhere. A node that reports in after being lost, after a gateway
//! restart, or for the first time is reconciled (its containers adopted or removed).
//! Operators cordon, drain and uncordon nodes; those marks are stored, so they survive
//! restarts. Nodes are kept in the store with their agent URL.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::activator::Activator;
use crate::gpu::GpuInfo;
use crate::model::NodeState;
use crate::node::wire::{Heartbeat, Registered, Registration};
use crate::node::{Node, RemoteNode};
use crate::store::{NodeRecord, Store, StoreError};

/// URL recorded for the gateway's embedded node.
pub const EMBEDDED_URL: &str = "embedded";

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

/// The gateway's view of its nodes.
pub struct Membership {
    activator: Activator,
    store: Store,
    token: Option<String>,
    gateway_id: String,
    timeout: Duration,
    heartbeat: Duration,
    remotes: RwLock<HashMap<String, Arc<RemoteNode>>>,
    reconciling: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

fn state_of(record: &NodeRecord) -> NodeState {
    if record.draining {
        NodeState::Draining
    } else if record.cordoned {
        NodeState::Cordoned
    } else {
        NodeState::Ready
    }
}

impl Membership {
    /// Membership over the activator's scheduler. Known remote nodes are loaded as lost
    /// until they report in; the embedded node's marks are applied.
    pub async fn load(
        activator: Activator,
        store: Store,
        token: Option<String>,
        gateway_id: String,
        timeout: Duration,
        heartbeat: Duration,
    ) -> Result<Membership, MembershipError> {
        let m = Membership {
            activator,
            store,
            token,
            gateway_id,
            timeout,
            heartbeat,
            remotes: RwLock::default(),
            reconciling: Arc::default(),
        };
        for record in m.store.nodes()? {
            if record.url == EMBEDDED_URL {
                m.activator
                    .scheduler()
                    .set_state(&record.name, state_of(&record));
                continue;
            }
            let remote = Arc::new(RemoteNode::new(
                &record.name,
                &record.url,
                m.token.as_deref().unwrap_or(""),
            ));
            m.activator.scheduler().add_node(
                remote.clone(),
                record.labels.clone(),
                NodeState::Lost,
            );
            m.write().insert(record.name.clone(), remote);
        }
        Ok(m)
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

    /// Checks a presented join token.
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
        let stored = self.store.node(&r.name)?;
        if stored.as_ref().is_some_and(|n| n.url == EMBEDDED_URL)
            || (self.remote(&r.name).is_none()
                && self.activator.scheduler().node(&r.name).is_some())
        {
            return Err(MembershipError::NameTaken(r.name));
        }
        let mut record = stored.unwrap_or(NodeRecord {
            name: r.name.clone(),
            url: r.url.clone(),
            labels: r.labels.clone(),
            cordoned: false,
            draining: false,
        });
        record.url = r.url.clone();
        record.labels = r.labels.clone();
        self.store.put_node(&record).await?;
        let remote = match self.remote(&r.name) {
            Some(remote) => remote,
            None => {
                let remote = Arc::new(RemoteNode::new(
                    &r.name,
                    &r.url,
                    self.token.as_deref().unwrap_or(""),
                ));
                self.write().insert(r.name.clone(), remote.clone());
                remote
            }
        };
        remote.registered(&r);
        let before = self.activator.scheduler().state(&r.name);
        // A node new or back from lost takes no placement until reconciled.
        let hold = matches!(before, None | Some(NodeState::Lost));
        let state = if hold {
            NodeState::Lost
        } else {
            state_of(&record)
        };
        self.activator
            .scheduler()
            .add_node(remote.clone(), r.labels.clone(), state);
        tracing::info!(node = %r.name, url = %r.url, gpus = r.gpus.len(), "node registered");
        // A (re)registration always reconciles: an agent restarted within the timeout
        // lost nothing, but one listing makes sure.
        self.after_contact(remote, true, hold, &r.gpus);
        Ok(Registered {
            gateway_id: self.gateway_id.clone(),
            heartbeat_ms: self.heartbeat.as_millis() as u64,
        })
    }

    /// A heartbeat from a node.
    pub async fn heartbeat(&self, name: &str, hb: Heartbeat) -> Result<(), MembershipError> {
        let remote = self
            .remote(name)
            .ok_or_else(|| MembershipError::UnknownNode(name.to_string()))?;
        remote.heartbeat(&hb);
        let lost = self.activator.scheduler().state(name) == Some(NodeState::Lost);
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
        let changed = self.activator.scheduler().update_gpus(&name, gpus.to_vec());
        let reconcile = reconcile && self.start_reconciling(&name);
        if !changed && !reconcile {
            // The usual heartbeat: nothing to do beyond noting it.
            return;
        }
        let activator = self.activator.clone();
        let store = self.store.clone();
        let reconciling = self.reconciling.clone();
        let gpus = gpus.to_vec();
        tokio::spawn(async move {
            // The inventory loop may have taken the new list first; a reconcile checks anyway.
            if changed || reconcile {
                activator.drop_missing_gpus(&name, &gpus).await;
            }
            if !reconcile {
                return;
            }
            activator.reconcile_node(remote).await;
            if hold {
                let record = store.node(&name).ok().flatten();
                let state = record.as_ref().map_or(NodeState::Ready, state_of);
                activator.scheduler().set_state(&name, state);
            }
            reconciling
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&name);
        });
    }

    /// Marks `name` as being reconciled; false when it already is.
    fn start_reconciling(&self, name: &str) -> bool {
        self.reconciling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string())
    }

    /// Cordon, drain or uncordon a node (the embedded one included).
    pub async fn act(&self, name: &str, action: NodeAction) -> Result<NodeState, MembershipError> {
        let scheduler = self.activator.scheduler();
        let current = scheduler
            .state(name)
            .ok_or_else(|| MembershipError::UnknownNode(name.to_string()))?;
        let mut record = self.store.node(name)?.unwrap_or(NodeRecord {
            name: name.to_string(),
            url: EMBEDDED_URL.to_string(),
            labels: Default::default(),
            cordoned: false,
            draining: false,
        });
        match action {
            NodeAction::Cordon => record.cordoned = true,
            NodeAction::Drain => {
                record.cordoned = true;
                record.draining = true;
            }
            NodeAction::Uncordon => {
                record.cordoned = false;
                record.draining = false;
            }
        }
        self.store.put_node(&record).await?;
        let state = if current == NodeState::Lost {
            NodeState::Lost
        } else {
            state_of(&record)
        };
        scheduler.set_state(name, state);
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
        let every = (self.timeout / 4).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
            let remotes: Vec<_> = self
                .remotes
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned()
                .collect();
            for remote in remotes {
                let state = self.activator.scheduler().state(remote.name());
                if matches!(state, None | Some(NodeState::Lost)) {
                    continue;
                }
                let silent = remote
                    .last_seen()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .unwrap_or(Duration::MAX);
                if silent > self.timeout {
                    tracing::warn!(node = %remote.name(), silent_ms = silent.as_millis() as u64, "no heartbeat within the timeout: node lost");
                    self.activator
                        .scheduler()
                        .set_state(remote.name(), NodeState::Lost);
                    self.activator.forget_node(remote.name()).await;
                }
            }
        }
    }
}
