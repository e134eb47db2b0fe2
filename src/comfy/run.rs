//! Running prompts: as many at once as `scale.max` allows, oldest (lowest `number`)
//! first, each on an instance whose one slot it holds from the moment it is sent until
//! its history and outputs are in the gateway.
//!
//! One run: an instance (a free one at once, else wait in the activator's queue, which
//! cold-starts) → place the uploads the prompt names → open a socket to the instance with
//! the client's id → `POST /prompt` (the backend's 400 goes back to a submitter still
//! waiting) → pass every message of the prompt to its client, holding back the final
//! `executing` (`node: null`) → copy the history entry and every file it names → send the
//! held message. A lost instance gets the prompt once more elsewhere.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::backend::{self, encode, json_request};
use super::{graph, ComfyDoor, RunHandle, Verdict};
use crate::activator::{AcquireError, Function, Permit};
use crate::proxy::ProxyError;
use crate::store::{FileRecord, PromptRecord, PromptState};

/// How long `POST /prompt` waits for a warm instance's verdict before answering anyway.
pub const VERDICT_WAIT: Duration = Duration::from_secs(30);
/// Times a prompt is sent to an instance: once, and once more if that instance dies.
pub const MAX_ATTEMPTS: u32 = 2;
/// Failed starts a waiting prompt sees (each after the back-off of the one before) before
/// it fails.
pub const MAX_START_FAILURES: u32 = 3;
/// Largest file copied out of an instance.
pub const MAX_OUTPUT_FILE: usize = 1 << 30;
/// Small requests to an instance (queueing the prompt, its history, a probe).
pub(super) const SHORT: Duration = Duration::from_secs(30);

/// Why a run ended without a history entry.
#[derive(Debug)]
pub(super) enum Failure {
    /// The backend refused the prompt (its status and body).
    Refused(u16, Value),
    /// The instance went away; the prompt may run elsewhere.
    Lost(String),
    /// The prompt failed for good.
    Failed(String),
    /// The gateway is stopping: the prompt runs again at the next start.
    Stopping,
}

pub(super) fn from_proxy(e: ProxyError) -> Failure {
    match e {
        ProxyError::Upstream { ref reason, .. } => Failure::Lost(reason.clone()),
        other => Failure::Failed(other.to_string()),
    }
}

/// What a finished run brings back.
pub(super) struct Done {
    pub(super) entry: Value,
    pub(super) files: Vec<FileRecord>,
}

/// The final message of a prompt.
pub(super) fn finished_message(prompt_id: &str) -> Message {
    let data = json!({"node": null, "display_node": null, "prompt_id": prompt_id});
    Message::text(json!({"type": "executing", "data": data}).to_string())
}

impl ComfyDoor {
    /// Starts runs for `f`'s waiting prompts while fewer than `scale.max` run.
    pub(super) fn pump(&self, f: &Arc<Function>) {
        if self.inner.shutdown.is_cancelled() {
            return; // what waits runs after the restart
        }
        let max = f.revision().manifest.scale.max as usize;
        loop {
            let next = {
                let mut pools = self.pools();
                let Some(pool) = pools.get_mut(f.name()) else {
                    return;
                };
                if pool.active >= max {
                    return;
                }
                let next = pool
                    .prompts
                    .values_mut()
                    .filter(|l| l.run.is_none())
                    .min_by(|a, b| {
                        let (a, b) = (&a.record, &b.record);
                        a.number.total_cmp(&b.number).then(a.seq.cmp(&b.seq))
                    });
                let Some(live) = next else { return };
                live.run = Some(RunHandle {
                    interrupt: Default::default(),
                    permit: None,
                    last_executing: None,
                });
                pool.active += 1;
                live.record.prompt_id.clone()
            };
            let (this, f) = (self.clone(), f.clone());
            self.inner
                .tracker
                .spawn(async move { this.run(f, next).await });
        }
    }

    fn verdict(&self, function: &str, id: &str, verdict: Verdict) {
        let tx = self
            .pools()
            .get_mut(function)
            .and_then(|p| p.prompts.get_mut(id))
            .and_then(|l| l.verdict.take());
        if let Some(tx) = tx {
            let _ = tx.send(verdict);
        }
    }

