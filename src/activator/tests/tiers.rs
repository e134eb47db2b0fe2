//! The idle tiers: pausing and parking, their failures, eviction of a paused instance for
//! a waiting placement, and bringing a parked one back.
#![allow(clippy::disallowed_methods)] // test tasks end with the test

use super::*;
/// An activator on `node` with function `f` (`on_idle = on_idle`, idle after 1 s), which
/// served one request and has been idle past its timeout when the reaper last ran.
async fn served_then_idle(
    node: Arc<FakeNode>,
    on_idle: &str,
) -> (Activator, tempfile::TempDir, Arc<Function>) {
    let (a, dir) = activator(node).await;
    let toml = format!(
        "name = \"f\"\nimage = \"x:1\"\n[scale]\non_idle = \"{on_idle}\"\nidle_timeout = \"1s\""
    );
    a.deploy(Manifest::parse(&toml, Format::Toml).unwrap())
        .await
        .unwrap();
    let f = a.function("f").unwrap();
    drop(a.acquire(&f, None, None).await.unwrap());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    a.reap();
    (a, dir, f)
}

/// Waits (2 s at most) until `f`'s first instance is in `phase`; fails the test if not.
async fn first_in_phase(a: &Activator, f: &Arc<Function>, phase: crate::model::Phase) {
    let first = || a.status(f).instances.first().map(|i| i.phase);
    settle(|| first() == Some(phase)).await;
    assert_eq!(first(), Some(phase), "{:?}", a.status(f));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_that_fails_retires_the_instance_instead_of_losing_it() {
    let node = Arc::new(FakeNode::new("fake", Vec::new()));
    node.fail_pauses.store(true, Ordering::SeqCst);
    let (a, _dir, f) = served_then_idle(node.clone(), "pause").await;
    settle(|| !node.stopped().is_empty()).await;
    assert_eq!(
        node.stopped(),
        ["c0"],
        "the instance that would not freeze is removed"
    );
    settle(|| a.status(&f).instances.is_empty()).await;
    assert!(a.status(&f).instances.is_empty());
    let permit = a
        .acquire(&f, None, None)
        .await
        .expect("a new instance serves");
    drop(permit);
    assert_eq!(node.starts.load(Ordering::SeqCst), 2);
}

fn l4(index: u32) -> crate::gpu::GpuInfo {
    crate::gpu::GpuInfo {
        index,
        uuid: format!("GPU-{index}"),
        name: "NVIDIA L4".into(),
        memory_total: 24 << 30,
        memory_used: 0,
        utilization: Some(0.0),
        processes: vec![],
        mig_enabled: false,
        mig: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_waiting_placement_evicts_one_paused_instance_even_while_its_stop_is_slow() {
    let node = Arc::new(FakeNode::new("fake", vec![l4(0), l4(1)]));
    let (a, _dir) = activator(node.clone()).await;
    a.scheduler().refresh().await;
    for name in ["a", "b"] {
        let m = Manifest::parse(
            &format!("name = \"{name}\"\nimage = \"x:1\"\n[scale]\non_idle = \"pause\"\nidle_timeout = \"1s\"\npause_timeout = \"1h\"\n[gpu]\ncount = 1"),
            Format::Toml,
        )
        .unwrap();
        a.deploy(m).await.unwrap();
        drop(
            a.acquire(&a.function(name).unwrap(), None, None)
                .await
                .unwrap(),
        );
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(super::run_reaper(a.clone(), shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for name in ["a", "b"] {
        assert_eq!(
            a.status(&a.function(name).unwrap()).paused,
            1,
            "{name} paused"
        );
    }
    node.slow_stops.store(true, Ordering::SeqCst);
    let m = Manifest::parse(
        "name = \"c\"\nimage = \"x:1\"\n[gpu]\ncount = 1",
        Format::Toml,
    )
    .unwrap();
    a.deploy(m).await.unwrap();
    let c = a.function("c").unwrap();
    let (a2, c2) = (a.clone(), c.clone());
    let waiter = tokio::spawn(async move { a2.acquire(&c2, None, None).await.map(drop) });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Six reaper passes while the evicted container is still being removed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        node.stopped().len(),
        1,
        "one eviction: {:?}",
        node.stopped()
    );
    waiter
        .await
        .unwrap()
        .expect("the waiting request got the freed GPU");
    assert_eq!(a.status(&c).ready, 1);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_instance_serves_the_next_request_started_again_not_created() {
    let node = Arc::new(FakeNode::new("fake", Vec::new()));
    let (a, _dir, f) = served_then_idle(node.clone(), "park").await;
    first_in_phase(&a, &f, crate::model::Phase::Parked).await;
    assert_eq!(a.status(&f).parked, 1);
    drop(
        a.acquire(&f, None, None)
            .await
            .expect("the parked instance serves"),
    );
    assert_eq!(node.unparks.load(Ordering::SeqCst), 1, "started again");
    assert_eq!(node.starts.load(Ordering::SeqCst), 1, "never created again");
    assert!(node.stopped().is_empty(), "nothing removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waits_for_a_parking_instance_to_start_again_is_reported_cold() {
    let node = Arc::new(FakeNode::new("fake", Vec::new()));
    node.slow_stops.store(true, Ordering::SeqCst);
    let (a, _dir, f) = served_then_idle(node.clone(), "park").await;
    first_in_phase(&a, &f, crate::model::Phase::Parking).await;
    let permit = a
        .acquire(&f, None, None)
        .await
        .expect("the parked instance serves once started again");
    assert!(permit.cold(), "it waited for the stop and the start");
    assert_eq!(node.unparks.load(Ordering::SeqCst), 1, "started again");
    assert_eq!(node.starts.load(Ordering::SeqCst), 1, "never created again");
}
