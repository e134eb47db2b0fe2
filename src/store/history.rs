//! The `invocations` and `allocations` trees: what each request did, and how long each
//! instance held its devices.
//!
//! - `invocations`: one batch per key: when it was written (unix µs, 8 bytes big-endian,
//!   unique) and how many records it holds (4 bytes big-endian) → the batch's
//!   [`InvocationRecord`]s in the order they ended. One store write per batch keeps the
//!   per-request cost to encoding. The tree is in the order requests ended: a page newest
//!   first is a reverse scan, a time window starts at a key, retention removes whole
//!   batches from the front, and counting reads keys only.
//! - `allocations`: end time (unix µs, 8 bytes big-endian) then the instance id →
//!   [`AllocationRecord`], written when an instance is gone; a time window is a range scan.
//!
//! Both are written by the history recorder (`write_later`), never one write per request.
//!
//! A batch of invocations is written packed: a `PACKED` byte, then the records in
//! postcard's compact binary form (about a third of their JSON, and a fraction of its
//! encoding time, which every request pays). Batches written as JSON by an older Ember
//! (they begin with `{`) are still read.

use serde::{Deserialize, Serialize};

use std::sync::atomic::Ordering;

use super::{decode, encode, Change, Store, StoreError, TreeId};

// Packed batches (`pack`) hold these fields by position, not by name: a field added,
// removed or reordered needs a new `PACKED` byte, with this layout kept to read the old
// batches (the test `packed_bytes_of_this_layout_still_read` fails until then).
/// One invocation: a request through the invoke core (later, a job's run).
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
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

/// Where a page of the history stopped: a batch and the index in it of the last record
/// returned (the next page holds those before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryCursor {
    /// The batch's write time (unix µs).
    pub batch: u64,
    /// The index in that batch.
    pub index: u32,
}

fn batch_key(written_us: u64, count: u32) -> Vec<u8> {
    let mut k = written_us.to_be_bytes().to_vec();
    k.extend_from_slice(&count.to_be_bytes());
    k
}

/// A batch key's write time and record count.
fn read_batch_key(key: &[u8]) -> (u64, u32) {
    let written = key
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes);
    let count = key
        .get(8..12)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_be_bytes);
    (written, count)
}

/// The first byte of a packed batch (a JSON one begins with `{`).
const PACKED: u8 = 1;

/// A batch of invocation records as stored: packed.
fn pack(records: &[InvocationRecord]) -> Vec<u8> {
    postcard::to_extend(records, vec![PACKED]).expect("records always serialize")
}

/// A stored batch of invocation records, packed or (written by an older Ember) JSON.
fn unpack(key: &[u8], bytes: &[u8]) -> Result<Vec<InvocationRecord>, StoreError> {
    match bytes.split_first() {
        Some((&PACKED, packed)) => postcard::from_bytes(packed).map_err(|e| StoreError::Unpacked {
            key: {
                let (written_us, count) = read_batch_key(key);
                format!("invocations/{written_us} ({count} records)")
            },
            reason: e.to_string(),
        }),
        _ => decode(key, bytes),
    }
}

