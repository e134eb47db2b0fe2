//! The agent's node credential: traded once for a join token and kept in the data dir
//! (`node.json`, mode 0600) with the gateway it belongs to. The join token is never sent
//! again; a node that must join again needs a new one.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};

use crate::client::{render_api_error, ApiClient};
use crate::node::wire::{JoinRequest, Joined, PROTOCOL_VERSION};

/// The file in the data dir that holds the credential.
pub const CREDENTIAL_FILE: &str = "node.json";
/// The file earlier agents kept the gateway's id in (read to clean up after a move).
const LEGACY_MEMBERSHIP_FILE: &str = "agent.json";

/// What the agent keeps of its membership.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credential {
    /// The gateway's URL the agent joined.
    pub gateway: String,
    /// The gateway's id (the `ember.gateway` label of this node's containers).
    pub gateway_id: String,
    /// The node's name.
    pub name: String,
    /// The node credential.
    pub credential: String,
}

impl Credential {
    /// The credential in `dir`, if it is for `gateway` and `name`.
    pub fn load(dir: &Path, gateway: &str, name: &str) -> Option<Credential> {
        let text = std::fs::read_to_string(dir.join(CREDENTIAL_FILE)).ok()?;
        let cred: Credential = serde_json::from_str(&text).ok()?;
        (cred.gateway == gateway && cred.name == name).then_some(cred)
    }

    /// Keeps the credential in `dir`, readable by this user only.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let file = dir.join(CREDENTIAL_FILE);
        let text = serde_json::to_vec_pretty(self)?;
        crate::tls::write_file(&file, &text, 0o600)
            .with_context(|| format!("cannot keep the node credential in {}", file.display()))
    }

    /// Forgets the credential in `dir`.
    pub fn forget(dir: &Path) {
        let _ = std::fs::remove_file(dir.join(CREDENTIAL_FILE));
    }
}

/// The id of the gateway this data dir last belonged to, whichever it was.
pub fn previous_gateway_id(dir: &Path) -> Option<String> {
    [CREDENTIAL_FILE, LEGACY_MEMBERSHIP_FILE]
        .iter()
        .find_map(|f| {
            let text = std::fs::read_to_string(dir.join(f)).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            v["gateway_id"].as_str().map(str::to_string)
        })
}

/// Trades `join_token` for a node credential.
pub async fn join(
    client: &ApiClient,
    gateway: &str,
    join_token: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
) -> anyhow::Result<Credential> {
    let request = JoinRequest {
        protocol: PROTOCOL_VERSION,
        name: name.to_string(),
        labels: labels.clone(),
    };
    let headers = [
        ("authorization".to_string(), format!("Bearer {join_token}")),
        ("content-type".to_string(), "application/json".to_string()),
    ];
    let body = serde_json::to_vec(&request)?;
    let resp = client
        .send(Method::POST, "/api/v1/nodes/join", &headers, body.into())
        .await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    if status != StatusCode::OK {
        anyhow::bail!(
            "the gateway refused to let this node join: {}",
            render_api_error(status, &bytes)
        );
    }
    let joined: Joined = serde_json::from_slice(&bytes).context("the gateway's join answer")?;
    Ok(Credential {
        gateway: gateway.to_string(),
        gateway_id: joined.gateway_id,
        name: joined.name,
        credential: joined.credential,
    })
}
