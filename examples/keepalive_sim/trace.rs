//! The synthetic trace: which functions there are, how often they are called, how long
//! calls run, and how long a function takes to start.
//!
//! Arrivals follow the characteristics published in "Serverless in the Wild" (Shahrad et
//! al., USENIX ATC 2020): most functions are invoked rarely (about 45 % at most once an
//! hour, over 80 % at most once a minute), a few very often with a daily rhythm, many on
//! timers, and some in bursts; execution times are log-normal, half under a second. Half
//! the functions run on a GPU and start by loading a model (5 to 60 s, log-uniform); the
//! others start in `--start-ms` (500 ms). Kinds and start times come from a stream of
//! their own, so the invocations of a seed are those the single-kind simulator drew.

use serde::Serialize;

/// SplitMix64: small, fast, reproducible.
pub struct Rng(pub u64);

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

pub const DAY: f64 = 86_400.0;

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

/// One call.
pub struct Call {
    /// When it arrives, in seconds from the trace's start.
    pub at: f64,
    /// How long it runs once it has an instance.
    pub duration: f64,
}

/// One function of the trace.
pub struct Function {
    /// Its calls, in arrival order.
    pub calls: Vec<Call>,
    /// Whether its instances hold a GPU.
    pub gpu: bool,
    /// How long one of its instances takes to start, in seconds.
    pub start: f64,
}

/// What the trace holds, for the report's first line.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Shape {
    pub functions: usize,
    pub gpu_functions: usize,
    /// Functions invoked at most once an hour on average.
    pub rarely: usize,
}

/// The functions of a trace of `functions` over `horizon` seconds; CPU functions start in
/// `cpu_start` seconds.
pub fn generate(
    seed: u64,
    functions: usize,
    horizon: f64,
    cpu_start: f64,
) -> (Vec<Function>, Shape) {
    let mut rng = Rng(seed);
    let mut kinds = Rng(seed ^ 0x6770_755F_6B69_6E64);
    let mut shape = Shape {
        functions,
        ..Shape::default()
    };
    let mut out = Vec::new();
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
        let gpu = kinds.f64() < 0.5;
        let start = if gpu {
            kinds.log_uniform(5.0, 60.0)
        } else {
            cpu_start
        };
        if (calls.len() as f64) <= horizon / 3600.0 {
            shape.rarely += 1;
        }
        shape.gpu_functions += usize::from(gpu);
        out.push(Function { calls, gpu, start });
    }
    (out, shape)
}
