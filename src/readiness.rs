//! Readiness: deciding that a freshly started container can take requests.
//!
//! An HTTP probe (GET on the manifest's path, 2xx is ready) or a TCP probe, polled at a
//! short interval that grows gently, until ready or the start timeout. Between polls the
//! node is asked whether the container still runs, so a container that exits at start
//! fails the start at once with its exit code instead of waiting for the timeout.
//!
//! The TCP probe reads briefly after connecting: Docker's userland proxy accepts
//! connections on the published port before the server inside listens, then closes them.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout, Instant};

use crate::manifest::Readiness;
use crate::node::{ContainerState, Node};

/// First pause between probes: cold start latency is what users feel.
pub const FIRST_INTERVAL: Duration = Duration::from_millis(2);
/// Longest pause between probes.
pub const MAX_INTERVAL: Duration = Duration::from_millis(50);
/// How often the container's state is checked while it is not ready.
pub const STATE_CHECK_EVERY: Duration = Duration::from_millis(250);
/// Time one probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a TCP probe waits for the peer to close before calling it ready.
const TCP_SETTLE: Duration = Duration::from_millis(20);

/// Why an instance never became ready.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NotReady {
    /// The container stopped while starting.
    #[error("container {status} with code {} during start", code.map_or("?".to_string(), |c| c.to_string()))]
    Exited {
        /// Exit code, when known.
        code: Option<i64>,
        /// The engine's status word.
        status: String,
    },
    /// The container vanished while starting.
    #[error("container disappeared during start")]
    Gone,
    /// The probe never succeeded within the start timeout.
    #[error("not ready within {}: the readiness probe ({probe}) never succeeded", humantime::format_duration(*after))]
    Timeout {
        /// The start timeout.
        after: Duration,
        /// Which probe was used.
        probe: String,
    },
}

/// Probes endpoints; holds a small HTTP client.
#[derive(Clone)]
pub struct Prober {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for Prober {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(PROBE_TIMEOUT));
        Prober {
            // Probes must not reuse a pooled connection from before a restart.
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build(connector),
        }
    }
}

impl Prober {
    /// One probe: true when the endpoint is ready.
    pub async fn probe(&self, endpoint: SocketAddr, http_path: Option<&str>) -> bool {
        match http_path {
            Some(path) => self.probe_http(endpoint, path).await,
            None => probe_tcp(endpoint).await,
        }
    }

    async fn probe_http(&self, endpoint: SocketAddr, path: &str) -> bool {
        let Ok(uri) = format!("http://{endpoint}{path}").parse::<http::Uri>() else {
            return false;
        };
        match timeout(PROBE_TIMEOUT, self.client.get(uri)).await {
            Ok(Ok(resp)) => resp.status().is_success(),
            _ => false,
        }
    }

    /// Polls until the container at `endpoint` is ready, it stops, or the start timeout.
    pub async fn wait_ready(
        &self,
        node: &dyn Node,
        container_id: &str,
        endpoint: SocketAddr,
        readiness: &Readiness,
    ) -> Result<(), NotReady> {
        let started = Instant::now();
        let deadline = started + readiness.start_timeout;
        let mut interval = FIRST_INTERVAL;
        let mut next_state_check = started + STATE_CHECK_EVERY;
        loop {
            if self.probe(endpoint, readiness.http_path.as_deref()).await {
                return Ok(());
            }
            let now = Instant::now();
            if now >= next_state_check {
                next_state_check = now + STATE_CHECK_EVERY;
                match node.state(container_id).await {
                    Ok(ContainerState::Running) | Err(_) => {}
                    Ok(ContainerState::Exited { code, status }) => {
                        return Err(NotReady::Exited { code, status })
                    }
                    Ok(ContainerState::Gone) => return Err(NotReady::Gone),
                }
            }
            if now >= deadline {
                return Err(NotReady::Timeout {
                    after: readiness.start_timeout,
                    probe: match &readiness.http_path {
                        Some(p) => format!("HTTP GET {p}"),
                        None => "TCP connect".into(),
                    },
                });
            }
            sleep(interval.min(deadline - now)).await;
            interval = (interval * 3 / 2).min(MAX_INTERVAL);
        }
    }
}

async fn probe_tcp(endpoint: SocketAddr) -> bool {
    let Ok(Ok(mut stream)) = timeout(PROBE_TIMEOUT, TcpStream::connect(endpoint)).await else {
        return false;
    };
    let mut byte = [0u8; 1];
    match timeout(TCP_SETTLE, stream.read(&mut byte)).await {
        // Still open after the settle time: something listens behind the port.
        Err(_) => true,
        // A server that speaks first is listening too.
        Ok(Ok(n)) => n > 0,
        Ok(Err(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn tcp_probe_fails_when_nothing_listens() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        assert!(!probe_tcp(addr).await);
    }

    #[tokio::test]
    async fn tcp_probe_fails_when_the_peer_closes_at_once_like_dockers_proxy() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                drop(s);
            }
        });
        assert!(!probe_tcp(addr).await);
    }

    #[tokio::test]
    async fn tcp_probe_succeeds_on_a_listening_server() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        assert!(probe_tcp(addr).await);
    }

    #[tokio::test]
    async fn http_probe_needs_a_success_status() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]);
                let status = if req.starts_with("GET /ok ") {
                    "200 OK"
                } else {
                    "503 Busy"
                };
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let prober = Prober::default();
        assert!(prober.probe(addr, Some("/ok")).await);
        assert!(!prober.probe(addr, Some("/loading")).await);
    }
}
