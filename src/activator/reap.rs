//! The reaper: the background loop that retires instances (idle ones above `scale.min`,
//! drained ones of old revisions, ones whose container died under them) and scales out
//! while traffic asks for it. Decisions come from `autoscaler`; this file applies them to
//! the live state, under each function's lock, and hands the slow part (stopping
//! containers on their nodes) to background tasks, so one slow node never holds up the
//! scaling of every function.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::function::FnState;
use super::instance::Instance;
use super::{Activator, Function, Permit};
use crate::autoscaler::{self, InstanceView, RetirePolicy, REAP_INTERVAL};
use crate::keepalive;
use crate::manifest::OnIdle;
use crate::model::Phase;
use crate::node::Node;
use crate::scheduler::Needs;

/// How often containers are checked to still run.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// How long a health check waits for one node's listing.
pub const LIST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the removal of one container may take before the instance is forgotten
/// anyway (its container, if it still runs, is removed when its node is reconciled).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The reaper loop: wakes on a short tick, when a permit leaves a draining instance idle,
/// or when a reservation is freed; runs until `shutdown`.
pub async fn run(activator: Activator, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_health = Instant::now() + HEALTH_INTERVAL;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = activator.reaper().notified() => {}
            _ = activator.scheduler().freed().notified() => {}
            _ = tick.tick() => {}
        }
        activator.reap();
        if Instant::now() >= next_health {
            activator.check_health_in_background();
            next_health = Instant::now() + HEALTH_INTERVAL;
        }
    }
}

/// An instance taken out of service, to be removed from its node.
pub(super) struct Victim {
    id: String,
    revision: String,
    node: Arc<dyn Node>,
    container_id: Option<String>,
}

impl Activator {
    /// One pass over every function: feed the autoscaler, scale out while traffic asks
    /// for it, pre-warm when the keep-alive policy says so, pause or retire what is idle,
    /// expire paused instances, and evict one paused instance if a placement waits for
    /// room. Decides only: removals run in the background.
    pub fn reap(&self) {
        let now = Instant::now();
        let mut waiting_for_room = Vec::new();
        for f in self.functions() {
            let victims = {
                let mut st = f.lock();
                let victims = self.reap_function(&f, &mut st, now);
                if st.unschedulable.is_some() && !st.queue.is_empty() {
                    waiting_for_room.push(Needs::of(&st.revision.manifest));
                }
                victims
            };
            if !victims.is_empty() {
                self.stop_in_background(f, victims, "idle");
            }
        }
        if !waiting_for_room.is_empty() {
            self.evict_one_paused(&waiting_for_room);
        }
    }

    /// The reaper's decisions for one function, applied to its live state.
    fn reap_function(&self, f: &Arc<Function>, st: &mut FnState, now: Instant) -> Vec<Victim> {
        let current = st.revision.id.clone();
        let scale = st.revision.manifest.scale.clone();
        let demand = st.demand();
        st.scaler.observe(now, demand as f64, &scale);
        let active = st.current_instances();
        let in_flight: u32 = st
            .instances
            .iter()
            .filter(|i| i.revision.id == current)
            .map(|i| i.in_flight)
            .sum();
        let decision = st.scaler.decide(now, &scale, active, in_flight);
        st.desired = decision.desired;
        let windows = st.keep_alive.windows();
        let since_end = st.last_end.map(|t| now.saturating_duration_since(t));
        let keep_alive = since_end.map_or(windows.keep_alive, |se| {
            keepalive::idle_threshold(&windows, se)
        });
        if demand == 0
            && active == 0
            && !st.prewarmed
            && since_end.is_some_and(|se| keepalive::prewarm_due(&windows, se))
        {
            st.prewarmed = true;
            tracing::info!(function = %f.name(), "pre-warming before the expected next call");
            self.scale_to(f, st, 1);
        }
        let views: Vec<InstanceView> = st
            .instances
            .iter()
            .map(|i| view(i, &current, now))
            .collect();
        let policy = RetirePolicy {
            keep_alive,
            desired: decision.desired,
            min: scale.min,
            demand,
        };
        let (keep, mut stop): (Vec<usize>, Vec<usize>) = autoscaler::retire(&views, policy)
            .into_iter()
            .partition(|&idx| {
                let i = &st.instances[idx];
                scale.on_idle != OnIdle::Stop
                    && i.phase == Phase::Ready
                    && i.revision.id == current
                    && !i.evacuating
            });
        stop.extend(st.instances.iter().enumerate().filter_map(|(idx, i)| {
            let expired = i
                .paused_at
                .is_some_and(|t| now.saturating_duration_since(t) >= scale.pause_timeout);
            (i.phase.is_kept_idle() && (expired || i.revision.id != current || i.evacuating))
                .then_some(idx)
        }));
        for idx in keep {
            self.set_aside(f, st, idx, scale.on_idle);
        }
        let victims = take_victims(&mut st.instances, &stop);
        // What waiting and running requests need now, and while traffic asks for it, what
        // the windows say, ahead of the hard need.
        let need = st.needed();
        let want = if demand > 0 {
            need.max(decision.desired)
        } else {
            need
        };
        self.scale_to(f, st, want);
        victims
    }

