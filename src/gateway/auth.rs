//! Who may call which route: the one place the gateway checks credentials.
//!
//! Every route follows a [`Rule`], decided by [`rule`] from the route as the router writes
//! it: the control API (`/api/v1/...`) wants the admin token or an admin key, checked by
//! the [`guard`] middleware before any handler runs; `/fn/...` follows the function's own
//! `[access]` rule, checked by the [`Admitted`] extractor once the function is found and
//! before the request waits in its queue; a few routes are open. Routes not named in
//! [`rule`] are admin-only, so a new route is closed until someone opens it.
//!
//! The admin token lives in `DATA_DIR/admin.token` (mode 0600, made on the first start)
//! and in memory only as its hash; keys live hashed in the store. Presented secrets are
//! compared in constant time and never logged; a refusal is logged with the caller's
//! address and the route, and answered 401 with a message saying which credential was
//! expected and how to get one.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{header, Extensions, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::ApiError;
use super::AppState;
use crate::access::{self, Scope};
use crate::activator::Function;
use crate::store::{KeyRecord, Store, StoreError};

/// The credential a route asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// None.
    Open,
    /// The admin token or an admin key.
    Admin,
    /// Whatever the function's `[access]` asks (see [`Admitted`]).
    Function,
}

/// The rule of a route, as written in the router (`/api/v1/nodes/{name}/{action}`).
/// Everything not named here is admin-only.
pub fn rule(route: &str) -> Rule {
    match route {
        // The API's description holds no secret: integrators generate clients from it.
        "/healthz" | super::openapi::PATH => Rule::Open,
        // Agents prove themselves with a join token or their node credential, which
        // these handlers check.
        "/api/v1/nodes/join" | crate::node::tunnel::TUNNEL_PATH => Rule::Open,
        r if r.starts_with("/fn/") => Rule::Function,
        // The OpenAI-compatible front door: each handler finds the model's function and
        // checks its rule (`admit`).
        r if r.starts_with("/v1/") => Rule::Function,
        // The ComfyUI front door: each handler checks its function's rule (`admit_as`).
        r if r.starts_with("/comfy/") => Rule::Function,
        // A job's submission, record, result and cancel follow its function's rule (the
        // handlers check it); listing, retrying and purging are the admin's.
        "/api/v1/functions/{name}/jobs"
        | "/api/v1/jobs/{id}"
        | "/api/v1/jobs/{id}/result"
        | "/api/v1/jobs/{id}/events"
        | "/api/v1/jobs/{id}/cancel" => Rule::Function,
        _ => Rule::Admin,
    }
}

/// Who a presented secret belongs to.
#[derive(Debug, Clone, PartialEq)]
pub enum Caller {
    /// The gateway's admin token.
    AdminToken,
    /// A key made with `ember keys create`.
    Key(KeyRecord),
}

impl Caller {
    fn allows_admin(&self) -> bool {
        match self {
            Caller::AdminToken => true,
            Caller::Key(k) => k.scope.allows_admin(),
        }
    }

    fn allows_invoke(&self, function: &str) -> bool {
        match self {
            Caller::AdminToken => true,
            Caller::Key(k) => k.scope.allows_invoke(function),
        }
    }
}

/// Why a request was refused (for the log and the message; never the secret itself).
#[derive(Debug, Clone, PartialEq)]
enum Refusal {
    /// It presented no credential.
    Missing,
    /// What it presented is neither the admin token nor a key (or a revoked one).
    Unknown,
    /// A valid key without the right scope.
    OutOfScope { key: String, scope: Scope },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Missing => write!(f, "no credential"),
            Refusal::Unknown => write!(f, "unknown or revoked credential"),
            Refusal::OutOfScope { key, scope } => write!(f, "key `{key}` ({scope})"),
        }
    }
}

/// The gateway's credentials: the admin token's hash and the store's keys. Cheap to clone.
#[derive(Clone)]
pub struct Auth {
    admin_hash: Arc<str>,
    token_file: Arc<Path>,
    store: Store,
    /// Serialises key creations so two cannot take one name. Held across the store write
    /// on purpose: creations are rare, and the check and the write must be one step.
    key_names: Arc<tokio::sync::Mutex<()>>,
}

