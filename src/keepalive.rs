//! Keep-alive policies: how long an idle function's last instances stay warm, and whether
//! to unload at once and pre-warm one just before the next expected invocation.
//!
//! `Fixed` keeps instances for a set time. `Hybrid` (`keep_alive = "adaptive"`) starts from
//! the hybrid histogram policy of "Serverless in the Wild" (Shahrad et al., USENIX ATC
//! 2020): a histogram of the idle gaps between a function's invocations (1-minute bins over
//! 4 hours, then 1-hour bins to a day; about 0.6 KB, halved whenever a bin would overflow,
//! so older gaps weigh less). Where the paper takes fixed percentiles of it (the 5th to
//! pre-warm, the 99th to keep alive), `Hybrid` prices its windows, so that it pays for
//! itself:
//!
//! - **Price.** A cold start is worth `fallback` (the manifest's `idle_timeout`) of idle
//!   instance time, plus the start itself. For every window the histogram allows (unload
//!   at once; keep warm to the end of some bin; or unload and be ready again from the
//!   start of some bin to the end of a later one), the idle time and loads it costs and
//!   the cold starts it leaves are counted from the histogram; the cheapest wins. A
//!   function whose gaps are spread like a Poisson process slower than the price is not
//!   kept warm at all, a regular one is kept up to its last gap or pre-warmed.
//! - **Start time.** `observe_start` learns how long the function takes to start (a GPU
//!   model's load: seconds to a minute; fed by the activator when a start is ready); a
//!   pre-warm begins that much (plus `MARGIN` of it and `SLACK`) ahead of the time the
//!   instance should be ready, and every start is charged its length.
//! - **Service level.** From when the function's own recent cold-start share (the gaps its
//!   windows did not cover, over about `RECENT_GAPS`) rises above `SERVICE_LEVEL` until it
//!   is back to `SERVICE_TARGET`, the cheapest window that would have left at most
//!   `SERVICE_TARGET` (else `SERVICE_LEVEL`) of its gaps cold is taken instead, as long as
//!   it costs at most `SERVICE_SPEND` times the cheapest: a function called every hour or
//!   so is not left cold on almost every call, one called twice a day is.
//!
//! With fewer than `MIN_SAMPLES` gaps it falls back to the fixed `fallback`.
//!
//! Decisions are cheap: the windows are recomputed only when a gap or a start time is
//! recorded, in time quadratic in the number of non-empty bins (one for a function called
//! every few seconds). The same functions drive the live reaper and the trace simulator
//! (`examples/keepalive_sim/`).

use std::time::Duration;

/// Fine bins of the idle-gap histogram: `BIN` wide, over the first 4 hours.
pub const HISTOGRAM_BINS: usize = 240;
/// Width of one fine bin.
pub const BIN: Duration = Duration::from_secs(60);
/// Coarse bins after the fine ones: `LONG_BIN` wide, from 4 hours to a day.
pub const LONG_BINS: usize = 20;
/// Width of one coarse bin.
pub const LONG_BIN: Duration = Duration::from_secs(3600);
const ALL_BINS: usize = HISTOGRAM_BINS + LONG_BINS;
/// Gaps needed before the histogram is trusted.
pub const MIN_SAMPLES: u32 = 4;
/// How early a pre-warmed instance is meant to be ready, for the reaper's tick.
pub const SLACK: Duration = Duration::from_secs(5);
/// Share of the start time by which a pre-warm begins earlier still, for starts that
/// take longer than the estimate.
pub const MARGIN: f64 = 0.10;
/// Recent cold-start share above which the service level widens the windows.
pub const SERVICE_LEVEL: f64 = 0.2;
/// Share of the gaps the service level's windows may leave uncovered, and the recent
/// share it lasts until: below `SERVICE_LEVEL`, so that the windows do not narrow again as
/// soon as the share is back under it.
pub const SERVICE_TARGET: f64 = 0.1;
/// How many times the cheapest window's cost the service level may spend: enough to keep
/// a function called every hour or two mostly warm, not one called a few times a day.
pub const SERVICE_SPEND: f64 = 10.0;
/// Gaps over which the recent cold-start share is taken (older ones count half, then a
/// quarter, and so on).
pub const RECENT_GAPS: u16 = 32;
/// Gaps after which the windows are priced again even when no bin filled for the first
/// time (a function called one request at a time records a gap on nearly every call).
pub const RECOMPUTE_EVERY: u16 = 16;
/// Weight of the newest start time in the running estimate.
pub const START_WEIGHT: f64 = 0.25;

