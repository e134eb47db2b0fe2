//! Keep-alive policies: how long an idle function's last instances stay warm, and whether
//! to pre-warm one just before the next expected invocation.
//!
//! `Fixed` keeps instances for a set time. `Hybrid` follows the hybrid histogram policy of
//! "Serverless in the Wild" (Shahrad et al., USENIX ATC 2020): a histogram of the idle gaps
//! between a function's invocations (1-minute bins over 4 hours, about 1 KB) gives a
//! pre-warm window (the gaps' 5th percentile, less a 10 % margin: unload right after an
//! invocation and load again just before the next is expected) and a keep-alive window
//! (up to the 99th percentile, plus 10 %). While the histogram is too thin, too flat to be
//! telling, or most gaps fall beyond its range, it falls back to the fixed timeout.
//!
//! Decisions are cheap: the windows are recomputed only when a gap is recorded.
//! The same functions drive the live reaper and the trace simulator
//! (`examples/keepalive_sim.rs`).

use std::time::Duration;

/// Bins of the idle-gap histogram.
pub const HISTOGRAM_BINS: usize = 240;
/// Width of one bin.
pub const BIN: Duration = Duration::from_secs(60);
/// Gaps needed before the histogram is trusted.
pub const MIN_SAMPLES: u32 = 10;
/// Coefficient of variation of the bin counts below which the histogram is too flat to
/// predict anything.
pub const CV_THRESHOLD: f64 = 2.0;
/// Share of gaps beyond the histogram's range above which it is not used.
pub const MAX_OUT_OF_BOUNDS: f64 = 0.5;
/// Margin taken off the pre-warm window and added to the keep-alive window.
pub const MARGIN: f64 = 0.10;

/// What a policy decides for one function now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// Time after the last invocation ends before an instance is loaded again; zero means
    /// "keep the instance instead of unloading it".
    pub prewarm: Duration,
    /// How long an instance stays warm (after the invocation, or after pre-warming).
    pub keep_alive: Duration,
}

/// A keep-alive policy for one function.
pub trait KeepAlive: Send + Sync + std::fmt::Debug {
    /// The policy's name for reports.
    fn name(&self) -> &'static str;
    /// Records the idle gap between the end of one invocation and the start of the next.
    fn observe_gap(&mut self, gap: Duration);
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

/// The hybrid histogram policy.
#[derive(Debug, Clone)]
pub struct Hybrid {
    bins: Box<[u32; HISTOGRAM_BINS]>,
    samples: u32,
    out_of_bounds: u32,
    in_range: u64,
    sum_squares: u64,
    fallback: Duration,
    current: Windows,
}

impl Hybrid {
    /// A policy that uses `fallback` as its fixed keep-alive until it has learned enough.
    pub fn new(fallback: Duration) -> Hybrid {
        Hybrid {
            bins: Box::new([0; HISTOGRAM_BINS]),
            samples: 0,
            out_of_bounds: 0,
            in_range: 0,
            sum_squares: 0,
            fallback,
            current: Windows {
                prewarm: Duration::ZERO,
                keep_alive: fallback,
            },
        }
    }

    fn recompute(&self) -> Windows {
        let fallback = Windows {
            prewarm: Duration::ZERO,
            keep_alive: self.fallback,
        };
        let in_range = self.in_range;
        if self.samples < MIN_SAMPLES || in_range == 0 {
            return fallback;
        }
        if f64::from(self.out_of_bounds) / f64::from(self.samples) > MAX_OUT_OF_BOUNDS {
            return fallback;
        }
        // Mean and variance of the bin counts from running sums: O(1) per gap.
        let n = HISTOGRAM_BINS as f64;
        let mean = in_range as f64 / n;
        let variance = (self.sum_squares as f64 / n - mean * mean).max(0.0);
        if variance.sqrt() / mean < CV_THRESHOLD {
            return fallback;
        }
        let percentile_bin = |p: f64| {
            let target = (in_range as f64 * p).ceil().max(1.0) as u64;
            let mut seen = 0u64;
            for (i, &c) in self.bins.iter().enumerate() {
                seen += u64::from(c);
                if seen >= target {
                    return i;
                }
            }
            HISTOGRAM_BINS - 1
        };
        let head = BIN * percentile_bin(0.05) as u32;
        let tail = BIN * (percentile_bin(0.99) as u32 + 1);
        let prewarm = head.mul_f64(1.0 - MARGIN);
        let keep_alive = tail.mul_f64(1.0 + MARGIN).saturating_sub(prewarm);
        Windows {
            prewarm,
            keep_alive: keep_alive.max(BIN),
        }
    }
}

impl KeepAlive for Hybrid {
    fn name(&self) -> &'static str {
        "adaptive"
    }

