//! Restart: rebuild the live state from the store and adopt the containers still running.
//!
//! A container is adopted when its labels name a deployed function and a known revision,
//! the store has a record of its instance, it runs, and it passes one readiness probe.
//! Every other container of this gateway is removed, and every record without a
//! container is deleted, so no orphan survives a restart and nothing is started twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::instance::{Instance, Phase};
use super::{Activator, ActivatorError, Function, Revision};
use crate::node::ManagedContainer;

/// How long an adopted container gets to answer its readiness probe.
const ADOPT_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

impl Activator {
    /// Loads deployed functions and adopts or removes the containers found on the nodes.
    pub async fn restore(&self) -> Result<(), ActivatorError> {
        let store = &self.inner.store;
        let mut revisions: HashMap<(String, String), Arc<Revision>> = HashMap::new();
        for record in store.functions()? {
            let Some(rev) = store.revision(&record.name, &record.revision)? else {
                tracing::warn!(function = %record.name, revision = %record.revision, "function's revision is missing from the store; skipping it");
                continue;
            };
            let revision = Arc::new(Revision {
                id: rev.id.clone(),
                manifest: Arc::new(rev.manifest),
            });
            revisions.insert((record.name.clone(), rev.id), revision.clone());
            let f = Arc::new(Function::new(revision, self.inner.reaper.clone()));
            self.write_functions().insert(record.name, f);
        }
        let mut records: HashMap<String, _> = store
            .instances()?
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
        let mut adopted = 0;
        let mut removed = 0;
        for node in self.scheduler().nodes() {
            let containers = match node.list_managed().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(node = %node.name(), error = %e, "cannot list containers; adoption skipped on this node");
                    continue;
                }
            };
            for c in containers {
                let record = records.remove(&c.instance);
                match self.adoptable(&c, record.is_some(), &mut revisions).await {
                    Some((f, revision)) => {
                        let Some(reservation) = self.scheduler().adopt(node.name(), c.gpus.clone())
                        else {
                            continue;
                        };
                        let mut inst =
                            Instance::starting(c.instance.clone(), revision, reservation);
                        inst.container_id = Some(c.container_id.clone());
                        inst.endpoint = c.endpoint;
                        inst.adopted = true;
                        inst.last_used = Instant::now();
                        let mut st = f.lock();
                        let current = inst.revision.id == st.revision.id;
                        inst.become_(Phase::Ready);
                        if !current {
                            inst.become_(Phase::Draining);
                        }
                        st.instances.push(inst);
                        adopted += 1;
                        tracing::info!(function = %c.function, instance = %c.instance, node = %node.name(), "adopted running container");
                    }
                    None => {
                        tracing::info!(function = %c.function, container = %c.container_id, node = %node.name(), "removing container no record explains");
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
        }
        for id in records.keys() {
            store.delete_instance(id).await?;
        }
        tracing::info!(
            functions = self.functions().len(),
            adopted,
            removed,
            stale_records = records.len(),
            "state restored"
        );
        self.reaper().notify_one();
        Ok(())
    }

    async fn adoptable(
        &self,
        c: &ManagedContainer,
        has_record: bool,
        revisions: &mut HashMap<(String, String), Arc<Revision>>,
    ) -> Option<(Arc<Function>, Arc<Revision>)> {
        if !has_record || !c.running {
            return None;
        }
        let f = self.function(&c.function)?;
        let key = (c.function.clone(), c.revision.clone());
        let revision = match revisions.get(&key) {
            Some(r) => r.clone(),
            None => {
                let rev = self.inner.store.revision(&c.function, &c.revision).ok()??;
                let r = Arc::new(Revision {
                    id: rev.id,
                    manifest: Arc::new(rev.manifest),
                });
                revisions.insert(key, r.clone());
                r
            }
        };
        let endpoint = c.endpoint?;
        let path = revision.manifest.readiness.http_path.clone();
        let ready = tokio::time::timeout(ADOPT_PROBE_TIMEOUT, async {
            loop {
                if self.inner.prober.probe(endpoint, path.as_deref()).await {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .is_ok();
        ready.then_some((f, revision))
    }
}
