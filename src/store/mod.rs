//! Durable state in sled: the only module that touches sled.
//!
//! # Layout
//! - `functions.rs`: `functions` (name → current revision) and `revisions`
//!   (`name/rev` → manifest).
//! - `instances.rs`: `instances` (`function/instance` → container placement), keyed by
//!   function so a function's instances are one prefix scan.
//! - `nodes.rs`: `nodes` (name → address, labels, an operator's mark, the hash of the
//!   agent's credential), and `removed_nodes` (name → the hash of the credential a removed
//!   agent held, so it alone is told it was removed).
//! - `tokens.rs`: `tokens` (hash → expiry): join tokens.
//! - `keys.rs`: `keys` (invoke and admin keys by name, and by the hash of their secret).
//! - `secrets.rs`: `secrets` (name → value): what manifests name in `env`; `registries`
//!   (host → login): what pulls use.
//! - `comfy.rs`: `comfy_prompts`, `comfy_files`, `comfy_cache`: the ComfyUI front door's
//!   queue and history, the files it keeps (their bytes are blobs in the data dir), and
//!   answers cached from backends.
//! - `history.rs`: `invocations` (id → what one request did) and `allocations` (end
//!   time/instance → how long an instance held its devices): the invocation history and
//!   what GPU usage is computed from.
//! - `logs.rs`: `instance_logs` (`function/ended-ms/instance` → the last output of a
//!   removed instance and why it ended), the newest few per function.
//! - `jobs.rs`: `jobs` (id → a job's record), `job_inputs` and `job_results` (id → the
//!   input and answer bodies, raw), `job_keys` (idempotency keys), `job_outbox` (callbacks to send):
//!   durable asynchronous invocations.
//! - `meta` (here): the layout's schema version and the gateway's id.
//! - `writer.rs`: every write goes through one writer thread that batches writes and
//!   flushes once per batch; a write that promises durability (a deploy, an instance
//!   record) waits for its batch's flush.
//! - `migrate.rs`: upgrades an older layout in place when the store is opened.
//!
//! Every value is JSON inside a versioned envelope (`{"v":1,"data":…}`) so later versions
//! can still read old data, but for the invocation history's batches, which every request
//! adds to and which are written packed (`history.rs`). Point reads (`get`) are in-memory
//! operations and run where they are called; scans run on the blocking pool, off the
//! runtime's threads.
#![allow(clippy::disallowed_types)] // the one module that may hold sled's types

mod comfy;
mod functions;
mod history;
mod instances;
mod jobs;
mod keys;
mod logs;
mod migrate;
mod nodes;
mod secrets;
mod tokens;
mod writer;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

pub use comfy::{CachedAnswer, FileRecord, PromptRecord, PromptState};
pub use functions::{FunctionRecord, RevisionRecord};
pub use history::{AllocationRecord, HistoryCursor, InvocationRecord, Trimmed};
pub use instances::InstanceRecord;
pub use jobs::{job_key, JobRecord, JobState, JobsSwept, OutboxEntry, Priority};
pub use keys::KeyRecord;
pub use logs::{PreviousLogs, PREVIOUS_PER_FUNCTION};
pub use nodes::{NodeAddress, NodeMark, NodeRecord, RemovedNode};
pub use secrets::{RegistryRecord, SecretRecord};
pub use tokens::TokenRecord;
pub use writer::{Change, TreeId, WriterStats};

use writer::{Trees, Write};

