//! A test double of `Node`, for the activator and scheduler tests: it reports the GPUs it
//! is given, and "starts" a container by binding a TCP listener in this process that
//! answers every request head `200 ok` (so readiness probes pass and requests are served),
//! once its gate lets it. Tests script what its calls do (a start that fails, a container
//! that exits at start, a pause that fails, a connect that fails) and read what it was
//! asked (starts, stops).
#![allow(clippy::disallowed_methods)] // test tasks end with the test

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, Semaphore};

use super::{
    connect_tcp, ContainerState, InstanceSpec, ManagedContainer, Node, NodeError, Started, Upstream,
};
use crate::gpu::{GpuDriver, GpuInfo};
use crate::runtime::{LineStream, LogLine, LogOptions, OutputStream};

/// How long a stop takes when `slow_stops` is set.
pub const SLOW_STOP: std::time::Duration = std::time::Duration::from_secs(2);

/// What one scripted start does.
#[derive(Debug, Clone)]
pub enum StartOutcome {
    /// The container starts and listens.
    Runs,
    /// The node cannot start it (an engine or network failure).
    Fails(String),
    /// The container exits at once with this code, printing "crashing at start".
    Exits(i64),
    /// The node lacks the image: the create says so, and the image is missing until pulled.
    NoImage,
}

/// A node in this process.
pub struct FakeNode {
    name: String,
    gpus: Vec<GpuInfo>,
    /// Starts asked for (counted before the gate).
    pub starts: AtomicUsize,
    /// Each start takes one permit; tests add permits to let starts finish.
    pub gate: Semaphore,
    /// What the next starts do, in order; when empty, containers run.
    pub script: Mutex<VecDeque<StartOutcome>>,
    /// Whether pauses fail.
    pub fail_pauses: AtomicBool,
    /// Whether the node lacks the image (set by a `NoImage` start, cleared by a pull).
    pub lacks_image: AtomicBool,
    /// Image pulls asked for.
    pub pulls: AtomicUsize,
    /// Containers stopped, in order.
    pub stopped: Mutex<Vec<String>>,
    /// Containers parked, in order.
    pub parked: Mutex<Vec<String>>,
    /// Parked containers started again.
    pub unparks: AtomicUsize,
    /// Whether stops and parks take `SLOW_STOP` (as a force-removal of a GPU container may,
    /// or a server slow to end on SIGTERM).
    pub slow_stops: AtomicBool,
    /// How the next connects fail, in order (`NotConnected`: the way to the node broke;
    /// `ConnectionRefused`: the instance refused); when empty, they connect.
    pub failing_connects: Mutex<VecDeque<std::io::ErrorKind>>,
    /// What every container has written (stdout), for `logs` and `stream_logs`.
    pub output: Mutex<String>,
    /// What `list_managed` reports: containers a reconcile finds (none unless a test
    /// puts some).
    pub managed: Mutex<Vec<ManagedContainer>>,
    listeners: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl FakeNode {
    fn with_gate(name: &str, gpus: Vec<GpuInfo>, permits: usize) -> FakeNode {
        FakeNode {
            name: name.into(),
            gpus,
            starts: AtomicUsize::new(0),
            gate: Semaphore::new(permits),
            script: Mutex::default(),
            fail_pauses: AtomicBool::new(false),
            lacks_image: AtomicBool::new(false),
            pulls: AtomicUsize::new(0),
            stopped: Mutex::default(),
            parked: Mutex::default(),
            unparks: AtomicUsize::new(0),
            slow_stops: AtomicBool::new(false),
            failing_connects: Mutex::default(),
            output: Mutex::new("crashing at start".into()),
            managed: Mutex::default(),
            listeners: Mutex::default(),
        }
    }

    /// A node named `name` with `gpus`, whose starts finish at once.
    pub fn new(name: &str, gpus: Vec<GpuInfo>) -> FakeNode {
        FakeNode::with_gate(name, gpus, Semaphore::MAX_PERMITS)
    }

    /// A node without GPUs whose starts wait until the test adds gate permits.
    pub fn gated(name: &str) -> FakeNode {
        FakeNode::with_gate(name, Vec::new(), 0)
    }

    /// Scripts the next starts.
    pub fn then(&self, outcomes: impl IntoIterator<Item = StartOutcome>) -> &Self {
        lock(&self.script).extend(outcomes);
        self
    }

    /// A "container": a listener in this process that answers every request `200 ok`.
    async fn listen(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a local port");
        let endpoint: SocketAddr = listener.local_addr().expect("bound");
        let accept = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(tokio::spawn(answer_ok(s)));
            }
        });
        lock(&self.listeners).push(accept);
        endpoint
    }

    /// The containers stopped so far.
    pub fn stopped(&self) -> Vec<String> {
        lock(&self.stopped).clone()
    }
}

/// Answers each request head on `s` with `200 ok`, keeping the connection open.
async fn answer_ok(mut s: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            return;
        }
        seen.extend_from_slice(&buf[..n]);
        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            seen.drain(..end + 4);
            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            if s.write_all(ok).await.is_err() {
                return;
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        for l in self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            l.abort();
        }
    }
}

