//! What operators and clients do to jobs once submitted: cancel, retry, list, count and
//! purge a function's queue.

use serde::{Deserialize, Serialize};

use super::{JobRecord, JobState, Jobs};
use crate::store::job_key;
use crate::store::{now_ms, StoreError};

/// Why a job could not be cancelled or retried.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No such job.
    #[error("no job `{0}`")]
    NotFound(String),
    /// The job is not in a state that allows it.
    #[error("job `{id}` is {state}; {what}")]
    Conflict {
        /// The job.
        id: String,
        /// Where it is.
        state: String,
        /// What would be allowed.
        what: &'static str,
    },
}

/// `GET /api/v1/jobs`' filters, checked.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct JobFilter {
    /// Only this function's.
    pub function: Option<String>,
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// Only those whose last attempt ran on this node.
    pub node: Option<String>,
    /// Only those whose last attempt ran with this GPU (or MIG) uuid.
    pub gpu: Option<String>,
    /// Only those submitted since (unix ms).
    pub since_ms: Option<u64>,
    /// Only those older than this job id (the previous page's `next_cursor`).
    pub cursor: Option<String>,
    /// Records per page.
    pub limit: usize,
}

/// A function's queue, counted.
#[derive(utoipa::ToSchema, Debug, Default, Clone, Serialize, Deserialize)]
pub struct QueueCounts {
    /// Waiting to run (including those waiting for a retry).
    pub queued: u64,
    /// Running now.
    pub running: u64,
    /// Ended well.
    pub succeeded: u64,
    /// Ended failed.
    pub failed: u64,
    /// Cancelled (or purged).
    pub cancelled: u64,
    /// Never started within their time to live.
    pub expired: u64,
}

impl Jobs {
    fn store(&self) -> &crate::store::Store {
        self.inner.invoker.activator().store()
    }

    fn load(&self, id: &str) -> Result<(u64, JobRecord), ChangeError> {
        self.find(id)?
            .ok_or_else(|| ChangeError::NotFound(id.to_string()))
    }

    /// Cancels a job: a queued one at once; a running one's request is dropped and it
    /// ends `cancelled`. An ended job is left as it is.
    pub async fn cancel(&self, id: &str) -> Result<JobRecord, ChangeError> {
        let (key, mut job) = self.load(id)?;
        if job.state.is_terminal() {
            return Ok(job);
        }
        let running = self.running_signal(&job.function, key);
        self.release(&job.function, key);
        match running {
            Some(signal) if job.state == JobState::Running => {
                signal.cancel();
                // Its run records the end; wait for it.
                for _ in 0..100 {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    let (_, now) = self.load(id)?;
                    if now.state.is_terminal() {
                        return Ok(now);
                    }
                }
                self.load(id).map(|(_, j)| j)
            }
            other => {
                if let Some(signal) = other {
                    signal.cancel();
                }
                job.state = JobState::Cancelled;
                job.finished_ms = Some(now_ms());
                job.error = Some("cancelled before it ran".into());
                self.save(key, &job, None).await?;
                Ok(job)
            }
        }
    }

    /// Runs a failed, expired or cancelled job again, from its first attempt.
    pub async fn retry(&self, id: &str) -> Result<JobRecord, ChangeError> {
        let (key, mut job) = self.load(id)?;
        if !matches!(
            job.state,
            JobState::Failed | JobState::Expired | JobState::Cancelled
        ) {
            return Err(ChangeError::Conflict {
                id: id.to_string(),
                state: job.state.as_str().to_string(),
                what: "only a failed, expired or cancelled job can be retried",
            });
        }
        if !self.bodies_kept(&job) || self.store().job_input(key)?.is_none() {
            return Err(ChangeError::Conflict {
                id: id.to_string(),
                state: job.state.as_str().to_string(),
                what: "its input is gone (past --job-results-keep): submit it again",
            });
        }
        job.state = JobState::Queued;
        job.attempt = 0;
        job.submitted_ms = now_ms();
        job.not_before_ms = job.submitted_ms;
        job.started_ms = None;
        job.finished_ms = None;
        job.error = None;
        job.status = None;
        job.headers.clear();
        job.result_bytes = None;
        self.save(key, &job, None).await?;
        // Its last run may still be letting go of it (a cancel's last moments).
        for _ in 0..100 {
            if self.enqueue(&job, key) {
                return Ok(job);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        tracing::warn!(
            job = id,
            "retried job still held by its last run; it runs at the next start"
        );
        Ok(job)
    }

    /// A page of jobs, newest first, and the cursor of the next.
    pub async fn list(&self, f: JobFilter) -> Result<(Vec<JobRecord>, Option<String>), StoreError> {
        let below = f.cursor.as_deref().and_then(job_key).unwrap_or(u64::MAX);
        let limit = f.limit;
        let page = self
            .store()
            .jobs_page(below, limit, move |j| {
                f.function.as_ref().is_none_or(|x| &j.function == x)
                    && f.state.is_none_or(|s| j.state == s)
                    && f.node.as_ref().is_none_or(|n| j.node.as_ref() == Some(n))
                    && f.gpu.as_ref().is_none_or(|g| j.gpus.contains(g))
                    && f.since_ms.is_none_or(|t| j.submitted_ms >= t)
            })
            .await?;
        let next = (page.len() == limit)
            .then(|| page.last().map(|j| j.id.clone()))
            .flatten();
        Ok((page, next))
    }

    /// A function's jobs, counted by state.
    pub async fn counts(&self, function: &str) -> Result<QueueCounts, StoreError> {
        let name = function.to_string();
        self.store()
            .fold_jobs(QueueCounts::default(), move |mut c, j| {
                if j.function == name {
                    *match j.state {
                        JobState::Queued => &mut c.queued,
                        JobState::Running => &mut c.running,
                        JobState::Succeeded => &mut c.succeeded,
                        JobState::Failed => &mut c.failed,
                        JobState::Cancelled => &mut c.cancelled,
                        JobState::Expired => &mut c.expired,
                    } += 1;
                }
                c
            })
            .await
    }

    /// Cancels every queued job of `function` (running ones go on); returns how many.
    pub async fn purge(&self, function: &str) -> Result<usize, StoreError> {
        let waiting = self.waiting(function);
        for id in &waiting {
            self.release(function, *id);
        }
        let name = function.to_string();
        // Those waiting for a retry's back-off are queued in the store only.
        let queued = self
            .store()
            .jobs_page(u64::MAX, usize::MAX, move |j| {
                j.function == name && j.state == JobState::Queued
            })
            .await?;
        let mut purged = 0;
        for mut job in queued {
            let Some(key) = job_key(&job.id) else {
                continue;
            };
            // One taken to run but not yet sent is stopped, as a cancel stops it.
            if let Some(signal) = self.running_signal(function, key) {
                signal.cancel();
            }
            job.state = JobState::Cancelled;
            job.finished_ms = Some(now_ms());
            job.error = Some("purged from the queue".into());
            self.save(key, &job, None).await?;
            purged += 1;
        }
        tracing::info!(function, purged, waiting = waiting.len(), "queue purged");
        Ok(purged)
    }
}
