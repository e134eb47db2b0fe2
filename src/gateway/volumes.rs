//! Node volumes through the gateway: `GET /api/v1/volumes` lists every node's volumes
//! with their size on disk, and `PUT /api/v1/nodes/{node}/volumes/{volume}/files/{*path}`
//! streams a file into one (`ember cp`), so an operator seeds model weights without
//! logging into the node. The body streams through to the node (and its tunnel) as it
//! arrives: a many-gigabyte file is never held in memory.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::Json;
use futures_util::future::join_all;
use serde::Serialize;

use super::error::ApiError;
use super::AppState;
use crate::node::volumes::VolumeInfo;

#[derive(utoipa::ToSchema, Serialize)]
struct NodeVolumes {
    node: String,
    /// Its volumes; absent when the node could not be asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    volumes: Option<Vec<VolumeInfo>>,
    /// Why it could not be asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(utoipa::ToSchema, Serialize)]
struct VolumeList {
    nodes: Vec<NodeVolumes>,
}

/// `GET /api/v1/volumes`: each node's volumes, asked of every node at once.
#[utoipa::path(
    get, operation_id = "list_volumes", path = "/api/v1/volumes", tag = "nodes",
    responses((status = 200, description = "Each node's volumes", body = VolumeList))
)]
pub async fn list_volumes(State(state): State<AppState>) -> Json<impl Serialize> {
    let nodes = state.activator().scheduler().nodes();
    let asked = nodes.iter().map(|node| async move {
        if !node.reachable() {
            return NodeVolumes {
                node: node.name().to_string(),
                volumes: None,
                error: Some("disconnected: its agent's tunnel is down".into()),
            };
        }
        match node.volumes().await {
            Ok(volumes) => NodeVolumes {
                node: node.name().to_string(),
                volumes: Some(volumes),
                error: None,
            },
            Err(e) => {
                tracing::warn!(node = %node.name(), error = %e, "listing its volumes failed");
                NodeVolumes {
                    node: node.name().to_string(),
                    volumes: None,
                    error: Some(e.public_message()),
                }
            }
        }
    });
    Json(VolumeList {
        nodes: join_all(asked).await,
    })
}

#[derive(utoipa::ToSchema, Serialize)]
#[schema(as = FileWritten)]
struct Written {
    node: String,
    volume: String,
    path: String,
    bytes: u64,
}

/// `PUT /api/v1/nodes/{node}/volumes/{volume}/files/{*path}`: the body becomes the file
/// (made, or replaced whole once it has all arrived).
#[utoipa::path(
    put, operation_id = "put_volume_file", path = "/api/v1/nodes/{node}/volumes/{volume}/files/{path}", tag = "nodes",
    params(
        ("node" = String, Path, description = "The node's name"),
        ("volume" = String, Path, description = "The volume's name"),
        ("path" = String, Path, description = "The file's path in the volume"),
    ),
    request_body(content = [u8], content_type = "application/octet-stream", description = "The file"),
    responses((status = 200, description = "Written", body = Written))
)]
pub async fn put_file(
    State(state): State<AppState>,
    Path((node, volume, path)): Path<(String, String, String)>,
    body: Body,
) -> Result<Json<impl Serialize>, ApiError> {
    let target = state
        .activator()
        .scheduler()
        .node(&node)
        .ok_or_else(|| crate::membership::MembershipError::UnknownNode(node.clone()))?;
    let bytes = target.put_file(&volume, &path, body).await?;
    tracing::info!(%node, %volume, %path, bytes, "file written into a node volume");
    // A volume this made is placeable at once, not from the node's next heartbeat on: a
    // deploy right after `ember cp` finds it.
    match target.volumes().await {
        Ok(volumes) => state
            .activator()
            .scheduler()
            .update_volumes(&node, volumes.into_iter().map(|v| v.name).collect()),
        Err(e) => tracing::warn!(%node, error = %e, "could not read the node's volumes back"),
    }
    Ok(Json(Written {
        node,
        volume,
        path,
        bytes,
    }))
}
