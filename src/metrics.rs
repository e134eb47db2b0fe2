//! The gateway's Prometheus metrics: one `Metrics` struct owning its registry.
//!
//! Counters and histograms are recorded where things happen: requests by the invoke core
//! (a [`RequestTimer`] records the duration when dropped), cold starts and their phases by
//! the activator (a [`PhaseTimer`] each). Gauges (queues, instances by state, nodes, GPUs)
//! are set from the activator's and the scheduler's state when `/metrics` is scraped, by
//! the gateway, through [`Gauges`]; this module knows none of those types (it sits under
//! them).
//!
//! Label values are bounded: function and node names, GPU uuids, status codes, error
//! codes, phases. No instance ids, paths or client addresses.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::{
    Counter, CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Buckets of request durations and queue waits, in seconds: 1 ms to 10 min.
const REQUEST_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0,
];
/// Buckets of cold start phases, in seconds: 1 ms (placement) to 30 min (a large pull).
const START_BUCKETS: &[f64] = &[
    0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0,
];

/// Buckets of jobs per batch: 1 to the largest `[jobs] batch.max`.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_seconds: HistogramVec,
    queue_wait_seconds: HistogramVec,
    cold_starts: IntCounterVec,
    cold_start_seconds: HistogramVec,
    queued: IntGaugeVec,
    in_flight: IntGaugeVec,
    instances: IntGaugeVec,
    desired: IntGaugeVec,
    gateway_queued: IntGauge,
    gateway_queued_bytes: IntGauge,
    node_up: IntGaugeVec,
    node_heartbeat: GaugeVec,
    gpu_memory_total: IntGaugeVec,
    gpu_memory_used: IntGaugeVec,
    gpu_memory_reserved: IntGaugeVec,
    gpu_utilization: GaugeVec,
    gpu_allocated_seconds: CounterVec,
    gpu_busy_seconds: CounterVec,
    jobs: IntGaugeVec,
    jobs_finished: IntCounterVec,
    job_batch_size: HistogramVec,
    /// One scrape at a time: each resets the gauges and sets them again.
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    let h = HistogramVec::new(opts, labels).expect("a valid metric");
    r.register(Box::new(h.clone())).expect("registered once");
    h
}

