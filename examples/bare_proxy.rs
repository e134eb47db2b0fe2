//! The floor of Ember's HTTP stack: a reverse proxy with nothing but hyper's HTTP/1 server,
//! hyper-util's pooled client and tokio, the same pieces Ember's gateway forwards with,
//! and none of its work per request (routing, credentials, the activator's slot, history,
//! metrics, limits). `peer`-style measurements of it show how much of the gateway's CPU
//! per request the stack itself costs (README, Performance).
//!
//! `cargo run --release --example bare_proxy -- LISTEN UPSTREAM`, e.g.
//! `-- 127.0.0.1:18090 172.17.0.2:8080`.
#![allow(clippy::disallowed_methods)] // a measuring tool: its tasks end with the process

use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bare_proxy LISTEN UPSTREAM (e.g. 127.0.0.1:18090 172.17.0.2:8080)";
    let listen: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let upstream: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let client: Client<_, Incoming> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build_http();
    let listener = TcpListener::bind(listen).await?;
    println!("bare_proxy listening on http://{listen}");
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let client = client.clone();
        tokio::spawn(async move {
            let service = service_fn(move |mut req: Request<Incoming>| {
                let client = client.clone();
                async move {
                    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                    *req.uri_mut() = format!("http://{upstream}{path}")
                        .parse::<Uri>()
                        .expect("a request's path makes a URI");
                    client.request(req).await
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