impl Auth {
    /// Reads the admin token from `data_dir`, making it on the first start, and says
    /// where it is in the log (never what it is).
    pub fn load(data_dir: &Path, store: Store) -> anyhow::Result<Auth> {
        let path = data_dir.join(access::ADMIN_TOKEN_FILE);
        let (token, made) = access::admin_token(&path)
            .with_context(|| format!("cannot read or make the admin token {}", path.display()))?;
        let path = std::fs::canonicalize(&path).unwrap_or(path);
        if made {
            tracing::info!(file = %path.display(), "made the admin token; `ember` commands run from this directory find it, elsewhere `ember login GATEWAY_URL --token TOKEN` saves it");
        } else {
            tracing::info!(file = %path.display(), "admin token");
        }
        if access::readable_by_others(&path) {
            tracing::warn!(file = %path.display(), "the admin token file can be read by other users; `chmod 600` it");
        }
        Ok(Auth {
            admin_hash: access::hash_secret(&token).into(),
            token_file: path.into(),
            store,
            key_names: Arc::default(),
        })
    }

    /// Who `secret` belongs to, if anyone. Read from the store on every call, so a
    /// revoked key fails on its very next request.
    pub fn identify(&self, secret: &str) -> Result<Option<Caller>, StoreError> {
        let hash = access::hash_secret(secret);
        if access::same_secret(&hash, &self.admin_hash) {
            return Ok(Some(Caller::AdminToken));
        }
        Ok(self
            .store
            .key_by_hash(&hash)?
            .filter(|k| access::same_secret(&hash, &k.hash))
            .map(Caller::Key))
    }

    /// The store, for the key routes.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The lock key creations take (see the field).
    pub fn key_names(&self) -> &tokio::sync::Mutex<()> {
        &self.key_names
    }

    /// The first caller among `presented` that `allowed` accepts, or why none was.
    fn admit(
        &self,
        presented: &[&str],
        allowed: impl Fn(&Caller) -> bool,
    ) -> Result<Result<Caller, Refusal>, StoreError> {
        let mut refusal = Refusal::Missing;
        for secret in presented {
            match self.identify(secret)? {
                Some(caller) if allowed(&caller) => return Ok(Ok(caller)),
                Some(Caller::Key(k)) => {
                    refusal = Refusal::OutOfScope {
                        key: k.name,
                        scope: k.scope,
                    }
                }
                _ if refusal == Refusal::Missing => refusal = Refusal::Unknown,
                _ => {}
            }
        }
        Ok(Err(refusal))
    }

    fn admin_message(&self, refusal: &Refusal) -> String {
        let what = match refusal {
            Refusal::Missing => "the control API needs the admin token".to_string(),
            Refusal::Unknown => {
                "the token sent is not this gateway's admin token nor a key of it".to_string()
            }
            Refusal::OutOfScope { key, .. } => {
                format!(
                    "key `{key}` may only invoke functions; the control API needs the admin token"
                )
            }
        };
        format!(
            "{what}: send `Authorization: Bearer TOKEN` with the token in {} on the gateway's \
             machine (`ember` finds it when run from the directory holding it; elsewhere \
             `ember login GATEWAY_URL --token TOKEN` saves it), or an admin key from \
             `ember keys create --name NAME --admin`",
            self.token_file.display()
        )
    }
}

fn invoke_message(function: &str, refusal: &Refusal) -> String {
    let what = match refusal {
        Refusal::Missing => format!("function `{function}` is private"),
        Refusal::Unknown => format!(
            "function `{function}` is private and the key sent is not a key of this gateway \
             (revoked?)"
        ),
        Refusal::OutOfScope { key, scope } => {
            format!("function `{function}` is private and key `{key}` may not invoke it ({scope})")
        }
    };
    format!(
        "{what}: send an invoke key for it as `Authorization: Bearer KEY` or `X-Ember-Key: KEY`; \
         an admin makes one with `ember keys create --name NAME --invoke {function}`"
    )
}

