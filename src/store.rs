//! Durable state in sled: the only module that touches sled.
//!
//! Trees: `functions` (name → current revision), `revisions` (`name/rev` → manifest),
//! `instances` (id → container placement), `nodes` (name → agent URL, labels, cordon and
//! drain), `meta` (schema version, gateway id).
//! Every value is JSON inside a versioned envelope (`{"v":1,"data":…}`) so that later
//! versions can still read old data. Deploys and removals are flushed before they are
//! acknowledged; sled's own calls are fast in-memory operations, the flush is the only
//! slow part and runs on sled's async flush.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;

/// Schema version written into `meta` and every value envelope.
pub const SCHEMA_VERSION: u32 = 1;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled refused an operation (disk full, corruption, another process holding the lock).
    #[error("state store: {0}")]
    Sled(#[from] sled::Error),
    /// A transaction across trees failed.
    #[error("state store transaction: {0}")]
    Transaction(String),
    /// A value could not be decoded.
    #[error("state store: record {key} is unreadable: {reason}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// What the decoder said.
        reason: String,
    },
    /// The data dir was written by a newer Ember.
    #[error("state store schema version {found} is newer than this Ember understands ({SCHEMA_VERSION}); upgrade Ember")]
    TooNew {
        /// The version found on disk.
        found: u32,
    },
}

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
    /// When it became ready (unix ms).
    pub ready_ms: u64,
    /// Devices it holds.
    #[serde(default)]
    pub gpus: Vec<crate::model::GpuAssignment>,
}

/// A node the gateway knows: where its agent answers and what an operator set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node name.
    pub name: String,
    /// Agent URL (`embedded` for the gateway's own node).
    pub url: String,
    /// Labels.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Cordoned by an operator.
    #[serde(default)]
    pub cordoned: bool,
    /// Draining by an operator.
    #[serde(default)]
    pub draining: bool,
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    v: u32,
    data: T,
}

/// The state store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    functions: sled::Tree,
    revisions: sled::Tree,
    instances: sled::Tree,
    nodes: sled::Tree,
    meta: sled::Tree,
}

impl Store {
    /// Opens (or creates) the store under `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new().path(dir.join("state")).open()?;
        let store = Store {
            functions: db.open_tree("functions")?,
            revisions: db.open_tree("revisions")?,
            instances: db.open_tree("instances")?,
            nodes: db.open_tree("nodes")?,
            meta: db.open_tree("meta")?,
            db,
        };
        match store.meta.get("schema_version")? {
            Some(v) => {
                let found = u32::from_be_bytes(v.as_ref().try_into().unwrap_or([0, 0, 0, 0]));
                if found > SCHEMA_VERSION {
                    return Err(StoreError::TooNew { found });
                }
            }
            None => {
                store
                    .meta
                    .insert("schema_version", &SCHEMA_VERSION.to_be_bytes())?;
            }
        }
        Ok(store)
    }

    /// The id of the gateway owning this data dir: generated once, then stable.
    /// Containers are labelled with it so gateways sharing a Docker engine leave each
    /// other's containers alone.
    pub async fn gateway_id(&self) -> Result<String, StoreError> {
        if let Some(id) = self.meta.get("gateway_id")? {
            return Ok(String::from_utf8_lossy(&id).into_owned());
        }
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        self.meta.insert("gateway_id", id.as_bytes())?;
        self.db.flush_async().await?;
        Ok(id)
    }

    /// Records a deploy: the revision and the function pointing at it, atomically and durably.
    pub async fn put_deploy(
        &self,
        function: &FunctionRecord,
        revision: &RevisionRecord,
    ) -> Result<(), StoreError> {
        use sled::Transactional;
        let fkey = function.name.as_bytes().to_vec();
        let rkey = revision_key(&function.name, &revision.id);
        let fval = encode(function);
        let rval = encode(revision);
        (&self.functions, &self.revisions)
            .transaction(|(f, r)| {
                r.insert(rkey.as_slice(), rval.as_slice())?;
                f.insert(fkey.as_slice(), fval.as_slice())?;
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| StoreError::Transaction(format!("{e:?}")))?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// One function, if deployed.
    pub fn function(&self, name: &str) -> Result<Option<FunctionRecord>, StoreError> {
        get(&self.functions, name.as_bytes())
    }

    /// Every deployed function, by name.
    pub fn functions(&self) -> Result<Vec<FunctionRecord>, StoreError> {
        scan(&self.functions, b"")
    }

    /// One revision of a function.
    pub fn revision(&self, function: &str, id: &str) -> Result<Option<RevisionRecord>, StoreError> {
        get(&self.revisions, &revision_key(function, id))
    }

    /// Removes a function with its revisions and instance records, durably.
    pub async fn delete_function(&self, name: &str) -> Result<bool, StoreError> {
        let existed = self.functions.remove(name.as_bytes())?.is_some();
        let prefix = revision_key(name, "");
        for key in self.revisions.scan_prefix(&prefix).keys() {
            self.revisions.remove(key?)?;
        }
        for instance in self.instances()? {
            if instance.function == name {
                self.instances.remove(instance.id.as_bytes())?;
            }
        }
        self.db.flush_async().await?;
        Ok(existed)
    }

    /// Records a ready instance.
    pub async fn put_instance(&self, instance: &InstanceRecord) -> Result<(), StoreError> {
        self.instances
            .insert(instance.id.as_bytes(), encode(instance))?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// Forgets an instance.
    pub async fn delete_instance(&self, id: &str) -> Result<(), StoreError> {
        self.instances.remove(id.as_bytes())?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// Every recorded instance.
    pub fn instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        scan(&self.instances, b"")
    }

    /// Records a node, durably.
    pub async fn put_node(&self, node: &NodeRecord) -> Result<(), StoreError> {
        self.nodes.insert(node.name.as_bytes(), encode(node))?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// One node.
    pub fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        get(&self.nodes, name.as_bytes())
    }

    /// Every node.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        scan(&self.nodes, b"")
    }
}

fn revision_key(function: &str, id: &str) -> Vec<u8> {
    format!("{function}/{id}").into_bytes()
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(&Envelope {
        v: SCHEMA_VERSION,
        data: value,
    })
    .expect("records always serialize")
}

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason,
    };
    #[derive(Deserialize)]
    struct Head {
        v: u32,
    }
    // The version is read first so that a newer record is refused, not misread.
    let head: Head = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if head.v > SCHEMA_VERSION {
        return Err(StoreError::TooNew { found: head.v });
    }
    let envelope: Envelope<T> =
        serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    Ok(envelope.data)
}

