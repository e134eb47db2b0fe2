//! `GET /metrics`: the Prometheus text exposition. Counters and histograms come as they
//! were recorded; the gauges are read from the activator and the scheduler at each scrape.
//! Admin-only unless `serve --metrics-public`.

use std::time::UNIX_EPOCH;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::AppState;
use crate::metrics::GpuGauge;

/// The route.
pub const PATH: &str = "/metrics";

/// The exposition format's content type.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /metrics`.
#[utoipa::path(
    get, operation_id = "metrics", path = "/metrics", tag = "observe",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain; version=0.0.4; charset=utf-8"))
)]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let a = state.activator();
    a.settle_usage();
    let text = a.metrics().render(|g| {
        for f in a.functions() {
            let s = a.status(&f);
            let by_state = [
                ("starting", s.starting),
                ("ready", s.ready),
                ("paused", s.paused),
                ("parked", s.parked),
                ("draining", s.draining),
            ];
            g.function(&s.name, s.queued, s.in_flight, s.desired, &by_state);
        }
        for (function, queued, running) in state.jobs.held() {
            g.jobs(&function, queued, running);
        }
        let (queued, bytes) = a.buffered();
        g.gateway(queued, bytes);
        for node in a.scheduler().status() {
            g.node(&node.name, &node.state.to_string());
            if let Some(heard) = state.membership.last_heard(&node.name) {
                let unix = heard.duration_since(UNIX_EPOCH).unwrap_or_default();
                g.heartbeat(&node.name, unix.as_secs_f64());
            }
            for status in &node.gpus {
                let gpu = &status.gpu;
                // A GPU held whole counts whole; shared ones count what their instances asked.
                let reserved = if status.reserved.exclusive {
                    gpu.memory_total
                } else {
                    status.reserved.memory
                };
                let whole = GpuGauge {
                    total: gpu.memory_total,
                    used: gpu.memory_used,
                    reserved,
                    utilization: gpu.utilization.map(|u| u / 100.0),
                };
                g.gpu(&node.name, &gpu.uuid, "", whole);
                for mig in &gpu.mig {
                    let held = status.mig_held.contains(&mig.uuid);
                    let slice = GpuGauge {
                        total: mig.memory_total,
                        used: mig.memory_used,
                        reserved: if held { mig.memory_total } else { 0 },
                        utilization: None,
                    };
                    g.gpu(&node.name, &gpu.uuid, &mig.uuid, slice);
                }
            }
        }
    });
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text)
}
