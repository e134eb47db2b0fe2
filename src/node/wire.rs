//! The agent protocol: what an agent and the gateway say to each other, as JSON.
//!
//! The two ends upgrade separately, so these types are lenient where user input is strict:
//! unknown fields are ignored (a newer agent may send more), new fields come with serde
//! defaults, and `PROTOCOL_VERSION` says what an end speaks. Errors are Ember's one error
//! body (`model::ErrorBody`: `{"error":{"code","message"}}`) with a node failure's own
//! fields beside the code, so any client reads them and the gateway maps them back to the
//! same `NodeError` the embedded node gives.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::volumes::VolumeError;
use super::NodeError;
use crate::gpu::{GpuDriver, GpuInfo};
use crate::runtime::RuntimeError;

/// The version of this protocol an agent speaks (sent in its registration).
pub const PROTOCOL_VERSION: u32 = 1;

/// The GPUs an agent reports each time the gateway asks (`GET /node/v1/gpus`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Its GPUs now.
    #[serde(default)]
    pub gpus: Vec<GpuInfo>,
    /// The names of its node volumes now.
    #[serde(default)]
    pub volumes: Vec<String>,
}

/// What an agent says of itself when its tunnel opens (`GET /node/v1/info`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The protocol version the agent speaks.
    #[serde(default = "first_version")]
    pub protocol: u32,
    /// Node name.
    pub name: String,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How its containers get GPUs.
    pub gpu_driver: GpuDriver,
    /// Where its GPU facts come from.
    pub gpu_source: String,
    /// Its GPUs.
    #[serde(default)]
    pub gpus: Vec<GpuInfo>,
    /// The names of its node volumes.
    #[serde(default)]
    pub volumes: Vec<String>,
}

fn first_version() -> u32 {
    1
}

/// What an agent sends, with a join token, to join (`POST /api/v1/nodes/join`).
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The protocol version the agent speaks.
    #[serde(default = "first_version")]
    pub protocol: u32,
    /// Node name.
    pub name: String,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// What the gateway answers a join with. The credential is shown this once.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct Joined {
    /// The gateway's id: the agent labels its containers with it.
    pub gateway_id: String,
    /// The node's name.
    pub name: String,
    /// The node's credential: the agent keeps it (0600) and presents it when it dials.
    pub credential: String,
}

/// A node failure on the wire: its code, and the facts the gateway needs to handle it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum NodeFailure {
    /// The image is not on the node.
    ImageNotFound {
        /// The image.
        image: String,
    },
    /// The container exited as it started; it is left for its logs.
    ExitedAtStart {
        /// The container.
        container_id: String,
        /// Its exit code, when known.
        #[serde(default)]
        exit_code: Option<i64>,
        /// The engine's status word.
        status: String,
    },
    /// The node has no such volume (or the name is none).
    VolumeNotFound {
        /// The volume.
        volume: String,
    },
    /// A path inside a volume is not a plain relative one.
    InvalidPath {
        /// The path.
        path: String,
    },
    /// A pull failed; `reason` is the registry's.
    PullFailed {
        /// The image.
        image: String,
        /// The registry's words.
        reason: String,
    },
    /// The call lacked the agent's credential.
    Unauthorized,
    /// Anything else the node could not do (the message says what).
    #[serde(other)]
    Runtime,
}

/// A node failure with its message, as the `error` of an error body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireError {
    /// Code and facts.
    #[serde(flatten)]
    pub failure: NodeFailure,
    /// What happened, in the node's words.
    pub message: String,
}

/// The body an agent answers a failed call with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireErrorBody {
    /// The error.
    pub error: WireError,
}

impl WireErrorBody {
    /// The wire form of a node error.
    pub fn from_node_error(e: &NodeError) -> WireErrorBody {
        let failure = match e {
            NodeError::Runtime(RuntimeError::ImageNotFound(image)) => NodeFailure::ImageNotFound {
                image: image.clone(),
            },
            NodeError::ExitedAtStart {
                container_id,
                code,
                status,
            } => NodeFailure::ExitedAtStart {
                container_id: container_id.clone(),
                exit_code: *code,
                status: status.clone(),
            },
            NodeError::Volume(VolumeError::Missing(volume)) => NodeFailure::VolumeNotFound {
                volume: volume.clone(),
            },
            NodeError::Volume(VolumeError::BadName(_)) => NodeFailure::VolumeNotFound {
                volume: String::new(),
            },
            NodeError::Volume(VolumeError::BadPath(path)) => {
                NodeFailure::InvalidPath { path: path.clone() }
            }
            NodeError::Runtime(RuntimeError::Pull { image, reason }) => NodeFailure::PullFailed {
                image: image.clone(),
                reason: reason.clone(),
            },
            _ => NodeFailure::Runtime,
        };
        WireErrorBody {
            error: WireError {
                failure,
                message: e.to_string(),
            },
        }
    }

