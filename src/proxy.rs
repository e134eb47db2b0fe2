//! Forwarding one request to one instance and streaming the answer back.
//!
//! A pooled hyper client sends the request (method, path, query, headers, body, all
//! streamed) to the instance's endpoint; the response body is streamed back as it comes,
//! and carries the activator's permit so the instance's slot is freed only when the last
//! byte has gone out or the client has gone away. Request bodies over `max_body` are cut
//! off and reported as such, whether or not the client announced their length.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use http_body::{Frame, SizeHint};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use crate::activator::Permit;
use crate::model::error_chain;

/// Time to open a connection to an instance (they are on the same host or LAN).
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
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

/// The forwarding client. Cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    client: Client<HttpConnector, LimitedBody>,
}

impl Default for Proxy {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // A stopped container's bridge address does not refuse connections, it just
        // never answers: a short connect timeout tells a dead instance from a slow one.
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        Proxy {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .pool_max_idle_per_host(1024)
                .build(connector),
        }
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

impl Proxy {
    /// Sends `req` to the permit's instance at `path_and_query`; the response streams back
    /// holding the permit.
    pub async fn forward(
        &self,
        permit: Permit,
        req: Request<Body>,
        path_and_query: &str,
        client_addr: Option<SocketAddr>,
        max_body: u64,
        timeout: Duration,
    ) -> Result<Response<Body>, ProxyError> {
        let endpoint = permit.endpoint();
        let (mut parts, body) = req.into_parts();
        let uri: Uri = format!("http://{endpoint}{path_and_query}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| ProxyError::Upstream {
                instance: permit.instance().to_string(),
                endpoint,
                reason: format!("bad request path: {e}"),
                connect: false,
            })?;
        strip_hop_by_hop(&mut parts.headers);
        if let Some(addr) = client_addr {
            append_forwarded_for(&mut parts.headers, addr);
        }
        if let Some(host) = parts.headers.get(header::HOST).cloned() {
            parts
                .headers
                .insert(HeaderName::from_static("x-forwarded-host"), host);
        }
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        let too_large = Arc::new(AtomicBool::new(false));
        let body = LimitedBody {
            inner: body,
            remaining: max_body,
            limit: max_body,
            tripped: too_large.clone(),
        };
        let request = Request::from_parts(parts, body);
        let response = match tokio::time::timeout(timeout, self.client.request(request)).await {
            Err(_) => return Err(ProxyError::Timeout { after: timeout }),
            Ok(Err(_)) if too_large.load(Ordering::Acquire) => {
                return Err(ProxyError::BodyTooLarge { limit: max_body })
            }
            Ok(Err(e)) => {
                return Err(ProxyError::Upstream {
                    instance: permit.instance().to_string(),
                    endpoint,
                    connect: e.is_connect(),
                    reason: error_chain(&e),
                })
            }
            Ok(Ok(r)) => r,
        };
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let body = Body::new(PermitBody {
            inner: body,
            _permit: permit,
        });
        Ok(Response::from_parts(parts, body))
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, addr: SocketAddr) {
    let name = HeaderName::from_static("x-forwarded-for");
    let value = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {}", addr.ip()),
        None => addr.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(name, v);
    }
}

/// A request body that fails once more than `limit` bytes have passed.
pub struct LimitedBody {
    inner: Body,
    remaining: u64,
    limit: u64,
    tripped: Arc<AtomicBool>,
}

impl http_body::Body for LimitedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > self.remaining {
                        self.tripped.store(true, Ordering::Release);
                        let limit = self.limit;
                        return Poll::Ready(Some(Err(ProxyError::BodyTooLarge { limit }.into())));
                    }
                    self.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            other => other.map(|o| o.map(|r| r.map_err(|e| Box::new(e) as Self::Error))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that holds the permit until it is finished or dropped.
struct PermitBody {
    inner: hyper::body::Incoming,
    _permit: Permit,
}

impl http_body::Body for PermitBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

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

    #[tokio::test]
    async fn limited_body_passes_bodies_within_the_limit() {
        let tripped = Arc::new(AtomicBool::new(false));
        let body = LimitedBody {
            inner: Body::from("hello"),
            remaining: 5,
            limit: 5,
            tripped: tripped.clone(),
        };
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        assert!(!tripped.load(Ordering::Acquire));
    }

    #[tokio::test]
    async fn limited_body_fails_and_says_so_past_the_limit() {
        let tripped = Arc::new(AtomicBool::new(false));
        let body = LimitedBody {
            inner: Body::from("hello world"),
            remaining: 5,
            limit: 5,
            tripped: tripped.clone(),
        };
        assert!(body.collect().await.is_err());
        assert!(tripped.load(Ordering::Acquire));
    }
}
