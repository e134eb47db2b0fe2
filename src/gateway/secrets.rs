//! `/api/v1/secrets`: set, list and remove the secrets manifests name in `env`
//! (`HF_TOKEN = { secret = "hf" }`). A value goes in and never comes out: listings show
//! names, dates and the functions that use them; values reach containers only through a
//! node's start call, and no answer or log line holds one.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::error::ApiError;
use super::AppState;
use crate::manifest::check_secret_name;
use crate::model::{ErrorCode, FieldError};
use crate::store::{now_ms, SecretRecord};

/// Largest secret value.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;

/// A 400 `bad_request` at `field`.
pub(super) fn bad(field: &str, message: String) -> ApiError {
    ApiError::BadRequest {
        code: ErrorCode::BadRequest,
        message: format!("{field}: {message}"),
        details: vec![FieldError {
            field: field.into(),
            message,
        }],
    }
}

/// The functions whose current manifest names secret `name`.
fn users(state: &AppState, name: &str) -> Vec<String> {
    let mut users: Vec<String> = state
        .activator()
        .functions()
        .iter()
        .filter(|f| {
            let m = &f.revision().manifest;
            m.named_secrets().iter().any(|(_, s)| *s == name)
        })
        .map(|f| f.name().to_string())
        .collect();
    users.sort();
    users
}

#[derive(utoipa::ToSchema, Serialize)]
#[schema(as = SecretSet)]
struct Set {
    name: String,
    created: bool,
}

/// `PUT /api/v1/secrets/{name}` with the value as the body (UTF-8, at most 64 KiB).
#[utoipa::path(
    put, operation_id = "set_secret", path = "/api/v1/secrets/{name}", tag = "access",
    params(("name" = String, Path, description = "The secret's name")),
    request_body(content((String = "text/plain"), ([u8] = "application/octet-stream")), description = "The value (UTF-8, at most 64 KiB)"),
    responses(
        (status = 201, description = "Set", body = Set),
        (status = 200, description = "Replaced", body = Set),
    )
)]
pub async fn set_secret(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_secret_name(&name).map_err(|m| bad("name", m))?;
    let Ok(value) = String::from_utf8(body.to_vec()) else {
        return Err(bad(
            "value",
            "is not UTF-8 text; an environment variable holds text (base64-encode binary values)"
                .into(),
        ));
    };
    if value.is_empty() || value.contains('\0') {
        return Err(bad(
            "value",
            "must be non-empty text without NUL bytes (pipe it in: `printf %s VALUE | ember secret set NAME`)".into(),
        ));
    }
    let _one_at_a_time = state.secrets_lock.lock().await;
    let store = state.activator().store();
    let existing = store.secret(&name)?;
    let now = now_ms();
    let record = SecretRecord {
        name: name.clone(),
        value,
        created_ms: existing.as_ref().map_or(now, |e| e.created_ms),
        updated_ms: now,
    };
    store.put_secret(&record).await?;
    tracing::info!(secret = %name, "secret set");
    let created = existing.is_none();
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(Set { name, created })).into_response())
}

#[derive(utoipa::ToSchema, Serialize)]
struct SecretInfo {
    name: String,
    created_ms: u64,
    updated_ms: u64,
    /// Functions whose manifest names it.
    used_by: Vec<String>,
}

#[derive(utoipa::ToSchema, Serialize)]
struct SecretList {
    secrets: Vec<SecretInfo>,
}

/// `GET /api/v1/secrets`: names, dates and users; never a value.
#[utoipa::path(
    get, operation_id = "list_secrets", path = "/api/v1/secrets", tag = "access",
    responses((status = 200, description = "Every secret and its users (never a value)", body = SecretList))
)]
pub async fn list_secrets(State(state): State<AppState>) -> Result<Json<impl Serialize>, ApiError> {
    let secrets = state.activator().store().secrets().await?;
    let secrets = secrets
        .into_iter()
        .map(|s| SecretInfo {
            used_by: users(&state, &s.name),
            name: s.name,
            created_ms: s.created_ms,
            updated_ms: s.updated_ms,
        })
        .collect();
    Ok(Json(SecretList { secrets }))
}

/// `DELETE /api/v1/secrets/{name}`: refused while a function's manifest names it.
#[utoipa::path(
    delete, operation_id = "remove_secret", path = "/api/v1/secrets/{name}", tag = "access",
    params(("name" = String, Path, description = "The secret's name")),
    responses((status = 200, description = "Removed", body = super::openapi::Removal))
)]
pub async fn remove_secret(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<super::openapi::Removal>, ApiError> {
    let _one_at_a_time = state.secrets_lock.lock().await;
    let store = state.activator().store();
    if store.secret(&name)?.is_none() {
        return Err(ApiError::SecretNotFound(name));
    }
    let used_by = users(&state, &name);
    if !used_by.is_empty() {
        return Err(ApiError::SecretInUse { name, used_by });
    }
    store.delete_secret(&name).await?;
    tracing::info!(secret = %name, "secret removed");
    Ok(Json(super::openapi::Removal { removed: name }))
}

/// The field errors of a manifest naming secrets that are not set.
pub fn missing_secrets(
    state: &AppState,
    manifest: &crate::manifest::Manifest,
) -> Result<Vec<FieldError>, ApiError> {
    let store = state.activator().store();
    let mut missing = Vec::new();
    for (field, secret) in manifest.named_secrets() {
        if store.secret(secret)?.is_none() {
            missing.push(FieldError {
                field,
                message: format!(
                    "no secret `{secret}` is set: set it first with `ember secret set {secret}` (the value on stdin)"
                ),
            });
        }
    }
    Ok(missing)
}
