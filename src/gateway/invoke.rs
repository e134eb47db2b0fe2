//! `/fn/NAME/...`: the invoke route, a thin layer over the invoke core. It finds the
//! function, hands the request (with the path after `/fn/NAME`) to `Invoker::call`, and
//! lets errors become responses.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::Request;
use axum::response::Response;
use serde::Deserialize;

use super::error::ApiError;
use super::AppState;
use crate::invoke::{strip_prefix, Call};

/// The function's name in `/fn/{name}` and `/fn/{name}/{*rest}`.
#[derive(Deserialize)]
pub struct FnPath {
    name: String,
}

/// Handles `/fn/{name}` and `/fn/{name}/{*rest}`.
pub async fn invoke(
    State(state): State<AppState>,
    Path(FnPath { name }): Path<FnPath>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    mut req: Request<Body>,
) -> Result<Response, ApiError> {
    let f = state
        .activator()
        .function(&name)
        .ok_or_else(|| ApiError::FunctionNotFound(name.clone()))?;
    let path = strip_prefix("/fn/".len() + name.len(), req.uri());
    *req.uri_mut() = path.parse().map_err(|_| ApiError::BadRequest {
        code: crate::model::ErrorCode::UpstreamError,
        message: format!("`{path}` is not a path a function can be sent"),
        details: Vec::new(),
    })?;
    let call = Call {
        request: req,
        client: Some(client),
    };
    Ok(state.invoker.call(&f, call).await?)
}
