//! One job's attempts: the request to the function, its answer kept, retries.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;

use super::{JobRecord, JobState, Jobs, Priority, MAX_BODY, TTL};
use crate::activator::{AcquireError, Function};
use crate::history::format_id;
use crate::invoke::trace::{JobCall, Ran};
use crate::invoke::{Call, InvokeError};
use crate::proxy::ProxyError;
use crate::store::{now_ms, StoreError};

/// The first retry's delay; each next one doubles, up to `BACKOFF_MAX`.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How long a job that found no room waits before asking again (not an attempt).
const NO_ROOM_WAIT: Duration = Duration::from_secs(1);

/// What an attempt came to.
pub(super) enum Outcome {
    /// Over: the job's final state, the function's answer (status, headers, body) if it
    /// gave one, and why it failed.
    Final(JobState, Option<Answer>, Option<String>),
    /// Worth another attempt after the delay (the function's `Retry-After`, if any).
    Retry(String, Option<Duration>, Option<Answer>),
    /// No room now: try again without counting an attempt.
    NoRoom,
    /// Its batch was refused: run it again alone, without counting the attempt, to find
    /// which input the function refuses.
    Split(String),
}

/// The function's answer to a job's request.
pub(super) struct Answer {
    pub(super) status: u16,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Vec<u8>,
    pub(super) ran: Option<Ran>,
    pub(super) retry_after: Option<Duration>,
}

/// The delay before attempt `attempt + 1`: exponential, with jitter in its upper half.
fn backoff(attempt: u32) -> Duration {
    let base = BACKOFF_BASE
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(BACKOFF_MAX);
    let half = base / 2;
    let jitter = crate::history::now_us() % (half.as_micros() as u64 + 1);
    half + Duration::from_micros(jitter)
}

/// What [`Jobs::begin`] made of a job's turn.
pub(super) enum Begun {
    /// Marked running, its attempt counted: send it.
    Go(Box<Go>),
    /// Nothing to send: it ended (`None`) or waits to be queued again after the delay.
    Settled(Option<Duration>),
}

/// A job ready to send.
pub(super) struct Go {
    pub(super) id: u64,
    pub(super) f: Arc<Function>,
    pub(super) job: JobRecord,
    pub(super) input: Vec<u8>,
    pub(super) cancel: CancellationToken,
}

impl Jobs {
    /// Runs job `id`'s next attempt alone and records what came of it.
    pub(super) async fn run(&self, function: &str, id: u64) {
        let delay = match self.begin(id, false).await {
            Ok(Begun::Go(go)) => {
                let outcome = tokio::select! {
                    outcome = self.send(&go.f, &go.job, go.input) => outcome,
                    _ = go.cancel.cancelled() => Outcome::Final(JobState::Cancelled, None, None),
                };
                self.settle(go.id, go.job, outcome, &go.cancel).await
            }
            Ok(Begun::Settled(delay)) => Ok(delay),
            Err(e) => Err(e),
        };
        self.finish(function, &[(id, delay)], true);
    }

    /// Lets go of jobs whose attempt is over (see [`Jobs::turn_over`]; `ends_turn` ends
    /// their turn too), then queues again, after its delay, each that waits for another.
    pub(super) fn finish(
        &self,
        function: &str,
        jobs: &[(u64, Result<Option<Duration>, crate::store::StoreError>)],
        ends_turn: bool,
    ) {
        let ended: Vec<(u64, bool)> = jobs
            .iter()
            .map(|(id, delay)| match delay {
                Ok(delay) => (*id, delay.is_some()),
                Err(e) => {
                    tracing::error!(job = %format_id(*id), error = %e, "could not record the job's state; it resumes at the next start");
                    (*id, false)
                }
            })
            .collect();
        self.turn_over(function, &ended, ends_turn);
        for (id, delay) in jobs {
            if let Ok(Some(delay)) = delay {
                self.later(function, *id, *delay);
            }
        }
    }