fn seconds(r: &Registry, name: &str, help: &str) -> CounterVec {
    let labels = ["function", "node", "gpu"];
    let c = CounterVec::new(Opts::new(name, help), &labels).expect("a valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

fn float_gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("a valid metric");
    r.register(Box::new(g.clone())).expect("registered once");
    g
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid metric");
    r.register(Box::new(g.clone())).expect("registered once");
    g
}

impl Metrics {
    /// Every metric, registered in a registry of its own.
    pub fn new() -> Metrics {
        let r = Registry::new();
        let gpu = ["node", "gpu", "mig"];
        let gateway_queued = IntGauge::new(
            "ember_gateway_queued_requests",
            "Requests waiting for an instance across all functions (--max-queued bounds them).",
        )
        .expect("a valid metric");
        r.register(Box::new(gateway_queued.clone()))
            .expect("registered once");
        let gateway_queued_bytes = IntGauge::new(
            "ember_gateway_queued_bytes",
            "Announced body bytes of the requests waiting (--max-queued-bytes bounds them).",
        )
        .expect("a valid metric");
        r.register(Box::new(gateway_queued_bytes.clone()))
            .expect("registered once");
        let gpu_utilization = GaugeVec::new(
            Opts::new(
                "ember_gpu_utilization_ratio",
                "GPU utilization, 0 to 1, as NVML reports it.",
            ),
            &gpu,
        )
        .expect("a valid metric");
        r.register(Box::new(gpu_utilization.clone()))
            .expect("registered once");
        Metrics {
            requests: counter(&r, "ember_requests_total", "Requests answered, by function, status code (or Ember's error code) and whether they waited for a cold start.", &["function", "code", "cold"]),
            request_seconds: histogram(&r, "ember_request_duration_seconds", "Time from a request's arrival to its response head, queue wait included.", &["function"], REQUEST_BUCKETS),
            queue_wait_seconds: histogram(&r, "ember_queue_wait_seconds", "Time a request waited for an instance.", &["function"], REQUEST_BUCKETS),
            cold_starts: counter(&r, "ember_cold_starts_total", "Instance starts, by function, node and outcome (ready, failed).", &["function", "node", "outcome"]),
            cold_start_seconds: histogram(&r, "ember_cold_start_seconds", "Time of each phase of a start: schedule (placement), pull (the image brought to a node that lacked it; no sample when it was there), create (container created and started), ready (until its readiness probe passed).", &["function", "phase"], START_BUCKETS),
            queued: gauge(&r, "ember_queued_requests", "Requests waiting for an instance, by function.", &["function"]),
            in_flight: gauge(&r, "ember_in_flight_requests", "Requests being served, by function.", &["function"]),
            instances: gauge(&r, "ember_instances", "Instances by function and state (starting, ready, paused, parked, draining).", &["function", "state"]),
            desired: gauge(&r, "ember_desired_instances", "Instances the autoscaler wants, by function.", &["function"]),
            gateway_queued,
            gateway_queued_bytes,
            node_up: gauge(&r, "ember_node_up", "1 for each node, labelled with its state (ready, cordoned, draining, lost).", &["node", "state"]),
            node_heartbeat: float_gauge(&r, "ember_node_last_heartbeat_seconds", "Unix time of the last heartbeat heard from each node (the embedded node's is the scrape's time: it is always heard).", &["node"]),
            gpu_memory_total: gauge(&r, "ember_gpu_memory_total_bytes", "GPU (or MIG slice) memory, in bytes.", &gpu),
            gpu_memory_used: gauge(&r, "ember_gpu_memory_used_bytes", "GPU (or MIG slice) memory in use, in bytes.", &gpu),
            gpu_memory_reserved: gauge(&r, "ember_gpu_memory_reserved_bytes", "GPU memory Ember reserved for instances (a whole GPU held exclusively counts whole), in bytes.", &gpu),
            gpu_utilization,
            gpu_allocated_seconds: seconds(&r, "ember_gpu_allocated_seconds_total", "GPU-seconds held by instances (lifetime × GPU slots, paused time included), by function, node and GPU slot (GPU or MIG uuid)."),
            gpu_busy_seconds: seconds(&r, "ember_gpu_busy_seconds_total", "GPU-seconds during which an instance holding the GPU slot had at least one request in flight."),
            jobs: gauge(&r, "ember_jobs", "Durable jobs held in the gateway's queues, by function and state (queued: waiting for a turn, a back-off or room; running: an attempt under way).", &["function", "state"]),
            jobs_finished: counter(&r, "ember_jobs_finished_total", "Jobs that ended, by function and final state (succeeded, failed, cancelled, expired).", &["function", "state"]),
            job_batch_size: histogram(&r, "ember_job_batch_size", "Jobs per request sent to a function in batch mode ([jobs] batch).", &["function"], BATCH_BUCKETS),
            registry: r,
            scrape: Mutex::new(()),
        }
    }

    /// A timer for one request of `function`; record its outcome with
    /// [`RequestTimer::finish`] (dropped unfinished, it counts as `code="aborted"`).
    pub fn request<'a>(&'a self, function: &'a str) -> RequestTimer<'a> {
        RequestTimer {
            metrics: self,
            function,
            began: Instant::now(),
            outcome: None,
        }
    }

    /// Records how long a request waited for an instance.
    pub fn queue_wait(&self, function: &str, waited: Duration) {
        self.queue_wait_seconds
            .with_label_values(&[function])
            .observe(waited.as_secs_f64());
    }

    /// A timer for one phase of a start, recorded when dropped.
    pub fn phase(&self, function: &str, phase: &'static str) -> PhaseTimer<'_> {
        PhaseTimer {
            metrics: self,
            function: function.to_string(),
            phase,
            began: Instant::now(),
        }
    }

    /// Records a start's placement time, measured by the caller.
    pub fn placed(&self, function: &str, took: Duration) {
        self.cold_start_seconds
            .with_label_values(&[function, "schedule"])
            .observe(took.as_secs_f64());
    }

    /// The allocated and busy GPU-seconds counters of one GPU slot of one function's
    /// instances on one node (resolved once per instance, then added to without lookups).
    pub fn gpu_seconds(&self, function: &str, node: &str, gpu: &str) -> (Counter, Counter) {
        let labels = [function, node, gpu];
        (
            self.gpu_allocated_seconds.with_label_values(&labels),
            self.gpu_busy_seconds.with_label_values(&labels),
        )
    }

    /// Counts a start that ended, `ready` or `failed`.
    pub fn start_ended(&self, function: &str, node: &str, outcome: &str) {
        self.cold_starts
            .with_label_values(&[function, node, outcome])
            .inc();
    }

    /// A job of `function` ended in `state`.
    pub fn job_finished(&self, function: &str, state: &str) {
        self.jobs_finished
            .with_label_values(&[function, state])
            .inc();
    }

    /// A batch of `n` jobs of `function` was sent.
    pub fn job_batch(&self, function: &str, n: usize) {
        self.job_batch_size
            .with_label_values(&[function])
            .observe(n as f64);
    }

    /// The text exposition: the gauges are set afresh by `fill`, then everything is encoded.
    pub fn render(&self, fill: impl FnOnce(&Gauges<'_>)) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        for g in [
            &self.queued,
            &self.in_flight,
            &self.instances,
            &self.desired,
            &self.node_up,
            &self.jobs,
        ] {
            g.reset();
        }
        for g in [
            &self.gpu_memory_total,
            &self.gpu_memory_used,
            &self.gpu_memory_reserved,
        ] {
            g.reset();
        }
        self.gpu_utilization.reset();
        self.node_heartbeat.reset();
        fill(&Gauges { m: self });
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("the text encoder writes to memory");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// Sets the gauges during a scrape.
pub struct Gauges<'a> {
    m: &'a Metrics,
}

impl Gauges<'_> {
    /// A function's queue, requests in flight, desired instances, and instances by state.
    pub fn function(
        &self,
        name: &str,
        queued: usize,
        in_flight: u32,
        desired: usize,
        by_state: &[(&str, usize)],
    ) {
        self.m.queued.with_label_values(&[name]).set(queued as i64);
        self.m
            .in_flight
            .with_label_values(&[name])
            .set(in_flight as i64);
        self.m
            .desired
            .with_label_values(&[name])
            .set(desired as i64);
        for (state, n) in by_state {
            self.m
                .instances
                .with_label_values(&[name, state])
                .set(*n as i64);
        }
    }

    /// A function's durable jobs in the gateway's queue: queued and running.
    pub fn jobs(&self, function: &str, queued: usize, running: usize) {
        for (state, n) in [("queued", queued), ("running", running)] {
            self.m
                .jobs
                .with_label_values(&[function, state])
                .set(n as i64);
        }
    }

    /// The gateway-wide queue.
    pub fn gateway(&self, queued: usize, bytes: u64) {
        self.m.gateway_queued.set(queued as i64);
        self.m.gateway_queued_bytes.set(bytes as i64);
    }

    /// A node and its state.
    pub fn node(&self, name: &str, state: &str) {
        self.m.node_up.with_label_values(&[name, state]).set(1);
    }

    /// When a node was last heard from, in seconds since the Unix epoch.
    pub fn heartbeat(&self, node: &str, unix_seconds: f64) {
        self.m
            .node_heartbeat
            .with_label_values(&[node])
            .set(unix_seconds);
    }

    /// A GPU (`mig` empty) or a MIG slice of it.
    pub fn gpu(&self, node: &str, gpu: &str, mig: &str, g: GpuGauge) {
        let labels = [node, gpu, mig];
        self.m
            .gpu_memory_total
            .with_label_values(&labels)
            .set(g.total as i64);
        self.m
            .gpu_memory_used
            .with_label_values(&labels)
            .set(g.used as i64);
        self.m
            .gpu_memory_reserved
            .with_label_values(&labels)
            .set(g.reserved as i64);
        if let Some(u) = g.utilization {
            self.m.gpu_utilization.with_label_values(&labels).set(u);
        }
    }
}

/// One GPU's or MIG slice's figures.
#[derive(Debug, Clone, Copy, Default)]
pub struct GpuGauge {
    /// Memory, bytes.
    pub total: u64,
    /// Memory in use, bytes.
    pub used: u64,
    /// Memory Ember reserved, bytes.
    pub reserved: u64,
    /// Utilization, 0 to 1, when known.
    pub utilization: Option<f64>,
}

/// Times one request; counts it when finished or dropped.
pub struct RequestTimer<'a> {
    metrics: &'a Metrics,
    function: &'a str,
    began: Instant,
    outcome: Option<(&'a str, bool)>,
}

impl<'a> RequestTimer<'a> {
    /// The request's outcome: its status code or Ember's error code, and whether it waited
    /// for a cold start. Borrowed: every request has one, and none needs a copy.
    pub fn finish(mut self, code: &'a str, cold: bool) {
        self.outcome = Some((code, cold));
    }
}

impl Drop for RequestTimer<'_> {
    fn drop(&mut self) {
        let (code, cold) = self.outcome.take().unwrap_or(("aborted", false));
        let cold = if cold { "true" } else { "false" };
        self.metrics
            .requests
            .with_label_values(&[self.function, code, cold])
            .inc();
        self.metrics
            .request_seconds
            .with_label_values(&[self.function])
            .observe(self.began.elapsed().as_secs_f64());
    }
}

/// Times one phase of a start; recorded when dropped.
pub struct PhaseTimer<'a> {
    metrics: &'a Metrics,
    function: String,
    phase: &'static str,
    began: Instant,
}

