//! The activator on a fake node whose "containers" are TCP listeners in this process:
//! queue order, cold-start sharing and permit release, without Docker.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use crate::gpu::{GpuDriver, GpuInfo};
use crate::manifest::{Format, Manifest};
use crate::node::{ContainerState, InstanceSpec, ManagedContainer, Node, NodeError, Started};
use crate::scheduler::{Policy, Scheduler};

/// A node that "starts" a container by binding a listener that accepts and holds sockets,
/// once its gate lets it.
struct ListenerNode {
    starts: AtomicUsize,
    listeners: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    gate: tokio::sync::Semaphore,
}

impl ListenerNode {
    fn open() -> ListenerNode {
        ListenerNode::gated(tokio::sync::Semaphore::MAX_PERMITS)
    }

    fn gated(permits: usize) -> ListenerNode {
        ListenerNode {
            starts: AtomicUsize::new(0),
            listeners: Mutex::default(),
            gate: tokio::sync::Semaphore::new(permits),
        }
    }
}

#[async_trait]
impl Node for ListenerNode {
    fn name(&self) -> &str {
        "fake"
    }
    fn gpu_driver(&self) -> GpuDriver {
        GpuDriver::Simulated
    }
    fn gpu_source(&self) -> String {
        "none".into()
    }
    fn last_seen(&self) -> Option<std::time::SystemTime> {
        None
    }
    async fn gpus(&self) -> Vec<GpuInfo> {
        Vec::new()
    }
    async fn start(&self, _: &InstanceSpec) -> Result<Started, NodeError> {
        let n = self.starts.fetch_add(1, Ordering::SeqCst);
        self.gate.acquire().await.unwrap().forget();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint: SocketAddr = listener.local_addr().unwrap();
        self.listeners
            .lock()
            .unwrap()
            .push(tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok((s, _)) = listener.accept().await {
                    held.push(s);
                }
            }));
        Ok(Started {
            container_id: format!("c{n}"),
            endpoint,
        })
    }
    async fn state(&self, _: &str) -> Result<ContainerState, NodeError> {
        Ok(ContainerState::Running)
    }
    async fn logs(&self, _: &str, _: usize) -> Result<String, NodeError> {
        Ok(String::new())
    }
    async fn pause(&self, _: &str) -> Result<(), NodeError> {
        Ok(())
    }
    async fn resume(&self, _: &str) -> Result<(), NodeError> {
        Ok(())
    }
    async fn stop(&self, _: &str) -> Result<(), NodeError> {
        Ok(())
    }
    async fn list_managed(&self) -> Result<Vec<ManagedContainer>, NodeError> {
        Ok(Vec::new())
    }
    async fn image_exists(&self, _: &str) -> Result<bool, NodeError> {
        Ok(true)
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

async fn activator(node: Arc<ListenerNode>) -> (Activator, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let scheduler = Scheduler::new(vec![node as Arc<dyn Node>], Policy::Spread, 8);
    let a = Activator::new(
        scheduler,
        store,
        TaskTracker::new(),
        CancellationToken::new(),
        Limits::default(),
    );
    (a, dir)
}

fn manifest(concurrency: u32, max: u32) -> Manifest {
    Manifest::parse(
        &format!(
            "name = \"f\"\nimage = \"x:1\"\n[scale]\nconcurrency = {concurrency}\nmax = {max}\n[queue]\ncapacity = 5000"
        ),
        Format::Toml,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_of_thousands_is_released_in_arrival_order_to_one_cold_start() {
    let node = Arc::new(ListenerNode::gated(0));
    let (a, _dir) = activator(node.clone()).await;
    a.deploy(manifest(1, 1)).await.unwrap();
    let f = a.function("f").unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiting = Vec::new();
    for i in 0..2000 {
        let (a2, f2, order) = (a.clone(), f.clone(), order.clone());
        waiting.push(tokio::spawn(async move {
            let permit = a2.acquire(&f2, None).await.unwrap();
            order.lock().unwrap().push(i);
            drop(permit);
        }));
        // Each request is queued before the next arrives.
        while f.load().0 < i + 1 {
            tokio::task::yield_now().await;
        }
    }
    node.gate.add_permits(1);
    let started = tokio::time::Instant::now();
    for w in waiting {
        w.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(
        order,
        (0..2000).collect::<Vec<_>>(),
        "served in arrival order"
    );
    assert_eq!(
        node.starts.load(Ordering::SeqCst),
        1,
        "one cold start for all"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(f.load(), (0, 0), "nothing queued or in flight afterwards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_requests_start_one_instance_per_concurrency_worth_up_to_max() {
    let node = Arc::new(ListenerNode::open());
    let (a, _dir) = activator(node.clone()).await;
    a.deploy(manifest(10, 3)).await.unwrap();
    let f = a.function("f").unwrap();
    let (tx, mut rx) = mpsc::channel(100);
    for _ in 0..45 {
        let (a, f, tx) = (a.clone(), f.clone(), tx.clone());
        tokio::spawn(async move {
            let permit = a.acquire(&f, None).await.unwrap();
            // Hold every permit until the test ends.
            let _ = tx.send(permit).await;
        });
    }
    let mut held = Vec::new();
    for _ in 0..30 {
        held.push(rx.recv().await.unwrap());
    }
    assert_eq!(
        node.starts.load(Ordering::SeqCst),
        3,
        "45 waiting at 10 each, max 3"
    );
    assert_eq!(f.load(), (15, 30), "the rest wait for a free slot");
    held.truncate(20);
    for _ in 0..10 {
        held.push(rx.recv().await.unwrap());
    }
    assert_eq!(f.load(), (5, 30));
    drop(held);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        f.load(),
        (0, 5),
        "the last five hold their permits in the channel"
    );
}
