//! The `serve` process: wiring, routes, and shutdown.
//!
//! `run` opens the store, connects the embedded node to Docker, restores state (adopting
//! running containers), starts the reaper, and serves HTTP until the shutdown token is
//! cancelled. Routes: `/fn/NAME/...` (invoke.rs), `/api/v1/functions` (api.rs; logs.rs),
//! `/api/v1/images` (images.rs), `/api/v1/keys` (keys.rs), `/api/v1/secrets`
//! (secrets.rs), `/api/v1/volumes` and node volume files (volumes.rs), the OpenAI-compatible
//! `/v1/...` (openai/), the ComfyUI front door `/comfy/NAME/...` (comfy/), `/metrics`
//! (metrics.rs), `/api/v1/invocations` and `/api/v1/usage` (history.rs), `/healthz`. Who may call which route is decided in auth.rs; errors
//! become responses in error.rs.

mod api;
pub mod auth;
mod comfy;
mod control;
pub mod error;
mod history;
mod images;
mod invoke;
mod jobs;
mod keys;
mod listener;
mod logs;
mod metrics;
mod nodes;
mod openai;
pub mod openapi;
mod registries;
mod rejection;
mod secrets;
mod volumes;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::routing::{any, get};
use axum::Router;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::activator::{Activator, Limits};
use crate::config::{ServeConfig, TlsMode};
use crate::gpu::GpuMonitor;
use crate::invoke::Invoker;
use crate::membership::{Membership, Timing};
use crate::node::volumes::NodeVolumes;
use crate::node::{LocalNode, Node};
use crate::proxy::Proxy;
use crate::runtime::{ContainerRuntime, DockerRuntime};
use crate::scheduler::Scheduler;
use crate::store::Store;
use crate::tls::ServerIdentity;
use listener::ConnectionLimits;

/// How long shutdown waits for in-flight requests and background tasks.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What every handler gets: one `Arc`, so that the clone each request and each
/// middleware makes is one reference count, not one per field (cloning and dropping the
/// fields, two strings among them, were 1.5 % of the gateway's CPU samples on the warm
/// path).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The gateway's state behind [`AppState`].
pub struct Shared {
    invoker: Invoker,
    gateway_id: String,
    membership: Arc<Membership>,
    /// The pin of the gateway's CA, when it serves HTTPS.
    ca_pin: Option<String>,
    auth: auth::Auth,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// Orders secret changes against deploys that check them.
    secrets_lock: Arc<tokio::sync::Mutex<()>>,
    /// The ComfyUI front door's queue, sockets and files.
    comfy: crate::comfy::ComfyDoor,
    /// Whether `/metrics` answers without the admin token (`--metrics-public`).
    metrics_public: bool,
    /// Durable jobs.
    jobs: crate::jobs::Jobs,
}

impl Shared {
    fn activator(&self) -> &Activator {
        self.invoker.activator()
    }
}

/// A server-sent event stream's response: its content type, and no caching or buffering
/// by a proxy in front (nginx passes each event on at once).
fn event_stream(body: axum::body::Body) -> axum::response::Response {
    use axum::http::{header, HeaderValue};
    let mut response = axum::response::Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// The gateway's routes, each behind the credential `auth::rule` gives it.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(api::health))
        .route(openapi::PATH, get(openapi::serve))
        .route(metrics::PATH, get(metrics::metrics))
        .route("/fn/{name}", any(invoke::invoke))
        .route("/fn/{name}/", any(invoke::invoke))
        .route("/fn/{name}/{*rest}", any(invoke::invoke))
        // A job's result passes the function's answer through, whatever it is.
        .route("/api/v1/jobs/{id}/result", get(jobs::result))
        .merge(control::routes().layer(axum::middleware::from_fn(rejection::json_errors)))
        .merge(openai::routes())
        .merge(comfy::routes())
        .layer(axum::middleware::from_fn(history::tag))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::guard,
        ))
        .with_state(state)
}

