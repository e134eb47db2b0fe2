//! Axum's own refusals, in Ember's error body. A request the router or an extractor
//! refuses before a handler runs (a method the route does not take, a body that is not
//! the JSON it must be, a query that does not parse, a body over the route's limit) gets
//! axum's plain-text answer; on the control API this layer rewrites it as
//! `{"error": {"code", "message"}}` with the same status, as every other error there is,
//! so clients (and the OpenAPI document) see one error shape. It wraps the control
//! routes alone (`control.rs`): answers that pass a function's through (`/fn/`, the front
//! doors, a job's result) never meet it.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body_util::BodyExt;

use crate::model::{ErrorBody, ErrorCode};

/// The most of a refusal's text kept as the message.
const MAX_MESSAGE: usize = 4096;

/// The middleware.
pub async fn json_errors(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let response = next.run(req).await;
    let status = response.status();
    if !status.is_client_error() || is_json(&response) {
        return response;
    }
    let (mut head, body) = response.into_parts();
    let text = match body.collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(_) => String::new(),
    };
    let (code, message) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => (
            ErrorCode::BodyTooLarge,
            format!("the body is over this route's limit: {}", text.trim()),
        ),
        StatusCode::METHOD_NOT_ALLOWED => (
            ErrorCode::BadRequest,
            format!(
                "this route does not take {method}; its `Allow` header lists the methods it takes"
            ),
        ),
        _ => (ErrorCode::BadRequest, text.trim().to_string()),
    };
    let mut message = message;
    if message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    head.headers.remove(header::CONTENT_LENGTH);
    head.headers.remove(header::CONTENT_TYPE);
    let rewritten = (status, Json(ErrorBody::new(code, message))).into_response();
    let (new_head, body) = rewritten.into_parts();
    head.headers.extend(new_head.headers);
    Response::from_parts(head, Body::new(body))
}

fn is_json(r: &Response) -> bool {
    r.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"))
}
