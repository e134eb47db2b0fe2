//! What the API and `ember ls` show of a function: instances by phase, requests in flight
//! and waiting, the current run of failed starts, and why nothing can be placed.

use serde::Serialize;
use tokio::time::Instant;

use super::{Activator, Function, InstanceStatus};
use crate::model::Phase;

/// A function's status for `ember ls` and the API.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize)]
pub struct FunctionStatus {
    /// Function name.
    pub name: String,
    /// Current revision.
    pub revision: String,
    /// Image of the current revision.
    pub image: String,
    /// Instances starting.
    pub starting: usize,
    /// While instances start: milliseconds since the longest-starting one began.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub starting_ms: Option<u64>,
    /// While an instance's image is pulled or copied: how far (the first such instance).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_progress: Option<super::ImageStatus>,
    /// Instances the autoscaler wants.
    pub desired: usize,
    /// Instances ready.
    pub ready: usize,
    /// Instances paused (or pausing, resuming).
    pub paused: usize,
    /// Instances parked: stopped, their containers kept (or parking, unparking).
    pub parked: usize,
    /// Instances draining or stopping.
    pub draining: usize,
    /// Requests in flight.
    pub in_flight: u32,
    /// Requests waiting.
    pub queued: usize,
    /// Starts attempted since the gateway started.
    pub starts: u64,
    /// The current run of failed starts, if any.
    pub failure: Option<FailureStatus>,
    /// Why no instance can be placed now, if so.
    pub unschedulable: Option<String>,
    /// Each instance.
    pub instances: Vec<InstanceStatus>,
}

impl FunctionStatus {
    fn with_longest_start(mut self) -> Self {
        self.starting_ms = self.instances.iter().filter_map(|i| i.starting_ms).max();
        self.image_progress = self.instances.iter().find_map(|i| i.image_progress);
        self
    }
}

/// A run of failed starts, as shown to users.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize)]
pub struct FailureStatus {
    /// The last reason.
    pub message: String,
    /// Failures in a row.
    pub consecutive: u32,
    /// Milliseconds until a new start may be tried (0: now).
    pub retry_in_ms: u64,
}

impl Activator {
    /// The status of one function.
    pub fn status(&self, f: &Function) -> FunctionStatus {
        let st = f.lock();
        let now = Instant::now();
        let count = |p: fn(Phase) -> bool| st.instances.iter().filter(|i| p(i.phase)).count();
        FunctionStatus {
            name: f.name().to_string(),
            revision: st.revision.id.clone(),
            image: st.revision.manifest.image.clone().unwrap_or_default(),
            starting: count(|p| p == Phase::Starting),
            starting_ms: None,
            image_progress: None,
            desired: st.desired,
            ready: count(|p| p == Phase::Ready),
            paused: count(Phase::is_warm_tier),
            parked: count(Phase::is_stopped_tier),
            draining: count(|p| matches!(p, Phase::Draining | Phase::Stopping)),
            in_flight: st.instances.iter().map(|i| i.in_flight).sum(),
            queued: st.queue.len(),
            starts: st.starts,
            failure: st.failure.as_ref().map(|fl| FailureStatus {
                message: fl.message.clone(),
                consecutive: fl.consecutive,
                retry_in_ms: fl.retry_at.saturating_duration_since(now).as_millis() as u64,
            }),
            unschedulable: st.unschedulable.clone(),
            instances: st.instances.iter().map(|i| i.status(now)).collect(),
        }
        .with_longest_start()
    }
}
