//! Bounded fuzzing of what crosses the agent link (issue 16): every type the gateway or an
//! agent reads from the other end, fed arbitrary bytes, arbitrary JSON, and real messages
//! with hostile values put in. Reading never panics, nor does what the reader does next
//! (an error body becomes a `NodeError`, a pull's progress a percentage, a node's GPUs a
//! placement); and what reads is written back and read again unchanged. See `fuzz/mod.rs`
//! for the time and seed knobs.

mod fuzz;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::Arc;

use ember::gpu::{device_ids, GpuDriver, GpuInfo, GpuProcess, MigInstance};
use ember::manifest::{Format, GpuSpec, Manifest};
use ember::model::{ErrorBody, ErrorCode, FieldError, GpuAssignment, SecretEnv, Sharing};
use ember::node::agent::images::{PullLine, PullRequest};
use ember::node::agent::logs::LogFrame;
use ember::node::volumes::{VolumeError, VolumeInfo};
use ember::node::wire::{Heartbeat, JoinRequest, Joined, NodeInfo, WireErrorBody};
use ember::node::{ContainerState, InstanceSpec, ManagedContainer, NodeError, Started};
use ember::runtime::{ImageProgress, LogLine, OutputStream, RegistryAuth, RuntimeError};
use ember::scheduler::{fit, Hold, NodeView, Policy};
use fuzz::{fuzz, json_value, key, nested_arrays};
use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// Reads `bytes` as a `T`; what reads must be written and read back to the same JSON.
fn read<T: Serialize + DeserializeOwned>(bytes: &[u8]) -> Result<Option<T>, TestCaseError> {
    let Ok(value) = serde_json::from_slice::<T>(bytes) else {
        return Ok(None);
    };
    let written = serde_json::to_string(&value).expect("wire types serialize");
    let again: T = serde_json::from_str(&written).map_err(|e| {
        TestCaseError::fail(format!(
            "{} refuses what it wrote: {e}\n{written}",
            std::any::type_name::<T>()
        ))
    })?;
    let rewritten = serde_json::to_string(&again).expect("wire types serialize");
    prop_assert_eq!(&written, &rewritten, "{}", std::any::type_name::<T>());
    Ok(Some(value))
}

/// [`read`], and the value read back equals the one first read.
fn read_eq<T>(bytes: &[u8]) -> Result<Option<T>, TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let Some(value) = read::<T>(bytes)? else {
        return Ok(None);
    };
    let again: T = serde_json::from_str(&serde_json::to_string(&value).unwrap()).unwrap();
    prop_assert_eq!(&again, &value);
    Ok(Some(value))
}

/// Reads `bytes` as every type that crosses the link, then does with each what its reader
/// does: `remote.rs`, `remote/images.rs` and `remote/logs.rs` on the gateway, `agent/` on
/// the node.
/// Reads `bytes` as every type crossing the agent link (and follows what the gateway
/// does next with each that reads them); how many of the message types read them.
fn read_everything(bytes: &[u8]) -> Result<usize, TestCaseError> {
    let mut read_by = 0;
    let mut count = |read: bool| read_by += usize::from(read);
    if let Some(e) = read_eq::<WireErrorBody>(bytes)? {
        count(true);
        becomes_a_node_error(e)?;
    }
    match read::<PullLine>(bytes)? {
        Some(PullLine::Progress { progress }) => {
            count(true);
            is_a_percentage(progress)?
        }
        Some(PullLine::Failed(e)) => {
            count(true);
            becomes_a_node_error(e)?
        }
        other => count(other.is_some()),
    }
    match read::<LogFrame>(bytes)? {
        Some(LogFrame::Failed(e)) => {
            count(true);
            becomes_a_node_error(e)?;
        }
        other => count(other.is_some()),
    }
    if let Some(p) = read_eq::<ImageProgress>(bytes)? {
        count(true);
        is_a_percentage(p)?;
    }
    if let Some(info) = read::<NodeInfo>(bytes)? {
        count(true);
        places_on(&info.gpus)?;
    }
    if let Some(beat) = read::<Heartbeat>(bytes)? {
        count(true);
        places_on(&beat.gpus)?;
    }
    if let Some(gpus) = read_eq::<Vec<GpuInfo>>(bytes)? {
        count(true);
        places_on(&gpus)?;
    }
    count(read_eq::<ErrorBody>(bytes)?.is_some());
    count(read_eq::<Started>(bytes)?.is_some());
    count(read_eq::<ContainerState>(bytes)?.is_some());
    count(read_eq::<Vec<ManagedContainer>>(bytes)?.is_some());
    count(read_eq::<Vec<VolumeInfo>>(bytes)?.is_some());
    count(read_eq::<LogLine>(bytes)?.is_some());
    count(read_eq::<GpuAssignment>(bytes)?.is_some());
    count(read_eq::<SecretEnv>(bytes)?.is_some());
    count(read_eq::<RegistryAuth>(bytes)?.is_some());
    count(read::<JoinRequest>(bytes)?.is_some());
    count(read::<Joined>(bytes)?.is_some());
    count(read::<PullRequest>(bytes)?.is_some());
    count(read::<InstanceSpec>(bytes)?.is_some());
    // Plain values, read where a message is a bare string, flag or list.
    read::<String>(bytes)?;
    read::<bool>(bytes)?;
    read::<Vec<String>>(bytes)?;
    Ok(read_by)
}