/// The last batch key's time handed out, so keys stay unique within the process.
static LAST_BATCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

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
    /// Queues a batch of invocation records and some allocation records, in one write,
    /// without waiting for disk.
    pub fn put_history_later(
        &self,
        invocations: Vec<InvocationRecord>,
        allocations: &[AllocationRecord],
    ) {
        let mut changes = Vec::with_capacity(1 + allocations.len());
        if !invocations.is_empty() {
            let now = super::now_us();
            let written = LAST_BATCH
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                    Some(now.max(last + 1))
                })
                .map_or(now, |last| now.max(last + 1));
            let key = batch_key(written, invocations.len() as u32);
            changes.push(Change::Put(TreeId::Invocations, key, pack(&invocations)));
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

    /// How many invocation records there are (reads every key: called once, at start, and
    /// makes later batch keys sort after the last one there is).
    pub async fn invocation_count(&self) -> Result<usize, StoreError> {
        let trees = self.trees.clone();
        tokio::task::spawn_blocking(move || {
            let mut n = 0;
            let mut last = 0;
            for key in trees.tree(TreeId::Invocations).iter().keys() {
                let (written, count) = read_batch_key(&key?);
                n += count as usize;
                last = written;
            }
            // New batches sort after every batch there is, even if the clock went back.
            LAST_BATCH.fetch_max(last, Ordering::Relaxed);
            Ok(n)
        })
        .await
        .map_err(StoreError::Scan)?
    }

    /// Removes the batches written before `oldest_us`, then the oldest until at most `max`
    /// of the `count` records there are remain, and the allocation records that ended
    /// before `oldest_us`; waits for the disk.
    pub async fn trim_history(
        &self,
        count: usize,
        max: usize,
        oldest_us: u64,
    ) -> Result<Trimmed, StoreError> {
        let trees = self.trees.clone();
        let (invocations, changes) =
            tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
                let mut changes = Vec::new();
                let (mut left, mut removed) = (count, 0);
                for key in trees.tree(TreeId::Invocations).iter().keys() {
                    let key = key?;
                    let (written, n) = read_batch_key(&key);
                    if written >= oldest_us && left <= max {
                        break;
                    }
                    changes.push(Change::Remove(TreeId::Invocations, key.to_vec()));
                    left = left.saturating_sub(n as usize);
                    removed += n as usize;
                }
                let end = oldest_us.to_be_bytes();
                for key in trees.tree(TreeId::Allocations).range(..end).keys() {
                    changes.push(Change::Remove(TreeId::Allocations, key?.to_vec()));
                }
                Ok((removed, changes))
            })
            .await
            .map_err(StoreError::Scan)??;
        let removed_batches = changes
            .iter()
            .filter(|c| matches!(c, Change::Remove(TreeId::Invocations, _)))
            .count();
        let trimmed = Trimmed {
            invocations,
            allocations: changes.len() - removed_batches,
        };
        if !changes.is_empty() {
            self.write(changes).await?;
        }
        Ok(trimmed)
    }

    /// Invocation records of batches written at or after `since_us`, newest first (before
    /// `from` when given), that `keep` accepts, at most `limit`; with the cursor of the
    /// last one when the limit was reached. Read on the blocking pool.
    pub async fn invocations(
        &self,
        since_us: u64,
        from: Option<HistoryCursor>,
        limit: usize,
        keep: impl Fn(&InvocationRecord) -> bool + Send + 'static,
    ) -> Result<(Vec<InvocationRecord>, Option<HistoryCursor>), StoreError> {
        let trees = self.trees.clone();
        tokio::task::spawn_blocking(move || {
            let tree = trees.tree(TreeId::Invocations);
            let low = batch_key(since_us, 0);
            let high = match from {
                Some(c) => batch_key(c.batch, u32::MAX),
                None => batch_key(u64::MAX, u32::MAX),
            };
            let mut out = Vec::new();
            for entry in tree.range(low..=high).rev() {
                let (k, v) = entry?;
                let (batch, _) = read_batch_key(&k);
                let records = unpack(&k, &v)?;
                let below = match from {
                    Some(c) if c.batch == batch => c.index as usize,
                    _ => records.len(),
                };
                for (index, record) in records.into_iter().enumerate().take(below).rev() {
                    if keep(&record) {
                        out.push(record);
                        if out.len() >= limit {
                            let index = index as u32;
                            return Ok((out, Some(HistoryCursor { batch, index })));
                        }
                    }
                }
            }
            Ok((out, None))
        })
        .await
        .map_err(StoreError::Scan)?
    }

    /// Folds `f` over every invocation record of the batches written at or after
    /// `since_us`, oldest first, on the blocking pool, without holding them all.
    pub async fn fold_invocations<A: Send + 'static>(
        &self,
        since_us: u64,
        init: A,
        f: impl Fn(&mut A, &InvocationRecord) + Send + 'static,
    ) -> Result<A, StoreError> {
        let trees = self.trees.clone();
        tokio::task::spawn_blocking(move || {
            let mut acc = init;
            for entry in trees
                .tree(TreeId::Invocations)
                .range(batch_key(since_us, 0)..)
            {
                let (k, v) = entry?;
                let records = unpack(&k, &v)?;
                records.iter().for_each(|r| f(&mut acc, r));
            }
            Ok(acc)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn records() -> Vec<InvocationRecord> {
        let full = InvocationRecord {
            id: "0193a1b2c3d4e5f6".into(),
            kind: "request".into(),
            function: "llm".into(),
            revision: "fbed4b1876ce".into(),
            instance: Some("llm-7f3a9c".into()),
            node: Some("gpu-box-1".into()),
            gpus: vec!["GPU-5a1c".into(), "MIG-9f2e".into()],
            client: Some("10.0.0.7:53122".into()),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            status: 200,
            error: None,
            cold: true,
            queued_at_us: 1_763_800_000_000_000,
            started_at_us: Some(1_763_800_000_250_000),
            finished_at_us: 1_763_800_001_000_000,
            bytes_in: 512,
            bytes_out: 1 << 20,
        };
        let failed = InvocationRecord {
            instance: None,
            node: None,
            gpus: Vec::new(),
            client: None,
            status: 503,
            error: Some("queue_timeout".into()),
            cold: false,
            started_at_us: None,
            bytes_out: 0,
            ..full.clone()
        };
        vec![full, failed]
    }

    #[test]
    fn a_packed_batch_reads_back_whole_at_under_half_its_json() {
        let batch = records();
        let packed = pack(&batch);
        assert_eq!(packed[0], PACKED);
        assert_eq!(unpack(b"k", &packed).unwrap(), batch);
        let json = encode(&batch);
        eprintln!("packed {} bytes, JSON {}", packed.len(), json.len());
        assert!(
            packed.len() * 2 < json.len(),
            "{} vs {}",
            packed.len(),
            json.len()
        );
    }

    /// Two records as `pack` wrote them when the layout was introduced (schema 3).
    const PACKED_V1: &str =
        "010210303139336131623263336434653566360772657175657374036c6c6d0c6662656434623138 \
        37366365010a6c6c6d2d37663361396301096770752d626f782d3102084750552d35613163084d49 \
        472d39663265010e31302e302e302e373a353331323204504f5354142f76312f636861742f636f6d \
        706c6574696f6e73c801000180e0d183ab859103019081e183ab859103c0e48e84ab859103800480 \
        804010303139336131623263336434653566360772657175657374036c6c6d0c6662656434623138 \
        373663650000000004504f5354142f76312f636861742f636f6d706c6574696f6e73f703010d7175 \
        6575655f74696d656f75740080e0d183ab85910300c0e48e84ab859103800400";

    #[test]
    fn packed_bytes_of_this_layout_still_read() {
        let hex: String = PACKED_V1.split_whitespace().collect();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(unpack(b"k", &bytes).unwrap(), records());
    }

    #[test]
    fn a_json_batch_written_by_an_older_ember_still_reads() {
        let batch = records();
        assert_eq!(unpack(b"k", &encode(&batch)).unwrap(), batch);
    }

    #[tokio::test]
    async fn a_version_2_data_dir_keeps_its_json_history_beside_packed_batches() {
        let dir = tempfile::tempdir().unwrap();
        let old = records();
        {
            let db = sled::Config::new()
                .path(dir.path().join("state"))
                .open()
                .unwrap();
            let meta = db.open_tree("meta").unwrap();
            meta.insert("schema_version", &2u32.to_be_bytes()).unwrap();
            let tree = db.open_tree("invocations").unwrap();
            tree.insert(batch_key(5, 2), encode(&old)).unwrap();
            db.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let new = records().into_iter().map(|r| InvocationRecord {
            id: "0193a1b2c3d4e5f7".into(),
            ..r
        });
        store.put_history_later(new.collect(), &[]);
        store.flush().await.unwrap();
        let ids = store
            .fold_invocations(0, Vec::new(), |ids, r| ids.push(r.id.clone()))
            .await
            .unwrap();
        assert_eq!(ids.len(), 4, "{ids:?}");
        assert_eq!(&ids[..2], [old[0].id.clone(), old[1].id.clone()]);
        assert!(ids[2..].iter().all(|id| id == "0193a1b2c3d4e5f7"));
    }

    #[test]
    fn a_damaged_packed_batch_is_an_error_that_names_it() {
        let packed = pack(&records());
        let key = batch_key(7, 2);
        let err = unpack(&key, &packed[..packed.len() / 2]).unwrap_err();
        assert!(matches!(err, StoreError::Unpacked { .. }), "{err}");
        assert!(
            err.to_string().contains("invocations/7 (2 records)"),
            "{err}"
        );
    }
}
