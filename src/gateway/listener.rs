//! The gateway's listener: it accepts TCP connections (TLS when configured), caps how many
//! are open at once, and serves each with hyper (HTTP/1.1 with upgrades, and HTTP/2).
//!
//! Slow and idle clients cannot hold the gateway: a connection whose request head (or TLS
//! handshake) has not arrived within `header_timeout` is closed, and so is an HTTP/1.1
//! keep-alive connection idle for that long (hyper starts the same timer while it waits
//! for the next head); past `max_connections`, new connections are closed at once, before
//! file descriptors run out. At shutdown every connection finishes its requests in flight.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

/// Limits on client connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Time a client has to send a request head (and finish a TLS handshake), and the
    /// longest an HTTP/1.1 keep-alive connection may sit idle.
    pub header_timeout: Duration,
    /// Connections open at once; more are closed as they arrive.
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `shutdown`; connections go on `tracker`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let builder = Arc::new(http_builder(limits.header_timeout));
    let refused = AtomicU64::new(0);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => break,
        };
        let (tcp, addr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors or similar: wait a moment instead of spinning.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = open.clone().try_acquire_owned() else {
            drop(tcp);
            // One line per thousand refusals: a flood must not become a flood of logs.
            if refused.fetch_add(1, Ordering::Relaxed).is_multiple_of(1000) {
                tracing::warn!(max = limits.max_connections, client = %addr, "--max-connections reached: closing new connections");
            }
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let connection = Connection {
            addr,
            app: app.clone(),
            builder: builder.clone(),
            shutdown: shutdown.clone(),
            _slot: slot,
        };
        let tls = tls.clone();
        let header_timeout = limits.header_timeout;
        tracker.spawn(async move {
            match tls {
                None => connection.serve(tcp).await,
                Some(acceptor) => {
                    match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => connection.serve(stream).await,
                        Ok(Err(e)) => {
                            tracing::debug!(client = %connection.addr, error = %e, "TLS handshake failed")
                        }
                        Err(_) => {
                            tracing::debug!(client = %connection.addr, "TLS handshake timed out")
                        }
                    }
                }
            }
        });
    }
}

/// hyper's server settings: the header timer, keep-alive pings on HTTP/2.
fn http_builder(header_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// One accepted connection, holding its place under `max_connections` until it ends.
struct Connection {
    addr: SocketAddr,
    app: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    shutdown: CancellationToken,
    _slot: OwnedSemaphorePermit,
}

impl Connection {
    async fn serve<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (addr, app) = (self.addr, self.app);
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(addr));
            let mut app = app.clone();
            async move {
                let response = app.call(req.map(Body::new)).await;
                Ok::<_, Infallible>(response.unwrap_or_else(|never| match never {}))
            }
        });
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let result = tokio::select! {
            result = conn.as_mut() => result,
            _ = self.shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(client = %addr, error = %e, "connection ended with an error");
        }
    }
}
