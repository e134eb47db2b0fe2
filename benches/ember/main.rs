//! Ember against its baselines, side by side, in one run.
//!
//! `cargo bench --bench ember` runs every scenario at full size; `-- --quick` runs each small
//! enough to finish in about a minute; `-- --only warm,tunnel,cold,stopped,cold-100,resume,burst,control,prefix,comfyui,history,batch,peer`
//! picks some.
//! Both print a table (medians, p99s, ratios) and write `target/ember-bench.json`: a list of
//! `{scenario, metric, ember, baseline, ratio, unit}`.
//!
//! Scenarios:
//! 1. warm path: the same requests through the gateway and straight to the container's
//!    published port (latency p50/p99, small and 1 MiB bodies; throughput at concurrency 64);
//! 2. cold start: first response of a scaled-to-zero function through the gateway vs the same
//!    create + start + readiness + first request done here with bollard, in alternating
//!    rounds (p50, p99 and the overhead at each);
//!    the stopped tier: `docker start` of a stopped container to its first response vs a
//!    fresh create + start, by hand;
//!    cold-100: 100 different functions cold at once, one request each, vs 100 concurrent
//!    tasks doing that sequence with bollard (p50/p95 time to first response; 20 in `--quick`);
//! 3. resume: first response of a paused instance vs the same `docker unpause` done here;
//! 4. burst: N concurrent requests into a cold function: all answered, containers started,
//!    gateway peak memory, time to the last answer;
//! 5. control plane: deploy many functions, list them, restart the gateway;
//! 6. tunnel: warm requests to an agent's container through the gateway and the tunnel
//!    vs the same container reached directly on its node;
//! 7. prefix: the OpenAI front door's prefix routing vs least-loaded routing over 4 stub
//!    model servers: prompt bytes from cache, simulated time to first token, balance;
//! 8. comfyui: prompts per minute through the ComfyUI front door with 1 and 3 stub
//!    instances vs one stub reached directly, and the time from `POST /prompt` to
//!    `execution_start` on a warm instance;
//! 9. history: warm throughput of a gateway keeping the invocation history vs one with
//!    `--history-max 0`, in alternating rounds, and one record per request;
//! 10. batch: jobs per second through `functions/batch-stub` (a fixed cost per call) with
//!     `[jobs] batch = { max = 32 }` against one job per call;
//! 11. peer: Ember's gateway against nginx (one worker, keep-alive upstream) in front of
//!     the same container: CPU µs per request, throughput and p50/p99 at concurrency 16
//!     and 64 under `wrk` (skipped without nginx).
//!
//! # Layout
//! - `warm`, `tunnel`, `cold`, `cold_many` (cold-100), `stopped`, `resume`, `burst`, `control`, `prefix`, `comfy`, `history`,
//!   `batch`, `peer`: one
//!   scenario each,
//!   `run(size, rows)`;
//! - `probe`: the HTTP client, process memory and Docker connection they measure with;
//! - `report`: rows, percentiles, the table and the JSON file.
#![allow(clippy::disallowed_methods)] // tasks a test spawns end with the test
#![allow(clippy::disallowed_types)] // the baselines drive Docker directly, as a user would

#[path = "../../tests/common/mod.rs"]
mod common;

mod batch;
mod burst;
mod cold;
mod cold_many;
mod comfy;
mod control;
mod history;
mod peer;
mod prefix;
mod probe;
mod report;
mod resume;
mod stopped;
mod tunnel;
mod warm;

use std::time::Duration;

use report::Row;

/// How much each scenario does.
struct Size {
    latency_requests: usize,
    big_requests: usize,
    throughput_for: Duration,
    cold_rounds: usize,
    /// Functions started cold at once by `cold-100`.
    cold_many: usize,
    burst: usize,
    functions: usize,
    prefix_requests: usize,
    comfy_prompts: usize,
    history_requests: usize,
    batch_jobs: usize,
}

impl Size {
    /// Small enough for every scenario to finish in about a minute.
    fn quick() -> Size {
        Size {
            latency_requests: 1000,
            big_requests: 100,
            throughput_for: Duration::from_secs(3),
            cold_rounds: 10,
            cold_many: 20,
            burst: 1000,
            functions: 200,
            prefix_requests: 500,
            comfy_prompts: 6,
            history_requests: 10_000,
            batch_jobs: 100,
        }
    }

    fn full() -> Size {
        Size {
            latency_requests: 10_000,
            big_requests: 1000,
            throughput_for: Duration::from_secs(10),
            cold_rounds: 20,
            cold_many: 100,
            burst: burst_size(),
            functions: 1000,
            prefix_requests: 2000,
            comfy_prompts: 12,
            history_requests: 50_000,
            batch_jobs: 1000,
        }
    }
}

/// 10 000, or as many as the open-file limit allows: the gateway holds two sockets per
/// request in flight (client and instance), and this process one.
fn burst_size() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|line| line.starts_with("Max open files"))
                .and_then(|line| line.split_whitespace().nth(3))
                .and_then(|v| v.parse::<usize>().ok())
        })
        .unwrap_or(1024);
    10_000.min(soft.saturating_sub(1024) / 2)
}

/// Whether `--only a,b` is absent or names `scenario` (for profiling one at a time).
fn wanted(scenario: &str) -> bool {
    let only: Option<Vec<String>> = std::env::args()
        .skip_while(|a| a != "--only")
        .nth(1)
        .map(|v| v.split(',').map(str::to_string).collect());
    only.as_ref()
        .is_none_or(|o| o.iter().any(|w| w == scenario))
}

/// Runs the wanted scenarios in order; returns their rows.
async fn run(size: &Size) -> Vec<Row> {
    let mut rows = Vec::new();
    common::echo_image();
    if wanted("warm") {
        eprintln!("warm path…");
        warm::run(size, &mut rows).await;
    }
    if wanted("tunnel") {
        eprintln!("tunnel…");
        tunnel::run(size, &mut rows).await;
    }
    if wanted("cold") {
        eprintln!("cold start…");
        cold::run(size, &mut rows).await;
    }
    if wanted("stopped") {
        eprintln!("stopped tier…");
        stopped::run(size, &mut rows).await;
    }
    if wanted("cold-100") {
        eprintln!("{} functions cold at once…", size.cold_many);
        cold_many::run(size, &mut rows).await;
    }
    if wanted("resume") {
        eprintln!("resume from pause…");
        resume::run(size, &mut rows).await;
    }
    if wanted("burst") {
        eprintln!("burst of {}…", size.burst);
        burst::run(size, &mut rows).await;
    }
    if wanted("control") {
        eprintln!("control plane…");
        control::run(size, &mut rows).await;
    }
    if wanted("prefix") {
        eprintln!("prefix routing…");
        prefix::run(size, &mut rows).await;
    }
    if wanted("comfyui") {
        eprintln!("ComfyUI front door…");
        comfy::run(size, &mut rows).await;
    }
    if wanted("history") {
        eprintln!("invocation history…");
        history::run(size, &mut rows).await;
    }
    if wanted("peer") {
        eprintln!("peer: Ember against nginx…");
        peer::run(size, &mut rows).await;
    }
    if wanted("batch") {
        eprintln!("batch mode…");
        batch::run(size, &mut rows).await;
    }
    rows
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let size = if quick { Size::quick() } else { Size::full() };
    if !common::docker_available() {
        eprintln!("the benchmark needs Docker");
        std::process::exit(1);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let rows = rt.block_on(run(&size));
    report::print_table(&rows);
    report::write_json(&rows);
}