/// What a policy decides for one function now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// Time after the last invocation ends before an instance is loaded again; zero means
    /// "keep the instance instead of unloading it".
    pub prewarm: Duration,
    /// How long an instance stays warm (after the invocation, or once pre-warmed and
    /// ready).
    pub keep_alive: Duration,
}

impl Windows {
    /// Whether a call `gap` after the last invocation ended finds a ready instance, when a
    /// start takes `start`.
    pub fn covers(&self, gap: Duration, start: Duration) -> bool {
        if self.prewarm.is_zero() {
            gap < self.keep_alive
        } else {
            let ready = self.prewarm + start;
            gap >= ready && gap < ready + self.keep_alive
        }
    }
}

/// A keep-alive policy for one function.
pub trait KeepAlive: Send + Sync + std::fmt::Debug {
    /// The policy's name for reports.
    fn name(&self) -> &'static str;
    /// Records the idle gap between the end of one invocation and the start of the next.
    fn observe_gap(&mut self, gap: Duration);
    /// Records how long a start took, from placement to ready.
    fn observe_start(&mut self, _took: Duration) {}
    /// The windows to apply now.
    fn windows(&self) -> Windows;
}

/// Keep every idle instance for a fixed time.
#[derive(Debug, Clone)]
pub struct Fixed {
    keep_alive: Duration,
}

impl Fixed {
    /// A fixed keep-alive of `keep_alive`.
    pub fn new(keep_alive: Duration) -> Fixed {
        Fixed { keep_alive }
    }
}

impl KeepAlive for Fixed {
    fn name(&self) -> &'static str {
        "fixed"
    }

    fn observe_gap(&mut self, _gap: Duration) {}

    fn windows(&self) -> Windows {
        Windows {
            prewarm: Duration::ZERO,
            keep_alive: self.keep_alive,
        }
    }
}

/// The priced hybrid histogram policy.
#[derive(Debug, Clone)]
pub struct Hybrid {
    /// Gaps per bin, fine then coarse; all halve when one would overflow, so older gaps
    /// weigh less.
    bins: Box<[u16; ALL_BINS]>,
    /// Summed length in seconds of the gaps in the first bin, weighed like the bins: a
    /// function called every few seconds is priced on its real gaps, not on half a bin.
    first_secs: f64,
    /// Gaps beyond the last bin, weighed like the bins.
    beyond: u16,
    /// Gaps recorded since the windows were last priced (see `RECOMPUTE_EVERY`).
    unpriced: u16,
    /// Gaps seen.
    samples: u32,
    fallback: Duration,
    /// Running estimate of a start's length; zero until one is observed.
    start: Duration,
    /// Recent gaps, and those of them the windows did not cover (decayed together).
    recent: u16,
    recent_cold: u16,
    /// Whether the service level applies (see `below_service_level`).
    serving: bool,
    current: Windows,
}

/// One candidate window: be ready from the start of bin `from` (0: never unload) to the
/// end of bin `to - 1`.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    from: usize,
    to: usize,
    cost: f64,
    cold: f64,
}

impl Hybrid {
    /// A policy that uses `fallback` as its fixed keep-alive until it has learned enough,
    /// and as the price of a cold start.
    pub fn new(fallback: Duration) -> Hybrid {
        Hybrid {
            bins: Box::new([0; ALL_BINS]),
            first_secs: 0.0,
            beyond: 0,
            unpriced: 0,
            samples: 0,
            fallback,
            start: Duration::ZERO,
            recent: 0,
            recent_cold: 0,
            serving: false,
            current: Windows {
                prewarm: Duration::ZERO,
                keep_alive: fallback,
            },
        }
    }

    /// Whether the service level applies: from when the recent cold-start share rises
    /// above `SERVICE_LEVEL` until it is down to `SERVICE_TARGET` again.
    pub fn below_service_level(&self) -> bool {
        self.serving
    }

