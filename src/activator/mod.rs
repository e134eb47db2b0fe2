//! The activator: turns "a request for function F" into "a permit on a ready instance of F",
//! cold-starting instances when there is none free.
//!
//! It owns the live state of every function (`function.rs`), the instance lifecycle
//! (`instance.rs`), cold starts (`start.rs`), retiring idle and draining instances
//! (`reap.rs`) and adopting containers after a restart (`restore.rs`). It keeps the
//! store in step with deploys and instances, and leaves HTTP to the gateway and
//! placement to the scheduler.
//!
//! Requests that find no free slot wait in the function's bounded queue; many waiting
//! requests start as many instances as their number needs (by `concurrency`), not one each.

mod function;
mod instance;
mod nodes;
pub mod reap;
mod restore;
mod start;
mod tiers;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use function::{backoff, Failure, Function, Permit, BACKOFF_BASE, BACKOFF_MAX};
pub use instance::InstanceStatus;
pub use reap::run as run_reaper;

use crate::manifest::Manifest;
use crate::model::Phase;
use crate::scheduler::Scheduler;
use crate::store::{self, FunctionRecord, RevisionRecord, Store, StoreError};

/// An immutable revision: its id and manifest.
#[derive(Debug)]
pub struct Revision {
    /// Revision id (hash of the manifest).
    pub id: String,
    /// The manifest.
    pub manifest: Arc<Manifest>,
}

/// Why a request got no instance.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AcquireError {
    /// The function's queue is full.
    #[error("function `{function}` has {capacity} requests waiting already (queue.capacity); retry shortly")]
    QueueFull {
        /// Function name.
        function: String,
        /// Its queue capacity.
        capacity: u32,
    },
    /// The request waited in the queue past `queue.timeout`.
    #[error("function `{function}` had no free instance within {} (queue.timeout)", humantime::format_duration(*waited))]
    QueueTimeout {
        /// Function name.
        function: String,
        /// How long it waited.
        waited: Duration,
    },
    /// Starting an instance failed, now or recently.
    #[error("function `{function}` could not start: {message}")]
    StartFailed {
        /// Function name.
        function: String,
        /// Why, with the container's last output when there is some (client-safe).
        message: String,
        /// Whether the container misbehaved or the platform could not run it.
        fault: StartFault,
        /// When a new start will be tried.
        retry_after: Duration,
    },
    /// No node has room for an instance (see the reason), or none meets the requirements.
    #[error("function `{function}` cannot be placed: {reason}")]
    NoCapacity {
        /// Function name.
        function: String,
        /// Which requirement no node meets, node by node.
        reason: String,
    },
    /// The gateway holds as many waiting requests (or bytes of their bodies) as it may.
    #[error("the gateway has {queued} requests ({bytes} body bytes) waiting already, its limit; retry shortly")]
    GatewayFull {
        /// Requests waiting across functions.
        queued: usize,
        /// Announced body bytes of those requests.
        bytes: u64,
    },
    /// The function was removed while the request waited.
    #[error("function `{0}` was removed")]
    Removed(String),
    /// The gateway is shutting down.
    #[error("the gateway is shutting down")]
    ShuttingDown,
}

/// Whose fault a failed start was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFault {
    /// The container misbehaved: it exited, or never became ready.
    Container,
    /// The platform could not run it: a node or engine failure, a missing image.
    Platform,
}

/// Activator failures outside the request path.
#[derive(Debug, thiserror::Error)]
pub enum ActivatorError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No such function.
    #[error("function `{0}` is not deployed")]
    NotFound(String),
}

/// What a deploy did.
#[derive(Debug, Clone, Serialize)]
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