    fn observe_gap(&mut self, gap: Duration) {
        self.samples = self.samples.saturating_add(1);
        let bin = (gap.as_secs() / BIN.as_secs()) as usize;
        match self.bins.get_mut(bin) {
            Some(count) if *count < u32::MAX => {
                self.sum_squares += 2 * u64::from(*count) + 1;
                self.in_range += 1;
                *count += 1;
            }
            Some(_) => {}
            None => self.out_of_bounds = self.out_of_bounds.saturating_add(1),
        }
        self.current = self.recompute();
    }

    fn windows(&self) -> Windows {
        self.current
    }
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
mod tests {
    use super::*;

    fn minutes(m: u64) -> Duration {
        Duration::from_secs(60 * m)
    }

    #[test]
    fn fixed_keeps_instances_for_its_timeout_and_never_prewarms() {
        let mut f = Fixed::new(minutes(10));
        f.observe_gap(minutes(3));
        assert_eq!(
            f.windows(),
            Windows {
                prewarm: Duration::ZERO,
                keep_alive: minutes(10)
            }
        );
    }

    #[test]
    fn hybrid_falls_back_until_it_has_enough_gaps() {
        let mut h = Hybrid::new(minutes(10));
        for _ in 0..(MIN_SAMPLES - 1) {
            h.observe_gap(minutes(30));
        }
        assert_eq!(h.windows().keep_alive, minutes(10));
        assert!(h.windows().prewarm.is_zero());
    }

    #[test]
    fn a_periodic_function_is_unloaded_then_prewarmed_just_before_its_next_call() {
        let mut h = Hybrid::new(minutes(10));
        for _ in 0..20 {
            h.observe_gap(minutes(30) + Duration::from_secs(10));
        }
        let w = h.windows();
        assert!(w.prewarm > minutes(25) && w.prewarm < minutes(30), "{w:?}");
        assert!(
            w.prewarm + w.keep_alive > minutes(31),
            "covers the next call: {w:?}"
        );
        assert_eq!(
            idle_threshold(&w, minutes(1)),
            Duration::ZERO,
            "unload after the call"
        );
        assert!(!prewarm_due(&w, minutes(20)));
        assert!(prewarm_due(&w, minutes(29)));
        assert!(!prewarm_due(&w, minutes(40)));
    }

    #[test]
    fn frequent_short_gaps_keep_the_instance_without_prewarming() {
        let mut h = Hybrid::new(minutes(10));
        for _ in 0..50 {
            h.observe_gap(Duration::from_secs(20));
        }
        let w = h.windows();
        assert!(w.prewarm.is_zero(), "{w:?}");
        assert!(
            w.keep_alive <= minutes(2),
            "much shorter than the fixed 10: {w:?}"
        );
    }

    #[test]
    fn gaps_beyond_the_range_fall_back_to_fixed() {
        let mut h = Hybrid::new(minutes(10));
        for _ in 0..20 {
            h.observe_gap(minutes(600));
        }
        assert_eq!(h.windows().keep_alive, minutes(10));
    }

    #[test]
    fn running_sums_match_a_full_recount() {
        let mut h = Hybrid::new(minutes(10));
        for i in 0..500u64 {
            h.observe_gap(Duration::from_secs((i * 37) % 3000));
        }
        let counted: u64 = h.bins.iter().map(|&c| u64::from(c)).sum();
        let squares: u64 = h.bins.iter().map(|&c| u64::from(c) * u64::from(c)).sum();
        assert_eq!(h.in_range, counted);
        assert_eq!(h.sum_squares, squares);
    }

    #[test]
    fn the_policy_state_stays_about_a_kilobyte() {
        let h = Hybrid::new(minutes(10));
        let bytes = std::mem::size_of_val(&h) + std::mem::size_of_val(&*h.bins);
        assert!(
            bytes <= 1100,
            "a function's keep-alive state takes {bytes} bytes"
        );
    }
}