    fn recent_share(&self) -> f64 {
        f64::from(self.recent_cold) / f64::from(self.recent.max(1))
    }

    /// The running estimate of a start's length.
    pub fn start_time(&self) -> Duration {
        self.start
    }

    fn recompute(&self) -> Windows {
        if self.samples < MIN_SAMPLES {
            return Windows {
                prewarm: Duration::ZERO,
                keep_alive: self.fallback,
            };
        }
        self.choose(self.below_service_level())
    }

    /// The cheapest window; under the service level, the cheapest of those that would have
    /// left at most `SERVICE_TARGET` (else `SERVICE_LEVEL`) of the gaps cold, if one costs
    /// at most `SERVICE_SPEND` times the cheapest.
    fn choose(&self, service: bool) -> Windows {
        let (candidates, total) = self.candidates();
        let cheapest = |ok: &dyn Fn(&Candidate) -> bool| {
            candidates
                .iter()
                .filter(|c| ok(c))
                // Of equal costs, the longer window: a tie is no reason to unload.
                .min_by(|a, b| a.cost.total_cmp(&b.cost).then(b.to.cmp(&a.to)))
                .copied()
        };
        let priced = cheapest(&|_| true).expect("unloading at once is always a candidate");
        let budget = priced.cost * SERVICE_SPEND;
        let within = |share: f64| cheapest(&|c| c.cold <= share * total && c.cost <= budget);
        let chosen = service
            .then(|| within(SERVICE_TARGET).or_else(|| within(SERVICE_LEVEL)))
            .flatten()
            .unwrap_or(priced);
        self.windows_of(chosen)
    }

    /// Every window worth pricing, priced. Ready-from and ready-until need only be tried
    /// at bins that hold gaps: moving either across empty bins changes the cost, never the
    /// gaps covered.
    fn candidates(&self) -> (Vec<Candidate>, f64) {
        let start = self.start.as_secs_f64();
        let price = self.fallback.as_secs_f64() + start;
        let edge_s = |i: usize| edge(i).as_secs_f64();
        // count[i]: gaps in bins below i; time[i]: their summed length (bin middles).
        let mut count = [0.0f64; ALL_BINS + 1];
        let mut time = [0.0f64; ALL_BINS + 1];
        let mut held = Vec::new();
        for (i, &c) in self.bins.iter().enumerate() {
            let c = f64::from(c);
            count[i + 1] = count[i] + c;
            let summed = if i == 0 {
                self.first_secs
            } else {
                c * (edge_s(i) + edge_s(i + 1)) / 2.0
            };
            time[i + 1] = time[i] + summed;
            if c > 0.0 {
                held.push(i);
            }
        }
        let total = count[ALL_BINS] + f64::from(self.beyond);
        let mut out = Vec::new();
        let froms = std::iter::once(0).chain(held.iter().copied().filter(|&h| h > 0));
        // A pre-warmed instance is ready this much ahead of the bin it is ready for.
        let early = SLACK.as_secs_f64() + MARGIN * start;
        for from in froms {
            if from > 0 && edge_s(from) <= start + early {
                continue;
            }
            // Unloading at once (0) is always there to fall back on.
            let tos = std::iter::once(0).chain(held.iter().map(|&h| h + 1));
            for to in tos.filter(|&t| t > from || t == from && from == 0) {
                let (ready, until) = (edge_s(from), edge_s(to));
                let covered = count[to] - count[from];
                let late = total - count[to];
                let cold = count[from] + late;
                let mut idle = (time[to] - time[from]) - ready * covered + (until - ready) * late;
                if from > 0 {
                    // Every gap past the pre-warm pays a load, and its instance is ready
                    // a little early.
                    idle += (covered + late) * (start + early);
                }
                out.push(Candidate {
                    from,
                    to,
                    cost: idle + cold * price,
                    cold,
                });
            }
        }
        (out, total)
    }

