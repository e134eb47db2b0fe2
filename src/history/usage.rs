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
#[derive(utoipa::ToSchema, Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
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
#[derive(utoipa::ToSchema, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[schema(as = UsageRow)]
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
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct Usage {
    /// The window's start, unix µs.
    pub since_us: u64,
    /// Its end, unix µs.
    pub until_us: u64,
    /// What the rows are.
    pub by: By,
    /// One per function, node or GPU, by key.
    pub rows: Vec<Row>,
    /// The whole window: each instance and request counted once, whatever the rows.
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

/// The GPU slots each key's time counts for: all the instance's, or one under `By::Gpu`
/// (none for a CPU instance).
fn slots_per_key(by: By, gpus: &[String]) -> f64 {
    match by {
        By::Gpu => f64::from(u8::from(!gpus.is_empty())),
        _ => gpus.len() as f64,
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

/// Sums usage in `[since_us, until_us)` from the store and the live instances. The
/// history is folded as it is read, keeping per instance only its request spans.
pub async fn usage(
    store: &Store,
    live: Vec<AllocationRecord>,
    since_us: u64,
    until_us: u64,
    by: By,
) -> Result<Usage, StoreError> {
    let mut summer = Summer::new(since_us, until_us, by);
    for a in store.allocations_since(since_us).await?.iter().chain(&live) {
        summer.allocation(a);
    }
    // Every record that counts ended after `since`: it is in a batch written since.
    let summer = store
        .fold_invocations(since_us, summer, |s, r| s.invocation(r))
        .await?;
    Ok(summer.finish())
}

/// The report from records (what the tests check).
pub fn sum(
    allocations: &[AllocationRecord],
    invocations: &[InvocationRecord],
    since: u64,
    until: u64,
    by: By,
) -> Usage {
    let mut summer = Summer::new(since, until, by);
    allocations.iter().for_each(|a| summer.allocation(a));
    invocations.iter().for_each(|r| summer.invocation(r));
    summer.finish()
}

/// One instance's requests: where it ran and their spans.
struct Spans {
    function: String,
    node: String,
    gpus: Vec<String>,
    spans: Vec<(u64, u64)>,
}

/// Usage summed as records come.
pub struct Summer {
    since: u64,
    until: u64,
    by: By,
    rows: BTreeMap<String, Row>,
    /// Summed once per instance or request, whatever the rows are.
    total: Row,
    instances: HashMap<String, Spans>,
}

impl Summer {
    /// An empty report of `[since, until)` by `by`.
    pub fn new(since: u64, until: u64, by: By) -> Summer {
        Summer {
            since,
            until,
            by,
            rows: BTreeMap::new(),
            total: Row {
                key: "total".into(),
                ..Row::default()
            },
            instances: HashMap::new(),
        }
    }

    fn add(&mut self, function: &str, node: &str, gpus: &[String], f: impl Fn(&mut Row, f64)) {
        let per_key = slots_per_key(self.by, gpus);
        for key in keys(self.by, function, node, gpus) {
            let row = self.rows.entry(key.clone()).or_insert_with(|| Row {
                key,
                ..Row::default()
            });
            f(row, per_key);
        }
        f(&mut self.total, gpus.len() as f64);
    }

    /// An instance's allocation.
    pub fn allocation(&mut self, a: &AllocationRecord) {
        let (since, until) = (self.since, self.until);
        let held = secs(overlap(a.started_at_us, a.ended_at_us, since, until));
        let paused: u64 = a
            .paused
            .iter()
            .map(|&(from, to)| overlap(from, to, since, until))
            .sum();
        let paused = secs(paused);
        let started = u64::from((since..until).contains(&a.started_at_us));
        self.add(&a.function, &a.node, &a.gpus, |r, slots| {
            r.instance_seconds += held;
            r.gpu_seconds_allocated += held * slots;
            r.gpu_seconds_paused += paused * slots;
            r.cold_starts += started;
        });
    }

    /// An invocation.
    pub fn invocation(&mut self, r: &InvocationRecord) {
        if r.queued_at_us >= self.until {
            return;
        }
        let node = r.node.as_deref().unwrap_or("-");
        if r.queued_at_us >= self.since {
            let cold = u64::from(r.cold);
            self.add(&r.function, node, &r.gpus, |row, _| {
                row.invocations += 1;
                row.cold_invocations += cold;
            });
        }
        if let (Some(instance), Some(started)) = (&r.instance, r.started_at_us) {
            let entry = self
                .instances
                .entry(instance.clone())
                .or_insert_with(|| Spans {
                    function: r.function.clone(),
                    node: node.to_string(),
                    gpus: r.gpus.clone(),
                    spans: Vec::new(),
                });
            entry.spans.push((started, r.finished_at_us.max(started)));
        }
    }

    /// The report.
    pub fn finish(mut self) -> Usage {
        let instances = std::mem::take(&mut self.instances);
        for (_, i) in instances {
            let busy = secs(union(i.spans, self.since, self.until));
            if busy > 0.0 {
                self.add(&i.function, &i.node, &i.gpus, |row, slots| {
                    row.instance_busy_seconds += busy;
                    row.gpu_seconds_busy += busy * slots;
                });
            }
        }
        let mut rows: Vec<Row> = self.rows.into_values().collect();
        for r in rows.iter_mut().chain(std::iter::once(&mut self.total)) {
            r.busy_ratio = ratio(r.gpu_seconds_busy, r.gpu_seconds_allocated);
        }
        Usage {
            since_us: self.since,
            until_us: self.until,
            by: self.by,
            rows,
            total: self.total,
        }
    }
}

fn ratio(busy: f64, allocated: f64) -> Option<f64> {
    (allocated > 0.0).then(|| busy / allocated)
}
