//! `GET /api/v1/functions/{name}/logs`: a function's output as plain text, every line
//! prefixed by its instance, `[ID] ` for stdout and `[ID stderr] ` for stderr (and
//! `[ID ember] ` for the gateway's own word on an instance, e.g. that its node could not
//! hand over its output), the instances' lines interleaved as they come.
//!
//! Query: `instance=ID` (one instance), `follow=true` (stay open, taking in instances
//! that start later, until the client leaves or the gateway shuts down), `since=10m` or
//! `since=2025-01-02T15:04:05Z` (output from then on), `tail=N|all` (lines per instance;
//! 100 by default), `timestamps=true` (the engine's time before each line),
//! `previous=true` (what removed instances last wrote, each after a header line saying
//! where it ran, when and why it ended and how its container exited).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::AppState;
use crate::activator::{LogEvent, LogQuery};
use crate::model::{ErrorCode, FieldError};
use crate::runtime::{LogLine, LogOptions, OutputStream};
use crate::store::PreviousLogs;

/// Lines per instance when the query says nothing.
pub const DEFAULT_TAIL: usize = 100;
/// Events sent in one chunk at the most, when many are ready at once.
const EVENTS_PER_CHUNK: usize = 256;

/// The query, read.
#[derive(Debug, Default, PartialEq)]
struct Query {
    instance: Option<String>,
    options: LogOptions,
    previous: bool,
}

fn bad(field: &str, message: String) -> ApiError {
    ApiError::BadRequest {
        code: ErrorCode::BadRequest,
        message: format!("{field}: {message}"),
        details: vec![FieldError {
            field: field.into(),
            message,
        }],
    }
}

fn flag(field: &str, value: &str) -> Result<bool, ApiError> {
    match value {
        "" | "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(bad(field, format!("`{value}` is not `true` or `false`"))),
    }
}

/// Unix seconds of `since`: a duration back from `now` (`10m`, `1h30m`) or an RFC 3339
/// time in UTC.
fn since(value: &str, now: SystemTime) -> Result<u64, ApiError> {
    let at = humantime::parse_duration(value)
        .ok()
        .map(|ago| now.checked_sub(ago).unwrap_or(UNIX_EPOCH))
        .or_else(|| humantime::parse_rfc3339_weak(value).ok())
        .ok_or_else(|| {
            bad(
                "since",
                format!("`{value}` is neither a duration like `10m` nor an RFC 3339 time like `2025-01-02T15:04:05Z`"),
            )
        })?;
    Ok(at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs())
}

fn parse_query(raw: Option<&str>, now: SystemTime) -> Result<Query, ApiError> {
    let mut q = Query {
        options: LogOptions {
            tail: Some(DEFAULT_TAIL),
            ..LogOptions::default()
        },
        ..Query::default()
    };
    for (key, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "instance" => q.instance = Some(value.into_owned()),
            "follow" => q.options.follow = flag("follow", &value)?,
            "timestamps" => q.options.timestamps = flag("timestamps", &value)?,
            "previous" => q.previous = flag("previous", &value)?,
            "since" => q.options.since = Some(since(&value, now)?),
            "tail" if value == "all" => q.options.tail = None,
            "tail" => {
                let n = value.parse().map_err(|_| {
                    bad("tail", format!("`{value}` is not a number of lines or `all`"))
                })?;
                q.options.tail = Some(n);
            }
            other => {
                return Err(bad(
                    other,
                    "unknown parameter; the logs take instance, follow, since, tail, timestamps and previous".into(),
                ))
            }
        }
    }
    if q.previous && q.options.follow {
        return Err(bad(
            "previous",
            "removed instances write nothing more: ask for `previous` or `follow`, not both".into(),
        ));
    }
    Ok(q)
}