/// A function's status for `ember ls` and the API.
#[derive(Debug, Clone, Serialize)]
pub struct FunctionStatus {
    /// Function name.
    pub name: String,
    /// Current revision.
    pub revision: String,
    /// Image of the current revision.
    pub image: String,
    /// Instances starting.
    pub starting: usize,
    /// Instances the autoscaler wants.
    pub desired: usize,
    /// Instances ready.
    pub ready: usize,
    /// Instances paused (or pausing, resuming).
    pub paused: usize,
    /// Instances draining or stopping.
    pub draining: usize,
    /// Requests in flight.
    pub in_flight: u32,
    /// Requests waiting.
    pub queued: usize,
    /// Starts attempted since the gateway started.
    pub starts: u64,
    /// The current run of failed starts, if any.
    pub failure: Option<FailureStatus>,
    /// Why no instance can be placed now, if so.
    pub unschedulable: Option<String>,
    /// Each instance.
    pub instances: Vec<InstanceStatus>,
}

/// A run of failed starts, as shown to users.
#[derive(Debug, Clone, Serialize)]
pub struct FailureStatus {
    /// The last reason.
    pub message: String,
    /// Failures in a row.
    pub consecutive: u32,
    /// Milliseconds until a new start may be tried (0: now).
    pub retry_in_ms: u64,
}

/// Gateway-wide caps on buffered requests, so a flood on one function cannot take the
/// gateway's memory.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests waiting for an instance, across functions.
    pub max_queued: usize,
    /// Body bytes of those requests (announced length, or `UNKNOWN_BODY_BYTES`).
    pub max_queued_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_queued: 10_000,
            max_queued_bytes: 256 << 20,
        }
    }
}

/// What a waiting request with a body of unknown length is counted as: about what the
/// socket and HTTP buffers hold of it while it waits unread.
pub const UNKNOWN_BODY_BYTES: u64 = 64 << 10;

struct Inner {
    functions: RwLock<HashMap<String, Arc<Function>>>,
    limits: Limits,
    queued: AtomicUsize,
    queued_bytes: AtomicU64,
    scheduler: Scheduler,
    store: Store,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    reaper: Arc<Notify>,
    deploy_lock: tokio::sync::Mutex<()>,
    reconcile_lock: tokio::sync::Mutex<()>,
}

/// The activator. Cheap to clone.
#[derive(Clone)]
pub struct Activator {
    inner: Arc<Inner>,
}

