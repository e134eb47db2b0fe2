//! `GET /api/v1/invocations` (the invocation history, newest first, a page at a time),
//! `GET /api/v1/usage` (GPU usage summed from it), and the layer that puts an invocation's
//! `Ember-*` headers on Ember's own error answers.

use axum::extract::{Query, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::Json;
use serde::Deserialize;

use super::error::ApiError;
use super::AppState;
use crate::history::now_us;
use crate::history::query::{self, BadParam, Page, Params};
use crate::history::usage::{self, By, Usage};
use crate::invoke::trace::{TagSlot, INVOCATION_ID};
use crate::model::{ErrorCode, FieldError};

impl From<BadParam> for ApiError {
    fn from(e: BadParam) -> Self {
        ApiError::BadRequest {
            code: ErrorCode::BadRequest,
            message: e.to_string(),
            details: vec![FieldError {
                field: e.field.to_string(),
                message: e.message,
            }],
        }
    }
}

/// `GET /api/v1/invocations?function=&node=&gpu=&status=&since=&until=&limit=&cursor=`.
#[utoipa::path(
    get, operation_id = "list_invocations", path = "/api/v1/invocations", tag = "observe", params(crate::history::query::Params),
    responses((status = 200, description = "Invocation records, newest first", body = crate::history::query::Page))
)]
pub async fn invocations(
    State(state): State<AppState>,
    Query(params): Query<Params>,
) -> Result<Json<Page>, ApiError> {
    let q = query::Query::parse(&params)?;
    let a = state.activator();
    // Records still in the recorder's batch are written first: a request just answered
    // is listed.
    a.history().flush().await;
    Ok(Json(q.run(a.store()).await?))
}

/// `GET /api/v1/usage`'s query.
#[derive(utoipa::IntoParams, Debug, Default, Deserialize)]
#[into_params(parameter_in = Query)]
pub struct UsageParams {
    /// A duration back from now or a time; default 24h.
    pub since: Option<String>,
    /// The same, for the end; default now.
    pub until: Option<String>,
    /// `function` (default), `node` or `gpu`.
    pub by: Option<String>,
}

/// `GET /api/v1/usage?since=24h&until=&by=function|node|gpu`.
#[utoipa::path(
    get, operation_id = "gpu_usage", path = "/api/v1/usage", tag = "observe", params(UsageParams),
    responses((status = 200, description = "GPU-seconds allocated and busy, by function, node or GPU", body = Usage))
)]
pub async fn usage(
    State(state): State<AppState>,
    Query(p): Query<UsageParams>,
) -> Result<Json<Usage>, ApiError> {
    let since = query::parse_time("since", p.since.as_deref().unwrap_or("24h"))?;
    let until = match p.until.as_deref() {
        Some(u) => query::parse_time("until", u)?,
        None => now_us(),
    };
    if until <= since {
        return Err(BadParam {
            field: "until",
            message: "must be later than `since`".into(),
        }
        .into());
    }
    let by = match p.by.as_deref() {
        None => By::Function,
        Some(b) => b.parse().map_err(|message| BadParam {
            field: "by",
            message,
        })?,
    };
    let a = state.activator();
    // Records still in the recorder's batch are written first, so the sums include them.
    a.history().flush().await;
    let live = a.live_allocations();
    Ok(Json(usage::usage(a.store(), live, since, until, by).await?))
}

/// Gives each request a slot for its invocation's tags, and sets them on an answer that
/// does not carry them yet (Ember's own error answers).
pub async fn tag(mut req: Request, next: Next) -> Response {
    let slot = TagSlot::default();
    req.extensions_mut().insert(slot.clone());
    let mut response = next.run(req).await;
    if let Some(tags) = slot.get() {
        if !response.headers().contains_key(INVOCATION_ID) {
            tags.apply(response.headers_mut());
        }
    }
    response
}
