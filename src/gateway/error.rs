//! Every gateway error becomes a response here, and only here: an HTTP status, a stable
//! error code (`model::ErrorCode`) and a message the user can act on, in the one error
//! body of `model::ErrorBody`. Internal details (addresses, the engine's or hyper's words)
//! go to the log, not to the client.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::activator::{round_up_secs, AcquireError, ActivatorError};
use crate::invoke::InvokeError;
use crate::manifest::ManifestError;
use crate::membership::MembershipError;
use crate::model::{error_chain, ErrorBody, ErrorCode, FieldError};
use crate::node::volumes::VolumeError;
use crate::node::NodeError;
use crate::proxy::ProxyError;
use crate::store::StoreError;

/// An error answered to an HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No function of that name.
    #[error("function `{0}` is not deployed; `ember ls` lists the deployed ones")]
    FunctionNotFound(String),
    /// The manifest was refused.
    #[error("{0}")]
    Manifest(#[from] ManifestError),
    /// Something else in the request was wrong.
    #[error("{message}")]
    BadRequest {
        /// Stable code.
        code: ErrorCode,
        /// What was wrong.
        message: String,
        /// Field errors, when the problem is in a document.
        details: Vec<FieldError>,
    },
    /// Not a node action.
    #[error("`{0}` is not a node action: cordon, uncordon or drain")]
    UnknownAction(String),
    /// No instance for the request.
    #[error(transparent)]
    Acquire(#[from] AcquireError),
    /// Forwarding failed.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// A node operation failed.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The activator failed outside the request path.
    #[error(transparent)]
    Activator(#[from] ActivatorError),
    /// A node's join or report, or an operator's node action, failed.
    #[error(transparent)]
    Membership(#[from] MembershipError),
    /// A missing or wrong credential; the message says which one was expected and how
    /// to get it.
    #[error("{0}")]
    Unauthorized(String),
    /// A key of that name exists.
    #[error("a key named `{0}` exists already; pick another name, or revoke it first with `ember keys revoke {0}`")]
    KeyNameTaken(String),
    /// No key of that name.
    #[error("no key named `{0}`; `ember keys ls` lists the keys")]
    KeyNotFound(String),
    /// No secret of that name.
    #[error("no secret named `{0}`; `ember secret ls` lists the secrets")]
    SecretNotFound(String),
    /// Functions name the secret.
    #[error("secret `{name}` is used by {}; deploy them without it (or remove them) first", .used_by.join(", "))]
    SecretInUse {
        /// The secret.
        name: String,
        /// The functions whose manifest names it.
        used_by: Vec<String>,
    },
    /// No login for that registry.
    #[error("no login stored for registry `{0}`; `ember registry ls` lists them")]
    RegistryNotFound(String),
    /// The function has no `[comfyui]` section.
    #[error("function `{0}` is not a ComfyUI function: add a `[comfyui]` section to its manifest (and `concurrency = 1` in `[scale]`), or call it at /fn/{0}/")]
    NotComfyUi(String),
    /// The gateway's own files (the ComfyUI front door's uploads and outputs) failed:
    /// a full or broken disk under the data dir.
    #[error("the gateway cannot keep the file (its data dir failed; the log says why)")]
    Files(#[source] std::io::Error),
    /// An instance's answer could not be read.
    #[error("{0}")]
    UpstreamRead(String),
    /// No job of that id.
    #[error("no job `{0}`; job ids are the `id` a submission answered")]
    JobNotFound(String),
    /// The job has no result yet.
    #[error("job `{id}` is {state}: it has no result until it ends; `GET /api/v1/jobs/{id}` shows where it is")]
    JobNotFinished {
        /// The job.
        id: String,
        /// Where it is.
        state: String,
    },
    /// The job's result is past its retention.
    #[error("job `{0}` ended longer ago than its result is kept (`serve --job-results-keep`, 24 h by default); its record stays")]
    JobResultGone(String),
    /// A job's change (cancel, retry) was refused.
    #[error(transparent)]
    JobChange(#[from] crate::jobs::ChangeError),
    /// A job submission was refused.
    #[error(transparent)]
    Job(#[from] crate::jobs::JobError),
    /// The state store failed outside the activator (keys, credentials).
    #[error("the state store failed")]
    Store(#[from] StoreError),
}

impl From<InvokeError> for ApiError {
    fn from(e: InvokeError) -> Self {
        match e {
            InvokeError::Acquire(e) => ApiError::Acquire(e),
            InvokeError::Proxy(e) => ApiError::Proxy(e),
        }
    }
}

/// The status, code and Retry-After of each error.
pub(super) fn parts(e: &ApiError) -> (StatusCode, ErrorCode, Option<Duration>) {
    use ErrorCode as C;
    use StatusCode as S;
    let soon = Some(Duration::from_secs(1));
    match e {
        ApiError::FunctionNotFound(_) => (S::NOT_FOUND, C::FunctionNotFound, None),
        ApiError::JobNotFound(_) => (S::NOT_FOUND, C::JobNotFound, None),
        ApiError::JobNotFinished { .. } => (S::CONFLICT, C::JobNotFinished, None),
        ApiError::JobResultGone(_) => (S::GONE, C::JobResultExpired, None),
        ApiError::JobChange(crate::jobs::ChangeError::NotFound(_)) => {
            (S::NOT_FOUND, C::JobNotFound, None)
        }
        ApiError::JobChange(crate::jobs::ChangeError::Conflict { .. }) => {
            (S::CONFLICT, C::JobStateConflict, None)
        }
        ApiError::JobChange(crate::jobs::ChangeError::Store(_)) => {
            (S::INTERNAL_SERVER_ERROR, C::Internal, None)
        }
        ApiError::Job(
            crate::jobs::JobError::BadPath(_)
            | crate::jobs::JobError::Callback(_)
            | crate::jobs::JobError::NotJson { .. },
        ) => (S::BAD_REQUEST, C::BadRequest, None),
        ApiError::Job(crate::jobs::JobError::KeyReused { .. }) => {
            (S::UNPROCESSABLE_ENTITY, C::IdempotencyKeyReused, None)
        }
        ApiError::Job(crate::jobs::JobError::Store(_)) => {
            (S::SERVICE_UNAVAILABLE, C::Internal, None)
        }
        ApiError::Manifest(_) => (S::BAD_REQUEST, C::InvalidManifest, None),
        ApiError::BadRequest { code, .. } => (S::BAD_REQUEST, *code, None),
        ApiError::UnknownAction(_) => (S::NOT_FOUND, C::UnknownAction, None),
        ApiError::Acquire(e) => {
            let status = crate::invoke::acquire_status(e);
            match e {
                AcquireError::QueueFull { .. } => (status, C::QueueFull, soon),
                AcquireError::QueueTimeout { .. } => (status, C::QueueTimeout, None),
                AcquireError::GatewayFull { .. } => (status, C::GatewayFull, soon),
                AcquireError::StartFailed { retry_after, .. } => {
                    (status, C::StartFailed, Some(*retry_after))
                }
                AcquireError::NoCapacity { .. } => (status, C::NoCapacity, soon),
                AcquireError::Removed(_) => (status, C::FunctionRemoved, None),
                AcquireError::ShuttingDown => (status, C::ShuttingDown, soon),
            }
        }
        ApiError::Proxy(e) => {
            let status = crate::invoke::proxy_status(e);
            match e {
                ProxyError::BodyTooLarge { .. } => (status, C::BodyTooLarge, None),
                ProxyError::Timeout { .. } => (status, C::UpstreamTimeout, None),
                ProxyError::Upstream { .. } => (status, C::UpstreamError, None),
            }
        }
        ApiError::Node(e) if e.is_image_missing() => (S::BAD_REQUEST, C::ImageNotFound, None),
        ApiError::Node(NodeError::Volume(VolumeError::Missing(_) | VolumeError::BadName(_))) => {
            (S::NOT_FOUND, C::VolumeNotFound, None)
        }
        ApiError::Node(NodeError::Volume(VolumeError::BadPath(_))) => {
            (S::BAD_REQUEST, C::InvalidPath, None)
        }
        ApiError::Node(_) => (S::SERVICE_UNAVAILABLE, C::NodeError, None),
        ApiError::Activator(ActivatorError::NotFound(_)) => {
            (S::NOT_FOUND, C::FunctionNotFound, None)
        }
        ApiError::Activator(ActivatorError::InstanceNotFound { .. }) => {
            (S::NOT_FOUND, C::InstanceNotFound, None)
        }
        ApiError::Activator(ActivatorError::ModelClaimed { .. }) => {
            (S::CONFLICT, C::ModelTaken, None)
        }
        ApiError::Activator(_) => (S::INTERNAL_SERVER_ERROR, C::Internal, None),
        ApiError::Membership(e) => match e {
            MembershipError::BadToken | MembershipError::BadCredential(_) => {
                (S::UNAUTHORIZED, C::Unauthorized, None)
            }
            MembershipError::NodeRemoved(_) => (S::UNAUTHORIZED, C::NodeRemoved, None),
            MembershipError::NodeExists(_) => (S::CONFLICT, C::NodeNameTaken, None),
            MembershipError::UnknownNode(_) => (S::NOT_FOUND, C::NodeNotFound, None),
            MembershipError::BadRegistration(_) => (S::BAD_REQUEST, C::BadRegistration, None),
            MembershipError::NameTaken(_) => (S::CONFLICT, C::NodeNameTaken, None),
            MembershipError::Store(_) => (S::INTERNAL_SERVER_ERROR, C::Internal, None),
        },
        ApiError::Unauthorized(_) => (S::UNAUTHORIZED, C::Unauthorized, None),
        ApiError::NotComfyUi(_) => (S::NOT_FOUND, C::FunctionNotFound, None),
        ApiError::UpstreamRead(_) => (S::BAD_GATEWAY, C::UpstreamError, None),
        ApiError::Files(_) => (S::INTERNAL_SERVER_ERROR, C::Internal, None),
        ApiError::KeyNameTaken(_) => (S::CONFLICT, C::KeyNameTaken, None),
        ApiError::KeyNotFound(_) => (S::NOT_FOUND, C::KeyNotFound, None),
        ApiError::SecretNotFound(_) => (S::NOT_FOUND, C::SecretNotFound, None),
        ApiError::RegistryNotFound(_) => (S::NOT_FOUND, C::RegistryNotFound, None),
        ApiError::SecretInUse { .. } => (S::CONFLICT, C::SecretInUse, None),
        ApiError::Store(_) => (S::INTERNAL_SERVER_ERROR, C::Internal, None),
    }
}

impl ApiError {
    /// What the client reads. Errors that carry a node's or an instance's internals are
    /// logged in full and answered with a message of Ember's own.
    pub(super) fn public_message(&self, status: StatusCode) -> String {
        match self {
            _ if status == StatusCode::INTERNAL_SERVER_ERROR => {
                tracing::error!(error = %error_chain(self), "internal error");
                "internal error; the gateway's log has the details".into()
            }
            ApiError::Proxy(ProxyError::Upstream {
                instance, connect, ..
            }) => {
                tracing::warn!(error = %error_chain(self), "upstream failed");
                let what = if *connect {
                    "could not be reached"
                } else {
                    "broke the connection before it answered"
                };
                format!("the function's instance {instance} {what}; retry the request")
            }
            ApiError::Node(e) => {
                tracing::warn!(error = %error_chain(e), "node call failed");
                e.public_message()
            }
            other => other.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, retry_after) = parts(&self);
        let message = self.public_message(status);
        let details = match &self {
            ApiError::Manifest(e) => e.field_errors(),
            ApiError::BadRequest { details, .. } => details.clone(),
            ApiError::Activator(ActivatorError::ModelClaimed { field, .. }) => vec![FieldError {
                field: field.clone(),
                message: self.to_string(),
            }],
            _ => Vec::new(),
        };
        let body = ErrorBody::new(code, message).with_details(details);
        let mut response = (status, Json(body)).into_response();
        if let Some(after) = retry_after {
            let secs = round_up_secs(after).as_secs().max(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"ember\""),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activator::StartFault;

    #[test]
    fn a_full_queue_answers_503_with_retry_after() {
        let r = ApiError::from(AcquireError::QueueFull {
            function: "f".into(),
            capacity: 1,
        })
        .into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn a_crashing_container_answers_502_and_a_failing_node_503_rounding_retry_after_up() {
        let failed = |fault| {
            ApiError::from(AcquireError::StartFailed {
                function: "f".into(),
                message: "container exited".into(),
                fault,
                retry_after: Duration::from_millis(1500),
            })
            .into_response()
        };
        let r = failed(StartFault::Container);
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        assert_eq!(
            failed(StartFault::Platform).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[tokio::test]
    async fn a_refused_credential_answers_401_with_the_bearer_challenge_and_the_error_body() {
        use http_body_util::BodyExt;
        let r = ApiError::Unauthorized("send the admin token".into()).into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            r.headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"ember\""
        );
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let body: ErrorBody = serde_json::from_slice(&body).unwrap();
        assert_eq!(body.error.code, ErrorCode::Unauthorized);
        assert_eq!(body.error.message, "send the admin token");
    }

    #[tokio::test]
    async fn upstream_failures_keep_addresses_out_of_the_answer() {
        use http_body_util::BodyExt;
        let r = ApiError::from(ProxyError::Upstream {
            instance: "abc".into(),
            endpoint: "172.17.0.9:8080".parse().unwrap(),
            reason: "connection reset by peer".into(),
            connect: false,
        })
        .into_response();
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let body: ErrorBody = serde_json::from_slice(&body).unwrap();
        assert_eq!(body.error.code, ErrorCode::UpstreamError);
        assert!(body.error.message.contains("instance abc"));
        assert!(
            !body.error.message.contains("172.17"),
            "{}",
            body.error.message
        );
    }
}
