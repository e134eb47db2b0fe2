//! The ComfyUI front door's trees. `comfy_prompts` (`function/prompt_id` → a prompt: its
//! graph, its state in the gateway's queue, and once finished its history entry and the
//! output files kept); `comfy_files` (`function\0type\0subfolder\0filename` → the hash and
//! size of a file the gateway keeps: uploads and prompts' outputs; the bytes themselves
//! are files in the data dir, content-addressed); `comfy_cache` (`function\0path` →
//! answers cached from the last ready backend, such as `/object_info`, so they answer
//! at zero).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{encode, Change, Store, StoreError, TreeId};

/// Where a prompt is in the gateway's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptState {
    /// Waiting for an idle instance.
    Pending,
    /// Sent to an instance.
    Running,
    /// Finished, successfully or not: `history` holds its entry.
    Done,
}

/// A prompt submitted to a ComfyUI function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptRecord {
    /// The function.
    pub function: String,
    /// Its id (minted by the gateway unless the client sent one).
    pub prompt_id: String,
    /// ComfyUI's `number`: lower runs first.
    pub number: f64,
    /// Order of submission, for ties.
    pub seq: u64,
    /// The client whose socket gets its events.
    pub client_id: String,
    /// The key that submitted it (`None`: a public function's caller), for `/queue`,
    /// `/interrupt` and `/history` changes, which touch only the caller's own prompts.
    pub owner: Option<String>,
    /// The graph, in API format.
    pub prompt: Value,
    /// `extra_data` as sent (with `client_id` set).
    pub extra_data: Value,
    /// Other fields of the request sent on to the instance (`partial_execution_targets`).
    #[serde(default)]
    pub extra: serde_json::Map<String, Value>,
    /// The output node ids, for `/queue` items.
    #[serde(default)]
    pub outputs_to_execute: Vec<String>,
    /// Where it is.
    pub state: PromptState,
    /// Times it was sent to an instance.
    pub attempts: u32,
    /// The instance it last ran on.
    #[serde(default)]
    pub instance: Option<String>,
    /// When it was submitted (unix ms).
    pub created_ms: u64,
    /// When it finished (unix ms); 0 until then.
    #[serde(default)]
    pub finished_ms: u64,
    /// Its history entry, once finished.
    #[serde(default)]
    pub history: Option<Value>,
}

/// A file the gateway keeps for a ComfyUI function: an upload or a prompt's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// The function.
    pub function: String,
    /// ComfyUI's `type`: `input`, `output` or `temp`.
    pub kind: String,
    /// Its subfolder ("" for none).
    pub subfolder: String,
    /// Its name.
    pub filename: String,
    /// SHA-256 of its bytes, in hex: the name of the blob holding them.
    pub hash: String,
    /// Its size.
    pub size: u64,
    /// When it was stored (unix ms).
    pub created_ms: u64,
    /// The prompt that made it; `None` for uploads.
    #[serde(default)]
    pub prompt_id: Option<String>,
}

/// An answer cached from a backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedAnswer {
    /// The revision of the backend that gave it.
    pub revision: String,
    /// When (unix ms).
    pub fetched_ms: u64,
    /// The body.
    pub body: String,
}

fn prompt_key(function: &str, id: &str) -> Vec<u8> {
    format!("{function}/{id}").into_bytes()
}

fn file_key(function: &str, kind: &str, subfolder: &str, filename: &str) -> Vec<u8> {
    format!("{function}/{kind}\0{subfolder}\0{filename}").into_bytes()
}

fn cache_key(function: &str, path: &str) -> Vec<u8> {
    format!("{function}/{path}").into_bytes()
}

impl Store {
    /// Records a prompt, durably.
    pub async fn put_prompt(&self, p: &PromptRecord) -> Result<(), StoreError> {
        let k = prompt_key(&p.function, &p.prompt_id);
        self.write(vec![Change::Put(TreeId::ComfyPrompts, k, encode(p))])
            .await
    }

    /// Records a prompt without waiting for the disk (a change a crash may lose: a
    /// running prompt runs again after a restart either way).
    pub fn put_prompt_later(&self, p: &PromptRecord) {
        let k = prompt_key(&p.function, &p.prompt_id);
        self.write_later(vec![Change::Put(TreeId::ComfyPrompts, k, encode(p))]);
    }

