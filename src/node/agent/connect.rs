//! CONNECT over the tunnel: the gateway opens a stream to one of the node's containers,
//! and the agent splices it to a TCP connection to that container. A CONNECT is accepted
//! only to the endpoint of a container Ember manages on this node: the tunnel is never an
//! open relay into the node's network. The managed endpoints are read from the engine and
//! trusted for `ALLOWED_FOR` at most; a miss reads them again, and stopping or pausing a
//! container forgets them (server.rs), so an address a stopped container left (and
//! another container took) is never reached through a stale list.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::TokioIo;
use tokio_util::task::TaskTracker;
use tower_service::Service;
use tracing::Instrument;

use crate::node::{LocalNode, Node};

/// How long a list of managed endpoints is trusted.
const ALLOWED_FOR: Duration = Duration::from_secs(1);

/// The endpoints of the node's managed containers, as last read.
#[derive(Default)]
pub(super) struct Allowed {
    /// When the read that produced `endpoints` began.
    read_at: Option<Instant>,
    /// When a container last stopped or paused: a list read before is stale.
    forgotten_at: Option<Instant>,
    endpoints: HashSet<SocketAddr>,
}

impl Allowed {
    /// Whether a read that began at `t` is newer than everything known.
    fn newer(&self, t: Instant) -> bool {
        self.read_at.is_none_or(|r| r < t) && self.forgotten_at.is_none_or(|f| f < t)
    }
}

/// The allow-list shared by the CONNECT path and the control routes that change it.
pub(super) type SharedAllowed = Arc<Mutex<Allowed>>;

pub(super) fn forget(allowed: &SharedAllowed) {
    allowed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .forgotten_at = Some(Instant::now());
}

/// What the tunnel serves: CONNECT streams to the node's containers, and the node API.
#[derive(Clone)]
pub(super) struct TunnelService {
    app: Router,
    node: Arc<LocalNode>,
    allowed: SharedAllowed,
    tracker: TaskTracker,
}

impl TunnelService {
    pub(super) fn new(
        app: Router,
        node: Arc<LocalNode>,
        allowed: SharedAllowed,
        tracker: TaskTracker,
    ) -> TunnelService {
        TunnelService {
            app,
            node,
            allowed,
            tracker,
        }
    }

    /// Answers one request of the tunnel.
    pub(super) async fn call<B>(mut self, req: Request<B>) -> Result<Response, Infallible>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>,
    {
        if req.method() == Method::CONNECT {
            return Ok(self.connect(req).await);
        }
        self.app.call(req.map(Body::new)).await
    }

    /// Opens a stream to a managed container's endpoint and splices it to the CONNECT
    /// stream once the gateway's side is upgraded.
    async fn connect<B>(&self, mut req: Request<B>) -> Response {
        let target = req
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
        let Some(target) = target else {
            return refuse(StatusCode::BAD_REQUEST, "CONNECT needs ip:port");
        };
        if !self.is_managed_endpoint(target).await {
            tracing::warn!(%target, "refused a CONNECT to an address that is no container of this node");
            return refuse(
                StatusCode::FORBIDDEN,
                "not the endpoint of a managed container",
            );
        }
        let tcp = match crate::node::connect_tcp(target).await {
            Ok(s) => s,
            Err(e) => return refuse(StatusCode::BAD_GATEWAY, &e.to_string()),
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        self.tracker.spawn(
            async move {
                let Ok(upgraded) = on_upgrade.await else {
                    return;
                };
                let mut upgraded = TokioIo::new(upgraded);
                let mut tcp = tcp;
                if let Err(e) = tokio::io::copy_bidirectional(&mut upgraded, &mut tcp).await {
                    tracing::debug!(error = %e, "a container stream ended with an error");
                }
            }
            .instrument(tracing::debug_span!("stream", %target)),
        );
        StatusCode::OK.into_response()
    }

    /// Whether `target` is where a container Ember manages here answers: from a list read
    /// within `ALLOWED_FOR`, else from a fresh one (kept unless a newer read landed first).
    async fn is_managed_endpoint(&self, target: SocketAddr) -> bool {
        {
            let allowed = self.allowed.lock().unwrap_or_else(|e| e.into_inner());
            let fresh = allowed.read_at.is_some_and(|t| {
                t.elapsed() < ALLOWED_FOR && allowed.forgotten_at.is_none_or(|f| f < t)
            });
            if fresh && allowed.endpoints.contains(&target) {
                return true;
            }
        }
        let began = Instant::now();
        let Ok(containers) = self.node.list_managed().await else {
            return false;
        };
        let endpoints: HashSet<_> = containers.into_iter().filter_map(|c| c.endpoint).collect();
        let managed = endpoints.contains(&target);
        let mut allowed = self.allowed.lock().unwrap_or_else(|e| e.into_inner());
        if allowed.newer(began) {
            allowed.read_at = Some(began);
            allowed.endpoints = endpoints;
        }
        managed
    }
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, why.to_string()).into_response()
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use tower_service::Service;