    /// Reads job `id` and readies its next attempt: marks it running (its attempt
    /// counted), or settles what became of it instead (over, expired, waiting for room).
    /// `batched`: it goes in a batch, so its input must be JSON.
    pub(super) async fn begin(&self, id: u64, batched: bool) -> Result<Begun, StoreError> {
        let store = self.inner.invoker.activator().store().clone();
        let mut job = match store.job(id)? {
            Some(job) if job.state == JobState::Queued => job,
            _ => {
                // Cancelled, purged or swept meanwhile: its turn is over.
                tracing::debug!(job = %format_id(id), "not queued any more");
                return Ok(Begun::Settled(None));
            }
        };
        let Some(f) = self.inner.invoker.activator().function(&job.function) else {
            let why = format!("function `{}` was removed", job.function);
            return self.end(id, job, JobState::Failed, why).await;
        };
        let cancel = self.running_signal(&job.function, id).unwrap_or_default();
        if job.attempt == 0 && now_ms() > job.submitted_ms.saturating_add(TTL.as_millis() as u64) {
            let why = format!(
                "not started within its time to live ({})",
                humantime::format_duration(TTL)
            );
            return self.end(id, job, JobState::Expired, why).await;
        }
        if job.priority == Priority::Low && !f.has_warm_slot() {
            // Idle capacity only: ask again in a while, without an attempt.
            return Ok(Begun::Settled(Some(NO_ROOM_WAIT)));
        }
        let input = match store.job_input(id)? {
            Some(input) if self.bodies_kept(&job) => Some(input),
            _ => None,
        };
        let Some(input) = input else {
            let why = "its input is gone (past --job-results-keep)".to_string();
            return self.end(id, job, JobState::Failed, why).await;
        };
        if cancel.is_cancelled() {
            return Ok(Begun::Settled(None));
        }
        if batched && serde_json::from_slice::<serde::de::IgnoredAny>(&input).is_err() {
            // Submitted before the function batched: it cannot join a JSON array.
            let why = format!(
                "its input is not JSON, and function `{}` takes jobs in batches ([jobs] batch) as JSON arrays: submit it again as JSON",
                job.function
            );
            return self.end(id, job, JobState::Failed, why).await;
        }
        job.state = JobState::Running;
        job.attempt += 1;
        job.started_ms = Some(now_ms());
        self.save(id, &job, None).await?;
        Ok(Begun::Go(Box::new(Go {
            id,
            f,
            job,
            input,
            cancel,
        })))
    }

    /// Ends job `id` unstarted in `state`, with why.
    async fn end(
        &self,
        id: u64,
        mut job: JobRecord,
        state: JobState,
        why: String,
    ) -> Result<Begun, StoreError> {
        job.state = state;
        job.finished_ms = Some(now_ms());
        job.error = Some(why);
        self.save(id, &job, None).await?;
        Ok(Begun::Settled(None))
    }

    /// Records what an attempt came to; `Some(delay)` when the job is to be queued again
    /// after `delay` (a retry's back-off, or a wait for room).
    pub(super) async fn settle(
        &self,
        id: u64,
        mut job: JobRecord,
        outcome: Outcome,
        cancel: &CancellationToken,
    ) -> Result<Option<Duration>, StoreError> {
        // A cancel that came as the attempt ended still wins over a retry.
        let outcome = if cancel.is_cancelled() {
            Outcome::Final(
                JobState::Cancelled,
                None,
                Some("cancelled while it ran".into()),
            )
        } else {
            outcome
        };
        let (answer, delay) = match outcome {
            Outcome::NoRoom => {
                job.state = JobState::Queued;
                job.attempt -= 1;
                self.save(id, &job, None).await?;
                return Ok(Some(NO_ROOM_WAIT));
            }
            Outcome::Split(why) => {
                job.state = JobState::Queued;
                job.attempt -= 1;
                job.error = Some(why);
                self.save(id, &job, None).await?;
                self.send_alone(&job.function, id);
                return Ok(Some(Duration::ZERO));
            }
            Outcome::Retry(why, after, answer) if job.attempt < job.max_attempts => {
                let delay = after
                    .unwrap_or_else(|| backoff(job.attempt))
                    .min(BACKOFF_MAX);
                job.state = JobState::Queued;
                job.error = Some(why);
                job.not_before_ms = now_ms() + delay.as_millis() as u64;
                (answer, Some(delay))
            }
            Outcome::Retry(why, _, answer) => {
                job.state = JobState::Failed;
                job.error = Some(format!(
                    "{why} (attempt {} of {})",
                    job.attempt, job.max_attempts
                ));
                (answer, None)
            }
            Outcome::Final(state, answer, why) => {
                job.state = state;
                job.error = why;
                (answer, None)
            }
        };
        let mut body = None;
        if let Some(a) = answer {
            if let Some(ran) = a.ran {
                job.instance = Some(ran.instance);
                job.node = Some(ran.node);
                job.gpus = ran.gpus;
            }
            job.status = Some(a.status);
            job.headers = a.headers;
            job.result_bytes = Some(a.body.len() as u64);
            body = Some(a.body);
        }
        if job.state.is_terminal() {
            job.finished_ms = Some(now_ms());
        }
        self.save(id, &job, body).await?;
        if let Some(delay) = delay {
            tracing::info!(
                job = %format_id(id),
                attempt = job.attempt,
                delay_ms = delay.as_millis() as u64,
                error = job.error.as_deref().unwrap_or(""),
                "job attempt failed; retrying"
            );
        }
        Ok(delay)
    }

