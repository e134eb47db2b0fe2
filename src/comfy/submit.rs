//! `POST /prompt`: a prompt checked, given its id, claimed against a second submit of
//! that id, recorded durably, and handed to the dispatcher; the answer is the backend's
//! verdict when the prompt reached a warm instance at once, else `{prompt_id, number}` now.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::{error_body, graph, run, Answer, ComfyDoor, Live, Owner, Verdict};
use crate::activator::Function;
use crate::store::{PromptRecord, PromptState};

impl ComfyDoor {
    /// `POST /prompt`.
    pub async fn submit(&self, f: &Arc<Function>, owner: Owner, body: &[u8]) -> Answer {
        let refused = |body| Answer { status: 400, body };
        let submission = match graph::parse(body) {
            Ok(s) => s,
            Err(body) => return refused(body),
        };
        let object_info = self.cached_json(f, "/object_info");
        let outputs = match graph::check(&submission.prompt, object_info.as_deref()) {
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
        let capacity = f.revision().manifest.queue.capacity as usize;
        {
            // Claimed here, under the lock, so two submits of one id cannot both pass.
            let mut pools = self.pools();
            let pool = pools.entry(name.clone()).or_default();
            if pool.prompts.contains_key(&prompt_id) || pool.reserved.contains(&prompt_id) {
                return refused(error_body(
                    "invalid_prompt",
                    "a prompt with this prompt_id is queued already",
                    &prompt_id,
                ));
            }
            if pool.prompts.len() + pool.reserved.len() >= capacity {
                return Answer {
                    status: 503,
                    body: error_body(
                        "queue_full",
                        &format!(
                            "{capacity} prompts wait already (the function's queue.capacity); \
                             try again when some have run"
                        ),
                        "",
                    ),
                };
            }
            pool.reserved.insert(prompt_id.clone());
        }
        let unreserve = |this: &Self| {
            if let Some(pool) = this.pools().get_mut(&name) {
                pool.reserved.remove(&prompt_id);
            }
        };
        if matches!(self.inner.store.prompt(&name, &prompt_id), Ok(Some(_))) {
            unreserve(self);
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
        };
        let written = self.inner.store.put_prompt(&record).await;
        unreserve(self);
        if let Err(e) = written {
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
}
