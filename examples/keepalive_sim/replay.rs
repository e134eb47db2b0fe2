//! One function's calls replayed through a keep-alive policy, with Ember's own reaper
//! rules deciding when its instance goes and when it is pre-warmed.
//!
//! A function runs on one instance: calls that overlap share it (waiting for it while it
//! starts), as the autoscaler's scale-out is not what is measured here. Busy time counts
//! every call in full, as if each had its own slot.

use std::time::Duration;

use ember::autoscaler::{self, InstanceView, RetirePolicy};
use ember::keepalive::{self, KeepAlive, Windows};
use ember::model::Phase;

use crate::trace::Function;

/// What one function cost under one policy.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    /// Calls that found no ready instance.
    pub cold_starts: u64,
    /// Seconds calls waited for a start.
    pub cold_start_seconds: f64,
    /// Seconds an instance was ready but ran no call.
    pub idle: f64,
    /// Seconds an instance was starting.
    pub loading: f64,
    /// Seconds calls ran.
    pub busy: f64,
}

impl Tally {
    /// Instance-seconds held: starting, idle or busy.
    pub fn held(&self) -> f64 {
        self.loading + self.idle + self.busy
    }
}

/// Whether the reaper still keeps an instance idle for `idle` under `threshold`: its own
/// retire decision on a lone idle instance.
fn kept(threshold: Duration, idle: f64) -> bool {
    let view = InstanceView {
        current: true,
        phase: Phase::Ready,
        in_flight: 0,
        idle: Duration::from_secs_f64(idle),
        evacuating: false,
    };
    let policy = RetirePolicy {
        keep_alive: threshold,
        desired: 0,
        min: 0,
        demand: 0,
    };
    autoscaler::retire(&[view], policy).is_empty()
}

/// What an idle gap of `gap` seconds after a call costs, and what a call at its end finds.
#[derive(Debug, Default)]
struct Gap {
    idle: f64,
    /// A pre-warm began in the gap.
    prewarmed: bool,
    /// The call at its end needs a start of its own.
    cold_start: bool,
    /// Seconds the call at its end waits for an instance.
    wait: f64,
}

fn gap_outcome(w: &Windows, gap: f64, start: f64) -> Gap {
    // The reaper's threshold for an instance that is there `gap` after the last call.
    let threshold = keepalive::idle_threshold(w, Duration::from_secs_f64(gap));
    if w.prewarm.is_zero() {
        let keep = threshold.as_secs_f64();
        return if kept(threshold, gap) {
            Gap {
                idle: gap,
                ..Gap::default()
            }
        } else {
            Gap {
                idle: keep,
                cold_start: true,
                wait: start,
                ..Gap::default()
            }
        };
    }
    let from = w.prewarm.as_secs_f64();
    // The reaper pre-warms from the first moment `keepalive::prewarm_due` holds: `from`.
    if gap < from {
        // Unloaded after the call and not pre-warmed yet.
        return Gap {
            cold_start: true,
            wait: start,
            ..Gap::default()
        };
    }
    let ready = from + start;
    if gap < ready {
        return Gap {
            prewarmed: true,
            wait: ready - gap,
            ..Gap::default()
        };
    }
    if kept(threshold, gap - ready) {
        Gap {
            idle: gap - ready,
            prewarmed: true,
            ..Gap::default()
        }
    } else {
        Gap {
            idle: w.keep_alive.as_secs_f64(),
            prewarmed: true,
            cold_start: true,
            wait: start,
        }
    }
}

/// Replays `f`'s calls through `policy` until `horizon`.
pub fn replay(f: &Function, policy: &mut dyn KeepAlive, horizon: f64) -> Tally {
    let mut t = Tally::default();
    let start = Duration::from_secs_f64(f.start);
    let mut busy_until: Option<f64> = None;
    let mut ready_at = f64::NEG_INFINITY;
    for call in &f.calls {
        t.busy += call.duration;
        let begins = match busy_until {
            Some(end) if call.at <= end => call.at.max(ready_at),
            Some(end) => {
                let gap = call.at - end;
                let g = gap_outcome(&policy.windows(), gap, f.start);
                if g.prewarmed {
                    t.loading += f.start;
                    policy.observe_start(start);
                }
                policy.observe_gap(Duration::from_secs_f64(gap));
                t.idle += g.idle;
                if g.cold_start {
                    t.loading += f.start;
                    policy.observe_start(start);
                }
                if g.wait > 0.0 {
                    t.cold_starts += 1;
                    ready_at = call.at + g.wait;
                }
                call.at + g.wait
            }
            None => {
                t.cold_starts += 1;
                t.loading += f.start;
                policy.observe_start(start);
                ready_at = call.at + f.start;
                ready_at
            }
        };
        t.cold_start_seconds += begins - call.at;
        let ends = begins + call.duration;
        busy_until = Some(busy_until.map_or(ends, |b| b.max(ends)));
    }
    if let Some(end) = busy_until.filter(|&end| end < horizon) {
        let g = gap_outcome(&policy.windows(), horizon - end, f.start);
        t.idle += g.idle;
        if g.prewarmed {
            t.loading += f.start;
        }
    }
    t
}

/// The most calls of `f` running at once.
pub fn peak_concurrency(f: &Function) -> u64 {
    let mut edges: Vec<(f64, i64)> = f
        .calls
        .iter()
        .flat_map(|c| [(c.at, 1), (c.at + c.duration, -1)])
        .collect();
    // An end before a start at the same instant: back-to-back calls share a slot.
    edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut peak) = (0i64, 0i64);
    for (_, d) in edges {
        now += d;
        peak = peak.max(now);
    }
    peak as u64
}

/// A fixed allocation: `f`'s peak concurrency in instances, loaded all along.
pub fn static_peak(f: &Function, horizon: f64) -> Tally {
    let busy: f64 = f.calls.iter().map(|c| c.duration).sum();
    Tally {
        busy,
        idle: (peak_concurrency(f) as f64 * horizon - busy).max(0.0),
        ..Tally::default()
    }
}
