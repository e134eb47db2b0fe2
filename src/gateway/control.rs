//! The control API's routes (`/api/v1/...`): functions, nodes, keys, secrets, registries,
//! images, volumes, jobs, history. Their refusals all answer Ember's error body: axum's
//! own (a bad JSON body or query, a method the route does not take, a body over its limit)
//! are rewritten by [`super::rejection`], which wraps these routes alone, not the invoke
//! path or the front doors, whose answers are the function's.

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post, put};
use axum::Router;

use super::AppState;
use super::{api, history, images, jobs, keys, logs, nodes, registries, secrets, volumes};

/// The routes, each behind the credential `auth::rule` gives it.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/gateway", get(api::gateway_info))
        .route("/api/v1/nodes", get(api::list_nodes))
        .route("/api/v1/nodes/join", post(nodes::join))
        .route(crate::node::tunnel::TUNNEL_PATH, get(nodes::tunnel))
        .route("/api/v1/nodes/{name}", delete(nodes::remove))
        .route("/api/v1/nodes/{name}/{action}", post(nodes::act))
        .route("/api/v1/volumes", get(volumes::list_volumes))
        .route(
            "/api/v1/nodes/{node}/volumes/{volume}/files/{*path}",
            put(volumes::put_file).layer(DefaultBodyLimit::disable()),
        )
        .route("/api/v1/tokens", post(nodes::create_token))
        .route("/api/v1/functions", get(api::list_functions))
        .route("/api/v1/functions/{name}/logs", get(logs::logs))
        .route(
            "/api/v1/functions/{name}",
            put(api::put_function)
                .get(api::get_function)
                .delete(api::delete_function)
                .layer(DefaultBodyLimit::max(api::MAX_MANIFEST_BYTES)),
        )
        .route(
            "/api/v1/images",
            get(images::get_image)
                .post(images::build_image)
                .layer(DefaultBodyLimit::max(images::MAX_CONTEXT_BYTES)),
        )
        .route(
            "/api/v1/images/pull",
            post(images::pull_image).layer(DefaultBodyLimit::max(api::MAX_MANIFEST_BYTES)),
        )
        .route(
            "/api/v1/keys",
            get(keys::list_keys)
                .post(keys::create_key)
                .layer(DefaultBodyLimit::max(keys::MAX_KEY_REQUEST_BYTES)),
        )
        .route("/api/v1/keys/{name}", delete(keys::revoke_key))
        .route("/api/v1/registries", get(registries::list))
        .route(
            "/api/v1/registries/{host}",
            put(registries::login)
                .delete(registries::logout)
                .layer(DefaultBodyLimit::max(registries::MAX_LOGIN_BYTES)),
        )
        .route("/api/v1/secrets", get(secrets::list_secrets))
        .route(
            "/api/v1/secrets/{name}",
            put(secrets::set_secret)
                .delete(secrets::remove_secret)
                .layer(DefaultBodyLimit::max(secrets::MAX_SECRET_BYTES)),
        )
        .route(
            "/api/v1/functions/{name}/jobs",
            post(jobs::submit).layer(DefaultBodyLimit::disable()),
        )
        .route("/api/v1/jobs", get(jobs::list))
        .route("/api/v1/jobs/{id}", get(jobs::get))
        .route("/api/v1/jobs/{id}/events", get(jobs::events))
        .route("/api/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/api/v1/jobs/{id}/retry", post(jobs::retry))
        .route("/api/v1/functions/{name}/queue", get(jobs::queue))
        .route("/api/v1/functions/{name}/queue/purge", post(jobs::purge))
        .route("/api/v1/invocations", get(history::invocations))
        .route("/api/v1/usage", get(history::usage))
}
