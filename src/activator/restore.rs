//! Restart and rejoin: rebuild the live state from the store, and reconcile what a node
//! runs with what the gateway knows.
//!
//! A container is adopted when its labels name a deployed function and a known revision,
//! the store has a record of its instance, it runs, its GPUs are still in the node's
//! inventory, and it passes one readiness probe. Every other container of this gateway on
//! the node is removed, and every record of the node without a container is deleted, so no
//! orphan survives and nothing runs twice. Instances the gateway already serves are left
//! alone, which makes reconciling a node that merely reconnects harmless.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::instance::Instance;
use super::{Activator, ActivatorError, Function, Revision};
use crate::model::Phase;
use crate::node::{ManagedContainer, Node};
use crate::readiness;
use crate::store::InstanceRecord;

/// How long an adopted container gets to answer its readiness probe.
const ADOPT_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

impl Activator {
    /// Loads deployed functions, then reconciles every node that is reachable now (the
    /// embedded one; agents are reconciled when they next report in).
    pub async fn restore(&self) -> Result<(), ActivatorError> {
        let store = &self.inner.store;
        for record in store.functions()? {
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
        for node in self.scheduler().live_nodes() {
            self.reconcile_node(node).await;
        }
        tracing::info!(functions = self.functions().len(), "state restored");
        Ok(())
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

    /// Adopts or removes the containers `node` runs for this gateway.
    pub async fn reconcile_node(&self, node: Arc<dyn Node>) {
        // Two reconciles of one node at once could both adopt the same container.
        let _one_at_a_time = self.inner.reconcile_lock.lock().await;
        let store = &self.inner.store;
        let containers = match node.list_managed().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(node = %node.name(), error = %e, "cannot list containers; reconciling later");
                return;
            }
        };
        let mut records: HashMap<String, InstanceRecord> = store
            .instances()
            .unwrap_or_default()
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
            let adoptable = if record.is_some() && gpus_present {
                self.adoptable(node.as_ref(), &c).await
            } else {
                None
            };
            let adopted_now = match adoptable {
                Some((f, revision)) => self.adopt(node.as_ref(), &c, f, revision),
                None => false,
            };
            if adopted_now {
                adopted += 1;
            } else {
                {
                    let why = if !gpus_present {
                        "its GPU is gone from the node"
                    } else {
                        "no record explains it"
                    };
                    tracing::info!(function = %c.function, container = %c.container_id, node = %node.name(), reason = why, "removing container");
                    if let Err(e) = node.stop(&c.container_id).await {
                        tracing::warn!(container = %c.container_id, error = %e, "could not remove container");
                    }
                    if record.is_some() {
                        let _ = store.delete_instance(&c.instance).await;
                    }
                    removed += 1;
                }
            }
        }
        for id in records.keys() {
            let _ = store.delete_instance(id).await;
        }
        tracing::info!(node = %node.name(), adopted, removed, stale_records = records.len(), "node reconciled");
        self.reaper().notify_one();
    }

    fn adopt(
        &self,
        node: &dyn Node,
        c: &ManagedContainer,
        f: Arc<Function>,
        revision: Arc<Revision>,
    ) -> bool {
        let Some(reservation) = self.scheduler().adopt(node.name(), c.gpus.clone()) else {
            return false;
        };
        let mut inst = Instance::starting(c.instance.clone(), revision, reservation);
        inst.container_id = Some(c.container_id.clone());
        inst.endpoint = c.endpoint;
        let mut st = f.lock();
        if st.removed {
            return false;
        }
        let phase = if c.paused {
            Phase::Paused
        } else if inst.revision.id != st.revision.id {
            Phase::Draining
        } else {
            Phase::Ready
        };
        st.instances.push(inst.adopted(phase, Instant::now()));
        f.dispatch(&mut st);
        tracing::info!(function = %c.function, instance = %c.instance, node = %node.name(), "adopted running container");
        true
    }

    async fn adoptable(
        &self,
        node: &dyn Node,
        c: &ManagedContainer,
    ) -> Option<(Arc<Function>, Arc<Revision>)> {
        if !c.running {
            return None;
        }
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
