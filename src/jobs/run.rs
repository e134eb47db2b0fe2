//! One job's attempts: the request to the function, its answer kept, retries.

use std::time::Duration;

use axum::body::Body;
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;

use super::{JobRecord, JobState, Jobs, Priority, MAX_BODY, TTL};
use crate::activator::AcquireError;
use crate::history::format_id;
use crate::invoke::trace::{JobCall, Ran};
use crate::invoke::{Call, InvokeError};
use crate::proxy::ProxyError;
use crate::store::{now_ms, Store};

/// The first retry's delay; each next one doubles, up to `BACKOFF_MAX`.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How long a job that found no room waits before asking again (not an attempt).
const NO_ROOM_WAIT: Duration = Duration::from_secs(1);

/// What an attempt came to.
enum Outcome {
    /// Over: the job's final state, the function's answer (status, headers, body) if it
    /// gave one, and why it failed.
    Final(JobState, Option<Answer>, Option<String>),
    /// Worth another attempt after the delay (the function's `Retry-After`, if any).
    Retry(String, Option<Duration>, Option<Answer>),
    /// No room now: try again without counting an attempt.
    NoRoom,
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    ran: Option<Ran>,
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

impl Jobs {
    /// Runs job `id`'s next attempt and records what came of it.
    pub(super) async fn run(&self, function: &str, id: u64) {
        let store = self.inner.invoker.activator().store().clone();
        let again = match store.job(id) {
            Ok(Some(job)) if job.state == JobState::Queued => {
                match self.attempt(&store, id, job).await {
                    Ok(again) => again,
                    Err(e) => {
                        tracing::error!(error = %e, "could not record the job's state; it resumes at the next start");
                        false
                    }
                }
            }
            Ok(_) => {
                // Cancelled, purged or swept meanwhile: its turn is over.
                tracing::debug!(job = %format_id(id), "not queued any more");
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the job; it stays queued until a restart");
                false
            }
        };
        self.done(function, id, again);
    }

    /// One attempt; `Ok(true)` when the job waits to be queued again (a back-off).
    async fn attempt(
        &self,
        store: &Store,
        id: u64,
        mut job: JobRecord,
    ) -> Result<bool, crate::store::StoreError> {
        let Some(f) = self.inner.invoker.activator().function(&job.function) else {
            job.state = JobState::Failed;
            job.finished_ms = Some(now_ms());
            job.error = Some(format!("function `{}` was removed", job.function));
            return self.save(id, &job, None).await.map(|()| false);
        };
        let cancel = self.cancel_signal(&job.function, id);
        if job.attempt == 0 && now_ms() > job.submitted_ms.saturating_add(TTL.as_millis() as u64) {
            job.state = JobState::Expired;
            job.finished_ms = Some(now_ms());
            job.error = Some(format!(
                "not started within its time to live ({})",
                humantime::format_duration(TTL)
            ));
            return self.save(id, &job, None).await.map(|()| false);
        }
        if job.priority == Priority::Low && !f.has_warm_slot() {
            // Idle capacity only: ask again in a while, without an attempt.
            self.later(&job.function, id, NO_ROOM_WAIT);
            return Ok(true);
        }
        let Some(input) = store.job_input(id)? else {
            job.state = JobState::Failed;
            job.finished_ms = Some(now_ms());
            job.error = Some("its input is gone (past --job-results-keep)".into());
            return self.save(id, &job, None).await.map(|()| false);
        };
        if cancel.is_cancelled() {
            return Ok(false);
        }
        job.state = JobState::Running;
        job.attempt += 1;
        job.started_ms = Some(now_ms());
        self.save(id, &job, None).await?;

        let outcome = tokio::select! {
            outcome = self.send(&f, &job, input) => outcome,
            _ = cancel.cancelled() => Outcome::Final(JobState::Cancelled, None, None),
        };
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
                self.later(&job.function, id, NO_ROOM_WAIT);
                return Ok(true);
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
                attempt = job.attempt,
                delay_ms = delay.as_millis() as u64,
                error = job.error.as_deref().unwrap_or(""),
                "job attempt failed; retrying"
            );
            self.later(&job.function, id, delay);
        }
        Ok(delay.is_some())
    }

    /// Queues job `id` again after `delay` (or at once when the gateway stops: it is in
    /// the store, queued, and resumes at the next start).
    fn later(&self, function: &str, id: u64, delay: Duration) {
        let (this, function) = (self.clone(), function.to_string());
        let shutdown = self.inner.shutdown.clone();
        self.inner.tracker.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => this.requeue(&function, id),
                _ = shutdown.cancelled() => {}
            }
        });
    }

    /// Sends the job's input to the function and reads its answer.
    async fn send(
        &self,
        f: &std::sync::Arc<crate::activator::Function>,
        job: &JobRecord,
        input: Vec<u8>,
    ) -> Outcome {
        let mut request = Request::post(job.path.as_str());
        if let Some(ct) = &job.content_type {
            request = request.header(header::CONTENT_TYPE, ct.as_str());
        }
        let request = request
            .header(header::CONTENT_LENGTH, input.len())
            .header("ember-job-id", job.id.as_str())
            .header("ember-attempt", HeaderValue::from(job.attempt))
            .extension(JobCall)
            .body(Body::from(input));
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                return Outcome::Final(
                    JobState::Failed,
                    None,
                    Some(format!("cannot make the request: {e}")),
                )
            }
        };
        let call = Call {
            request,
            client: None,
            route: None,
            any_instance: false,
            warm_only: job.priority == Priority::Low,
        };
        let response = match self.inner.invoker.call(f, call).await {
            Ok(r) => r,
            Err(e) => return failure(e),
        };
        let (head, body) = response.into_parts();
        let ran = head.extensions.get::<Ran>().cloned();
        let body = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes().to_vec(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                let why = format!(
                    "result_too_large: the function's answer is over {} MiB",
                    MAX_BODY >> 20
                );
                return Outcome::Final(JobState::Failed, None, Some(why));
            }
            Err(e) => return Outcome::Retry(format!("the answer broke off: {e}"), None, None),
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
        let status = head.status;
        let answer = Answer {
            status: status.as_u16(),
            headers,
            body,
            ran,
        };
        if status.is_success() || status.is_redirection() {
            Outcome::Final(JobState::Succeeded, Some(answer), None)
        } else if retryable(status) {
            Outcome::Retry(
                format!("the function answered {status}"),
                retry_after,
                Some(answer),
            )
        } else {
            Outcome::Final(
                JobState::Failed,
                Some(answer),
                Some(format!("the function answered {status}")),
            )
        }
    }
}

fn retryable(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

/// What a failure of the invoke core means for a job.
fn failure(e: InvokeError) -> Outcome {
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