    fn windows_of(&self, c: Candidate) -> Windows {
        let until = edge(c.to);
        if c.from == 0 {
            return Windows {
                prewarm: Duration::ZERO,
                keep_alive: until,
            };
        }
        let ready = edge(c.from).saturating_sub(SLACK + self.start.mul_f64(MARGIN));
        Windows {
            prewarm: ready.saturating_sub(self.start).max(Duration::from_secs(1)),
            keep_alive: until.saturating_sub(ready),
        }
    }
}

impl KeepAlive for Hybrid {
    fn name(&self) -> &'static str {
        "adaptive"
    }

    fn observe_gap(&mut self, gap: Duration) {
        let missed = !self.current.covers(gap, self.start);
        self.recent += 1;
        self.recent_cold += u16::from(missed);
        if self.recent >= RECENT_GAPS {
            self.recent /= 2;
            self.recent_cold /= 2;
        }
        let share = self.recent_share();
        let was_serving = self.serving;
        self.serving = share > SERVICE_LEVEL || (self.serving && share > SERVICE_TARGET);
        self.samples = self.samples.saturating_add(1);
        let at = bin_of(gap);
        let full = at.map_or(self.beyond, |i| self.bins[i]) == u16::MAX;
        if full {
            self.bins.iter_mut().for_each(|c| *c /= 2);
            self.first_secs /= 2.0;
            self.beyond /= 2;
        }
        let new_bin = at.is_some_and(|i| self.bins[i] == 0);
        match at {
            Some(i) => self.bins[i] += 1,
            None => self.beyond += 1,
        }
        if at == Some(0) {
            self.first_secs += gap.as_secs_f64();
        }
        // Pricing walks every pair of non-empty bins, under the function's lock: done when
        // the histogram's shape changes (a bin fills for the first time, the service level
        // turns, the first gaps) and every `RECOMPUTE_EVERY` gaps otherwise.
        self.unpriced += 1;
        let serving = self.serving != was_serving;
        if new_bin || serving || self.samples <= MIN_SAMPLES || self.unpriced >= RECOMPUTE_EVERY {
            self.unpriced = 0;
            self.current = self.recompute();
        }
    }

    fn observe_start(&mut self, took: Duration) {
        let first = self.start.is_zero();
        self.start = if first {
            took
        } else {
            self.start
                .mul_f64(1.0 - START_WEIGHT)
                .saturating_add(took.mul_f64(START_WEIGHT))
        };
        // The first start length prices at once; later ones move the average a little,
        // and count toward the next pricing like gaps do (a burst of starts would
        // otherwise price once each, under the function's lock).
        self.unpriced += 1;
        if first || self.unpriced >= RECOMPUTE_EVERY {
            self.unpriced = 0;
            self.current = self.recompute();
        }
    }

    fn windows(&self) -> Windows {
        self.current
    }
}

/// Lower edge of bin `i` (`ALL_BINS`: the end of the last).
fn edge(i: usize) -> Duration {
    match i.checked_sub(HISTOGRAM_BINS) {
        None => BIN * i as u32,
        Some(long) => BIN * HISTOGRAM_BINS as u32 + LONG_BIN * long as u32,
    }
}

/// The bin a gap falls in; none past the last.
fn bin_of(gap: Duration) -> Option<usize> {
    let fine = (gap.as_secs() / BIN.as_secs()) as usize;
    if fine < HISTOGRAM_BINS {
        return Some(fine);
    }
    let long = ((gap - edge(HISTOGRAM_BINS)).as_secs() / LONG_BIN.as_secs()) as usize;
    (long < LONG_BINS).then_some(HISTOGRAM_BINS + long)
}

/// How long an instance may stay idle before it is retired, `since_end` after the
/// function's last invocation ended. With a pre-warm window, instances unload right after
/// an invocation (threshold zero) and the pre-warmed one stays for the keep-alive window.
pub fn idle_threshold(w: &Windows, since_end: Duration) -> Duration {
    if w.prewarm.is_zero() || since_end >= w.prewarm {
        w.keep_alive
    } else {
        Duration::ZERO
    }
}

/// Whether an instance should be pre-warmed now, `since_end` after the last invocation.
pub fn prewarm_due(w: &Windows, since_end: Duration) -> bool {
    !w.prewarm.is_zero() && since_end >= w.prewarm && since_end < w.prewarm + w.keep_alive
}

#[cfg(test)]
mod tests;
