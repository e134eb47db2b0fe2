//! The store's writer: one thread that applies every write, in order, in batches, with one
//! flush to disk per batch. A write that promises durability waits for its batch's flush
//! (`Ack`); a burst of writes from many tasks shares one flush instead of paying one each.
//! Runtime threads never block on sled's disk work.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::StoreError;

/// Writes applied in one batch at the most, so acks are not held back for long.
pub const MAX_BATCH: usize = 4096;

/// Which tree a write goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeId {
    /// `functions`.
    Functions,
    /// `revisions`.
    Revisions,
    /// `instances`.
    Instances,
    /// `nodes`.
    Nodes,
    /// `removed_nodes`.
    RemovedNodes,
    /// `tokens`.
    Tokens,
    /// `keys`.
    Keys,
    /// `secrets`.
    Secrets,
    /// `registries`.
    Registries,
    /// `meta`.
    Meta,
    /// `comfy_prompts`.
    ComfyPrompts,
    /// `comfy_files`.
    ComfyFiles,
    /// `comfy_cache`.
    ComfyCache,
    /// `invocations`.
    Invocations,
    /// `allocations`.
    Allocations,
    /// `jobs`.
    Jobs,
    /// `job_inputs`.
    JobInputs,
    /// `job_results`.
    JobResults,
    /// `job_keys`.
    JobKeys,
    /// `job_outbox`.
    JobOutbox,
    /// `instance_logs`.
    InstanceLogs,
}

/// One change.
#[derive(Debug)]
pub enum Change {
    /// Sets a key.
    Put(TreeId, Vec<u8>, Vec<u8>),
    /// Removes a key.
    Remove(TreeId, Vec<u8>),
    /// Removes every key with a prefix.
    RemovePrefix(TreeId, Vec<u8>),
    /// Keeps the last `n` keys (in key order) with a prefix and removes the others.
    KeepLast(TreeId, Vec<u8>, usize),
}

/// Changes applied in order, acknowledged together after their batch's flush.
pub(super) struct Write {
    pub changes: Vec<Change>,
    pub ack: Option<oneshot::Sender<Result<(), Arc<sled::Error>>>>,
}

/// What the writer has done, for tests and metrics.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Writes applied.
    pub writes: AtomicU64,
    /// Batches flushed.
    pub flushes: AtomicU64,
}

/// The sled handles the writer needs.
pub(super) struct Trees {
    pub db: sled::Db,
    pub functions: sled::Tree,
    pub revisions: sled::Tree,
    pub instances: sled::Tree,
    pub nodes: sled::Tree,
    pub removed_nodes: sled::Tree,
    pub tokens: sled::Tree,
    pub keys: sled::Tree,
    pub secrets: sled::Tree,
    pub registries: sled::Tree,
    pub meta: sled::Tree,
    pub comfy_prompts: sled::Tree,
    pub comfy_files: sled::Tree,
    pub comfy_cache: sled::Tree,
    pub invocations: sled::Tree,
    pub allocations: sled::Tree,
    pub jobs: sled::Tree,
    pub job_inputs: sled::Tree,
    pub job_results: sled::Tree,
    pub job_keys: sled::Tree,
    pub job_outbox: sled::Tree,
    pub instance_logs: sled::Tree,
}

impl Trees {
    pub(super) fn tree(&self, id: TreeId) -> &sled::Tree {
        match id {
            TreeId::Functions => &self.functions,
            TreeId::Revisions => &self.revisions,
            TreeId::Instances => &self.instances,
            TreeId::Nodes => &self.nodes,
            TreeId::RemovedNodes => &self.removed_nodes,
            TreeId::Tokens => &self.tokens,
            TreeId::Keys => &self.keys,
            TreeId::Secrets => &self.secrets,
            TreeId::Registries => &self.registries,
            TreeId::ComfyPrompts => &self.comfy_prompts,
            TreeId::ComfyFiles => &self.comfy_files,
            TreeId::ComfyCache => &self.comfy_cache,
            TreeId::Invocations => &self.invocations,
            TreeId::Allocations => &self.allocations,
            TreeId::Jobs => &self.jobs,
            TreeId::JobInputs => &self.job_inputs,
            TreeId::JobResults => &self.job_results,
            TreeId::JobKeys => &self.job_keys,
            TreeId::JobOutbox => &self.job_outbox,
            TreeId::InstanceLogs => &self.instance_logs,
            TreeId::Meta => &self.meta,
        }
    }

    fn apply(&self, change: &Change) -> Result<(), sled::Error> {
        match change {
            Change::Put(t, k, v) => self.tree(*t).insert(k.as_slice(), v.as_slice()).map(drop),
            Change::Remove(t, k) => self.tree(*t).remove(k.as_slice()).map(drop),
            Change::RemovePrefix(t, prefix) => {
                let tree = self.tree(*t);
                for key in tree.scan_prefix(prefix).keys() {
                    tree.remove(key?)?;
                }
                Ok(())
            }
            Change::KeepLast(t, prefix, n) => {
                let tree = self.tree(*t);
                // Newest last: walking back, every key past the first `n` goes.
                for key in tree.scan_prefix(prefix).keys().rev().skip(*n) {
                    tree.remove(key?)?;
                }
                Ok(())
            }
        }
    }
}

/// Starts the writer thread; it ends when every sender is gone, after its last batch.
pub(super) fn start(
    trees: Arc<Trees>,
    stats: Arc<WriterStats>,
) -> Result<mpsc::UnboundedSender<Write>, StoreError> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("ember-store-writer".into())
        .spawn(move || run(trees, stats, rx))
        .map_err(StoreError::Writer)?;
    Ok(tx)
}

fn run(trees: Arc<Trees>, stats: Arc<WriterStats>, mut rx: mpsc::UnboundedReceiver<Write>) {
    let mut batch = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let mut failed = None;
        let mut outcomes = Vec::with_capacity(batch.len());
        for write in &batch {
            let applied = write.changes.iter().try_for_each(|c| trees.apply(c));
            let applied = applied.map_err(Arc::new);
            if let Err(e) = &applied {
                failed = Some(e.clone());
            }
            outcomes.push(applied);
        }
        let flushed = trees.db.flush().map(drop).map_err(Arc::new);
        stats
            .writes
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        stats.flushes.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = &flushed {
            tracing::error!(error = %e, "state store: flushing to disk failed");
        } else if let Some(e) = failed {
            tracing::error!(error = %e, "state store: a write failed");
        }
        for (write, outcome) in batch.drain(..).zip(outcomes) {
            let result = outcome.and_then(|()| flushed.clone());
            match write.ack {
                Some(ack) => {
                    let _ = ack.send(result);
                }
                None => {
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "state store: an unacknowledged write failed");
                    }
                }
            }
        }
    }
}
