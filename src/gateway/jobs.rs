//! Durable jobs over HTTP: `POST /api/v1/functions/NAME/jobs` (202 once stored),
//! `GET /api/v1/jobs/ID` (the record), `GET /api/v1/jobs/ID/result` (the function's answer,
//! 409 until the job ends).

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::auth::{admit, admit_admin, Admitted};
use super::error::ApiError;
use super::AppState;
use crate::jobs::{JobFilter, JobRecord, JobState, Priority, QueueCounts, Submission, MAX_BODY};
use crate::proxy::ProxyError;

/// `POST /api/v1/functions/NAME/jobs`'s query.
#[derive(utoipa::IntoParams, Debug, Default, Deserialize)]
#[into_params(parameter_in = Query)]
pub struct SubmitParams {
    /// The path (and query) the function is sent; `/` by default.
    pub path: Option<String>,
}

/// Stores a job; answers 202 with its record and `Location` once it is on disk.
#[utoipa::path(
    post, operation_id = "submit_job", path = "/api/v1/functions/{name}/jobs", tag = "jobs", security((), ("bearer" = []), ("ember_key" = [])),
    params(
        ("name" = String, Path, description = "The function's name"),
        SubmitParams,
        ("idempotency-key" = Option<String>, Header, description = "The same key and input again return the same job"),
        ("x-ember-priority" = Option<String>, Header, description = "`normal` (default) or `low`: only idle capacity"),
        ("x-callback-url" = Option<String>, Header, description = "Where the job's end is POSTed, signed (Standard Webhooks)"),
    ),
    request_body(content = [u8], content_type = "application/octet-stream", description = "The input (at most 10 MiB), sent to the function with its content type"),
    responses((status = 202, description = "Stored on disk; `Location` names it", body = JobRecord, headers(("location" = String, description = "/api/v1/jobs/ID"))))
)]
pub async fn submit(
    State(state): State<AppState>,
    Admitted(f): Admitted,
    Query(p): Query<SubmitParams>,
    req: Request,
) -> Result<Response, ApiError> {
    submit_request(&state, &f, p.path.unwrap_or_else(|| "/".into()), req).await
}

/// Whether a request to `/fn/` asks to be a job (`Prefer: respond-async`, RFC 7240).
pub fn prefers_async(headers: &header::HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
}

/// Stores `req` as a job of `f` sent to `path`; answers 202 with its record and
/// `Location` once it is on disk.
pub async fn submit_request(
    state: &AppState,
    f: &std::sync::Arc<crate::activator::Function>,
    path: String,
    req: Request,
) -> Result<Response, ApiError> {
    let async_preferred = prefers_async(req.headers());
    let (content_type, key, priority, callback_url) = {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        (
            header(header::CONTENT_TYPE.as_str()),
            header("idempotency-key"),
            header("x-ember-priority"),
            header("x-callback-url"),
        )
    };
    let priority = match priority.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("normal") | Some("high") => Priority::Normal,
        Some("low") => Priority::Low,
        Some(other) => {
            return Err(crate::history::query::BadParam {
                field: "X-Ember-Priority",
                message: format!("`{other}` is not a priority: `low` or `normal`"),
            }
            .into())
        }
    };
    let body = axum::body::to_bytes(req.into_body(), MAX_BODY)
        .await
        .map_err(|_| {
            ApiError::Proxy(ProxyError::BodyTooLarge {
                limit: MAX_BODY as u64,
            })
        })?;
    let submission = Submission {
        path,
        content_type,
        body,
        key,
        priority,
        callback_url,
    };
    let job = state.jobs.submit(f, submission).await?;
    let location = format!("/api/v1/jobs/{}", job.id);
    let mut response = (StatusCode::ACCEPTED, Json(job)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    if async_preferred {
        response.headers_mut().insert(
            "preference-applied",
            HeaderValue::from_static("respond-async"),
        );
    }
    Ok(response)
}

/// Job `id`, if the request may see it: its function's access rule (the admin's alone
/// when the function is gone).
fn find(state: &AppState, id: &str, req: Request) -> Result<JobRecord, ApiError> {
    let (mut parts, _) = req.into_parts();
    let job = state.jobs.get(id)?;
    let Some(job) = job else {
        // Unknown ids are the admin's to hear about, like everything else.
        admit_admin(state, &parts)?;
        return Err(ApiError::JobNotFound(id.to_string()));
    };
    // `admit` takes Ember's credential out of the headers; the admin check needs it.
    let presented = parts.headers.clone();
    let admitted = match state.activator().function(&job.function) {
        Some(f) => admit(state, &mut parts, &f).is_ok(),
        None => false,
    };
    if !admitted {
        parts.headers = presented;
        // Refused as an unknown id is: a caller learns nothing of other functions' jobs.
        admit_admin(state, &parts)?;
    }
    Ok(job)
}

