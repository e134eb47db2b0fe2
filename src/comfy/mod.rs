//! The ComfyUI front door's core: many ComfyUI instances of one function behind one
//! ComfyUI address, with nothing a client expects of one server broken.
//!
//! - **Queue.** `POST /prompt` is checked (graph.rs), given its `prompt_id` (the client's,
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
//!   names are copied into the gateway (files.rs) before the instance is let go, so
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
use files::Blobs;
pub use files::{check_name, NameError};
pub use graph::error_body;
pub use hub::Subscription;

/// Answers kept from the last ready backend so they answer at zero.
pub const CACHED_PATHS: &[&str] = &["/object_info", "/embeddings", "/models"];

/// The caller's identity for a private function: the key's name; `ADMIN` for the admin
/// token (sees every prompt); `None` for a public function's callers.
pub type Owner = Option<String>;

/// Most `name (n).ext` an upload's name is tried as.
const MAX_RENAMES: u32 = 10_000;

/// The owner that sees every prompt.
pub const ADMIN: &str = ":admin";

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

/// One function's prompts not yet finished.
#[derive(Default)]
struct Pool {
    prompts: HashMap<String, Live>,
    /// Run tasks (waiting for an instance or running).
    active: usize,
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

    /// `POST /prompt`.
    pub async fn submit(&self, f: &Arc<Function>, owner: Owner, body: &[u8]) -> Answer {
        let refused = |body| Answer { status: 400, body };
        let submission = match graph::parse(body) {
            Ok(s) => s,
            Err(body) => return refused(body),
        };
        let object_info = self.cached_json(f, "/object_info");
        let outputs = match graph::check(&submission.prompt, object_info.as_ref()) {
            Ok(outputs) => outputs,
            Err(body) => return refused(body),
        };
        let name = f.name().to_string();
        let prompt_id = submission
            .prompt_id
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let client_id = submission
            .client_id
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let number = submission.number.unwrap_or(if submission.front {
            -(seq as f64)
        } else {
            seq as f64
        });
        let mut extra_data = submission.extra_data;
        extra_data.insert("client_id".into(), Value::String(client_id.clone()));
        let known = self
            .pools()
            .get(&name)
            .is_some_and(|p| p.prompts.contains_key(&prompt_id));
        if known || matches!(self.inner.store.prompt(&name, &prompt_id), Ok(Some(_))) {
            return refused(error_body(
                "invalid_prompt",
                "a prompt with this prompt_id exists already",
                &prompt_id,
            ));
        }
        let record = PromptRecord {
            function: name.clone(),
            prompt_id: prompt_id.clone(),
            number,
            seq,
            client_id,
            owner,
            prompt: Value::Object(submission.prompt),
            extra_data: Value::Object(extra_data),
            extra: submission.extra,
            outputs_to_execute: outputs,
            state: PromptState::Pending,
            attempts: 0,
            instance: None,
            created_ms: crate::store::now_ms(),
            finished_ms: 0,
            history: None,
            output_bytes: 0,
        };
        if let Err(e) = self.inner.store.put_prompt(&record).await {
            tracing::error!(function = %name, error = %crate::model::error_chain(&e), "cannot record a ComfyUI prompt");
            return Answer {
                status: 503,
                body: error_body(
                    "server_error",
                    "the gateway cannot record the prompt (its state store failed); try again",
                    "",
                ),
            };
        }
        let (tx, rx) = oneshot::channel();
        self.pools()
            .entry(name.clone())
            .or_default()
            .prompts
            .insert(
                prompt_id.clone(),
                Live {
                    record,
                    run: None,
                    verdict: Some(tx),
                },
            );
        self.status_changed(&name);
        self.pump(f);
        // Not sent to an instance now (as many run as `scale.max` allows): it waits in the
        // gateway's queue, and the client hears so at once.
        let waits = self
            .pools()
            .get_mut(&name)
            .and_then(|p| p.prompts.get_mut(&prompt_id))
            .filter(|l| l.run.is_none())
            .and_then(|l| l.verdict.take());
        if let Some(tx) = waits {
            let _ = tx.send(Verdict::Queued);
        }
        let accepted = |node_errors| Answer {
            status: 200,
            body: json!({"prompt_id": prompt_id, "number": number, "node_errors": node_errors}),
        };
        match tokio::time::timeout(run::VERDICT_WAIT, rx).await {
            Ok(Ok(Verdict::Accepted(node_errors))) => accepted(node_errors),
            Ok(Ok(Verdict::Refused(status, body))) => Answer { status, body },
            Ok(Ok(Verdict::Queued)) | Ok(Err(_)) | Err(_) => accepted(json!({})),
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
        client_id: &str,
    ) -> (Subscription<'_>, Vec<Message>, mpsc::Receiver<Message>) {
        let (subscription, rx) = self.inner.hub.join(function, client_id);
        let mut first = vec![self.status_message(function, Some(client_id))];
        if let Some(pool) = self.pools().get(function) {
            for live in pool.prompts.values() {
                if live.record.client_id != client_id {
                    continue;
                }
                if let Some(text) = live.run.as_ref().and_then(|r| r.last_executing.clone()) {
                    first.push(Message::text(text));
                }
            }
        }
        (subscription, first, rx)
    }

    /// The permits of `function`'s running prompts (to read from a busy instance).
    pub fn running_permits(&self, function: &str) -> Vec<Arc<Permit>> {
        self.pools().get(function).map_or_else(Vec::new, |pool| {
            pool.prompts
                .values()
                .filter_map(|l| l.run.as_ref()?.permit.clone())
                .collect()
        })
    }

    /// A cached answer (`/object_info`...), as JSON.
    pub fn cached_json(&self, f: &Function, path: &str) -> Option<Value> {
        let cached = self.inner.store.cached(f.name(), path).ok().flatten()?;
        serde_json::from_str(&cached.body).ok()
    }

    /// Keeps an answer a backend gave for a cached path.
    pub fn remember(&self, f: &Function, path: &str, body: &str) {
        let answer = CachedAnswer {
            revision: f.revision().id.clone(),
            fetched_ms: crate::store::now_ms(),
            body: body.to_string(),
        };
        self.inner.store.put_cached(f.name(), path, &answer);
    }

    /// A kept file's bytes: an upload or an output.
    pub async fn file(
        &self,
        function: &str,
        kind: &str,
        subfolder: &str,
        filename: &str,
    ) -> Result<Option<Bytes>, StoreError> {
        let Some(record) = self.inner.store.file(function, kind, subfolder, filename)? else {
            return Ok(None);
        };
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
