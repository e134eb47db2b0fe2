//! Requests a front door makes itself on an instance it holds a permit for: one piece of
//! work (a ComfyUI prompt) that takes several requests to one instance (place its inputs,
//! queue it, fetch its history and outputs) and a WebSocket the gateway reads as a client.
//! The permit stays with the caller, which keeps the instance's slot for the whole work.

use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use super::{error_chain, LimitedBody, Proxy, ProxyError, ReclaimableBody};
use crate::activator::Permit;

/// A WebSocket to an instance, the gateway being the client.
pub type InstanceSocket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Largest message read from an instance's socket (ComfyUI's previews are well under it).
pub const MAX_SOCKET_MESSAGE: usize = 64 << 20;

impl Proxy {
    /// Sends `req` (its URI the path and query) to the permit's instance and returns the
    /// response head once it comes, within `timeout`; the body streams.
    pub async fn send(
        &self,
        permit: &Permit,
        req: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, ProxyError> {
        let (mut head, body) = req.into_parts();
        let endpoint = permit.endpoint();
        let upstream = |reason: String, connect: bool| ProxyError::Upstream {
            instance: permit.instance().to_string(),
            endpoint,
            reason,
            connect,
        };
        head.uri = super::upstream_uri(endpoint, &head.uri)
            .map_err(|e| upstream(format!("bad path: {e}"), false))?;
        head.headers.insert(
            header::HOST,
            endpoint.to_string().parse().expect("an address is a host"),
        );
        let tripped = Default::default();
        let body = LimitedBody::new(ReclaimableBody::new(body).0, u64::MAX, tripped);
        let sent = self
            .client(permit.node())
            .request(Request::from_parts(head, body));
        match tokio::time::timeout(timeout, sent).await {
            Err(_) => Err(ProxyError::Timeout { after: timeout }),
            Ok(Err(e)) => Err(upstream(error_chain(&e), e.is_connect())),
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// Sends `req` and reads the whole answer, up to `limit` bytes.
    pub async fn fetch(
        &self,
        permit: &Permit,
        req: Request<Body>,
        timeout: Duration,
        limit: usize,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), ProxyError> {
        let response = self.send(permit, req, timeout).await?;
        let (parts, body) = response.into_parts();
        let upstream = |reason: String| ProxyError::Upstream {
            instance: permit.instance().to_string(),
            endpoint: permit.endpoint(),
            reason,
            connect: false,
        };
        let limited = http_body_util::Limited::new(body, limit);
        let bytes = tokio::time::timeout(timeout, limited.collect())
            .await
            .map_err(|_| ProxyError::Timeout { after: timeout })?
            .map_err(|e| upstream(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok((parts.status, parts.headers, bytes))
    }

    /// Opens a WebSocket to the permit's instance at `path` (with its query).
    pub async fn websocket(
        &self,
        permit: &Permit,
        path: &str,
        timeout: Duration,
    ) -> Result<InstanceSocket, ProxyError> {
        let req = Request::get(path)
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_VERSION, "13")
            .header(header::SEC_WEBSOCKET_KEY, generate_key())
            .body(Body::empty())
            .map_err(|e| ProxyError::Upstream {
                instance: permit.instance().to_string(),
                endpoint: permit.endpoint(),
                reason: format!("bad socket path: {e}"),
                connect: false,
            })?;
        let response = self.send(permit, req, timeout).await?;
        let status = response.status();
        let upstream = |reason: String| ProxyError::Upstream {
            instance: permit.instance().to_string(),
            endpoint: permit.endpoint(),
            reason,
            connect: false,
        };
        if status != StatusCode::SWITCHING_PROTOCOLS {
            return Err(upstream(format!("the socket was refused with {status}")));
        }
        let upgraded = tokio::time::timeout(timeout, hyper::upgrade::on(response))
            .await
            .map_err(|_| ProxyError::Timeout { after: timeout })?
            .map_err(|e| upstream(format!("switching to the socket: {e}")))?;
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_SOCKET_MESSAGE))
            .max_frame_size(Some(MAX_SOCKET_MESSAGE));
        Ok(
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, Some(config))
                .await,
        )
    }
}