/// Logs a refusal with the caller's address and the route, and makes its 401.
fn refuse(
    method: &Method,
    route: &str,
    extensions: &Extensions,
    why: &Refusal,
    message: String,
) -> ApiError {
    let client = extensions.get::<ConnectInfo<SocketAddr>>().map_or_else(
        || "unknown".to_string(),
        |ConnectInfo(addr)| addr.to_string(),
    );
    tracing::warn!(%client, %method, route, refused = %why, "unauthorized request");
    ApiError::Unauthorized(message)
}

/// The middleware in front of every route: checks the admin credential of admin routes,
/// before their handlers read anything of the request.
pub async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let matched = req.extensions().get::<MatchedPath>().map(|m| m.as_str());
    let public_metrics = state.metrics_public && matched == Some(super::metrics::PATH);
    let route = matched.map(rule).filter(|_| !public_metrics);
    // Unmatched paths serve nothing but a 404; function routes are checked by `Admitted`.
    if route == Some(Rule::Admin) {
        let presented: Vec<&str> = access::bearer(req.headers()).into_iter().collect();
        match state.auth.admit(&presented, Caller::allows_admin) {
            Ok(Ok(_)) => {}
            Ok(Err(refusal)) => {
                let message = state.auth.admin_message(&refusal);
                let (method, route) = (req.method(), req.uri().path());
                return refuse(method, route, req.extensions(), &refusal, message).into_response();
            }
            Err(e) => return ApiError::from(e).into_response(),
        }
    }
    next.run(req).await
}

/// Checks the admin credential of a request whose route lets functions' callers in too
/// (a job whose function is gone is the admin's alone).
pub fn admit_admin(state: &AppState, parts: &Parts) -> Result<(), ApiError> {
    let presented: Vec<&str> = access::bearer(&parts.headers).into_iter().collect();
    match state.auth.admit(&presented, Caller::allows_admin)? {
        Ok(_) => Ok(()),
        Err(refusal) => {
            let message = state.auth.admin_message(&refusal);
            let route = parts.uri.path();
            Err(refuse(
                &parts.method,
                route,
                &parts.extensions,
                &refusal,
                message,
            ))
        }
    }
}

/// The function's name in `/fn/{name}` and `/fn/{name}/{*rest}`.
#[derive(Deserialize)]
struct FnPath {
    name: String,
}

/// A function the request may invoke: found, its `[access]` rule met, and Ember's
/// credential taken out of the request (`X-Ember-Key` always; `Authorization` too when
/// the function is private, since then it was Ember's and not the function's to see).
/// Runs before the request waits for an instance, so a refused one costs no cold start.
pub struct Admitted(pub Arc<Function>);

impl FromRequestParts<AppState> for Admitted {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let axum::extract::Path(FnPath { name }) =
            axum::extract::Path::<FnPath>::from_request_parts(parts, state)
                .await
                .map_err(|e| ApiError::BadRequest {
                    code: crate::model::ErrorCode::BadRequest,
                    message: format!("the function's name in the path is unusable: {e}"),
                    details: Vec::new(),
                })?;
        let f = state
            .activator()
            .function(&name)
            .ok_or_else(|| ApiError::FunctionNotFound(name.clone()))?;
        admit(state, parts, &f)?;
        Ok(Admitted(f))
    }
}

/// Checks that the request in `parts` may invoke `f` (its `[access]` rule), and takes
/// Ember's credential out of it: `X-Ember-Key` always, `Authorization` too when `f` is
/// private. For routes that find their function in the request (the front doors).
pub fn admit(state: &AppState, parts: &mut Parts, f: &Function) -> Result<(), ApiError> {
    admit_as(state, parts, f).map(|_| ())
}

/// `admit`, saying who was admitted: the key's name, `comfy::ADMIN` for the admin
/// token, `None` for a public function (anyone).
pub fn admit_as(
    state: &AppState,
    parts: &mut Parts,
    f: &Function,
) -> Result<Option<String>, ApiError> {
    let key = parts.headers.remove(access::KEY_HEADER);
    if !f.revision().manifest.access.private {
        return Ok(None);
    }
    let presented = presented_keys(key.as_ref(), &parts.headers);
    let admitted = state
        .auth
        .admit(&presented, |c| c.allows_invoke(f.name()))?;
    parts.headers.remove(header::AUTHORIZATION);
    match admitted {
        Ok(Caller::AdminToken) => Ok(Some(crate::comfy::ADMIN.to_string())),
        Ok(Caller::Key(k)) => Ok(Some(k.name)),
        Err(refusal) => {
            let message = invoke_message(f.name(), &refusal);
            Err(refuse(
                &parts.method,
                parts.uri.path(),
                &parts.extensions,
                &refusal,
                message,
            ))
        }
    }
}

