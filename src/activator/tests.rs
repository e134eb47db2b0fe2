//! The activator on a `FakeNode`, whose "containers" are TCP listeners in this process:
//! queue order, cold-start sharing and permit release, without Docker.
#![allow(clippy::disallowed_methods)] // test tasks end with the test

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use crate::manifest::{Format, Manifest};
use crate::node::fake::{FakeNode, StartOutcome};
use crate::node::Node;
use crate::scheduler::{Policy, Scheduler};

mod tiers;

async fn activator(node: Arc<FakeNode>) -> (Activator, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let scheduler = Scheduler::new(vec![node as Arc<dyn Node>], Policy::Spread, 8);
    let a = Activator::new(
        scheduler,
        store,
        TaskTracker::new(),
        CancellationToken::new(),
        Limits::default(),
        crate::history::History::off(),
    );
    (a, dir)
}

/// Waits until `done` holds, 2 s at the most (the caller asserts what it expects).
async fn settle(done: impl Fn() -> bool) {
    for _ in 0..100 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    let node = Arc::new(FakeNode::gated("fake"));
    let (a, _dir) = activator(node.clone()).await;
    a.deploy(manifest(1, 1)).await.unwrap();
    let f = a.function("f").unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiting = Vec::new();
    for i in 0..2000 {
        let (a2, f2, order) = (a.clone(), f.clone(), order.clone());
        waiting.push(tokio::spawn(async move {
            let permit = a2.acquire(&f2, None, None).await.unwrap();
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
    let node = Arc::new(FakeNode::new("fake", Vec::new()));
    let (a, _dir) = activator(node.clone()).await;
    a.deploy(manifest(10, 3)).await.unwrap();
    let f = a.function("f").unwrap();
    let (tx, mut rx) = mpsc::channel(100);
    for _ in 0..45 {
        let (a, f, tx) = (a.clone(), f.clone(), tx.clone());
        tokio::spawn(async move {
            let permit = a.acquire(&f, None, None).await.unwrap();
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

fn start_failure(result: Result<Permit, AcquireError>) -> (StartFault, String) {
    match result {
        Err(AcquireError::StartFailed { fault, message, .. }) => (fault, message),
        other => panic!("expected a start failure, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_crash_looping_function_answers_as_its_container_failed_through_the_back_off() {
    let node = Arc::new(FakeNode::new("fake", Vec::new()));
    node.then([StartOutcome::Exits(3), StartOutcome::Exits(3)]);
    let (a, _dir) = activator(node.clone()).await;
    a.deploy(manifest(1, 1)).await.unwrap();
    let f = a.function("f").unwrap();

    let (fault, message) = start_failure(a.acquire(&f, None, None).await);
    assert_eq!(fault, StartFault::Container);
    assert!(message.contains("code 3"), "{message}");
    assert!(
        message.contains("crashing at start"),
        "its output: {message}"
    );
    assert_eq!(node.stopped(), ["c0"], "the failed container is removed");

    // Within the back-off: no new start, and still the container's fault (502, not 503).
    let (fault, message) = start_failure(a.acquire(&f, None, None).await);
    assert_eq!(fault, StartFault::Container);
    assert!(message.contains("1 failed starts in a row"), "{message}");
    assert_eq!(node.starts.load(Ordering::SeqCst), 1);

    tokio::time::advance(BACKOFF_BASE + Duration::from_millis(10)).await;
    let (fault, _) = start_failure(a.acquire(&f, None, None).await);
    assert_eq!(fault, StartFault::Container);
    assert_eq!(node.starts.load(Ordering::SeqCst), 2);
    assert_eq!(a.status(&f).failure.unwrap().consecutive, 2);
    let (_, message) = start_failure(a.acquire(&f, None, None).await);
    assert!(
        message.contains("the next try is in 2s"),
        "doubled: {message}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_node_that_cannot_start_containers_is_the_platforms_fault() {
    let node = Arc::new(FakeNode::new("fake", Vec::new()));
    node.then([StartOutcome::Fails("docker container create failed".into())]);
    let (a, _dir) = activator(node.clone()).await;
    a.deploy(manifest(1, 1)).await.unwrap();
    let f = a.function("f").unwrap();
    let (fault, message) = start_failure(a.acquire(&f, None, None).await);
    assert_eq!(fault, StartFault::Platform);
    assert!(
        !message.contains("docker container create"),
        "the node's words stay in the log: {message}"
    );
    assert!(a
        .status(&f)
        .failure
        .unwrap()
        .message
        .contains("docker container create"));
    tokio::time::advance(BACKOFF_BASE + Duration::from_millis(10)).await;
    // Past the back-off, the clock runs again: the start's readiness probe is real I/O,
    // which a paused clock would race against the queue timeout.
    tokio::time::resume();
    let permit = a
        .acquire(&f, None, None)
        .await
        .expect("the next start runs");
    drop(permit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permit_hears_its_instance_retire_when_a_new_revision_takes_over_or_the_function_goes() {
    let node = Arc::new(FakeNode::new("fake", Vec::new()));
    let (a, _dir) = activator(node.clone()).await;
    a.deploy(manifest(4, 2)).await.unwrap();
    let f = a.function("f").unwrap();
    let held = a.acquire(&f, None, None).await.unwrap();
    let within = Duration::from_secs(5);
    assert!(
        !held.retired().is_cancelled(),
        "a serving instance is not retired"
    );

    // A new revision: once its instance is ready, the old one drains, and says so.
    a.deploy(manifest(5, 2)).await.unwrap();
    tokio::time::timeout(within, held.retired().cancelled())
        .await
        .expect("the old revision's permit hears the drain");
    let fresh = a.acquire(&f, None, None).await.unwrap();
    assert_ne!(fresh.instance(), held.instance());
    assert!(!fresh.retired().is_cancelled());
    // Held past the drain, the old instance is not stopped until its permit goes.
    a.reap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(node.stopped().is_empty(), "{:?}", node.stopped());
    drop(held);
    a.reap();
    settle(|| !node.stopped().is_empty()).await;
    assert_eq!(
        node.stopped(),
        ["c0"],
        "the drained instance goes once released"
    );

    a.remove("f").await.unwrap();
    assert!(
        fresh.retired().is_cancelled(),
        "removal retires every instance"
    );
}

#[tokio::test(start_paused = true)]
async fn a_container_that_exits_at_start_leaves_its_output_and_why_for_previous() {
    let node = Arc::new(FakeNode::new("fake", Vec::new()));
    node.then([StartOutcome::Exits(3)]);
    let (a, _dir) = activator(node.clone()).await;
    a.deploy(manifest(1, 1)).await.unwrap();
    let f = a.function("f").unwrap();
    start_failure(a.acquire(&f, None, None).await);
    a.store().flush().await.unwrap();
    let kept = a.previous_logs("f", None).await.unwrap();
    assert_eq!(kept.len(), 1);
    assert!(
        kept[0].reason.starts_with("its start failed: "),
        "{}",
        kept[0].reason
    );
    let lines: Vec<&str> = kept[0].lines.iter().map(|l| l.line.as_str()).collect();
    assert_eq!(lines, ["crashing at start"]);
    assert!(matches!(
        a.previous_logs("f", Some("other")).await,
        Err(ActivatorError::InstanceNotFound { previous: true, .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_pass_each_running_instances_lines_on_named_by_their_instance() {
    let node = Arc::new(FakeNode::new("fake", Vec::new()));
    *node.output.lock().unwrap() = "one\ntwo".into();
    let (a, _dir) = activator(node.clone()).await;
    a.deploy(manifest(1, 1)).await.unwrap();
    let f = a.function("f").unwrap();
    drop(a.acquire(&f, None, None).await.unwrap());
    let id = f.lock().instances[0].id.clone();
    let mut rx = a.logs("f", LogQuery::default()).unwrap();
    let mut got = Vec::new();
    while let Some(e) = rx.recv().await {
        got.push(e);
    }
    let line = |line: &str| LogEvent::Line {
        instance: id.clone(),
        stream: crate::runtime::OutputStream::Stdout,
        line: line.into(),
    };
    assert_eq!(got, [line("one"), line("two")], "and then it ends");
    let unknown = LogQuery {
        instance: Some("zz".into()),
        ..LogQuery::default()
    };
    assert!(matches!(
        a.logs("f", unknown),
        Err(ActivatorError::InstanceNotFound {
            previous: false,
            ..
        })
    ));
}

#[tokio::test]
async fn a_start_on_a_node_without_the_image_pulls_it_and_creates_again() {
    let node = Arc::new(FakeNode::new("fake", Vec::new()));
    node.then([StartOutcome::NoImage]);
    let (a, _dir) = activator(node.clone()).await;
    a.deploy(manifest(1, 1)).await.unwrap();
    let f = a.function("f").unwrap();
    drop(a.acquire(&f, None, None).await.unwrap());
    assert_eq!(node.pulls.load(Ordering::SeqCst), 1, "pulled once");
    assert_eq!(
        node.starts.load(Ordering::SeqCst),
        2,
        "the create that found no image, then the one that served"
    );
}

/// A keep-alive policy that records the start lengths it is told.
#[derive(Debug)]
struct StartLog(Arc<Mutex<Vec<Duration>>>);

impl crate::keepalive::KeepAlive for StartLog {
    fn name(&self) -> &'static str {
        "start-log"
    }
    fn observe_gap(&mut self, _gap: Duration) {}
    fn observe_start(&mut self, took: Duration) {
        self.0.lock().unwrap().push(took);
    }
    fn windows(&self) -> crate::keepalive::Windows {
        crate::keepalive::Windows {
            prewarm: Duration::ZERO,
            keep_alive: Duration::from_secs(300),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_tells_the_keep_alive_policy_how_long_it_took() {
    let node = Arc::new(FakeNode::gated("fake"));
    let (a, _dir) = activator(node.clone()).await;
    a.deploy(manifest(1, 1)).await.unwrap();
    let f = a.function("f").unwrap();
    let starts = Arc::new(Mutex::new(Vec::new()));
    f.lock().keep_alive = Box::new(StartLog(starts.clone()));
    let (a2, f2) = (a.clone(), f.clone());
    let request = tokio::spawn(async move { a2.acquire(&f2, None, None).await.map(drop) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    node.gate.add_permits(1);
    request.await.unwrap().unwrap();
    let starts = starts.lock().unwrap().clone();
    assert_eq!(starts.len(), 1, "{starts:?}");
    assert!(starts[0] >= Duration::from_millis(200), "{starts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_cold_only_when_the_instance_that_serves_it_started_while_it_waited() {
    let node = Arc::new(FakeNode::gated("fake"));
    let (a, _dir) = activator(node.clone()).await;
    a.deploy(manifest(1, 2)).await.unwrap();
    let f = a.function("f").unwrap();
    let acquire = || {
        let (a, f) = (a.clone(), f.clone());
        tokio::spawn(async move { a.acquire(&f, None, None).await.unwrap() })
    };
    node.gate.add_permits(1);
    let first = acquire().await.unwrap();
    assert!(first.cold(), "the first request waited for the first start");
    let first_instance = first.instance().to_string();
    let second = acquire();
    settle(|| node.starts.load(Ordering::SeqCst) == 2).await;
    assert_eq!(
        node.starts.load(Ordering::SeqCst),
        2,
        "a second instance starts"
    );
    drop(first);
    let second = second.await.unwrap();
    assert_eq!(
        second.instance(),
        first_instance,
        "the first instance's slot freed up first"
    );
    assert!(
        !second.cold(),
        "it queued while an instance started, but a warm one served it"
    );
    let third = acquire();
    settle(|| f.load().0 == 1).await;
    assert_eq!(f.load().0, 1, "the third request queued");
    node.gate.add_permits(1);
    let third = third.await.unwrap();
    assert_ne!(third.instance(), second.instance());
    assert!(
        third.cold(),
        "the instance that started while it waited served it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_served_by_a_container_adopted_while_it_waited_is_not_cold() {
    let node = Arc::new(FakeNode::gated("fake"));
    let (a, _dir) = activator(node.clone()).await;
    a.deploy(manifest(1, 2)).await.unwrap();
    let f = a.function("f").unwrap();
    // A container of `f` that ran all along, on a node that reports in late (an agent
    // after the gateway restarted): its record, and the node listing it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = listener.local_addr().unwrap();
    let revision = f.revision().id.clone();
    let record = crate::store::InstanceRecord {
        id: "i-ran".into(),
        function: "f".into(),
        revision: revision.clone(),
        node: "fake".into(),
        container_id: "c-ran".into(),
        endpoint: endpoint.to_string(),
        ready_ms: 1,
        started_ms: 1,
        gpus: Vec::new(),
    };
    a.inner.store.put_instance(&record).await.unwrap();
    node.managed
        .lock()
        .unwrap()
        .push(crate::node::ManagedContainer {
            container_id: "c-ran".into(),
            function: "f".into(),
            revision,
            instance: "i-ran".into(),
            running: true,
            paused: false,
            endpoint: Some(endpoint),
            gpus: Vec::new(),
        });
    let (a2, f2) = (a.clone(), f.clone());
    let request = tokio::spawn(async move { a2.acquire(&f2, None, None).await.unwrap() });
    settle(|| f.load().0 == 1).await;
    assert_eq!(
        f.load().0,
        1,
        "the request queued (its own start is held at the gate)"
    );
    let guard = a.begin_reconcile("fake").expect("no reconcile under way");
    assert!(guard.reconcile(node.clone()).await);
    let permit = request.await.unwrap();
    assert_eq!(
        permit.instance(),
        "i-ran",
        "the adopted container served it"
    );
    assert!(!permit.cold(), "its container ran all along: no cold start");
}
