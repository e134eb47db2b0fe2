//! The ComfyUI front door's core: many ComfyUI instances of one function behind one
//! ComfyUI address, with nothing a client expects of one server broken.
//!
//! - **Queue.** `POST /prompt` (submit.rs) is checked (graph.rs), given its `prompt_id` (the client's,
//!   or a new one) and recorded durably in the store; the gateway, not a backend, holds
//!   the queue. A ComfyUI server runs one prompt at a time, so the function runs with
//!   `concurrency = 1`: each prompt takes an instance's one slot through the activator,
//!   which cold-starts instances up to `scale.max` while prompts wait (run.rs). A prompt
//!   sent at once to a warm instance gets the backend's own verdict (its 400 with
//!   `node_errors` passes back unchanged); one that waits is answered at once.
//! - **Sockets.** The gateway holds each client's socket (hub.rs). A running prompt has
//!   its own socket to its instance, opened with the client's id, whose messages (JSON
//!   and binary previews) go to that client only; `status` is the gateway's, with the
//!   queue of every instance.
//! - **History and files.** When a prompt ends, its history entry and every file it
//!   names are copied into the gateway (files.rs, backend.rs) before the instance is let
//!   go, each prompt's under a folder named after it (every fresh ComfyUI numbers its
//!   files from 1 again; the `executed` messages and the entry say so), so
//!   `/history` and `/view` answer after scale to zero. Uploads are kept by the gateway
//!   and placed on the instance that runs a prompt naming them, before the prompt.
//! - **Failures.** A prompt whose instance dies is sent to another instance once; then
//!   it fails with `execution_error`. Prompts pending or running when the gateway stops
//!   run when it starts again.
//! - **Tenants.** A private function's prompts belong to the key that submitted them:
//!   `/queue`, `/history` and `/interrupt` see and touch the caller's own only.

mod backend;
mod files;
mod graph;
mod hub;
mod outcome;
mod run;
mod state;
mod submit;
mod sweep;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::activator::{Function, Permit};
use crate::invoke::Invoker;
use crate::store::{CachedAnswer, FileRecord, PromptRecord, PromptState, Store, StoreError};
pub use backend::encode;
use files::Blobs;
pub use files::{check_name, NameError};
pub use graph::error_body;
pub use hub::Subscription;
pub use run::MAX_OUTPUT_FILE;

/// Answers kept from the last ready backend so they answer at zero.
pub const CACHED_PATHS: &[&str] = &["/object_info", "/embeddings", "/models", "/system_stats"];

/// The caller's identity for a private function: the key's name; `ADMIN` for the admin
/// token (sees every prompt); `None` for a public function's callers.
pub type Owner = Option<String>;

/// Most `name (n).ext` an upload's name is tried as.
const MAX_RENAMES: u32 = 10_000;

/// The owner that sees every prompt.
pub const ADMIN: &str = ":admin";

/// Where a client's socket is found in the hub: by its key's owner and its id, so that
/// a tenant using another tenant's client id gets none of its messages.
fn hub_key(owner: &Owner, client_id: &str) -> String {
    format!("{}\0{client_id}", owner.as_deref().unwrap_or(""))
}

/// An answer to a client, as ComfyUI would give it.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// Its status.
    pub status: u16,
    /// Its JSON body.
    pub body: Value,
}

/// What the backend said of a prompt sent at once.
#[derive(Debug)]
enum Verdict {
    /// It waits in the gateway's queue.
    Queued,
    /// The backend took it, with these `node_errors`.
    Accepted(Value),
    /// The backend refused it: its status and body, passed back unchanged.
    Refused(u16, Value),
}

/// One pending or running prompt, in memory.
struct Live {
    record: PromptRecord,
    /// Set once a run task has it.
    run: Option<RunHandle>,
    /// Where the submitter waits for the backend's verdict.
    verdict: Option<oneshot::Sender<Verdict>>,
}

/// A prompt's run: how to interrupt it, and its instance once it has one.
struct RunHandle {
    interrupt: CancellationToken,
    permit: Option<Arc<Permit>>,
    /// The last `executing` message, resent to a client that reconnects.
    last_executing: Option<String>,
}

/// Cached answers count as fresh this long (they are fetched again after a prompt).
const CACHE_FRESH_MS: u64 = 600_000;

/// A cached answer in memory.
#[derive(Clone)]
struct Kept {
    value: Arc<Value>,
    revision: String,
    fetched_ms: u64,
}

/// One function's prompts not yet finished.
#[derive(Default)]
struct Pool {
    prompts: HashMap<String, Live>,
    /// Run tasks (waiting for an instance or running).
    active: usize,
    /// Ids being recorded by a submit.
    reserved: std::collections::HashSet<String>,
}

/// The ComfyUI front door. Cheap to clone.
#[derive(Clone)]
pub struct ComfyDoor {
    inner: Arc<Inner>,
}