    async fn run(self, f: Arc<Function>, id: String) {
        let name = f.name().to_string();
        loop {
            let permit = match self.instance(&f, &id).await {
                Ok(permit) => permit,
                Err(Some(reason)) => {
                    self.fail(&name, &id, &reason).await;
                    break;
                }
                Err(None) => break,
            };
            let Some((record, interrupt)) = self.mark_running(&name, &id, &permit) else {
                break; // deleted from the queue meanwhile
            };
            self.inner.store.put_prompt_later(&record);
            self.status_changed(&name);
            let result = self.drive(&f, &permit, &record, &interrupt).await;
            if let Some(live) = self
                .pools()
                .get_mut(&name)
                .and_then(|p| p.prompts.get_mut(&id))
            {
                if let Some(run) = live.run.as_mut() {
                    run.permit = None;
                }
            }
            match result {
                Ok(done) => {
                    self.succeed(&name, record, done).await;
                    // While the instance is still this run's: `/object_info` and the like.
                    self.refresh_cache(&f, &permit).await;
                    break;
                }
                Err(Failure::Refused(status, body)) => {
                    if self
                        .refuse_to_submitter(&name, &id, status, body.clone())
                        .await
                    {
                        break;
                    }
                    let message = body["error"]["message"].as_str().unwrap_or("refused");
                    let reason = format!("the instance refused the prompt: {message}");
                    self.fail(&name, &id, &reason).await;
                    break;
                }
                Err(Failure::Lost(reason)) => {
                    tracing::warn!(function = %name, prompt = %id, instance = %permit.instance(), attempt = record.attempts, %reason, "a ComfyUI prompt lost its instance");
                    self.retire_if_dead(permit, &id).await;
                    if record.attempts >= MAX_ATTEMPTS {
                        let why = format!("its instance failed {MAX_ATTEMPTS} times: {reason}");
                        self.fail(&name, &id, &why).await;
                        break;
                    }
                    if !self.back_to_pending(&name, &id) {
                        break;
                    }
                }
                Err(Failure::Failed(reason)) => {
                    self.fail(&name, &id, &reason).await;
                    break;
                }
                Err(Failure::Stopping) => break,
            }
        }
        if let Some(pool) = self.pools().get_mut(&name) {
            pool.active = pool.active.saturating_sub(1);
        }
        self.status_changed(&name);
        self.pump(&f);
    }

