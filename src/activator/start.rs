//! Cold start: place an instance, start its container, wait for readiness, release the
//! queue to it. A failed start removes the container, records the failure (with the
//! container's last output) so the function backs off, and answers the waiting requests
//! when nothing else could serve them.

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use super::function::{FnState, Function};
use super::instance::Instance;
use super::{AcquireError, Activator, Revision, StartFault};
use crate::model::Phase;
use crate::model::{short_id, GpuAssignment, SecretEnv};
use crate::node::{InstanceSpec, Node, NodeError, Started};
use crate::readiness::{self, NotReady};
use crate::scheduler::{Needs, PlacementError};
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
    /// A secret the manifest names is gone (or unreadable).
    #[error("secret `{secret}` (for `env.{variable}`) is not set: set it with `ember secret set {secret}`")]
    MissingSecret { variable: String, secret: String },
}

impl StartError {
    fn fault(&self) -> StartFault {
        match self {
            StartError::NotReady(_) => StartFault::Container,
            _ => StartFault::Platform,
        }
    }

    /// What a client may read: the node's internals stay in the log.
    fn public(&self) -> String {
        match self {
            StartError::Node(e) => e.public_message(),
            other => other.to_string(),
        }
    }
}

impl Activator {
    /// The values of the manifest's secret variables, read now: a secret set again since
    /// the deploy reaches the next instance.
    fn secret_env(&self, manifest: &crate::manifest::Manifest) -> Result<SecretEnv, StartError> {
        let mut env = SecretEnv::default();
        for (variable, secret) in manifest.secret_refs() {
            let missing = || StartError::MissingSecret {
                variable: variable.to_string(),
                secret: secret.to_string(),
            };
            let record = self.store().secret(secret).map_err(|e| {
                tracing::error!(%secret, error = %e, "cannot read a secret");
                missing()
            })?;
            env.0
                .insert(variable.to_string(), record.ok_or_else(missing)?.value);
        }
        Ok(env)
    }
}

/// One cold start's facts, for the steps after the container is up.
struct Start {
    f: Arc<Function>,
    id: String,
    revision: Arc<Revision>,
    node: Arc<dyn Node>,
    gpus: Vec<GpuAssignment>,
    /// When it began (unix ms), kept in its record so a restart knows how long it has run.
    started_ms: u64,
}

