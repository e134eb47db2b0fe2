//! Trace-replay simulator for keep-alive policies.
//!
//! `cargo run --release --example keepalive_sim [-- --json] [--functions N] [--days D]
//! [--seed S] [--start-ms MS]` generates a reproducible synthetic invocation trace whose
//! shape follows the characteristics published in "Serverless in the Wild" (Shahrad et
//! al., USENIX ATC 2020): most functions are invoked rarely (about 45 % at most once an
//! hour, over 80 % at most once a minute), a few very often with a daily rhythm, many on
//! timers, and some in bursts; execution times are log-normal, half under a second.
//!
//! The trace is replayed, function by function, through Ember's own keep-alive code: the
//! policy objects (`keepalive::Fixed` with 10 minutes, `keepalive::Hybrid`), the windows
//! the reaper applies (`keepalive::idle_threshold`, `keepalive::prewarm_due`), and the
//! reaper's retire decision (`autoscaler::retire`), with a simulated start time for cold
//! starts. It prints one row per policy with `cold_start_rate` and
//! `idle_instance_seconds` (time instances were loaded but not executing).

use std::time::Duration;

use ember::autoscaler::{self, InstanceView, RetirePolicy};
use ember::keepalive::{self, Fixed, Hybrid, KeepAlive, Windows};
use ember::model::Phase;
use serde::Serialize;

/// SplitMix64: small, fast, reproducible.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn log_uniform(&mut self, lo: f64, hi: f64) -> f64 {
        (lo.ln() + self.f64() * (hi.ln() - lo.ln())).exp()
    }
    fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.f64()).ln()
    }
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (1.0 - self.f64(), self.f64());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

const DAY: f64 = 86_400.0;

/// How one function is invoked.
#[derive(Debug, Clone, Copy)]
enum Pattern {
    /// Poisson with this mean gap, optionally with a daily rhythm.
    Poisson { mean_gap: f64, diurnal: bool },
    /// A timer with this period (and a little jitter).
    Timer { period: f64 },
    /// Quiet, then bursts of closely spaced calls.
    Bursty {
        burst_every: f64,
        size: u32,
        gap: f64,
    },
}

fn pattern(rng: &mut Rng) -> Pattern {
    let r = rng.f64();
    if r < 0.35 {
        Pattern::Poisson {
            mean_gap: rng.log_uniform(3600.0, 12.0 * 3600.0),
            diurnal: false,
        }
    } else if r < 0.45 {
        Pattern::Bursty {
            burst_every: rng.log_uniform(2.0 * 3600.0, 12.0 * 3600.0),
            size: 5 + (rng.f64() * 45.0) as u32,
            gap: rng.log_uniform(1.0, 30.0),
        }
    } else if r < 0.70 {
        let periods = [300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0];
        Pattern::Timer {
            period: periods[(rng.f64() * periods.len() as f64) as usize % periods.len()],
        }
    } else if r < 0.85 {
        Pattern::Poisson {
            mean_gap: rng.log_uniform(60.0, 3600.0),
            diurnal: true,
        }
    } else {
        Pattern::Poisson {
            mean_gap: rng.log_uniform(2.0, 60.0),
            diurnal: true,
        }
    }
}

/// The arrival times of one function over `horizon` seconds.
fn arrivals(rng: &mut Rng, p: Pattern, horizon: f64) -> Vec<f64> {
    let mut out = Vec::new();
    match p {
        Pattern::Poisson { mean_gap, diurnal } => {
            // Thinning: draw at the peak rate, keep with the rhythm's share.
            let peak = if diurnal { 1.8 } else { 1.0 };
            let phase = rng.f64() * DAY;
            let mut t = 0.0;
            loop {
                t += rng.exponential(mean_gap / peak);
                if t >= horizon {
                    break;
                }
                let rate = if diurnal {
                    1.0 + 0.8 * (2.0 * std::f64::consts::PI * (t + phase) / DAY).sin()
                } else {
                    1.0
                };
                if rng.f64() * peak < rate {
                    out.push(t);
                }
            }
        }
        Pattern::Timer { period } => {
            let mut t = rng.f64() * period;
            while t < horizon {
                out.push(t + rng.f64() * 2.0);
                t += period;
            }
        }
        Pattern::Bursty {
            burst_every,
            size,
            gap,
        } => {
            let mut t = rng.exponential(burst_every);
            while t < horizon {
                let mut s = t;
                for _ in 0..size {
                    if s >= horizon {
                        break;
                    }
                    out.push(s);
                    s += rng.exponential(gap);
                }
                t = s + rng.exponential(burst_every);
            }
        }
    }
    out
}

#[derive(Debug, Default, Clone, Serialize)]
struct Outcome {
    policy: String,
    invocations: u64,
    cold_starts: u64,
    cold_start_rate: f64,
    idle_instance_seconds: f64,
    /// 75th percentile over functions of their own cold-start rate (the paper's metric).
    p75_function_cold_start_rate: f64,
}

