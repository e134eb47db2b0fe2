//! The `[scale]` section: instance counts, per-instance concurrency, the autoscaler's
//! windows and what happens to idle instances (keep-alive policy, stop or pause). The
//! decisions themselves live in `crate::autoscaler` and `crate::keepalive`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::check_duration;

/// Most instances one function may ask for.
pub const MAX_SCALE: u32 = 1000;
/// Most in-flight requests one instance may be given.
pub const MAX_CONCURRENCY: u32 = 10_000;
/// Largest ratio of short-window demand to capacity that may start panic mode.
const MAX_PANIC_THRESHOLD: f64 = 100.0;

/// Scaling bounds.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scale {
    /// Instances kept warm even without traffic.
    #[serde(default)]
    pub min: u32,
    /// Instances never exceeded.
    #[serde(default = "default_max")]
    pub max: u32,
    /// In-flight requests one instance is given at most.
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// An instance idle this long is retired (down to `min`); with `keep_alive =
    /// "adaptive"`, the fallback while the function's history is too short, and the idle
    /// time one cold start is worth.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    #[schema(value_type = String, example = "30s")]
    pub idle_timeout: Duration,
    /// Share of `concurrency` the autoscaler aims at per instance (0 to 1).
    #[serde(default = "default_target_utilization")]
    pub target_utilization: f64,
    /// Window over which observed concurrency is averaged to scale (and to scale down).
    #[serde(default = "default_stable_window", with = "humantime_serde")]
    #[schema(value_type = String, example = "30s")]
    pub stable_window: Duration,
    /// Short window: demand over `panic_threshold` times capacity there scales up at once.
    #[serde(default = "default_panic_window", with = "humantime_serde")]
    #[schema(value_type = String, example = "30s")]
    pub panic_window: Duration,
    /// Ratio of short-window demand to capacity that starts panic mode.
    #[serde(default = "default_panic_threshold")]
    pub panic_threshold: f64,
    /// What an idle instance becomes: `stop` (removed), `pause` (frozen, resumed on the
    /// next request in milliseconds) or `park` (stopped but kept: the next request starts
    /// the same container again, without a create); paused and parked instances are
    /// removed after `pause_timeout`.
    #[serde(default)]
    pub on_idle: OnIdle,
    /// How long a paused or parked instance is kept before it is removed.
    #[serde(default = "default_pause_timeout", with = "humantime_serde")]
    #[schema(value_type = String, example = "30s")]
    pub pause_timeout: Duration,
    /// Keep-alive policy: `fixed` (`idle_timeout`) or `adaptive` (learned from the
    /// function's idle gaps and start time, priced against its cold starts, with
    /// pre-warming).
    #[serde(default)]
    pub keep_alive: KeepAliveKind,
}

/// What an idle instance becomes.
#[derive(utoipa::ToSchema, Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnIdle {
    /// Removed.
    #[default]
    Stop,
    /// Frozen with Docker pause; resumed on the next request.
    Pause,
    /// Stopped with its container kept (Docker stop); started again on the next request,
    /// without a create.
    Park,
}

/// Which keep-alive policy decides how long idle instances stay.
#[derive(utoipa::ToSchema, Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeepAliveKind {
    /// `idle_timeout`.
    #[default]
    Fixed,
    /// A priced hybrid histogram policy (after Shahrad et al., ATC 2020).
    Adaptive,
}