impl Activator {
    /// Places and starts one instance of the current revision; false when no node can take it.
    pub(super) fn start_instance(&self, f: &Arc<Function>, st: &mut FnState) -> bool {
        let placing = std::time::Instant::now();
        let reservation = match self.scheduler().place(Needs::of(&st.revision.manifest)) {
            Ok(r) => {
                self.inner
                    .ledger
                    .metrics
                    .placed(f.name(), placing.elapsed());
                r
            }
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
        let id = short_id();
        let revision = st.revision.clone();
        let node = reservation.node().clone();
        let gpus = reservation.gpus().to_vec();
        let ledger = &self.inner.ledger;
        let instance = Instance::starting(id.clone(), revision.clone(), reservation, ledger);
        let started_ms = instance.started_ms;
        st.instances.push(instance);
        st.starts += 1;
        let span = tracing::info_span!("cold_start", function = %f.name(), instance = %id, node = %node.name());
        let this = self.clone();
        let start = Start {
            f: f.clone(),
            id,
            revision,
            node,
            gpus,
            started_ms,
        };
        let shutdown = self.inner.shutdown.clone();
        self.inner.tracker.spawn(
            async move {
                tokio::select! {
                    _ = this.cold_start(start) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
            .instrument(span),
        );
        true
    }

    async fn cold_start(&self, start: Start) {
        let began = tokio::time::Instant::now();
        let mut container = None;
        match self.start_container(&start, &mut container).await {
            Ok((started, loading)) => {
                let elapsed_ms = began.elapsed().as_millis() as u64;
                tracing::info!(elapsed_ms, endpoint = %started.endpoint, "instance ready");
                let metrics = &self.inner.ledger.metrics;
                metrics.start_ended(start.f.name(), start.node.name(), "ready");
                self.on_ready(&start, started, Some(loading)).await;
            }
            Err(StartError::Cancelled) => {
                if let Some(cid) = container {
                    stop_quietly(start.node.as_ref(), &cid).await;
                    self.inner
                        .store
                        .delete_instance_later(start.f.name(), &start.id);
                }
            }
            Err(e) => {
                let metrics = &self.inner.ledger.metrics;
                metrics.start_ended(start.f.name(), start.node.name(), "failed");
                self.on_failure(&start, container, e).await
            }
        }
    }

    /// Goes on with the start of a container found still loading after a restart: its
    /// readiness is awaited for what is left of its start timeout, then it serves, or
    /// fails, as a fresh start would. The instance is in the function's list already.
    pub(super) fn resume_start(&self, resumed: ResumedStart) {
        let ResumedStart {
            f,
            id,
            revision,
            node,
            gpus,
            started,
            started_ms,
        } = resumed;
        let path = revision.manifest.readiness.http_path.clone();
        let elapsed = Duration::from_millis(store::now_ms().saturating_sub(started_ms));
        let left = revision
            .manifest
            .readiness
            .start_timeout
            .saturating_sub(elapsed);
        let start = Start {
            gpus,
            f,
            id,
            revision,
            node,
            started_ms,
        };
        let span = tracing::info_span!("resumed_start", function = %start.f.name(), instance = %start.id, node = %start.node.name());
        let (this, shutdown) = (self.clone(), self.inner.shutdown.clone());
        let work = async move {
            let cid = started.container_id.clone();
            let ready = readiness::wait_ready(
                start.node.as_ref(),
                &cid,
                started.endpoint,
                path.as_deref(),
                left,
            )
            .await;
            match ready {
                Ok(()) => {
                    tracing::info!(
                        loading_ms = elapsed.as_millis() as u64 + left.as_millis() as u64,
                        "instance ready after the restart"
                    );
                    // Its length spans the restart: not one the keep-alive can learn from.
                    this.on_ready(&start, started, None).await;
                }
                Err(e) => this.on_failure(&start, Some(cid), e.into()).await,
            }
        };
        self.inner.tracker.spawn(
            async move {
                tokio::select! {
                    () = work => {}
                    _ = shutdown.cancelled() => {}
                }
            }
            .instrument(span),
        );
    }

    /// Creates and starts the container, then waits until it is ready; with it, how long
    /// that took once the image was on the node (what the keep-alive policy learns: a
    /// pull is paid once per node, a load on every start). `container` is set as soon as
    /// there is one, so a failure can read its output and remove it.
    async fn start_container(
        &self,
        start: &Start,
        container: &mut Option<String>,
    ) -> Result<(Started, Duration), StartError> {
        let spec = InstanceSpec {
            function: start.f.name().to_string(),
            revision: start.revision.id.clone(),
            instance: start.id.clone(),
            manifest: start.revision.manifest.clone(),
            gpus: start.gpus.clone(),
            secrets: self.secret_env(&start.revision.manifest)?,
        };
        // How long the start takes once its image is on the node, for the keep-alive policy.
        let mut loading = tokio::time::Instant::now();
        let mut creating = self.inner.ledger.metrics.phase(start.f.name(), "create");
        let first = start.node.start(&spec).await;
        let created = match first {
            // The image is asked for only when the node lacks it: the usual start saves
            // the engine a round trip.
            Err(e) if e.is_image_missing() => {
                drop(creating);
                let image = start.revision.manifest.image.as_deref().unwrap_or_default();
                self.bring_image(&start.f, &start.id, &start.node, image)
                    .await
                    .ok_or(StartError::Cancelled)??;
                loading = tokio::time::Instant::now();
                creating = self.inner.ledger.metrics.phase(start.f.name(), "create");
                start.node.start(&spec).await
            }
            other => other,
        };
        let started = match created {
            Ok(s) => s,
            Err(NodeError::ExitedAtStart {
                container_id,
                code,
                status,
            }) => {
                *container = Some(container_id);
                return Err(NotReady::Exited { code, status }.into());
            }
            Err(e) => return Err(e.into()),
        };
        drop(creating);
        *container = Some(started.container_id.clone());
        if !set_container(&start.f, &start.id, &started) {
            return Err(StartError::Cancelled);
        }
        // Recorded while it loads, so a gateway restart adopts it instead of throwing the
        // load away; the writer's next batch puts it on disk within milliseconds, and the
        // readiness probes need not wait for that flush.
        self.inner
            .store
            .put_instance_later(&record(start, &started, 0));
        let readiness = &start.revision.manifest.readiness;
        let _ready = self.inner.ledger.metrics.phase(start.f.name(), "ready");
        readiness::wait_ready(
            start.node.as_ref(),
            &started.container_id,
            started.endpoint,
            readiness.http_path.as_deref(),
            readiness.start_timeout,
        )
        .await?;
        Ok((started, loading.elapsed()))
    }

    /// The container answers: the instance serves, and its record is kept for restarts.
    /// `loading` is how long the start took, when it is known.
    async fn on_ready(&self, start: &Start, started: Started, loading: Option<Duration>) {
        if !self.mark_ready(&start.f, &start.id, loading) {
            stop_quietly(start.node.as_ref(), &started.container_id).await;
            return;
        }
        let record = record(start, &started, store::now_ms());
        if let Err(e) = self.inner.store.put_instance(&record).await {
            tracing::warn!(error = %e, "could not record instance; it will be removed at the next restart");
        }
    }

    /// The start failed: the container's last output joins the reason, the container goes,
    /// the function backs off, and waiting requests are answered when nothing else serves.
    async fn on_failure(&self, start: &Start, container: Option<String>, e: StartError) {
        let (f, node) = (&start.f, start.node.as_ref());
        let mut message = e.to_string();
        let mut public = e.public();
        if let Some(cid) = &container {
            if let Ok(logs) = node.logs(cid, FAILURE_LOG_LINES).await {
                let logs = logs.trim();
                if !logs.is_empty() {
                    message = format!("{message}; last output: {logs}");
                    public = format!("{public}; last output: {logs}");
                }
            }
            let reason = format!("its start failed: {}", e.public());
            self.keep_output(super::logs::Gone {
                function: f.name(),
                instance: &start.id,
                revision: &start.revision.id,
                node,
                container: cid,
                reason: &reason,
            })
            .await;
            stop_quietly(node, cid).await;
            self.inner.store.delete_instance_later(f.name(), &start.id);
        }
        tracing::warn!(error = %message, "cold start failed");
        let mut st = f.lock();
        st.instances.retain(|i| i.id != start.id);
        // A start of a revision that is no longer current says nothing of the current one.
        if start.revision.id == st.revision.id {
            let backoff = st.record_failure(message, public.clone(), e.fault());
            tracing::info!(
                backoff_ms = backoff.as_millis() as u64,
                "backing off before the next start"
            );
            if !st.can_serve_soon() {
                fail_waiters(f, &mut st, &public, e.fault());
            }
        }
        self.scale_up(f, &mut st);
    }

    /// Marks the instance ready, tells the keep-alive policy how long a start of the
    /// current revision took, drains older revisions, releases the queue.
    fn mark_ready(&self, f: &Arc<Function>, id: &str, loading: Option<Duration>) -> bool {
        let mut st = f.lock();
        let current = st.revision.id.clone();
        let Some(inst) = st.instances.iter_mut().find(|i| i.id == id) else {
            return false;
        };
        if !inst.ready(tokio::time::Instant::now()) {
            return false;
        }
        let takes_over = inst.revision.id == current && !inst.evacuating;
        let superseded = inst.revision.id != current;
        if let Some(took) = loading.filter(|_| !superseded) {
            st.keep_alive.observe_start(took);
        }
        if superseded
            && st
                .instances
                .iter()
                .any(|i| i.revision.id == current && i.phase == Phase::Ready)
        {
            // An old revision's start that finished after the new revision took over.
            if let Some(inst) = st.instances.iter_mut().find(|i| i.id == id) {
                // Just made ready under this lock: it can always drain.
                let _ = inst.become_(Phase::Draining);
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

/// A start that a restart found under way, to go on with (`Activator::resume_start`).
pub(super) struct ResumedStart {
    pub f: Arc<Function>,
    pub id: String,
    pub revision: Arc<Revision>,
    pub node: Arc<dyn Node>,
    pub gpus: Vec<GpuAssignment>,
    pub started: Started,
    pub started_ms: u64,
}

/// The record of a started instance; `ready_ms` 0 while it is still starting.
fn record(start: &Start, started: &Started, ready_ms: u64) -> InstanceRecord {
    InstanceRecord {
        id: start.id.clone(),
        function: start.f.name().to_string(),
        revision: start.revision.id.clone(),
        node: start.node.name().to_string(),
        container_id: started.container_id.clone(),
        endpoint: started.endpoint.to_string(),
        ready_ms,
        started_ms: start.started_ms,
        gpus: start.gpus.clone(),
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

/// The instance's retirement signal, while it is in its function's list.
pub(super) fn retired_token(f: &Function, id: &str) -> Option<tokio_util::sync::CancellationToken> {
    let st = f.lock();
    st.instances
        .iter()
        .find(|i| i.id == id)
        .map(|i| i.retired.token().clone())
}

/// Removes a container whose instance will not serve; a failure is only logged.
async fn stop_quietly(node: &dyn Node, container: &str) {
    if let Err(e) = node.stop(container).await {
        tracing::warn!(container, error = %e, "could not remove container");
    }
}

/// Answers every waiting request with a start failure.
fn fail_waiters(f: &Function, st: &mut FnState, message: &str, fault: StartFault) {
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
            fault,
            retry_after,
        }));
    }
}
