//! What clients read and change of the queue and the history: `/queue`, `/history`,
//! `/interrupt`, each limited to the caller's own prompts on a private function.

use std::collections::HashSet;

use serde_json::{json, Map, Value};

use super::{ComfyDoor, Owner, ADMIN};
use crate::store::{PromptRecord, PromptState, StoreError};

/// Whether `caller` may see and touch a prompt of `owner`.
pub(super) fn may_touch(owner: &Owner, caller: &Owner) -> bool {
    caller.as_deref() == Some(ADMIN) || owner == caller
}

/// A `/queue` item: `[number, prompt_id, prompt, extra_data, outputs_to_execute]`.
pub(super) fn queue_item(r: &PromptRecord) -> Value {
    json!([
        r.number,
        r.prompt_id,
        r.prompt,
        r.extra_data,
        r.outputs_to_execute
    ])
}

/// The keys of `extra_data` ComfyUI leaves out of history (credentials of its API nodes).
const SENSITIVE: [&str; 2] = ["api_key_comfy_org", "auth_token_comfy_org"];

/// Drops the credentials ComfyUI keeps out of history from a finished prompt's record.
pub(super) fn forget_credentials(r: &mut PromptRecord) {
    if let Some(extra) = r.extra_data.as_object_mut() {
        for key in SENSITIVE {
            extra.remove(key);
        }
    }
}

