//! `/api/v1/keys`: make, list and revoke invoke and admin keys (admin only, like every
//! control route). A key's secret is in the answer that makes it and nowhere else: the
//! store keeps its hash, and listings show names, scopes and dates.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::AppState;
use crate::access::{self, Scope, ANY_FUNCTION};
use crate::model::{ErrorCode, FieldError};
use crate::store::{now_ms, KeyRecord};

/// Largest request body of `POST /api/v1/keys`.
pub const MAX_KEY_REQUEST_BYTES: usize = 64 * 1024;

/// `POST /api/v1/keys`: `{"name": N, "invoke": [FN, ...]}` (`"*"` for every function) or
/// `{"name": N, "admin": true}`.
#[derive(utoipa::ToSchema, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    name: String,
    #[serde(default)]
    invoke: Vec<String>,
    #[serde(default)]
    admin: bool,
}

/// A key as listed: never its secret or hash.
#[derive(utoipa::ToSchema, Serialize)]
struct KeyInfo {
    name: String,
    scope: Scope,
    created_ms: u64,
}

impl From<KeyRecord> for KeyInfo {
    fn from(k: KeyRecord) -> Self {
        KeyInfo {
            name: k.name,
            scope: k.scope,
            created_ms: k.created_ms,
        }
    }
}

#[derive(utoipa::ToSchema, Serialize)]
#[schema(as = KeyCreated)]
struct Created {
    #[serde(flatten)]
    info: KeyInfo,
    /// The secret, shown this once.
    key: String,
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

/// The scope a request asks for, checked: exactly one of `admin` and `invoke`, and
/// function names that could be deployed (they need not be yet).
fn scope_of(new: &NewKey) -> Result<Scope, ApiError> {
    match (new.admin, new.invoke.is_empty()) {
        (true, true) => return Ok(Scope::Admin),
        (true, false) => return Err(bad(
            "invoke",
            "an admin key may invoke every function already; ask for `admin` or `invoke`, not both"
                .into(),
        )),
        (false, true) => {
            return Err(bad(
                "invoke",
                "missing: name the functions the key may invoke (`*` for all), or ask for `admin`"
                    .into(),
            ))
        }
        (false, false) => {}
    }
    if new.invoke.iter().any(|f| f == ANY_FUNCTION) {
        return Ok(Scope::Invoke {
            functions: vec![ANY_FUNCTION.into()],
        });
    }
    let mut functions = new.invoke.clone();
    for f in &functions {
        crate::manifest::check_name(f).map_err(|m| bad("invoke", m))?;
    }
    functions.sort();
    functions.dedup();
    Ok(Scope::Invoke { functions })
}

/// `POST /api/v1/keys`: makes a key and answers its secret, once.
#[utoipa::path(
    post, operation_id = "create_key", path = "/api/v1/keys", tag = "access",
    request_body = NewKey,
    responses((status = 201, description = "The key, shown once", body = Created))
)]
pub async fn create_key(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let new: NewKey = serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest {
        code: ErrorCode::BadRequest,
        message: format!(
            "expected {{\"name\": NAME, \"invoke\": [FUNCTION, ...]}} or {{\"name\": NAME, \"admin\": true}}: {e}"
        ),
        details: Vec::new(),
    })?;
    crate::manifest::check_name(&new.name).map_err(|m| bad("name", m))?;
    let scope = scope_of(&new)?;
    let secret = access::new_secret(access::KEY_PREFIX);
    let record = KeyRecord {
        name: new.name,
        scope,
        hash: access::hash_secret(&secret),
        created_ms: now_ms(),
    };
    {
        let _one_at_a_time = state.auth.key_names().lock().await;
        if state.auth.store().key(&record.name)?.is_some() {
            return Err(ApiError::KeyNameTaken(record.name));
        }
        state.auth.store().put_key(&record).await?;
    }
    tracing::info!(key = %record.name, scope = %record.scope, "key created");
    let created = Created {
        info: record.into(),
        key: secret,
    };
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

#[derive(utoipa::ToSchema, Serialize)]
struct KeyList {
    keys: Vec<KeyInfo>,
}

/// `GET /api/v1/keys`: names, scopes and dates.
#[utoipa::path(
    get, operation_id = "list_keys", path = "/api/v1/keys", tag = "access",
    responses((status = 200, description = "Every key (never the secret)", body = KeyList))
)]
pub async fn list_keys(State(state): State<AppState>) -> Result<Json<impl Serialize>, ApiError> {
    let keys = state.auth.store().keys().await?;
    Ok(Json(KeyList {
        keys: keys.into_iter().map(KeyInfo::from).collect(),
    }))
}

#[derive(utoipa::ToSchema, Serialize)]
#[schema(as = KeyRevoked)]
struct Revoked {
    revoked: String,
}

/// `DELETE /api/v1/keys/{name}`: the key fails from its next request on.
#[utoipa::path(
    delete, operation_id = "revoke_key", path = "/api/v1/keys/{name}", tag = "access",
    params(("name" = String, Path, description = "The key's name")),
    responses((status = 200, description = "Revoked", body = Revoked))
)]
pub async fn revoke_key(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<impl Serialize>, ApiError> {
    if !state.auth.store().delete_key(&name).await? {
        return Err(ApiError::KeyNotFound(name));
    }
    tracing::info!(key = %name, "key revoked");
    Ok(Json(Revoked { revoked: name }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(invoke: &[&str], admin: bool) -> NewKey {
        NewKey {
            name: "k".into(),
            invoke: invoke.iter().map(|s| s.to_string()).collect(),
            admin,
        }
    }

    #[test]
    fn a_key_asks_for_admin_or_for_functions_that_could_exist() {
        assert_eq!(scope_of(&new(&[], true)).unwrap(), Scope::Admin);
        assert_eq!(
            scope_of(&new(&["b", "a", "b"], false)).unwrap(),
            Scope::Invoke {
                functions: vec!["a".into(), "b".into()]
            }
        );
        assert_eq!(
            scope_of(&new(&["a", "*"], false)).unwrap(),
            Scope::Invoke {
                functions: vec!["*".into()]
            }
        );
        assert!(scope_of(&new(&[], false)).is_err());
        assert!(scope_of(&new(&["a"], true)).is_err());
        assert!(scope_of(&new(&["Not_A_Name"], false)).is_err());
    }
}
