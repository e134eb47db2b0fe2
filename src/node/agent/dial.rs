//! The agent's end of the tunnel: dial the gateway (TCP, then TLS when its URL is https),
//! upgrade with the node credential, then serve HTTP/2 on the socket it dialed until the
//! connection ends; dial again with exponential back-off and full jitter (100 ms up to
//! 30 s, reset once a tunnel has stayed up 10 s). A gateway that refuses the credential
//! ends the loop: `node_removed` when the node was removed (only a new join token brings
//! it back), `unauthorized` when another agent holds the name now.

use std::sync::Arc;
use std::time::Duration;

use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::connect::TunnelService;
use super::credential::Credential;
use crate::model::{ErrorBody, ErrorCode};
use crate::node::tunnel::{NODE_HEADER, PING_INTERVAL, PING_TIMEOUT, PROTOCOL, TUNNEL_PATH};
use crate::node::Upstream;
use crate::tls::Trust;

/// First wait before dialing again.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Longest wait before dialing again.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A tunnel up this long resets the back-off.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Time to open TCP and TLS and be answered the upgrade.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams the gateway may open at once over the tunnel.
pub const MAX_STREAMS: u32 = 4096;

/// Where and how to dial.
pub struct Target {
    host: String,
    port: u16,
    authority: String,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Target {
    /// The gateway at `url`, trusted as `trust` says when it is https. Plain http is
    /// refused past the loopback unless `plain_http` allows it: the join token and the
    /// node's credential would cross the network in the clear.
    pub fn new(url: &str, trust: &Trust, plain_http: bool) -> anyhow::Result<Target> {
        let uri: Uri = url
            .parse()
            .map_err(|_| anyhow::anyhow!("--gateway `{url}` is not a URL like https://gw:8080"))?;
        let host = uri
            .host()
            .ok_or_else(|| anyhow::anyhow!("--gateway `{url}` has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => anyhow::bail!("--gateway `{url}`: expected http:// or https://"),
        };
        if !https && !plain_http && !is_loopback(&host) {
            anyhow::bail!(
                "--gateway `{url}`: plain http would send the join token and this node's credential in the clear. Serve the gateway with TLS (`ember serve --tls self-signed`) and dial https:// with --ca-pin (`ember token create` prints it), or pass --allow-plain-http if the network between them is private (a VPN, WireGuard)"
            );
        }
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            let config = trust.client_config(&[])?;
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        Ok(Target {
            authority: uri.authority().map_or(host.clone(), |a| a.to_string()),
            host,
            port,
            tls,
        })
    }
}

/// Whether `host` names this machine.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Why dialing stopped for good.
pub enum Ended {
    /// The agent is shutting down.
    Shutdown,
    /// The gateway removed the node (`node_removed`), in these words.
    Removed(String),
    /// The gateway refused the credential otherwise, in these words.
    Refused(String),
}

/// Why one dial failed.
enum DialError {
    /// The gateway removed the node.
    Removed(String),
    /// The gateway refused the credential.
    Refused(String),
    /// Anything else: dial again later.
    Failed(String),
}

/// Dials and serves tunnels until shutdown or a refusal; `connected` runs once, at the
/// first tunnel that opens.
pub async fn run(
    target: &Target,
    credential: &Credential,
    service: TunnelService,
    shutdown: &CancellationToken,
    mut connected: Option<Box<dyn FnOnce() + Send>>,
) -> Ended {
    let mut backoff = BACKOFF_FIRST;
    let mut failing = false;
    loop {
        let dialed = tokio::select! {
            d = tokio::time::timeout(DIAL_TIMEOUT, open(target, credential)) => d,
            _ = shutdown.cancelled() => return Ended::Shutdown,
        };
        match dialed {
            Ok(Ok(upgraded)) => {
                if let Some(first) = connected.take() {
                    first();
                }
                tracing::info!("tunnel open");
                failing = false;
                let opened = Instant::now();
                serve(upgraded, service.clone(), shutdown).await;
                if shutdown.is_cancelled() {
                    return Ended::Shutdown;
                }
                tracing::warn!(
                    up_ms = opened.elapsed().as_millis() as u64,
                    "tunnel closed; dialing again"
                );
                if opened.elapsed() >= STABLE_AFTER {
                    backoff = BACKOFF_FIRST;
                }
            }
            Ok(Err(DialError::Removed(why))) => return Ended::Removed(why),
            Ok(Err(DialError::Refused(why))) => return Ended::Refused(why),
            Ok(Err(DialError::Failed(why))) => {
                if !failing {
                    tracing::warn!(error = %why, "cannot open the tunnel; dialing again with back-off");
                }
                failing = true;
            }
            Err(_) => {
                if !failing {
                    tracing::warn!(timeout = ?DIAL_TIMEOUT, "the gateway did not answer the tunnel in time");
                }
                failing = true;
            }
        }
        let wait = jitter(backoff);
        backoff = (backoff * 2).min(BACKOFF_MAX);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return Ended::Shutdown,
        }
    }
}

/// A random wait between zero and `cap` ("full jitter").
fn jitter(cap: Duration) -> Duration {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return cap;
    }
    let fraction = u64::from_le_bytes(bytes) as f64 / u64::MAX as f64;
    cap.mul_f64(fraction)
}

