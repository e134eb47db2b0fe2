//! The front door's errors in OpenAI's shape, `{"error":{"message","type","param",
//! "code"}}`, with the statuses OpenAI clients act on: a full queue is 429 and a start
//! failure 503, both with a `Retry-After` of at most 120 s (the official client does not
//! retry above that); a model only scaled to zero is never 404. `code` is Ember's stable
//! error code (`queue_full`, `model_not_found`, ...).

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::request::BodyError;
use crate::activator::{round_up_secs, AcquireError};
use crate::gateway::error::{parts, ApiError};
use crate::model::ErrorCode;

/// Longest `Retry-After` sent: the official OpenAI client does not retry above it.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

/// An error answered by the front door.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    /// Any error of the gateway's.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// No function serves the model.
    #[error("the model `{model}` does not exist; the models here are: {}", known_list(.known))]
    ModelNotFound {
        /// The id asked for.
        model: String,
        /// The ids the caller may use.
        known: Vec<String>,
    },
    /// The body's model could not be read.
    #[error(transparent)]
    Body(#[from] BodyError),
    /// The body is over what the front door buffers.
    #[error("the body is over the {limit} bytes the OpenAI front door reads; send larger bodies to the function at /fn/NAME/...")]
    BodyTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The body could not be read from the client.
    #[error("the request body could not be read: {0}")]
    BodyRead(String),
}

fn known_list(known: &[String]) -> String {
    if known.is_empty() {
        "none (deploy a function with an `[openai]` section)".into()
    } else {
        known.join(", ")
    }
}

/// OpenAI's error `type` for a status.
fn kind(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    }
}

impl IntoResponse for FrontError {
    fn into_response(self) -> Response {
        let (status, code, retry_after, param, message) = match &self {
            FrontError::Api(e) => {
                let (status, code, retry_after) = parts(e);
                let status = match e {
                    ApiError::Acquire(AcquireError::QueueFull { .. })
                    | ApiError::Acquire(AcquireError::GatewayFull { .. }) => {
                        StatusCode::TOO_MANY_REQUESTS
                    }
                    ApiError::Acquire(AcquireError::StartFailed { .. }) => {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                    _ => status,
                };
                (status, code, retry_after, None, e.public_message(status))
            }
            FrontError::ModelNotFound { .. } => (
                StatusCode::NOT_FOUND,
                ErrorCode::ModelNotFound,
                None,
                Some("model"),
                self.to_string(),
            ),
            FrontError::Body(e) => {
                let param =
                    matches!(e, BodyError::NoModel | BodyError::ModelNotString).then_some("model");
                let status = StatusCode::BAD_REQUEST;
                (status, ErrorCode::BadRequest, None, param, self.to_string())
            }
            FrontError::BodyTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::BodyTooLarge,
                None,
                None,
                self.to_string(),
            ),
            FrontError::BodyRead(_) => (
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                None,
                None,
                self.to_string(),
            ),
        };
        let body = json!({"error": {
            "message": message,
            "type": kind(status),
            "param": param,
            "code": code.as_str(),
        }});
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(after) = retry_after {
            let secs = round_up_secs(after.min(MAX_RETRY_AFTER)).as_secs().max(1);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
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

    async fn body(r: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn a_full_queue_is_429_and_a_failed_start_503_with_retry_after_capped_at_120s() {
        let full = FrontError::from(ApiError::from(AcquireError::QueueFull {
            function: "f".into(),
            capacity: 1,
        }))
        .into_response();
        assert_eq!(full.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(full.headers()[header::RETRY_AFTER], "1");
        let b = body(full).await;
        assert_eq!(b["error"]["type"], "rate_limit_error");
        assert_eq!(b["error"]["code"], "queue_full");
        assert!(b["error"]["param"].is_null());

        let failed = FrontError::from(ApiError::from(AcquireError::StartFailed {
            function: "f".into(),
            message: "the container exited".into(),
            fault: StartFault::Container,
            retry_after: Duration::from_secs(600),
        }))
        .into_response();
        assert_eq!(failed.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(failed.headers()[header::RETRY_AFTER], "120");
        assert_eq!(body(failed).await["error"]["type"], "server_error");
    }

    #[tokio::test]
    async fn an_unknown_model_is_404_listing_the_known_ones() {
        let r = FrontError::ModelNotFound {
            model: "gpt-5".into(),
            known: vec!["a".into(), "b".into()],
        }
        .into_response();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let b = body(r).await;
        assert_eq!(b["error"]["code"], "model_not_found");
        assert_eq!(b["error"]["param"], "model");
        let message = b["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("`gpt-5`") && message.contains("a, b"),
            "{message}"
        );
    }
}
