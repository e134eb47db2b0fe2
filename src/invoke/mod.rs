//! The invoke core: the one place where a request for a function becomes a response.
//!
//! acquire (a permit on a ready instance, waiting through a cold start if need be) →
//! forward (the proxy streams the request there) → retry when the request was not
//! delivered (the instance refused the connection: it died since it was chosen) → answer.
//! Every caller goes through `Invoker::call`: the `/fn` route, the front doors and the
//! job dispatcher later, so retries, history records (`trace.rs`) and metrics are wired
//! once.
//!
//! A request is sent again only when nothing of it reached an instance: the body is
//! reclaimed untouched (`proxy::Reclaim`), so a POST whose instance died is served by
//! another instance instead of failing. A request that reached an instance is never sent
//! twice.
//!
//! A WebSocket upgrade takes the same path: the client's side of it rides along the
//! attempts, and the instance's 101 makes the proxy splice the two connections, holding
//! the permit while the socket is open.

pub mod trace;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use http::request::Parts;
use http::{header, Request, Response, Uri};

use crate::activator::{AcquireError, Activator, Function};
use crate::proxy::{ForwardError, Limits, Proxy, ProxyError, ReclaimableBody, UpgradeRequest};
pub use trace::{TagSlot, Tags, Trace};

/// Attempts one request gets: the first, and one more per instance found dead on the way,
/// up to this many in all (a node that lost every instance at once must not loop).
pub const MAX_ATTEMPTS: usize = 4;

/// Why a call got no response from the function.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// No instance for the request (queue full, timeout, start failure, no capacity…).
    #[error(transparent)]
    Acquire(#[from] AcquireError),
    /// Forwarding failed (body too large, timeout, the instance broke the connection).
    #[error(transparent)]
    Proxy(#[from] ProxyError),
}

impl InvokeError {
    /// The status Ember answers the failure with.
    pub fn status(&self) -> http::StatusCode {
        match self {
            InvokeError::Acquire(e) => acquire_status(e),
            InvokeError::Proxy(e) => proxy_status(e),
        }
    }

    /// The `code` label of `ember_requests_total` for the failure: the API's error code.
    pub fn metric_label(&self) -> &'static str {
        match self {
            InvokeError::Acquire(e) => match e {
                AcquireError::QueueFull { .. } => "queue_full",
                AcquireError::QueueTimeout { .. } => "queue_timeout",
                AcquireError::StartFailed { .. } => "start_failed",
                AcquireError::NoCapacity { .. } => "no_capacity",
                AcquireError::GatewayFull { .. } => "gateway_full",
                AcquireError::Removed(_) => "function_removed",
                AcquireError::ShuttingDown => "shutting_down",
            },
            InvokeError::Proxy(e) => match e {
                ProxyError::BodyTooLarge { .. } => "body_too_large",
                ProxyError::Timeout { .. } => "upstream_timeout",
                ProxyError::Upstream { .. } => "upstream_error",
            },
        }
    }
}

/// The status Ember answers a request that got no instance with.
pub fn acquire_status(e: &AcquireError) -> http::StatusCode {
    use http::StatusCode as S;
    match e {
        AcquireError::QueueFull { .. }
        | AcquireError::GatewayFull { .. }
        | AcquireError::NoCapacity { .. }
        | AcquireError::ShuttingDown => S::SERVICE_UNAVAILABLE,
        AcquireError::QueueTimeout { .. } => S::GATEWAY_TIMEOUT,
        AcquireError::StartFailed { fault, .. } => match fault {
            crate::activator::StartFault::Container => S::BAD_GATEWAY,
            crate::activator::StartFault::Platform => S::SERVICE_UNAVAILABLE,
        },
        AcquireError::Removed(_) => S::NOT_FOUND,
    }
}

/// The status Ember answers a request whose forwarding failed with.
pub fn proxy_status(e: &ProxyError) -> http::StatusCode {
    use http::StatusCode as S;
    match e {
        ProxyError::BodyTooLarge { .. } => S::PAYLOAD_TOO_LARGE,
        ProxyError::Timeout { .. } => S::GATEWAY_TIMEOUT,
        ProxyError::Upstream { .. } => S::BAD_GATEWAY,
    }
}

