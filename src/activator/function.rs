//! One function's live state: its instances, its queue of waiting requests, its start
//! failures; the permits that hand a request to an instance are in permit.rs.
//!
//! Everything here runs under the function's mutex, which is never held across an
//! `.await`. Permits release their slot on drop, whatever path the request took.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use super::instance::Instance;
use super::permit::Permit;
use super::routing::{self, Candidate};
use super::{AcquireError, Revision, StartFault};
use crate::autoscaler::Scaler;
use crate::keepalive::{Fixed, Hybrid, KeepAlive};
use crate::manifest::KeepAliveKind;
use crate::model::Phase;

/// First pause after a failed start; doubles with each consecutive failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Longest pause between start attempts of a failing function.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// A run of failed starts.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The last failure's reason, in full (for operators: `ember ls`, the log).
    pub message: String,
    /// The same reason as a client may see it (no node internals).
    pub public: String,
    /// Whose fault the last failure was.
    pub fault: StartFault,
    /// Failures in a row.
    pub consecutive: u32,
    /// No new start is tried before this.
    pub retry_at: Instant,
}

pub(super) struct Waiter {
    pub id: u64,
    /// The request's routing key (see `routing`).
    pub route: Option<u64>,
    /// When it queued: the permit it gets is cold when its instance came up (started,
    /// resumed or started again) after that.
    pub since: Instant,
    pub tx: oneshot::Sender<Result<Permit, AcquireError>>,
}

pub(super) struct FnState {
    pub revision: Arc<Revision>,
    pub instances: Vec<Instance>,
    pub queue: VecDeque<Waiter>,
    pub next_waiter: u64,
    pub failure: Option<Failure>,
    /// Why the last placement found no room, while it finds none.
    pub unschedulable: Option<String>,
    pub removed: bool,
    /// Starts attempted, for status.
    pub starts: u64,
    /// The windowed autoscaler's state.
    pub scaler: Scaler,
    /// Instances the autoscaler last wanted.
    pub desired: usize,
    /// The keep-alive policy, fed with this function's idle gaps.
    pub keep_alive: Box<dyn KeepAlive>,
    /// When the last invocation ended (nothing in flight or queued since).
    pub last_end: Option<Instant>,
    /// Whether the pre-warm of the current idle gap happened.
    pub prewarmed: bool,
}

/// The keep-alive policy a manifest asks for.
pub fn keep_alive_policy(scale: &crate::manifest::Scale) -> Box<dyn KeepAlive> {
    match scale.keep_alive {
        KeepAliveKind::Fixed => Box::new(Fixed::new(scale.idle_timeout)),
        KeepAliveKind::Adaptive => Box::new(Hybrid::new(scale.idle_timeout)),
    }
}

/// A deployed function's live state.
pub struct Function {
    name: String,
    state: Mutex<FnState>,
    reaper: Arc<Notify>,
}