/// TCP, TLS, and the upgrade; the upgraded connection on success.
async fn open(target: &Target, credential: &Credential) -> Result<Upgraded, DialError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| DialError::Failed(format!("{what}: {e}"));
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| failed("cannot reach the gateway", &e))?;
    let _ = tcp.set_nodelay(true);
    let io: Upstream = match &target.tls {
        None => Box::new(tcp),
        Some(connector) => {
            let name = ServerName::try_from(target.host.clone())
                .map_err(|e| failed("the gateway's host name", &e))?;
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| failed("TLS with the gateway failed", &e))?;
            Box::new(tls)
        }
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| failed("HTTP with the gateway failed", &e))?;
    let request = Request::get(TUNNEL_PATH)
        .header(header::HOST, &target.authority)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, PROTOCOL)
        .header(NODE_HEADER, &credential.name)
        .header(
            header::AUTHORIZATION,
            format!("Bearer {}", credential.credential),
        )
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| failed("the tunnel request", &e))?;
    let conn = conn.with_upgrades();
    tokio::pin!(conn);
    let asked = sender.send_request(request);
    tokio::pin!(asked);
    // The connection future ends as soon as the upgrade is handed over, possibly in the
    // same poll that delivers the response: then the response is waiting, not lost.
    let mut driven = false;
    let response = tokio::select! {
        r = &mut asked => r,
        c = &mut conn => {
            c.map_err(|e| failed("the gateway closed the connection", &e))?;
            driven = true;
            asked.await
        }
    }
    .map_err(|e| failed("the tunnel request failed", &e))?;
    match response.status() {
        StatusCode::SWITCHING_PROTOCOLS => {}
        StatusCode::UNAUTHORIZED => {
            let body = http_body_util::Limited::new(response.into_body(), 64 * 1024)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let why = crate::client::render_api_error(StatusCode::UNAUTHORIZED, &body);
            let code = serde_json::from_slice::<ErrorBody>(&body).map(|b| b.error.code);
            return Err(match code {
                Ok(ErrorCode::NodeRemoved) => DialError::Removed(why),
                _ => DialError::Refused(why),
            });
        }
        other => return Err(DialError::Failed(format!("the gateway answered {other}"))),
    }
    if !driven {
        conn.await.map_err(|e| failed("the upgrade failed", &e))?;
    }
    hyper::upgrade::on(response)
        .await
        .map_err(|e| failed("the upgrade failed", &e))
}

/// Serves the node API over an upgraded connection until it ends or shutdown (then open
/// calls are answered first).
async fn serve(upgraded: Upgraded, service: TunnelService, shutdown: &CancellationToken) {
    let svc = hyper::service::service_fn(move |req| service.clone().call(req));
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(PING_INTERVAL)
        .keep_alive_timeout(PING_TIMEOUT)
        .max_concurrent_streams(MAX_STREAMS)
        .adaptive_window(true)
        .serve_connection(upgraded, svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "tunnel connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_the_cap() {
        for _ in 0..100 {
            assert!(jitter(Duration::from_secs(2)) <= Duration::from_secs(2));
        }
    }

    #[test]
    fn targets_read_their_scheme_host_and_port() {
        let t = Target::new("http://10.0.0.1:8080", &Trust::PublicRoots, true).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.tls.is_none()),
            ("10.0.0.1", 8080, true)
        );
        let t = Target::new("https://gw.example", &Trust::PublicRoots, false).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.tls.is_some()),
            ("gw.example", 443, true)
        );
        assert!(Target::new("ftp://x", &Trust::PublicRoots, true).is_err());
    }

    #[test]
    fn plain_http_is_refused_past_the_loopback_unless_allowed() {
        let err = Target::new("http://10.0.0.1:8080", &Trust::PublicRoots, false)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--allow-plain-http") && err.contains("--tls self-signed"));
        for local in [
            "http://127.0.0.1:8080",
            "http://localhost:1",
            "http://[::1]:80",
        ] {
            assert!(
                Target::new(local, &Trust::PublicRoots, false).is_ok(),
                "{local}"
            );
        }
    }
}
