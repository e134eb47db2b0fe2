//! The `[jobs]` section: how the function takes durable jobs (`/api/v1/functions/NAME/jobs`).
//!
//! ```toml
//! [jobs]
//! concurrency = 2   # jobs in flight per instance at the most (default: scale.concurrency);
//!                   # fewer than scale.concurrency keeps slots free for requests
//! max_attempts = 3  # attempts a job may take (retries on 408, 429, 5xx, timeouts)
//! callback_secret = "hooks"   # the `ember secret` that signs callbacks (X-Callback-Url)
//! batch = { max = 32, wait = "2s" }   # hand up to 32 queued jobs to one request
//! ```
//!
//! In batch mode a request carries a JSON array of up to `max` jobs' inputs (so every
//! input must be JSON) and the function answers a JSON array of as many results, in
//! order; a partial batch goes once its oldest job has waited `wait`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Attempts a job may take unless the section says otherwise.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// The most attempts a section may allow.
pub const MAX_ATTEMPTS_LIMIT: u32 = 20;
/// The most jobs one batch may hold: the request lists their ids in `Ember-Job-Id` (33
/// bytes each), which must stay under the 16 KiB header limits of common servers.
pub const BATCH_MAX_LIMIT: u32 = 256;
/// The longest a partial batch may wait to fill.
pub const BATCH_WAIT_LIMIT: Duration = Duration::from_secs(600);

/// The `[jobs]` section.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[schema(as = JobSettings)]
pub struct Jobs {
    /// Jobs in flight per instance at the most; absent: `scale.concurrency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// Attempts a job may take.
    #[serde(
        default = "default_max_attempts",
        skip_serializing_if = "is_default_max_attempts"
    )]
    pub max_attempts: u32,
    /// The secret (`ember secret set NAME`) that signs callbacks; without one, a job
    /// cannot ask for a callback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_secret: Option<String>,
    /// Batch mode: several jobs' inputs in one request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<Batch>,
}

/// `[jobs] batch`: how many queued jobs one request takes, and how long to wait for them.
#[derive(utoipa::ToSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    /// Jobs in one request at the most.
    #[serde(default = "default_batch_max")]
    pub max: u32,
    /// How long the oldest waiting job waits for a batch to fill before a partial one goes.
    #[serde(default = "default_batch_wait", with = "humantime_serde")]
    #[schema(value_type = String, example = "30s")]
    pub wait: Duration,
}

fn default_batch_max() -> u32 {
    32
}
fn default_batch_wait() -> Duration {
    Duration::from_secs(2)
}

impl Default for Jobs {
    fn default() -> Self {
        Jobs {
            concurrency: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            callback_secret: None,
            batch: None,
        }
    }
}

fn default_max_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}
fn is_default_max_attempts(n: &u32) -> bool {
    *n == DEFAULT_MAX_ATTEMPTS
}

impl Jobs {
    /// Checks the section against the function's per-instance concurrency.
    pub(super) fn validate(&self, concurrency: u32, bad: &mut impl FnMut(&str, String)) {
        if let Some(c) = self.concurrency {
            if c == 0 || c > concurrency {
                bad(
                    "jobs.concurrency",
                    format!(
                        "must be from 1 to scale.concurrency ({concurrency}): the jobs one \
                         instance runs at once, got {c}"
                    ),
                );
            }
        }
        if let Some(name) = &self.callback_secret {
            if let Err(m) = super::check_secret_name(name) {
                bad("jobs.callback_secret", m);
            }
        }
        if let Some(b) = &self.batch {
            if b.max == 0 || b.max > BATCH_MAX_LIMIT {
                bad(
                    "jobs.batch.max",
                    format!(
                        "must be from 1 to {BATCH_MAX_LIMIT}: the jobs one request takes, got {}",
                        b.max
                    ),
                );
            }
            if b.wait > BATCH_WAIT_LIMIT {
                bad(
                    "jobs.batch.wait",
                    format!(
                        "must be at most {}: how long a partial batch waits to fill, got {}",
                        humantime::format_duration(BATCH_WAIT_LIMIT),
                        humantime::format_duration(b.wait)
                    ),
                );
            }
        }
        if self.max_attempts == 0 || self.max_attempts > MAX_ATTEMPTS_LIMIT {
            bad(
                "jobs.max_attempts",
                format!(
                    "must be from 1 to {MAX_ATTEMPTS_LIMIT}, got {}",
                    self.max_attempts
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::manifest::{Format, Manifest};

    fn parse(jobs: &str) -> Result<Manifest, String> {
        let toml =
            format!("name = \"f\"\nimage = \"x:1\"\n[scale]\nconcurrency = 4\n[jobs]\n{jobs}");
        Manifest::parse(&toml, Format::Toml).map_err(|e| format!("{:?}", e.field_errors()))
    }

    #[test]
    fn jobs_concurrency_attempts_and_batch_are_checked_and_the_section_is_absent_unless_written() {
        let m = parse("concurrency = 2\nmax_attempts = 5").unwrap();
        let j = m.jobs.as_ref().unwrap();
        assert_eq!((j.concurrency, j.max_attempts), (Some(2), 5));
        assert!(parse("concurrency = 5")
            .unwrap_err()
            .contains("jobs.concurrency"));
        assert!(parse("concurrency = 0")
            .unwrap_err()
            .contains("jobs.concurrency"));
        assert!(parse("max_attempts = 0")
            .unwrap_err()
            .contains("jobs.max_attempts"));
        assert!(parse("retries = 2").is_err(), "unknown fields are refused");
        let b = parse("batch = { max = 8, wait = \"500ms\" }").unwrap();
        let b = b.jobs.unwrap().batch.unwrap();
        assert_eq!((b.max, b.wait), (8, std::time::Duration::from_millis(500)));
        let d = parse("batch = {}").unwrap().jobs.unwrap().batch.unwrap();
        assert_eq!((d.max, d.wait.as_secs()), (32, 2));
        assert!(parse("batch = { max = 0 }")
            .unwrap_err()
            .contains("jobs.batch.max"));
        assert!(parse("batch = { wait = \"1h\" }")
            .unwrap_err()
            .contains("jobs.batch.wait"));
        assert!(parse("batch = { size = 4 }").is_err());
        let plain = Manifest::parse("name = \"f\"\nimage = \"x:1\"", Format::Toml).unwrap();
        assert!(plain.jobs.is_none());
    }
}
