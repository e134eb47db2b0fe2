//! The `tokens` tree: join tokens made by `ember token create`, kept as their hash with
//! an expiry. A join token lets an agent join once per start-up; an expired one is refused
//! and removed.

use serde::{Deserialize, Serialize};

use super::{encode, Change, Store, StoreError, TreeId};

/// A join token, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The token's hash (`access::hash_secret`): also its key.
    pub hash: String,
    /// When it was made (unix ms).
    pub created_ms: u64,
    /// When it stops working (unix ms).
    pub expires_ms: u64,
}

impl Store {
    /// Records a join token, durably.
    pub async fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        let k = token.hash.as_bytes().to_vec();
        self.write(vec![Change::Put(TreeId::Tokens, k, encode(token))])
            .await
    }

    /// The token with this hash, if it exists.
    pub fn token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.get(TreeId::Tokens, hash.as_bytes())
    }

    /// Forgets a token.
    pub async fn delete_token(&self, hash: &str) -> Result<(), StoreError> {
        let k = hash.as_bytes().to_vec();
        self.write(vec![Change::Remove(TreeId::Tokens, k)]).await
    }
}
