//! The `secrets` tree: values a manifest names in `env` (`{ secret = "hf" }`), by name.
//! They sit in the data dir's state, which only the gateway's user can read (the store
//! makes `state/` 0700); they leave the store only into a node's start call.
//!
//! The `registries` tree holds registry logins (`ember registry login`), by host: secrets
//! of their own kind, which leave the store only into a node's pull call.

use serde::{Deserialize, Serialize};

use super::{encode, Change, Store, StoreError, TreeId};

/// A secret, as stored. `Debug` leaves the value out.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretRecord {
    /// Its name (also its key).
    pub name: String,
    /// Its value.
    pub value: String,
    /// When it was first set (unix ms).
    pub created_ms: u64,
    /// When it was last set (unix ms).
    pub updated_ms: u64,
}

impl std::fmt::Debug for SecretRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretRecord")
            .field("name", &self.name)
            .field("updated_ms", &self.updated_ms)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Sets a secret, durably.
    pub async fn put_secret(&self, secret: &SecretRecord) -> Result<(), StoreError> {
        let k = secret.name.as_bytes().to_vec();
        self.write(vec![Change::Put(TreeId::Secrets, k, encode(secret))])
            .await
    }

    /// One secret.
    pub fn secret(&self, name: &str) -> Result<Option<SecretRecord>, StoreError> {
        self.get(TreeId::Secrets, name.as_bytes())
    }

    /// Every secret.
    pub async fn secrets(&self) -> Result<Vec<SecretRecord>, StoreError> {
        self.scan(TreeId::Secrets, Vec::new()).await
    }

    /// Forgets a secret, durably.
    pub async fn delete_secret(&self, name: &str) -> Result<(), StoreError> {
        let k = name.as_bytes().to_vec();
        self.write(vec![Change::Remove(TreeId::Secrets, k)]).await
    }
}

/// A registry login, as stored. `Debug` leaves the password out.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryRecord {
    /// The registry (`HOST[:PORT]`; `docker.io` for Docker Hub), also its key.
    pub host: String,
    /// User name.
    pub username: String,
    /// Password or access token.
    pub password: String,
    /// When it was last set (unix ms).
    pub updated_ms: u64,
}

impl std::fmt::Debug for RegistryRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryRecord")
            .field("host", &self.host)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Sets a registry login, durably.
    pub async fn put_registry(&self, login: &RegistryRecord) -> Result<(), StoreError> {
        let k = login.host.as_bytes().to_vec();
        self.write(vec![Change::Put(TreeId::Registries, k, encode(login))])
            .await
    }

    /// The login for `host`, if any.
    pub fn registry(&self, host: &str) -> Result<Option<RegistryRecord>, StoreError> {
        self.get(TreeId::Registries, host.as_bytes())
    }

    /// Every registry login.
    pub async fn registries(&self) -> Result<Vec<RegistryRecord>, StoreError> {
        self.scan(TreeId::Registries, Vec::new()).await
    }

    /// Forgets a registry login, durably.
    pub async fn delete_registry(&self, host: &str) -> Result<(), StoreError> {
        let k = host.as_bytes().to_vec();
        self.write(vec![Change::Remove(TreeId::Registries, k)])
            .await
    }
}