    /// A refusal for a call without the right credential.
    pub fn unauthorized(message: &str) -> WireErrorBody {
        WireErrorBody {
            error: WireError {
                failure: NodeFailure::Unauthorized,
                message: message.into(),
            },
        }
    }

    /// The node error it stands for, as `node` reported it.
    pub fn into_node_error(self, node: &str) -> NodeError {
        match self.error.failure {
            NodeFailure::ImageNotFound { image } => {
                NodeError::Runtime(RuntimeError::ImageNotFound(image))
            }
            NodeFailure::PullFailed { image, reason } => {
                NodeError::Runtime(RuntimeError::Pull { image, reason })
            }
            NodeFailure::ExitedAtStart {
                container_id,
                exit_code,
                status,
            } => NodeError::ExitedAtStart {
                container_id,
                code: exit_code,
                status,
            },
            NodeFailure::VolumeNotFound { volume } if !volume.is_empty() => {
                NodeError::Volume(VolumeError::Missing(volume))
            }
            NodeFailure::VolumeNotFound { .. } => {
                NodeError::Volume(VolumeError::BadName(self.error.message))
            }
            NodeFailure::InvalidPath { path } => NodeError::Volume(VolumeError::BadPath(path)),
            NodeFailure::Unauthorized | NodeFailure::Runtime => NodeError::Remote {
                node: node.to_string(),
                message: self.error.message,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ErrorBody, ErrorCode};

    #[test]
    fn node_errors_survive_the_wire() {
        let missing = NodeError::Runtime(RuntimeError::ImageNotFound("x:1".into()));
        let back = WireErrorBody::from_node_error(&missing).into_node_error("n");
        assert!(back.is_image_missing());
        let exited = NodeError::ExitedAtStart {
            container_id: "c".into(),
            code: Some(3),
            status: "exited".into(),
        };
        let wire = serde_json::to_string(&WireErrorBody::from_node_error(&exited)).unwrap();
        let back = serde_json::from_str::<WireErrorBody>(&wire)
            .unwrap()
            .into_node_error("n");
        assert!(matches!(
            back,
            NodeError::ExitedAtStart { code: Some(3), .. }
        ));
        let other = NodeError::Remote {
            node: "n".into(),
            message: "boom".into(),
        };
        let back = WireErrorBody::from_node_error(&other).into_node_error("n");
        assert!(back.to_string().contains("boom"));
    }

    #[test]
    fn node_errors_are_ember_error_bodies_with_their_facts_beside_the_code() {
        let exited = NodeError::ExitedAtStart {
            container_id: "c".into(),
            code: Some(3),
            status: "exited".into(),
        };
        let json = serde_json::to_value(WireErrorBody::from_node_error(&exited)).unwrap();
        assert_eq!(json["error"]["code"], "exited_at_start");
        assert_eq!(json["error"]["exit_code"], 3);
        let generic: ErrorBody = serde_json::from_value(json).unwrap();
        assert_eq!(generic.error.code, ErrorCode::ExitedAtStart);
        let newer = r#"{"error":{"code":"gpu_fell_off","message":"m","extra":1}}"#;
        let back: WireErrorBody = serde_json::from_str(newer).unwrap();
        assert_eq!(
            back.error.failure,
            NodeFailure::Runtime,
            "unknown codes read as runtime"
        );
    }

    #[test]
    fn node_info_from_a_newer_agent_with_more_fields_is_read() {
        let info: NodeInfo = serde_json::from_str(
            r#"{"name":"n","gpu_driver":"simulated","gpu_source":"x","future":true}"#,
        )
        .unwrap();
        assert_eq!(info.protocol, 1);
    }
}
