//! The `instances` tree: the containers Ember placed, keyed `function/instance`, so that
//! one function's instances are one prefix and removing a function decodes nothing.

use serde::{Deserialize, Serialize};

use super::{encode, Change, Store, StoreError, TreeId};
use crate::model::GpuAssignment;

/// A running container that Ember placed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// Instance id (also the `ember.instance` label).
    pub id: String,
    /// Function name.
    pub function: String,
    /// Revision id.
    pub revision: String,
    /// Node name.
    pub node: String,
    /// Container id on that node.
    pub container_id: String,
    /// Address the instance answers on.
    pub endpoint: String,
    /// When it became ready (unix ms); 0 while it is still starting.
    pub ready_ms: u64,
    /// When its start began (unix ms); 0 in records older than this field.
    #[serde(default)]
    pub started_ms: u64,
    /// Devices it holds.
    #[serde(default)]
    pub gpus: Vec<GpuAssignment>,
}

/// The key of one instance.
pub(super) fn key(function: &str, instance: &str) -> Vec<u8> {
    format!("{function}/{instance}").into_bytes()
}

/// The key prefix of a function's instances.
pub(super) fn prefix(function: &str) -> Vec<u8> {
    key(function, "")
}

impl Store {
    /// Records a ready instance, durably.
    pub async fn put_instance(&self, instance: &InstanceRecord) -> Result<(), StoreError> {
        let k = key(&instance.function, &instance.id);
        self.write(vec![Change::Put(TreeId::Instances, k, encode(instance))])
            .await
    }

    /// Records an instance without waiting for the disk (a starting one: losing the record
    /// in a crash only loses the adoption of its load).
    pub fn put_instance_later(&self, instance: &InstanceRecord) {
        let k = key(&instance.function, &instance.id);
        self.write_later(vec![Change::Put(TreeId::Instances, k, encode(instance))]);
    }

    /// Forgets an instance without waiting for the disk (a failed start's: a record that
    /// survives a crash explains no container and is dropped at the next reconcile).
    pub fn delete_instance_later(&self, function: &str, id: &str) {
        self.write_later(vec![Change::Remove(TreeId::Instances, key(function, id))]);
    }

    /// Forgets an instance of `function`, durably.
    pub async fn delete_instance(&self, function: &str, id: &str) -> Result<(), StoreError> {
        self.write(vec![Change::Remove(TreeId::Instances, key(function, id))])
            .await
    }

    /// Forgets several instances, `(function, instance)`, in one durable write.
    pub async fn delete_instances(&self, which: &[(String, String)]) -> Result<(), StoreError> {
        let changes = which
            .iter()
            .map(|(f, i)| Change::Remove(TreeId::Instances, key(f, i)))
            .collect();
        self.write(changes).await
    }

    /// Every recorded instance.
    pub async fn instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        self.scan(TreeId::Instances, Vec::new()).await
    }
}
