//! The OpenAI-compatible front door: one base URL (`http://GATEWAY/v1`) for every model
//! of every function with an `[openai]` section, cold or warm.
//!
//! A request names its model (a JSON body's `model`, or a multipart form's `model`
//! field); the front door finds the function serving it, checks the function's
//! `[access]` rule, renames the model when the manifest maps it to another name, and
//! sends the request, every other byte untouched, through the invoke core: a cold model
//! waits in its function's queue while an instance starts, exactly as `/fn/NAME` does,
//! and the answer streams back as the instance writes it (SSE chunks included). Under
//! `routing = "prefix"` the start of the prompt picks the instance (see
//! `activator::routing`). A streaming request held by a cold start gets SSE comments
//! meanwhile (hold.rs). Errors come in OpenAI's shape (error.rs); `/v1/models` lists
//! every model, scaled to zero or not, with an `ember` object saying how warm it is.

mod error;
mod hold;
mod request;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body as AxumBody;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Request};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::auth;
use super::error::ApiError;
use super::AppState;
use crate::activator::{Activator, Function};
use crate::invoke::Call;
use crate::manifest::Routing;
pub use error::FrontError;
use request::Body;

/// Largest body the front door reads to find its model (audio uploads included); larger
/// bodies go to `/fn/NAME/...`, where the function's own `request.max_body` applies.
pub const MAX_BODY: usize = 64 << 20;

/// The POST routes, each sent to the model's function at the same path.
pub const ROUTES: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/images/generations",
    "/v1/audio/speech",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
];

/// The front door's routes.
pub fn routes() -> Router<AppState> {
    let mut router = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model));
    for route in ROUTES {
        // The body is read here, within MAX_BODY; axum's default limit does not apply.
        router = router.route(
            route,
            post(forward).layer(axum::extract::DefaultBodyLimit::disable()),
        );
    }
    router
}

/// One model id of one function.
struct Model {
    id: String,
    /// The name the function's server knows it by.
    upstream: String,
    function: Arc<Function>,
}

/// Every model of every deployed function.
fn catalog(activator: &Activator) -> Vec<Model> {
    let mut all = Vec::new();
    for f in activator.functions() {
        let revision = f.revision();
        if let Some(openai) = &revision.manifest.openai {
            for (id, upstream) in openai.models.pairs() {
                all.push(Model {
                    id: id.to_string(),
                    upstream: upstream.to_string(),
                    function: f.clone(),
                });
            }
        }
    }
    all
}

/// The models the request's credentials may use.
fn visible(state: &AppState, headers: &HeaderMap) -> Result<Vec<Model>, ApiError> {
    let mut out = Vec::new();
    for m in catalog(state.activator()) {
        if auth::may_invoke(state, headers, &m.function)? {
            out.push(m);
        }
    }
    Ok(out)
}

/// `POST /v1/...`: finds the model's function and sends the request there.
#[utoipa::path(
    post, operation_id = "openai_chat_completions", path = "/v1/chat/completions", tags = ["openai", "proxied"], security((), ("bearer" = []), ("ember_key" = [])),
    request_body(content((serde_json::Value = "application/json"), (serde_json::Value = "multipart/form-data")), description = "OpenAI's request: a JSON body (or, for audio, a form) with `model`"),
    responses((status = 200, description = "The model server's answer (JSON, or server-sent events with `stream`)"))
)]
async fn forward(
    State(state): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    req: Request<AxumBody>,
) -> Response {
    match send(&state, client, req).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn send(
    state: &AppState,
    client: SocketAddr,
    req: Request<AxumBody>,
) -> Result<Response, FrontError> {
    let (mut parts, body) = req.into_parts();
    let bytes = read_body(&parts.headers, body).await?;
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut body = if content_type
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("multipart/form-data")
    {
        let boundary = request::boundary(content_type).ok_or(request::BodyError::BadMultipart(
            "the content type names no boundary",
        ))?;
        Body::multipart(bytes, boundary)?
    } else {
        Body::json(bytes)?
    };
    let Some((function, upstream)) = state.activator().model(&body.model) else {
        let known = visible(state, &parts.headers)?
            .into_iter()
            .map(|m| m.id)
            .collect();
        return Err(FrontError::ModelNotFound {
            model: body.model,
            known,
        });
    };
    let model_id = body.model.clone();
    auth::admit(state, &mut parts, &function)?;
    body.rename(&upstream);
    let openai = function.revision().manifest.openai.clone();
    let route = openai
        .filter(|o| o.routing == Routing::Prefix)
        .and_then(|o| body.prompt_prefix(o.prefix_bytes))
        .map(|prefix| crate::activator::fnv1a(&prefix));
    let streams = body.streams();
    parts.headers.remove(header::TRANSFER_ENCODING);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.bytes.len()));
    let request = Request::from_parts(parts, AxumBody::from(body.bytes));
    let call = Call {
        request,
        client: Some(client),
        route,
        any_instance: false,
        warm_only: false,
    };
    let invoker = state.invoker.clone();
    let answer = async move {
        let response = invoker
            .call(&function, call)
            .await
            .map_err(ApiError::from)?;
        Ok(unbuffered(response))
    };
    if streams {
        Ok(hold::hold(answer, model_id, &state.tracker).await)
    } else {
        answer.await
    }
}

