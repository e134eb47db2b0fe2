//! GPU usage over a time window: per function, node or GPU, the GPU-seconds the pool
//! allocated (instance lifetime × the GPU slots it held, paused time shown apart), the
//! GPU-seconds it was busy (time with at least one request in flight), their ratio,
//! invocations and cold starts.
//!
//! Allocation comes from the allocation records of instances that are gone plus the live
//! instances the activator reports; busy time, invocations and cold requests come from the
//! invocation history, so the sums match what `ember history` lists.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::{AllocationRecord, InvocationRecord};
use crate::store::{Store, StoreError};

/// What rows are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum By {
    /// One row per function.
    #[default]
    Function,
    /// One row per node.
    Node,
    /// One row per GPU slot (GPU or MIG uuid); CPU instances under `-`.
    Gpu,
}

impl std::str::FromStr for By {
    type Err = String;
    fn from_str(s: &str) -> Result<By, String> {
        match s {
            "function" => Ok(By::Function),
            "node" => Ok(By::Node),
            "gpu" => Ok(By::Gpu),
            _ => Err(format!(
                "`{s}` is not a grouping: use `function`, `node` or `gpu`"
            )),
        }
    }
}

/// One row.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// The function, node or GPU.
    pub key: String,
    /// GPU-seconds held by instances (paused time included).
    pub gpu_seconds_allocated: f64,
    /// The part of it spent paused.
    pub gpu_seconds_paused: f64,
    /// GPU-seconds with at least one request in flight on the instance.
    pub gpu_seconds_busy: f64,
    /// Busy over allocated; absent when nothing was allocated.
    pub busy_ratio: Option<f64>,
    /// Instance lifetime, seconds, GPU or not.
    pub instance_seconds: f64,
    /// Instance time with at least one request in flight, seconds.
    pub instance_busy_seconds: f64,
    /// Invocations that arrived in the window.
    pub invocations: u64,
    /// Those that waited for an instance to start (or resume).
    pub cold_invocations: u64,
    /// Instances started in the window.
    pub cold_starts: u64,
}

/// A usage report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Usage {
    /// The window's start, unix µs.
    pub since_us: u64,
    /// Its end, unix µs.
    pub until_us: u64,
    /// What the rows are.
    pub by: By,
    /// One per function, node or GPU, by key.
    pub rows: Vec<Row>,
    /// Every row summed (GPU-seconds once per slot).
    pub total: Row,
}

fn overlap(from: u64, to: u64, since: u64, until: u64) -> u64 {
    to.min(until).saturating_sub(from.max(since))
}

fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

/// The keys an instance's time counts under: one per GPU slot for `By::Gpu`.
fn keys(by: By, function: &str, node: &str, gpus: &[String]) -> Vec<String> {
    match by {
        By::Function => vec![function.to_string()],
        By::Node => vec![node.to_string()],
        By::Gpu if gpus.is_empty() => vec!["-".to_string()],
        By::Gpu => gpus.to_vec(),
    }
}

/// The total length of the union of `spans`, clipped to the window.
fn union(mut spans: Vec<(u64, u64)>, since: u64, until: u64) -> u64 {
    spans.sort_unstable();
    let (mut total, mut end) = (0, since);
    for (from, to) in spans {
        let from = from.max(end);
        total += overlap(from, to, since, until);
        end = end.max(to);
    }
    total
}

/// Sums usage in `[since_us, until_us)` from the store and the live instances.
pub async fn usage(
    store: &Store,
    live: Vec<AllocationRecord>,
    since_us: u64,
    until_us: u64,
    by: By,
) -> Result<Usage, StoreError> {
    let mut allocations = store.allocations_since(since_us).await?;
    allocations.extend(live);
    // Every record that counts ended after `since`: it is in a batch written since.
    let (invocations, _) = store
        .invocations(since_us, None, usize::MAX, move |r| {
            r.queued_at_us < until_us
        })
        .await?;
    Ok(sum(&allocations, &invocations, since_us, until_us, by))
}

