//! Placement rules as a table of cases, on fake nodes with declared GPUs.

use std::sync::Arc;

use super::*;
use crate::gpu::{GpuInfo, MigInstance};
use crate::manifest::GpuSpec;
use crate::model::Sharing;
use crate::node::fake::FakeNode;

const GIB: u64 = 1 << 30;

fn gpu(index: u32, uuid: &str, name: &str, gib: u64, used_gib: u64, util: f64) -> GpuInfo {
    GpuInfo {
        index,
        uuid: uuid.into(),
        name: name.into(),
        memory_total: gib * GIB,
        memory_used: used_gib * GIB,
        utilization: Some(util),
        processes: vec![],
        mig_enabled: false,
        mig: vec![],
    }
}

fn with_mig(mut g: GpuInfo, instances: &[(&str, &str, u64)]) -> GpuInfo {
    g.mig_enabled = true;
    g.mig = instances
        .iter()
        .map(|(uuid, profile, gib)| MigInstance {
            uuid: (*uuid).into(),
            profile: (*profile).into(),
            memory_total: gib * GIB,
            memory_used: 0,
        })
        .collect();
    g
}

/// The mixed fleet of the issue: two 80 GiB A100s (one in MIG mode) and a 24 GiB card.
fn mixed() -> Vec<GpuInfo> {
    vec![
        gpu(0, "GPU-a100", "NVIDIA A100-SXM4-80GB", 80, 0, 0.0),
        with_mig(
            gpu(1, "GPU-a100mig", "NVIDIA A100-SXM4-80GB", 80, 0, 0.0),
            &[("MIG-1", "3g.40gb", 40), ("MIG-2", "3g.40gb", 40)],
        ),
        gpu(2, "GPU-4090", "NVIDIA GeForce RTX 4090", 24, 0, 0.0),
    ]
}

async fn scheduler(
    nodes: Vec<(&str, Vec<GpuInfo>)>,
    policy: Policy,
    max_sharers: u32,
) -> Scheduler {
    let nodes = nodes
        .into_iter()
        .map(|(name, gpus)| Arc::new(FakeNode::new(name, gpus)) as Arc<dyn Node>)
        .collect();
    let s = Scheduler::new(nodes, policy, max_sharers);
    s.refresh().await;
    s
}

fn spec(toml_body: &str) -> GpuSpec {
    toml::from_str(toml_body).unwrap()
}

fn devices(r: &Reservation) -> Vec<String> {
    r.gpus().iter().map(|g| g.device_id.clone()).collect()
}