    /// One prompt.
    pub fn prompt(&self, function: &str, id: &str) -> Result<Option<PromptRecord>, StoreError> {
        self.get(TreeId::ComfyPrompts, &prompt_key(function, id))
    }

    /// Every prompt of `function` (every function's with `None`).
    pub async fn prompts(&self, function: Option<&str>) -> Result<Vec<PromptRecord>, StoreError> {
        let prefix = function.map(|f| prompt_key(f, "")).unwrap_or_default();
        self.scan(TreeId::ComfyPrompts, prefix).await
    }

    /// Forgets prompts of `function`, and the files recorded with them, durably.
    pub async fn delete_prompts(
        &self,
        function: &str,
        ids: &[String],
        files: &[FileRecord],
    ) -> Result<(), StoreError> {
        let mut changes: Vec<Change> = ids
            .iter()
            .map(|id| Change::Remove(TreeId::ComfyPrompts, prompt_key(function, id)))
            .collect();
        changes.extend(files.iter().map(|f| {
            let k = file_key(&f.function, &f.kind, &f.subfolder, &f.filename);
            Change::Remove(TreeId::ComfyFiles, k)
        }));
        self.write(changes).await
    }

    /// Records a prompt and the files it made in one durable write.
    pub async fn finish_prompt(
        &self,
        p: &PromptRecord,
        files: &[FileRecord],
    ) -> Result<(), StoreError> {
        let mut changes = vec![Change::Put(
            TreeId::ComfyPrompts,
            prompt_key(&p.function, &p.prompt_id),
            encode(p),
        )];
        changes.extend(files.iter().map(|f| {
            let k = file_key(&f.function, &f.kind, &f.subfolder, &f.filename);
            Change::Put(TreeId::ComfyFiles, k, encode(f))
        }));
        self.write(changes).await
    }

    /// Records a file (an upload), durably.
    pub async fn put_file(&self, f: &FileRecord) -> Result<(), StoreError> {
        let k = file_key(&f.function, &f.kind, &f.subfolder, &f.filename);
        self.write(vec![Change::Put(TreeId::ComfyFiles, k, encode(f))])
            .await
    }

    /// One file.
    pub fn file(
        &self,
        function: &str,
        kind: &str,
        subfolder: &str,
        filename: &str,
    ) -> Result<Option<FileRecord>, StoreError> {
        let k = file_key(function, kind, subfolder, filename);
        self.get(TreeId::ComfyFiles, &k)
    }

    /// Every file of `function` (every function's with `None`).
    pub async fn files(&self, function: Option<&str>) -> Result<Vec<FileRecord>, StoreError> {
        let prefix = function.map(|f| cache_key(f, "")).unwrap_or_default();
        self.scan(TreeId::ComfyFiles, prefix).await
    }

    /// Forgets files, durably.
    pub async fn delete_files(&self, files: &[FileRecord]) -> Result<(), StoreError> {
        let changes = files
            .iter()
            .map(|f| {
                let k = file_key(&f.function, &f.kind, &f.subfolder, &f.filename);
                Change::Remove(TreeId::ComfyFiles, k)
            })
            .collect();
        self.write(changes).await
    }

    /// Caches an answer without waiting for the disk (it is fetched again if lost).
    pub fn put_cached(&self, function: &str, path: &str, answer: &CachedAnswer) {
        let k = cache_key(function, path);
        self.write_later(vec![Change::Put(TreeId::ComfyCache, k, encode(answer))]);
    }

    /// A cached answer.
    pub fn cached(&self, function: &str, path: &str) -> Result<Option<CachedAnswer>, StoreError> {
        self.get(TreeId::ComfyCache, &cache_key(function, path))
    }

    /// Forgets everything kept for `function`'s front door (it was removed).
    pub async fn forget_comfy(&self, function: &str) -> Result<(), StoreError> {
        let prefix = cache_key(function, "");
        self.write(vec![
            Change::RemovePrefix(TreeId::ComfyPrompts, prefix.clone()),
            Change::RemovePrefix(TreeId::ComfyFiles, prefix.clone()),
            Change::RemovePrefix(TreeId::ComfyCache, prefix),
        ])
        .await
    }
}