impl Function {
    pub(super) fn new(revision: Arc<Revision>, reaper: Arc<Notify>) -> Function {
        Function {
            name: revision.manifest.name.clone(),
            state: Mutex::new(FnState {
                scaler: Scaler::default(),
                desired: 0,
                keep_alive: keep_alive_policy(&revision.manifest.scale),
                last_end: None,
                prewarmed: false,
                revision,
                instances: Vec::new(),
                queue: VecDeque::new(),
                next_waiter: 0,
                failure: None,
                unschedulable: None,
                removed: false,
                starts: 0,
            }),
            reaper,
        }
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Requests waiting and in flight.
    pub fn load(&self) -> (usize, u32) {
        let st = self.lock();
        (
            st.queue.len(),
            st.instances.iter().map(|i| i.in_flight).sum(),
        )
    }

    /// The current revision.
    pub fn revision(&self) -> Arc<Revision> {
        self.lock().revision.clone()
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, FnState> {
        // A panic under this lock cannot leave the state half-written in a way that
        // matters more than refusing every later request would.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn wake_reaper(&self) {
        self.reaper.notify_one();
    }

    /// Hands queued requests to free instance slots, oldest first.
    pub(super) fn dispatch(self: &Arc<Self>, st: &mut FnState) {
        while let Some(front) = st.queue.front() {
            if front.tx.is_closed() {
                st.queue.pop_front();
                continue;
            }
            let (route, since) = (front.route, front.since);
            let Some(permit) = self.take_slot(st, route, Some(since)) else {
                break;
            };
            let waiter = st.queue.pop_front().expect("front exists");
            if let Err(Ok(permit)) = waiter.tx.send(Ok(permit)) {
                // The waiter left between the check and the send: give the slot back here,
                // since dropping the permit would take this lock again.
                permit.disarm(st);
            }
        }
    }

    /// A permit on a ready instance with a free slot: one of the current revision's
    /// (not evacuating) when any is free, picked by `route` (see `routing`), else the
    /// least loaded of the rest. `queued`: when its request queued (it is cold if the
    /// instance came up after that).
    pub(super) fn take_slot(
        self: &Arc<Self>,
        st: &mut FnState,
        route: Option<u64>,
        queued: Option<Instant>,
    ) -> Option<Permit> {
        let current = st.revision.clone();
        let current = current.id.as_str();
        let serving = |i: &Instance| i.phase.can_serve() && i.reservation.node().reachable();
        let routed = route.and_then(|key| {
            let tier: Vec<usize> = (0..st.instances.len())
                .filter(|&i| {
                    let inst = &st.instances[i];
                    serving(inst) && !inst.evacuating && inst.revision.id == current
                })
                .collect();
            let candidates: Vec<Candidate<'_>> = tier
                .iter()
                .map(|&i| Candidate {
                    id: &st.instances[i].id,
                    in_flight: st.instances[i].in_flight,
                    free: st.instances[i].has_free_slot(),
                })
                .collect();
            let load_factor = st
                .revision
                .manifest
                .openai
                .as_ref()
                .map_or(crate::manifest::DEFAULT_LOAD_FACTOR, |o| o.load_factor);
            routing::pick(&candidates, key, load_factor).map(|c| tier[c])
        });
        // Without a key (or with no routed instance free): the least loaded, preferring
        // the current revision's instances that are not evacuating.
        let idx = match routed {
            Some(idx) => idx,
            None => st
                .instances
                .iter()
                .enumerate()
                .filter(|(_, i)| serving(i) && i.has_free_slot())
                .min_by_key(|(_, i)| (i.evacuating, i.revision.id != current, i.in_flight))
                .map(|(idx, _)| idx)?,
        };
        let inst = &mut st.instances[idx];
        inst.in_flight += 1;
        if inst.in_flight == 1 {
            inst.meter.busy(Instant::now());
        }
        let cold = queued.is_some_and(|q| inst.came_up.is_some_and(|at| at >= q));
        Some(Permit::new(self.clone(), inst, true, cold))
    }

    /// A permit on a ready instance with a free slot, without waiting or starting one.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut st = self.lock();
        if st.removed {
            return None;
        }
        st.arrival(Instant::now());
        self.take_slot(&mut st, None, None)
    }

    /// Instances that serve now or soon will (starting, ready, or in the warm tier): what
    /// the job queue sizes its turns by.
    pub fn serving_instances(&self) -> usize {
        self.lock()
            .instances
            .iter()
            .filter(|i| i.phase.will_serve())
            .count()
    }

    /// Whether a ready instance has a free slot now (what a low-priority job waits for).
    pub fn has_warm_slot(&self) -> bool {
        let st = self.lock();
        st.instances
            .iter()
            .any(|i| i.phase.can_serve() && i.reservation.node().reachable() && i.has_free_slot())
    }

    /// A permit on any ready instance, busy or not, that takes no slot: for a front
    /// door's short reads of what every instance serves alike (ComfyUI's web UI files,
    /// `/object_info`), which must neither wait behind the one-at-a-time work the slots
    /// count nor make the autoscaler start instances. The least loaded instance of the
    /// current revision is preferred. `None` when no instance is ready.
    pub fn any_ready(self: &Arc<Self>) -> Option<Permit> {
        let st = self.lock();
        let current = &st.revision.id;
        let inst = st
            .instances
            .iter()
            .filter(|i| i.phase.can_serve() && i.reservation.node().reachable())
            .min_by_key(|i| (i.evacuating, &i.revision.id != current, i.in_flight))?;
        Some(Permit::new(self.clone(), inst, false, false))
    }

    /// Removes a waiter that gave up (timeout or client gone).
    pub(super) fn forget_waiter(&self, id: u64) {
        let mut st = self.lock();
        if let Some(pos) = st.queue.iter().position(|w| w.id == id) {
            st.queue.remove(pos);
        }
    }

    pub(super) fn release(self: &Arc<Self>, instance: &str) {
        let mut st = self.lock();
        release_slot(&mut st, instance);
        if st
            .instances
            .iter()
            .any(|i| i.phase == Phase::Draining && i.in_flight == 0)
        {
            self.wake_reaper();
        }
        self.dispatch(&mut st);
    }
}

pub(super) fn release_slot(st: &mut FnState, instance: &str) {
    let now = Instant::now();
    if let Some(inst) = st.instances.iter_mut().find(|i| i.id == instance) {
        inst.in_flight = inst.in_flight.saturating_sub(1);
        if inst.in_flight == 0 {
            inst.meter.idle(now);
        }
        inst.last_used = now;
        inst.served += 1;
    }
    if st.queue.is_empty() && st.instances.iter().all(|i| i.in_flight == 0) {
        st.last_end = Some(now);
        st.prewarmed = false;
    }
}

impl FnState {
    /// Notes a request's arrival: the idle gap since the last one ended feeds the
    /// keep-alive policy.
    pub fn arrival(&mut self, now: Instant) {
        if let Some(end) = self.last_end.take() {
            self.keep_alive
                .observe_gap(now.saturating_duration_since(end));
        }
    }