/// Whether the request's credentials may invoke `f`, without changing the request (for
/// listings: a private function's models are shown to those who may call it).
pub fn may_invoke(state: &AppState, headers: &HeaderMap, f: &Function) -> Result<bool, ApiError> {
    if !f.revision().manifest.access.private {
        return Ok(true);
    }
    let key = headers.get(access::KEY_HEADER);
    let presented = presented_keys(key, headers);
    Ok(state
        .auth
        .admit(&presented, |c| c.allows_invoke(f.name()))?
        .is_ok())
}

/// The keys a request offers for a private function: `X-Ember-Key`, then the bearer token.
fn presented_keys<'a>(
    key: Option<&'a header::HeaderValue>,
    headers: &'a HeaderMap,
) -> Vec<&'a str> {
    key.and_then(|v| v.to_str().ok())
        .map(str::trim)
        .into_iter()
        .chain(access::bearer(headers))
        .filter(|s| !s.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_health_and_the_agents_routes_are_open_and_new_routes_are_admin_only() {
        assert_eq!(rule("/healthz"), Rule::Open);
        assert_eq!(rule("/api/v1/nodes/join"), Rule::Open);
        assert_eq!(rule("/api/v1/nodes/tunnel"), Rule::Open);
        assert_eq!(rule("/api/v1/tokens"), Rule::Admin);
        assert_eq!(rule("/api/v1/nodes/{name}"), Rule::Admin);
        assert_eq!(rule("/fn/{name}/{*rest}"), Rule::Function);
        for admin in [
            "/api/v1/functions",
            "/api/v1/nodes/{name}/{action}",
            "/api/v1/keys",
            "/api/v1/gateway",
            "/api/v2/anything-new",
            "/metrics",
        ] {
            assert_eq!(rule(admin), Rule::Admin, "{admin}");
        }
    }

    #[test]
    fn keys_are_read_from_x_ember_key_and_the_bearer_token_without_panicking_on_junk() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer b".parse().unwrap());
        let key: header::HeaderValue = " k ".parse().unwrap();
        assert_eq!(presented_keys(Some(&key), &h), ["k", "b"]);
        let junk = header::HeaderValue::from_bytes(b"\xff\xfe").unwrap();
        h.insert(header::AUTHORIZATION, junk.clone());
        assert!(presented_keys(Some(&junk), &h).is_empty());
        h.insert(header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert!(presented_keys(None, &h).is_empty());
    }

    #[tokio::test]
    async fn the_admin_token_and_keys_are_told_apart_and_revoked_keys_match_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let auth = Auth::load(dir.path(), store.clone()).unwrap();
        let token = std::fs::read_to_string(dir.path().join(access::ADMIN_TOKEN_FILE)).unwrap();
        assert_eq!(
            auth.identify(token.trim()).unwrap(),
            Some(Caller::AdminToken)
        );
        let secret = access::new_secret(access::KEY_PREFIX);
        let record = KeyRecord {
            name: "ci".into(),
            scope: Scope::Invoke {
                functions: vec!["echo".into()],
            },
            hash: access::hash_secret(&secret),
            created_ms: 1,
        };
        store.put_key(&record).await.unwrap();
        let allowed = |c: &Caller| c.allows_invoke("echo");
        assert!(auth.admit(&[&secret], allowed).unwrap().is_ok());
        assert_eq!(
            auth.admit(&["wrong", &secret], Caller::allows_admin)
                .unwrap(),
            Err(Refusal::OutOfScope {
                key: "ci".into(),
                scope: record.scope.clone()
            })
        );
        assert_eq!(auth.admit(&[], allowed).unwrap(), Err(Refusal::Missing));
        store.delete_key("ci").await.unwrap();
        assert_eq!(
            auth.admit(&[&secret], allowed).unwrap(),
            Err(Refusal::Unknown)
        );
    }
}
