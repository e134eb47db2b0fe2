//! What the scenarios measure with: a keep-alive HTTP client, a process's memory from
//! `/proc`, and a Docker connection for the baselines done by hand. No scenario logic.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A client with Nagle off and room to keep a connection per request of a burst.
pub fn http_client() -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(20_000)
        .build(c)
}

/// POSTs `body` to `url`; returns the status and the body's length, `(0, 0)` on error.
pub async fn send(client: &HttpClient, url: &str, body: Bytes) -> (u16, usize) {
    let req = http::Request::post(url).body(Full::new(body)).unwrap();
    match client.request(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let n = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            (status, n)
        }
        Err(_) => (0, 0),
    }
}

/// A KiB `field` of `/proc/PID/status` (`VmRSS:`, `VmHWM:`); NaN when unreadable.
pub fn rss_kib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(f64::NAN)
}

/// A connection to the local Docker engine.
pub async fn docker() -> bollard::Docker {
    bollard::Docker::connect_with_defaults()
        .unwrap()
        .negotiate_version()
        .await
        .unwrap()
}

/// The host port Docker published the container's port 8080 on.
pub async fn published_port(docker: &bollard::Docker, container: &str) -> u16 {
    let inspect = docker.inspect_container(container, None).await.unwrap();
    inspect.network_settings.unwrap().ports.unwrap()["8080/tcp"]
        .as_ref()
        .unwrap()[0]
        .host_port
        .as_ref()
        .unwrap()
        .parse()
        .unwrap()
}

/// The container's own address and port 8080 on its bridge network: how the gateway's
/// embedded node reaches it on Linux (no userland proxy in between).
pub async fn bridge_address(docker: &bollard::Docker, container: &str) -> SocketAddr {
    let inspect = docker.inspect_container(container, None).await.unwrap();
    let networks = inspect.network_settings.unwrap().networks.unwrap();
    let ip = networks
        .values()
        .find_map(|n| n.ip_address.as_deref().filter(|ip| !ip.is_empty()))
        .expect("the container has a bridge address");
    SocketAddr::new(ip.parse().unwrap(), 8080)
}
