//! Every gateway error becomes a response here: a status, a stable error code and a
//! message the user can act on. Internal details go to the log, not to the client.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::activator::{AcquireError, ActivatorError};
use crate::manifest::{FieldError, ManifestError};
use crate::node::NodeError;
use crate::proxy::ProxyError;

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
        code: &'static str,
        /// What was wrong.
        message: String,
        /// Field errors, when the problem is in a document.
        details: Vec<FieldError>,
    },
    /// The request body is over the function's limit.
    #[error("request body is larger than the function's request.max_body ({limit} bytes)")]
    BodyTooLarge {
        /// The limit.
        limit: u64,
    },
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
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    details: Vec<FieldError>,
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, Option<Duration>) {
        use StatusCode as S;
        match self {
            ApiError::FunctionNotFound(_) => (S::NOT_FOUND, "function_not_found", None),
            ApiError::Manifest(_) => (S::BAD_REQUEST, "invalid_manifest", None),
            ApiError::BadRequest { code, .. } => (S::BAD_REQUEST, code, None),
            ApiError::BodyTooLarge { .. } => (S::PAYLOAD_TOO_LARGE, "body_too_large", None),
            ApiError::Acquire(e) => match e {
                AcquireError::QueueFull { .. } => (
                    S::SERVICE_UNAVAILABLE,
                    "queue_full",
                    Some(Duration::from_secs(1)),
                ),
                AcquireError::QueueTimeout { .. } => (S::GATEWAY_TIMEOUT, "queue_timeout", None),
                AcquireError::GatewayFull { .. } => (
                    S::SERVICE_UNAVAILABLE,
                    "gateway_full",
                    Some(Duration::from_secs(1)),
                ),
                AcquireError::StartFailed {
                    status,
                    retry_after,
                    ..
                } => (
                    S::from_u16(*status).unwrap_or(S::BAD_GATEWAY),
                    "start_failed",
                    Some(*retry_after),
                ),
                AcquireError::NoCapacity { .. } => (
                    S::SERVICE_UNAVAILABLE,
                    "no_capacity",
                    Some(Duration::from_secs(1)),
                ),
                AcquireError::Removed(_) => (S::NOT_FOUND, "function_removed", None),
                AcquireError::ShuttingDown => (
                    S::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    Some(Duration::from_secs(1)),
                ),
            },
            ApiError::Proxy(e) => match e {
                ProxyError::BodyTooLarge { .. } => (S::PAYLOAD_TOO_LARGE, "body_too_large", None),
                ProxyError::Timeout { .. } => (S::GATEWAY_TIMEOUT, "upstream_timeout", None),
                ProxyError::Upstream { .. } => (S::BAD_GATEWAY, "upstream_error", None),
            },
            ApiError::Node(e) if e.is_image_missing() => (S::BAD_REQUEST, "image_not_found", None),
            ApiError::Node(_) => (S::SERVICE_UNAVAILABLE, "node_error", None),
            ApiError::Activator(ActivatorError::NotFound(_)) => {
                (S::NOT_FOUND, "function_not_found", None)
            }
            ApiError::Activator(_) => (S::INTERNAL_SERVER_ERROR, "internal", None),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, retry_after) = self.parts();
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, "internal error");
            "internal error; the gateway's log has the details".to_string()
        } else {
            self.to_string()
        };
        let details = match &self {
            ApiError::Manifest(e) => e.field_errors(),
            ApiError::BadRequest { details, .. } => details.clone(),
            _ => Vec::new(),
        };
        let mut response = (
            status,
            Json(ErrorBody {
                error: ErrorDetail {
                    code,
                    message,
                    details,
                },
            }),
        )
            .into_response();
        if let Some(after) = retry_after {
            let secs = crate::activator::round_up_secs(after).as_secs();
            if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_failed_start_keeps_its_status_and_rounds_retry_after_up() {
        let r = ApiError::from(AcquireError::StartFailed {
            function: "f".into(),
            message: "container exited".into(),
            status: 502,
            retry_after: Duration::from_millis(1500),
        })
        .into_response();
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
    }
}
