//! An instance's meter: how long it held its GPU slots and how long it was busy.
//!
//! Each instance carries one from its start to its removal. It adds to
//! `ember_gpu_allocated_seconds_total` and `ember_gpu_busy_seconds_total` as time passes
//! (settled at each scrape, at each busy → idle change and at the end), keeps the spans it
//! spent paused, and when the instance is gone (the meter is dropped with it, however it
//! went) it leaves an allocation record in the history, which `ember usage` sums.

use std::sync::Arc;

use prometheus::Counter;
use tokio::time::Instant;

use super::Activator;
use crate::history::{now_us, AllocationRecord, History};
use crate::metrics::Metrics;

impl Activator {
    /// Adds every live instance's GPU time so far to the counters (before a scrape).
    pub fn settle_usage(&self) {
        let now = Instant::now();
        for f in self.functions() {
            for inst in f.lock().instances.iter_mut() {
                inst.meter.settle(now);
            }
        }
    }

    /// Every live instance's allocation so far, as if it ended now (for usage reports).
    pub fn live_allocations(&self) -> Vec<crate::history::AllocationRecord> {
        self.functions()
            .iter()
            .flat_map(|f| {
                let st = f.lock();
                st.instances
                    .iter()
                    .map(|i| i.meter.so_far())
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// Where meters report: the counters and the history.
#[derive(Clone)]
pub(crate) struct Ledger {
    pub metrics: Arc<Metrics>,
    pub history: Arc<History>,
}

/// One instance's meter.
pub(crate) struct Meter {
    history: Arc<History>,
    record: AllocationRecord,
    /// The GPU slots it holds, for the history's invocation records.
    devices: Arc<[String]>,
    /// Per GPU slot: allocated and busy counters.
    counters: Vec<(Counter, Counter)>,
    /// Counters are settled up to here.
    settled: Instant,
    /// Since when a request has been in flight, while one is.
    busy_since: Option<Instant>,
    /// Since when it is paused (unix µs), while it is.
    paused_since: Option<u64>,
}

/// Pause spans kept per instance; older ones are merged (their total stays right).
const MAX_PAUSES: usize = 256;

impl Meter {
    /// A meter for an instance of `function` on `node` holding `devices`, started at
    /// `started_at_us`.
    pub fn new(
        ledger: &Ledger,
        instance: &str,
        function: &str,
        node: &str,
        devices: Vec<String>,
        started_at_us: u64,
    ) -> Meter {
        let counters = devices
            .iter()
            .map(|d| ledger.metrics.gpu_seconds(function, node, d))
            .collect();
        Meter {
            history: ledger.history.clone(),
            record: AllocationRecord {
                instance: instance.to_string(),
                function: function.to_string(),
                node: node.to_string(),
                gpus: devices.clone(),
                started_at_us,
                ended_at_us: 0,
                paused: Vec::new(),
            },
            devices: devices.into(),
            counters,
            settled: Instant::now(),
            busy_since: None,
            paused_since: None,
        }
    }

    /// Moves its start back to `started_at_us` (an instance adopted after a restart).
    pub fn started_at(&mut self, started_at_us: u64) {
        self.record.started_at_us = started_at_us;
    }

    /// The GPU slots (GPU or MIG uuids) it holds.
    pub fn devices(&self) -> &Arc<[String]> {
        &self.devices
    }

    /// Adds the time since the last settlement to the counters.
    pub fn settle(&mut self, now: Instant) {
        let held = now.saturating_duration_since(self.settled).as_secs_f64();
        let busy = self
            .busy_since
            .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
        for (allocated, busy_counter) in &self.counters {
            allocated.inc_by(held);
            if busy > 0.0 {
                busy_counter.inc_by(busy);
            }
        }
        self.settled = now;
        if self.busy_since.is_some() {
            self.busy_since = Some(now);
        }
    }

    /// Its first request in flight began (in flight went from 0 to 1).
    pub fn busy(&mut self, now: Instant) {
        self.busy_since.get_or_insert(now);
    }

    /// Its last request in flight ended (in flight went back to 0).
    pub fn idle(&mut self, now: Instant) {
        if let Some(since) = self.busy_since.take() {
            let busy = now.saturating_duration_since(since).as_secs_f64();
            for (_, busy_counter) in &self.counters {
                busy_counter.inc_by(busy);
            }
        }
    }

    /// It was frozen.
    pub fn paused(&mut self) {
        self.paused_since.get_or_insert_with(now_us);
    }

    /// It was thawed (or is gone while paused).
    pub fn resumed(&mut self) {
        if let Some(from) = self.paused_since.take() {
            if self.record.paused.len() >= MAX_PAUSES {
                // The two oldest become one span of their summed length, ending where
                // the second ended.
                let (a, b) = (self.record.paused[0], self.record.paused[1]);
                let len = a.1.saturating_sub(a.0) + b.1.saturating_sub(b.0);
                self.record.paused[1] = (b.1.saturating_sub(len), b.1);
                self.record.paused.remove(0);
            }
            self.record.paused.push((from, now_us().max(from)));
        }
    }

    /// Its allocation so far, as if it ended now.
    pub fn so_far(&self) -> AllocationRecord {
        let now = now_us();
        let mut record = self.record.clone();
        record.ended_at_us = now;
        if let Some(from) = self.paused_since {
            record.paused.push((from, now.max(from)));
        }
        record
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        let now = Instant::now();
        self.idle(now);
        self.settle(now);
        self.resumed();
        self.record.ended_at_us = now_us();
        self.history
            .allocation(std::mem::replace(&mut self.record, empty()));
    }
}

fn empty() -> AllocationRecord {
    AllocationRecord {
        instance: String::new(),
        function: String::new(),
        node: String::new(),
        gpus: Vec::new(),
        started_at_us: 0,
        ended_at_us: 0,
        paused: Vec::new(),
    }
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meter")
            .field("devices", &self.devices)
            .field("busy", &self.busy_since.is_some())
            .field("paused", &self.paused_since.is_some())
            .finish()
    }
}