    /// Whether some instance serves or soon will: starting, ready, paused or resuming, of
    /// any revision. Without one, a failed start leaves waiting requests nothing to wait for.
    pub fn can_serve_soon(&self) -> bool {
        self.instances
            .iter()
            .any(|i| matches!(i.phase, Phase::Starting | Phase::Ready) || i.phase.is_idle_tier())
    }

    /// Whether a failed start forbids a new attempt now.
    pub fn backing_off(&self, now: Instant) -> Option<&Failure> {
        self.failure.as_ref().filter(|f| f.retry_at > now)
    }

    /// Records a failed start and returns the pause before the next attempt.
    pub fn record_failure(
        &mut self,
        message: String,
        public: String,
        fault: StartFault,
    ) -> Duration {
        let consecutive = self.failure.as_ref().map_or(0, |f| f.consecutive) + 1;
        let backoff = backoff(consecutive);
        self.failure = Some(Failure {
            message,
            public,
            fault,
            consecutive,
            retry_at: Instant::now() + backoff,
        });
        backoff
    }

    /// Instances of the current revision that are starting, resuming or serving, or
    /// pausing with a request waiting for them (not evacuating).
    pub fn current_instances(&self) -> usize {
        self.instances
            .iter()
            .filter(|i| {
                i.revision.id == self.revision.id
                    && !i.evacuating
                    && (i.phase.counts_as_capacity() || i.wanted_back())
            })
            .count()
    }

    /// Instances the waiting and running requests need now: one per `concurrency` worth,
    /// within `min..=max`.
    pub fn needed(&self) -> usize {
        let scale = &self.revision.manifest.scale;
        crate::autoscaler::desired_instances(self.demand(), scale.concurrency, scale.min, scale.max)
    }

    /// Requests waiting plus requests in flight on current-revision instances.
    pub fn demand(&self) -> usize {
        self.queue.len()
            + self
                .instances
                .iter()
                .filter(|i| i.revision.id == self.revision.id)
                .map(|i| i.in_flight as usize)
                .sum::<usize>()
    }
}

/// The pause after `consecutive` failed starts.
pub fn backoff(consecutive: u32) -> Duration {
    let factor = 1u32 << consecutive.saturating_sub(1).min(16);
    (BACKOFF_BASE * factor).min(BACKOFF_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(10), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }
}
