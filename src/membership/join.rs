//! Joining: a join token is traded for a node credential. Tokens of `ember token create`
//! are spent by the join that uses them; the long-lived `--join-token` of `serve` lets any
//! number of agents join (for automated fleets), and an agent keeps a note of the token it
//! joined with, so a removed node does not come back by itself on that same token. Tokens
//! and credentials are random, shown once, stored only as their hash, and checked in
//! constant time. A name a joined node holds is not given to another join: a removed
//! node's name is free again.

use std::time::Duration;

use super::{Membership, MembershipError};
use crate::access::{hash_secret, matches_hash, new_secret};
use crate::node::wire::{JoinRequest, Joined};
use crate::store::{now_ms, NodeAddress, NodeMark, NodeRecord, TokenRecord};

/// Longest a join token may live.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// A join token as made, shown once.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NewToken {
    /// The token.
    pub token: String,
    /// When it stops working (unix ms).
    pub expires_ms: u64,
}

impl Membership {
    /// Makes a join token valid for `ttl`.
    pub async fn create_token(&self, ttl: Duration) -> Result<NewToken, MembershipError> {
        if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
            return Err(MembershipError::BadRegistration(format!(
                "ttl: expected between 1s and {}",
                humantime::format_duration(MAX_TOKEN_TTL)
            )));
        }
        let token = new_secret("ej");
        let created_ms = now_ms();
        let expires_ms = created_ms + ttl.as_millis() as u64;
        self.store
            .put_token(&TokenRecord {
                hash: hash_secret(&token),
                created_ms,
                expires_ms,
            })
            .await?;
        tracing::info!(expires_in = %humantime::format_duration(ttl), "join token created");
        Ok(NewToken { token, expires_ms })
    }

    /// Checks `presented`: the long-lived join token (`Ok(None)`), or a stored one not yet
    /// expired (`Ok(Some(hash))`, to spend once the join succeeds). An expired one is
    /// removed. Runs under `joining`.
    async fn check_join_token(&self, presented: &str) -> Result<Option<String>, MembershipError> {
        if self
            .join_token_hash
            .as_deref()
            .is_some_and(|h| matches_hash(presented, h))
        {
            return Ok(None);
        }
        let hash = hash_secret(presented);
        let Some(record) = self.store.token(&hash)? else {
            return Err(MembershipError::BadToken);
        };
        if record.expires_ms <= now_ms() {
            self.store.delete_token(&hash).await?;
            return Err(MembershipError::BadToken);
        }
        Ok(Some(hash))
    }

    /// An agent trades a join token for a node credential, under a name no joined node
    /// holds. A token of `ember token create` is spent, unless the request is refused for
    /// something other than the token.
    pub async fn join(
        &self,
        presented: Option<&str>,
        request: JoinRequest,
    ) -> Result<Joined, MembershipError> {
        let Some(presented) = presented else {
            return Err(MembershipError::BadToken);
        };
        let _one_at_a_time = self.joining.lock().await;
        let spend = self.check_join_token(presented).await?;
        crate::manifest::check_name(&request.name)
            .map_err(|e| MembershipError::BadRegistration(format!("name: {e}")))?;
        if RESERVED_NAMES.contains(&request.name.as_str()) {
            return Err(MembershipError::BadRegistration(format!(
                "name: `{}` is reserved by the node API; give the agent another --name",
                request.name
            )));
        }
        let stored = self.store.node(&request.name)?;
        let taken_by_embedded = stored
            .as_ref()
            .is_some_and(|n| n.address == NodeAddress::Embedded)
            || (self.remote(&request.name).is_none()
                && self.scheduler().node(&request.name).is_some());
        if taken_by_embedded {
            return Err(MembershipError::NameTaken(request.name));
        }
        if stored.is_some() {
            return Err(MembershipError::NodeExists(request.name));
        }
        if let Some(hash) = spend {
            self.store.delete_token(&hash).await?;
        }
        let credential = new_secret("en");
        let record = NodeRecord {
            name: request.name.clone(),
            address: NodeAddress::Agent,
            labels: request.labels,
            mark: NodeMark::None,
            credential: Some(hash_secret(&credential)),
        };
        self.store.join_node(&record).await?;
        self.remote_or_new(&record.name, &record);
        tracing::info!(node = %record.name, "node joined");
        Ok(Joined {
            gateway_id: self.gateway_id.clone(),
            name: record.name,
            credential,
        })
    }

    /// Checks a node's credential, in constant time; its hash, for the tunnel session to
    /// check again when it opens.
    pub fn check_credential(
        &self,
        name: &str,
        presented: Option<&str>,
    ) -> Result<String, MembershipError> {
        if name.is_empty() {
            return Err(MembershipError::BadRegistration(format!(
                "a tunnel names its node in the `{}` header",
                crate::node::tunnel::NODE_HEADER
            )));
        }
        let refused = || MembershipError::BadCredential(name.to_string());
        let presented = presented.ok_or_else(refused)?;
        let Some(record) = self.store.node(name)? else {
            // Only the agent that held the credential is told its node was removed.
            let removed = self.store.removed_node(name)?;
            if removed.is_some_and(|r| matches_hash(presented, &r.credential)) {
                return Err(MembershipError::NodeRemoved(name.to_string()));
            }
            return Err(refused());
        };
        match record.credential {
            Some(hash)
                if record.address == NodeAddress::Agent && matches_hash(presented, &hash) =>
            {
                Ok(hash)
            }
            _ => Err(refused()),
        }
    }
}

/// Names an agent may not take: the node routes' own path segments.
pub const RESERVED_NAMES: &[&str] = &["join", "tunnel"];
