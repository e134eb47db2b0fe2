//! The agent's node credential: traded once for a join token and kept in the data dir
//! (`node.json`, mode 0600) with the gateway it belongs to. The join token is never sent
//! again; a node that must join again needs a new one.
//!
//! When the gateway says the node was removed, the agent forgets its credential and
//! leaves a note (`removed.json`) of the join token it had joined with: started again
//! with that same token (a long-lived one, say, in its service's environment) it refuses
//! to join, so a removed node stays removed until an operator gives it a new token.

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
/// The note a removed node leaves.
pub const REMOVED_FILE: &str = "removed.json";

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
    /// The hash of the join token the node joined with.
    #[serde(default)]
    pub join_token_hash: Option<String>,
}

/// A gateway URL as compared: without a trailing `/`.
pub fn normalize_url(url: &str) -> &str {
    url.trim_end_matches('/')
}

impl Credential {
    /// The credential in `dir`, if it is for `gateway` and `name`.
    pub fn load(dir: &Path, gateway: &str, name: &str) -> Option<Credential> {
        let text = std::fs::read_to_string(dir.join(CREDENTIAL_FILE)).ok()?;
        let cred: Credential = serde_json::from_str(&text).ok()?;
        let same_gateway = normalize_url(&cred.gateway) == normalize_url(gateway);
        (same_gateway && cred.name == name).then_some(cred)
    }

    /// Keeps the credential in `dir`, readable by this user only.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let file = dir.join(CREDENTIAL_FILE);
        let text = serde_json::to_vec_pretty(self)?;
        crate::tls::write_file(&file, &text, 0o600)
            .with_context(|| format!("cannot keep the node credential in {}", file.display()))
    }

    /// Forgets the credential in `dir` after the gateway removed the node, leaving a note
    /// of the join token it had joined with.
    pub fn forget_removed(&self, dir: &Path) -> anyhow::Result<()> {
        let note = Removed {
            gateway: self.gateway.clone(),
            name: self.name.clone(),
            join_token_hash: self.join_token_hash.clone(),
            removed: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        };
        let file = dir.join(REMOVED_FILE);
        crate::access::replace_file(&file, &serde_json::to_vec_pretty(&note)?, 0o600)
            .with_context(|| format!("cannot write {}", file.display()))?;
        let _ = std::fs::remove_file(dir.join(CREDENTIAL_FILE));
        Ok(())
    }
}

/// The note of a removal.
#[derive(Debug, Serialize, Deserialize)]
struct Removed {
    gateway: String,
    name: String,
    join_token_hash: Option<String>,
    removed: String,
}

/// Refuses to join with `join_token` if the node was removed after joining with it.
pub fn check_not_removed(dir: &Path, join_token: &str) -> anyhow::Result<()> {
    let file = dir.join(REMOVED_FILE);
    let Ok(text) = std::fs::read_to_string(&file) else {
        return Ok(());
    };
    let note: Option<Removed> = serde_json::from_str(&text).ok();
    let spent = note.as_ref().is_some_and(|n| {
        n.join_token_hash
            .as_deref()
            .is_some_and(|h| crate::access::matches_hash(join_token, h))
    });
    if spent {
        let note = note.expect("checked above");
        anyhow::bail!(
            "--token: node `{}` was removed from {} ({}) after joining with this very token, so it does not join again by itself. To bring it back, make a new token (`ember token create`) and pass it with --token, or delete {} to allow this one",
            note.name,
            note.gateway,
            note.removed,
            file.display()
        );
    }
    Ok(())
}

/// Clears the note of a removal, once the node has joined again.
pub fn clear_removed(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(REMOVED_FILE));
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
        gateway: normalize_url(gateway).to_string(),
        gateway_id: joined.gateway_id,
        name: joined.name,
        credential: joined.credential,
        join_token_hash: Some(crate::access::hash_secret(join_token)),
    })
}