/// One request for a function.
pub struct Call {
    /// The request as the function should see it: its URI is the path and query the
    /// instance gets (e.g. `/a/b?x=1` for `/fn/NAME/a/b?x=1`).
    pub request: Request<Body>,
    /// The client's address, for `X-Forwarded-For`.
    pub client: Option<SocketAddr>,
    /// The routing key that picks among ready instances (the OpenAI front door's hash of
    /// the prompt's prefix); `None`: the least loaded.
    pub route: Option<u64>,
    /// Whether any ready instance will do, busy or not, without taking a slot (see
    /// `Function::any_ready`); a slot is taken only when none is ready and one must start.
    pub any_instance: bool,
    /// Only a free slot of a ready instance will do: the call never waits, starts or
    /// resumes an instance (low-priority jobs); without one it fails with `no_capacity`.
    pub warm_only: bool,
}

/// The invoke core. Cheap to clone.
#[derive(Clone)]
pub struct Invoker {
    activator: Activator,
    proxy: Proxy,
}

impl Invoker {
    /// An invoker over the activator's functions.
    pub fn new(activator: Activator, proxy: Proxy) -> Invoker {
        Invoker { activator, proxy }
    }

    /// The activator behind it.
    pub fn activator(&self) -> &Activator {
        &self.activator
    }

    /// The proxy it forwards with (for front doors that talk to an instance they hold).
    pub fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    /// Sends `call` to an instance of `f` and returns its streaming response. A WebSocket
    /// upgrade is passed through: on the instance's 101 the connections are spliced, the
    /// socket holding its permit until it closes or its instance is retired.
    pub async fn call(
        &self,
        f: &Arc<Function>,
        mut call: Call,
    ) -> Result<Response<Body>, InvokeError> {
        let metrics = self.activator.metrics();
        let timer = metrics.request(f.name());
        let mut trace = Trace::begin(self.activator.history(), f, &call.request, call.client);
        // The instance sees the id too, for its own logs.
        trace.tag_request(call.request.headers_mut());
        let result = self.attempts(f, call, &mut trace).await;
        let cold = trace.cold();
        match result {
            Ok(response) => {
                let status = response.status();
                timer.finish(status.as_str(), cold);
                Ok(trace.answered(response))
            }
            Err(e) => {
                timer.finish(e.metric_label(), cold);
                trace.failed(e.status().as_u16(), e.metric_label());
                Err(e)
            }
        }
    }

    /// `call`'s attempts; `trace` learns where it ran.
    async fn attempts(
        &self,
        f: &Arc<Function>,
        mut call: Call,
        trace: &mut Trace,
    ) -> Result<Response<Body>, InvokeError> {
        let manifest = f.revision().manifest.clone();
        let limits = Limits {
            max_body: manifest.request.max_body.as_u64(),
            timeout: manifest.request.timeout,
        };
        let announced = content_length(call.request.headers());
        if announced.is_some_and(|len| len > limits.max_body) {
            return Err(ProxyError::BodyTooLarge {
                limit: limits.max_body,
            }
            .into());
        }
        let mut upgrade = UpgradeRequest::take_from(&mut call.request);
        let (head, body) = call.request.into_parts();
        let mut body = Some(trace.count_in(body, announced));
        let mut attempt = 0;
        loop {
            attempt += 1;
            let ready = if call.warm_only {
                let free = f.try_acquire().ok_or_else(|| AcquireError::NoCapacity {
                    function: f.name().to_string(),
                    reason: "no ready instance has a free slot, and this call may not start one"
                        .into(),
                })?;
                Some(free)
            } else {
                call.any_instance.then(|| f.any_ready()).flatten()
            };
            let (permit, waited) = match ready {
                Some(permit) => (permit, std::time::Duration::ZERO),
                None => {
                    let waiting = std::time::Instant::now();
                    let permit = self.activator.acquire(f, announced, call.route).await;
                    let waited = waiting.elapsed();
                    self.activator.metrics().queue_wait(f.name(), waited);
                    (permit?, waited)
                }
            };
            trace.placed(&permit, waited);
            let (sent, reclaim) = ReclaimableBody::new(body.take().unwrap_or_default());
            let result = self
                .proxy
                .forward(
                    permit,
                    copy_head(&head),
                    sent,
                    call.client,
                    limits,
                    &mut upgrade,
                )
                .await;
            match result {
                Ok(response) => return Ok(response),
                Err(ForwardError::Failed(e)) => return Err(e.into()),
                Err(ForwardError::Undelivered {
                    error,
                    permit,
                    instance_at_fault,
                }) => {
                    if instance_at_fault {
                        tracing::warn!(function = %f.name(), node = %permit.node().name(), instance = %permit.instance(), attempt, error = %error, "instance unreachable; retiring it");
                        self.activator.retire_unreachable(*permit);
                    } else {
                        tracing::warn!(function = %f.name(), node = %permit.node().name(), instance = %permit.instance(), attempt, error = %error, "the way to the instance's node failed; trying again");
                        drop(permit);
                    }
                    match reclaim.take() {
                        Some(unsent) if attempt < MAX_ATTEMPTS => body = Some(unsent),
                        _ => return Err(error.into()),
                    }
                }
            }
        }
    }
}

