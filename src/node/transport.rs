//! How the gateway reaches an instance: a byte stream that a node hands out
//! (`Node::connect`), and a hyper connector over it so the proxy can pool HTTP/1
//! connections per node. Today every node connects with TCP; a tunnelled node will hand
//! out a stream of its tunnel instead, and nothing above this seam changes.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::{Node, NodeError};

/// Time to open a connection to an instance (it is on the node's host or bridge): long
/// enough for a busy host, short enough to tell a dead instance from a slow one (a stopped
/// container's bridge address does not refuse connections, it just never answers).
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);

/// A byte stream to an instance.
pub type Upstream = Box<dyn UpstreamIo>;

/// What an upstream stream is: readable and writable, owned, movable between tasks.
pub trait UpstreamIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> UpstreamIo for T {}

/// Opens a TCP connection to `endpoint` within `CONNECT_TIMEOUT`, without Nagle's delay.
pub async fn connect_tcp(endpoint: SocketAddr) -> Result<Upstream, NodeError> {
    let connect = |source| NodeError::Connect { endpoint, source };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(endpoint))
        .await
        .map_err(|_| connect(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")))?
        .map_err(connect)?;
    // Small writes (headers, SSE events) go out at once.
    stream.set_nodelay(true).map_err(connect)?;
    Ok(Box::new(stream))
}

/// A hyper connector that asks a node for the stream to the URI's `host:port`.
#[derive(Clone)]
pub struct NodeConnector {
    node: Arc<dyn Node>,
}

impl NodeConnector {
    /// A connector to the instances of `node`.
    pub fn new(node: Arc<dyn Node>) -> NodeConnector {
        NodeConnector { node }
    }
}

impl tower_service::Service<Uri> for NodeConnector {
    type Response = NodeStream;
    type Error = NodeError;
    type Future = Pin<Box<dyn Future<Output = Result<NodeStream, NodeError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let node = self.node.clone();
        Box::pin(async move {
            let endpoint = endpoint_of(&uri)?;
            Ok(NodeStream(TokioIo::new(node.connect(endpoint).await?)))
        })
    }
}

/// The `host:port` of an instance URI as an address.
fn endpoint_of(uri: &Uri) -> Result<SocketAddr, NodeError> {
    uri.authority()
        .and_then(|a| a.as_str().parse().ok())
        .ok_or_else(|| NodeError::Remote {
            node: "(connector)".into(),
            message: format!("`{uri}` does not name an instance endpoint"),
        })
}

/// A node's stream as hyper sees it.
pub struct NodeStream(TokioIo<Upstream>);

impl Connection for NodeStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for NodeStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for NodeStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_uris_name_their_endpoint() {
        let uri: Uri = "http://172.17.0.5:8080/a?b".parse().unwrap();
        assert_eq!(
            endpoint_of(&uri).unwrap(),
            "172.17.0.5:8080".parse().unwrap()
        );
        let v6: Uri = "http://[::1]:9/".parse().unwrap();
        assert_eq!(endpoint_of(&v6).unwrap(), "[::1]:9".parse().unwrap());
        let name: Uri = "http://example.com/".parse().unwrap();
        assert!(endpoint_of(&name).is_err());
    }

    #[tokio::test]
    async fn connecting_to_nothing_fails_as_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        assert!(matches!(
            connect_tcp(addr).await,
            Err(NodeError::Connect { .. })
        ));
    }
}