/// Whether the kept instance is still there `since_end` after the last call: the
/// reaper's own retire decision on a lone idle instance.
fn kept(w: &Windows, since_end: Duration) -> bool {
    let view = InstanceView {
        current: true,
        phase: Phase::Ready,
        in_flight: 0,
        idle: since_end,
        evacuating: false,
    };
    let policy = RetirePolicy {
        keep_alive: keepalive::idle_threshold(w, Duration::ZERO),
        desired: 0,
        min: 0,
        demand: 0,
    };
    autoscaler::retire(&[view], policy).is_empty()
}

/// Loaded-but-idle seconds in a gap of `gap` after a call, and whether a call at the gap's
/// end finds an instance loaded.
fn gap_outcome(w: &Windows, gap: f64) -> (f64, bool) {
    let since_end = Duration::from_secs_f64(gap);
    if w.prewarm.is_zero() {
        let keep = w.keep_alive.as_secs_f64();
        (gap.min(keep), kept(w, since_end))
    } else {
        let (from, to) = (
            w.prewarm.as_secs_f64(),
            (w.prewarm + w.keep_alive).as_secs_f64(),
        );
        let idle = (gap.min(to) - from).max(0.0);
        (idle, keepalive::prewarm_due(w, since_end))
    }
}

struct Call {
    at: f64,
    duration: f64,
}

fn replay(calls: &[Call], policy: &mut dyn KeepAlive, start: f64, horizon: f64) -> (u64, f64) {
    let mut cold = 0;
    let mut idle = 0.0;
    let mut busy_until: Option<f64> = None;
    for call in calls {
        let warm = match busy_until {
            None => false,
            // Overlapping calls share the running instance.
            Some(end) if call.at <= end => true,
            Some(end) => {
                let gap = call.at - end;
                let (idle_s, loaded) = gap_outcome(&policy.windows(), gap);
                idle += idle_s;
                policy.observe_gap(Duration::from_secs_f64(gap));
                loaded
            }
        };
        if !warm {
            cold += 1;
        }
        let begins = if warm { call.at } else { call.at + start };
        let ends = begins + call.duration;
        busy_until = Some(busy_until.map_or(ends, |b| b.max(ends)));
    }
    if let Some(end) = busy_until {
        if end < horizon {
            idle += gap_outcome(&policy.windows(), horizon - end).0;
        }
    }
    (cold, idle)
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let functions: usize = arg(&args, "--functions", 300);
    let days: f64 = arg(&args, "--days", 7.0);
    let seed: u64 = arg(&args, "--seed", 42);
    let start = arg::<f64>(&args, "--start-ms", 500.0) / 1000.0;
    let horizon = days * DAY;

    let mut rng = Rng(seed);
    let mut results = vec![
        Outcome {
            policy: "fixed-10m".into(),
            ..Default::default()
        },
        Outcome {
            policy: "adaptive".into(),
            ..Default::default()
        },
    ];
    let mut per_function: Vec<Vec<f64>> = vec![Vec::new(), Vec::new()];
    let mut rarely = 0;
    for _ in 0..functions {
        let p = pattern(&mut rng);
        let median = rng.log_uniform(0.05, 3.0);
        let calls: Vec<Call> = arrivals(&mut rng, p, horizon)
            .into_iter()
            .map(|at| Call {
                at,
                duration: median * (0.5 * rng.normal()).exp(),
            })
            .collect();
        if (calls.len() as f64) <= days * 24.0 {
            rarely += 1;
        }
        if calls.is_empty() {
            continue;
        }
        let mut policies: [Box<dyn KeepAlive>; 2] = [
            Box::new(Fixed::new(Duration::from_secs(600))),
            Box::new(Hybrid::new(Duration::from_secs(600))),
        ];
        for (i, policy) in policies.iter_mut().enumerate() {
            let (cold, idle) = replay(&calls, policy.as_mut(), start, horizon);
            let r = &mut results[i];
            r.invocations += calls.len() as u64;
            r.cold_starts += cold;
            r.idle_instance_seconds += idle;
            per_function[i].push(cold as f64 / calls.len() as f64);
        }
    }
    for (r, rates) in results.iter_mut().zip(per_function.iter_mut()) {
        r.cold_start_rate = r.cold_starts as f64 / r.invocations.max(1) as f64;
        rates.sort_by(|a, b| a.total_cmp(b));
        r.p75_function_cold_start_rate = rates
            .get(((rates.len() as f64 - 1.0) * 0.75).round() as usize)
            .copied()
            .unwrap_or(0.0);
        r.idle_instance_seconds = r.idle_instance_seconds.round();
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&results).expect("serializes")
        );
        return;
    }
    println!(
        "trace: {functions} functions over {days} days (seed {seed}); {rarely} invoked at most once an hour on average; cold start {:.0} ms",
        start * 1000.0
    );
    println!(
        "{:<10} {:>12} {:>12} {:>16} {:>22} {:>18}",
        "policy",
        "invocations",
        "cold_starts",
        "cold_start_rate",
        "idle_instance_seconds",
        "p75_fn_cold_rate"
    );
    for r in &results {
        println!(
            "{:<10} {:>12} {:>12} {:>16.4} {:>22.0} {:>18.4}",
            r.policy,
            r.invocations,
            r.cold_starts,
            r.cold_start_rate,
            r.idle_instance_seconds,
            r.p75_function_cold_start_rate
        );
    }
}
