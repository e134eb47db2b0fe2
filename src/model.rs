//! Shared leaf types: what several modules name and none of them owns.
//!
//! Instance phases, node states, GPU assignments and sharing modes, the stable error codes
//! and the error body every HTTP answer of Ember (gateway and agent) uses, and short ids.
//! This module imports nothing of the crate, so every other module may import it without
//! making a cycle.

use serde::{Deserialize, Serialize};

/// Where an instance is in its life.
///
/// starting → ready → draining → stopping → gone, with the warm tier on the side:
/// ready → pausing → paused → resuming → ready. Only ready instances take requests;
/// draining ones finish what they have and are stopped when idle; paused ones are frozen
/// (no CPU, memory and GPU memory kept) until a request resumes them; stopping ones are
/// being removed. Illegal transitions are refused by `can_become`, never by a panic.
#[derive(utoipa::ToSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Container being created, started and probed.
    Starting,
    /// Taking requests.
    Ready,
    /// No new requests; stopped once its in-flight requests finish.
    Draining,
    /// Being frozen.
    Pausing,
    /// Frozen; resumed by the next request that needs it.
    Paused,
    /// Being thawed.
    Resuming,
    /// Being stopped, its container kept.
    Parking,
    /// Stopped, its container kept; started again by the next request that needs it.
    Parked,
    /// Its container being started again and probed.
    Unparking,
    /// Being removed.
    Stopping,
}

impl Phase {
    /// Whether new requests may go to it.
    pub fn can_serve(self) -> bool {
        self == Phase::Ready
    }

    /// Whether it counts toward the function's capacity when deciding to scale.
    pub fn counts_as_capacity(self) -> bool {
        matches!(
            self,
            Phase::Starting | Phase::Ready | Phase::Resuming | Phase::Unparking
        )
    }

    /// Whether it serves now or soon will: starting, ready, or in the warm tier.
    pub fn will_serve(self) -> bool {
        matches!(self, Phase::Starting | Phase::Ready) || self.is_idle_tier()
    }

    /// Whether it is in the warm tier (pausing, paused or resuming).
    pub fn is_warm_tier(self) -> bool {
        matches!(self, Phase::Pausing | Phase::Paused | Phase::Resuming)
    }

    /// Whether it is in the stopped tier (parking, parked or unparking).
    pub fn is_stopped_tier(self) -> bool {
        matches!(self, Phase::Parking | Phase::Parked | Phase::Unparking)
    }

    /// Whether it is in either tier an idle instance may wait in.
    pub fn is_idle_tier(self) -> bool {
        self.is_warm_tier() || self.is_stopped_tier()
    }

    /// Whether it waits in a tier, neither entering nor leaving it: what a request may
    /// wake, and what `pause_timeout` or an eviction removes.
    pub fn is_kept_idle(self) -> bool {
        matches!(self, Phase::Paused | Phase::Parked)
    }

    /// Whether it may move to `next`.
    pub fn can_become(self, next: Phase) -> bool {
        use Phase::*;
        matches!(
            (self, next),
            (Starting, Ready)
                | (Starting, Stopping)
                | (Ready, Draining)
                | (Ready, Stopping)
                | (Ready, Pausing)
                | (Pausing, Paused)
                | (Pausing, Stopping)
                | (Paused, Resuming)
                | (Paused, Stopping)
                | (Resuming, Ready)
                | (Resuming, Stopping)
                | (Ready, Parking)
                | (Parking, Parked)
                | (Parking, Stopping)
                | (Parked, Unparking)
                | (Parked, Stopping)
                | (Unparking, Ready)
                | (Unparking, Stopping)
                | (Draining, Stopping)
        )
    }
}

/// Whether a node takes new instances.
#[derive(utoipa::ToSchema, Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Takes new instances.
    #[default]
    Ready,
    /// Takes no new instances; its instances go on.
    Cordoned,
    /// Takes no new instances; its instances are replaced elsewhere, then stopped when idle.
    Draining,
    /// Its connection to the gateway dropped: no new instances, its instances take no
    /// requests, until it reconnects (or is lost after the node timeout).
    Disconnected,
    /// Not heard from within the node timeout: its instances are replaced elsewhere.
    Lost,
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeState::Ready => "ready",
            NodeState::Cordoned => "cordoned",
            NodeState::Draining => "draining",
            NodeState::Disconnected => "disconnected",
            NodeState::Lost => "lost",
        })
    }
}

impl NodeState {
    /// Whether new instances may be placed there.
    pub fn schedulable(self) -> bool {
        self == NodeState::Ready
    }

    /// Whether the gateway can talk to it now.
    pub fn reachable(self) -> bool {
        !matches!(self, NodeState::Disconnected | NodeState::Lost)
    }
}

/// How an instance holds its GPUs.
#[derive(utoipa::ToSchema, Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sharing {
    /// A whole GPU, held by no other instance.
    #[default]
    Exclusive,
    /// Time-sliced: several instances on one GPU, accounted by their declared memory.
    Shared,
    /// A MIG instance of the asked profile.
    Mig,
}

