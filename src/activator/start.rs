//! Cold start: place an instance, start its container, wait for readiness, release the
//! queue to it. A failed start removes the container, records the failure (with the
//! container's last output) so the function backs off, and answers the waiting requests
//! when nothing else could serve them.

use std::sync::Arc;

use tracing::Instrument;

use super::function::{FnState, Function};
use super::instance::Instance;
use super::{AcquireError, Activator, Revision};
use crate::model::GpuAssignment;
use crate::model::Phase;
use crate::node::{InstanceSpec, Node, NodeError, Started};
use crate::readiness::NotReady;
use crate::scheduler::PlacementError;
use crate::store::{self, InstanceRecord};

/// Lines of container output kept in a start failure's message.
const FAILURE_LOG_LINES: usize = 20;

/// Why a start failed.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    NotReady(#[from] NotReady),
    #[error("cancelled")]
    Cancelled,
}

impl StartError {
    /// 503 when the platform could not run the instance, 502 when the container misbehaved.
    fn status(&self) -> u16 {
        match self {
            StartError::NotReady(_) => 502,
            _ => 503,
        }
    }
}

impl Activator {
    /// Places and starts one instance of the current revision; false when no node can take it.
    pub(super) fn start_instance(&self, f: &Arc<Function>, st: &mut FnState) -> bool {
        let reservation = match self.scheduler().place(st.revision.manifest.gpu.as_ref()) {
            Ok(r) => r,
            Err(e) => {
                let reason = e.to_string();
                if st.unschedulable.as_deref() != Some(reason.as_str()) {
                    tracing::info!(function = %f.name(), reason = %reason, "cannot place an instance");
                }
                // Capacity held by others may free up: requests keep waiting. A requirement
                // no node meets will not: they are answered now.
                if !matches!(e, PlacementError::Busy { .. }) {
                    for w in st.queue.drain(..) {
                        let _ = w.tx.send(Err(AcquireError::NoCapacity {
                            function: f.name().to_string(),
                            reason: reason.clone(),
                        }));
                    }
                }
                st.unschedulable = Some(reason);
                return false;
            }
        };
        st.unschedulable = None;
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let revision = st.revision.clone();
        let node = reservation.node().clone();
        let gpus = reservation.gpus().to_vec();
        st.instances.push(Instance::starting(
            id.clone(),
            revision.clone(),
            reservation,
        ));
        st.starts += 1;
        let span = tracing::info_span!("cold_start", function = %f.name(), instance = %id, node = %node.name());
        let this = self.clone();
        let f = f.clone();
        let shutdown = self.inner.shutdown.clone();
        self.inner.tracker.spawn(
            async move {
                tokio::select! {
                    _ = this.cold_start(&f, &id, revision, node, gpus) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
            .instrument(span),
        );
        true
    }

    async fn cold_start(
        &self,
        f: &Arc<Function>,
        id: &str,
        revision: Arc<Revision>,
        node: Arc<dyn Node>,
        gpus: Vec<GpuAssignment>,
    ) {
        let began = tokio::time::Instant::now();
        let spec = InstanceSpec {
            function: f.name().to_string(),
            revision: revision.id.clone(),
            instance: id.to_string(),
            manifest: revision.manifest.clone(),
            gpus: gpus.clone(),
        };
        let mut container = None;
        let result = async {
            let started = match node.start(&spec).await {
                Ok(s) => s,
                Err(NodeError::ExitedAtStart {
                    container_id,
                    code,
                    status,
                }) => {
                    container = Some(container_id);
                    return Err(NotReady::Exited { code, status }.into());
                }
                Err(e) => return Err(e.into()),
            };
            container = Some(started.container_id.clone());
            if !set_container(f, id, &started) {
                return Err(StartError::Cancelled);
            }
            self.inner
                .prober
                .wait_ready(
                    node.as_ref(),
                    &started.container_id,
                    started.endpoint,
                    &revision.manifest.readiness,
                )
                .await?;
            Ok(started)
        }
        .await;
        match result {
            Ok(started) => {
                tracing::info!(elapsed_ms = began.elapsed().as_millis() as u64, endpoint = %started.endpoint, "instance ready");
                if self.mark_ready(f, id) {
                    let record = InstanceRecord {
                        id: id.to_string(),
                        function: f.name().to_string(),
                        revision: revision.id.clone(),
                        node: node.name().to_string(),
                        container_id: started.container_id.clone(),
                        endpoint: started.endpoint.to_string(),
                        ready_ms: store::now_ms(),
                        gpus,
                    };
                    if let Err(e) = self.inner.store.put_instance(&record).await {
                        tracing::warn!(error = %e, "could not record instance; it will be removed at the next restart");
                    }
                } else {
                    let _ = node.stop(&started.container_id).await;
                }
            }
            Err(StartError::Cancelled) => {
                if let Some(cid) = container {
                    let _ = node.stop(&cid).await;
                }
            }
            Err(e) => {
                let mut message = e.to_string();
                if let Some(cid) = &container {
                    if let Ok(logs) = node.logs(cid, FAILURE_LOG_LINES).await {
                        let logs = logs.trim();
                        if !logs.is_empty() {
                            message = format!("{message}; last output: {logs}");
                        }
                    }
                    if let Err(stop) = node.stop(cid).await {
                        tracing::warn!(container = %cid, error = %stop, "could not remove failed container");
                    }
                }
                tracing::warn!(error = %message, "cold start failed");
                let mut st = f.lock();
                st.instances.retain(|i| i.id != id);
                // A start of a revision that is no longer current says nothing of the
                // current one.
                if revision.id == st.revision.id {
                    let backoff = st.record_failure(message.clone(), e.status());
                    tracing::info!(
                        backoff_ms = backoff.as_millis() as u64,
                        "backing off before the next start"
                    );
                    if !st.can_serve_soon() {
                        fail_waiters(f, &mut st, &message, e.status());
                    }
                }
                self.scale_up(f, &mut st);
            }
        }
    }

    /// Marks the instance ready, drains older revisions, releases the queue.
    fn mark_ready(&self, f: &Arc<Function>, id: &str) -> bool {
        let mut st = f.lock();
        let current = st.revision.id.clone();
        let Some(inst) = st.instances.iter_mut().find(|i| i.id == id) else {
            return false;
        };
        if !inst.become_(Phase::Ready) {
            return false;
        }
        inst.last_used = tokio::time::Instant::now();
        inst.ready_at = inst.last_used;
        let takes_over = inst.revision.id == current && !inst.evacuating;
        let superseded = inst.revision.id != current;
        if superseded
            && st
                .instances
                .iter()
                .any(|i| i.revision.id == current && i.phase == Phase::Ready)
        {
            // An old revision's start that finished after the new revision took over.
            if let Some(inst) = st.instances.iter_mut().find(|i| i.id == id) {
                inst.become_(Phase::Draining);
            }
            f.wake_reaper();
        }
        if takes_over {
            st.failure = None;
            let mut drained = false;
            // Older revisions, and instances waiting to leave a draining node, make way.
            for old in st
                .instances
                .iter_mut()
                .filter(|i| i.id != id && (i.revision.id != current || i.evacuating))
            {
                drained |= old.become_(Phase::Draining);
            }
            if drained {
                f.wake_reaper();
            }
        }
        f.dispatch(&mut st);
        self.scale_up(f, &mut st);
        true
    }
}

fn set_container(f: &Function, id: &str, started: &Started) -> bool {
    let mut st = f.lock();
    match st.instances.iter_mut().find(|i| i.id == id) {
        Some(inst) => {
            inst.container_id = Some(started.container_id.clone());
            inst.endpoint = Some(started.endpoint);
            true
        }
        None => false,
    }
}

/// Answers every waiting request with a start failure.
fn fail_waiters(f: &Function, st: &mut FnState, message: &str, status: u16) {
    let retry_after = st
        .failure
        .as_ref()
        .map(|fl| {
            fl.retry_at
                .saturating_duration_since(tokio::time::Instant::now())
        })
        .unwrap_or_default();
    for w in st.queue.drain(..) {
        let _ = w.tx.send(Err(AcquireError::StartFailed {
            function: f.name().to_string(),
            message: message.to_string(),
            status,
            retry_after,
        }));
    }
}