fn get<T: DeserializeOwned>(tree: &sled::Tree, key: &[u8]) -> Result<Option<T>, StoreError> {
    tree.get(key)?.map(|v| decode(key, &v)).transpose()
}

fn scan<T: DeserializeOwned>(tree: &sled::Tree, prefix: &[u8]) -> Result<Vec<T>, StoreError> {
    tree.scan_prefix(prefix)
        .map(|entry| {
            let (k, v) = entry?;
            decode(&k, &v)
        })
        .collect()
}

/// Milliseconds since the Unix epoch, for records.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Format, Manifest};

    fn manifest(name: &str) -> Manifest {
        Manifest::parse(&format!("name = \"{name}\"\nimage = \"e:1\""), Format::Toml).unwrap()
    }

    fn deploy(name: &str) -> (FunctionRecord, RevisionRecord) {
        let m = manifest(name);
        let rev = RevisionRecord {
            id: m.revision_id(),
            manifest: m,
            created_ms: 1,
        };
        let f = FunctionRecord {
            name: name.into(),
            revision: rev.id.clone(),
            created_ms: 1,
            updated_ms: 1,
        };
        (f, rev)
    }

    #[tokio::test]
    async fn deploys_survive_reopening_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let gateway_id;
        {
            let store = Store::open(dir.path()).unwrap();
            gateway_id = store.gateway_id().await.unwrap();
            let (f, r) = deploy("echo");
            store.put_deploy(&f, &r).await.unwrap();
        }
        // sled's flusher thread may hold the file lock a moment after the drop.
        let store = loop {
            match Store::open(dir.path()) {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        };
        assert_eq!(store.gateway_id().await.unwrap(), gateway_id);
        let f = store.function("echo").unwrap().unwrap();
        let r = store.revision("echo", &f.revision).unwrap().unwrap();
        assert_eq!(r.manifest.name, "echo");
    }

    #[tokio::test]
    async fn deleting_a_function_removes_its_revisions_and_instances_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for name in ["echo", "echo2"] {
            let (f, r) = deploy(name);
            store.put_deploy(&f, &r).await.unwrap();
            store
                .put_instance(&InstanceRecord {
                    id: format!("i-{name}"),
                    function: name.into(),
                    revision: r.id.clone(),
                    node: "local".into(),
                    container_id: "c".into(),
                    endpoint: "127.0.0.1:1".into(),
                    ready_ms: 1,
                    gpus: vec![],
                })
                .await
                .unwrap();
        }
        assert!(store.delete_function("echo").await.unwrap());
        assert!(store.function("echo").unwrap().is_none());
        assert_eq!(store.functions().unwrap().len(), 1);
        let left: Vec<_> = store
            .instances()
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(left, ["i-echo2"]);
        let f2 = store.function("echo2").unwrap().unwrap();
        assert!(store.revision("echo2", &f2.revision).unwrap().is_some());
    }

    #[test]
    fn records_from_a_newer_schema_are_refused_not_misread() {
        let err = decode::<FunctionRecord>(b"k", br#"{"v":99,"data":{}}"#).unwrap_err();
        assert!(matches!(err, StoreError::TooNew { found: 99 }));
        let err = decode::<FunctionRecord>(b"k", b"garbage").unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }));
    }
}
