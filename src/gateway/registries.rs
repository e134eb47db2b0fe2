//! `/api/v1/registries`: the logins pulls use (`ember registry login HOST`), by registry
//! host. A password goes in and never comes out: listings show hosts, user names and
//! dates; the password reaches a node only inside its pull call, and no answer or log line
//! holds one.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::secrets::bad;
use super::AppState;
use crate::runtime::registry_host;
use crate::store::{now_ms, RegistryRecord};

/// Largest login request.
pub const MAX_LOGIN_BYTES: usize = 64 * 1024;

/// A login, as sent.
#[derive(utoipa::ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
#[schema(as = RegistryCredentials)]
pub struct Login {
    username: String,
    password: String,
}

/// The registry's name as images spell it (`docker.io` for Docker Hub's aliases), or why
/// `host` is none.
fn registry_name(host: &str) -> Result<String, ApiError> {
    let ok = !host.is_empty()
        && host.len() <= 255
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    if !ok {
        return Err(bad(
            "host",
            format!("`{host}` is not a registry host like `ghcr.io` or `127.0.0.1:5000`"),
        ));
    }
    if !crate::runtime::names_registry(&format!("{host}/x")) {
        return Err(bad(
            "host",
            format!("`{host}` names no registry: an image `{host}/NAME` is a Docker Hub repository; use the registry's full host name (with a dot or a port), or `docker.io`"),
        ));
    }
    // Named as images name it: `HOST/x` has `HOST` as its registry (Docker Hub's aliases
    // are one).
    Ok(registry_host(&format!("{host}/x")).to_string())
}

#[derive(utoipa::ToSchema, Serialize)]
#[schema(as = RegistryStored)]
struct Stored {
    host: String,
    username: String,
    created: bool,
}

/// `PUT /api/v1/registries/{host}` with `{"username","password"}`.
#[utoipa::path(
    put, operation_id = "registry_login", path = "/api/v1/registries/{host}", tag = "access",
    params(("host" = String, Path, description = "The registry's host (and port)")),
    request_body = Login,
    responses(
        (status = 201, description = "Stored", body = Stored),
        (status = 200, description = "Replaced", body = Stored),
    )
)]
pub async fn login(
    State(state): State<AppState>,
    Path(host): Path<String>,
    Json(login): Json<Login>,
) -> Result<Response, ApiError> {
    let host = registry_name(&host)?;
    if login.username.is_empty() || login.username.contains(['\n', '\0']) {
        return Err(bad("username", "must be non-empty, on one line".into()));
    }
    if login.password.is_empty() || login.password.contains('\0') {
        return Err(bad(
            "password",
            "must be non-empty (pipe it in: `ember registry login HOST --username U --password-stdin`)".into(),
        ));
    }
    let store = state.activator().store();
    let created = store.registry(&host)?.is_none();
    store
        .put_registry(&RegistryRecord {
            host: host.clone(),
            username: login.username.clone(),
            password: login.password,
            updated_ms: now_ms(),
        })
        .await?;
    tracing::info!(registry = %host, username = %login.username, "registry login stored");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let body = Stored {
        host,
        username: login.username,
        created,
    };
    Ok((status, Json(body)).into_response())
}

#[derive(utoipa::ToSchema, Serialize)]
pub struct RegistryInfo {
    host: String,
    username: String,
    updated_ms: u64,
}

#[derive(utoipa::ToSchema, Serialize)]
pub struct RegistryList {
    registries: Vec<RegistryInfo>,
}

/// `GET /api/v1/registries`: hosts, user names, dates; never a password.
#[utoipa::path(
    get, operation_id = "list_registries", path = "/api/v1/registries", tag = "access",
    responses((status = 200, description = "Registry logins (never a password)", body = RegistryList))
)]
pub async fn list(State(state): State<AppState>) -> Result<Json<RegistryList>, ApiError> {
    let logins: Vec<RegistryInfo> = state
        .activator()
        .store()
        .registries()
        .await?
        .into_iter()
        .map(|r| RegistryInfo {
            host: r.host,
            username: r.username,
            updated_ms: r.updated_ms,
        })
        .collect();
    Ok(Json(RegistryList { registries: logins }))
}

/// `DELETE /api/v1/registries/{host}`.
#[utoipa::path(
    delete, operation_id = "registry_logout", path = "/api/v1/registries/{host}", tag = "access",
    params(("host" = String, Path, description = "The registry's host (and port)")),
    responses((status = 200, description = "Removed", body = super::openapi::Removal))
)]
pub async fn logout(
    State(state): State<AppState>,
    Path(host): Path<String>,
) -> Result<Json<super::openapi::Removal>, ApiError> {
    let host = registry_name(&host)?;
    let store = state.activator().store();
    if store.registry(&host)?.is_none() {
        return Err(ApiError::RegistryNotFound(host));
    }
    store.delete_registry(&host).await?;
    tracing::info!(registry = %host, "registry login removed");
    Ok(Json(super::openapi::Removal { removed: host }))
}
