//! The `keys` tree: invoke and admin keys, kept as their hash. Two kinds of entries share
//! the tree: `name/NAME` → the key's record, and `hash/HASH` → its name, so a presented
//! key is found by one point read of its hash, never by trying every key.

use serde::{Deserialize, Serialize};

use super::{encode, Change, Store, StoreError, TreeId};
use crate::access::Scope;

/// A key: its name, what it may do and the hash of its secret (the secret itself is shown
/// once, when it is made, and never kept).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The key's name (a DNS label), unique.
    pub name: String,
    /// What it may do.
    pub scope: Scope,
    /// Hex SHA-256 of the secret.
    pub hash: String,
    /// When it was made (unix ms).
    pub created_ms: u64,
}

fn name_key(name: &str) -> Vec<u8> {
    format!("name/{name}").into_bytes()
}

fn hash_key(hash: &str) -> Vec<u8> {
    format!("hash/{hash}").into_bytes()
}

impl Store {
    /// Records a new key durably. The caller makes sure the name is free (see
    /// [`Store::key`]); the record goes first, so a crash before the index leaves a key
    /// that was never shown to anyone and matches nothing.
    pub async fn put_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        self.write(vec![
            Change::Put(TreeId::Keys, name_key(&key.name), encode(key)),
            Change::Put(TreeId::Keys, hash_key(&key.hash), encode(&key.name)),
        ])
        .await
    }

    /// One key, by name.
    pub fn key(&self, name: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.get(TreeId::Keys, &name_key(name))
    }

    /// The key whose secret hashes to `hash`, if one does.
    pub fn key_by_hash(&self, hash: &str) -> Result<Option<KeyRecord>, StoreError> {
        let Some(name) = self.get::<String>(TreeId::Keys, &hash_key(hash))? else {
            return Ok(None);
        };
        Ok(self.key(&name)?.filter(|k| k.hash == hash))
    }

    /// Every key, by name.
    pub async fn keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.scan(TreeId::Keys, b"name/".to_vec()).await
    }

    /// Revokes a key durably; once this returns, the key matches nothing. The index goes
    /// first: what a crash leaves behind is a record no secret leads to.
    pub async fn delete_key(&self, name: &str) -> Result<bool, StoreError> {
        let Some(key) = self.key(name)? else {
            return Ok(false);
        };
        self.write(vec![
            Change::Remove(TreeId::Keys, hash_key(&key.hash)),
            Change::Remove(TreeId::Keys, name_key(name)),
        ])
        .await?;
        Ok(true)
    }
}