impl Drop for PhaseTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .cold_start_seconds
            .with_label_values(&[&self.function, self.phase])
            .observe(self.began.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_counts_once_with_its_code_and_a_scrape_shows_only_current_gauges() {
        let m = Metrics::new();
        m.request("echo").finish("200", true);
        drop(m.request("echo"));
        drop(m.phase("echo", "ready"));
        m.start_ended("echo", "local", "ready");
        let text = m.render(|g| {
            g.function("echo", 2, 1, 1, &[("ready", 1)]);
            g.node("local", "ready");
            g.heartbeat("local", 1_700_000_000.5);
            g.gpu(
                "local",
                "GPU-1",
                "",
                GpuGauge {
                    total: 10,
                    used: 5,
                    reserved: 10,
                    utilization: Some(0.5),
                },
            );
        });
        assert!(
            text.contains(r#"ember_requests_total{code="200",cold="true",function="echo"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"ember_requests_total{code="aborted",cold="false",function="echo"} 1"#)
        );
        assert!(text.contains(r#"ember_cold_start_seconds_count{function="echo",phase="ready"} 1"#));
        assert!(text.contains(r#"ember_queued_requests{function="echo"} 2"#));
        assert!(
            text.contains(r#"ember_gpu_memory_reserved_bytes{gpu="GPU-1",mig="",node="local"} 10"#)
        );
        assert!(text.contains("# HELP ember_cold_starts_total"));
        assert!(
            text.contains(r#"ember_node_last_heartbeat_seconds{node="local"} 1700000000.5"#),
            "{text}"
        );
        // A function gone since the last scrape leaves no gauge behind.
        let text = m.render(|_| {});
        assert!(
            !text.contains(r#"ember_queued_requests{function="echo"}"#),
            "{text}"
        );
        assert!(
            !text.contains("ember_node_last_heartbeat_seconds{"),
            "{text}"
        );
    }
}