impl std::fmt::Display for Sharing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Sharing::Exclusive => "exclusive",
            Sharing::Shared => "shared",
            Sharing::Mig => "mig",
        })
    }
}

/// One device given to an instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuAssignment {
    /// The physical GPU (`GPU-…`).
    pub gpu_uuid: String,
    /// What the container is given: the GPU UUID, or a `MIG-…` UUID.
    pub device_id: String,
    /// How it is held.
    pub sharing: Sharing,
    /// Memory reserved (shared: declared; mig: the instance's size; exclusive: declared or 0).
    pub memory: u64,
}

/// Secret values on their way to a container, by the variable they fill. They travel in
/// the start call only; `Debug` shows the variable names, never a value, so a spec that
/// ends up in a log line leaks nothing.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretEnv(pub std::collections::BTreeMap<String, String>);

impl SecretEnv {
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for SecretEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set()
            .entries(self.0.keys().map(|k| format!("{k}=<secret>")))
            .finish()
    }
}

/// The stable error codes of Ember's HTTP answers (gateway and agent). Clients match on
/// these, never on messages; a code is never renamed.
#[derive(utoipa::ToSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No function of that name.
    FunctionNotFound,
    /// The function was removed while the request waited.
    FunctionRemoved,
    /// The function has no instance of that id (or kept no output of one).
    InstanceNotFound,
    /// No job of that id.
    JobNotFound,
    /// The job has not ended: it has no result yet.
    JobNotFinished,
    /// The job is not in a state that allows what was asked (retrying a running job).
    JobStateConflict,
    /// The job's result is past its retention.
    JobResultExpired,
    /// An `Idempotency-Key` came back with another input.
    IdempotencyKeyReused,
    /// The manifest was refused (details name the fields).
    InvalidManifest,
    /// An image tag was refused.
    InvalidTag,
    /// The request body is over the function's `request.max_body`.
    BodyTooLarge,
    /// The function's queue is full.
    QueueFull,
    /// The request waited past `queue.timeout`.
    QueueTimeout,
    /// The gateway holds as many waiting requests as it may.
    GatewayFull,
    /// Starting an instance failed.
    StartFailed,
    /// No node has room (or none meets the requirements).
    NoCapacity,
    /// The gateway is shutting down.
    ShuttingDown,
    /// The function did not answer within `request.timeout`.
    UpstreamTimeout,
    /// The function's instance failed or broke the connection.
    UpstreamError,
    /// The image is on no node.
    ImageNotFound,
    /// A node could not do what was asked.
    NodeError,
    /// No node of that name.
    NodeNotFound,
    /// Not a node action.
    UnknownAction,
    /// An agent's registration is unusable.
    BadRegistration,
    /// The node has no such volume.
    VolumeNotFound,
    /// A path inside a volume is not a plain relative one.
    InvalidPath,
    /// The node name is the embedded node's, or a joined node holds it.
    NodeNameTaken,
    /// The node was removed (`ember nodes rm`), as the credential its agent presented
    /// proves: the agent should remove its containers and stop.
    NodeRemoved,
    /// A missing or wrong credential.
    Unauthorized,
    /// A key of that name exists.
    KeyNameTaken,
    /// No key of that name.
    KeyNotFound,
    /// No secret of that name.
    SecretNotFound,
    /// A function's manifest names the secret.
    SecretInUse,
    /// No login stored for that registry.
    RegistryNotFound,
    /// Another function serves that model id.
    ModelTaken,
    /// No function serves that model id.
    ModelNotFound,
    /// A container exited as it started (agent to gateway).
    ExitedAtStart,
    /// A container engine failure (agent to gateway).
    Runtime,
    /// The request itself is malformed.
    BadRequest,
    /// A failure of Ember itself; the log has the details.
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        ERROR_CODES
            .iter()
            .find(|(code, _)| *code == self)
            .map_or("internal", |(_, name)| name)
    }
}

