//! The floor of Ember's HTTP stack: a reverse proxy with nothing but hyper's HTTP/1 server,
//! hyper's client and tokio, the same pieces Ember's gateway forwards with, and none of its
//! work per request (routing, credentials, the activator's slot, history, metrics,
//! limits). `peer`-style measurements of it show how much of the gateway's CPU per request
//! the stack itself costs (README, Performance).
//!
//! `cargo run --release --example bare_proxy -- LISTEN UPSTREAM [MODE]`, e.g.
//! `-- 127.0.0.1:18090 172.17.0.2:8080 one-task`. MODE is `pooled` (hyper-util's pooled
//! client, whose connections run in tasks of their own: the way Ember forwards) or
//! `one-task` (each client connection's task drives its own upstream connection, so a
//! request and its answer never cross tasks). Measured here (2026-11-22, wrk, 16
//! connections, POSTs of 5 bytes): one-task spent about 10% less CPU per request than
//! pooled, and as many system calls per request as nginx (about 4.5); inside Ember the
//! same change made no difference that runs could tell apart, so Ember keeps the pooled
//! client (README, Performance).
//!
//! MODE `raw` has no hyper at all: each client connection's task holds one upstream
//! connection and moves requests and answers with `Content-Length` bodies across it,
//! parsing heads with httparse and writing them by hand (hop-by-hop headers dropped, as a
//! proxy must), the way nginx works. It refuses what it does not handle (chunked bodies,
//! upgrades) by closing the connection: it measures what a hand-written HTTP/1 path
//! would cost, and is not one. Measured here (2026-11-22, the same load): 8 400
//! instructions per request against one-task's 32 700, and 27.5 to 28.7 µs of CPU per
//! request against nginx's 29.1 to 33.7 in three alternating rounds.
#![allow(clippy::disallowed_methods)] // a measuring tool: its tasks end with the process

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming};
use hyper::client::conn::http1 as client;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bare_proxy LISTEN UPSTREAM [pooled|one-task|raw]";
    let listen: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let upstream: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let (one_task, raw) = match args.next().as_deref() {
        None | Some("pooled") => (false, false),
        Some("one-task") => (true, false),
        Some("raw") => (false, true),
        Some(_) => return Err(usage.into()),
    };
    let client: Client<_, Incoming> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build_http();
    let listener = TcpListener::bind(listen).await?;
    println!("bare_proxy listening on http://{listen}");
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        if one_task {
            tokio::spawn(one_task_connection(stream, upstream));
            continue;
        }
        if raw {
            tokio::spawn(async move {
                if let Err(e) = raw::connection(stream, upstream).await {
                    eprintln!("raw: {e}");
                }
            });
            continue;
        }
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

mod raw;

/// An upstream connection: its sender and the connection itself, which whoever holds it
/// polls (no task of its own).
struct Upstream {
    send: client::SendRequest<Incoming>,
    conn: client::Connection<TokioIo<TcpStream>, Incoming>,
}

type Slot = Arc<Mutex<Option<Upstream>>>;

async fn one_task_connection(stream: TcpStream, upstream: SocketAddr) {
    let slot: Slot = Arc::default();
    let service = service_fn(move |req: Request<Incoming>| forward(slot.clone(), upstream, req));
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn forward(
    slot: Slot,
    upstream: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Relay>, Error> {
    let taken = slot.lock().expect("not poisoned").take();
    let mut up = match taken {
        Some(up) => up,
        None => {
            let stream = TcpStream::connect(upstream).await?;
            stream.set_nodelay(true)?;
            let (send, conn) = client::handshake(TokioIo::new(stream)).await?;
            Upstream { send, conn }
        }
    };
    let mut sending = std::pin::pin!(up.send.send_request(req));
    let response = std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = sending.as_mut().poll(cx) {
            return Poll::Ready(r.map_err(Error::from));
        }
        match Pin::new(&mut up.conn).poll(cx) {
            Poll::Ready(_) => Poll::Ready(Err("the upstream connection closed".into())),
            Poll::Pending => Poll::Pending,
        }
    })
    .await?;
    let (parts, body) = response.into_parts();
    Ok(Response::from_parts(
        parts,
        Relay {
            body,
            up: Some(up),
            slot,
            done: false,
        },
    ))
}

/// An answer's body, read while polling the connection it comes over; at its end the
/// connection goes back to its client connection's slot.
struct Relay {
    body: Incoming,
    up: Option<Upstream>,
    slot: Slot,
    done: bool,
}

impl Body for Relay {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(up) = this.up.as_mut() {
            if Pin::new(&mut up.conn).poll(cx).is_ready() {
                this.up = None;
            }
        }
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        this.done |= matches!(frame, Poll::Ready(None));
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if self.done || self.body.is_end_stream() {
            if let Some(up) = self.up.take() {
                *self.slot.lock().expect("not poisoned") = Some(up);
            }
        }
    }
}