#[tokio::test]
async fn placement_rules_table() {
    struct Case {
        name: &'static str,
        spec: &'static str,
        /// Specs placed first and kept.
        before: &'static [&'static str],
        expect: Result<&'static [&'static str], &'static str>,
    }
    let cases = [
        Case {
            name: "exclusive takes the only whole A100",
            spec: "models = [\"A100\"]",
            before: &[],
            expect: Ok(&["GPU-a100"]),
        },
        Case {
            name: "exclusive never takes a GPU already held",
            spec: "models = [\"A100\"]",
            before: &["models = [\"A100\"]"],
            expect: Err("busy"),
        },
        Case {
            name: "exclusive never takes a GPU a sharer holds",
            spec: "models = [\"4090\"]",
            before: &["sharing = \"shared\"\nmemory = \"1GiB\"\nmodels = [\"4090\"]"],
            expect: Err("busy"),
        },
        Case {
            name: "exclusive skips MIG-mode GPUs for good",
            spec: "models = [\"A100\"]\ncount = 2",
            before: &[],
            expect: Err("never"),
        },
        Case {
            name: "min_memory sends heavy jobs to the high-end card",
            spec: "min_memory = \"40GiB\"",
            before: &[],
            expect: Ok(&["GPU-a100"]),
        },
        Case {
            name: "a model filter sends light jobs to the mid-range card",
            spec: "models = [\"RTX\"]",
            before: &[],
            expect: Ok(&["GPU-4090"]),
        },
        Case {
            name: "shared instances share a GPU while their memory fits",
            spec: "sharing = \"shared\"\nmemory = \"10GiB\"\nmodels = [\"4090\"]",
            before: &["sharing = \"shared\"\nmemory = \"10GiB\"\nmodels = [\"4090\"]"],
            expect: Ok(&["GPU-4090"]),
        },
        Case {
            name: "shared memory is never overbooked",
            spec: "sharing = \"shared\"\nmemory = \"10GiB\"\nmodels = [\"4090\"]",
            before: &[
                "sharing = \"shared\"\nmemory = \"10GiB\"\nmodels = [\"4090\"]",
                "sharing = \"shared\"\nmemory = \"10GiB\"\nmodels = [\"4090\"]",
            ],
            expect: Err("busy"),
        },
        Case {
            name: "shared never joins an exclusively held GPU",
            spec: "sharing = \"shared\"\nmemory = \"1GiB\"\nmodels = [\"4090\"]",
            before: &["models = [\"4090\"]"],
            expect: Err("busy"),
        },
        Case {
            name: "shared asking more than the card has never fits",
            spec: "sharing = \"shared\"\nmemory = \"30GiB\"\nmodels = [\"4090\"]",
            before: &[],
            expect: Err("never"),
        },
        Case {
            name: "mig takes a free instance of the profile",
            spec: "sharing = \"mig\"\nmig_profile = \"3g.40gb\"",
            before: &["sharing = \"mig\"\nmig_profile = \"3g.40gb\""],
            expect: Ok(&["MIG-2"]),
        },
        Case {
            name: "mig waits when every instance of the profile is held",
            spec: "sharing = \"mig\"\nmig_profile = \"3g.40gb\"",
            before: &[
                "sharing = \"mig\"\nmig_profile = \"3g.40gb\"",
                "sharing = \"mig\"\nmig_profile = \"3g.40gb\"",
            ],
            expect: Err("busy"),
        },
        Case {
            name: "mig never uses whole GPUs or other profiles",
            spec: "sharing = \"mig\"\nmig_profile = \"1g.10gb\"",
            before: &[],
            expect: Err("never"),
        },
        Case {
            name: "exclusive count 2 needs two free whole GPUs",
            spec: "count = 2",
            before: &[],
            expect: Ok(&["GPU-a100", "GPU-4090"]),
        },
    ];
    for case in cases {
        let s = scheduler(vec![("n1", mixed())], Policy::Spread, 8).await;
        let mut held = Vec::new();
        for b in case.before {
            held.push(
                s.place(Some(&spec(b)))
                    .unwrap_or_else(|e| panic!("{}: setup {b}: {e}", case.name)),
            );
        }
        let got = s.place(Some(&spec(case.spec)));
        match (case.expect, got) {
            (Ok(want), Ok(r)) => {
                let mut d = devices(&r);
                d.sort();
                let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
                want.sort();
                assert_eq!(d, want, "{}", case.name);
            }
            (Err("busy"), Err(PlacementError::Busy { .. })) => {}
            (Err("never"), Err(PlacementError::Never { .. })) => {}
            (want, got) => panic!("{}: expected {want:?}, got {got:?}", case.name),
        }
    }
}

#[tokio::test]
async fn the_sharer_limit_holds_even_when_memory_would_fit() {
    let s = scheduler(vec![("n1", mixed())], Policy::Spread, 2).await;
    let small = spec("sharing = \"shared\"\nmemory = \"1GiB\"\nmodels = [\"4090\"]");
    let _a = s.place(Some(&small)).unwrap();
    let _b = s.place(Some(&small)).unwrap();
    let err = s.place(Some(&small)).unwrap_err();
    assert!(err.to_string().contains("the node's limit"), "{err}");
}