impl Activator {
    /// An activator over the scheduler's nodes; background work goes on `tracker` and
    /// stops with `shutdown`.
    pub fn new(
        scheduler: Scheduler,
        store: Store,
        tracker: TaskTracker,
        shutdown: CancellationToken,
        limits: Limits,
    ) -> Activator {
        Activator {
            inner: Arc::new(Inner {
                functions: RwLock::new(HashMap::new()),
                limits,
                queued: AtomicUsize::new(0),
                queued_bytes: AtomicU64::new(0),
                scheduler,
                store,
                tracker,
                shutdown,
                reaper: Arc::new(Notify::new()),
                deploy_lock: tokio::sync::Mutex::new(()),
                reconcile_lock: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The scheduler (and through it the nodes).
    pub fn scheduler(&self) -> &Scheduler {
        &self.inner.scheduler
    }

    pub(crate) fn reaper(&self) -> &Notify {
        &self.inner.reaper
    }

    /// The function named `name`, if deployed.
    pub fn function(&self, name: &str) -> Option<Arc<Function>> {
        self.read_functions().get(name).cloned()
    }

    fn read_functions(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Function>>> {
        self.inner
            .functions
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn write_functions(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Function>>> {
        self.inner
            .functions
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Every deployed function, by name.
    pub fn functions(&self) -> Vec<Arc<Function>> {
        let mut all: Vec<_> = self.read_functions().values().cloned().collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }

    /// A permit on a ready instance of `f`, waiting in its queue (and cold-starting an
    /// instance) when none is free.
    pub async fn acquire(
        &self,
        f: &Arc<Function>,
        body_bytes: Option<u64>,
    ) -> Result<Permit, AcquireError> {
        let (rx, waiter_id, wait, buffered) = {
            let mut st = f.lock();
            if st.removed {
                return Err(AcquireError::Removed(f.name().to_string()));
            }
            if self.inner.shutdown.is_cancelled() {
                return Err(AcquireError::ShuttingDown);
            }
            st.arrival(Instant::now());
            if let Some(permit) = f.take_slot(&mut st) {
                return Ok(permit);
            }
            let m = st.revision.manifest.clone();
            if st.queue.len() >= m.queue.capacity as usize {
                return Err(AcquireError::QueueFull {
                    function: f.name().to_string(),
                    capacity: m.queue.capacity,
                });
            }
            let now = Instant::now();
            if !st.can_serve_soon() {
                if let Some(failure) = st.backing_off(now) {
                    return Err(AcquireError::StartFailed {
                        function: f.name().to_string(),
                        message: format!(
                            "{} ({} failed starts in a row; the next try is in {})",
                            failure.public,
                            failure.consecutive,
                            humantime::format_duration(round_up_secs(failure.retry_at - now))
                        ),
                        fault: failure.fault,
                        retry_after: failure.retry_at - now,
                    });
                }
            }
            let buffered = self.buffer(body_bytes.unwrap_or(UNKNOWN_BODY_BYTES))?;
            let (tx, rx) = oneshot::channel();
            let id = st.next_waiter;
            st.next_waiter += 1;
            st.queue.push_back(function::Waiter { id, tx });
            self.scale_up(f, &mut st);
            (rx, id, m.queue.timeout, buffered)
        };
        // Removes the waiter if this future is dropped (client gone) or times out.
        let guard = WaiterGuard {
            function: f,
            id: waiter_id,
            armed: true,
        };
        let outcome = tokio::time::timeout(wait, rx).await;
        drop(buffered);
        let mut guard = guard;
        match outcome {
            Ok(Ok(result)) => {
                guard.armed = false;
                result
            }
            Ok(Err(_)) => {
                guard.armed = false;
                Err(AcquireError::Removed(f.name().to_string()))
            }
            Err(_) => match f.lock().unschedulable.clone() {
                Some(reason) => Err(AcquireError::NoCapacity {
                    function: f.name().to_string(),
                    reason,
                }),
                None => Err(AcquireError::QueueTimeout {
                    function: f.name().to_string(),
                    waited: wait,
                }),
            },
        }
    }

    /// Starts as many instances as the queue needs, within `scale.max`, unless the
    /// function is backing off after failed starts.
    fn scale_up(&self, f: &Arc<Function>, st: &mut function::FnState) {
        let want = st.needed();
        self.scale_to(f, st, want);
    }

    /// Brings the current revision to `want` active instances (resuming paused ones
    /// first), unless the function is backing off after failed starts.
    fn scale_to(&self, f: &Arc<Function>, st: &mut function::FnState, want: usize) {
        if self.inner.shutdown.is_cancelled() || st.removed {
            return;
        }
        let want = want.min(st.revision.manifest.scale.max as usize);
        let have = st.current_instances();
        if want <= have {
            // Nothing more is needed, so nothing is waiting for room.
            st.unschedulable = None;
        }
        for _ in have..want {
            // A paused instance comes back in milliseconds; a cold start takes seconds.
            if self.wake_one(f, st) {
                continue;
            }
            // After failed starts, no new one before the back-off ends.
            if st.backing_off(Instant::now()).is_some() || !self.start_instance(f, st) {
                break;
            }
        }
    }

    /// Answers every waiting request with `ShuttingDown` (503): nothing will start now.
    pub fn shut_down_queues(&self) {
        for f in self.functions() {
            let waiters: Vec<_> = f.lock().queue.drain(..).collect();
            for w in waiters {
                let _ = w.tx.send(Err(AcquireError::ShuttingDown));
            }
        }
    }

    /// Deploys a validated manifest: a new revision when it changed, nothing otherwise.
    pub async fn deploy(&self, manifest: Manifest) -> Result<DeployOutcome, ActivatorError> {
        let _one_at_a_time = self.inner.deploy_lock.lock().await;
        let name = manifest.name.clone();
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
        tracing::info!(function = %name, revision = %revision_id, created, "deployed");
        Ok(DeployOutcome {
            name,
            revision: revision_id,
            created,
            changed: true,
        })
    }

    /// Removes a function: its queue is answered, its containers removed, its records deleted.
    /// Returns how many containers were removed.
    pub async fn remove(&self, name: &str) -> Result<usize, ActivatorError> {
        let _one_at_a_time = self.inner.deploy_lock.lock().await;
        let Some(f) = self.write_functions().remove(name) else {
            return Err(ActivatorError::NotFound(name.to_string()));
        };
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
        let mut removed = 0;
        for inst in &instances {
            if let Some(cid) = &inst.container_id {
                match inst.reservation.node().stop(cid).await {
                    Ok(()) => removed += 1,
                    Err(e) => {
                        tracing::warn!(function = %name, container = %cid, error = %e, "could not remove container")
                    }
                }
            }
        }
        self.inner.store.delete_function(name).await?;
        tracing::info!(function = %name, containers = removed, "removed");
        Ok(removed)
    }

    /// The status of one function.
    pub fn status(&self, f: &Function) -> FunctionStatus {
        let st = f.lock();
        let now = Instant::now();
        let count = |p: fn(Phase) -> bool| st.instances.iter().filter(|i| p(i.phase)).count();
        FunctionStatus {
            name: f.name().to_string(),
            revision: st.revision.id.clone(),
            image: st.revision.manifest.image.clone().unwrap_or_default(),
            starting: count(|p| p == Phase::Starting),
            desired: st.desired,
            ready: count(|p| p == Phase::Ready),
            paused: count(|p| matches!(p, Phase::Pausing | Phase::Paused | Phase::Resuming)),
            draining: count(|p| matches!(p, Phase::Draining | Phase::Stopping)),
            in_flight: st.instances.iter().map(|i| i.in_flight).sum(),
            queued: st.queue.len(),
            starts: st.starts,
            failure: st.failure.as_ref().map(|fl| FailureStatus {
                message: fl.message.clone(),
                consecutive: fl.consecutive,
                retry_in_ms: fl.retry_at.saturating_duration_since(now).as_millis() as u64,
            }),
            unschedulable: st.unschedulable.clone(),
            instances: st.instances.iter().map(|i| i.status(now)).collect(),
        }
    }
}

impl Activator {
    /// Counts one more waiting request against the gateway-wide caps.
    fn buffer(&self, bytes: u64) -> Result<Buffered, AcquireError> {
        let inner = &self.inner;
        let queued = inner.queued.fetch_add(1, Ordering::AcqRel) + 1;
        let total = inner.queued_bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
        let guard = Buffered {
            inner: self.inner.clone(),
            bytes,
        };
        if queued > inner.limits.max_queued || total > inner.limits.max_queued_bytes {
            return Err(AcquireError::GatewayFull {
                queued: queued - 1,
                bytes: total - bytes,
            });
        }
        Ok(guard)
    }

    /// Requests waiting across functions, and their announced body bytes.
    pub fn buffered(&self) -> (usize, u64) {
        (
            self.inner.queued.load(Ordering::Acquire),
            self.inner.queued_bytes.load(Ordering::Acquire),
        )
    }
}

/// One waiting request counted against the gateway-wide caps, until dropped.
struct Buffered {
    inner: Arc<Inner>,
    bytes: u64,
}

impl Drop for Buffered {
    fn drop(&mut self) {
        self.inner.queued.fetch_sub(1, Ordering::AcqRel);
        self.inner
            .queued_bytes
            .fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// `d` rounded up to whole seconds (for Retry-After and messages).
pub fn round_up_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

struct WaiterGuard<'a> {
    function: &'a Arc<Function>,
    id: u64,
    armed: bool,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.function.forget_waiter(self.id);
        }
    }
}