/// The announced body length, if any.
fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// A copy of a request head for one attempt (extensions are not carried over).
fn copy_head(head: &Parts) -> Parts {
    let mut copy = Request::new(());
    *copy.method_mut() = head.method.clone();
    *copy.uri_mut() = head.uri.clone();
    *copy.version_mut() = head.version;
    *copy.headers_mut() = head.headers.clone();
    copy.into_parts().0
}

/// The path and query an instance sees for `uri` under a route prefix (`/fn/NAME`): the
/// rest, raw (still percent-encoded), with `/` when empty.
pub fn strip_prefix(prefix_len: usize, uri: &Uri) -> String {
    let rest = uri.path().get(prefix_len..).unwrap_or("");
    let rest = if rest.is_empty() { "/" } else { rest };
    match uri.query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods)] // test tasks end with the test

    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::activator::Limits;
    use crate::history::{History, Retention};
    use crate::manifest::{Format, Manifest};
    use crate::node::fake::FakeNode;
    use crate::node::Node;
    use crate::scheduler::{Policy, Scheduler};
    use crate::store::Store;

    #[test]
    fn the_rest_of_the_path_and_the_query_pass_through() {
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        let fn_prefix = |name: &str| "/fn/".len() + name.len();
        assert_eq!(strip_prefix(fn_prefix("echo"), &uri("/fn/echo")), "/");
        assert_eq!(strip_prefix(fn_prefix("echo"), &uri("/fn/echo/")), "/");
        assert_eq!(
            strip_prefix(fn_prefix("echo"), &uri("/fn/echo/a/b?x=1&y=%20")),
            "/a/b?x=1&y=%20"
        );
        assert_eq!(strip_prefix(fn_prefix("echo"), &uri("/fn/echo?q")), "/?q");
        assert_eq!(strip_prefix(fn_prefix("e"), &uri("/fn/e/%2F")), "/%2F");
    }

    #[test]
    fn a_copied_head_keeps_method_uri_and_headers() {
        let (head, ()) = Request::post("/x?y")
            .header("a", "1")
            .body(())
            .unwrap()
            .into_parts();
        let copy = copy_head(&head);
        assert_eq!(copy.method, http::Method::POST);
        assert_eq!(copy.uri, "/x?y");
        assert_eq!(copy.headers["a"], "1");
    }

    async fn activator(node: Arc<FakeNode>) -> (Activator, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let scheduler = Scheduler::new(vec![node as Arc<dyn Node>], Policy::Spread, 8);
        let limits = Limits::default();
        let history = History::start(store.clone(), Retention::default());
        let a = Activator::new(
            scheduler,
            store,
            TaskTracker::new(),
            CancellationToken::new(),
            limits,
            history,
        );
        (a, dir)
    }

    fn manifest() -> Manifest {
        let toml = "name = \"f\"\nimage = \"x:1\"\n[scale]\nconcurrency = 4\nmax = 2";
        Manifest::parse(toml, Format::Toml).unwrap()
    }

    /// One GET through the invoke core.
    async fn invoke(a: &Activator, f: &Arc<Function>) -> Result<u16, InvokeError> {
        let invoker = Invoker::new(a.clone(), Proxy::default());
        let call = Call {
            request: http::Request::get("/")
                .body(axum::body::Body::empty())
                .unwrap(),
            client: None,
            route: None,
            any_instance: false,
            warm_only: false,
        };
        Ok(invoker.call(f, call).await?.status().as_u16())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cold_and_a_warm_call_are_tagged_and_recorded_once_their_bodies_end() {
        let node = Arc::new(FakeNode::new("fake", Vec::new()));
        let (a, _dir) = activator(node.clone()).await;
        a.deploy(manifest()).await.unwrap();
        let f = a.function("f").unwrap();
        let invoker = Invoker::new(a.clone(), Proxy::default());
        let mut tags = Vec::new();
        for _ in 0..2 {
            let request = http::Request::post("/x?secret=1")
                .body(axum::body::Body::from("hello"))
                .unwrap();
            let call = Call {
                request,
                client: None,
                route: None,
                any_instance: false,
                warm_only: false,
            };
            let response = invoker.call(&f, call).await.unwrap();
            let h = response.headers().clone();
            let body = axum::body::to_bytes(response.into_body(), usize::MAX);
            let out = body.await.unwrap().len() as u64;
            tags.push((h, out));
        }
        let id = |i: usize| {
            tags[i].0[trace::INVOCATION_ID]
                .to_str()
                .unwrap()
                .to_string()
        };
        assert_ne!(id(0), id(1));
        assert_eq!(tags[0].0[trace::COLD_START], "true");
        assert!(tags[0].0.contains_key(trace::QUEUE_MS));
        assert!(!tags[1].0.contains_key(trace::COLD_START), "warm");
        a.history().flush().await;
        let page = crate::history::query::Query::parse(&Default::default())
            .unwrap()
            .run(a.store())
            .await
            .unwrap();
        let r = &page.invocations;
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].id.clone(), r[1].id.clone()), (id(1), id(0)));
        assert!(r[1].cold && !r[0].cold);
        assert_eq!(r[0].instance, r[1].instance);
        assert_eq!(r[0].node.as_deref(), Some("fake"));
        assert_eq!((r[0].status, r[0].method.as_str()), (200, "POST"));
        assert_eq!(r[0].path, "/x", "no query");
        assert_eq!((r[0].bytes_in, r[0].bytes_out), (5, tags[1].1));
        assert!(r[0].finished_at_us >= r[0].started_at_us.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_whose_client_leaves_during_a_cold_start_is_recorded_as_aborted() {
        let node = Arc::new(FakeNode::gated("fake"));
        let (a, _dir) = activator(node.clone()).await;
        a.deploy(manifest()).await.unwrap();
        let f = a.function("f").unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(200), invoke(&a, &f)).await;
        assert!(waited.is_err(), "the start is held at the gate");
        a.history().flush().await;
        let page = crate::history::query::Query::parse(&Default::default())
            .unwrap()
            .run(a.store())
            .await
            .unwrap();
        assert_eq!(page.invocations.len(), 1);
        let r = &page.invocations[0];
        assert_eq!((r.status, r.error.as_deref()), (499, Some("aborted")));
        assert!(r.instance.is_none());
        node.gate.add_permits(1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broken_way_to_a_node_retries_without_retiring_but_a_refusing_instance_is_replaced() {
        use std::io::ErrorKind;
        let node = Arc::new(FakeNode::new("fake", Vec::new()));
        let (a, _dir) = activator(node.clone()).await;
        a.deploy(manifest()).await.unwrap();
        let f = a.function("f").unwrap();
        assert_eq!(invoke(&a, &f).await.unwrap(), 200);
        assert_eq!(node.starts.load(Ordering::SeqCst), 1);

        // The tunnel failed twice: the request is sent again, the instance kept.
        node.failing_connects
            .lock()
            .unwrap()
            .extend([ErrorKind::NotConnected, ErrorKind::NotConnected]);
        assert_eq!(invoke(&a, &f).await.unwrap(), 200);
        assert_eq!(node.starts.load(Ordering::SeqCst), 1, "no new instance");
        assert!(node.stopped().is_empty(), "{:?}", node.stopped());

        // The instance refused: it is retired and replaced, and the request still served.
        node.failing_connects
            .lock()
            .unwrap()
            .push_back(ErrorKind::ConnectionRefused);
        assert_eq!(invoke(&a, &f).await.unwrap(), 200);
        assert_eq!(node.starts.load(Ordering::SeqCst), 2, "replaced");
        tokio::time::timeout(Duration::from_secs(5), async {
            while node.stopped().is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the refusing instance is stopped");

        // A way that stays broken fails after MAX_ATTEMPTS, and still retires nothing.
        let broken = [ErrorKind::NotConnected; MAX_ATTEMPTS];
        node.failing_connects.lock().unwrap().extend(broken);
        assert!(invoke(&a, &f).await.is_err());
        assert_eq!(node.starts.load(Ordering::SeqCst), 2);
        assert_eq!(node.stopped().len(), 1);
    }
}
