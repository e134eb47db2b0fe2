//! Retention: finished prompts (their history and output files) and uploads are kept for
//! `[comfyui] keep`, and within `keep_bytes` per function, the oldest going first; what a
//! removed function kept goes with it; blobs no record names are deleted.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::ComfyDoor;
use crate::store::{FileRecord, PromptState, StoreError};

/// Background ticks (seconds) between sweeps.
pub const EVERY_TICKS: u64 = 60;

impl ComfyDoor {
    /// One sweep over every function's prompts and files.
    pub(super) async fn sweep(&self) -> Result<(), StoreError> {
        let store = &self.inner.store;
        let prompts = store.prompts(None).await?;
        let files = store.files(None).await?;
        let now = crate::store::now_ms();
        let names: BTreeSet<String> = prompts
            .iter()
            .map(|p| p.function.clone())
            .chain(files.iter().map(|f| f.function.clone()))
            .collect();
        for name in names {
            let comfy = self
                .inner
                .invoker
                .activator()
                .function(&name)
                .and_then(|f| f.revision().manifest.comfyui.clone());
            let Some(comfy) = comfy else {
                // Removed (or no longer a ComfyUI function): what waits will not run.
                if let Some(pool) = self.pools().get_mut(&name) {
                    pool.prompts.retain(|_, live| live.run.is_some());
                }
                if self.queue_remaining(&name) == 0 {
                    self.pools().remove(&name);
                    tracing::info!(function = %name, "forgetting what the ComfyUI front door kept for a removed function");
                    store.forget_comfy(&name).await?;
                    self.answers().retain(|(function, _), _| function != &name);
                }
                continue;
            };
            let keep_ms = comfy.keep.as_millis() as u64;
            let old = |t: u64| t.saturating_add(keep_ms) < now;
            let mut done: Vec<_> = prompts
                .iter()
                .filter(|p| p.function == name && p.state == PromptState::Done)
                .collect();
            done.sort_by_key(|p| p.finished_ms);
            let mine: Vec<&FileRecord> = files.iter().filter(|f| f.function == name).collect();
            let mut by_prompt: HashMap<&str, u64> = HashMap::new();
            for f in &mine {
                if let Some(p) = &f.prompt_id {
                    *by_prompt.entry(p.as_str()).or_default() += f.size;
                }
            }
            let mut total: u64 = mine.iter().map(|f| f.size).sum();
            let mut dropped = HashSet::new();
            for p in &done {
                if old(p.finished_ms) || total > comfy.keep_bytes.as_u64() {
                    total = total
                        .saturating_sub(by_prompt.get(p.prompt_id.as_str()).copied().unwrap_or(0));
                    dropped.insert(p.prompt_id.clone());
                }
            }
            let mut uploads: Vec<&&FileRecord> =
                mine.iter().filter(|f| f.prompt_id.is_none()).collect();
            uploads.sort_by_key(|f| f.created_ms);
            let mut stale = Vec::new();
            for f in uploads {
                if old(f.created_ms) || total > comfy.keep_bytes.as_u64() {
                    total = total.saturating_sub(f.size);
                    stale.push((*f).clone());
                }
            }
            if !dropped.is_empty() || !stale.is_empty() {
                tracing::info!(function = %name, prompts = dropped.len(), uploads = stale.len(), "ComfyUI retention");
            }
            self.forget(&name, &dropped).await?;
            if !stale.is_empty() {
                store.delete_files(&stale).await?;
            }
        }
        let keep: HashSet<String> = store
            .files(None)
            .await?
            .into_iter()
            .map(|f| f.hash)
            .collect();
        if let Err(e) = self.inner.blobs.collect(keep).await {
            tracing::warn!(error = %e, "cannot collect the ComfyUI front door's unused files");
        }
        Ok(())
    }
}