/// The gateway turns an agent's error body into a `NodeError` and shows it: no panic, and
/// something to show.
fn becomes_a_node_error(e: WireErrorBody) -> Result<(), TestCaseError> {
    let error = e.into_node_error("n");
    prop_assert!(!error.to_string().is_empty());
    prop_assert!(!error.public_message().is_empty());
    let _ = (error.is_image_missing(), error.is_path_failure());
    Ok(())
}

fn is_a_percentage(p: ImageProgress) -> Result<(), TestCaseError> {
    if let Some(percent) = p.percent() {
        prop_assert!(percent <= 100, "{p:?} is {percent} %");
    }
    Ok(())
}

/// What the scheduler asks of a node's GPUs: each kind of GPU section, both policies, with
/// one device already held. A fit must hand out as many devices as asked, all the node's.
fn places_on(gpus: &[GpuInfo]) -> Result<(), TestCaseError> {
    let ids = device_ids(gpus);
    let mut holds = HashMap::new();
    if let Some(g) = gpus.first() {
        let hold = Hold {
            exclusive: false,
            sharers: 1,
            memory: g.memory_total,
        };
        holds.insert(g.uuid.clone(), hold);
    }
    let node = NodeView {
        name: "n",
        gpus,
        holds: &holds,
        instances: usize::MAX,
        in_flight: usize::MAX,
        max_sharers: 4,
    };
    for spec in gpu_specs() {
        for policy in [Policy::Spread, Policy::Binpack] {
            if let Ok(f) = fit(&node, Some(&spec), policy) {
                prop_assert_eq!(f.gpus.len(), spec.count as usize);
                prop_assert!(f.score.is_finite(), "score {}", f.score);
                for a in &f.gpus {
                    prop_assert!(ids.contains(&a.device_id), "{a:?} is none of the node's");
                }
            }
        }
    }
    Ok(())
}

fn gpu_specs() -> Vec<GpuSpec> {
    [
        "count = 1",
        "count = 2\nmodels = [\"A100\"]",
        "sharing = \"shared\"\nmemory = \"8GiB\"",
        "sharing = \"mig\"\nmig_profile = \"3g.40gb\"\nmin_memory = \"1GiB\"",
    ]
    .iter()
    .map(|gpu| {
        let text = format!("name = \"g\"\nimage = \"e:1\"\n[gpu]\n{gpu}");
        let m = Manifest::parse(&text, Format::Toml).expect("the specs are valid");
        m.gpu.expect("a gpu section")
    })
    .collect()
}

fn gpu(index: u32, uuid: &str, mig: bool) -> GpuInfo {
    GpuInfo {
        index,
        uuid: uuid.into(),
        name: "NVIDIA A100-SXM4-80GB".into(),
        memory_total: 80 << 30,
        memory_used: 1 << 30,
        utilization: Some(12.5),
        processes: vec![GpuProcess {
            pid: 4242,
            memory_used: Some(1 << 30),
        }],
        mig_enabled: mig,
        mig: if mig {
            vec![MigInstance {
                uuid: format!("MIG-{uuid}"),
                profile: "3g.40gb".into(),
                memory_total: 40 << 30,
                memory_used: 0,
            }]
        } else {
            Vec::new()
        },
    }
}

