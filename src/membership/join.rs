//! Joining: join tokens (made by `ember token create`, or the long-lived `--join-token`)
//! are traded once for a node credential. Both are random, shown once, and stored only as
//! their hash; every check is in constant time.

use std::time::Duration;

use super::{Membership, MembershipError};
use crate::access::{hash_secret, matches_hash, new_secret, same_secret};
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

    /// Whether `presented` is the long-lived join token or a stored one not yet expired
    /// (an expired one is removed).
    async fn join_token_valid(&self, presented: &str) -> Result<bool, MembershipError> {
        if self
            .join_token
            .as_deref()
            .is_some_and(|t| same_secret(presented, t))
        {
            return Ok(true);
        }
        let hash = hash_secret(presented);
        let Some(record) = self.store.token(&hash)? else {
            return Ok(false);
        };
        if record.expires_ms <= now_ms() {
            self.store.delete_token(&hash).await?;
            return Ok(false);
        }
        Ok(true)
    }

    /// An agent trades a join token for a node credential. Joining again under a known
    /// name replaces its credential (the old one stops working) and keeps its marks.
    pub async fn join(
        &self,
        presented: Option<&str>,
        request: JoinRequest,
    ) -> Result<Joined, MembershipError> {
        let Some(presented) = presented else {
            return Err(MembershipError::BadToken);
        };
        if !self.join_token_valid(presented).await? {
            return Err(MembershipError::BadToken);
        }
        crate::manifest::check_name(&request.name).map_err(MembershipError::BadRegistration)?;
        let stored = self.store.node(&request.name)?;
        let taken_by_embedded = stored
            .as_ref()
            .is_some_and(|n| n.address == NodeAddress::Embedded)
            || (self.remote(&request.name).is_none()
                && self.scheduler().node(&request.name).is_some());
        if taken_by_embedded {
            return Err(MembershipError::NameTaken(request.name));
        }
        let credential = new_secret("en");
        let record = NodeRecord {
            name: request.name.clone(),
            address: NodeAddress::Agent,
            labels: request.labels,
            mark: stored.map_or(NodeMark::None, |n| n.mark),
            credential: Some(hash_secret(&credential)),
        };
        self.store.put_node(&record).await?;
        self.remote_or_new(&record.name, &record);
        // A tunnel of the old credential, if any, must not outlive it.
        self.close_session(&record.name);
        tracing::info!(node = %record.name, "node joined");
        Ok(Joined {
            gateway_id: self.gateway_id.clone(),
            name: record.name,
            credential,
        })
    }

    /// Checks a node's credential, in constant time.
    pub fn check_credential(
        &self,
        name: &str,
        presented: Option<&str>,
    ) -> Result<(), MembershipError> {
        let refused = || MembershipError::BadCredential(name.to_string());
        let record = self.store.node(name)?.ok_or_else(refused)?;
        match (record.credential, presented) {
            (Some(hash), Some(presented)) if matches_hash(presented, &hash) => Ok(()),
            _ => Err(refused()),
        }
    }
}
