//! The ComfyUI front door's routes: `/comfy/NAME/...` (and `/comfy/NAME/api/...`, as
//! ComfyUI registers every route twice) for a function with a `[comfyui]` section, and
//! the same at the root of a second listener (`serve --comfyui-listen ADDR
//! --comfyui-function NAME`) for clients that take only `host:port`.
//!
//! The prompt queue, history, uploads, outputs and socket routes are answered by the
//! gateway (`crate::comfy`); the cached ones (`/object_info`, `/models`, `/embeddings`)
//! from the last ready backend's answer, so they answer at zero; every other route (the
//! web UI's files, `/userdata`, custom nodes' routes) goes to any ready instance, busy or
//! not, starting one when none is. `Origin` is dropped toward backends: ComfyUI refuses
//! a cross-origin request to a loopback host. A private function takes its key as a
//! header or, for browsers' sockets, as `?token=`.

mod files;
mod socket;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::auth;
use super::error::ApiError;
use super::AppState;
use crate::activator::Function;
use crate::comfy::{Owner, CACHED_PATHS};
use crate::invoke::Call;

/// The query parameter a browser's socket may carry its key in.
const TOKEN_PARAM: &str = "token";

/// `/comfy/{name}/...`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/comfy/{name}", any(under_prefix))
        .route("/comfy/{name}/", any(under_prefix))
        .route(
            "/comfy/{name}/{*rest}",
            any(under_prefix).layer(axum::extract::DefaultBodyLimit::disable()),
        )
}

/// The second listener's routes: `function` at the root.
pub fn root_routes(function: String) -> Router<AppState> {
    let at_root =
        move |state: State<AppState>, client: ConnectInfo<SocketAddr>, req: Request<Body>| {
            let function = function.clone();
            async move {
                let rest = req.uri().path().to_string();
                handle(state.0, function, rest, client.0, req).await
            }
        };
    Router::new().route("/", any(at_root.clone())).route(
        "/{*rest}",
        any(at_root).layer(axum::extract::DefaultBodyLimit::disable()),
    )
}

#[derive(serde::Deserialize)]
struct NamePath {
    name: String,
}

#[utoipa::path(
    method(get, post, put, delete, patch), operation_id = "comfyui", path = "/comfy/{name}/{rest}", tags = ["comfyui", "proxied"], security((), ("bearer" = []), ("ember_key" = [])),
    params(("name" = String, Path, description = "The function's name"), ("rest" = String, Path, description = "ComfyUI's route: /prompt, /ws, /history, /view, /upload/image, ...")),
    responses((status = 200, description = "ComfyUI's answer, as ComfyUI gives it"))
)]
async fn under_prefix(
    State(state): State<AppState>,
    Path(NamePath { name }): Path<NamePath>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    req: Request<Body>,
) -> Response {
    let path = req.uri().path();
    let after = path.get("/comfy/".len()..).unwrap_or("");
    let rest = after.find('/').map_or("/", |i| &after[i..]).to_string();
    handle(state, name, rest, client, req).await
}