#[async_trait]
impl Node for FakeNode {
    fn name(&self) -> &str {
        &self.name
    }
    fn gpu_driver(&self) -> GpuDriver {
        GpuDriver::Simulated
    }
    fn gpu_source(&self) -> String {
        "fake".into()
    }
    async fn gpus(&self) -> Vec<GpuInfo> {
        self.gpus.clone()
    }
    async fn connect(&self, endpoint: SocketAddr) -> Result<Upstream, NodeError> {
        if let Some(kind) = lock(&self.failing_connects).pop_front() {
            let source = std::io::Error::new(kind, "scripted");
            return Err(NodeError::Connect { endpoint, source });
        }
        connect_tcp(endpoint).await
    }
    async fn start(&self, _: &InstanceSpec) -> Result<Started, NodeError> {
        let n = self.starts.fetch_add(1, Ordering::SeqCst);
        self.gate.acquire().await.expect("gate open").forget();
        let outcome = lock(&self.script).pop_front().unwrap_or(StartOutcome::Runs);
        match outcome {
            StartOutcome::Runs => {}
            StartOutcome::Fails(message) => {
                return Err(NodeError::Remote {
                    node: self.name.clone(),
                    message,
                })
            }
            StartOutcome::NoImage => {
                self.lacks_image.store(true, Ordering::SeqCst);
                return Err(crate::runtime::RuntimeError::ImageNotFound("x".into()).into());
            }
            StartOutcome::Exits(code) => {
                return Err(NodeError::ExitedAtStart {
                    container_id: format!("c{n}"),
                    code: Some(code),
                    status: "exited".into(),
                })
            }
        }
        Ok(Started {
            container_id: format!("c{n}"),
            endpoint: self.listen().await,
        })
    }
    async fn state(&self, _: &str) -> Result<ContainerState, NodeError> {
        Ok(ContainerState::Running)
    }
    async fn logs(&self, _: &str, _: usize) -> Result<String, NodeError> {
        Ok(lock(&self.output).clone())
    }
    async fn stream_logs(
        &self,
        _: &str,
        _: &LogOptions,
    ) -> Result<LineStream<NodeError>, NodeError> {
        let lines: Vec<_> = lock(&self.output)
            .lines()
            .map(|line| {
                Ok(LogLine {
                    stream: OutputStream::Stdout,
                    line: line.to_string(),
                })
            })
            .collect();
        Ok(Box::pin(futures_util::stream::iter(lines)))
    }
    async fn pause(&self, _: &str) -> Result<(), NodeError> {
        if self.fail_pauses.load(Ordering::SeqCst) {
            return Err(NodeError::Remote {
                node: self.name.clone(),
                message: "the freezer refused".into(),
            });
        }
        Ok(())
    }
    async fn resume(&self, _: &str) -> Result<(), NodeError> {
        Ok(())
    }
    async fn park(&self, container_id: &str) -> Result<(), NodeError> {
        lock(&self.parked).push(container_id.to_string());
        if self.slow_stops.load(Ordering::SeqCst) {
            tokio::time::sleep(SLOW_STOP).await;
        }
        Ok(())
    }
    async fn unpark(&self, container_id: &str, _: u16) -> Result<Started, NodeError> {
        self.unparks.fetch_add(1, Ordering::SeqCst);
        Ok(Started {
            container_id: container_id.to_string(),
            endpoint: self.listen().await,
        })
    }
    async fn stop(&self, container_id: &str) -> Result<(), NodeError> {
        lock(&self.stopped).push(container_id.to_string());
        if self.slow_stops.load(Ordering::SeqCst) {
            tokio::time::sleep(SLOW_STOP).await;
        }
        Ok(())
    }
    async fn list_managed(&self) -> Result<Vec<ManagedContainer>, NodeError> {
        Ok(lock(&self.managed).clone())
    }
    async fn image_exists(&self, _: &str) -> Result<bool, NodeError> {
        Ok(!self.lacks_image.load(Ordering::SeqCst))
    }
    async fn pull_image(
        &self,
        _: &str,
        _: Option<crate::runtime::RegistryAuth>,
        _: mpsc::Sender<crate::runtime::ImageProgress>,
    ) -> Result<(), NodeError> {
        self.pulls.fetch_add(1, Ordering::SeqCst);
        self.lacks_image.store(false, Ordering::SeqCst);
        Ok(())
    }
    async fn export_image(
        &self,
        image: &str,
    ) -> Result<(Option<u64>, axum::body::Body), NodeError> {
        Err(crate::runtime::RuntimeError::ImageNotFound(image.to_string()).into())
    }
    async fn load_image(&self, _: axum::body::Body) -> Result<(), NodeError> {
        Ok(())
    }
    async fn build_image(
        &self,
        _: &str,
        _: &str,
        _: Bytes,
        _: mpsc::Sender<String>,
    ) -> Result<(), NodeError> {
        Ok(())
    }
}