struct Inner {
    invoker: Invoker,
    store: Store,
    blobs: Blobs,
    hub: hub::Hub,
    pools: Mutex<HashMap<String, Pool>>,
    seq: AtomicU64,
    /// Cached answers, parsed, by function and path.
    answers: Mutex<HashMap<(String, String), Kept>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl ComfyDoor {
    /// The front door over `invoker`'s functions, keeping files under `data_dir`.
    pub fn new(
        invoker: Invoker,
        store: Store,
        data_dir: &Path,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> std::io::Result<ComfyDoor> {
        Ok(ComfyDoor {
            inner: Arc::new(Inner {
                invoker,
                store,
                blobs: Blobs::open(data_dir)?,
                hub: hub::Hub::default(),
                pools: Mutex::default(),
                seq: AtomicU64::new(1),
                answers: Mutex::default(),
                tracker,
                shutdown,
            }),
        })
    }

    fn pools(&self) -> MutexGuard<'_, HashMap<String, Pool>> {
        self.inner.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes back the prompts that were pending or running when the gateway stopped
    /// (a running one runs again), and starts the background work: dispatching, and
    /// retention of history, outputs and uploads.
    pub async fn start(&self) -> Result<(), StoreError> {
        let records = self.inner.store.prompts(None).await?;
        let mut max_seq = 0;
        {
            let mut pools = self.pools();
            for mut record in records {
                max_seq = max_seq.max(record.seq);
                if record.state == PromptState::Done {
                    continue;
                }
                record.state = PromptState::Pending;
                let pool = pools.entry(record.function.clone()).or_default();
                pool.prompts.insert(
                    record.prompt_id.clone(),
                    Live {
                        record,
                        run: None,
                        verdict: None,
                    },
                );
            }
        }
        self.inner.seq.store(max_seq + 1, Ordering::Relaxed);
        let this = self.clone();
        self.inner
            .tracker
            .spawn(async move { this.background().await });
        Ok(())
    }

    /// Dispatches waiting prompts (a redeploy may have raised `scale.max`) and applies
    /// retention, until shutdown.
    async fn background(self) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.inner.shutdown.cancelled() => return,
            }
            let names: Vec<String> = self.pools().keys().cloned().collect();
            for name in names {
                if let Some(f) = self.inner.invoker.activator().function(&name) {
                    self.pump(&f);
                }
            }
            if ticks.is_multiple_of(sweep::EVERY_TICKS) {
                if let Err(e) = self.sweep().await {
                    tracing::warn!(error = %crate::model::error_chain(&e), "ComfyUI retention sweep failed");
                }
            }
            ticks += 1;
        }
    }

    /// Pending and running prompts of `function` (the gateway's `queue_remaining`).
    pub fn queue_remaining(&self, function: &str) -> usize {
        self.pools().get(function).map_or(0, |p| p.prompts.len())
    }

    fn status_message(&self, function: &str, sid: Option<&str>) -> Message {
        let mut data =
            json!({"status": {"exec_info": {"queue_remaining": self.queue_remaining(function)}}});
        if let Some(sid) = sid {
            data["sid"] = Value::String(sid.to_string());
        }
        Message::text(json!({"type": "status", "data": data}).to_string())
    }

    /// Sends a message of a prompt to its client (its key's socket with its client id).
    fn tell(&self, function: &str, record: &PromptRecord, message: Message) {
        let key = hub_key(&record.owner, &record.client_id);
        self.inner.hub.send(function, &key, message);
    }

    /// Tells every client of `function` how long the queue is.
    fn status_changed(&self, function: &str) {
        let message = self.status_message(function, None);
        self.inner.hub.broadcast(function, &message);
    }

    /// `GET /ws?clientId=X`: registers the client's socket and returns what it is sent
    /// first (`status` with its `sid`, and the running prompts' last `executing`), and the
    /// channel of what follows.
    pub fn connect(
        &self,
        function: &str,
        caller: &Owner,
        client_id: &str,
    ) -> (Subscription<'_>, Vec<Message>, mpsc::Receiver<Message>) {
        let key = hub_key(caller, client_id);
        let (subscription, rx) = self.inner.hub.join(function, &key);
        let mut first = vec![self.status_message(function, Some(client_id))];
        if let Some(pool) = self.pools().get(function) {
            for live in pool.prompts.values() {
                if live.record.client_id != client_id || live.record.owner != *caller {
                    continue;
                }
                if let Some(text) = live.run.as_ref().and_then(|r| r.last_executing.clone()) {
                    first.push(Message::text(text));
                }
            }
        }
        (subscription, first, rx)
    }

    /// The instance of the caller's running prompt whose outputs `subfolder` names (see
    /// `backend::kept_subfolder`), with the subfolder as the instance knows it: where a
    /// file not copied yet (a preview while the prompt runs) is read.
    pub fn running_source(
        &self,
        function: &str,
        caller: &Owner,
        subfolder: &str,
    ) -> Option<(Arc<Permit>, String)> {
        let (id, rest) = subfolder.split_once('/').unwrap_or((subfolder, ""));
        let pools = self.pools();
        let live = pools.get(function)?.prompts.get(id)?;
        if !state::may_touch(&live.record.owner, caller) {
            return None;
        }
        let permit = live.run.as_ref()?.permit.clone()?;
        Some((permit, rest.to_string()))
    }

    /// A cached answer (`/object_info`...), parsed once and kept in memory (a real
    /// ComfyUI's `/object_info` is megabytes, and every `POST /prompt` checks against it).
    /// An answer of another revision's instance counts as none: a redeploy may have
    /// added custom nodes.
    pub fn cached_json(&self, f: &Function, path: &str) -> Option<Arc<Value>> {
        let kept = self.kept(f.name(), path)?;
        (kept.revision == f.revision().id).then_some(kept.value)
    }

    /// Whether the cached answer came from the current revision less than
    /// `CACHE_FRESH` ago.
    pub(super) fn cache_fresh(&self, f: &Function, path: &str) -> bool {
        self.kept(f.name(), path).is_some_and(|k| {
            k.revision == f.revision().id
                && crate::store::now_ms().saturating_sub(k.fetched_ms) < CACHE_FRESH_MS
        })
    }

    /// The kept answer, from memory, else read once from the store.
    fn kept(&self, function: &str, path: &str) -> Option<Kept> {
        let key = (function.to_string(), path.to_string());
        if let Some(kept) = self.answers().get(&key) {
            return Some(kept.clone());
        }
        let stored = self.inner.store.cached(function, path).ok().flatten()?;
        let kept = Kept {
            value: Arc::new(serde_json::from_str(&stored.body).ok()?),
            revision: stored.revision,
            fetched_ms: stored.fetched_ms,
        };
        self.answers().insert(key, kept.clone());
        Some(kept)
    }

    fn answers(&self) -> MutexGuard<'_, HashMap<(String, String), Kept>> {
        self.inner.answers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps an answer a backend gave for a cached path (ignored unless it is JSON).
    pub fn remember(&self, f: &Function, path: &str, body: &[u8]) {
        let Ok(value) = serde_json::from_slice::<Value>(body) else {
            return;
        };
        let answer = CachedAnswer {
            revision: f.revision().id.clone(),
            fetched_ms: crate::store::now_ms(),
            body: String::from_utf8_lossy(body).into_owned(),
        };
        self.inner.store.put_cached(f.name(), path, &answer);
        let kept = Kept {
            value: Arc::new(value),
            revision: answer.revision,
            fetched_ms: answer.fetched_ms,
        };
        self.answers()
            .insert((f.name().to_string(), path.to_string()), kept);
    }

    /// A kept file's bytes: an upload, or an output of a prompt the caller may see.
    pub async fn file(
        &self,
        function: &str,
        caller: &Owner,
        kind: &str,
        subfolder: &str,
        filename: &str,
    ) -> Result<Option<Bytes>, StoreError> {
        let Some(record) = self.inner.store.file(function, kind, subfolder, filename)? else {
            return Ok(None);
        };
        if let Some(prompt) = &record.prompt_id {
            let owner = self.inner.store.prompt(function, prompt)?.map(|p| p.owner);
            if !owner.is_some_and(|o| state::may_touch(&o, caller)) {
                return Ok(None);
            }
        }
        Ok(self.inner.blobs.read(&record.hash).await.ok())
    }

    /// `POST /upload/image` (and `/upload/mask`): keeps the file, named as ComfyUI would
    /// name it; answers `{name, subfolder, type}`.
    pub async fn upload(
        &self,
        function: &str,
        kind: &str,
        subfolder: &str,
        filename: &str,
        bytes: Bytes,
        overwrite: bool,
    ) -> Result<Value, UploadError> {
        files::check_name(subfolder, filename)?;
        let hash = self.inner.blobs.put(bytes.clone()).await?;
        let mut name = filename.to_string();
        // ComfyUI's rule: a name taken by other bytes becomes `name (1).ext`, `name (2).ext`…
        let mut n = 0;
        while let (false, Some(existing)) = (
            overwrite,
            self.inner.store.file(function, kind, subfolder, &name)?,
        ) {
            match existing {
                existing if existing.hash != hash => {
                    n += 1;
                    if n > MAX_RENAMES {
                        let why = format!(
                            "{MAX_RENAMES} files named like `{filename}` exist; pick another name"
                        );
                        return Err(NameError::Bad(why).into());
                    }
                    name = files::renamed(filename, n);
                }
                _ => break,
            }
        }
        let record = FileRecord {
            function: function.to_string(),
            kind: kind.to_string(),
            subfolder: subfolder.to_string(),
            filename: name.clone(),
            hash,
            size: bytes.len() as u64,
            created_ms: crate::store::now_ms(),
            prompt_id: None,
        };
        self.inner.store.put_file(&record).await?;
        Ok(json!({"name": name, "subfolder": subfolder, "type": kind}))
    }
}

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The name is unusable or climbs out of its folder.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The bytes could not be kept.
    #[error("the gateway cannot keep the file")]
    Io(#[from] std::io::Error),
    /// The record could not be written.
    #[error(transparent)]
    Store(#[from] StoreError),
}
