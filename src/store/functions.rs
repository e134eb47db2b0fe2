//! The `functions` tree (name → current revision) and the `revisions` tree
//! (`name/rev` → the immutable manifest of each revision).

use serde::{Deserialize, Serialize};

use super::{encode, Change, Store, StoreError, TreeId};
use crate::manifest::Manifest;

/// A deployed function: its name and current revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionRecord {
    /// Function name.
    pub name: String,
    /// Current revision id.
    pub revision: String,
    /// When the function was first deployed (unix ms).
    pub created_ms: u64,
    /// When the current revision was deployed (unix ms).
    pub updated_ms: u64,
}

/// An immutable revision of a function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevisionRecord {
    /// Revision id (the manifest's hash).
    pub id: String,
    /// The validated manifest.
    pub manifest: Manifest,
    /// When it was deployed (unix ms).
    pub created_ms: u64,
}

fn revision_key(function: &str, id: &str) -> Vec<u8> {
    format!("{function}/{id}").into_bytes()
}

impl Store {
    /// Records a deploy durably: the revision, then the function pointing at it, so that a
    /// crash between the two leaves the function on its previous revision, never on a
    /// missing one.
    pub async fn put_deploy(
        &self,
        function: &FunctionRecord,
        revision: &RevisionRecord,
    ) -> Result<(), StoreError> {
        self.write(vec![
            Change::Put(
                TreeId::Revisions,
                revision_key(&function.name, &revision.id),
                encode(revision),
            ),
            Change::Put(
                TreeId::Functions,
                function.name.as_bytes().to_vec(),
                encode(function),
            ),
        ])
        .await
    }

    /// One function, if deployed.
    pub fn function(&self, name: &str) -> Result<Option<FunctionRecord>, StoreError> {
        self.get(TreeId::Functions, name.as_bytes())
    }

    /// Every deployed function, by name.
    pub async fn functions(&self) -> Result<Vec<FunctionRecord>, StoreError> {
        self.scan(TreeId::Functions, Vec::new()).await
    }

    /// One revision of a function.
    pub fn revision(&self, function: &str, id: &str) -> Result<Option<RevisionRecord>, StoreError> {
        self.get(TreeId::Revisions, &revision_key(function, id))
    }

    /// Removes a function with its revisions, instance records and kept output, durably.
    /// The function goes first: what a crash leaves behind is unreferenced and harmless.
    pub async fn delete_function(&self, name: &str) -> Result<bool, StoreError> {
        let existed = self.function(name)?.is_some();
        self.write(vec![
            Change::Remove(TreeId::Functions, name.as_bytes().to_vec()),
            Change::RemovePrefix(TreeId::Revisions, revision_key(name, "")),
            Change::RemovePrefix(TreeId::Instances, super::instances::prefix(name)),
            Change::RemovePrefix(TreeId::InstanceLogs, super::logs::prefix(name)),
        ])
        .await?;
        Ok(existed)
    }
}
