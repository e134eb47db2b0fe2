//! The `invocations` and `allocations` trees: what each request did, and how long each
//! instance held its devices.
//!
//! - `invocations`: invocation id (8 bytes, big-endian) → [`InvocationRecord`]. Ids grow
//!   with their arrival time (`history::InvocationId`), so the tree is in arrival order:
//!   a page newest first is a reverse range scan, retention removes from the front.
//! - `allocations`: end time (unix µs, 8 bytes big-endian) then the instance id →
//!   [`AllocationRecord`], written when an instance is gone; a time window is a range scan.
//!
//! Both are written by the history recorder in batches (`write_later`), never one write
//! per request.

use serde::{Deserialize, Serialize};

use super::{decode, encode, Change, Store, StoreError, TreeId};

/// One invocation: a request through the invoke core (later, a job's run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvocationRecord {
    /// Its id (16 hex digits), as sent in `Ember-Invocation-Id`.
    pub id: String,
    /// `request` (a job's run will say `job`).
    pub kind: String,
    /// Function name.
    pub function: String,
    /// The revision of the instance that served it (the current one when none did).
    pub revision: String,
    /// The instance that served it, when one did.
    pub instance: Option<String>,
    /// That instance's node.
    pub node: Option<String>,
    /// The GPU slots (GPU or MIG uuids) that instance held.
    #[serde(default)]
    pub gpus: Vec<String>,
    /// The client's address.
    pub client: Option<String>,
    /// HTTP method.
    pub method: String,
    /// The path the instance saw, without the query.
    pub path: String,
    /// The status the client got.
    pub status: u16,
    /// Ember's error code when Ember answered instead of an instance.
    pub error: Option<String>,
    /// Whether it waited for an instance to start (or resume).
    pub cold: bool,
    /// When it arrived (unix µs).
    pub queued_at_us: u64,
    /// When an instance took it (unix µs).
    pub started_at_us: Option<u64>,
    /// When its answer ended (unix µs): the last byte sent, or the client gone.
    pub finished_at_us: u64,
    /// Request body bytes read.
    pub bytes_in: u64,
    /// Response body bytes sent.
    pub bytes_out: u64,
}

impl InvocationRecord {
    /// The store key of id `id`.
    pub fn key(id: u64) -> [u8; 8] {
        id.to_be_bytes()
    }
}

/// How long one instance held its devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AllocationRecord {
    /// Instance id.
    pub instance: String,
    /// Function name.
    pub function: String,
    /// Node name.
    pub node: String,
    /// GPU slots (GPU or MIG uuids) it held; empty for a CPU instance.
    #[serde(default)]
    pub gpus: Vec<String>,
    /// When its start began (unix µs).
    pub started_at_us: u64,
    /// When it was removed (unix µs); for a live instance, now.
    pub ended_at_us: u64,
    /// The spans it spent paused, `[from, to)` in unix µs.
    #[serde(default)]
    pub paused: Vec<(u64, u64)>,
}

fn allocation_key(a: &AllocationRecord) -> Vec<u8> {
    let mut k = a.ended_at_us.to_be_bytes().to_vec();
    k.extend_from_slice(a.instance.as_bytes());
    k
}

/// What [`Store::trim_history`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Trimmed {
    /// Invocation records.
    pub invocations: usize,
    /// Allocation records.
    pub allocations: usize,
}

impl Store {
    /// Queues invocation and allocation records, in one write, without waiting for disk.
    pub fn put_history_later(
        &self,
        invocations: &[(u64, InvocationRecord)],
        allocations: &[AllocationRecord],
    ) {
        let mut changes = Vec::with_capacity(invocations.len() + allocations.len());
        for (id, r) in invocations {
            let key = InvocationRecord::key(*id).to_vec();
            changes.push(Change::Put(TreeId::Invocations, key, encode(r)));
        }
        for a in allocations {
            changes.push(Change::Put(
                TreeId::Allocations,
                allocation_key(a),
                encode(a),
            ));
        }
        self.write_later(changes);
    }

    /// How many invocation records there are (a full count: called once, at start).
    pub async fn invocation_count(&self) -> Result<usize, StoreError> {
        let trees = self.trees.clone();
        tokio::task::spawn_blocking(move || trees.tree(TreeId::Invocations).len())
            .await
            .map_err(StoreError::Scan)
    }

    /// Removes the invocation records with ids below `oldest_id` and then the oldest until
    /// at most `max` of the `count` there are remain, and the allocation records that ended
    /// before `oldest_us`; waits for the disk.
    pub async fn trim_history(
        &self,
        count: usize,
        max: usize,
        oldest_id: u64,
        oldest_us: u64,
    ) -> Result<Trimmed, StoreError> {
        let trees = self.trees.clone();
        let changes = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            let mut changes = Vec::new();
            let mut left = count;
            for key in trees.tree(TreeId::Invocations).iter().keys() {
                let key = key?;
                let id = u64::from_be_bytes(key.as_ref().try_into().unwrap_or([0; 8]));
                if id >= oldest_id && left <= max {
                    break;
                }
                changes.push(Change::Remove(TreeId::Invocations, key.to_vec()));
                left = left.saturating_sub(1);
            }
            let invocations = changes.len();
            let end = oldest_us.to_be_bytes();
            for key in trees.tree(TreeId::Allocations).range(..end).keys() {
                changes.push(Change::Remove(TreeId::Allocations, key?.to_vec()));
            }
            Ok((invocations, changes))
        })
        .await
        .map_err(StoreError::Scan)??;
        let (invocations, changes) = changes;
        let trimmed = Trimmed {
            invocations,
            allocations: changes.len() - invocations,
        };
        if !changes.is_empty() {
            self.write(changes).await?;
        }
        Ok(trimmed)
    }

    /// Invocation records with ids in `[from_id, below_id)`, newest first, that `keep`
    /// accepts, at most `limit` of them. Read on the blocking pool.
    pub async fn invocations(
        &self,
        from_id: u64,
        below_id: u64,
        limit: usize,
        keep: impl Fn(&InvocationRecord) -> bool + Send + 'static,
    ) -> Result<Vec<InvocationRecord>, StoreError> {
        let trees = self.trees.clone();
        tokio::task::spawn_blocking(move || {
            let tree = trees.tree(TreeId::Invocations);
            let range = InvocationRecord::key(from_id)..InvocationRecord::key(below_id);
            let mut out = Vec::new();
            for entry in tree.range(range).rev() {
                if out.len() >= limit {
                    break;
                }
                let (k, v) = entry?;
                let record: InvocationRecord = decode(&k, &v)?;
                if keep(&record) {
                    out.push(record);
                }
            }
            Ok(out)
        })
        .await
        .map_err(StoreError::Scan)?
    }

    /// Allocation records of instances that ended at or after `since_us`.
    pub async fn allocations_since(
        &self,
        since_us: u64,
    ) -> Result<Vec<AllocationRecord>, StoreError> {
        let trees = self.trees.clone();
        tokio::task::spawn_blocking(move || {
            trees
                .tree(TreeId::Allocations)
                .range(since_us.to_be_bytes()..)
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
