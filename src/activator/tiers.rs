//! The tiers an idle instance waits in instead of being removed:
//! - warm (`on_idle = "pause"`): Docker pause, no CPU, memory and loaded model kept;
//!   resumed in milliseconds;
//! - stopped (`on_idle = "park"`): Docker stop, the container kept; started again without
//!   a create, then probed for readiness like a cold start (the process starts over, so
//!   only the create is saved).
//!
//! A request that arrives while its instance is being paused or parked waits and asks for
//! it back; one that arrives while it is coming back waits for it. Paused and parked
//! instances are removed after `pause_timeout`, or earlier, least recently used first,
//! when another placement needs the room they hold (the reaper's `evict_one_paused`).

use std::sync::Arc;

use tokio::time::Instant;
use tracing::Instrument;

use super::function::{FnState, Function};
use super::Activator;
use crate::manifest::OnIdle;
use crate::model::Phase;
use crate::readiness;

impl Activator {
    /// Sets the ready, idle instance at `idx` aside in the tier `on_idle` names: frozen
    /// (`pause`) or stopped with its container kept (`park`); `stop` is not a tier.
    pub(super) fn set_aside(
        &self,
        f: &Arc<Function>,
        st: &mut FnState,
        idx: usize,
        on_idle: OnIdle,
    ) {
        let (what, going, gone) = match on_idle {
            OnIdle::Pause => ("pause", Phase::Pausing, Phase::Paused),
            OnIdle::Park => ("park", Phase::Parking, Phase::Parked),
            OnIdle::Stop => return,
        };
        let inst = &mut st.instances[idx];
        let Some(cid) = inst.container_id.clone() else {
            return;
        };
        if inst.in_flight > 0 || !inst.become_(going) {
            return;
        }
        inst.resume_wanted = false;
        let node = inst.reservation.node().clone();
        let id = inst.id.clone();
        let change = async move {
            match on_idle {
                OnIdle::Park => node.park(&cid).await,
                _ => node.pause(&cid).await,
            }
        };
        self.spawn_tier_change(f, id, what, change, move |this, f, st, idx, ()| {
            let inst = &mut st.instances[idx];
            if !inst.become_(gone) {
                return;
            }
            inst.paused_at = Some(Instant::now());
            if gone == Phase::Parked {
                // A stopped container has no address; the restart gives it one.
                inst.endpoint = None;
            }
            inst.meter.paused();
            if std::mem::take(&mut inst.resume_wanted) {
                this.bring_back(f, st, idx);
            }
        });
    }

    /// Brings the paused or parked instance at `idx` back into service.
    fn bring_back(&self, f: &Arc<Function>, st: &mut FnState, idx: usize) {
        match st.instances[idx].phase {
            Phase::Paused => self.resume_instance(f, st, idx),
            Phase::Parked => self.unpark_instance(f, st, idx),
            _ => {}
        }
    }

    /// Thaws the paused instance at `idx`; waiting requests get it once it is ready.
    fn resume_instance(&self, f: &Arc<Function>, st: &mut FnState, idx: usize) {
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
            |_, f, st, idx, ()| {
                if st.instances[idx].ready(Instant::now()) {
                    f.dispatch(st);
                }
            }
        });
    }

    /// Starts the parked instance at `idx` again; waiting requests get it once it answers
    /// its readiness probe, within the manifest's start timeout.
    fn unpark_instance(&self, f: &Arc<Function>, st: &mut FnState, idx: usize) {
        let inst = &mut st.instances[idx];
        let Some(cid) = inst.container_id.clone() else {
            return;
        };
        if !inst.become_(Phase::Unparking) {
            return;
        }
        // Its GPU time runs again from the restart, as a cold start's load does.
        inst.meter.resumed();
        let node = inst.reservation.node().clone();
        let manifest = inst.revision.manifest.clone();
        let id = inst.id.clone();
        let (retired, shutdown) = (inst.retired.token().clone(), self.inner.shutdown.clone());
        let restart = async move {
            let started = node
                .unpark(&cid, manifest.port)
                .await
                .map_err(|e| e.to_string())?;
            let r = &manifest.readiness;
            readiness::wait_ready(
                node.as_ref(),
                &cid,
                started.endpoint,
                r.http_path.as_deref(),
                r.start_timeout,
            )
            .await
            .map_err(|e| e.to_string())?;
            Ok::<_, String>(started.endpoint)
        };
        // A restart may wait minutes for a model to load: it ends with the instance (whoever
        // retired it removes it) or the gateway (a restart adopts the container again).
        let restart = async move {
            tokio::select! {
                restarted = restart => restarted.map(Some),
                () = retired.cancelled() => Ok(None),
                () = shutdown.cancelled() => Ok(None),
            }
        };
        self.spawn_tier_change(f, id, "unpark", restart, |_, f, st, idx, endpoint| {
            let Some(endpoint) = endpoint else {
                return;
            };
            let inst = &mut st.instances[idx];
            inst.endpoint = Some(endpoint);
            if inst.ready(Instant::now()) {
                f.dispatch(st);
            }
        });
    }

    /// Runs a move into or out of a tier on the node, off the function's lock; then, if
    /// the instance is still there, `done` applies the outcome, or a failure retires the
    /// instance (and replaces it when requests need one).
    fn spawn_tier_change<T: Send + 'static, E: std::fmt::Display + Send + 'static>(
        &self,
        f: &Arc<Function>,
        id: String,
        what: &'static str,
        change: impl std::future::Future<Output = Result<T, E>> + Send + 'static,
        done: impl FnOnce(&Activator, &Arc<Function>, &mut FnState, usize, T) + Send + 'static,
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
                    Ok(outcome) => {
                        tracing::info!(elapsed_us = began.elapsed().as_micros() as u64, "done");
                        done(&this, &f, &mut st, idx, outcome);
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

    /// Brings back one paused or parked (or pausing, parking) instance of the current
    /// revision, if any; true when one will serve.
    pub(super) fn wake_one(&self, f: &Arc<Function>, st: &mut FnState) -> bool {
        let current = st.revision.id.clone();
        let usable = |i: &super::instance::Instance| i.revision.id == current && !i.evacuating;
        // Paused ones first (milliseconds), then parked ones (a process start); of each,
        // the most recently used, the likeliest to be hot in caches.
        for tier in [Phase::Paused, Phase::Parked] {
            if let Some(idx) = st
                .instances
                .iter()
                .enumerate()
                .filter(|(_, i)| i.phase == tier && usable(i))
                .max_by_key(|(_, i)| i.last_used)
                .map(|(idx, _)| idx)
            {
                self.bring_back(f, st, idx);
                return true;
            }
        }
        if let Some(inst) = st.instances.iter_mut().find(|i| {
            matches!(i.phase, Phase::Pausing | Phase::Parking) && !i.resume_wanted && usable(i)
        }) {
            inst.resume_wanted = true;
            return true;
        }
        false
    }
}
