//! Trace-replay simulator for keep-alive policies.
//!
//! `cargo run --release --example keepalive_sim [-- --json] [--functions N] [--days D]
//! [--seed S] [--start-ms MS]` generates a reproducible synthetic invocation trace
//! (`trace.rs`) and replays it, function by function, through Ember's own keep-alive code
//! (`replay.rs`): the policy objects (`keepalive::Fixed` with 10 and 20 minutes,
//! `keepalive::Hybrid`), the windows the reaper applies (`keepalive::idle_threshold`,
//! `keepalive::prewarm_due`), and the reaper's retire decision (`autoscaler::retire`),
//! with each function's start time. Beside them, `static-peak` holds every function's peak
//! concurrency loaded all week: what a fixed GPU allocation costs.
//!
//! Per policy it prints the cold starts, the seconds calls waited on starts, the idle
//! instance-seconds (loaded but not executing), the GPU-seconds (instance-seconds held by
//! GPU functions: starting, idle or busy) and the 75th percentile of the functions' own
//! cold-start rates; then the adaptive policy against fixed-10m and static-peak.

mod replay;
mod trace;

use std::time::Duration;

use ember::keepalive::{Fixed, Hybrid, KeepAlive};
use serde::Serialize;

use replay::Tally;

#[derive(Debug, Default, Clone, Serialize)]
struct Outcome {
    policy: String,
    invocations: u64,
    cold_starts: u64,
    cold_start_rate: f64,
    /// Seconds calls waited for an instance to start.
    cold_start_seconds: f64,
    idle_instance_seconds: f64,
    /// Instance-seconds held by GPU functions (starting, idle or busy).
    gpu_seconds: f64,
    /// 75th percentile over functions of their own cold-start rate (the paper's metric).
    p75_function_cold_start_rate: f64,
    #[serde(skip)]
    rates: Vec<f64>,
}

impl Outcome {
    fn add(&mut self, f: &trace::Function, t: &Tally) {
        self.invocations += f.calls.len() as u64;
        self.cold_starts += t.cold_starts;
        self.cold_start_seconds += t.cold_start_seconds;
        self.idle_instance_seconds += t.idle;
        if f.gpu {
            self.gpu_seconds += t.held();
        }
        self.rates
            .push(t.cold_starts as f64 / f.calls.len().max(1) as f64);
    }

    fn finish(&mut self) {
        self.cold_start_rate = self.cold_starts as f64 / self.invocations.max(1) as f64;
        self.rates.sort_by(|a, b| a.total_cmp(b));
        self.p75_function_cold_start_rate = self
            .rates
            .get(((self.rates.len() as f64 - 1.0) * 0.75).round() as usize)
            .copied()
            .unwrap_or(0.0);
        self.cold_start_seconds = self.cold_start_seconds.round();
        self.idle_instance_seconds = self.idle_instance_seconds.round();
        self.gpu_seconds = self.gpu_seconds.round();
    }
}

/// The keep-alive policies replayed, by name; the fallback (`idle_timeout`) is 10 minutes.
fn policies() -> Vec<(&'static str, Box<dyn KeepAlive>)> {
    let minutes = |m: u64| Duration::from_secs(60 * m);
    vec![
        ("fixed-10m", Box::new(Fixed::new(minutes(10)))),
        // Azure Functions' fixed keep-alive when Shahrad et al. measured it.
        ("fixed-20m", Box::new(Fixed::new(minutes(20)))),
        ("adaptive", Box::new(Hybrid::new(minutes(10)))),
    ]
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Relative change from `base` to `x`, in percent.
fn change(x: f64, base: f64) -> f64 {
    100.0 * (x - base) / base.max(f64::MIN_POSITIVE)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let functions: usize = arg(&args, "--functions", 300);
    let days: f64 = arg(&args, "--days", 7.0);
    let seed: u64 = arg(&args, "--seed", 42);
    let cpu_start = arg::<f64>(&args, "--start-ms", 500.0) / 1000.0;
    let horizon = days * trace::DAY;

    let (trace, shape) = trace::generate(seed, functions, horizon, cpu_start);
    let mut results: Vec<Outcome> = policies()
        .into_iter()
        .map(|(name, _)| name)
        .chain(["static-peak"])
        .map(|name| Outcome {
            policy: name.into(),
            ..Outcome::default()
        })
        .collect();
    for f in trace.iter().filter(|f| !f.calls.is_empty()) {
        for (i, (_, mut policy)) in policies().into_iter().enumerate() {
            results[i].add(f, &replay::replay(f, policy.as_mut(), horizon));
        }
        let last = results.len() - 1;
        results[last].add(f, &replay::static_peak(f, horizon));
    }
    results.iter_mut().for_each(Outcome::finish);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&results).expect("serializes")
        );
        return;
    }
    println!(
        "trace: {functions} functions over {days} days (seed {seed}); {} invoked at most once an hour on average; {} on GPUs (starts 5-60 s), the others start in {:.0} ms",
        shape.rarely,
        shape.gpu_functions,
        cpu_start * 1000.0
    );
    println!(
        "{:<12} {:>12} {:>12} {:>16} {:>19} {:>22} {:>14} {:>17}",
        "policy",
        "invocations",
        "cold_starts",
        "cold_start_rate",
        "cold_start_seconds",
        "idle_instance_seconds",
        "gpu_seconds",
        "p75_fn_cold_rate"
    );
    for r in &results {
        println!(
            "{:<12} {:>12} {:>12} {:>16.4} {:>19.0} {:>22.0} {:>14.0} {:>17.4}",
            r.policy,
            r.invocations,
            r.cold_starts,
            r.cold_start_rate,
            r.cold_start_seconds,
            r.idle_instance_seconds,
            r.gpu_seconds,
            r.p75_function_cold_start_rate
        );
    }
    let by = |name: &str| results.iter().find(|r| r.policy == name).expect("a row");
    let (fixed, adaptive, peak) = (by("fixed-10m"), by("adaptive"), by("static-peak"));
    println!(
        "adaptive against fixed-10m: cold starts {:+.1} %, idle instance-seconds {:+.1} %, p75 per-function cold-start rate {:.3}",
        change(adaptive.cold_starts as f64, fixed.cold_starts as f64),
        change(adaptive.idle_instance_seconds, fixed.idle_instance_seconds),
        adaptive.p75_function_cold_start_rate
    );
    println!(
        "adaptive against static-peak: GPU-seconds {:+.1} % at a cold-start rate of {:.2} %",
        change(adaptive.gpu_seconds, peak.gpu_seconds),
        100.0 * adaptive.cold_start_rate
    );
}
