//! Restart and rejoin: rebuild the live state from the store, and reconcile what a node
//! runs with what the gateway knows.
//!
//! A container is adopted when its labels name a deployed function and a known revision,
//! the store has a record of its instance, it runs, its GPUs are still in the node's
//! inventory, and it passes one readiness probe; a stopped one of a function that parks
//! its idle instances (`on_idle = "park"`) is adopted as parked, to be started again and
//! probed when a request needs it. A container of the current revision that
//! was still starting (its record has no ready time: a model loading) and is within its
//! start timeout is adopted as starting, and its start goes on for what is left of that
//! timeout: a restart during a long load does not throw the load away. Every other
//! container of this gateway on the node is removed, and every record of the node without
//! a container is deleted, so no orphan survives and nothing runs twice. Instances the
//! gateway already serves are left alone, which makes reconciling a node that merely
//! reconnects harmless.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::instance::Instance;
use super::start::ResumedStart;
use super::{Activator, ActivatorError, Function, Revision};
use crate::manifest::OnIdle;
use crate::model::Phase;
use crate::node::{ManagedContainer, Node};
use crate::readiness;
use crate::store::InstanceRecord;

/// How long an adopted container gets to answer its readiness probe.
const ADOPT_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The right to reconcile one node: while it is held, no other reconcile of that node
/// starts (two at once could both adopt the same container). Dropping it, on any path,
/// panics included, lets the next one start.
pub struct ReconcileGuard {
    activator: Activator,
    node: String,
}

impl ReconcileGuard {
    /// Adopts or removes the containers the guarded node runs for this gateway. Returns
    /// whether it could (the node listed its containers and the records were read).
    pub async fn reconcile(&self, node: Arc<dyn Node>) -> bool {
        if node.name() != self.node {
            tracing::error!(guarded = %self.node, node = %node.name(), "a reconcile guard was used for another node");
            return false;
        }
        self.activator.reconcile_node(node).await
    }
}

impl Drop for ReconcileGuard {
    fn drop(&mut self) {
        self.activator
            .inner
            .reconciling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.node);
    }
}

impl Activator {
    /// Loads deployed functions, then reconciles every node that is reachable now (the
    /// embedded one; agents are reconciled when they next report in).
    pub async fn restore(&self) -> Result<(), ActivatorError> {
        let store = &self.inner.store;
        for record in store.functions().await? {
            let Some(rev) = store.revision(&record.name, &record.revision)? else {
                tracing::warn!(function = %record.name, revision = %record.revision, "function's revision is missing from the store; skipping it");
                continue;
            };
            let revision = Arc::new(Revision {
                id: rev.id.clone(),
                manifest: Arc::new(rev.manifest),
            });
            let f = Arc::new(Function::new(revision, self.inner.reaper.clone()));
            self.write_functions().insert(record.name, f);
        }
        self.reindex_models();
        for node in self.scheduler().live_nodes() {
            let name = node.name().to_string();
            let Some(guard) = self.begin_reconcile(&name) else {
                continue; // being reconciled already
            };
            // Unreconciled, the node's containers would be neither adopted nor removed while
            // their GPUs looked free: better not to start.
            if !guard.reconcile(node).await {
                return Err(ActivatorError::Reconcile(name));
            }
        }
        tracing::info!(functions = self.functions().len(), "state restored");
        Ok(())
    }