#[tokio::test]
async fn memory_used_by_others_counts_against_shared_and_exclusive_fits() {
    let busy_card = vec![gpu(0, "GPU-x", "NVIDIA L4", 24, 20, 0.0)];
    let s = scheduler(vec![("n1", busy_card)], Policy::Spread, 8).await;
    let err = s
        .place(Some(&spec("sharing = \"shared\"\nmemory = \"8GiB\"")))
        .unwrap_err();
    assert!(matches!(err, PlacementError::Busy { .. }), "{err}");
    assert!(s.place(Some(&spec("memory = \"8GiB\""))).is_err());
    assert!(s.place(Some(&spec("memory = \"4GiB\""))).is_ok());
}

#[tokio::test]
async fn a_released_reservation_frees_the_gpu_for_the_next_placement() {
    let s = scheduler(vec![("n1", mixed())], Policy::Spread, 8).await;
    let a100 = spec("models = [\"A100\"]");
    let first = s.place(Some(&a100)).unwrap();
    assert!(s.place(Some(&a100)).is_err());
    drop(first);
    assert_eq!(devices(&s.place(Some(&a100)).unwrap()), ["GPU-a100"]);
}

#[tokio::test]
async fn spread_picks_the_least_loaded_node_and_gpu() {
    let busy = vec![gpu(0, "GPU-busy", "NVIDIA L4", 24, 0, 90.0)];
    let idle = vec![gpu(0, "GPU-idle", "NVIDIA L4", 24, 0, 5.0)];
    let s = scheduler(vec![("busy", busy), ("idle", idle)], Policy::Spread, 8).await;
    let shared = spec("sharing = \"shared\"\nmemory = \"4GiB\"");
    let r = s.place(Some(&shared)).unwrap();
    assert_eq!(r.node().name(), "idle", "lower utilisation wins");
    // Two sharers on the idle GPU leave less free memory there than on the busy one,
    // but utilisation still dominates at this spread; more sharers tip it over.
    let mut held = vec![r];
    let mut nodes = Vec::new();
    for _ in 0..4 {
        let r = s.place(Some(&shared)).unwrap();
        nodes.push(r.node().name().to_string());
        held.push(r);
    }
    assert!(
        nodes.contains(&"busy".to_string()),
        "spread spills over: {nodes:?}"
    );
}

#[tokio::test]
async fn binpack_fills_one_gpu_before_the_next() {
    let two = vec![
        gpu(0, "GPU-0", "NVIDIA L4", 24, 0, 0.0),
        gpu(1, "GPU-1", "NVIDIA L4", 24, 0, 0.0),
    ];
    let s = scheduler(vec![("n", two.clone())], Policy::Binpack, 8).await;
    let shared = spec("sharing = \"shared\"\nmemory = \"4GiB\"");
    let a = s.place(Some(&shared)).unwrap();
    let b = s.place(Some(&shared)).unwrap();
    assert_eq!(devices(&a), devices(&b), "binpack stacks sharers");
    let s = scheduler(vec![("n", two)], Policy::Spread, 8).await;
    let a = s.place(Some(&shared)).unwrap();
    let b = s.place(Some(&shared)).unwrap();
    assert_ne!(devices(&a), devices(&b), "spread spreads them");
}

#[tokio::test]
async fn functions_without_gpus_spread_over_nodes_by_load() {
    let s = scheduler(vec![("a", vec![]), ("b", vec![])], Policy::Spread, 8).await;
    let first = s.place(None).unwrap();
    let second = s.place(None).unwrap();
    assert_ne!(first.node().name(), second.node().name());
    let name = first.node().name().to_string();
    drop(first);
    assert_eq!(s.load(&name), 0);
    assert_eq!(s.place(None).unwrap().node().name(), name);
}

