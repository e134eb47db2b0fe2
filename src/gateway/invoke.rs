//! `/fn/NAME/...`: the invoke route, a thin layer over the invoke core (or, with
//! `Prefer: respond-async`, a job's submission: see jobs.rs). The function comes
//! found and admitted (`auth::Admitted`: its access rule met, Ember's credential taken
//! out); the request, with the path after `/fn/NAME`, goes to `Invoker::call`, and errors
//! become responses.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::Request;
use axum::response::Response;

use super::auth::Admitted;
use super::error::ApiError;
use super::AppState;
use crate::invoke::{strip_prefix, Call};

/// Handles `/fn/{name}` and `/fn/{name}/{*rest}`.
#[utoipa::path(
    method(get, post, put, delete, patch), operation_id = "invoke", path = "/fn/{name}/{rest}", tags = ["invoke", "proxied"], security((), ("bearer" = []), ("ember_key" = [])),
    params(
        ("name" = String, Path, description = "The function's name"),
        ("rest" = String, Path, description = "The path the function is sent, after /fn/NAME"),
        ("prefer" = Option<String>, Header, description = "`respond-async`: submit a job instead (202)"),
    ),
    responses(
        (status = 200, description = "The function's answer: its status, headers and body"),
        (status = 202, description = "With `Prefer: respond-async`: the job, stored", body = crate::store::JobRecord),
    )
)]
pub async fn invoke(
    State(state): State<AppState>,
    Admitted(f): Admitted,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    mut req: Request<Body>,
) -> Result<Response, ApiError> {
    let path = strip_prefix(route_prefix_len(req.uri().path()), req.uri());
    if super::jobs::prefers_async(req.headers()) {
        return super::jobs::submit_request(&state, &f, path, req).await;
    }
    set_path(&mut req, &path)?;
    let call = Call {
        request: req,
        client: Some(client),
        route: None,
        any_instance: false,
        warm_only: false,
    };
    Ok(state.invoker.call(&f, call).await?)
}

/// Points the request at `path` (with its query), the path and query an instance sees.
pub(super) fn set_path(req: &mut Request<Body>, path: &str) -> Result<(), ApiError> {
    *req.uri_mut() = path.parse().map_err(|_| ApiError::BadRequest {
        code: crate::model::ErrorCode::BadRequest,
        message: format!("`{path}` is not a path a function can be sent"),
        details: Vec::new(),
    })?;
    Ok(())
}

/// The length of `/fn/NAME` in the raw path (NAME may be percent-encoded there).
fn route_prefix_len(path: &str) -> usize {
    let rest = path.get("/fn/".len()..).unwrap_or("");
    "/fn/".len() + rest.find('/').unwrap_or(rest.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_is_cut_from_the_raw_path_even_when_the_name_is_encoded() {
        assert_eq!(route_prefix_len("/fn/echo"), "/fn/echo".len());
        assert_eq!(route_prefix_len("/fn/echo/a/b"), "/fn/echo".len());
        let uri: axum::http::Uri = "/fn/%65cho/x?y=1".parse().unwrap();
        assert_eq!(strip_prefix(route_prefix_len(uri.path()), &uri), "/x?y=1");
    }
}