    /// The right to reconcile `node`, unless a reconcile of it is under way.
    pub fn begin_reconcile(&self, node: &str) -> Option<ReconcileGuard> {
        let fresh = self
            .inner
            .reconciling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.to_string());
        fresh.then(|| ReconcileGuard {
            activator: self.clone(),
            node: node.to_string(),
        })
    }

    fn live_instance_ids(&self) -> HashSet<String> {
        self.functions()
            .iter()
            .flat_map(|f| {
                f.lock()
                    .instances
                    .iter()
                    .map(|i| i.id.clone())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    async fn reconcile_node(&self, node: Arc<dyn Node>) -> bool {
        let containers = match node.list_managed().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(node = %node.name(), error = %e, "cannot list containers; reconciling later");
                return false;
            }
        };
        let records = match self.inner.store.instances().await {
            Ok(r) => r,
            Err(e) => {
                // Without the records every container would look like an orphan.
                tracing::error!(node = %node.name(), error = %e, "cannot read instance records; not reconciling");
                return false;
            }
        };
        let mut records: HashMap<String, InstanceRecord> = records
            .into_iter()
            .filter(|r| r.node == node.name())
            .map(|r| (r.id.clone(), r))
            .collect();
        let live = self.live_instance_ids();
        let devices = crate::gpu::device_ids(&node.gpus().await);
        let (mut adopted, mut removed) = (0, 0);
        for c in containers {
            if live.contains(&c.instance) {
                records.remove(&c.instance);
                continue;
            }
            let record = records.remove(&c.instance);
            let gpus_present = c.gpus.iter().all(|g| devices.contains(&g.device_id));
            let adoptable = match &record {
                Some(r) if gpus_present => self.adoptable(node.as_ref(), &c, r).await,
                _ => None,
            };
            let started_ms = record.as_ref().map_or(0, |r| r.started_ms);
            let adopted_now = adoptable.is_some_and(|(f, revision)| {
                self.adopt(node.as_ref(), &c, f, revision, started_ms)
            });
            if adopted_now {
                adopted += 1;
                continue;
            }
            let loading = record.as_ref().filter(|r| gpus_present && r.ready_ms == 0);
            if loading.is_some_and(|r| self.adopt_starting(&node, &c, r)) {
                adopted += 1;
                continue;
            }
            let why = if gpus_present {
                "no record explains it"
            } else {
                "its GPU is gone from the node"
            };
            tracing::info!(function = %c.function, container = %c.container_id, node = %node.name(), reason = why, "removing container");
            if let Err(e) = node.stop(&c.container_id).await {
                tracing::warn!(container = %c.container_id, error = %e, "could not remove container");
            }
            if record.is_some() {
                self.forget_record(&c.function, &c.instance).await;
            }
            removed += 1;
        }
        let stale: Vec<_> = records
            .values()
            .map(|r| (r.function.clone(), r.id.clone()))
            .collect();
        self.forget_records(&stale).await;
        tracing::info!(node = %node.name(), adopted, removed, stale_records = records.len(), "node reconciled");
        self.reaper().notify_one();
        true
    }

    /// Deletes an instance record; a failure is logged (the next reconcile retries it).
    pub(super) async fn forget_record(&self, function: &str, instance: &str) {
        if let Err(e) = self.inner.store.delete_instance(function, instance).await {
            tracing::warn!(function, instance, error = %e, "could not delete instance record");
        }
    }

    /// Deletes instance records, `(function, instance)`, in one write; a failure is logged.
    pub(super) async fn forget_records(&self, which: &[(String, String)]) {
        if which.is_empty() {
            return;
        }
        if let Err(e) = self.inner.store.delete_instances(which).await {
            tracing::warn!(records = which.len(), error = %e, "could not delete instance records");
        }
    }

    fn adopt(
        &self,
        node: &dyn Node,
        c: &ManagedContainer,
        f: Arc<Function>,
        revision: Arc<Revision>,
        started_ms: u64,
    ) -> bool {
        let Some(reservation) = self.scheduler().adopt(node.name(), c.gpus.clone()) else {
            return false;
        };
        let ledger = &self.inner.ledger;
        let mut inst = Instance::starting(c.instance.clone(), revision, reservation, ledger);
        inst.set_started_ms(started_ms);
        inst.container_id = Some(c.container_id.clone());
        inst.endpoint = c.endpoint;
        let mut st = f.lock();
        if st.removed {
            return false;
        }
        let phase = if !c.running {
            Phase::Parked
        } else if c.paused {
            Phase::Paused
        } else if inst.revision.id != st.revision.id {
            Phase::Draining
        } else {
            Phase::Ready
        };
        st.instances.push(inst.adopted(phase, Instant::now()));
        f.dispatch(&mut st);
        tracing::info!(function = %c.function, instance = %c.instance, node = %node.name(), ?phase, "adopted container");
        true
    }

    /// Adopts a container that was still starting when the gateway went away, if it is of
    /// the current revision and within its start timeout; its start goes on.
    fn adopt_starting(
        &self,
        node: &Arc<dyn Node>,
        c: &ManagedContainer,
        record: &InstanceRecord,
    ) -> bool {
        let (Some(f), Some(endpoint)) = (self.function(&c.function), c.endpoint) else {
            return false;
        };
        let revision = f.revision();
        let elapsed =
            Duration::from_millis(crate::store::now_ms().saturating_sub(record.started_ms));
        let within = record.started_ms > 0 && elapsed < revision.manifest.readiness.start_timeout;
        if !c.running || c.paused || revision.id != c.revision || !within {
            return false;
        }
        let Some(reservation) = self.scheduler().adopt(node.name(), c.gpus.clone()) else {
            return false;
        };
        let ledger = &self.inner.ledger;
        let mut inst =
            Instance::starting(c.instance.clone(), revision.clone(), reservation, ledger);
        inst.container_id = Some(c.container_id.clone());
        inst.endpoint = Some(endpoint);
        inst.set_started_ms(record.started_ms);
        inst.adopted = true;
        {
            let mut st = f.lock();
            if st.removed {
                return false;
            }
            st.instances.push(inst);
        }
        tracing::info!(function = %c.function, instance = %c.instance, node = %node.name(), loading_ms = elapsed.as_millis() as u64, "adopted a container still starting; waiting for it");
        self.resume_start(ResumedStart {
            f,
            id: c.instance.clone(),
            revision,
            node: node.clone(),
            gpus: c.gpus.clone(),
            started: crate::node::Started {
                container_id: c.container_id.clone(),
                endpoint,
            },
            started_ms: record.started_ms,
        });
        true
    }

    async fn adoptable(
        &self,
        node: &dyn Node,
        c: &ManagedContainer,
        record: &InstanceRecord,
    ) -> Option<(Arc<Function>, Arc<Revision>)> {
        let f = self.function(&c.function)?;
        let current = f.revision();
        let revision = if current.id == c.revision {
            current
        } else {
            let rev = self.inner.store.revision(&c.function, &c.revision).ok()??;
            Arc::new(Revision {
                id: rev.id,
                manifest: Arc::new(rev.manifest),
            })
        };
        if !c.running {
            // Parked (stopped, kept): it is started again, and probed, when a request
            // needs it. Only one that was ready once: a container that stopped while it
            // was still starting is not a parked instance (one that crashed after it was
            // ready is found out by its first restart, which fails and is replaced).
            let parked = revision.manifest.scale.on_idle == OnIdle::Park && record.ready_ms > 0;
            return parked.then_some((f, revision));
        }
        let endpoint = c.endpoint?;
        if c.paused {
            // Frozen: it cannot answer a probe, and will be probed by use once resumed.
            return Some((f, revision));
        }
        let path = revision.manifest.readiness.http_path.as_deref();
        readiness::wait_ready(node, &c.container_id, endpoint, path, ADOPT_PROBE_TIMEOUT)
            .await
            .ok()
            .map(|()| (f, revision))
    }
}
