//! The gateway's listener: it accepts TCP connections (TLS when configured), caps how many
//! are open at once, and serves each with hyper (HTTP/1.1 with upgrades, and HTTP/2).
//!
//! Slow and idle clients cannot hold the gateway: a TLS handshake must end within
//! `header_timeout`; a connection with no request in flight that has sent nothing for
//! `header_timeout` is closed (a silent socket, an idle HTTP/2 or keep-alive connection),
//! and hyper's own header timer closes one whose request head is not complete within it;
//! past `max_connections`, new connections are closed at once, before file descriptors
//! run out (a connection keeps its place while its socket lives, upgraded ones included).
//! An upgraded connection (an agent's tunnel, a WebSocket) leaves hyper, and with it the
//! idle watch: only its own protocol ends it.
//! At shutdown every connection finishes its requests in flight, then closes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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
            header_timeout: limits.header_timeout,
        };
        let tls = tls.clone();
        tracker.spawn(async move {
            // The slot goes with the connection's socket, even into an upgrade (a tunnel,
            // a WebSocket): it is free only once the socket is closed.
            match tls {
                None => connection.serve(tcp, slot).await,
                Some(acceptor) => {
                    let timeout = connection.header_timeout;
                    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => connection.serve(stream, slot).await,
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

/// hyper's server settings. HTTP/2 gets no keep-alive pings from the server: their
/// answers would make an idle connection look busy to the idle watch.
fn http_builder(header_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    builder
}

/// One accepted connection.
struct Connection {
    addr: SocketAddr,
    app: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    shutdown: CancellationToken,
    header_timeout: Duration,
}

impl Connection {
    /// Serves the connection until it ends, or until it has had nothing in flight and
    /// sent nothing for `header_timeout` (a silent client, an idle HTTP/2 one), or, at
    /// shutdown, as soon as nothing is in flight.
    async fn serve<I>(self, io: I, slot: OwnedSemaphorePermit)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let io = Watched {
            inner: io,
            activity: activity.clone(),
            _slot: slot,
        };
        let (addr, app, seen) = (self.addr, self.app, activity.clone());
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(addr));
            let (mut app, guard) = (app.clone(), seen.request());
            async move {
                let response = app.call(req.map(Body::new)).await;
                let response = response.unwrap_or_else(|never| match never {});
                Ok::<_, Infallible>(response.map(|inner| GuardedBody {
                    inner,
                    _guard: guard,
                }))
            }
        });
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let watch_every = (self.header_timeout / 4).clamp(Duration::from_millis(25), WATCH_EVERY);
        let mut draining = false;
        let result = loop {
            tokio::select! {
                result = conn.as_mut() => break result,
                () = self.shutdown.cancelled(), if !draining => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
                () = tokio::time::sleep(watch_every) => {
                    let quiet = activity.in_flight() == 0;
                    if quiet && (draining || activity.silent_for() >= self.header_timeout) {
                        tracing::debug!(client = %addr, draining, "closing an idle connection");
                        return;
                    }
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(client = %addr, error = %e, "connection ended with an error");
        }
    }
}

/// Longest pause between two looks at a connection's idleness.
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// What a connection has been doing: when it last sent a byte, and how many of its
/// requests are still being answered.
struct Activity {
    started: Instant,
    /// Milliseconds after `started` of the last read that returned bytes.
    last_read_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            started: Instant::now(),
            last_read_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn read(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_read_ms.store(ms, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_read_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Counts a request in flight until its response body is done or dropped.
    fn request(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        RequestGuard(self.clone())
    }
}

/// One request of a connection, in flight until dropped.
struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that counts its request in flight until it is done or dropped.
struct GuardedBody {
    inner: Body,
    _guard: RequestGuard,
}

impl http_body::Body for GuardedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A client's socket: notes each read that brings bytes, and holds the connection's place
/// under `max_connections` for as long as the socket lives.
struct Watched<I> {
    inner: I,
    activity: Arc<Activity>,
    _slot: OwnedSemaphorePermit,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
