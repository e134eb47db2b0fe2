//! The tunnel: one connection an agent dials to the gateway, over which the gateway drives
//! the node. Nothing on the node listens.
//!
//! The agent opens TCP (TLS when the gateway serves it) and sends `GET TUNNEL_PATH` with
//! `Upgrade: ember-tunnel/1`, its name and its node credential. The gateway checks the
//! credential and answers 101; then the roles flip: the agent serves HTTP/2 on the socket it
//! dialed, and the gateway is the HTTP/2 client. Control calls (start, stop, logs, list,
//! images…) are ordinary requests; user traffic to the node's containers goes as CONNECT
//! streams, each with its own HTTP/2 flow control, so one slow download never stalls the
//! others. HTTP/2 pings both ways notice a dead connection within about 20 s even when idle.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// The route an agent upgrades.
pub const TUNNEL_PATH: &str = "/api/v1/nodes/tunnel";
/// The `Upgrade` protocol of the tunnel.
pub const PROTOCOL: &str = "ember-tunnel/1";
/// The header naming the node that dials.
pub const NODE_HEADER: &str = "ember-node";
/// The authority of control calls inside the tunnel (any name does; this one reads well).
pub const AUTHORITY: &str = "node.ember";

/// How often each end pings the other when the tunnel is quiet (with `PING_TIMEOUT`, a
/// silent tunnel is noticed within 15 s).
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
/// How long a ping may go unanswered before the tunnel is closed.
pub const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// The gateway's end of a node's tunnel. Cheap to clone: every clone sends on the same
/// connection.
#[derive(Clone, Debug)]
pub struct Tunnel {
    sender: http2::SendRequest<Body>,
}

impl Tunnel {
    /// Sends one request over the tunnel (waiting for a free stream).
    pub async fn send(&self, request: Request<Body>) -> Result<Response<Incoming>, hyper::Error> {
        let mut sender = self.sender.clone();
        sender.ready().await?;
        sender.send_request(request).await
    }

    /// Whether the connection under it is gone.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

/// Takes over a connection an agent upgraded: the HTTP/2 handshake as the client. Returns
/// the tunnel and the future that drives the connection; the tunnel works while that
/// future is polled, and the future ends when the connection does. Cancelling `stop`
/// closes the connection at once, streams still open on it included.
pub async fn accept(
    upgraded: Upgraded,
    stop: CancellationToken,
) -> Result<(Tunnel, impl std::future::Future<Output = ()> + Send), hyper::Error> {
    let upgraded = Killable::new(upgraded, stop);
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(PING_INTERVAL)
        .keep_alive_timeout(PING_TIMEOUT)
        .keep_alive_while_idle(true)
        .adaptive_window(true)
        .handshake(upgraded)
        .await?;
    let drive = async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "tunnel connection ended");
        }
    };
    Ok((Tunnel { sender }, drive))
}

/// A connection that fails every read and write once its token is cancelled: HTTP/2 keeps
/// a connection alive while streams use it, and a revoked node's tunnel must end at once.
struct Killable<T> {
    inner: T,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl<T> Killable<T> {
    fn new(inner: T, stop: CancellationToken) -> Killable<T> {
        Killable {
            inner,
            killed: Box::pin(stop.cancelled_owned()),
        }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.killed.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the tunnel was closed by the gateway",
            ))),
            Poll::Pending => Poll::Ready(Ok(())),
        }
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Killable<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        if let Poll::Ready(Err(e)) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Killable<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Err(e)) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Poll::Ready(Err(e)) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
