//! Reading the history: `GET /api/v1/invocations`'s filters, checked, and its pages.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{now_us, InvocationRecord};
use crate::store::{HistoryCursor, Store, StoreError};

/// Records in a page when the caller names no `limit`.
pub const DEFAULT_LIMIT: usize = 100;
/// Records in a page at the most.
pub const MAX_LIMIT: usize = 1000;

/// The query string, as written.
#[derive(utoipa::IntoParams, Debug, Default, Clone, Deserialize)]
#[into_params(parameter_in = Query)]
pub struct Params {
    /// Only this function's.
    pub function: Option<String>,
    /// Only those served on this node.
    pub node: Option<String>,
    /// Only those served with this GPU (or MIG) uuid.
    pub gpu: Option<String>,
    /// `200`, `5xx`, `error` (Ember answered), or one of Ember's error codes.
    pub status: Option<String>,
    /// A duration back from now (`1h`) or a time (RFC 3339).
    pub since: Option<String>,
    /// The same, for the newest end.
    pub until: Option<String>,
    /// Records per page.
    pub limit: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A field of the query that was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}`: {message}")]
pub struct BadParam {
    /// The query parameter.
    pub field: &'static str,
    /// What was expected.
    pub message: String,
}

/// What the status filter accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    Exact(u16),
    Class(u16),
    AnyError,
    Error(String),
}

impl Status {
    fn parse(s: &str) -> Result<Status, BadParam> {
        let bad = || {
            BadParam {
            field: "status",
            message: format!("`{s}` is not a status: use a code (`503`), a class (`5xx`), `error` (Ember answered) or an error code (`queue_timeout`)"),
        }
        };
        if let Ok(code) = s.parse::<u16>() {
            return (100..600)
                .contains(&code)
                .then_some(Status::Exact(code))
                .ok_or_else(bad);
        }
        let lower = s.to_ascii_lowercase();
        if let Some(class) = lower.strip_suffix("xx") {
            return match class.parse::<u16>() {
                Ok(c @ 1..=5) => Ok(Status::Class(c)),
                _ => Err(bad()),
            };
        }
        if lower == "error" {
            return Ok(Status::AnyError);
        }
        if !lower.is_empty() && lower.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            return Ok(Status::Error(lower));
        }
        Err(bad())
    }

    fn matches(&self, r: &InvocationRecord) -> bool {
        match self {
            Status::Exact(c) => r.status == *c,
            Status::Class(c) => r.status / 100 == *c,
            Status::AnyError => r.error.is_some(),
            Status::Error(code) => r.error.as_deref() == Some(code),
        }
    }
}

/// A page size as a query gives it (`limit`): `DEFAULT_LIMIT` when absent.
pub fn parse_limit(limit: Option<&str>) -> Result<usize, BadParam> {
    match limit {
        None => Ok(DEFAULT_LIMIT),
        Some(l) => match l.parse::<usize>() {
            Ok(n @ 1..=MAX_LIMIT) => Ok(n),
            _ => Err(BadParam {
                field: "limit",
                message: format!("`{l}` is not a number from 1 to {MAX_LIMIT}"),
            }),
        },
    }
}

/// A time as a query gives it: a duration back from now, or an RFC 3339 time; unix µs.
pub fn parse_time(field: &'static str, s: &str) -> Result<u64, BadParam> {
    let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(now_us().saturating_sub(micros(d)));
    }
    match humantime::parse_rfc3339_weak(s) {
        Ok(t) => Ok(micros(
            t.duration_since(std::time::UNIX_EPOCH)
                .unwrap_or(Duration::ZERO),
        )),
        Err(_) => Err(BadParam {
            field,
            message: format!("`{s}` is neither a duration back from now (`90s`, `1h`, `7d`) nor a time (`2026-11-21T10:00:00Z`)"),
        }),
    }
}

/// A checked query.
#[derive(Debug, Clone)]
pub struct Query {
    function: Option<String>,
    node: Option<String>,
    gpu: Option<String>,
    status: Option<Status>,
    since_us: u64,
    until_us: u64,
    cursor: Option<HistoryCursor>,
    limit: usize,
}

/// A cursor as the API writes it: 24 hex digits.
fn format_cursor(c: HistoryCursor) -> String {
    format!("{:016x}{:08x}", c.batch, c.index)
}

fn parse_cursor(s: &str) -> Option<HistoryCursor> {
    if s.len() != 24 || !s.is_char_boundary(16) {
        return None;
    }
    Some(HistoryCursor {
        batch: u64::from_str_radix(&s[..16], 16).ok()?,
        index: u32::from_str_radix(&s[16..], 16).ok()?,
    })
}

/// One page, newest first.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
#[schema(as = InvocationPage)]
pub struct Page {
    /// The records.
    pub invocations: Vec<InvocationRecord>,
    /// Pass as `cursor` for the next (older) page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

impl Query {
    /// Checks the parameters.
    pub fn parse(p: &Params) -> Result<Query, BadParam> {
        let since = p
            .since
            .as_deref()
            .map(|s| parse_time("since", s))
            .transpose()?;
        let until = p
            .until
            .as_deref()
            .map(|s| parse_time("until", s))
            .transpose()?;
        let limit = parse_limit(p.limit.as_deref())?;
        let cursor = match p.cursor.as_deref() {
            None => None,
            Some(c) => Some(parse_cursor(c).ok_or_else(|| BadParam {
                field: "cursor",
                message: format!(
                    "`{c}` is not a cursor: pass the `next_cursor` of the previous page"
                ),
            })?),
        };
        Ok(Query {
            function: p.function.clone().filter(|s| !s.is_empty()),
            node: p.node.clone().filter(|s| !s.is_empty()),
            gpu: p.gpu.clone().filter(|s| !s.is_empty()),
            status: p.status.as_deref().map(Status::parse).transpose()?,
            since_us: since.unwrap_or(0),
            until_us: until.unwrap_or(u64::MAX),
            cursor,
            limit,
        })
    }

    fn keeps(&self, r: &InvocationRecord) -> bool {
        (self.since_us..self.until_us).contains(&r.queued_at_us)
            && self.function.as_ref().is_none_or(|f| &r.function == f)
            && self
                .node
                .as_ref()
                .is_none_or(|n| r.node.as_ref() == Some(n))
            && self.gpu.as_ref().is_none_or(|g| r.gpus.contains(g))
            && self.status.as_ref().is_none_or(|s| s.matches(r))
    }

    /// Reads the page: records newest first (by when their answer ended).
    pub async fn run(self, store: &Store) -> Result<Page, StoreError> {
        let (since, cursor, limit) = (self.since_us, self.cursor, self.limit);
        let (invocations, next) = store
            .invocations(since, cursor, limit, move |r| self.keeps(r))
            .await?;
        Ok(Page {
            invocations,
            next_cursor: next.map(format_cursor),
        })
    }
}