/// The report from records (pure: what the tests check).
pub fn sum(
    allocations: &[AllocationRecord],
    invocations: &[InvocationRecord],
    since: u64,
    until: u64,
    by: By,
) -> Usage {
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let mut add = |key: &str, f: &mut dyn FnMut(&mut Row)| {
        let row = rows.entry(key.to_string()).or_insert_with(|| Row {
            key: key.to_string(),
            ..Row::default()
        });
        f(row);
    };
    let slots = |gpus: &[String]| gpus.len() as f64;
    for a in allocations {
        let held = overlap(a.started_at_us, a.ended_at_us, since, until);
        let paused: u64 = a
            .paused
            .iter()
            .map(|&(from, to)| overlap(from, to, since, until))
            .sum();
        let started_here = (since..until).contains(&a.started_at_us);
        let per_key = match by {
            By::Gpu => 1.0,
            _ => slots(&a.gpus),
        };
        for key in keys(by, &a.function, &a.node, &a.gpus) {
            add(&key, &mut |r| {
                r.instance_seconds += secs(held);
                r.gpu_seconds_allocated += secs(held) * per_key;
                r.gpu_seconds_paused += secs(paused) * per_key;
                r.cold_starts += u64::from(started_here);
            });
        }
    }
    // Busy time: per instance, the union of its requests' spans.
    type Spans<'a> = (&'a InvocationRecord, Vec<(u64, u64)>);
    let mut spans: HashMap<&str, Spans<'_>> = HashMap::new();
    for r in invocations {
        if (since..until).contains(&r.queued_at_us) {
            let node = r.node.as_deref().unwrap_or("-");
            for key in keys(by, &r.function, node, &r.gpus) {
                add(&key, &mut |row| {
                    row.invocations += 1;
                    row.cold_invocations += u64::from(r.cold);
                });
            }
        }
        if let (Some(instance), Some(started)) = (&r.instance, r.started_at_us) {
            let entry = spans.entry(instance).or_insert_with(|| (r, Vec::new()));
            entry.1.push((started, r.finished_at_us.max(started)));
        }
    }
    for (r, list) in spans.into_values() {
        let busy = union(list, since, until);
        if busy == 0 {
            continue;
        }
        let node = r.node.as_deref().unwrap_or("-");
        let per_key = match by {
            By::Gpu => 1.0,
            _ => slots(&r.gpus),
        };
        for key in keys(by, &r.function, node, &r.gpus) {
            add(&key, &mut |row| {
                row.instance_busy_seconds += secs(busy);
                row.gpu_seconds_busy += secs(busy) * per_key;
            });
        }
    }
    let mut total = Row {
        key: "total".into(),
        ..Row::default()
    };
    let mut rows: Vec<Row> = rows.into_values().collect();
    for r in &mut rows {
        r.busy_ratio = ratio(r.gpu_seconds_busy, r.gpu_seconds_allocated);
        total.gpu_seconds_allocated += r.gpu_seconds_allocated;
        total.gpu_seconds_paused += r.gpu_seconds_paused;
        total.gpu_seconds_busy += r.gpu_seconds_busy;
        total.instance_seconds += r.instance_seconds;
        total.instance_busy_seconds += r.instance_busy_seconds;
        total.invocations += r.invocations;
        total.cold_invocations += r.cold_invocations;
        total.cold_starts += r.cold_starts;
    }
    if by == By::Gpu {
        // An instance or a request on several GPUs is in several rows; the total counts
        // each once.
        total.invocations = invocations
            .iter()
            .filter(|r| (since..until).contains(&r.queued_at_us))
            .count() as u64;
        total.cold_invocations = invocations
            .iter()
            .filter(|r| r.cold && (since..until).contains(&r.queued_at_us))
            .count() as u64;
        total.cold_starts = allocations
            .iter()
            .filter(|a| (since..until).contains(&a.started_at_us))
            .count() as u64;
    }
    total.busy_ratio = ratio(total.gpu_seconds_busy, total.gpu_seconds_allocated);
    Usage {
        since_us: since,
        until_us: until,
        by,
        rows,
        total,
    }
}

fn ratio(busy: f64, allocated: f64) -> Option<f64> {
    (allocated > 0.0).then(|| busy / allocated)
}