    /// Starts a health check in the background unless one is still running.
    fn check_health_in_background(&self) {
        let Some(running) = Busy::try_claim(self, |i| &i.checking_health) else {
            return;
        };
        let this = self.clone();
        self.inner.tracker.spawn(
            async move {
                let _running = running;
                this.check_health().await;
            }
            .instrument(tracing::info_span!("health")),
        );
    }

    /// Drops instances whose containers no longer run (crashed, killed, removed by hand).
    /// Every node is listed at once, each within `LIST_TIMEOUT`.
    pub async fn check_health(&self) {
        // Only instances ready before the listing began can be judged by it.
        let listed_at = Instant::now();
        let listings = join_all(
            self.scheduler()
                .live_nodes()
                .into_iter()
                .map(|node| async move {
                    let listing = tokio::time::timeout(LIST_TIMEOUT, node.list_managed()).await;
                    (node, listing)
                }),
        )
        .await;
        let mut running = HashSet::new();
        let mut listed = HashSet::new();
        for (node, listing) in listings {
            match listing {
                Ok(Ok(list)) => {
                    listed.insert(node.name().to_string());
                    running.extend(
                        list.into_iter()
                            .filter(|c| c.running)
                            .map(|c| c.container_id),
                    );
                }
                // An unreachable node is not proof that its containers died.
                Ok(Err(e)) => {
                    tracing::warn!(node = %node.name(), error = %e, "health check: cannot list containers");
                }
                Err(_) => {
                    tracing::warn!(node = %node.name(), timeout = ?LIST_TIMEOUT, "health check: the node did not list its containers in time");
                }
            }
        }
        for f in self.functions() {
            let victims = {
                let mut st = f.lock();
                let dead: Vec<usize> = st
                    .instances
                    .iter()
                    .enumerate()
                    .filter(|(_, i)| {
                        matches!(i.phase, Phase::Ready | Phase::Draining)
                            && i.ready_at < listed_at
                            && listed.contains(i.reservation.node().name())
                            && i.container_id
                                .as_ref()
                                .is_some_and(|c| !running.contains(c))
                    })
                    .map(|(idx, _)| idx)
                    .collect();
                let victims = take_victims(&mut st.instances, &dead);
                self.scale_up(&f, &mut st);
                victims
            };
            if !victims.is_empty() {
                self.stop_in_background(f, victims, "container stopped");
            }
        }
    }

    /// Takes the instance of a permit whose connection could not be made out of service,
    /// then gives the permit's slot back, under one lock, so that no waiting request is
    /// handed the dead instance; removes it in the background.
    pub fn retire_unreachable(&self, permit: Permit) {
        let f = permit.function().clone();
        // A node that dropped its tunnel is not proof that its containers died: its
        // instances wait for it to come back (or to be lost), and the request goes on.
        let node_gone = !permit.node().reachable();
        let victims = {
            let mut st = f.lock();
            let found = st.instances.iter().position(|i| i.id == permit.instance());
            let victims = match found {
                Some(idx) if !node_gone => take_victims(&mut st.instances, &[idx]),
                _ => Vec::new(),
            };
            permit.disarm(&mut st);
            self.scale_up(&f, &mut st);
            f.dispatch(&mut st);
            victims
        };
        if !victims.is_empty() {
            self.stop_in_background(f, victims, "unreachable");
        }
    }

    /// Removes the victims' containers, all at once, in a background task.
    pub(super) fn stop_in_background(
        &self,
        f: Arc<Function>,
        victims: Vec<Victim>,
        why: &'static str,
    ) {
        let this = self.clone();
        let span = tracing::info_span!("retire", function = %f.name(), reason = why);
        self.inner.tracker.spawn(
            async move {
                join_all(victims.into_iter().map(|v| this.stop_victim(&f, v, why))).await;
            }
            .instrument(span),
        );
    }