/// The ids a `{"delete": [...]}` body names.
fn named(body: &Value) -> HashSet<String> {
    body.get("delete")
        .and_then(Value::as_array)
        .map(|ids| {
            ids.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn clears(body: &Value) -> bool {
    body.get("clear").and_then(Value::as_bool) == Some(true)
}

impl ComfyDoor {
    /// `GET /queue`.
    pub fn queue(&self, function: &str, caller: &Owner) -> Value {
        let pools = self.pools();
        let mut running = Vec::new();
        let mut pending = Vec::new();
        if let Some(pool) = pools.get(function) {
            for live in pool.prompts.values() {
                if !may_touch(&live.record.owner, caller) {
                    continue;
                }
                if live.record.state == PromptState::Running {
                    running.push(&live.record);
                } else {
                    pending.push(&live.record);
                }
            }
        }
        let order = |a: &&PromptRecord, b: &&PromptRecord| {
            a.number.total_cmp(&b.number).then(a.seq.cmp(&b.seq))
        };
        running.sort_by(order);
        pending.sort_by(order);
        json!({
            "queue_running": running.into_iter().map(queue_item).collect::<Vec<_>>(),
            "queue_pending": pending.into_iter().map(queue_item).collect::<Vec<_>>(),
        })
    }

    /// `POST /queue`: `{"clear": true}` drops the caller's pending prompts, `{"delete":
    /// [ids]}` those named; running prompts stay (`/interrupt` stops them).
    pub async fn change_queue(
        &self,
        function: &str,
        caller: &Owner,
        body: &Value,
    ) -> Result<(), StoreError> {
        let (clear, delete) = (clears(body), named(body));
        let dropped: Vec<String> = {
            let mut pools = self.pools();
            let Some(pool) = pools.get_mut(function) else {
                return Ok(());
            };
            let ids: Vec<String> = pool
                .prompts
                .values()
                .filter(|l| {
                    l.record.state == PromptState::Pending
                        && may_touch(&l.record.owner, caller)
                        && (clear || delete.contains(&l.record.prompt_id))
                })
                .map(|l| l.record.prompt_id.clone())
                .collect();
            for id in &ids {
                pool.prompts.remove(id);
            }
            ids
        };
        if dropped.is_empty() {
            return Ok(());
        }
        self.status_changed(function);
        self.inner
            .store
            .delete_prompts(function, &dropped, &[])
            .await
    }

    /// `GET /history`: finished prompts, oldest first; `max_items` keeps the newest that
    /// many (from `offset` when given), as ComfyUI does.
    pub async fn history(
        &self,
        function: &str,
        caller: &Owner,
        max_items: Option<usize>,
        offset: Option<i64>,
    ) -> Result<Value, StoreError> {
        let mut done: Vec<PromptRecord> = self
            .inner
            .store
            .prompts(Some(function))
            .await?
            .into_iter()
            .filter(|r| r.history.is_some() && may_touch(&r.owner, caller))
            .collect();
        done.sort_by_key(|r| (r.finished_ms, r.seq));
        let len = done.len() as i64;
        let start = match (offset, max_items) {
            (Some(o), _) if o >= 0 => o,
            (_, Some(n)) => len - n as i64,
            _ => 0,
        }
        .clamp(0, len) as usize;
        let end = max_items.map_or(done.len(), |n| (start + n).min(done.len()));
        let mut out = Map::new();
        for r in done.drain(start..end) {
            if let Some(entry) = r.history {
                out.insert(r.prompt_id, entry);
            }
        }
        Ok(Value::Object(out))
    }

    /// `GET /history/{id}`: `{id: entry}`, or `{}` while it runs or when unknown.
    pub fn history_of(
        &self,
        function: &str,
        caller: &Owner,
        id: &str,
    ) -> Result<Value, StoreError> {
        let record = self.inner.store.prompt(function, id)?;
        Ok(match record {
            Some(r) if may_touch(&r.owner, caller) && r.history.is_some() => {
                json!({ id: r.history })
            }
            _ => json!({}),
        })
    }

    /// `POST /history`: `{"clear": true}` forgets the caller's finished prompts, `{"delete":
    /// [ids]}` those named, with the output files kept for them.
    pub async fn change_history(
        &self,
        function: &str,
        caller: &Owner,
        body: &Value,
    ) -> Result<(), StoreError> {
        let (clear, delete) = (clears(body), named(body));
        let ids: HashSet<String> = self
            .inner
            .store
            .prompts(Some(function))
            .await?
            .into_iter()
            .filter(|r| {
                r.state == PromptState::Done
                    && may_touch(&r.owner, caller)
                    && (clear || delete.contains(&r.prompt_id))
            })
            .map(|r| r.prompt_id)
            .collect();
        self.forget(function, &ids).await
    }

    /// Forgets finished prompts and the files they made.
    pub(super) async fn forget(
        &self,
        function: &str,
        ids: &HashSet<String>,
    ) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let files: Vec<_> = self
            .inner
            .store
            .files(Some(function))
            .await?
            .into_iter()
            .filter(|f| f.prompt_id.as_ref().is_some_and(|p| ids.contains(p)))
            .collect();
        let ids: Vec<String> = ids.iter().cloned().collect();
        self.inner
            .store
            .delete_prompts(function, &ids, &files)
            .await
    }

    /// `POST /interrupt`: stops the caller's running prompt `prompt_id`, or without one
    /// every running prompt of the caller (of `client_id` only, when given). Never
    /// another tenant's. Returns how many were told to stop.
    pub fn interrupt(
        &self,
        function: &str,
        caller: &Owner,
        prompt_id: Option<&str>,
        client_id: Option<&str>,
    ) -> usize {
        let pools = self.pools();
        let Some(pool) = pools.get(function) else {
            return 0;
        };
        let mut told = 0;
        for live in pool.prompts.values() {
            let r = &live.record;
            let chosen = r.state == PromptState::Running
                && may_touch(&r.owner, caller)
                && prompt_id.is_none_or(|id| id == r.prompt_id)
                && client_id.is_none_or(|c| c == r.client_id);
            if let (true, Some(run)) = (chosen, &live.run) {
                run.interrupt.cancel();
                told += 1;
            }
        }
        told
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_touches_its_own_prompts_and_the_admin_every_one() {
        let key = |s: &str| Some(s.to_string());
        assert!(may_touch(&key("a"), &key("a")));
        assert!(!may_touch(&key("a"), &key("b")));
        assert!(!may_touch(&key("a"), &None));
        assert!(may_touch(&None, &None));
        assert!(may_touch(&key("a"), &key(ADMIN)));
        assert_eq!(named(&json!({"delete": ["x", 3, "y"]})).len(), 2);
        assert!(clears(&json!({"clear": true})) && !clears(&json!({"clear": "yes"})));
    }
}