/// `GET /api/v1/functions/{name}/logs`.
#[utoipa::path(
    get, operation_id = "function_logs", path = "/api/v1/functions/{name}/logs", tag = "observe",
    params(
        ("name" = String, Path, description = "The function's name"),
        ("instance" = Option<String>, Query, description = "One instance's (default: every instance's)"),
        ("follow" = Option<bool>, Query, description = "Keep streaming new lines"),
        ("since" = Option<String>, Query, description = "A duration back (`10m`) or a time (RFC 3339)"),
        ("tail" = Option<String>, Query, description = "The last N lines of each, or `all`"),
        ("timestamps" = Option<bool>, Query, description = "Prefix each line with its time"),
        ("previous" = Option<bool>, Query, description = "The instance's that ended last"),
    ),
    responses((status = 200, description = "Log lines, each prefixed with its instance", content_type = "text/plain"))
)]
pub async fn logs(
    State(state): State<AppState>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = parse_query(raw.as_deref(), SystemTime::now())?;
    if state.activator().function(&name).is_none() {
        return Err(ApiError::FunctionNotFound(name));
    }
    let body = if q.previous {
        let records = state
            .activator()
            .previous_logs(&name, q.instance.as_deref())
            .await?;
        Body::from(previous_text(&records, &q.options))
    } else {
        let query = LogQuery {
            instance: q.instance,
            options: q.options,
        };
        Body::from_stream(chunks(state.activator().logs(&name, query)?))
    };
    Ok((
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response())
}

/// The events as text, as many in one chunk as are ready.
fn chunks(
    rx: mpsc::Receiver<LogEvent>,
) -> impl futures_util::Stream<Item = Result<String, std::convert::Infallible>> {
    futures_util::stream::unfold(rx, |mut rx| async move {
        let first = rx.recv().await?;
        let mut text = event_line(&first);
        for _ in 1..EVENTS_PER_CHUNK {
            match rx.try_recv() {
                Ok(e) => text.push_str(&event_line(&e)),
                Err(_) => break,
            }
        }
        Some((Ok(text), rx))
    })
}

fn prefixed(instance: &str, stream: OutputStream, line: &str) -> String {
    match stream {
        OutputStream::Stdout => format!("[{instance}] {line}\n"),
        OutputStream::Stderr => format!("[{instance} stderr] {line}\n"),
    }
}

fn event_line(e: &LogEvent) -> String {
    match e {
        LogEvent::Line {
            instance,
            stream,
            line,
        } => prefixed(instance, *stream, line),
        LogEvent::Note { instance, text } => format!("[{instance} ember] {text}\n"),
    }
}

/// Kept records as text: a header line each, then its lines (the last `tail` of them),
/// those that ended before `since` left out.
fn previous_text(records: &[PreviousLogs], options: &LogOptions) -> String {
    let mut out = String::new();
    let since_ms = options.since.map_or(0, |s| s.saturating_mul(1000));
    for r in records.iter().filter(|r| r.ended_ms >= since_ms) {
        out.push_str(&header_line(r));
        let skip = options.tail.map_or(0, |n| r.lines.len().saturating_sub(n));
        if r.lines.is_empty() {
            out.push_str(&format!("[{} ember] (no output)\n", r.instance));
        }
        for LogLine { stream, line } in &r.lines[skip..] {
            out.push_str(&prefixed(&r.instance, *stream, line));
        }
    }
    if out.is_empty() {
        out.push_str("no output of removed instances is kept (yet)\n");
    }
    out
}

/// `=== instance ID on node N (revision R) ended T: why; exit code C (status)`.
fn header_line(r: &PreviousLogs) -> String {
    let ended = UNIX_EPOCH + Duration::from_millis(r.ended_ms);
    let exit = match (r.exit_code, r.status.as_deref()) {
        (Some(code), Some(status)) => format!("; exit code {code} ({status})"),
        (Some(code), None) => format!("; exit code {code}"),
        (None, Some(status)) => format!("; container {status}"),
        (None, None) => String::new(),
    };
    let truncated = if r.truncated {
        "; earlier output not kept"
    } else {
        ""
    };
    format!(
        "=== instance {} on node {} (revision {}) ended {}: {}{exit}{truncated}\n",
        r.instance,
        r.node,
        r.revision,
        humantime::format_rfc3339_seconds(ended),
        r.reason
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn message(e: ApiError) -> String {
        e.to_string()
    }

    #[test]
    fn the_query_defaults_to_the_last_hundred_lines_without_following() {
        let q = parse_query(None, now()).unwrap();
        assert_eq!(q.options.tail, Some(DEFAULT_TAIL));
        assert!(!q.options.follow && !q.previous && q.instance.is_none());
    }

    #[test]
    fn since_takes_a_duration_back_or_an_rfc3339_time() {
        let q = parse_query(Some("since=10m&tail=all&follow"), now()).unwrap();
        assert_eq!(q.options.since, Some(1_700_000_000 - 600));
        assert_eq!(q.options.tail, None);
        assert!(q.options.follow);
        let q = parse_query(Some("since=2023-11-14T22:13:20Z&instance=a1"), now()).unwrap();
        assert_eq!(q.options.since, Some(1_700_000_000));
        assert_eq!(q.instance.as_deref(), Some("a1"));
    }

    #[test]
    fn a_bad_query_names_its_field_and_the_expected_form() {
        let m = message(parse_query(Some("since=yesterday"), now()).unwrap_err());
        assert!(m.starts_with("since: `yesterday`"), "{m}");
        assert!(m.contains("10m") && m.contains("RFC 3339"), "{m}");
        let m = message(parse_query(Some("tail=lots"), now()).unwrap_err());
        assert!(m.starts_with("tail:") && m.contains("`all`"), "{m}");
        let m = message(parse_query(Some("follow=maybe"), now()).unwrap_err());
        assert!(m.starts_with("follow:"), "{m}");
        let m = message(parse_query(Some("lines=5"), now()).unwrap_err());
        assert!(m.starts_with("lines: unknown parameter"), "{m}");
        let m = message(parse_query(Some("previous=true&follow=true"), now()).unwrap_err());
        assert!(m.starts_with("previous:"), "{m}");
    }

    #[test]
    fn kept_output_reads_as_a_header_then_its_last_lines() {
        let line = |stream, line: &str| LogLine {
            stream,
            line: line.into(),
        };
        let record = PreviousLogs {
            function: "echo".into(),
            instance: "a1".into(),
            revision: "r1".into(),
            node: "local".into(),
            ended_ms: 1_700_000_000_000,
            reason: "container stopped".into(),
            exit_code: Some(7),
            status: Some("exited".into()),
            lines: vec![
                line(OutputStream::Stdout, "one"),
                line(OutputStream::Stdout, "two"),
                line(OutputStream::Stderr, "bye"),
            ],
            truncated: false,
        };
        let options = LogOptions {
            tail: Some(2),
            ..LogOptions::default()
        };
        assert_eq!(
            previous_text(&[record], &options),
            "=== instance a1 on node local (revision r1) ended 2023-11-14T22:13:20Z: container stopped; exit code 7 (exited)\n\
             [a1] two\n\
             [a1 stderr] bye\n"
        );
    }
}