/// Marks an event stream for a buffering proxy in front (nginx) to pass each event on
/// at once.
fn unbuffered(mut response: Response) -> Response {
    let streams = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/event-stream"));
    if streams {
        response
            .headers_mut()
            .insert("x-accel-buffering", HeaderValue::from_static("no"));
    }
    response
}

/// The whole body, within [`MAX_BODY`].
async fn read_body(headers: &HeaderMap, body: AxumBody) -> Result<Vec<u8>, FrontError> {
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = FrontError::BodyTooLarge { limit: MAX_BODY };
    if announced.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large);
    }
    match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(bytes) => Ok(bytes.to_vec()),
        Err(e) if is_length_limit(&e) => Err(too_large),
        Err(e) => Err(FrontError::BodyRead(e.to_string())),
    }
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// `GET /v1/models`: every model the caller may use, cold ones included.
#[utoipa::path(
    get, operation_id = "openai_models", path = "/v1/models", tag = "openai", security((), ("bearer" = []), ("ember_key" = [])),
    responses((status = 200, description = "The models the caller may use, in OpenAI's list shape", body = serde_json::Value))
)]
async fn list_models(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, FrontError> {
    let data: Vec<Value> = visible(&state, &headers)?
        .iter()
        .map(|m| describe(&state, m))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// `GET /v1/models/{id}`: one model (ids may hold `/`).
#[utoipa::path(
    get, operation_id = "openai_model", path = "/v1/models/{id}", tag = "openai", security((), ("bearer" = []), ("ember_key" = [])),
    params(("id" = String, Path, description = "The model's id")),
    responses((status = 200, description = "The model, in OpenAI's shape", body = serde_json::Value))
)]
async fn get_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, FrontError> {
    let visible = visible(&state, &headers)?;
    match visible.iter().find(|m| m.id == id) {
        Some(m) => Ok(Json(describe(&state, m))),
        None => Err(FrontError::ModelNotFound {
            model: id,
            known: visible.into_iter().map(|m| m.id).collect(),
        }),
    }
}

/// A model in OpenAI's shape, with how warm its function is.
fn describe(state: &AppState, m: &Model) -> Value {
    let status = state.activator().status(&m.function);
    let created = state
        .activator()
        .store()
        .function(m.function.name())
        .ok()
        .flatten()
        .map_or(0, |r| r.created_ms / 1000);
    let warmth = if status.ready > 0 {
        "ready"
    } else if status.starting > 0 {
        "starting"
    } else if status.paused > 0 {
        "paused"
    } else {
        "cold"
    };
    json!({
        "id": m.id,
        "object": "model",
        "created": created,
        "owned_by": "ember",
        "ember": {
            "function": m.function.name(),
            "state": warmth,
            "instances": status.ready + status.starting + status.paused,
            "upstream_model": m.upstream,
        },
    })
}
