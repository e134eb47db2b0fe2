//! `/fn/NAME/...`: the invoke route. Finds the function, refuses oversized bodies up
//! front, gets a permit from the activator (waiting through a cold start if need be) and
//! hands the request to the proxy.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, Request};
use axum::response::Response;

use super::error::ApiError;
use super::AppState;
use crate::proxy::ProxyError;

/// Handles `/fn/{name}` and `/fn/{name}/{*rest}`.
pub async fn invoke(
    State(state): State<AppState>,
    Path(params): Path<Vec<(String, String)>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    req: Request<Body>,
) -> Result<Response, ApiError> {
    let name = params
        .iter()
        .find(|(k, _)| k == "name")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let f = state
        .activator
        .function(&name)
        .ok_or_else(|| ApiError::FunctionNotFound(name.clone()))?;
    let manifest = f.revision().manifest.clone();
    let limit = manifest.request.max_body.as_u64();
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|len| len > limit) {
        return Err(ApiError::BodyTooLarge { limit });
    }
    let path_and_query = upstream_path(&name, req.uri());
    // A request without a body can be sent again if its instance turns out to be dead
    // before it was sent at all (connection refused): nothing reached the function.
    let replay = http_body::Body::is_end_stream(req.body()).then(|| {
        let mut copy = Request::new(Body::empty());
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.headers_mut() = req.headers().clone();
        copy
    });
    let mut req = req;
    let mut replay = replay;
    loop {
        let permit = state.activator.acquire(&f, announced).await?;
        let (node, container, instance) = (
            permit.node().clone(),
            permit.container_id().to_string(),
            permit.instance().to_string(),
        );
        let result = state
            .proxy
            .forward(
                permit,
                req,
                &path_and_query,
                Some(client),
                limit,
                manifest.request.timeout,
            )
            .await;
        match result {
            Err(e @ ProxyError::Upstream { connect: true, .. }) => {
                tracing::warn!(function = %name, node = %node.name(), container = %container, error = %e, "instance unreachable; retiring it");
                state.activator.retire_unreachable(&f, &instance);
                match replay.take() {
                    Some(again) => req = again,
                    None => return Err(e.into()),
                }
            }
            other => return other.map_err(Into::into),
        }
    }
}

/// The path and query the instance sees: the part after `/fn/NAME`, raw (still
/// percent-encoded), with `/` when empty.
pub fn upstream_path(name: &str, uri: &axum::http::Uri) -> String {
    let prefix_len = "/fn/".len() + name.len();
    let rest = uri.path().get(prefix_len..).unwrap_or("");
    let rest = if rest.is_empty() { "/" } else { rest };
    match uri.query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_path_keeps_the_rest_and_the_query() {
        let uri = |s: &str| s.parse::<axum::http::Uri>().unwrap();
        assert_eq!(upstream_path("echo", &uri("/fn/echo")), "/");
        assert_eq!(upstream_path("echo", &uri("/fn/echo/")), "/");
        assert_eq!(
            upstream_path("echo", &uri("/fn/echo/a/b?x=1&y=%20")),
            "/a/b?x=1&y=%20"
        );
        assert_eq!(upstream_path("echo", &uri("/fn/echo?q")), "/?q");
        assert_eq!(upstream_path("e", &uri("/fn/e/%2F")), "/%2F");
    }
}