/// Version of the store's layout (trees and keys), kept in `meta`.
/// 1: instances keyed by id; node records with `url`, `cordoned`, `draining`.
/// 2: instances keyed by `function/instance`; node records with `address` and `mark`.
/// 3: invocation batches may be packed (`history.rs`); version 2's JSON ones still read,
///    so nothing is rewritten, but an Ember of version 2 could not read the packed ones.
pub const SCHEMA_VERSION: u32 = 3;
/// Version of the value envelope (`{"v":…,"data":…}`).
pub const VALUE_VERSION: u32 = 1;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled refused an operation (disk full, corruption, another process holding the lock).
    #[error("state store")]
    Sled(#[from] sled::Error),
    /// A value could not be decoded.
    #[error("state store: record {key} is unreadable")]
    Corrupt {
        /// The record's key.
        key: String,
        /// What the decoder said.
        #[source]
        source: serde_json::Error,
    },
    /// A packed value could not be read.
    #[error("state store: record {key} is unreadable: {reason}")]
    Unpacked {
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
    /// The writer thread could not be started.
    #[error("state store: cannot start the writer thread")]
    Writer(#[source] std::io::Error),
    /// A write failed (the writer logged it too).
    #[error("state store: a write failed")]
    Write(#[source] Arc<sled::Error>),
    /// The writer thread is gone (it panicked, or the process is ending).
    #[error("state store: the writer has stopped")]
    WriterGone,
    /// A scan's blocking task failed.
    #[error("state store: a scan failed")]
    Scan(#[source] tokio::task::JoinError),
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    v: u32,
    data: T,
}

/// The state store. Cheap to clone; the writer stops when the last clone is dropped.
#[derive(Clone)]
pub struct Store {
    trees: Arc<Trees>,
    writes: mpsc::UnboundedSender<Write>,
    stats: Arc<WriterStats>,
}

impl Store {
    /// Opens (or creates) the store under `dir`, upgrading an older layout.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let state = dir.join("state");
        private_dir(&state).map_err(|e| StoreError::Sled(e.into()))?;
        let db = sled::Config::new().path(state).open()?;
        let trees = Trees {
            functions: db.open_tree("functions")?,
            revisions: db.open_tree("revisions")?,
            instances: db.open_tree("instances")?,
            nodes: db.open_tree("nodes")?,
            removed_nodes: db.open_tree("removed_nodes")?,
            tokens: db.open_tree("tokens")?,
            keys: db.open_tree("keys")?,
            secrets: db.open_tree("secrets")?,
            registries: db.open_tree("registries")?,
            meta: db.open_tree("meta")?,
            comfy_prompts: db.open_tree("comfy_prompts")?,
            comfy_files: db.open_tree("comfy_files")?,
            comfy_cache: db.open_tree("comfy_cache")?,
            invocations: db.open_tree("invocations")?,
            allocations: db.open_tree("allocations")?,
            jobs: db.open_tree("jobs")?,
            job_inputs: db.open_tree("job_inputs")?,
            job_results: db.open_tree("job_results")?,
            job_keys: db.open_tree("job_keys")?,
            job_outbox: db.open_tree("job_outbox")?,
            instance_logs: db.open_tree("instance_logs")?,
            db,
        };
        migrate::to_current(&trees)?;
        let trees = Arc::new(trees);
        let stats = Arc::new(WriterStats::default());
        let writes = writer::start(trees.clone(), stats.clone())?;
        Ok(Store {
            trees,
            writes,
            stats,
        })
    }

    /// Applies `changes` in order; resolves once they are on disk.
    pub async fn write(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writes
            .send(Write {
                changes,
                ack: Some(tx),
            })
            .map_err(|_| StoreError::WriterGone)?;
        rx.await
            .map_err(|_| StoreError::WriterGone)?
            .map_err(StoreError::Write)
    }

    /// Queues `changes` without waiting for the disk (for records whose loss in a crash
    /// is harmless); a failure is logged by the writer.
    pub fn write_later(&self, changes: Vec<Change>) {
        let _ = self.writes.send(Write { changes, ack: None });
    }

    /// Waits until every write queued before this call is on disk.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.write(Vec::new()).await
    }

    /// Writes and flushes done so far.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.stats.writes.load(Ordering::Relaxed),
            self.stats.flushes.load(Ordering::Relaxed),
        )
    }

    /// The id of the gateway owning this data dir: generated once, then stable.
    /// Containers are labelled with it so gateways sharing a Docker engine leave each
    /// other's containers alone.
    pub async fn gateway_id(&self) -> Result<String, StoreError> {
        if let Some(id) = self.trees.meta.get("gateway_id")? {
            return Ok(String::from_utf8_lossy(&id).into_owned());
        }
        let id = crate::model::short_id();
        self.write(vec![Change::Put(
            TreeId::Meta,
            b"gateway_id".to_vec(),
            id.clone().into_bytes(),
        )])
        .await?;
        Ok(id)
    }

    fn get<T: DeserializeOwned>(&self, tree: TreeId, key: &[u8]) -> Result<Option<T>, StoreError> {
        self.trees
            .tree(tree)
            .get(key)?
            .map(|v| decode(key, &v))
            .transpose()
    }

    /// Every record under `prefix`, read on the blocking pool.
    async fn scan<T: DeserializeOwned + Send + 'static>(
        &self,
        tree: TreeId,
        prefix: Vec<u8>,
    ) -> Result<Vec<T>, StoreError> {
        let trees = self.trees.clone();
        tokio::task::spawn_blocking(move || {
            trees
                .tree(tree)
                .scan_prefix(prefix)
                .map(|entry| {
                    let (k, v) = entry?;
                    decode(&k, &v)
                })
                .collect()
        })
        .await
        .map_err(StoreError::Scan)?
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(&Envelope {
        v: VALUE_VERSION,
        data: value,
    })
    .expect("records always serialize")
}

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    let corrupt = |source| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    };
    #[derive(Deserialize)]
    struct Head {
        v: u32,
    }
    // The version is read first so that a newer record is refused, not misread.
    let head: Head = serde_json::from_slice(bytes).map_err(corrupt)?;
    if head.v > VALUE_VERSION {
        return Err(StoreError::TooNew { found: head.v });
    }
    let envelope: Envelope<T> = serde_json::from_slice(bytes).map_err(corrupt)?;
    Ok(envelope.data)
}

/// Creates `dir` if missing and makes it readable by its owner only: it holds secrets.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Microseconds since the Unix epoch, for records.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch, for records.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