/// A ComfyUI route of function `name`; `rest` is the path after the prefix.
async fn handle(
    state: AppState,
    name: String,
    rest: String,
    client: SocketAddr,
    req: Request<Body>,
) -> Response {
    match route(&state, &name, &rest, client, req).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn route(
    state: &AppState,
    name: &str,
    rest: &str,
    client: SocketAddr,
    req: Request<Body>,
) -> Result<Response, ApiError> {
    let f = state
        .activator()
        .function(name)
        .ok_or_else(|| ApiError::FunctionNotFound(name.to_string()))?;
    if f.revision().manifest.comfyui.is_none() {
        return Err(ApiError::NotComfyUi(name.to_string()));
    }
    let (mut parts, body) = req.into_parts();
    let token = take_token(&mut parts.uri);
    if let Some(token) = token.and_then(|t| HeaderValue::from_str(&t).ok()) {
        parts.headers.insert(crate::access::KEY_HEADER, token);
    }
    let owner = auth::admit_as(state, &mut parts, &f)?;
    parts.headers.remove(header::ORIGIN);
    let req = Request::from_parts(parts, body);
    // ComfyUI serves every route at its path and again under /api.
    let path = match rest.strip_prefix("/api") {
        Some(p) if p.is_empty() || p.starts_with('/') => p,
        _ => rest,
    };
    let door = &state.comfy;
    let method = req.method().clone();
    let json = |status: u16, body: Value| {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
        (status, Json(body)).into_response()
    };
    Ok(match (method, path) {
        (Method::GET, "/ws") => socket::upgrade(state, &f, owner, req)?,
        (Method::POST, "/prompt") => {
            let body = read_body(&f, req).await?;
            let answer = door.submit(&f, owner, &body).await;
            json(answer.status, answer.body)
        }
        (Method::GET, "/prompt") => {
            let remaining = door.queue_remaining(name);
            json(200, json!({"exec_info": {"queue_remaining": remaining}}))
        }
        (Method::GET, "/queue") => json(200, door.queue(name, &owner)),
        (Method::POST, "/queue") => {
            let body = read_json(&f, req).await?;
            door.change_queue(name, &owner, &body).await?;
            StatusCode::OK.into_response()
        }
        (Method::GET, "/history") => {
            let query = query_map(req.uri());
            let number = |k: &str| query.get(k).and_then(|v| v.parse::<i64>().ok());
            let max_items = number("max_items").map(|n| n.max(0) as usize);
            json(
                200,
                door.history(name, &owner, max_items, number("offset"))
                    .await?,
            )
        }
        (Method::GET, p) if p.starts_with("/history/") => {
            let id = path_segment(&p["/history/".len()..]);
            json(200, door.history_of(name, &owner, &id)?)
        }
        (Method::POST, "/history") => {
            let body = read_json(&f, req).await?;
            door.change_history(name, &owner, &body).await?;
            StatusCode::OK.into_response()
        }
        (Method::POST, "/interrupt") => interrupt(state, name, &owner, req, &f).await?,
        (Method::GET, "/view") => files::view(state, &f, &owner, req).await?,
        (Method::POST, "/upload/image") | (Method::POST, "/upload/mask") => {
            files::upload(state, &f, req).await?
        }
        (Method::GET, "/features") => {
            let max = f.revision().manifest.request.max_body.as_u64();
            json(
                200,
                json!({"supports_preview_metadata": false, "max_upload_size": max}),
            )
        }
        (Method::GET, "/system_stats") => json(200, system_stats(state, &f)),
        (Method::GET, p) if CACHED_PATHS.contains(&p) => cached(state, &f, p, client, req).await?,
        (Method::GET, p) if p.starts_with("/object_info/") => {
            let class = path_segment(&p["/object_info/".len()..]);
            let info = cached_json(state, &f, "/object_info", client).await?;
            let one = info
                .get(&class)
                .map_or(json!({}), |spec| json!({ class: spec }));
            json(200, one)
        }
        // Models stay loaded until the instance is retired; scaling to zero frees them.
        (Method::POST, "/free") => StatusCode::OK.into_response(),
        _ => pass_through(state, &f, rest, client, req).await?,
    })
}

/// `POST /interrupt`: the caller's own running prompt(s) only (see `ComfyDoor::interrupt`).
async fn interrupt(
    state: &AppState,
    name: &str,
    owner: &Owner,
    req: Request<Body>,
    f: &Arc<Function>,
) -> Result<Response, ApiError> {
    let client_id = query_map(req.uri()).get("clientId").cloned();
    let body = read_json(f, req).await?;
    let prompt_id = body.get("prompt_id").and_then(Value::as_str);
    let client_id = body
        .get("client_id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or(client_id);
    let told = state
        .comfy
        .interrupt(name, owner, prompt_id, client_id.as_deref());
    tracing::info!(function = name, prompt = ?prompt_id, told, "ComfyUI interrupt");
    Ok(StatusCode::OK.into_response())
}

/// A cached answer, or the backend's (any ready instance, or a started one), kept.
async fn cached(
    state: &AppState,
    f: &Arc<Function>,
    path: &str,
    client: SocketAddr,
    req: Request<Body>,
) -> Result<Response, ApiError> {
    if let Some(value) = state.comfy.cached_json(f, path) {
        return Ok(Json(&*value).into_response());
    }
    let response = pass_through(state, f, path, client, req).await?;
    if !response.status().is_success() {
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 64 << 20)
        .await
        .map_err(|e| ApiError::UpstreamRead(format!("reading the instance's {path}: {e}")))?;
    state.comfy.remember(f, path, &bytes);
    Ok(Response::from_parts(parts, Body::from(bytes)))
}

/// A cached answer as JSON, fetched from an instance when none is kept yet (`{}` when the
/// instance's answer is not JSON).
async fn cached_json(
    state: &AppState,
    f: &Arc<Function>,
    path: &str,
    client: SocketAddr,
) -> Result<Arc<Value>, ApiError> {
    if let Some(value) = state.comfy.cached_json(f, path) {
        return Ok(value);
    }
    let req = Request::get(path)
        .body(Body::empty())
        .expect("a path makes a request");
    cached(state, f, path, client, req).await?;
    Ok(state
        .comfy
        .cached_json(f, path)
        .unwrap_or_else(|| Arc::new(json!({}))))
}

/// `/system_stats`: the backend's `system` block (cached) with every node's GPUs.
fn system_stats(state: &AppState, f: &Arc<Function>) -> Value {
    let cached = state.comfy.cached_json(f, "/system_stats");
    let system = cached
        .as_ref()
        .and_then(|c| c.get("system").cloned())
        .unwrap_or_else(|| {
            json!({
                "os": std::env::consts::OS, "ram_total": 0, "ram_free": 0,
                "comfyui_version": "ember", "required_frontend_version": "",
                "python_version": "", "pytorch_version": "", "embedded_python": false,
                "argv": ["ember"],
            })
        });
    let mut devices = Vec::new();
    for node in state.activator().scheduler().status() {
        for g in node.gpus {
            let gpu = g.gpu;
            let free = gpu.memory_total.saturating_sub(gpu.memory_used);
            devices.push(json!({
                "name": format!("{} ({}, GPU {})", gpu.name, node.name, gpu.index),
                "type": "cuda", "index": devices.len(),
                "vram_total": gpu.memory_total, "vram_free": free,
                "torch_vram_total": gpu.memory_total, "torch_vram_free": free,
            }));
        }
    }
    json!({"system": system, "devices": devices})
}

/// Any other route: to any ready instance (starting one when none is).
async fn pass_through(
    state: &AppState,
    f: &Arc<Function>,
    rest: &str,
    client: SocketAddr,
    mut req: Request<Body>,
) -> Result<Response, ApiError> {
    let target = match req.uri().query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    };
    super::invoke::set_path(&mut req, &target)?;
    let call = Call {
        request: req,
        client: Some(client),
        route: None,
        any_instance: true,
        warm_only: false,
    };
    Ok(state.invoker.call(f, call).await?)
}

/// The body, within the function's `request.max_body`.
async fn read_body(f: &Function, req: Request<Body>) -> Result<bytes::Bytes, ApiError> {
    let limit = f.revision().manifest.request.max_body.as_u64();
    axum::body::to_bytes(req.into_body(), limit as usize)
        .await
        .map_err(|_| crate::proxy::ProxyError::BodyTooLarge { limit }.into())
}

/// A JSON body, `{}` when empty or not JSON (as ComfyUI reads optional bodies).
async fn read_json(f: &Function, req: Request<Body>) -> Result<Value, ApiError> {
    let bytes = read_body(f, req).await?;
    Ok(serde_json::from_slice(&bytes).unwrap_or(json!({})))
}

/// Takes `token=...` out of the URI's query, returning it; the other parameters stay as
/// they were sent.
fn take_token(uri: &mut axum::http::Uri) -> Option<String> {
    let query = uri.query()?;
    let mut token = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let mut parsed = form_urlencoded::parse(pair.as_bytes());
            match parsed.next() {
                Some((name, value)) if name == TOKEN_PARAM => {
                    token = Some(value.into_owned());
                    false
                }
                _ => true,
            }
        })
        .collect();
    token.as_ref()?;
    let path = uri.path();
    let rebuilt = if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", kept.join("&"))
    };
    *uri = rebuilt.parse().ok()?;
    token
}

/// The query's parameters, decoded (the last of a repeated name wins).
fn query_map(uri: &axum::http::Uri) -> HashMap<String, String> {
    let query = uri.query().unwrap_or("");
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

/// A path segment, percent-decoded (`/history/{id}`, `/object_info/{class}`).
fn path_segment(raw: &str) -> String {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_leaves_the_query_and_values_are_decoded() {
        let mut uri: axum::http::Uri = "/ws?clientId=a%20b&token=k%2B1".parse().unwrap();
        assert_eq!(take_token(&mut uri).as_deref(), Some("k+1"));
        assert_eq!(uri.to_string(), "/ws?clientId=a%20b");
        assert_eq!(query_map(&uri)["clientId"], "a b");
        let mut bare: axum::http::Uri = "/view?token=x".parse().unwrap();
        take_token(&mut bare);
        assert_eq!(bare.to_string(), "/view");
        assert_eq!(path_segment("%E2%9C%93+x"), "✓+x");
    }
}
