//! Forwarding one request to one instance and streaming the answer back.
//!
//! A hyper client per node, pooled over the streams the node hands out (`Node::connect`),
//! sends the request (method, path, query, headers, body, all streamed) to the instance;
//! the response body is streamed back as it comes, and carries the activator's permit so
//! the instance's slot is freed only when the last byte has gone out or the client has
//! gone away. Request bodies over `max_body` are cut off and reported as such, whether or
//! not the client announced their length. A request whose connection could not be made
//! keeps its body (`body::Reclaim`), so the invoke core can send it to another instance.
//! A WebSocket upgrade is passed through and spliced (`upgrade.rs`), holding the permit
//! while the socket is open.

mod body;
mod direct;
mod upgrade;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use body::PermitBody;
pub use body::{LimitedBody, Reclaim, ReclaimableBody};
pub use direct::{InstanceSocket, MAX_SOCKET_MESSAGE};
pub use upgrade::UpgradeRequest;

use crate::activator::Permit;
use crate::model::error_chain;
use crate::node::{Node, NodeConnector, NodeError};
use crate::text::{dotted, socket_addr_v4};

/// Idle pooled connections to instances are closed after this.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why forwarding failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request body went over the function's limit while streaming.
    #[error("request body is larger than the function's request.max_body ({limit} bytes)")]
    BodyTooLarge {
        /// The limit.
        limit: u64,
    },
    /// The instance did not start answering within the request timeout.
    #[error("function did not answer within {} (request.timeout)", humantime::format_duration(*after))]
    Timeout {
        /// The timeout.
        after: Duration,
    },
    /// The instance could not be reached or broke the connection.
    #[error("instance {instance} at {endpoint} failed: {reason}")]
    Upstream {
        /// Instance id.
        instance: String,
        /// Its endpoint.
        endpoint: SocketAddr,
        /// What went wrong.
        reason: String,
        /// Whether the connection could not even be made (the instance may be dead).
        connect: bool,
    },
}

type NodeClient = Client<NodeConnector, LimitedBody>;

/// The pooled client of each node, by name, with the node it was made for.
type NodeClients = HashMap<String, (Arc<dyn Node>, NodeClient)>;

/// The forwarding client: one pooled HTTP/1 client per node, and the WebSockets it
/// splices. Cheap to clone.
#[derive(Clone, Default)]
pub struct Proxy {
    clients: Arc<RwLock<NodeClients>>,
    /// Where WebSocket splices run.
    tracker: TaskTracker,
    /// Closes every open WebSocket.
    shutdown: CancellationToken,
}

impl Proxy {
    /// A proxy whose WebSockets run on `tracker` and close when `shutdown` is cancelled.
    pub fn new(tracker: TaskTracker, shutdown: CancellationToken) -> Proxy {
        Proxy {
            clients: Arc::default(),
            tracker,
            shutdown,
        }
    }

    /// The pooled client over `node`'s streams, made on first use.
    fn client(&self, node: &Arc<dyn Node>) -> NodeClient {
        let same = |(known, _): &(Arc<dyn Node>, NodeClient)| {
            std::ptr::addr_eq(Arc::as_ptr(known), Arc::as_ptr(node))
        };
        if let Some(entry) = self
            .clients
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(node.name())
            .filter(|e| same(e))
        {
            return entry.1.clone();
        }
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(1024)
            .build(NodeConnector::new(node.clone()));
        self.clients
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.name().to_string(), (node.clone(), client.clone()));
        client
    }
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the few names there (standard names
    // compare without hashing) spares eight hashed removals per message.
    let hop = |name: &HeaderName| HOP_BY_HOP.contains(name) || name == header::TRANSFER_ENCODING;
    if !headers.keys().any(hop) {
        return;
    }
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

/// What the proxy needs to know of one request besides its head and body.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest body the function takes.
    pub max_body: u64,
    /// How long the function may take to start answering.
    pub timeout: Duration,
}

/// Why a forward failed.
#[derive(Debug)]
pub enum ForwardError {
    /// Nothing reached the instance: no connection to it could be made. The permit comes
    /// back, so the caller can take the instance out of service before its slot could go
    /// to another request.
    Undelivered {
        /// What went wrong.
        error: ProxyError,
        /// The permit on the unreachable instance.
        permit: Box<Permit>,
        /// Whether the instance failed (it refused, or is gone), not the way to its node
        /// (a tunnel that broke): only then is it to be retired.
        instance_at_fault: bool,
    },
    /// The request failed on its way, or after it reached the instance.
    Failed(ProxyError),
}

impl From<ProxyError> for ForwardError {
    fn from(e: ProxyError) -> Self {
        ForwardError::Failed(e)
    }
}

