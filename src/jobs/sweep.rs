//! Retention of ended jobs: their input and answer go after `Keep::bodies` (the result
//! is then 410), their records after `Keep::records`, idempotency keys after a day.

use std::time::Duration;

use super::Jobs;
use crate::store::now_ms;

/// How often ended jobs are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(600);
/// How long an idempotency key names its job.
const KEY_LIFETIME: Duration = Duration::from_secs(24 * 3600);

fn ms_before(d: Duration) -> u64 {
    now_ms().saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Jobs {
    /// Sweeps every `SWEEP_EVERY` (after the one at start), until shutdown.
    pub(super) async fn sweep_loop(&self) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SWEEP_EVERY) => {}
                _ = self.inner.shutdown.cancelled() => return,
            }
            self.sweep().await;
        }
    }

    /// Removes what the retention no longer keeps.
    pub async fn sweep(&self) {
        let keep = self.inner.keep;
        let store = self.inner.invoker.activator().store();
        let swept = store
            .sweep_jobs(
                ms_before(keep.bodies),
                ms_before(keep.records),
                ms_before(KEY_LIFETIME),
            )
            .await;
        match swept {
            Ok(s) if s.bodies + s.records + s.keys > 0 => {
                tracing::info!(
                    bodies = s.bodies,
                    records = s.records,
                    keys = s.keys,
                    "ended jobs swept"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not sweep ended jobs; trying again later"),
        }
    }
}
