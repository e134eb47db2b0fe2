//! Deploying and removing functions. Each function has its own lock, so a slow removal
//! (its containers stopped over the network) never holds up another function's deploy.

use std::sync::Arc;

use serde::Serialize;

use super::function::{self, Function};
use super::{AcquireError, Activator, ActivatorError, Revision};
use crate::manifest::Manifest;
use crate::store::{self, FunctionRecord, RevisionRecord};

/// What a deploy did.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize)]
pub struct DeployOutcome {
    /// Function name.
    pub name: String,
    /// The revision now current.
    pub revision: String,
    /// Whether the function is new.
    pub created: bool,
    /// Whether the revision changed (false: same manifest, nothing done).
    pub changed: bool,
}

impl Activator {
    /// Deploys a validated manifest: a new revision when it changed, nothing otherwise.
    pub async fn deploy(&self, manifest: Manifest) -> Result<DeployOutcome, ActivatorError> {
        let lock = self.function_lock(&manifest.name);
        let _one_at_a_time = lock.lock().await;
        let name = manifest.name.clone();
        let _claiming = match &manifest.openai {
            Some(_) => Some(self.inner.model_claims.lock().await),
            None => None,
        };
        self.check_model_claims(&manifest)?;
        let revision_id = manifest.revision_id();
        let existing = self.inner.store.function(&name)?;
        if let Some(existing) = &existing {
            if existing.revision == revision_id && self.function(&name).is_some() {
                return Ok(DeployOutcome {
                    name,
                    revision: revision_id,
                    created: false,
                    changed: false,
                });
            }
        }
        let now = store::now_ms();
        let record = FunctionRecord {
            name: name.clone(),
            revision: revision_id.clone(),
            created_ms: existing.as_ref().map_or(now, |e| e.created_ms),
            updated_ms: now,
        };
        let revision_record = RevisionRecord {
            id: revision_id.clone(),
            manifest: manifest.clone(),
            created_ms: now,
        };
        self.inner
            .store
            .put_deploy(&record, &revision_record)
            .await?;
        let revision = Arc::new(Revision {
            id: revision_id.clone(),
            manifest: Arc::new(manifest),
        });
        let created = match self.function(&name) {
            Some(f) => {
                let mut st = f.lock();
                if st.revision.manifest.scale.keep_alive != revision.manifest.scale.keep_alive
                    || st.revision.manifest.scale.idle_timeout
                        != revision.manifest.scale.idle_timeout
                {
                    st.keep_alive = function::keep_alive_policy(&revision.manifest.scale);
                }
                st.revision = revision;
                st.failure = None;
                // Keep serving on the old revision until the new one is ready, then drain.
                let serving_old = st.instances.iter().any(|i| i.phase.can_serve());
                if serving_old && st.current_instances() == 0 {
                    self.start_instance(&f, &mut st);
                }
                self.scale_up(&f, &mut st);
                false
            }
            None => {
                let f = Arc::new(Function::new(revision, self.inner.reaper.clone()));
                self.write_functions().insert(name.clone(), f.clone());
                let mut st = f.lock();
                self.scale_up(&f, &mut st);
                true
            }
        };
        // The new revision may add, change or drop an `[openai]` section.
        self.reindex_models();
        tracing::info!(function = %name, revision = %revision_id, created, "deployed");
        Ok(DeployOutcome {
            name,
            revision: revision_id,
            created,
            changed: true,
        })
    }

    /// Removes a function: its queue is answered, its containers removed (all at once),
    /// then its records deleted. Returns how many containers were removed.
    pub async fn remove(&self, name: &str) -> Result<usize, ActivatorError> {
        let lock = self.function_lock(name);
        let result = {
            let _one_at_a_time = lock.lock().await;
            self.remove_locked(name).await
        };
        self.prune_function_lock(name, lock);
        result
    }

    async fn remove_locked(&self, name: &str) -> Result<usize, ActivatorError> {
        let Some(f) = self.write_functions().remove(name) else {
            return Err(ActivatorError::NotFound(name.to_string()));
        };
        self.reindex_models();
        let (waiters, instances) = {
            let mut st = f.lock();
            st.removed = true;
            let waiters: Vec<_> = st.queue.drain(..).collect();
            let instances: Vec<_> = st.instances.drain(..).collect();
            (waiters, instances)
        };
        for w in waiters {
            let _ = w.tx.send(Err(AcquireError::Removed(name.to_string())));
        }
        // Open sockets close before their containers go.
        for inst in &instances {
            inst.retired.signal();
        }
        let stops = instances.iter().filter_map(|inst| {
            let cid = inst.container_id.as_ref()?;
            let node = inst.reservation.node().clone();
            Some(async move {
                match node.stop(cid).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(function = %name, node = %node.name(), container = %cid, error = %e, "could not remove container");
                        false
                    }
                }
            })
        });
        let removed = futures_util::future::join_all(stops)
            .await
            .into_iter()
            .filter(|stopped| *stopped)
            .count();
        // Records go last: a failure here leaves a function record without containers
        // (restored empty at the next start), never containers without records.
        self.inner.store.delete_function(name).await?;
        tracing::info!(function = %name, containers = removed, "removed");
        Ok(removed)
    }

    /// Forgets a function's lock once nothing else holds it.
    fn prune_function_lock(&self, name: &str, lock: Arc<tokio::sync::Mutex<()>>) {
        let mut locks = self
            .inner
            .function_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Ours and the map's: nobody waits on it.
        if Arc::strong_count(&lock) == 2 && self.function(name).is_none() {
            locks.remove(name);
        }
    }

    /// The lock that serialises deploys and removals of one function.
    fn function_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.inner
            .function_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone()
    }
}
