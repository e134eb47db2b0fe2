//! Durable jobs: an invocation submitted now and run when an instance is free, never lost.
//!
//! A submission is stored (record and input) and on disk before it is acknowledged; the
//! store's writer flushes once per batch, so a burst of submissions shares one flush. Each
//! function's jobs wait in submission order in memory (rebuilt from the store at start)
//! and run through the invoke core like any request, so they take the activator's
//! permits (cold starts, `scale.max`, `concurrency`) and leave history records (`kind:
//! job`). A function has `jobs.concurrency` (by default `scale.concurrency`) jobs in
//! flight per instance it runs, plus one instance's worth (what makes a backlog start one
//! more instance at a time, up to `scale.max`); the rest wait here, not in the activator's
//! bounded queue, and a `jobs.concurrency` below `scale.concurrency` keeps slots for
//! requests.
//!
//! An attempt that gets a retryable answer (408, 429, 5xx, a timeout, a broken
//! connection, a failed start) runs again after an exponential back-off with jitter
//! (1 s doubling to 60 s, `Retry-After` honoured) until `max_attempts`; other answers are
//! final. Waiting for room (a full queue, no capacity) is not an attempt. A low-priority
//! job (`X-Ember-Priority: low`) runs only on a ready instance's free slot: it waits,
//! never starting, resuming or adding an instance, and fills idle capacity. A job that was
//! running when the gateway died runs again after the restart (at least once): the
//! function sees `Ember-Job-Id` and `Ember-Attempt` to tell.

pub mod callback;
mod manage;
mod sweep;

pub use manage::{ChangeError, JobFilter, QueueCounts};
mod batch;
mod queue;
mod run;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::activator::Function;
use crate::history::{format_id, mint};
use crate::invoke::Invoker;
use crate::store::{now_ms, StoreError};
pub use crate::store::{JobRecord, JobState, Priority};

/// Largest input a job takes, and largest answer it keeps.
pub const MAX_BODY: usize = 10 << 20;
/// Attempts a job may take when its function's `[jobs]` says nothing.
pub const MAX_ATTEMPTS: u32 = crate::manifest::DEFAULT_MAX_ATTEMPTS;
/// How long a job may wait to start; after that it expires unstarted.
pub const TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Why a submission was refused.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The store could not keep it: it was not accepted.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The path is not one a function can be sent.
    #[error("`{0}` is not a path: give one starting with `/`, e.g. `?path=/render`")]
    BadPath(String),
    /// A callback was asked for that cannot be sent.
    #[error("X-Callback-Url: {0}")]
    Callback(String),
    /// The function batches its jobs, and the input is not JSON.
    #[error("function `{function}` takes jobs in batches ([jobs] batch), as JSON arrays of their inputs, so an input must be JSON: {why}")]
    NotJson {
        /// The function.
        function: String,
        /// What the JSON parser said.
        why: String,
    },
    /// An idempotency key came back with another input.
    #[error("Idempotency-Key `{key}` was used for job {job} with another input; use a new key for a new job")]
    KeyReused {
        /// The key.
        key: String,
        /// The job it made.
        job: String,
    },
}

/// What a submission asks for.
#[derive(Debug, Clone)]
pub struct Submission {
    /// The path (and query) the function is sent.
    pub path: String,
    /// The input's content type.
    pub content_type: Option<String>,
    /// The input.
    pub body: Bytes,
    /// The client's `Idempotency-Key`: the same key and input again get the same job.
    pub key: Option<String>,
    /// How it takes capacity (`X-Ember-Priority`).
    pub priority: Priority,
    /// Where its end is POSTed (`X-Callback-Url`).
    pub callback_url: Option<String>,
}

/// The SHA-256 of a submission (path, content type, priority and body), hex: what an
/// idempotency key is checked against.
fn input_hash(s: &Submission) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(s.path.as_bytes());
    h.update([0]);
    h.update(s.content_type.as_deref().unwrap_or("").as_bytes());
    h.update([0, s.priority as u8, 0]);
    h.update(&s.body);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A new job's id: its store key (time-ordered, 16 hex digits) and 64 random bits (16
/// more): a job's id is what reads its result, so it must not be guessable from another's.
fn job_id(key: u64) -> String {
    let mut random = [0u8; 8];
    // The operating system's generator; without it no id can be made safely.
    getrandom::fill(&mut random).expect("the OS random number generator works");
    format!("{}{:016x}", format_id(key), u64::from_be_bytes(random))
}

