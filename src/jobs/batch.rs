//! Batch mode (`[jobs] batch`): up to `max` jobs' inputs in one request, as a JSON array,
//! and the function's JSON array of results handed back one per job, in order.
//!
//! The request carries `Content-Type: application/json`, `Ember-Batch: N`, and
//! `Ember-Job-Id` and `Ember-Attempt` as comma-separated lists in the array's order. Each
//! job keeps its own record: its result is its element of the answer (status and headers
//! the answer's), and its attempts count apart. A retryable answer (408, 429, 5xx, a lost
//! connection) retries each job; any other refusal sends each job again alone, without
//! counting the attempt (a batch of one), so one bad input fails only its own job. An
//! answer that is not an array of N fails the batch's jobs: the function broke the
//! contract. Every job goes in an array, even alone, so a function in batch mode reads
//! one shape; inputs must be JSON (submissions are checked).

use http::{header, Request};
use serde_json::value::RawValue;

use super::run::{Answer, Begun, Go, Outcome};
use super::{JobState, Jobs, MAX_BODY};

/// The largest answer a batch may give: its results, one job's limit each, up to this.
const MAX_BATCH_ANSWER: usize = 64 << 20;

impl Jobs {
    /// Runs one attempt of jobs `ids` (of one function, path and priority) in one request.
    pub(super) async fn run_batch(&self, function: &str, ids: Vec<u64>) {
        let begun =
            futures_util::future::join_all(ids.iter().map(|id| self.begin(*id, true))).await;
        let mut ended = Vec::new();
        let mut go = Vec::with_capacity(ids.len());
        for (id, b) in ids.iter().zip(begun) {
            match b {
                Ok(Begun::Go(g)) => go.push(*g),
                Ok(Begun::Settled(delay)) => ended.push((*id, Ok(delay))),
                Err(e) => ended.push((*id, Err(e))),
            }
        }
        if go.is_empty() {
            return self.finish(function, &ended, true);
        }
        // Those not sent are let go now, not when the batch answers: a retry of one of
        // them must find it free to queue.
        self.finish(function, &ended, false);
        let outcomes = self.send_batch(&go).await;
        let settled = futures_util::future::join_all(go.into_iter().zip(outcomes).map(
            |(g, outcome)| async move {
                // A job's last attempt goes alone: an input that breaks the function
                // (a 5xx, a crash) then fails only its own job.
                if matches!(outcome, Outcome::Retry(..)) && g.job.attempt + 1 >= g.job.max_attempts
                {
                    self.send_alone(function, g.id);
                }
                (g.id, self.settle(g.id, g.job, outcome, &g.cancel).await)
            },
        ))
        .await;
        self.finish(function, &settled, true);
    }

    /// Sends the jobs' inputs as one array; what each job's attempt came to, in order.
    async fn send_batch(&self, go: &[Go]) -> Vec<Outcome> {
        let n = go.len();
        let first = &go[0];
        let mut body = Vec::with_capacity(go.iter().map(|g| g.input.len() + 1).sum::<usize>() + 2);
        body.push(b'[');
        for (i, g) in go.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&g.input);
        }
        body.push(b']');
        let list = |f: &dyn Fn(&Go) -> String| go.iter().map(f).collect::<Vec<_>>().join(",");
        let request = Request::post(first.job.path.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .header("ember-batch", n)
            .header("ember-job-id", list(&|g| g.job.id.clone()))
            .header("ember-attempt", list(&|g| g.job.attempt.to_string()));
        let limit = MAX_BODY.saturating_mul(n).min(MAX_BATCH_ANSWER);
        let metrics = self.inner.invoker.activator().metrics();
        metrics.job_batch(&first.job.function, n);
        let all_cancelled = futures_util::future::join_all(go.iter().map(|g| g.cancel.cancelled()));
        let answer = tokio::select! {
            answer = self.exchange(&first.f, request, body, first.job.priority, limit) => answer,
            _ = all_cancelled => Err(Outcome::Final(JobState::Cancelled, None, None)),
        };
        match answer {
            Ok(answer) => split(answer, n),
            // Too big together (the request or the answer): each goes in a batch of its own.
            Err(Outcome::Final(JobState::Failed, _, why)) if n > 1 => {
                let why = format!(
                    "the batch of {n} failed ({}); this job runs again in a batch of its own",
                    why.unwrap_or_default()
                );
                (0..n).map(|_| Outcome::Split(why.clone())).collect()
            }
            Err(outcome) => (0..n).map(|_| each(&outcome)).collect(),
        }
    }
}

/// The batch's answer, as each of its `n` jobs' outcome.
fn split(answer: Answer, n: usize) -> Vec<Outcome> {
    let status = http::StatusCode::from_u16(answer.status).unwrap_or(http::StatusCode::BAD_GATEWAY);
    if n == 1 && !(status.is_success() || status.is_redirection()) {
        // Alone, the answer is the job's own.
        return vec![answer.outcome()];
    }
    if !(status.is_success() || status.is_redirection()) {
        let outcome = if super::run::retryable(status) {
            Outcome::Retry(
                format!("the function answered {status} to a batch of {n}"),
                answer.retry_after,
                None,
            )
        } else {
            Outcome::Split(format!(
                "the function answered {status} to a batch of {n}; this job runs again in a batch of its own"
            ))
        };
        return (0..n).map(|_| each(&outcome)).collect();
    }
    let results = match serde_json::from_slice::<Vec<&RawValue>>(&answer.body) {
        Ok(results) if results.len() == n => results,
        other => {
            let got = match other {
                Ok(results) => format!("an array of {}", results.len()),
                Err(e) => format!("no JSON array ({e})"),
            };
            let why = format!(
                "the function answered a batch of {n} with {got}: in batch mode it must answer a JSON array of {n} results, in the inputs' order"
            );
            return (0..n)
                .map(|_| Outcome::Final(JobState::Failed, None, Some(why.clone())))
                .collect();
        }
    };
    let mut headers = answer.headers;
    headers.retain(|(k, _)| !k.eq_ignore_ascii_case("content-type"));
    headers.push(("content-type".into(), "application/json".into()));
    results
        .into_iter()
        .map(|r| {
            let body = r.get().as_bytes();
            if body.len() > MAX_BODY {
                let why = format!(
                    "result_too_large: its result in the batch's answer is over {} MiB",
                    MAX_BODY >> 20
                );
                return Outcome::Final(JobState::Failed, None, Some(why));
            }
            Outcome::Final(
                JobState::Succeeded,
                Some(Answer {
                    status: answer.status,
                    headers: headers.clone(),
                    body: body.to_vec(),
                    ran: answer.ran.clone(),
                    retry_after: None,
                }),
                None,
            )
        })
        .collect()
}

/// A copy of an outcome without the function's answer (one answer is not every job's).
fn each(o: &Outcome) -> Outcome {
    match o {
        Outcome::Final(state, _, why) => Outcome::Final(*state, None, why.clone()),
        Outcome::Retry(why, after, _) => Outcome::Retry(why.clone(), *after, None),
        Outcome::NoRoom => Outcome::NoRoom,
        Outcome::Split(why) => Outcome::Split(why.clone()),
    }
}