impl Proxy {
    /// Sends a request (`head` with its URI set to the path and query the instance sees)
    /// to the permit's instance; the response streams back holding the permit. With an
    /// `upgrade`, the instance is asked to switch too; if it does (101), the upgrade is
    /// taken and the two connections spliced, holding the permit; otherwise it is left.
    pub async fn forward(
        &self,
        permit: Permit,
        mut head: Parts,
        body: ReclaimableBody,
        client_addr: Option<SocketAddr>,
        limits: Limits,
        upgrade: &mut Option<UpgradeRequest>,
    ) -> Result<Response<Body>, ForwardError> {
        let endpoint = permit.endpoint();
        head.uri = upstream_uri(endpoint, &head.uri).map_err(|e| ProxyError::Upstream {
            instance: permit.instance().to_string(),
            endpoint,
            reason: format!("bad request path: {e}"),
            connect: false,
        })?;
        strip_hop_by_hop(&mut head.headers);
        if let Some(upgrade) = upgrade {
            upgrade.ask(&mut head.headers);
        }
        if let Some(addr) = client_addr {
            append_forwarded_for(&mut head.headers, addr);
        }
        if let Some(host) = head.headers.get(header::HOST).cloned() {
            head.headers
                .insert(HeaderName::from_static("x-forwarded-host"), host);
        }
        head.version = http::Version::HTTP_11;
        let too_large = Arc::new(AtomicBool::new(false));
        let body = LimitedBody::new(body, limits.max_body, too_large.clone());
        let request = Request::from_parts(head, body);
        let client = self.client(permit.node());
        let sent = tokio::time::timeout(limits.timeout, client.request(request)).await;
        let response = match sent {
            Err(_) => {
                let after = limits.timeout;
                return Err(ProxyError::Timeout { after }.into());
            }
            Ok(Err(_)) if too_large.load(Ordering::Acquire) => {
                let limit = limits.max_body;
                return Err(ProxyError::BodyTooLarge { limit }.into());
            }
            Ok(Err(e)) => {
                let error = ProxyError::Upstream {
                    instance: permit.instance().to_string(),
                    endpoint,
                    connect: e.is_connect(),
                    reason: error_chain(&e),
                };
                return Err(if e.is_connect() {
                    ForwardError::Undelivered {
                        error,
                        permit: Box::new(permit),
                        instance_at_fault: !path_failed(&e),
                    }
                } else {
                    ForwardError::Failed(error)
                });
            }
            Ok(Ok(r)) => r,
        };
        if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            if let Some(upgrade) = upgrade.take() {
                return Ok(self.switch(response, upgrade, permit));
            }
        }
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let body = Body::new(PermitBody::new(body, permit));
        Ok(Response::from_parts(parts, body))
    }
}

impl Proxy {
    /// Answers the client's upgrade with the instance's 101 and splices the two
    /// connections in the background once both have switched.
    fn switch(
        &self,
        mut response: Response<hyper::body::Incoming>,
        upgrade: UpgradeRequest,
        permit: Permit,
    ) -> Response<Body> {
        let instance = hyper::upgrade::on(&mut response);
        let (mut parts, _) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        upgrade.ask(&mut parts.headers);
        let span = tracing::debug_span!("websocket", instance = %permit.instance());
        self.tracker.spawn(
            upgrade::splice(upgrade, instance, permit, self.shutdown.clone()).instrument(span),
        );
        Response::from_parts(parts, Body::empty())
    }
}

/// Whether a connect error is a node's path failing (see `NodeError::is_path_failure`).
fn path_failed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<NodeError>()
            .is_some_and(NodeError::is_path_failure)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

fn append_forwarded_for(headers: &mut HeaderMap, addr: SocketAddr) {
    let name = HeaderName::from_static("x-forwarded-for");
    let value = match (headers.get(&name).and_then(|v| v.to_str().ok()), addr.ip()) {
        (Some(prior), ip) => HeaderValue::from_str(&format!("{prior}, {ip}")),
        // Every request carries one: written without the formatting machinery.
        (None, IpAddr::V4(ip)) => {
            let mut text = Vec::with_capacity(15);
            dotted(ip, &mut text);
            HeaderValue::from_maybe_shared(Bytes::from(text))
        }
        (None, ip) => HeaderValue::from_str(&ip.to_string()),
    };
    if let Ok(v) = value {
        headers.insert(name, v);
    }
}

/// `http://ENDPOINT` with `uri`'s path and query: put together from parts, not written out
/// and parsed again (every request takes one).
fn upstream_uri(endpoint: SocketAddr, uri: &Uri) -> Result<Uri, http::Error> {
    let authority = match endpoint {
        SocketAddr::V4(a) => {
            let mut text = Vec::with_capacity(21);
            socket_addr_v4(a, &mut text);
            Authority::from_maybe_shared(Bytes::from(text))?
        }
        SocketAddr::V6(a) => a.to_string().parse::<Authority>()?,
    };
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Ok(Uri::from_parts(parts)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_stripped_and_the_rest_kept() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert("x-user", "kept".parse().unwrap());
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(h.contains_key("x-user") && h.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn forwarded_for_appends_to_a_prior_proxy() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "10.0.0.1:5".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        append_forwarded_for(&mut h, "127.0.0.1:5".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    }

    #[test]
    fn forwarded_for_an_ipv6_client_is_its_address() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "[::1]:5".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "::1");
    }

    #[test]
    fn the_upstream_uri_is_the_endpoint_with_the_path_and_query() {
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        let v4: SocketAddr = "172.17.0.2:8080".parse().unwrap();
        assert_eq!(
            upstream_uri(v4, &uri("/a/b?x=1&y=%20")).unwrap(),
            "http://172.17.0.2:8080/a/b?x=1&y=%20"
        );
        let v6: SocketAddr = "[::1]:7".parse().unwrap();
        assert_eq!(upstream_uri(v6, &uri("/")).unwrap(), "http://[::1]:7/");
        let zero: SocketAddr = "0.0.0.0:0".parse().unwrap();
        assert_eq!(upstream_uri(zero, &uri("/")).unwrap(), "http://0.0.0.0:0/");
    }

    #[test]
    fn a_message_without_hop_by_hop_headers_is_left_as_it_is() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        h.insert("x-user", "kept".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "transfer-encoding alone is stripped");
    }
}
