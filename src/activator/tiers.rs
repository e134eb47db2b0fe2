//! The warm tier: pausing idle instances (Docker pause: no CPU, memory and loaded model
//! kept) and resuming them when a request needs one, which costs milliseconds instead of a
//! cold start. A request that arrives while its instance is being paused waits and asks
//! for it back; one that arrives while it is resuming waits for it. Paused instances are
//! removed after `pause_timeout`, or earlier, least recently used first, when another
//! placement needs the room they hold (the reaper's `evict_one_paused`).

use std::sync::Arc;

use tokio::time::Instant;
use tracing::Instrument;

use super::function::{FnState, Function};
use super::Activator;
use crate::model::Phase;

impl Activator {
    /// Freezes the ready, idle instance at `idx`.
    pub(super) fn pause_instance(&self, f: &Arc<Function>, st: &mut FnState, idx: usize) {
        let inst = &mut st.instances[idx];
        let Some(cid) = inst.container_id.clone() else {
            return;
        };
        if inst.in_flight > 0 || !inst.become_(Phase::Pausing) {
            return;
        }
        inst.resume_wanted = false;
        let node = inst.reservation.node().clone();
        let id = inst.id.clone();
        self.spawn_tier_change(f, id, "pause", async move { node.pause(&cid).await }, {
            |this, f, st, idx| {
                let inst = &mut st.instances[idx];
                if !inst.become_(Phase::Paused) {
                    return;
                }
                inst.paused_at = Some(Instant::now());
                inst.meter.paused();
                if std::mem::take(&mut inst.resume_wanted) {
                    this.resume_instance(f, st, idx);
                }
            }
        });
    }

    /// Thaws the paused instance at `idx`; waiting requests get it once it is ready.
    pub(super) fn resume_instance(&self, f: &Arc<Function>, st: &mut FnState, idx: usize) {
        let inst = &mut st.instances[idx];
        let Some(cid) = inst.container_id.clone() else {
            return;
        };
        if !inst.become_(Phase::Resuming) {
            return;
        }
        let node = inst.reservation.node().clone();
        let id = inst.id.clone();
        self.spawn_tier_change(f, id, "resume", async move { node.resume(&cid).await }, {
            |_, f, st, idx| {
                if st.instances[idx].ready(Instant::now()) {
                    f.dispatch(st);
                }
            }
        });
    }

    /// Runs a pause or resume on the node, off the function's lock; then, if the instance
    /// is still there, `done` applies the outcome, or a failure retires the instance (and
    /// replaces it when requests need one).
    fn spawn_tier_change(
        &self,
        f: &Arc<Function>,
        id: String,
        what: &'static str,
        change: impl std::future::Future<Output = Result<(), crate::node::NodeError>> + Send + 'static,
        done: impl FnOnce(&Activator, &Arc<Function>, &mut FnState, usize) + Send + 'static,
    ) {
        let this = self.clone();
        let f = f.clone();
        let span = tracing::info_span!("tier", function = %f.name(), instance = %id, change = what);
        self.inner.tracker.spawn(
            async move {
                let began = Instant::now();
                let result = change.await;
                let mut st = f.lock();
                let Some(idx) = st.instances.iter().position(|i| i.id == id) else {
                    return;
                };
                match result {
                    Ok(()) => {
                        tracing::info!(elapsed_us = began.elapsed().as_micros() as u64, "done");
                        done(&this, &f, &mut st, idx);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "failed; removing the instance");
                        let victims = super::reap::take_victims(&mut st.instances, &[idx]);
                        this.scale_up(&f, &mut st);
                        drop(st);
                        this.stop_in_background(f.clone(), victims, what);
                    }
                }
            }
            .instrument(span),
        );
    }

    /// Brings back one paused (or pausing) instance of the current revision, if any;
    /// true when one will serve.
    pub(super) fn wake_one(&self, f: &Arc<Function>, st: &mut FnState) -> bool {
        let current = st.revision.id.clone();
        let usable = |i: &super::instance::Instance| i.revision.id == current && !i.evacuating;
        // The most recently used one is the likeliest to be hot in caches.
        if let Some(idx) = st
            .instances
            .iter()
            .enumerate()
            .filter(|(_, i)| i.phase == Phase::Paused && usable(i))
            .max_by_key(|(_, i)| i.last_used)
            .map(|(idx, _)| idx)
        {
            self.resume_instance(f, st, idx);
            return true;
        }
        if let Some(inst) = st
            .instances
            .iter_mut()
            .find(|i| i.phase == Phase::Pausing && !i.resume_wanted && usable(i))
        {
            inst.resume_wanted = true;
            return true;
        }
        false
    }
}
