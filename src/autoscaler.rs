//! Scaling decisions, as pure functions of counts and durations (unit-tested with plain
//! values and paused time): how many instances a demand needs, the Knative-style windowed
//! scaler, and which instances to retire. Nothing here acts: the activator's reaper
//! (`activator/reap.rs`) feeds these decisions and applies them.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::manifest::Scale;
use crate::model::Phase;

/// How often the reaper samples demand and looks for idle instances.
pub const REAP_INTERVAL: Duration = Duration::from_millis(250);

/// An instance idle this long may go when there are more instances than desired.
pub const SCALE_DOWN_GRACE: Duration = Duration::from_secs(2);

/// Instances needed for `demand` requests (in flight plus queued): one per `concurrency`
/// worth, at least `min`, at most `max`.
pub fn desired_instances(demand: usize, concurrency: u32, min: u32, max: u32) -> usize {
    let per = concurrency.max(1) as usize;
    demand.div_ceil(per).clamp(min as usize, max as usize)
}

/// Observed concurrency (in flight plus queued) over time, for window averages. Samples
/// are expected every `interval`; time without samples (before the function existed)
/// counts as zero, so a short burst is not mistaken for sustained load.
#[derive(Debug)]
pub struct Window {
    samples: VecDeque<(Instant, f64)>,
    interval: Duration,
}

impl Window {
    /// Records a sample, dropping those older than `keep`.
    pub fn record(&mut self, now: Instant, value: f64, keep: Duration) {
        self.samples.push_back((now, value));
        while let Some((t, _)) = self.samples.front() {
            if now.saturating_duration_since(*t) > keep {
                self.samples.pop_front();
            } else {
                break;
            }
        }
    }

    /// A window sampled every `interval`.
    pub fn new(interval: Duration) -> Window {
        Window {
            samples: VecDeque::new(),
            interval,
        }
    }

    /// The average over the last `over`; zero without samples.
    pub fn average(&self, now: Instant, over: Duration) -> f64 {
        let (sum, n) = self
            .samples
            .iter()
            .rev()
            .take_while(|(t, _)| now.saturating_duration_since(*t) < over)
            .fold((0.0, 0usize), |(s, n), (_, v)| (s + v, n + 1));
        let expected = (over.as_secs_f64() / self.interval.as_secs_f64()).floor() as usize;
        if n == 0 {
            0.0
        } else {
            sum / n.max(expected) as f64
        }
    }
}

/// The Knative-style decision for one function.
#[derive(Debug)]
pub struct Scaler {
    window: Window,
    panic_until: Option<Instant>,
}

impl Default for Scaler {
    fn default() -> Self {
        Scaler::new(REAP_INTERVAL)
    }
}

/// What the scaler decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Instances wanted now.
    pub desired: usize,
    /// Whether the function is in panic mode (no scale-down).
    pub panicking: bool,
}

impl Scaler {
    /// A scaler fed a sample every `interval`.
    pub fn new(interval: Duration) -> Scaler {
        Scaler {
            window: Window::new(interval),
            panic_until: None,
        }
    }

    /// Records the observed concurrency now.
    pub fn observe(&mut self, now: Instant, demand: f64, scale: &Scale) {
        self.window.record(now, demand, scale.stable_window);
    }

    /// Desired instances = ceil(observed concurrency / (concurrency × target
    /// utilisation)), over the stable window, or over the panic window while in panic
    /// mode, which starts when short-window demand exceeds `panic_threshold` times the
    /// capacity of the `active` instances and lasts a stable window. Never below what the
    /// `in_flight` requests need, never outside `min..=max`, never down while panicking.
    pub fn decide(
        &mut self,
        now: Instant,
        scale: &Scale,
        active: usize,
        in_flight: u32,
    ) -> Decision {
        let per_instance = f64::from(scale.concurrency.max(1)) * scale.target_utilization;
        let stable = self.window.average(now, scale.stable_window);
        let short = self.window.average(now, scale.panic_window);
        let capacity = (active as f64) * f64::from(scale.concurrency.max(1));
        if short > 0.0 && short >= scale.panic_threshold * capacity {
            self.panic_until = Some(now + scale.stable_window);
        }
        let panicking = self.panic_until.is_some_and(|t| now < t);
        let mut desired = if panicking {
            ((short / per_instance).ceil() as usize).max(active)
        } else {
            (stable / per_instance).ceil() as usize
        };
        let needed_now = (in_flight as usize).div_ceil(scale.concurrency.max(1) as usize);
        desired = desired
            .max(needed_now)
            .clamp(scale.min as usize, scale.max as usize);
        Decision { desired, panicking }
    }
}

/// What the retire decision needs to know of an instance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InstanceView {
    /// Whether it runs the current revision.
    pub current: bool,
    /// Its phase.
    pub phase: Phase,
    /// Requests in flight.
    pub in_flight: u32,
    /// Time since its last request finished.
    pub idle: Duration,
    /// Whether its node is draining.
    pub evacuating: bool,
}

