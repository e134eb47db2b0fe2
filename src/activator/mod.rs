//! The activator: turns "a request for function F" into "a permit on a ready instance of F",
//! cold-starting instances when there is none free.
//!
//! It owns the live state of every function (`function.rs`) and the permits it hands out
//! (`permit.rs`), the instance lifecycle
//! (`instance.rs`), deploys and removals (`deploy.rs`), cold starts (`start.rs`), the
//! warm tier (`tiers.rs`), the reaper that retires idle and draining instances
//! (`reap.rs`), what node changes do to instances (`nodes.rs`), adopting containers after
//! a restart (`restore.rs`), what the API shows (`status.rs`), the instances' output,
//! live and kept as they are removed (`logs.rs`), each instance's GPU and busy time
//! (`meter.rs`) and its errors (`errors.rs`). It keeps the store in step with
//! deploys and instances, and leaves HTTP to the gateway and placement to the scheduler.
//!
//! Requests that find no free slot wait in the function's bounded queue; many waiting
//! requests start as many instances as their number needs (by `concurrency`), not one each.

mod deploy;
mod errors;
mod function;
mod images;
mod instance;
mod logs;
mod meter;
mod models;
mod nodes;
mod permit;
pub mod reap;
mod restore;
mod routing;
mod start;
mod status;
mod tiers;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use deploy::DeployOutcome;
pub use errors::{AcquireError, ActivatorError, StartFault};
pub use function::{backoff, Failure, Function, BACKOFF_BASE, BACKOFF_MAX};
pub use images::{ImageAction, ImageMeter, ImageStatus};
pub use instance::InstanceStatus;
pub use logs::{LogEvent, LogQuery, KEEP_BYTES, KEEP_READ_TIMEOUT};
pub use permit::Permit;
pub use reap::run as run_reaper;
pub use restore::ReconcileGuard;
pub use routing::fnv1a;
pub use status::{FailureStatus, FunctionStatus};

use crate::manifest::Manifest;
use crate::scheduler::Scheduler;
use crate::store::Store;

/// An immutable revision: its id and manifest.
#[derive(Debug)]
pub struct Revision {
    /// Revision id (hash of the manifest).
    pub id: String,
    /// The manifest.
    pub manifest: Arc<Manifest>,
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
    /// Serialises deploys and removals per function.
    function_locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Nodes being reconciled now: one reconcile per node at a time.
    reconciling: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Whether a health check (which lists every node) is under way.
    checking_health: std::sync::atomic::AtomicBool,
    /// Whether a paused instance is being evicted to make room.
    evicting: std::sync::atomic::AtomicBool,
    /// Images on their way to nodes.
    supplies: images::Supplies,
    /// Serialises deploys that claim model ids, so two cannot claim one id at once.
    model_claims: tokio::sync::Mutex<()>,
    /// Which function serves each model id.
    models: models::ModelIndex,
    /// Starts and their phases are counted here (and requests, by the invoke core); each
    /// instance's meter adds its GPU time there and leaves its allocation in the history.
    ledger: meter::Ledger,
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
        history: Arc<crate::history::History>,
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
                function_locks: Default::default(),
                reconciling: Default::default(),
                checking_health: Default::default(),
                evicting: Default::default(),
                supplies: Default::default(),
                model_claims: Default::default(),
                models: Default::default(),
                ledger: meter::Ledger {
                    metrics: Default::default(),
                    history,
                },
            }),
        }
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.inner.ledger.metrics
    }

    /// The invocation history.
    pub fn history(&self) -> &Arc<crate::history::History> {
        &self.inner.ledger.history
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Where background work goes: tasks spawned here stop with the gateway.
    pub fn tracker(&self) -> &TaskTracker {
        &self.inner.tracker
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
    /// instance) when none is free. `route` is the request's routing key, when it has one
    /// (the front door's prompt-prefix hash; see `routing`).
    pub async fn acquire(
        &self,
        f: &Arc<Function>,
        body_bytes: Option<u64>,
        route: Option<u64>,
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
            if let Some(permit) = f.take_slot(&mut st, route, None) {
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
            st.queue.push_back(function::Waiter {
                id,
                route,
                since: now,
                tx,
            });
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
