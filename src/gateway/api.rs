//! The control API under `/api/v1`: deploy, list, inspect and remove functions.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::error::ApiError;
use super::AppState;
use crate::activator::{DeployOutcome, FunctionStatus};
use crate::manifest::{Format, Manifest};
use crate::model::{ErrorCode, FieldError};

/// Largest manifest accepted.
pub const MAX_MANIFEST_BYTES: usize = 1 << 20;

#[derive(utoipa::ToSchema, Serialize)]
struct DeployResponse {
    #[serde(flatten)]
    outcome: DeployOutcome,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
}

/// `GET /healthz`: `ok` while the gateway serves.
#[utoipa::path(
    get, operation_id = "health", path = "/healthz", tag = "observe", security(()),
    responses((status = 200, description = "The gateway serves", body = String, content_type = "text/plain"))
)]
pub async fn health() -> &'static str {
    "ok\n"
}

/// `PUT /api/v1/functions/{name}`: deploy a manifest (TOML or JSON).
#[utoipa::path(
    put, operation_id = "deploy_function", path = "/api/v1/functions/{name}", tag = "functions", params(("name" = String, Path, description = "The function's name")),
    request_body(content((Manifest = "application/json"), (String = "text/plain")), description = "The manifest, as JSON or as TOML text (at most 1 MiB)"),
    responses(
        (status = 201, description = "A new function, deployed", body = DeployResponse),
        (status = 200, description = "The function's new revision (or the same one), deployed", body = DeployResponse),
    )
)]
pub async fn put_function(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let text = std::str::from_utf8(&body).map_err(|_| ApiError::BadRequest {
        code: ErrorCode::InvalidManifest,
        message: "the manifest is not UTF-8 text".into(),
        details: vec![],
    })?;
    let manifest = Manifest::parse(text, manifest_format(&headers, text))?;
    if manifest.name != name {
        return Err(bad_field(
            "name",
            format!(
                "`{}` does not match the URL's function name `{name}`",
                manifest.name
            ),
        ));
    }
    let Some(image) = manifest.image.clone() else {
        return Err(bad_field(
            "image",
            "missing: the gateway cannot read a build context on your machine; \
             `ember deploy PATH` builds it and sets `image`, or set `image` yourself"
                .into(),
        ));
    };
    let _secrets_stay = state.secrets_lock.lock().await;
    let missing = super::secrets::missing_secrets(&state, &manifest)?;
    if !missing.is_empty() {
        return Err(ApiError::BadRequest {
            code: ErrorCode::InvalidManifest,
            message: missing
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; "),
            details: missing,
        });
    }
    let mut warnings = Vec::new();
    for node in state.activator().scheduler().live_nodes() {
        if let Ok(false) = node.image_exists(&image).await {
            warnings.push(format!(
                "image `{image}` is not on node `{}`; the first start there pulls it (or copies it from a node that has it) first",
                node.name()
            ));
        }
    }
    if let Err(e) = state
        .activator()
        .scheduler()
        .feasible(crate::scheduler::Needs::of(&manifest))
    {
        warnings.push(format!(
            "{e}; requests will answer 503 until a node that meets it joins"
        ));
    }
    let outcome = state.activator().deploy(manifest).await?;
    let status = if outcome.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(DeployResponse { outcome, warnings })).into_response())
}

fn manifest_format(headers: &HeaderMap, text: &str) -> Format {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type.contains("json") || text.trim_start().starts_with('{') {
        Format::Json
    } else {
        Format::Toml
    }
}

fn bad_field(field: &str, message: String) -> ApiError {
    ApiError::BadRequest {
        code: ErrorCode::InvalidManifest,
        message: format!("{field}: {message}"),
        details: vec![FieldError {
            field: field.into(),
            message,
        }],
    }
}

#[derive(utoipa::ToSchema, Serialize)]
struct GatewayInfo {
    id: String,
    version: &'static str,
    nodes: Vec<String>,
    /// Requests waiting for an instance, across functions.
    queued: usize,
    /// Their announced body bytes.
    queued_bytes: u64,
}

/// `GET /api/v1/gateway`: this gateway's id (the `ember.gateway` label of its
/// containers), version and nodes.
#[utoipa::path(
    get, operation_id = "gateway_info", path = "/api/v1/gateway", tag = "nodes",
    responses((status = 200, description = "This gateway", body = GatewayInfo))
)]
pub async fn gateway_info(State(state): State<AppState>) -> Json<impl Serialize> {
    let (queued, queued_bytes) = state.activator().buffered();
    Json(GatewayInfo {
        queued,
        queued_bytes,
        id: state.gateway_id.clone(),
        version: env!("CARGO_PKG_VERSION"),
        nodes: state
            .activator()
            .scheduler()
            .nodes()
            .iter()
            .map(|n| n.name().to_string())
            .collect(),
    })
}

#[derive(utoipa::ToSchema, Serialize)]
struct NodeList {
    nodes: Vec<crate::scheduler::NodeStatus>,
}

/// `GET /api/v1/nodes`: nodes with their GPUs and Ember's reservations on them.
#[utoipa::path(
    get, operation_id = "list_nodes", path = "/api/v1/nodes", tag = "nodes",
    responses((status = 200, description = "Every node, its GPUs and what Ember holds on them", body = NodeList))
)]
pub async fn list_nodes(State(state): State<AppState>) -> Json<impl Serialize> {
    Json(NodeList {
        nodes: state.activator().scheduler().status(),
    })
}

#[derive(utoipa::ToSchema, Serialize)]
struct FunctionList {
    functions: Vec<FunctionStatus>,
}

/// `GET /api/v1/functions`.
#[utoipa::path(
    get, operation_id = "list_functions", path = "/api/v1/functions", tag = "functions",
    responses((status = 200, description = "Every function and its instances", body = FunctionList))
)]
pub async fn list_functions(State(state): State<AppState>) -> Json<impl Serialize> {
    let functions = state
        .activator()
        .functions()
        .iter()
        .map(|f| state.activator().status(f))
        .collect();
    Json(FunctionList { functions })
}

#[derive(utoipa::ToSchema, Serialize)]
struct FunctionDetail {
    #[serde(flatten)]
    status: FunctionStatus,
    manifest: Manifest,
}

/// `GET /api/v1/functions/{name}`.
#[utoipa::path(
    get, operation_id = "get_function", path = "/api/v1/functions/{name}", tag = "functions", params(("name" = String, Path, description = "The function's name")),
    responses((status = 200, description = "The function, its instances and its manifest", body = FunctionDetail))
)]
pub async fn get_function(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<impl Serialize>, ApiError> {
    let f = state
        .activator()
        .function(&name)
        .ok_or(ApiError::FunctionNotFound(name))?;
    Ok(Json(FunctionDetail {
        status: state.activator().status(&f),
        manifest: (*f.revision().manifest).clone(),
    }))
}

#[derive(utoipa::ToSchema, Serialize)]
#[schema(as = FunctionRemoved)]
struct Removed {
    removed: String,
    containers: usize,
}

/// `DELETE /api/v1/functions/{name}`.
#[utoipa::path(
    delete, operation_id = "delete_function", path = "/api/v1/functions/{name}", tag = "functions", params(("name" = String, Path, description = "The function's name")),
    responses((status = 200, description = "Removed, with the containers it had", body = Removed))
)]
pub async fn delete_function(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<impl Serialize>, ApiError> {
    let containers = state.activator().remove(&name).await?;
    Ok(Json(Removed {
        removed: name,
        containers,
    }))
}
