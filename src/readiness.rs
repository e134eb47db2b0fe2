//! Readiness: deciding that a freshly started container can take requests.
//!
//! An HTTP probe (GET on the manifest's path, 2xx is ready) or a TCP probe, over a stream
//! the instance's node hands out, polled until ready or the time allowed runs out. The
//! pause between probes is a small share of the wait so far (2 ms at first, 50 ms at
//! most), so a probe sees a ready instance within about 3 % of its start time, short
//! starts and long loads alike. During the pauses the
//! node is asked whether the container still runs, so a container that exits at start
//! fails the start at once with its exit code instead of waiting for the timeout.
//!
//! The TCP probe reads briefly after connecting: Docker's userland proxy accepts
//! connections on the published port before the server inside listens, then closes them.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::time::{sleep, timeout, Instant};

use crate::node::{ContainerState, Node};

/// Shortest pause between probes: cold start latency is what users feel.
pub const FIRST_INTERVAL: Duration = Duration::from_millis(2);
/// Longest pause between probes.
pub const MAX_INTERVAL: Duration = Duration::from_millis(50);
/// The share of the time waited so far that the pause before the next probe may be.
const WAITED_SHARE: u32 = 32;
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

/// One probe: true when the instance at `endpoint` is ready. With a path, a GET that
/// answers 2xx; without, a TCP connect that stays open. Each probe opens a connection of
/// its own through the node, so none reuses a connection from before a restart.
pub async fn probe(node: &dyn Node, endpoint: SocketAddr, http_path: Option<&str>) -> bool {
    let answered = timeout(PROBE_TIMEOUT, async {
        match http_path {
            Some(path) => probe_http(node, endpoint, path).await,
            None => probe_tcp(node, endpoint).await,
        }
    })
    .await;
    answered.unwrap_or(false)
}

async fn probe_http(node: &dyn Node, endpoint: SocketAddr, path: &str) -> bool {
    let Ok(io) = node.connect(endpoint).await else {
        return false;
    };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await
    else {
        return false;
    };
    let Ok(request) = Request::get(path)
        .header(http::header::HOST, endpoint.to_string())
        .body(Empty::<Bytes>::new())
    else {
        return false;
    };
    // The connection is driven here, beside the request, and dropped with the probe. Its
    // end is not the probe's: when it fails first, the request fails too.
    let drive = async {
        let _ = conn.await;
        std::future::pending::<()>().await
    };
    tokio::select! {
        answer = sender.send_request(request) => answer.is_ok_and(|r| r.status().is_success()),
        () = drive => false,
    }
}

async fn probe_tcp(node: &dyn Node, endpoint: SocketAddr) -> bool {
    let Ok(mut stream) = node.connect(endpoint).await else {
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

/// The pause before the next probe after `waited`: a small share of the wait so far, so
/// that the time between the instance becoming ready and a probe seeing it stays within
/// about 3 % of its start, between `FIRST_INTERVAL` and `MAX_INTERVAL`.
pub fn next_interval(waited: Duration) -> Duration {
    (waited / WAITED_SHARE).clamp(FIRST_INTERVAL, MAX_INTERVAL)
}

/// Polls until the container at `endpoint` is ready, it stops, or `within` passes.
pub async fn wait_ready(
    node: &dyn Node,
    container_id: &str,
    endpoint: SocketAddr,
    http_path: Option<&str>,
    within: Duration,
) -> Result<(), NotReady> {
    let started = Instant::now();
    let deadline = started + within;
    let mut next_state_check = started + STATE_CHECK_EVERY;
    loop {
        if probe(node, endpoint, http_path).await {
            return Ok(());
        }
        let now = Instant::now();
        let nap = sleep(next_interval(now - started).min(deadline.saturating_duration_since(now)));
        if now >= next_state_check {
            next_state_check = now + STATE_CHECK_EVERY;
            // Asked during the pause before the next probe, not in front of it.
            let (state, ()) = tokio::join!(node.state(container_id), nap);
            match state {
                Ok(ContainerState::Running) | Err(_) => {}
                Ok(ContainerState::Exited { code, status }) => {
                    return Err(NotReady::Exited { code, status })
                }
                Ok(ContainerState::Gone) => return Err(NotReady::Gone),
            }
        } else {
            nap.await;
        }
        // Checked against the time before the pause: the pause ends at the deadline at
        // the latest, and one last probe runs there.
        if now >= deadline {
            return Err(NotReady::Timeout {
                after: within,
                probe: match http_path {
                    Some(p) => format!("HTTP GET {p}"),
                    None => "TCP connect".into(),
                },
            });
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // test servers end with the test
mod tests {
    use super::*;
    use crate::node::fake::FakeNode;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    fn node() -> FakeNode {
        FakeNode::new("probe", Vec::new())
    }

    #[test]
    fn probes_come_often_early_and_within_a_small_share_of_the_wait_later() {
        assert_eq!(next_interval(Duration::ZERO), FIRST_INTERVAL);
        assert_eq!(
            next_interval(Duration::from_millis(320)),
            Duration::from_millis(10)
        );
        assert_eq!(next_interval(Duration::from_secs(60)), MAX_INTERVAL);
    }

    #[tokio::test]
    async fn tcp_probe_fails_when_nothing_listens() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        assert!(!probe_tcp(&node(), addr).await);
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
        assert!(!probe_tcp(&node(), addr).await);
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
        assert!(probe_tcp(&node(), addr).await);
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
        assert!(probe(&node(), addr, Some("/ok")).await);
        assert!(!probe(&node(), addr, Some("/loading")).await);
    }
}