/// Real messages of every kind, as each end writes them.
fn examples() -> Vec<Value> {
    let gpus = vec![gpu(0, "GPU-a", false), gpu(1, "GPU-b", true)];
    let assignment = GpuAssignment {
        gpu_uuid: "GPU-a".into(),
        device_id: "GPU-a".into(),
        sharing: Sharing::Shared,
        memory: 8 << 30,
    };
    let manifest = Manifest::parse(
        "name = \"f\"\nimage = \"e:1\"\nenv = { T = { secret = \"t\" } }\n[resources]\nmemory = \"1GiB\"\n[gpu]\nsharing = \"shared\"\nmemory = \"8GiB\"",
        Format::Toml,
    )
    .expect("a valid manifest");
    let exited = NodeError::ExitedAtStart {
        container_id: "c1".into(),
        code: Some(137),
        status: "OOMKilled".into(),
    };
    let pull = NodeError::Runtime(RuntimeError::Pull {
        image: "e:1".into(),
        reason: "denied".into(),
    });
    let missing = NodeError::Volume(VolumeError::Missing("models".into()));
    let mut field_error = ErrorBody::new(ErrorCode::InvalidManifest, "manifest is invalid");
    field_error.error.details.push(FieldError {
        field: "scale.max".into(),
        message: "must be between 1 and 1000".into(),
    });
    fn v<T: Serialize>(message: &T) -> Value {
        serde_json::to_value(message).expect("examples serialize")
    }
    vec![
        v(&NodeInfo {
            protocol: 1,
            name: "gpu-1".into(),
            labels: BTreeMap::from([("zone".into(), "a".into())]),
            gpu_driver: GpuDriver::Nvidia,
            gpu_source: "nvml".into(),
            gpus: gpus.clone(),
            volumes: vec!["models".into()],
        }),
        v(&Heartbeat {
            gpus,
            volumes: vec!["models".into()],
        }),
        v(&Started {
            container_id: "c1".into(),
            endpoint: "127.0.0.1:30001".parse().unwrap(),
        }),
        v(&ContainerState::Exited {
            code: Some(1),
            status: "exited".into(),
        }),
        v(&ContainerState::Running),
        v(&vec![ManagedContainer {
            container_id: "c1".into(),
            function: "f".into(),
            revision: "0123456789ab".into(),
            instance: "i1".into(),
            running: true,
            paused: false,
            endpoint: Some("127.0.0.1:30001".parse().unwrap()),
            gpus: vec![assignment.clone()],
        }]),
        v(&vec![VolumeInfo {
            name: "models".into(),
            exposed: true,
            path: "/srv/models".into(),
            bytes: 1 << 40,
            files: 12,
        }]),
        v(&WireErrorBody::from_node_error(&exited)),
        v(&WireErrorBody::from_node_error(&pull)),
        v(&WireErrorBody::from_node_error(&missing)),
        v(&WireErrorBody::unauthorized("no credential")),
        v(&PullLine::Progress {
            progress: ImageProgress {
                done: 10 << 20,
                total: 80 << 20,
            },
        }),
        v(&PullLine::Done { done: true }),
        v(&PullLine::Failed(WireErrorBody::from_node_error(&pull))),
        v(&LogFrame::Line(LogLine {
            stream: OutputStream::Stderr,
            line: "loading weights".into(),
        })),
        v(&LogFrame::Failed(WireErrorBody::from_node_error(&exited))),
        v(&JoinRequest {
            protocol: 1,
            name: "gpu-1".into(),
            labels: BTreeMap::new(),
        }),
        v(&Joined {
            gateway_id: "gw".into(),
            name: "gpu-1".into(),
            credential: "s3cret".into(),
        }),
        v(&PullRequest {
            image: "registry.example/e:1".into(),
            auth: Some(RegistryAuth {
                server: "registry.example".into(),
                username: "u".into(),
                password: "p".into(),
            }),
        }),
        v(&InstanceSpec {
            function: "f".into(),
            revision: manifest.revision_id(),
            instance: "i1".into(),
            manifest: Arc::new(manifest),
            gpus: vec![assignment],
            secrets: SecretEnv(BTreeMap::from([("T".into(), "value".into())])),
        }),
        v(&field_error),
    ]
}

/// One change to a message: where (a child chosen at each level), what, and with what.
#[derive(Debug, Clone)]
enum Edit {
    Replace(Vec<usize>, Value),
    Remove(Vec<usize>, usize),
    Insert(Vec<usize>, String, Value),
}