/// `GET /api/v1/jobs/ID`.
#[utoipa::path(
    get, operation_id = "get_job", path = "/api/v1/jobs/{id}", tag = "jobs", security((), ("bearer" = []), ("ember_key" = [])), params(("id" = String, Path, description = "The job's id (32 hex digits)")),
    responses((status = 200, description = "The job", body = JobRecord))
)]
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Json<JobRecord>, ApiError> {
    Ok(Json(find(&state, &id, req)?))
}

/// `GET /api/v1/jobs/ID/result`: the function's status, headers and body.
#[utoipa::path(
    get, operation_id = "job_result", path = "/api/v1/jobs/{id}/result", tags = ["jobs", "proxied"], security((), ("bearer" = []), ("ember_key" = [])), params(("id" = String, Path, description = "The job's id (32 hex digits)")),
    responses((status = 200, description = "The function's answer: its status, headers and body"))
)]
pub async fn result(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let job = find(&state, &id, req)?;
    let (Some(status), true) = (job.status, job.state.is_terminal()) else {
        let state_name = job.state.as_str().to_string();
        let state_name = match job.state {
            JobState::Failed | JobState::Cancelled => format!("{state_name} without an answer"),
            _ => state_name,
        };
        return Err(ApiError::JobNotFinished {
            id,
            state: state_name,
        });
    };
    let Some(body) = state.jobs.result(&job)? else {
        return Err(ApiError::JobResultGone(id));
    };
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    for (k, v) in &job.headers {
        if let (Ok(k), Ok(v)) = (
            header::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            if k != header::CONTENT_LENGTH && k != header::TRANSFER_ENCODING {
                response.headers_mut().append(k, v);
            }
        }
    }
    if let Ok(v) = HeaderValue::from_str(&job.id) {
        response.headers_mut().insert("ember-job-id", v);
    }
    Ok(response)
}

/// `POST /api/v1/jobs/ID/cancel`.
#[utoipa::path(
    post, operation_id = "cancel_job", path = "/api/v1/jobs/{id}/cancel", tag = "jobs", security((), ("bearer" = []), ("ember_key" = [])), params(("id" = String, Path, description = "The job's id (32 hex digits)")),
    responses((status = 200, description = "The job, cancelled (or as it ended)", body = JobRecord))
)]
pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Json<JobRecord>, ApiError> {
    find(&state, &id, req)?;
    Ok(Json(state.jobs.cancel(&id).await?))
}

/// `POST /api/v1/jobs/ID/retry`.
#[utoipa::path(
    post, operation_id = "retry_job", path = "/api/v1/jobs/{id}/retry", tag = "jobs", params(("id" = String, Path, description = "The job's id (32 hex digits)")),
    responses((status = 202, description = "Queued again from attempt 1", body = JobRecord))
)]
pub async fn retry(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<JobRecord>), ApiError> {
    Ok((StatusCode::ACCEPTED, Json(state.jobs.retry(&id).await?)))
}

/// `GET /api/v1/jobs`'s query, as written.
#[derive(utoipa::IntoParams, Debug, Default, Deserialize)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    function: Option<String>,
    state: Option<String>,
    node: Option<String>,
    gpu: Option<String>,
    since: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

/// `GET /api/v1/jobs?function=&state=&node=&gpu=&since=&limit=&cursor=`: newest first.
#[utoipa::path(
    get, operation_id = "list_jobs", path = "/api/v1/jobs", tag = "jobs", params(ListParams),
    responses((status = 200, description = "Jobs, newest first", body = JobList))
)]
pub async fn list(
    State(state): State<AppState>,
    Query(p): Query<ListParams>,
) -> Result<Json<JobList>, ApiError> {
    let bad =
        |field: &'static str, message: String| crate::history::query::BadParam { field, message };
    let since_ms = p
        .since
        .as_deref()
        .map(|s| crate::history::query::parse_time("since", s).map(|us| us / 1000))
        .transpose()?;
    let job_state = match p.state.as_deref() {
        None => None,
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            bad(
                "state",
                format!("`{s}` is not a state: queued, running, succeeded, failed, cancelled or expired"),
            )
        })?),
    };
    let limit = crate::history::query::parse_limit(p.limit.as_deref())?;
    let filter = JobFilter {
        function: p.function,
        state: job_state,
        node: p.node,
        gpu: p.gpu,
        since_ms,
        cursor: p.cursor,
        limit,
    };
    let (jobs, next) = state.jobs.list(filter).await?;
    Ok(Json(JobList {
        jobs,
        next_cursor: next,
    }))
}

