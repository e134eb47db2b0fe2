//! How a run ends: a finished prompt recorded with its files, a failed one given an
//! `execution_error` and a history entry saying why, a refused one passed back to its
//! submitter; each then tells the client with the final `executing`.

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::run::{finished_message, Done};
use super::{state, ComfyDoor, Verdict};
use crate::store::{PromptRecord, PromptState};

impl ComfyDoor {
    /// Records a finished prompt with its files, then tells its client.
    pub(super) async fn succeed(&self, name: &str, mut record: PromptRecord, done: Done) {
        record.state = PromptState::Done;
        state::forget_credentials(&mut record);
        record.finished_ms = crate::store::now_ms();
        let mut entry = done.entry;
        if let Some(outputs) = entry.get_mut("outputs").and_then(Value::as_object_mut) {
            for output in outputs.values_mut() {
                super::backend::rename_outputs(output, &record.prompt_id);
            }
        }
        let success = entry["status"]["status_str"] == "success";
        record.history = Some(entry);
        if let Err(e) = self.inner.store.finish_prompt(&record, &done.files).await {
            tracing::error!(function = name, prompt = %record.prompt_id, error = %crate::model::error_chain(&e), "cannot record a finished ComfyUI prompt");
        }
        self.remove_live(name, &record.prompt_id);
        if success {
            let data = json!({"prompt_id": record.prompt_id, "timestamp": record.finished_ms});
            let message = json!({"type": "execution_success", "data": data}).to_string();
            self.tell(name, &record, Message::text(message));
        }
        self.tell(name, &record, finished_message(&record.prompt_id));
    }

    /// Fails a prompt: `execution_error` and the final `executing` to its client, and a
    /// history entry saying why.
    pub(super) async fn fail(&self, name: &str, id: &str, reason: &str) {
        let Some(mut record) = self.remove_live(name, id) else {
            return;
        };
        tracing::warn!(
            function = name,
            prompt = id,
            reason,
            "a ComfyUI prompt failed"
        );
        let timestamp = crate::store::now_ms();
        let error = json!({
            "prompt_id": id, "node_id": null, "node_type": null, "executed": [],
            "exception_message": reason, "exception_type": "ember.PromptFailed",
            "traceback": [], "current_inputs": {}, "current_outputs": {}, "timestamp": timestamp,
        });
        record.state = PromptState::Done;
        state::forget_credentials(&mut record);
        record.finished_ms = timestamp;
        record.history = Some(json!({
            "prompt": state::queue_item(&record),
            "outputs": {},
            "status": {"status_str": "error", "completed": false, "messages": [["execution_error", error]]},
            "meta": {},
        }));
        if let Err(e) = self.inner.store.put_prompt(&record).await {
            tracing::error!(function = name, prompt = id, error = %crate::model::error_chain(&e), "cannot record a failed ComfyUI prompt");
        }
        let message = json!({"type": "execution_error", "data": error}).to_string();
        self.tell(name, &record, Message::text(message));
        self.tell(name, &record, finished_message(id));
    }

    /// Passes the backend's refusal to a submitter still waiting, and forgets the
    /// prompt (ComfyUI keeps no trace of a prompt it refused). False when none waits.
    pub(super) async fn refuse_to_submitter(
        &self,
        name: &str,
        id: &str,
        status: u16,
        body: Value,
    ) -> bool {
        let tx = self
            .pools()
            .get_mut(name)
            .and_then(|p| p.prompts.get_mut(id))
            .and_then(|l| l.verdict.take());
        let Some(tx) = tx else { return false };
        if tx.is_closed() {
            return false; // answered already: the prompt fails in the open instead
        }
        self.remove_live(name, id);
        let _ = self
            .inner
            .store
            .delete_prompts(name, &[id.to_string()], &[])
            .await;
        let _ = tx.send(Verdict::Refused(status, body));
        true
    }

    pub(super) fn remove_live(&self, name: &str, id: &str) -> Option<PromptRecord> {
        let live = self.pools().get_mut(name)?.prompts.remove(id)?;
        Some(live.record)
    }
}