/// Runs the gateway until `shutdown` is cancelled.
pub async fn run(config: ServeConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (store, gateway_id) = open_store(&config).await?;
    let auth = auth::Auth::load(&config.data_dir, store.clone())?;
    let nodes = embedded_node(&config, &gateway_id).await?;
    let tracker = TaskTracker::new();
    let retention = crate::history::Retention {
        max: config.history_max,
        max_age: config.history_max_age,
    };
    let history = crate::history::History::start(store.clone(), retention);
    let activator = Activator::new(
        Scheduler::new(nodes, config.placement, config.gpu_max_sharers),
        store,
        tracker.clone(),
        shutdown.clone(),
        Limits {
            max_queued: config.max_queued,
            max_queued_bytes: config.max_queued_bytes.as_u64(),
        },
        history,
    );
    let timing = Timing {
        node_timeout: config.node_timeout,
        heartbeat: config.heartbeat_interval,
    };
    let membership = Membership::load(
        activator.clone(),
        config.join_token.clone(),
        gateway_id.clone(),
        timing,
    )
    .await?;
    let membership = Arc::new(membership);
    activator.scheduler().refresh().await;
    for node in activator.scheduler().status() {
        tracing::info!(node = %node.name, gpus = node.gpus.len(), source = %node.gpu_source, driver = %node.gpu_driver, "node inventory");
    }
    activator.restore().await?;
    spawn_loops(&tracker, &activator, &membership, &shutdown);
    let tls = tls_identity(&config)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    // One plain line on stdout for scripts and tests; the log goes to stderr.
    println!("ember gateway listening on {scheme}://{addr}");
    tracing::info!(%addr, gateway = %gateway_id, data_dir = %config.data_dir.display(), node = %config.node_name, "gateway listening");
    tracing::info!("deploy a function with `ember deploy functions/echo --gateway http://{addr}`, then `curl -d hi http://{addr}/fn/echo/`");
    let invoker = Invoker::new(activator, Proxy::new(tracker.clone(), shutdown.clone()));
    let comfy = crate::comfy::ComfyDoor::new(
        invoker.clone(),
        invoker.activator().store().clone(),
        &config.data_dir,
        tracker.clone(),
        shutdown.clone(),
    )
    .with_context(|| {
        format!(
            "cannot make the ComfyUI front door's files under {}",
            config.data_dir.display()
        )
    })?;
    comfy.start().await?;
    let keep = crate::jobs::Keep {
        bodies: config.job_results_keep,
        records: config.history_max_age.max(config.job_results_keep),
    };
    let jobs = crate::jobs::Jobs::new(
        invoker.clone(),
        keep,
        config.callback_allow.clone(),
        tracker.clone(),
        shutdown.clone(),
    );
    jobs.start().await?;
    let comfy_listener = match (config.comfyui_listen, &config.comfyui_function) {
        (Some(addr), Some(function)) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--comfyui-listen)"))?;
            let local = listener.local_addr()?;
            tracing::info!(addr = %local, %function, "ComfyUI listener: point ComfyUI clients at http://{local}");
            Some((listener, function.clone()))
        }
        _ => None,
    };
    let state = AppState(Arc::new(Shared {
        invoker,
        gateway_id,
        membership,
        ca_pin: tls.as_ref().map(|t| t.pin.clone()),
        auth,
        tracker,
        shutdown,
        secrets_lock: Arc::default(),
        comfy,
        metrics_public: config.metrics_public,
        jobs,
    }));
    let limits = ConnectionLimits {
        header_timeout: config.header_timeout,
        max_connections: config.max_connections,
    };
    serve_until(listener, comfy_listener, tls, limits, state).await;
    Ok(())
}

/// Opens the data dir's store and reads the gateway's id from it.
async fn open_store(config: &ServeConfig) -> anyhow::Result<(Store, String)> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create the data dir {}", config.data_dir.display()))?;
    let store = Store::open(&config.data_dir).with_context(|| {
        format!(
            "cannot open the state in {} (is another `ember serve` using it?)",
            config.data_dir.display()
        )
    })?;
    let gateway_id = store.gateway_id().await?;
    Ok((store, gateway_id))
}

/// The embedded node on the local Docker engine, unless `--no-local-node`.
async fn embedded_node(
    config: &ServeConfig,
    gateway_id: &str,
) -> anyhow::Result<Vec<Arc<dyn Node>>> {
    if config.no_local_node {
        return Ok(Vec::new());
    }
    let runtime: Arc<dyn ContainerRuntime> = Arc::new(DockerRuntime::connect().await?);
    runtime.ping().await?;
    let (monitor, driver) = GpuMonitor::setup(config.gpu_inventory.as_deref(), config.gpu_driver)?;
    let node = LocalNode::new(
        config.node_name.clone(),
        gateway_id,
        config.node_address,
        runtime,
    )
    .with_gpus(monitor, driver)
    .with_endpoints(config.node_endpoints)
    .with_volumes(NodeVolumes::new(&config.data_dir, config.volumes.clone()));
    Ok(vec![Arc::new(node)])
}

