//! The invoke core: the one place where a request for a function becomes a response.
//!
//! acquire (a permit on a ready instance, waiting through a cold start if need be) →
//! forward (the proxy streams the request there) → retry when the request was not
//! delivered (the instance refused the connection: it died since it was chosen) → answer.
//! Every caller goes through `Invoker::call`: the `/fn` route today, the front doors and
//! the job dispatcher later, so retries, history records and metrics are wired once.
//!
//! A request is sent again only when nothing of it reached an instance: the body is
//! reclaimed untouched (`proxy::Reclaim`), so a POST whose instance died is served by
//! another instance instead of failing. A request that reached an instance is never sent
//! twice.
//!
//! A WebSocket upgrade takes the same path: the client's side of it rides along the
//! attempts, and the instance's 101 makes the proxy splice the two connections, holding
//! the permit while the socket is open.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use http::request::Parts;
use http::{header, Request, Response, Uri};

use crate::activator::{AcquireError, Activator, Function};
use crate::proxy::{ForwardError, Limits, Proxy, ProxyError, ReclaimableBody, UpgradeRequest};

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
    pub async fn call(&self, f: &Arc<Function>, call: Call) -> Result<Response<Body>, InvokeError> {
        let metrics = self.activator.metrics().clone();
        let timer = metrics.request(f.name());
        let mut cold = false;
        let result = self.attempts(f, call, &mut cold).await;
        let code = match &result {
            Ok(response) => response.status().as_u16().to_string(),
            Err(e) => e.metric_label().to_string(),
        };
        timer.finish(code, cold);
        result
    }

    /// `call`'s attempts; `cold` is set when one waited for an instance to start.
    async fn attempts(
        &self,
        f: &Arc<Function>,
        mut call: Call,
        cold: &mut bool,
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
        let mut body = Some(body);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let ready = call.any_instance.then(|| f.any_ready()).flatten();
            let permit = match ready {
                Some(permit) => permit,
                None => {
                    let waiting = std::time::Instant::now();
                    let permit = self.activator.acquire(f, announced, call.route).await;
                    let metrics = self.activator.metrics();
                    metrics.queue_wait(f.name(), waiting.elapsed());
                    permit?
                }
            };
            *cold |= permit.cold();
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
        let a = Activator::new(
            scheduler,
            store,
            TaskTracker::new(),
            CancellationToken::new(),
            limits,
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
        };
        Ok(invoker.call(f, call).await?.status().as_u16())
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