    /// An instance for the prompt: a free one at once, or one from the activator's queue
    /// (the submitter is answered meanwhile). `Err(Some)`: the prompt fails; `Err(None)`:
    /// the run stops (the prompt was dropped, or the gateway is stopping).
    async fn instance(&self, f: &Arc<Function>, id: &str) -> Result<Arc<Permit>, Option<String>> {
        if let Some(permit) = f.try_acquire() {
            return Ok(Arc::new(permit));
        }
        self.verdict(f.name(), id, Verdict::Queued);
        let mut start_failures = 0;
        loop {
            let waiting = self
                .pools()
                .get(f.name())
                .is_some_and(|p| p.prompts.contains_key(id));
            if !waiting {
                return Err(None);
            }
            match self.inner.invoker.activator().acquire(f, None, None).await {
                Ok(permit) => return Ok(Arc::new(permit)),
                Err(AcquireError::ShuttingDown) => return Err(None),
                Err(e @ AcquireError::Removed(_)) => return Err(Some(e.to_string())),
                Err(AcquireError::StartFailed {
                    message,
                    retry_after,
                    ..
                }) => {
                    // One failed start must not fail the whole queue: the prompt waits out
                    // the back-off and fails only after starts failed under it repeatedly.
                    start_failures += 1;
                    if start_failures >= MAX_START_FAILURES {
                        return Err(Some(format!(
                            "function `{}` could not start ({start_failures} tries): {message}",
                            f.name()
                        )));
                    }
                    let wait = retry_after.max(Duration::from_secs(1));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.inner.shutdown.cancelled() => return Err(None),
                    }
                }
                Err(e) => {
                    // Full queues, timeouts, no room yet: the prompt keeps its place here.
                    tracing::debug!(function = %f.name(), prompt = id, error = %e, "a ComfyUI prompt waits on");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = self.inner.shutdown.cancelled() => return Err(None),
                    }
                }
            }
        }
    }

    fn mark_running(
        &self,
        name: &str,
        id: &str,
        permit: &Arc<Permit>,
    ) -> Option<(PromptRecord, tokio_util::sync::CancellationToken)> {
        let mut pools = self.pools();
        let live = pools.get_mut(name)?.prompts.get_mut(id)?;
        live.record.state = PromptState::Running;
        live.record.attempts += 1;
        live.record.instance = Some(permit.instance().to_string());
        let run = live.run.as_mut()?;
        run.permit = Some(permit.clone());
        Some((live.record.clone(), run.interrupt.clone()))
    }

    fn back_to_pending(&self, name: &str, id: &str) -> bool {
        let mut pools = self.pools();
        let Some(live) = pools.get_mut(name).and_then(|p| p.prompts.get_mut(id)) else {
            return false;
        };
        live.record.state = PromptState::Pending;
        if let Some(run) = live.run.as_mut() {
            run.last_executing = None;
        }
        true
    }

    /// The prompt on one instance, from its inputs to its outputs.
    async fn drive(
        &self,
        f: &Arc<Function>,
        permit: &Permit,
        record: &PromptRecord,
        interrupt: &tokio_util::sync::CancellationToken,
    ) -> Result<Done, Failure> {
        let proxy = self.inner.invoker.proxy();
        let timeout = f.revision().manifest.request.timeout;
        let name = f.name();
        let id = record.prompt_id.as_str();
        self.place_inputs(name, permit, record).await?;
        let path = format!("/ws?clientId={}", encode(&record.client_id));
        let mut socket = proxy
            .websocket(permit, &path, SHORT)
            .await
            .map_err(from_proxy)?;
        let mut body = record.extra.clone();
        body.insert("prompt".into(), record.prompt.clone());
        body.insert("client_id".into(), record.client_id.clone().into());
        body.insert("prompt_id".into(), id.into());
        body.insert("extra_data".into(), record.extra_data.clone());
        let req = json_request("/prompt", &Value::Object(body));
        let (status, _, bytes) = proxy
            .fetch(permit, req, SHORT, 16 << 20)
            .await
            .map_err(from_proxy)?;
        let answer: Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            graph::error_body("invalid_prompt", &String::from_utf8_lossy(&bytes), "")
        });
        match status.as_u16() {
            200 if answer["prompt_id"].as_str().is_some_and(|p| p != id) => {
                return Err(Failure::Failed(format!(
                    "the instance's ComfyUI gave the prompt its own id ({}) instead of the one sent: \
                     the front door needs a ComfyUI that takes `prompt_id` in POST /prompt (2025 or later)",
                    answer["prompt_id"]
                )));
            }
            200 => {
                let node_errors = answer.get("node_errors").cloned().unwrap_or(json!({}));
                self.verdict(name, id, Verdict::Accepted(node_errors));
            }
            400 => return Err(Failure::Refused(400, answer)),
            other => {
                return Err(Failure::Failed(format!(
                    "the instance answered {other} to the prompt"
                )))
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut interrupted = false;
        loop {
            let next = tokio::select! {
                next = socket.next() => next,
                _ = interrupt.cancelled(), if !interrupted => {
                    interrupted = true;
                    let req = json_request("/interrupt", &json!({"prompt_id": id}));
                    if let Err(e) = proxy.fetch(permit, req, SHORT, 1 << 20).await {
                        tracing::warn!(function = %name, prompt = id, error = %e, "interrupting a ComfyUI prompt failed");
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    self.stop_prompt(permit, id).await;
                    let after = humantime::format_duration(timeout);
                    return Err(Failure::Failed(format!("the prompt did not finish within {after} (request.timeout)")));
                }
                _ = self.inner.shutdown.cancelled() => return Err(Failure::Stopping),
                _ = permit.retired().cancelled() => {
                    return Err(Failure::Lost("its instance left service (stopped, drained or its node lost)".into()));
                }
            };
            match next {
                Some(Ok(Message::Text(text))) => {
                    if self.event(name, record, text.as_str()) {
                        break;
                    }
                }
                Some(Ok(binary @ Message::Binary(_))) => self.tell(name, record, binary),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    // The socket broke: finished after all, or the instance is gone.
                    if self.entry(permit, id).await.is_ok() {
                        break;
                    }
                    return Err(Failure::Lost(
                        "its socket closed before the prompt finished".into(),
                    ));
                }
                Some(Ok(_)) => {}
            }
        }
        drop(socket);
        let entry = self.entry(permit, id).await?;
        let files = self.copy_outputs(name, permit, id, &entry).await?;
        Ok(Done { entry, files })
    }

    /// Passes one message of the instance on to the prompt's client; true for the final
    /// `executing` (held back until the outputs are in).
    fn event(&self, name: &str, record: &PromptRecord, text: &str) -> bool {
        let Ok(event) = serde_json::from_str::<Value>(text) else {
            self.tell(name, record, Message::text(text));
            return false;
        };
        let kind = event["type"].as_str().unwrap_or("").to_string();
        let prompt = event["data"]["prompt_id"].as_str();
        if kind == "status" || prompt.is_some_and(|p| p != record.prompt_id) {
            return false; // the gateway's status, or a leftover of another prompt
        }
        if kind == "execution_success" {
            // Sent with the final `executing`, once the history and outputs are kept.
            return false;
        }
        if kind == "executed" {
            let mut event = event;
            backend::rename_outputs(&mut event["data"]["output"], &record.prompt_id);
            let message = Message::text(event.to_string());
            self.tell(name, record, message);
            return false;
        }
        if kind == "executing" {
            if event["data"]["node"].is_null() {
                return true;
            }
            let mut pools = self.pools();
            let run = pools
                .get_mut(name)
                .and_then(|p| p.prompts.get_mut(&record.prompt_id))
                .and_then(|l| l.run.as_mut());
            if let Some(run) = run {
                run.last_executing = Some(text.to_string());
            }
        }
        self.tell(name, record, Message::text(text));
        false
    }
}