    use super::*;
    use crate::node::agent::server::router;
    use crate::node::local::Endpoints;
    use crate::node::wire::NodeInfo;
    use crate::runtime::fake::FakeRuntime;
    use crate::runtime::{ContainerInfo, LABEL_PORT};

    fn info() -> NodeInfo {
        NodeInfo {
            protocol: 1,
            name: "n1".into(),
            labels: Default::default(),
            gpu_driver: crate::gpu::GpuDriver::Simulated,
            gpu_source: "none".into(),
            gpus: Vec::new(),
            volumes: Vec::new(),
        }
    }

    fn container(id: &str, host_port: u16) -> ContainerInfo {
        ContainerInfo {
            id: id.into(),
            labels: [(LABEL_PORT.to_string(), "8080".to_string())].into(),
            running: true,
            paused: false,
            exit_code: None,
            status: "running".into(),
            host_port: Some(host_port),
            ip: None,
        }
    }

    /// The status a CONNECT to `target` gets (403: refused by the allow-list).
    async fn connect_status(service: &TunnelService, target: &str) -> StatusCode {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(target)
            .body(Body::empty())
            .unwrap();
        service.clone().call(req).await.unwrap().status()
    }

    #[tokio::test]
    async fn connects_reach_only_managed_containers_and_never_a_stopped_ones_address() {
        // A port nothing listens on: an allowed CONNECT gets as far as dialing (502).
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let runtime = Arc::new(FakeRuntime::default());
        runtime
            .containers
            .lock()
            .unwrap()
            .push(container("c1", port));
        let node = Arc::new(
            LocalNode::new("n1", "gw", IpAddr::V4(Ipv4Addr::LOCALHOST), runtime.clone())
                .with_endpoints(Endpoints::Published),
        );
        let allowed = SharedAllowed::default();
        let app = router(node.clone(), info(), allowed.clone());
        let service = TunnelService::new(app.clone(), node, allowed, TaskTracker::new());
        let target = format!("127.0.0.1:{port}");

        assert_eq!(
            connect_status(&service, &target).await,
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            connect_status(&service, "127.0.0.1:1").await,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            connect_status(&service, "10.0.0.1:80").await,
            StatusCode::FORBIDDEN
        );

        // Stopped: its address is refused at once, within the list's lifetime.
        let stop = Request::delete("/node/v1/containers/c1")
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            app.clone().call(stop).await.unwrap().status(),
            StatusCode::OK
        );
        assert_eq!(
            connect_status(&service, &target).await,
            StatusCode::FORBIDDEN
        );

        // A container that appears is reachable without waiting for the list to age.
        runtime
            .containers
            .lock()
            .unwrap()
            .push(container("c2", port));
        assert_eq!(
            connect_status(&service, &target).await,
            StatusCode::BAD_GATEWAY
        );
        // One that vanishes behind Ember's back is refused once the list aged.
        runtime.containers.lock().unwrap().clear();
        tokio::time::sleep(ALLOWED_FOR + Duration::from_millis(50)).await;
        assert_eq!(
            connect_status(&service, &target).await,
            StatusCode::FORBIDDEN
        );
    }
}