/// The function-level inputs of the retire decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetirePolicy {
    /// Idle time after which the last instances go (the keep-alive policy's say).
    pub keep_alive: Duration,
    /// Instances the scaler wants.
    pub desired: usize,
    /// `scale.min`.
    pub min: u32,
    /// Requests queued plus in flight.
    pub demand: usize,
}

/// Indexes of instances to retire: drained ones with nothing in flight; idle ones on a
/// draining node once another instance serves or nothing is asked; idle ones above the
/// desired count after a short grace; and idle ones past the keep-alive, longest idle
/// first, keeping `min` of the current revision.
pub fn retire(instances: &[InstanceView], p: RetirePolicy) -> Vec<usize> {
    let others_serve = instances
        .iter()
        .any(|i| i.phase == Phase::Ready && !i.evacuating);
    let mut out: Vec<usize> = instances
        .iter()
        .enumerate()
        .filter(|(_, i)| {
            i.in_flight == 0
                && (i.phase == Phase::Draining
                    || (i.phase == Phase::Ready && i.evacuating && (others_serve || p.demand == 0)))
        })
        .map(|(idx, _)| idx)
        .collect();
    let mut active = instances
        .iter()
        .filter(|i| i.current && i.phase.counts_as_capacity() && !i.evacuating)
        .count();
    let mut idle: Vec<(usize, &InstanceView)> = instances
        .iter()
        .enumerate()
        .filter(|(_, i)| i.phase == Phase::Ready && !i.evacuating && i.in_flight == 0)
        .collect();
    idle.sort_by_key(|(_, v)| std::cmp::Reverse(v.idle));
    let floor = p.min as usize;
    for (idx, view) in idle {
        if !view.current {
            if view.idle >= p.keep_alive {
                out.push(idx);
            }
            continue;
        }
        // Scaling in stops at one instance: the last ones go by the keep-alive alone.
        let above_desired = active > p.desired.max(floor).max(1) && view.idle >= SCALE_DOWN_GRACE;
        let past_keep_alive = active > floor && view.idle >= p.keep_alive;
        if above_desired || past_keep_alive {
            active -= 1;
            out.push(idx);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(current: bool, phase: Phase, in_flight: u32, idle_s: u64) -> InstanceView {
        InstanceView {
            current,
            phase,
            in_flight,
            idle: Duration::from_secs(idle_s),
            evacuating: false,
        }
    }

    fn policy(keep_alive_s: u64, desired: usize, min: u32, demand: usize) -> RetirePolicy {
        RetirePolicy {
            keep_alive: Duration::from_secs(keep_alive_s),
            desired,
            min,
            demand,
        }
    }

    fn scale(min: u32, max: u32, concurrency: u32) -> Scale {
        Scale {
            min,
            max,
            concurrency,
            stable_window: Duration::from_secs(60),
            panic_window: Duration::from_secs(6),
            ..Scale::default()
        }
    }

    #[test]
    fn desired_instances_follow_concurrency_within_bounds() {
        assert_eq!(desired_instances(0, 50, 0, 4), 0);
        assert_eq!(desired_instances(1, 50, 0, 4), 1);
        assert_eq!(desired_instances(50, 50, 0, 4), 1);
        assert_eq!(desired_instances(51, 50, 0, 4), 2);
        assert_eq!(desired_instances(10_000, 50, 0, 4), 4);
        assert_eq!(desired_instances(0, 50, 2, 4), 2);
        assert_eq!(
            desired_instances(3, 0, 0, 4),
            3,
            "zero concurrency is treated as one"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_stable_window_averages_and_scales_by_target_utilisation() {
        let s = scale(0, 10, 10);
        let mut sc = Scaler::new(Duration::from_secs(1));
        for _ in 0..60 {
            sc.observe(Instant::now(), 14.0, &s);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // 14 / (10 × 0.7) = 2 instances.
        assert_eq!(sc.decide(Instant::now(), &s, 2, 0).desired, 2);
        for _ in 0..30 {
            sc.observe(Instant::now(), 0.0, &s);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(
            sc.decide(Instant::now(), &s, 2, 0).desired,
            1,
            "half the window idle"
        );
        for _ in 0..61 {
            sc.observe(Instant::now(), 0.0, &s);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(sc.decide(Instant::now(), &s, 2, 0).desired, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_spike_over_twice_capacity_panics_and_scales_at_once_without_scaling_down() {
        let s = scale(0, 20, 10);
        let mut sc = Scaler::new(Duration::from_secs(1));
        for _ in 0..54 {
            sc.observe(Instant::now(), 5.0, &s);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        for _ in 0..6 {
            sc.observe(Instant::now(), 60.0, &s);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let d = sc.decide(Instant::now(), &s, 1, 0);
        assert!(d.panicking);
        // Five 60s in the six-second window: 50 / (10 × 0.7), rounded up.
        assert_eq!(d.desired, 8);
        for _ in 0..10 {
            sc.observe(Instant::now(), 0.0, &s);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let d = sc.decide(Instant::now(), &s, 9, 0);
        assert!(
            d.panicking && d.desired >= 9,
            "no scale-down while panicking: {d:?}"
        );
        tokio::time::advance(Duration::from_secs(61)).await;
        sc.observe(Instant::now(), 0.0, &s);
        assert!(!sc.decide(Instant::now(), &s, 9, 0).panicking);
    }

    #[tokio::test(start_paused = true)]
    async fn decisions_respect_min_max_and_in_flight_needs() {
        let s = scale(1, 3, 10);
        let mut sc = Scaler::new(Duration::from_secs(1));
        sc.observe(Instant::now(), 1000.0, &s);
        assert_eq!(sc.decide(Instant::now(), &s, 3, 0).desired, 3, "max");
        let mut sc = Scaler::new(Duration::from_secs(1));
        assert_eq!(sc.decide(Instant::now(), &s, 0, 0).desired, 1, "min");
        assert_eq!(
            sc.decide(Instant::now(), &s, 0, 25).desired,
            3,
            "in flight need 3"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_burst_is_not_sustained_load() {
        let s = scale(0, 10, 50);
        let mut sc = Scaler::new(Duration::from_millis(250));
        sc.observe(Instant::now(), 50.0, &s);
        tokio::time::advance(Duration::from_millis(250)).await;
        sc.observe(Instant::now(), 50.0, &s);
        let d = sc.decide(Instant::now(), &s, 1, 0);
        assert!(!d.panicking);
        assert_eq!(
            d.desired, 1,
            "50 requests for half a second at concurrency 50: one"
        );
    }

    #[test]
    fn idle_instances_past_the_keep_alive_are_retired() {
        let v = [
            view(true, Phase::Ready, 0, 61),
            view(true, Phase::Ready, 0, 10),
            view(true, Phase::Ready, 1, 600),
        ];
        assert_eq!(retire(&v, policy(60, 3, 0, 1)), vec![0]);
    }

    #[test]
    fn instances_above_the_desired_count_go_after_the_grace() {
        let v = [
            view(true, Phase::Ready, 0, 5),
            view(true, Phase::Ready, 0, 1),
            view(true, Phase::Ready, 3, 0),
        ];
        assert_eq!(
            retire(&v, policy(600, 1, 0, 3)),
            vec![0],
            "the 1 s idle one is in grace"
        );
    }

    #[test]
    fn the_last_instance_waits_for_the_keep_alive_even_when_none_is_desired() {
        let v = [view(true, Phase::Ready, 0, 30)];
        assert!(retire(&v, policy(300, 0, 0, 0)).is_empty());
        assert_eq!(retire(&v, policy(20, 0, 0, 0)), vec![0]);
    }

    #[test]
    fn min_instances_are_kept_even_when_idle() {
        let v = [
            view(true, Phase::Ready, 0, 100),
            view(true, Phase::Ready, 0, 200),
        ];
        assert_eq!(
            retire(&v, policy(60, 0, 1, 0)),
            vec![1],
            "the longest idle goes, one stays"
        );
        assert!(retire(&v, policy(60, 0, 2, 0)).is_empty());
    }

    #[test]
    fn drained_instances_go_once_their_requests_finish() {
        let v = [
            view(false, Phase::Draining, 0, 0),
            view(false, Phase::Draining, 2, 0),
            view(true, Phase::Starting, 0, 0),
        ];
        assert_eq!(retire(&v, policy(60, 1, 0, 0)), vec![0]);
    }

    #[test]
    fn instances_on_a_draining_node_leave_once_another_serves_or_none_is_needed() {
        let mut leaving = view(true, Phase::Ready, 0, 0);
        leaving.evacuating = true;
        let replacement_starting = view(true, Phase::Starting, 0, 0);
        let replacement_ready = view(true, Phase::Ready, 0, 0);
        let p = policy(600, 1, 1, 5);
        assert!(
            retire(&[leaving, replacement_starting], p).is_empty(),
            "traffic waits"
        );
        assert_eq!(retire(&[leaving, replacement_ready], p), vec![0]);
        assert_eq!(
            retire(&[leaving], policy(600, 0, 0, 0)),
            vec![0],
            "nothing asked: go now"
        );
        let mut busy = leaving;
        busy.in_flight = 2;
        assert!(
            retire(&[busy, replacement_ready], p).is_empty(),
            "finish first"
        );
    }

    #[test]
    fn old_revision_instances_do_not_count_toward_min() {
        let v = [
            view(false, Phase::Ready, 0, 100),
            view(true, Phase::Ready, 0, 100),
        ];
        assert_eq!(retire(&v, policy(60, 1, 1, 0)), vec![0]);
    }
}