/// Every code with its wire name, for `ErrorCode::as_str` and for documentation.
pub const ERROR_CODES: &[(ErrorCode, &str)] = &[
    (ErrorCode::FunctionNotFound, "function_not_found"),
    (ErrorCode::FunctionRemoved, "function_removed"),
    (ErrorCode::InstanceNotFound, "instance_not_found"),
    (ErrorCode::JobNotFound, "job_not_found"),
    (ErrorCode::JobNotFinished, "job_not_finished"),
    (ErrorCode::JobStateConflict, "job_state_conflict"),
    (ErrorCode::JobResultExpired, "job_result_expired"),
    (ErrorCode::IdempotencyKeyReused, "idempotency_key_reused"),
    (ErrorCode::InvalidManifest, "invalid_manifest"),
    (ErrorCode::InvalidTag, "invalid_tag"),
    (ErrorCode::BodyTooLarge, "body_too_large"),
    (ErrorCode::QueueFull, "queue_full"),
    (ErrorCode::QueueTimeout, "queue_timeout"),
    (ErrorCode::GatewayFull, "gateway_full"),
    (ErrorCode::StartFailed, "start_failed"),
    (ErrorCode::NoCapacity, "no_capacity"),
    (ErrorCode::ShuttingDown, "shutting_down"),
    (ErrorCode::UpstreamTimeout, "upstream_timeout"),
    (ErrorCode::UpstreamError, "upstream_error"),
    (ErrorCode::ImageNotFound, "image_not_found"),
    (ErrorCode::NodeError, "node_error"),
    (ErrorCode::NodeNotFound, "node_not_found"),
    (ErrorCode::UnknownAction, "unknown_action"),
    (ErrorCode::BadRegistration, "bad_registration"),
    (ErrorCode::VolumeNotFound, "volume_not_found"),
    (ErrorCode::InvalidPath, "invalid_path"),
    (ErrorCode::NodeNameTaken, "node_name_taken"),
    (ErrorCode::NodeRemoved, "node_removed"),
    (ErrorCode::Unauthorized, "unauthorized"),
    (ErrorCode::KeyNameTaken, "key_name_taken"),
    (ErrorCode::KeyNotFound, "key_not_found"),
    (ErrorCode::SecretNotFound, "secret_not_found"),
    (ErrorCode::SecretInUse, "secret_in_use"),
    (ErrorCode::RegistryNotFound, "registry_not_found"),
    (ErrorCode::ModelTaken, "model_taken"),
    (ErrorCode::ModelNotFound, "model_not_found"),
    (ErrorCode::ExitedAtStart, "exited_at_start"),
    (ErrorCode::Runtime, "runtime"),
    (ErrorCode::BadRequest, "bad_request"),
    (ErrorCode::Internal, "internal"),
];

/// One thing wrong with a document (a manifest, a query), at one field.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `scale.max`.
    pub field: String,
    /// What was wrong and what was expected.
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// The body of every error answer: `{"error":{"code","message","details"}}`.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong, for people (`message`) and programs (`code`, `details`).
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable code. Unknown codes (from a newer peer) read as `internal`.
    #[serde(deserialize_with = "lenient_code")]
    pub code: ErrorCode,
    /// What happened and what to do.
    pub message: String,
    /// Field errors, when the problem is in a document.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<FieldError>,
}

fn lenient_code<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ErrorCode, D::Error> {
    let s = String::deserialize(d)?;
    Ok(ERROR_CODES
        .iter()
        .find(|(_, name)| *name == s)
        .map_or(ErrorCode::Internal, |(code, _)| *code))
}

impl ErrorBody {
    /// An error body.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code,
                message: message.into(),
                details: Vec::new(),
            },
        }
    }

    /// With field errors.
    pub fn with_details(mut self, details: Vec<FieldError>) -> ErrorBody {
        self.error.details = details;
        self
    }
}

/// A short random id (12 hex digits): instance ids, the gateway id.
pub fn short_id() -> String {
    let mut id = uuid::Uuid::new_v4().simple().to_string();
    id.truncate(12);
    id
}

/// An error with its causes, `outer: inner: root`, for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::Phase::*;
    use super::*;

    #[test]
    fn only_ready_instances_serve() {
        assert!(Ready.can_serve());
        for p in [Starting, Draining, Stopping] {
            assert!(!p.can_serve(), "{p:?}");
        }
    }

    #[test]
    fn the_warm_tier_goes_round_and_can_always_stop() {
        assert!(Ready.can_become(Pausing));
        assert!(Pausing.can_become(Paused));
        assert!(Paused.can_become(Resuming));
        assert!(Resuming.can_become(Ready));
        for p in [Pausing, Paused, Resuming] {
            assert!(p.can_become(Stopping), "{p:?}");
            assert!(!p.can_serve(), "{p:?}");
        }
        assert!(!Paused.can_become(Ready), "resuming is a step of its own");
        assert!(!Starting.can_become(Pausing));
    }

    #[test]
    fn lifecycle_moves_forward_only() {
        assert!(Starting.can_become(Ready));
        assert!(Ready.can_become(Draining));
        assert!(Draining.can_become(Stopping));
        assert!(!Stopping.can_become(Ready));
        assert!(!Draining.can_become(Ready));
        assert!(!Ready.can_become(Starting));
        assert!(!Stopping.can_become(Stopping));
    }

    #[test]
    fn every_error_code_has_its_wire_name() {
        for (code, name) in ERROR_CODES {
            assert_eq!(serde_json::to_value(code).unwrap(), *name);
            assert_eq!(code.as_str(), *name);
        }
    }

    #[test]
    fn error_bodies_round_trip_and_unknown_codes_read_as_internal() {
        let body = ErrorBody::new(ErrorCode::QueueFull, "full").with_details(vec![FieldError {
            field: "scale.max".into(),
            message: "too big".into(),
        }]);
        let json = serde_json::to_string(&body).unwrap();
        assert_eq!(serde_json::from_str::<ErrorBody>(&json).unwrap(), body);
        let newer: ErrorBody =
            serde_json::from_str(r#"{"error":{"code":"from_the_future","message":"m"}}"#).unwrap();
        assert_eq!(newer.error.code, ErrorCode::Internal);
    }

    #[test]
    fn short_ids_are_twelve_hex_digits() {
        let id = short_id();
        assert_eq!(id.len(), 12);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
