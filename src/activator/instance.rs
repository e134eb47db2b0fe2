//! One instance (container) of one revision on one node, and its lifecycle.
//!
//! starting → ready → draining → stopping → gone, with the warm tier on the side:
//! ready → pausing → paused → resuming → ready. Only ready instances take requests;
//! draining ones finish what they have and are stopped when idle; paused ones are frozen
//! (no CPU, memory and GPU memory kept) until a request resumes them; stopping ones are
//! being removed. The phases and their guards are `model::Phase`.
//!
//! Each instance carries a retirement signal, cancelled as it leaves service (draining,
//! stopping, or forgotten): what outlives one request on it, an upgraded connection such
//! as a WebSocket, holds its permit and closes on that signal, so a socket never keeps a
//! retired instance alive.

use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::meter::{Ledger, Meter};
use super::Revision;
use crate::model::Phase;
use crate::scheduler::Reservation;

/// One instance.
#[derive(Debug)]
pub struct Instance {
    pub(crate) id: String,
    pub(crate) revision: Arc<Revision>,
    pub(crate) reservation: Reservation,
    pub(crate) container_id: Option<String>,
    pub(crate) endpoint: Option<SocketAddr>,
    pub(crate) phase: Phase,
    pub(crate) in_flight: u32,
    pub(crate) last_used: Instant,
    pub(crate) served: u64,
    pub(crate) adopted: bool,
    /// On a draining node: served only until a replacement elsewhere is ready.
    pub(crate) evacuating: bool,
    /// When it was paused.
    pub(crate) paused_at: Option<Instant>,
    /// A request wants it back while it is still pausing.
    pub(crate) resume_wanted: bool,
    /// When it last became ready (or was adopted or resumed).
    pub(crate) ready_at: Instant,
    /// When it last came up for requests: started, resumed or started again (`None` for
    /// one adopted as it ran). A request that queued before then and is served by it
    /// waited for it: a cold start.
    pub(crate) came_up: Option<Instant>,
    /// When its start began (unix ms; before a restart, for an adopted starting one).
    pub(crate) started_ms: u64,
    /// Cancelled when it leaves service.
    pub(crate) retired: Retired,
    /// While its image is on its way to the node: how far it has got.
    pub(crate) image: Option<Arc<super::ImageMeter>>,
    /// Its GPU time, busy time and pauses.
    pub(crate) meter: Meter,
}

/// An instance's retirement signal: cancelled when the instance drains, stops, or is
/// dropped (removed with its function, forgotten with its node), whichever comes first.
#[derive(Debug, Default)]
pub(crate) struct Retired(CancellationToken);

impl Retired {
    /// The token that permits on the instance watch.
    pub(crate) fn token(&self) -> &CancellationToken {
        &self.0
    }

    /// Signals the retirement now.
    pub(crate) fn signal(&self) {
        self.0.cancel();
    }
}

impl Drop for Retired {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl Instance {
    pub(crate) fn starting(
        id: String,
        revision: Arc<Revision>,
        reservation: Reservation,
        ledger: &Ledger,
    ) -> Self {
        let started_ms = crate::store::now_ms();
        let devices = reservation
            .gpus()
            .iter()
            .map(|g| g.device_id.clone())
            .collect();
        let meter = Meter::new(
            ledger,
            &id,
            &revision.manifest.name,
            reservation.node().name(),
            devices,
            started_ms * 1000,
        );
        Instance {
            id,
            revision,
            reservation,
            container_id: None,
            endpoint: None,
            phase: Phase::Starting,
            in_flight: 0,
            last_used: Instant::now(),
            served: 0,
            adopted: false,
            evacuating: false,
            paused_at: None,
            resume_wanted: false,
            ready_at: Instant::now(),
            came_up: None,
            started_ms,
            retired: Retired::default(),
            image: None,
            meter,
        }
    }

    /// Sets when its start began (an instance adopted after a restart: its time on the
    /// GPU counts from then).
    pub(crate) fn set_started_ms(&mut self, started_ms: u64) {
        if started_ms > 0 {
            self.started_ms = started_ms;
            self.meter.started_at(started_ms * 1000);
        }
    }