fn edit() -> impl Strategy<Value = Edit> {
    let path = prop::collection::vec(any::<usize>(), 0..5);
    prop_oneof![
        3 => (path.clone(), json_value()).prop_map(|(p, v)| Edit::Replace(p, v)),
        1 => (path.clone(), any::<usize>()).prop_map(|(p, i)| Edit::Remove(p, i)),
        1 => (path, key(), json_value()).prop_map(|(p, k, v)| Edit::Insert(p, k, v)),
    ]
}

/// The JSON pointer of the node `path` leads to: at each level the child it picks, until
/// a leaf.
fn pointer(root: &Value, path: &[usize]) -> String {
    let mut at = root;
    let mut out = String::new();
    for pick in path {
        let (key, next) = match at {
            Value::Object(map) if !map.is_empty() => {
                let (k, v) = map.iter().nth(pick % map.len()).unwrap();
                (k.replace('~', "~0").replace('/', "~1"), v)
            }
            Value::Array(items) if !items.is_empty() => {
                let i = pick % items.len();
                (i.to_string(), &items[i])
            }
            _ => break,
        };
        out.push('/');
        out.push_str(&key);
        at = next;
    }
    out
}

fn apply(message: &mut Value, edit: &Edit) {
    let path = match edit {
        Edit::Replace(p, _) | Edit::Remove(p, _) | Edit::Insert(p, _, _) => p,
    };
    let at = pointer(message, path);
    let Some(target) = message.pointer_mut(&at) else {
        return;
    };
    match (edit, target) {
        (Edit::Replace(_, v), target) => *target = v.clone(),
        (Edit::Remove(_, i), Value::Object(map)) if !map.is_empty() => {
            let key = map.keys().nth(i % map.len()).unwrap().clone();
            map.remove(&key);
        }
        (Edit::Remove(_, i), Value::Array(items)) if !items.is_empty() => {
            items.remove(i % items.len());
        }
        (Edit::Insert(_, k, v), Value::Object(map)) => {
            map.insert(k.clone(), v.clone());
        }
        (Edit::Insert(_, _, v), Value::Array(items)) => items.push(v.clone()),
        _ => {}
    }
}

/// JSON-ish bytes: the link's tokens in any order.
fn token_soup() -> impl Strategy<Value = Vec<u8>> {
    let tokens = prop::sample::select(vec![
        "{",
        "}",
        "[",
        "]",
        ":",
        ",",
        "\"",
        "\"code\"",
        "\"error\"",
        "\"message\"",
        "\"state\"",
        "\"exited\"",
        "\"progress\"",
        "\"done\"",
        "\"total\"",
        "\"gpus\"",
        "\"runtime\"",
        "\"image_not_found\"",
        "0",
        "-1",
        "18446744073709551615",
        "1e999",
        "1e308",
        "true",
        "null",
        "\\u0000",
        "\\ud800",
        " ",
        "\n",
    ]);
    prop::collection::vec(tokens, 0..48).prop_map(|t| t.concat().into_bytes())
}

#[test]
fn arbitrary_bytes_never_panic_a_reader() {
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        token_soup(),
        (0usize..1000).prop_map(|d| nested_arrays(d).into_bytes()),
    ];
    fuzz("arbitrary bytes", bytes, |b| read_everything(&b).map(drop));
}

#[test]
fn arbitrary_json_never_panics_a_reader_and_what_reads_round_trips() {
    fuzz("arbitrary json", json_value(), |v| {
        read_everything(&serde_json::to_vec(&v).unwrap()).map(drop)
    });
}

#[test]
fn real_messages_with_hostile_values_never_panic_and_what_reads_round_trips() {
    let examples = examples();
    let n = examples.len();
    let edits = (0..n, prop::collection::vec(edit(), 1..4));
    fuzz("hostile messages", edits, |(i, edits)| {
        let mut message = examples[i].clone();
        for e in &edits {
            apply(&mut message, e);
        }
        read_everything(&serde_json::to_vec(&message).unwrap()).map(drop)
    });
}

/// Inputs the fuzzer found, each once a panic or a wrong answer, now plain tests.
mod regressions {
    use super::*;

    #[test]
    fn the_real_messages_read_and_round_trip() {
        for message in examples() {
            let read_by = read_everything(&serde_json::to_vec(&message).unwrap()).unwrap();
            assert!(read_by >= 1, "no message type reads the example {message}");
        }
    }

    #[test]
    fn nesting_past_the_parser_limit_is_refused_not_a_stack_overflow() {
        read_everything(nested_arrays(100_000).as_bytes()).unwrap();
    }
}