fn default_max() -> u32 {
    4
}
fn default_concurrency() -> u32 {
    50
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_target_utilization() -> f64 {
    0.7
}
fn default_stable_window() -> Duration {
    Duration::from_secs(60)
}
fn default_panic_window() -> Duration {
    Duration::from_secs(6)
}
fn default_panic_threshold() -> f64 {
    2.0
}
fn default_pause_timeout() -> Duration {
    Duration::from_secs(30 * 60)
}

impl Default for Scale {
    fn default() -> Self {
        Scale {
            min: 0,
            max: default_max(),
            concurrency: default_concurrency(),
            idle_timeout: default_idle_timeout(),
            target_utilization: default_target_utilization(),
            stable_window: default_stable_window(),
            panic_window: default_panic_window(),
            panic_threshold: default_panic_threshold(),
            on_idle: OnIdle::Stop,
            pause_timeout: default_pause_timeout(),
            keep_alive: KeepAliveKind::Fixed,
        }
    }
}

impl Scale {
    /// Reports every problem in the section, each at its `scale.` field path.
    pub(super) fn validate(&self, bad: &mut impl FnMut(&str, String)) {
        self.validate_counts(bad);
        check_duration(
            bad,
            "scale.idle_timeout",
            self.idle_timeout,
            Duration::from_secs(1),
        );
        self.validate_autoscaler(bad);
        check_duration(
            bad,
            "scale.pause_timeout",
            self.pause_timeout,
            Duration::from_secs(1),
        );
    }

    /// Instance bounds and per-instance concurrency.
    fn validate_counts(&self, bad: &mut impl FnMut(&str, String)) {
        if self.max == 0 || self.max > MAX_SCALE {
            bad("scale.max", format!("must be between 1 and {MAX_SCALE}"));
        }
        if self.min > self.max {
            bad(
                "scale.min",
                format!("{} is above scale.max ({})", self.min, self.max),
            );
        }
        if self.concurrency == 0 || self.concurrency > MAX_CONCURRENCY {
            bad(
                "scale.concurrency",
                format!("must be between 1 and {MAX_CONCURRENCY}"),
            );
        }
    }

    /// The autoscaler's target, windows and panic threshold.
    fn validate_autoscaler(&self, bad: &mut impl FnMut(&str, String)) {
        if !(self.target_utilization > 0.0 && self.target_utilization <= 1.0) {
            bad(
                "scale.target_utilization",
                format!(
                    "{} is not between 0 (excluded) and 1",
                    self.target_utilization
                ),
            );
        }
        check_duration(
            bad,
            "scale.stable_window",
            self.stable_window,
            Duration::from_secs(1),
        );
        check_duration(
            bad,
            "scale.panic_window",
            self.panic_window,
            Duration::from_millis(500),
        );
        if self.panic_window > self.stable_window {
            bad(
                "scale.panic_window",
                "must not be longer than scale.stable_window".into(),
            );
        }
        if !(self.panic_threshold >= 1.0 && self.panic_threshold <= MAX_PANIC_THRESHOLD) {
            bad(
                "scale.panic_threshold",
                format!(
                    "{} is not between 1 and {MAX_PANIC_THRESHOLD}",
                    self.panic_threshold
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::test_support::{fields, toml};

    #[test]
    fn scaling_windows_and_warm_tiers_are_checked() {
        let m = toml("name = \"a\"\nimage = \"e:1\"\n[scale]\non_idle = \"pause\"\nkeep_alive = \"adaptive\"")
            .unwrap();
        assert_eq!(m.scale.on_idle, OnIdle::Pause);
        assert_eq!(m.scale.keep_alive, KeepAliveKind::Adaptive);
        let parked = toml("name = \"a\"\nimage = \"e:1\"\n[scale]\non_idle = \"park\"").unwrap();
        assert_eq!(parked.scale.on_idle, OnIdle::Park);
        assert_eq!(m.scale.stable_window, Duration::from_secs(60));
        let err = toml(
            "name = \"a\"\nimage = \"e:1\"\n[scale]\ntarget_utilization = 1.5\npanic_window = \"2m\"\npanic_threshold = 0.5",
        )
        .unwrap_err();
        let f = fields(err);
        for field in [
            "scale.target_utilization",
            "scale.panic_window",
            "scale.panic_threshold",
        ] {
            assert!(f.contains(&field.to_string()), "{field} in {f:?}");
        }
    }

    #[test]
    fn panic_threshold_message_names_its_bounds() {
        let err =
            toml("name = \"a\"\nimage = \"e:1\"\n[scale]\npanic_threshold = 0.5").unwrap_err();
        assert_eq!(
            err.field_errors()[0].message,
            "0.5 is not between 1 and 100"
        );
    }
}