/// How long ended jobs are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    /// Their input and answer (`serve --job-results-keep`); then the result is 410.
    pub bodies: std::time::Duration,
    /// Their records (`serve --history-max-age`).
    pub records: std::time::Duration,
}

impl Default for Keep {
    fn default() -> Self {
        Keep {
            bodies: std::time::Duration::from_secs(24 * 3600),
            records: std::time::Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// The job queues. Cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

struct Inner {
    invoker: Invoker,
    keep: Keep,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    queues: Mutex<HashMap<String, queue::Queue>>,
    /// Submissions with an idempotency key, one at a time (check, then store).
    keyed: tokio::sync::Mutex<()>,
    /// Every stored change of a job, for its event streams.
    changes: tokio::sync::broadcast::Sender<Arc<JobRecord>>,
    /// Wakes the callback worker when a job with a callback ends.
    outbox: tokio::sync::Notify,
    /// Hosts callbacks may reach though they are private (`serve --callback-allow`).
    callback_allow: Vec<String>,
}

impl Jobs {
    /// The job queues over `invoker`; nothing runs until [`Jobs::start`].
    pub fn new(
        invoker: Invoker,
        keep: Keep,
        callback_allow: Vec<String>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Jobs {
        Jobs {
            inner: Arc::new(Inner {
                invoker,
                keep,
                tracker,
                shutdown,
                queues: Mutex::default(),
                keyed: tokio::sync::Mutex::new(()),
                changes: tokio::sync::broadcast::channel(1024).0,
                outbox: tokio::sync::Notify::new(),
                callback_allow,
            }),
        }
    }

    /// Resumes the jobs the store holds unfinished: queued ones wait again; one that was
    /// running lost its attempt with the gateway and runs again (or fails, its attempts
    /// spent).
    pub async fn start(&self) -> Result<(), StoreError> {
        let store = self.inner.invoker.activator().store().clone();
        let unfinished = store.unfinished_jobs().await?;
        let resumed = unfinished.len();
        for (id, mut job) in unfinished {
            if job.state == JobState::Running {
                if job.attempt >= job.max_attempts {
                    job.state = JobState::Failed;
                    job.finished_ms = Some(now_ms());
                    job.error = Some(format!(
                        "the gateway stopped during attempt {} of {}",
                        job.attempt, job.max_attempts
                    ));
                    self.save(id, &job, None).await?;
                    continue;
                }
                job.state = JobState::Queued;
                self.save(id, &job, None).await?;
            }
            self.enqueue(&job, id);
        }
        if resumed > 0 {
            tracing::info!(jobs = resumed, "resumed unfinished jobs");
        }
        // What the retention no longer keeps goes before the gateway answers.
        self.sweep().await;
        let this = self.clone();
        self.inner.tracker.spawn(tracing::Instrument::instrument(
            async move { this.sweep_loop().await },
            tracing::info_span!("job retention"),
        ));
        let this = self.clone();
        self.inner.tracker.spawn(tracing::Instrument::instrument(
            async move { this.deliver_loop().await },
            tracing::info_span!("job callbacks"),
        ));
        Ok(())
    }

    /// Stores a job for `f`; once it is on disk, queues it and returns its record.
    pub async fn submit(&self, f: &Arc<Function>, s: Submission) -> Result<JobRecord, JobError> {
        if !s.path.starts_with('/') || s.path.parse::<http::Uri>().is_err() {
            return Err(JobError::BadPath(s.path));
        }
        let revision = f.revision();
        let settings = revision.manifest.jobs.as_ref();
        if settings.is_some_and(|j| j.batch.is_some()) {
            if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&s.body) {
                return Err(JobError::NotJson {
                    function: f.name().to_string(),
                    why: e.to_string(),
                });
            }
        }
        if let Some(url) = &s.callback_url {
            callback::check_url(url).map_err(JobError::Callback)?;
            if settings.and_then(|j| j.callback_secret.as_ref()).is_none() {
                return Err(JobError::Callback(format!(
                    "function `{}` has no `[jobs] callback_secret` to sign callbacks with: name an `ember secret` there",
                    f.name()
                )));
            }
        }
        let hash = s.key.as_ref().map(|_| input_hash(&s));
        let id = mint();
        let now = now_ms();
        let job = JobRecord {
            id: job_id(id),
            function: f.name().to_string(),
            state: JobState::Queued,
            attempt: 0,
            max_attempts: settings.map_or(MAX_ATTEMPTS, |j| j.max_attempts),
            priority: s.priority,
            path: s.path,
            content_type: s.content_type,
            input_bytes: s.body.len() as u64,
            submitted_ms: now,
            not_before_ms: now,
            started_ms: None,
            finished_ms: None,
            instance: None,
            node: None,
            gpus: Vec::new(),
            status: None,
            headers: Vec::new(),
            error: None,
            result_bytes: None,
            callback_url: s.callback_url.clone(),
        };
        let store = self.inner.invoker.activator().store();
        match &s.key {
            None => store.put_job(id, &job, s.body.to_vec(), None).await?,
            Some(key) => {
                let _one = self.inner.keyed.lock().await;
                let hash = hash.unwrap_or_default();
                if let Some((made, made_hash)) = store.job_by_key(f.name(), key)? {
                    if made_hash != hash {
                        return Err(JobError::KeyReused {
                            key: key.clone(),
                            job: made,
                        });
                    }
                    if let Some(existing) = self.get(&made)? {
                        return Ok(existing);
                    }
                }
                store
                    .put_job(id, &job, s.body.to_vec(), Some((key, &hash)))
                    .await?;
            }
        }
        self.enqueue(&job, id);
        Ok(job)
    }

    /// A job's record.
    pub fn get(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        Ok(self.find(id)?.map(|(_, job)| job))
    }

    /// The answer body of `job` (a record [`Jobs::get`] gave); `None` once its body is
    /// past `--job-results-keep`, whether or not a sweep has removed it yet.
    pub fn result(&self, job: &JobRecord) -> Result<Option<Vec<u8>>, StoreError> {
        match crate::store::job_key(&job.id) {
            Some(key) if self.bodies_kept(job) => {
                self.inner.invoker.activator().store().job_result(key)
            }
            _ => Ok(None),
        }
    }

    /// Whether `job`'s input and answer are still kept: it has not ended, or ended within
    /// `--job-results-keep`. What the sweep will remove, reads treat as gone already.
    pub(super) fn bodies_kept(&self, job: &JobRecord) -> bool {
        let keep = u64::try_from(self.inner.keep.bodies.as_millis()).unwrap_or(u64::MAX);
        job.finished_ms
            .is_none_or(|t| t.saturating_add(keep) >= now_ms())
    }

    /// Job `id`'s store key and record, if `id` is a job's whole id (its random part
    /// compared in constant time, so an id cannot be guessed from a neighbour's).
    fn find(&self, id: &str) -> Result<Option<(u64, JobRecord)>, StoreError> {
        let Some(key) = crate::store::job_key(id) else {
            return Ok(None);
        };
        let job = self.inner.invoker.activator().store().job(key)?;
        Ok(job
            .filter(|j| crate::access::same_secret(id, &j.id))
            .map(|j| (key, j)))
    }

    /// Stores a job's change (with its answer's body, when it has one), then tells those
    /// following it.
    async fn save(
        &self,
        id: u64,
        job: &JobRecord,
        body: Option<Vec<u8>>,
    ) -> Result<(), StoreError> {
        let store = self.inner.invoker.activator().store();
        // A job that ends with a callback leaves its delivery in the same write.
        let callback = job
            .callback_url
            .as_ref()
            .filter(|_| job.state.is_terminal() && job.state != JobState::Cancelled)
            .map(|url| crate::store::OutboxEntry {
                url: url.clone(),
                attempts: 0,
                next_ms: 0,
            });
        // An ending is counted once: not when an ended job is written again.
        let ends = job.state.is_terminal()
            && !store
                .job(id)
                .ok()
                .flatten()
                .is_some_and(|was| was.state.is_terminal());
        store.update_job(id, job, body, callback.as_ref()).await?;
        if ends {
            self.inner
                .invoker
                .activator()
                .metrics()
                .job_finished(&job.function, job.state.as_str());
        }
        if callback.is_some() {
            self.inner.outbox.notify_one();
        }
        let _ = self.inner.changes.send(Arc::new(job.clone()));
        Ok(())
    }

    /// Follows every job's changes from now on (`GET /api/v1/jobs/ID/events`).
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<Arc<JobRecord>> {
        self.inner.changes.subscribe()
    }
}