#[tokio::test]
async fn in_flight_requests_steer_placement_away() {
    let s = scheduler(vec![("a", vec![]), ("b", vec![])], Policy::Spread, 8).await;
    let on_a = s.place(None).unwrap();
    let on_b = s.place(None).unwrap();
    let (busy, other) = if on_a.node().name() == "a" {
        (&on_a, "b")
    } else {
        (&on_b, "a")
    };
    let _requests: Vec<_> = (0..20).map(|_| busy.track_request()).collect();
    assert_eq!(s.place(None).unwrap().node().name(), other);
}

#[tokio::test]
async fn a_requirement_no_node_meets_says_so_node_by_node() {
    let s = scheduler(vec![("n1", mixed()), ("n2", vec![])], Policy::Spread, 8).await;
    let err = s.place(Some(&spec("models = [\"H100\"]"))).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, PlacementError::Never { .. }));
    assert!(
        text.contains("node n1") && text.contains("model not in [\"H100\"]"),
        "{text}"
    );
    assert!(text.contains("node n2: no GPUs"), "{text}");
    assert!(s.feasible(Some(&spec("models = [\"H100\"]"))).is_err());
    assert!(s.feasible(Some(&spec("models = [\"A100\"]"))).is_ok());
}

#[tokio::test]
async fn concurrent_placements_never_share_an_exclusive_gpu() {
    let s = Arc::new(scheduler(vec![("n1", mixed())], Policy::Spread, 8).await);
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || s.place(Some(&spec("count = 1"))).ok())
        })
        .collect();
    let placed: Vec<Reservation> = handles
        .into_iter()
        .filter_map(|h| h.join().unwrap())
        .collect();
    let mut ids: Vec<String> = placed.iter().flat_map(devices).collect();
    ids.sort();
    assert_eq!(
        ids,
        ["GPU-4090", "GPU-a100"],
        "two whole GPUs, each given once"
    );
}

#[test]
fn hold_accounting_is_symmetric() {
    let mut holds = HashMap::new();
    let shared = GpuAssignment {
        gpu_uuid: "GPU-1".into(),
        device_id: "GPU-1".into(),
        sharing: Sharing::Shared,
        memory: 5,
    };
    fit::apply(&mut holds, std::slice::from_ref(&shared), true);
    fit::apply(&mut holds, std::slice::from_ref(&shared), true);
    assert_eq!(holds["GPU-1"].sharers, 2);
    assert_eq!(holds["GPU-1"].memory, 10);
    fit::apply(&mut holds, std::slice::from_ref(&shared), false);
    fit::apply(&mut holds, std::slice::from_ref(&shared), false);
    assert!(holds.is_empty());
}

/// Seen while fuzzing the agent link, by reading (adoption is past what tests/fuzz_wire.rs
/// drives): container labels claiming more memory than a u64 holds overflowed the sum.
/// Adoption holds at most the device's memory, so taking and releasing stay symmetric.
#[tokio::test]
async fn adopted_labels_claiming_huge_memory_hold_at_most_the_device() {
    let s = scheduler(vec![("n", mixed())], Policy::Spread, 4).await;
    let huge = GpuAssignment {
        gpu_uuid: "GPU-4090".into(),
        device_id: "GPU-4090".into(),
        sharing: Sharing::Shared,
        memory: u64::MAX,
    };
    let reserved = |s: &Scheduler| {
        let node = &s.status()[0];
        let g = node.gpus.iter().find(|g| g.gpu.uuid == "GPU-4090").unwrap();
        (g.reserved.sharers, g.reserved.memory)
    };
    let first = s.adopt("n", vec![huge.clone()]).unwrap();
    let second = s.adopt("n", vec![huge]).unwrap();
    assert_eq!(
        reserved(&s),
        (2, 48 * GIB),
        "each holds the 24 GiB card, no more"
    );
    drop(first);
    assert_eq!(reserved(&s), (1, 24 * GIB), "the other's hold is untouched");
    drop(second);
    assert_eq!(reserved(&s), (0, 0));
}