    /// Whether it is being set aside (paused or parked) and a request has asked for it
    /// back: it will serve once there, so it counts as capacity coming.
    pub(crate) fn wanted_back(&self) -> bool {
        matches!(self.phase, Phase::Pausing | Phase::Parking) && self.resume_wanted
    }

    /// Moves to `next` if the lifecycle allows it; returns whether it moved. Draining and
    /// stopping take it out of service: its retirement is signalled.
    #[must_use]
    pub(crate) fn become_(&mut self, next: Phase) -> bool {
        if self.phase.can_become(next) {
            self.phase = next;
            if matches!(next, Phase::Draining | Phase::Stopping) {
                self.retired.signal();
            }
            true
        } else {
            false
        }
    }

    /// Becomes ready (from starting or resuming) at `now`; false when its phase forbids it.
    #[must_use]
    pub(crate) fn ready(&mut self, now: Instant) -> bool {
        if !self.become_(Phase::Ready) {
            return false;
        }
        self.paused_at = None;
        self.meter.resumed();
        self.last_used = now;
        self.ready_at = now;
        self.came_up = Some(now);
        true
    }

    /// An instance found running after a restart, in the phase it is found in: ready,
    /// paused (frozen), or draining (an old revision's).
    pub(crate) fn adopted(mut self, phase: Phase, now: Instant) -> Instance {
        self.adopted = true;
        self.phase = phase;
        if phase == Phase::Draining {
            self.retired.signal();
        }
        self.last_used = now;
        self.ready_at = now;
        if phase.is_kept_idle() {
            self.paused_at = Some(now);
            self.meter.paused();
        }
        self
    }

    pub(crate) fn has_free_slot(&self) -> bool {
        self.in_flight < self.revision.manifest.scale.concurrency
    }
}

/// What the API shows of an instance.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize)]
pub struct InstanceStatus {
    /// Instance id.
    pub id: String,
    /// Revision id.
    pub revision: String,
    /// Node name.
    pub node: String,
    /// Container id, once created.
    pub container_id: Option<String>,
    /// Address it answers on.
    pub endpoint: Option<String>,
    /// Lifecycle phase.
    pub phase: Phase,
    /// Requests in flight.
    pub in_flight: u32,
    /// Requests served.
    pub served: u64,
    /// Milliseconds since its last request finished.
    pub idle_ms: u64,
    /// Whether it was adopted from before a gateway restart.
    pub adopted: bool,
    /// Whether its node is draining and it waits for a replacement.
    pub evacuating: bool,
    /// Devices it holds (`GPU-…` or `MIG-…`).
    pub gpus: Vec<String>,
    /// While starting: milliseconds since its start began (a model load shows here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub starting_ms: Option<u64>,
    /// While its image is pulled or copied to its node: how far that has got.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_progress: Option<super::ImageStatus>,
}

impl Instance {
    pub(crate) fn status(&self, now: Instant) -> InstanceStatus {
        InstanceStatus {
            id: self.id.clone(),
            revision: self.revision.id.clone(),
            node: self.reservation.node().name().to_string(),
            container_id: self.container_id.clone(),
            endpoint: self.endpoint.map(|e| e.to_string()),
            phase: self.phase,
            in_flight: self.in_flight,
            served: self.served,
            idle_ms: if self.in_flight > 0 {
                0
            } else {
                now.saturating_duration_since(self.last_used).as_millis() as u64
            },
            adopted: self.adopted,
            evacuating: self.evacuating,
            gpus: self
                .reservation
                .gpus()
                .iter()
                .map(|g| g.device_id.clone())
                .collect(),
            starting_ms: (self.phase == Phase::Starting)
                .then(|| crate::store::now_ms().saturating_sub(self.started_ms)),
            image_progress: self
                .image
                .as_ref()
                .filter(|_| self.phase == Phase::Starting)
                .map(|m| m.status()),
        }
    }
}