    /// Queues job `id` again after `delay` (or at once when the gateway stops: it is in
    /// the store, queued, and resumes at the next start).
    fn later(&self, function: &str, id: u64, delay: Duration) {
        if delay.is_zero() {
            return self.requeue(function, id);
        }
        let (this, function) = (self.clone(), function.to_string());
        let shutdown = self.inner.shutdown.clone();
        self.inner.tracker.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => this.requeue(&function, id),
                _ = shutdown.cancelled() => {}
            }
        });
    }

    /// Sends one job's input to the function and reads its answer.
    async fn send(&self, f: &Arc<Function>, job: &JobRecord, input: Vec<u8>) -> Outcome {
        let mut request = Request::post(job.path.as_str());
        if let Some(ct) = &job.content_type {
            request = request.header(header::CONTENT_TYPE, ct.as_str());
        }
        let request = request
            .header("ember-job-id", job.id.as_str())
            .header("ember-attempt", HeaderValue::from(job.attempt));
        match self
            .exchange(f, request, input, job.priority, MAX_BODY)
            .await
        {
            Ok(answer) => answer.outcome(),
            Err(outcome) => outcome,
        }
    }

    /// Sends a job's (or a batch's) request through the invoke core and reads the answer
    /// whole, up to `limit` bytes.
    pub(super) async fn exchange(
        &self,
        f: &Arc<Function>,
        request: http::request::Builder,
        input: Vec<u8>,
        priority: Priority,
        limit: usize,
    ) -> Result<Answer, Outcome> {
        let request = request
            .header(header::CONTENT_LENGTH, input.len())
            .extension(JobCall)
            .body(Body::from(input))
            .map_err(|e| {
                let why = format!("cannot make the request: {e}");
                Outcome::Final(JobState::Failed, None, Some(why))
            })?;
        let call = Call {
            request,
            client: None,
            route: None,
            any_instance: false,
            warm_only: priority == Priority::Low,
        };
        let (head, body) = self
            .inner
            .invoker
            .call(f, call)
            .await
            .map_err(failure)?
            .into_parts();
        let ran = head.extensions.get::<Ran>().cloned();
        let body = match http_body_util::Limited::new(body, limit).collect().await {
            Ok(b) => b.to_bytes().to_vec(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                let why = format!(
                    "result_too_large: the function's answer is over {} MiB",
                    limit >> 20
                );
                return Err(Outcome::Final(JobState::Failed, None, Some(why)));
            }
            Err(e) => {
                return Err(Outcome::Retry(
                    format!("the answer broke off: {e}"),
                    None,
                    None,
                ))
            }
        };
        let headers = head
            .headers
            .iter()
            .filter(|(k, _)| !k.as_str().starts_with("ember-"))
            .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
            .collect();
        let retry_after = head
            .headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs);
        Ok(Answer {
            status: head.status.as_u16(),
            headers,
            body,
            ran,
            retry_after,
        })
    }
}

impl Answer {
    /// What a job's attempt that got this answer came to.
    pub(super) fn outcome(self) -> Outcome {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_GATEWAY);
        if status.is_success() || status.is_redirection() {
            Outcome::Final(JobState::Succeeded, Some(self), None)
        } else if retryable(status) {
            let after = self.retry_after;
            Outcome::Retry(format!("the function answered {status}"), after, Some(self))
        } else {
            let why = format!("the function answered {status}");
            Outcome::Final(JobState::Failed, Some(self), Some(why))
        }
    }
}

pub(super) fn retryable(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

/// What a failure of the invoke core means for a job.
pub(super) fn failure(e: InvokeError) -> Outcome {
    let why = e.to_string();
    match &e {
        InvokeError::Acquire(a) => match a {
            AcquireError::QueueFull { .. }
            | AcquireError::QueueTimeout { .. }
            | AcquireError::GatewayFull { .. }
            | AcquireError::NoCapacity { .. }
            | AcquireError::ShuttingDown => Outcome::NoRoom,
            AcquireError::StartFailed { retry_after, .. } => {
                Outcome::Retry(why, Some(*retry_after), None)
            }
            AcquireError::Removed(_) => Outcome::Final(JobState::Failed, None, Some(why)),
        },
        InvokeError::Proxy(ProxyError::BodyTooLarge { .. }) => {
            Outcome::Final(JobState::Failed, None, Some(why))
        }
        InvokeError::Proxy(_) => Outcome::Retry(why, None, None),
    }
}