/// The background loops: node liveness, GPU inventories, the reaper.
fn spawn_loops(
    tracker: &TaskTracker,
    activator: &Activator,
    membership: &Arc<Membership>,
    shutdown: &CancellationToken,
) {
    tracker.spawn(
        membership
            .clone()
            .run(shutdown.clone())
            .instrument(tracing::info_span!("membership")),
    );
    tracker.spawn(
        refresh_inventory(activator.clone(), shutdown.clone())
            .instrument(tracing::info_span!("inventory")),
    );
    tracker.spawn(
        crate::activator::run_reaper(activator.clone(), shutdown.clone())
            .instrument(tracing::info_span!("reaper")),
    );
}

/// The TLS identity the settings ask for, if any; its pin goes to the log.
fn tls_identity(config: &ServeConfig) -> anyhow::Result<Option<ServerIdentity>> {
    let identity = match (&config.tls, &config.tls_cert, &config.tls_key) {
        (Some(TlsMode::SelfSigned), _, _) => {
            let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
            if !config.listen.ip().is_unspecified() {
                names.push(config.listen.ip().to_string());
            }
            names.extend(config.tls_san.iter().cloned());
            names.dedup();
            ServerIdentity::self_signed(&config.data_dir.join("tls"), &names)?
        }
        (None, Some(cert), Some(key)) => ServerIdentity::from_pem_files(cert, key)?,
        _ => return Ok(None),
    };
    tracing::info!(pin = %identity.pin, "serving HTTPS; agents and clients trust it with --ca-pin");
    Ok(Some(identity))
}

/// Serves HTTP until shutdown, then answers waiting requests, lets in-flight ones and
/// background tasks finish within `SHUTDOWN_GRACE`, and warns if the grace runs out.
async fn serve_until(
    listener: tokio::net::TcpListener,
    comfy_listener: Option<(tokio::net::TcpListener, String)>,
    tls: Option<ServerIdentity>,
    limits: ConnectionLimits,
    state: AppState,
) {
    let (tracker, shutdown) = (state.tracker.clone(), state.shutdown.clone());
    let activator = state.activator().clone();
    let membership = state.membership.clone();
    let acceptor = tls.map(|t| tokio_rustls::TlsAcceptor::from(t.config));
    if let Some((comfy_listener, function)) = comfy_listener {
        // Every route there is the function's: its handler checks the function's rule.
        let app = comfy::root_routes(function)
            .layer(axum::middleware::from_fn(history::tag))
            .with_state(state.clone());
        tracker.spawn(
            listener::serve(
                comfy_listener,
                acceptor.clone(),
                app,
                limits,
                shutdown.clone(),
                tracker.clone(),
            )
            .instrument(tracing::info_span!("comfyui")),
        );
    }
    let serving = tracker.spawn(
        listener::serve(
            listener,
            acceptor,
            router(state),
            limits,
            shutdown.clone(),
            tracker.clone(),
        )
        .instrument(tracing::info_span!("http")),
    );
    shutdown.cancelled().await;
    activator.shut_down_queues();
    tracing::info!("shutting down; running containers are kept and adopted at the next start");
    tracker.close();
    // Requests in flight may run through agents' tunnels: those close last.
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let _ = serving.await;
        tracker.wait().await;
    })
    .await;
    membership.close_tunnels().await;
    activator.history().close().await;
    if drained.is_err() {
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "shutdown grace period ran out; exiting with work in flight");
    }
    if let Err(e) = activator.store().flush().await {
        tracing::error!(error = %e, "the state store did not flush at shutdown");
    }
}

/// How often node GPU inventories are read.
pub const INVENTORY_INTERVAL: Duration = Duration::from_secs(2);

async fn refresh_inventory(activator: Activator, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(INVENTORY_INTERVAL) => {}
        }
        for node in activator.scheduler().refresh().await {
            let gpus = node.gpus().await;
            activator.drop_missing_gpus(node.name(), &gpus);
        }
    }
}

/// Cancels `token` on SIGINT or SIGTERM.
pub async fn cancel_on_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let term = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("signal received");
    token.cancel();
}
