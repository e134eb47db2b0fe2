//! Scaling decisions, and the background loop that applies them.
//!
//! The decisions are pure functions of counts and durations (unit-tested with plain
//! values): how many instances a demand needs, and which instances to retire. The loop
//! (`run`) wakes on a short tick or when a permit leaves a draining instance idle, asks
//! the activator to reap, and now and then to check that containers still run.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::activator::{Activator, Phase};

/// How often idle instances are looked for.
pub const REAP_INTERVAL: Duration = Duration::from_millis(250);
/// How often containers are checked to still run.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(2);

/// Instances needed for `demand` requests (in flight plus queued): one per `concurrency`
/// worth, at least `min`, at most `max`.
pub fn desired_instances(demand: usize, concurrency: u32, min: u32, max: u32) -> usize {
    let per = concurrency.max(1) as usize;
    demand.div_ceil(per).clamp(min as usize, max as usize)
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

/// Indexes of instances to retire: drained ones with nothing in flight; idle ones on a
/// draining node once another instance serves or nothing is asked (`demand` is queued plus
/// in-flight requests); and ready ones idle for `idle_timeout`, longest idle first,
/// keeping `min` of the current revision.
pub fn retire(
    instances: &[InstanceView],
    idle_timeout: Duration,
    min: u32,
    demand: usize,
) -> Vec<usize> {
    let others_serve = instances
        .iter()
        .any(|i| i.phase == Phase::Ready && !i.evacuating);
    let mut out: Vec<usize> = instances
        .iter()
        .enumerate()
        .filter(|(_, i)| {
            i.in_flight == 0
                && (i.phase == Phase::Draining
                    || (i.phase == Phase::Ready && i.evacuating && (others_serve || demand == 0)))
        })
        .map(|(idx, _)| idx)
        .collect();
    let mut current_left = instances
        .iter()
        .filter(|i| i.current && i.phase.counts_as_capacity() && !i.evacuating)
        .count();
    let mut idle: Vec<(usize, &InstanceView)> = instances
        .iter()
        .enumerate()
        .filter(|(_, i)| {
            i.phase == Phase::Ready && !i.evacuating && i.in_flight == 0 && i.idle >= idle_timeout
        })
        .collect();
    idle.sort_by_key(|(_, v)| std::cmp::Reverse(v.idle));
    for (idx, view) in idle {
        if view.current {
            if current_left <= min as usize {
                continue;
            }
            current_left -= 1;
        }
        out.push(idx);
    }
    out
}

/// The reaper loop: runs until `shutdown`.
pub async fn run(activator: Activator, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_health = tokio::time::Instant::now() + HEALTH_INTERVAL;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = activator.reaper().notified() => {}
            _ = activator.scheduler().freed().notified() => {}
            _ = tick.tick() => {}
        }
        activator.reap().await;
        if activator.take_health_request() || tokio::time::Instant::now() >= next_health {
            activator.check_health().await;
            next_health = tokio::time::Instant::now() + HEALTH_INTERVAL;
        }
    }
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

    #[test]
    fn idle_instances_past_the_timeout_are_retired() {
        let t = Duration::from_secs(60);
        let v = [
            view(true, Phase::Ready, 0, 61),
            view(true, Phase::Ready, 0, 10),
            view(true, Phase::Ready, 1, 600),
        ];
        assert_eq!(retire(&v, t, 0, 0), vec![0]);
    }

    #[test]
    fn min_instances_are_kept_even_when_idle() {
        let t = Duration::from_secs(60);
        let v = [
            view(true, Phase::Ready, 0, 100),
            view(true, Phase::Ready, 0, 200),
        ];
        assert_eq!(
            retire(&v, t, 1, 0),
            vec![1],
            "the longest idle goes, one stays"
        );
        assert!(retire(&v, t, 2, 0).is_empty());
    }

    #[test]
    fn drained_instances_go_once_their_requests_finish() {
        let t = Duration::from_secs(60);
        let v = [
            view(false, Phase::Draining, 0, 0),
            view(false, Phase::Draining, 2, 0),
            view(true, Phase::Starting, 0, 0),
        ];
        assert_eq!(retire(&v, t, 0, 0), vec![0]);
    }

    #[test]
    fn instances_on_a_draining_node_leave_once_another_serves_or_none_is_needed() {
        let t = Duration::from_secs(600);
        let mut leaving = view(true, Phase::Ready, 0, 0);
        leaving.evacuating = true;
        let replacement_starting = view(true, Phase::Starting, 0, 0);
        let replacement_ready = view(true, Phase::Ready, 0, 0);
        assert!(
            retire(&[leaving, replacement_starting], t, 1, 5).is_empty(),
            "traffic waits"
        );
        assert_eq!(retire(&[leaving, replacement_ready], t, 1, 5), vec![0]);
        assert_eq!(
            retire(&[leaving], t, 0, 0),
            vec![0],
            "nothing asked: go now"
        );
        let mut busy = leaving;
        busy.in_flight = 2;
        assert!(
            retire(&[busy, replacement_ready], t, 1, 5).is_empty(),
            "finish first"
        );
    }

    #[test]
    fn old_revision_instances_do_not_count_toward_min() {
        let t = Duration::from_secs(60);
        let v = [
            view(false, Phase::Ready, 0, 100),
            view(true, Phase::Ready, 0, 100),
        ];
        assert_eq!(retire(&v, t, 1, 0), vec![0]);
    }
}