/// A page of jobs.
#[derive(utoipa::ToSchema, serde::Serialize)]
pub struct JobList {
    /// Newest first.
    jobs: Vec<JobRecord>,
    /// The `cursor` of the next page; null on the last.
    next_cursor: Option<String>,
}

/// What a purge did.
#[derive(utoipa::ToSchema, serde::Serialize)]
pub struct Purged {
    /// Queued jobs cancelled.
    purged: usize,
}

/// `GET /api/v1/functions/NAME/queue`: the function's jobs by state.
#[utoipa::path(
    get, operation_id = "job_queue", path = "/api/v1/functions/{name}/queue", tag = "jobs", params(("name" = String, Path, description = "The function's name")),
    responses((status = 200, description = "The function's jobs by state", body = QueueCounts))
)]
pub async fn queue(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<QueueCounts>, ApiError> {
    state
        .activator()
        .function(&name)
        .ok_or_else(|| ApiError::FunctionNotFound(name.clone()))?;
    Ok(Json(state.jobs.counts(&name).await?))
}

/// `POST /api/v1/functions/NAME/queue/purge`: cancels its queued jobs.
#[utoipa::path(
    post, operation_id = "purge_queue", path = "/api/v1/functions/{name}/queue/purge", tag = "jobs", params(("name" = String, Path, description = "The function's name")),
    responses((status = 200, description = "Its queued jobs, cancelled", body = Purged))
)]
pub async fn purge(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Purged>, ApiError> {
    state
        .activator()
        .function(&name)
        .ok_or_else(|| ApiError::FunctionNotFound(name.clone()))?;
    let purged = state.jobs.purge(&name).await?;
    Ok(Json(Purged { purged }))
}

/// `GET /api/v1/jobs/ID/events`: a server-sent event (`event: job`, the record as `data`)
/// at once and on every change of state or attempt; the stream ends with the job.
#[utoipa::path(
    get, operation_id = "job_events", path = "/api/v1/jobs/{id}/events", tag = "jobs", security((), ("bearer" = []), ("ember_key" = [])), params(("id" = String, Path, description = "The job's id (32 hex digits)")),
    responses((status = 200, description = "Server-sent events (`event: job`, the record as `data`), ending with the job", content_type = "text/event-stream"))
)]
pub async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    // Subscribed before the first read, so no change between the two is missed.
    let changes = state.jobs.changes();
    let first = find(&state, &id, req)?;
    let id = first.id.clone();
    let shutdown = state.shutdown.clone();
    let jobs = state.jobs.clone();
    let stream = futures_util::stream::unfold(
        (changes, Some(first), None::<(JobState, u32)>),
        move |(mut changes, mut next, mut last)| {
            let (id, shutdown, jobs) = (id.clone(), shutdown.clone(), jobs.clone());
            async move {
                loop {
                    let job = match next.take() {
                        Some(job) => job,
                        None if last.is_some_and(|(s, _)| s.is_terminal()) => return None,
                        None => tokio::select! {
                            _ = shutdown.cancelled() => return None,
                            change = changes.recv() => match change {
                                Ok(job) if job.id == id => (*job).clone(),
                                Ok(_) => continue,
                                // Fell behind: the record as it is now.
                                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                                    jobs.get(&id).ok().flatten()?
                                }
                                Err(_) => return None,
                            },
                        },
                    };
                    let now = (job.state, job.attempt);
                    if last == Some(now) {
                        continue;
                    }
                    last = Some(now);
                    let data = serde_json::to_string(&job).unwrap_or_default();
                    let event = bytes::Bytes::from(format!("event: job\ndata: {data}\n\n"));
                    return Some((
                        Ok::<_, std::convert::Infallible>(event),
                        (changes, None, last),
                    ));
                }
            }
        },
    );
    Ok(super::event_stream(Body::from_stream(stream)))
}