    /// Removes a victim's container (its last output kept first, with `why`) and forgets
    /// the instance.
    async fn stop_victim(&self, f: &Arc<Function>, v: Victim, why: &str) {
        tracing::info!(instance = %v.id, node = %v.node.name(), "retiring instance");
        if let Some(cid) = &v.container_id {
            self.keep_output(super::logs::Gone {
                function: f.name(),
                instance: &v.id,
                revision: &v.revision,
                node: v.node.as_ref(),
                container: cid,
                reason: why,
            })
            .await;
            match tokio::time::timeout(STOP_TIMEOUT, v.node.stop(cid)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(container = %cid, error = %e, "could not remove container")
                }
                Err(_) => {
                    tracing::error!(container = %cid, timeout = ?STOP_TIMEOUT, "the node did not remove the container in time; forgetting the instance")
                }
            }
        }
        self.forget_record(f.name(), &v.id).await;
        let mut st = f.lock();
        st.instances.retain(|i| i.id != v.id);
        // A request may have queued while this instance was stopping.
        self.scale_up(f, &mut st);
    }

    /// Removes the least recently used paused instance, of any function, whose room would
    /// let one of the `waiting` placements fit. One eviction at a time: while one is being
    /// removed (its room not free yet), no other goes. Returns whether one was evicted.
    pub(super) fn evict_one_paused(&self, waiting: &[Needs]) -> bool {
        let Some(evicting) = Busy::try_claim(self, |i| &i.evicting) else {
            return false;
        };
        let mut oldest: Option<(Arc<Function>, String, Instant)> = None;
        for f in self.functions() {
            let st = f.lock();
            for i in st.instances.iter().filter(|i| i.phase.is_kept_idle()) {
                if oldest.as_ref().is_some_and(|(_, _, t)| i.last_used >= *t) {
                    continue;
                }
                let helps = waiting
                    .iter()
                    .any(|needs| self.scheduler().fits_without(needs, &i.reservation));
                if helps {
                    oldest = Some((f.clone(), i.id.clone(), i.last_used));
                }
            }
        }
        let Some((f, id, _)) = oldest else {
            return false;
        };
        let victims = {
            let mut st = f.lock();
            let Some(idx) = st
                .instances
                .iter()
                .position(|i| i.id == id && i.phase.is_kept_idle())
            else {
                return false;
            };
            take_victims(&mut st.instances, &[idx])
        };
        let this = self.clone();
        let why = "evicted: another placement needs its room";
        let span = tracing::info_span!("retire", function = %f.name(), reason = why);
        self.inner.tracker.spawn(
            async move {
                let _evicting = evicting;
                join_all(victims.into_iter().map(|v| this.stop_victim(&f, v, why))).await;
            }
            .instrument(span),
        );
        true
    }
}

/// One of the activator's "under way" flags, claimed; released when dropped, on every
/// path, so a panicking task cannot leave it set for good.
struct Busy {
    activator: Activator,
    flag: fn(&super::Inner) -> &AtomicBool,
}

impl Busy {
    fn try_claim(activator: &Activator, flag: fn(&super::Inner) -> &AtomicBool) -> Option<Busy> {
        let claimed = !flag(&activator.inner).swap(true, Ordering::AcqRel);
        claimed.then(|| Busy {
            activator: activator.clone(),
            flag,
        })
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        (self.flag)(&self.activator.inner).store(false, Ordering::Release);
    }
}

fn view(i: &Instance, current: &str, now: Instant) -> InstanceView {
    InstanceView {
        current: i.revision.id == current,
        phase: i.phase,
        in_flight: i.in_flight,
        idle: now.saturating_duration_since(i.last_used),
        evacuating: i.evacuating,
    }
}

/// Moves the chosen instances to `Stopping` and describes them for removal.
pub(super) fn take_victims(instances: &mut [Instance], chosen: &[usize]) -> Vec<Victim> {
    chosen
        .iter()
        .filter_map(|&idx| {
            let inst = &mut instances[idx];
            inst.become_(Phase::Stopping).then(|| Victim {
                id: inst.id.clone(),
                revision: inst.revision.id.clone(),
                node: inst.reservation.node().clone(),
                container_id: inst.container_id.clone(),
            })
        })
        .collect()
}
