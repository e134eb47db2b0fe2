//! What a run asks of its instance besides the prompt itself: the uploads placed before
//! it, the history entry and output files copied after it, the cached answers refreshed
//! while the instance is held, and a probe deciding whether a lost instance is dead.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{header, Request};
use serde_json::Value;

use super::graph;
use super::run::{from_proxy, Failure, MAX_OUTPUT_FILE, SHORT};
use super::ComfyDoor;
use crate::activator::{Function, Permit};
use crate::store::{FileRecord, PromptRecord};

impl ComfyDoor {
    /// The prompt's history entry on the instance.
    pub(super) async fn entry(&self, permit: &Permit, id: &str) -> Result<Value, Failure> {
        let req = get(&format!("/history/{}", encode(id)));
        let proxy = self.inner.invoker.proxy();
        let (status, _, bytes) = proxy
            .fetch(permit, req, SHORT, 256 << 20)
            .await
            .map_err(from_proxy)?;
        let history: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        match history.get(id) {
            Some(entry) if status.is_success() => Ok(entry.clone()),
            _ => Err(Failure::Lost(format!(
                "the instance has no history of the prompt ({status})"
            ))),
        }
    }

    /// Sends the uploads the prompt names to the instance (with `overwrite`: the gateway's
    /// copy is the truth, and an instance may have an older file of that name).
    pub(super) async fn place_inputs(
        &self,
        name: &str,
        permit: &Permit,
        record: &PromptRecord,
    ) -> Result<(), Failure> {
        let Some(prompt) = record.prompt.as_object() else {
            return Ok(());
        };
        let mut seen = HashSet::new();
        for reference in graph::input_strings(prompt) {
            let (subfolder, filename) = graph::split_reference(reference);
            let Ok(Some(file)) = self.inner.store.file(name, "input", subfolder, filename) else {
                continue;
            };
            if !seen.insert(reference) {
                continue;
            }
            let bytes = self.inner.blobs.read(&file.hash).await.map_err(|e| {
                Failure::Failed(format!("the upload `{reference}` is unreadable: {e}"))
            })?;
            let (content_type, body) = multipart(&file, bytes);
            let req = Request::post("/upload/image")
                .header(header::CONTENT_TYPE, content_type)
                .body(Body::from(body))
                .expect("a static request is valid");
            let proxy = self.inner.invoker.proxy();
            let (status, _, _) = proxy
                .fetch(permit, req, SHORT, 1 << 20)
                .await
                .map_err(from_proxy)?;
            if !status.is_success() {
                return Err(Failure::Failed(format!(
                    "the instance refused the upload `{reference}` ({status})"
                )));
            }
        }
        Ok(())
    }

    /// Copies every file the entry's outputs name into the gateway.
    pub(super) async fn copy_outputs(
        &self,
        name: &str,
        permit: &Permit,
        id: &str,
        entry: &Value,
    ) -> Result<Vec<FileRecord>, Failure> {
        let mut files = Vec::new();
        for (filename, subfolder, kind) in output_files(entry) {
            let query = format!(
                "/view?filename={}&subfolder={}&type={}",
                encode(&filename),
                encode(&subfolder),
                encode(&kind)
            );
            let proxy = self.inner.invoker.proxy();
            let (status, _, bytes) = proxy
                .fetch(permit, get(&query), SHORT, MAX_OUTPUT_FILE)
                .await
                .map_err(from_proxy)?;
            if !status.is_success() {
                tracing::warn!(function = name, prompt = id, file = %filename, %status, "an output named in the history is missing on its instance");
                continue;
            }
            let size = bytes.len() as u64;
            let hash =
                self.inner.blobs.put(bytes).await.map_err(|e| {
                    Failure::Failed(format!("the gateway cannot keep an output: {e}"))
                })?;
            files.push(FileRecord {
                function: name.to_string(),
                kind,
                subfolder: kept_subfolder(id, &subfolder),
                filename,
                hash,
                size,
                created_ms: crate::store::now_ms(),
                prompt_id: Some(id.to_string()),
            });
        }
        Ok(files)
    }

    /// Refreshes the cached answers (`/object_info`...) when another revision gave them
    /// or they are older than ten minutes.
    pub(super) async fn refresh_cache(&self, f: &Arc<Function>, permit: &Permit) {
        for path in super::CACHED_PATHS {
            if self.cache_fresh(f, path) {
                continue;
            }
            let proxy = self.inner.invoker.proxy();
            if let Ok((status, _, bytes)) = proxy.fetch(permit, get(path), SHORT, 64 << 20).await {
                if status.is_success() {
                    self.remember(f, path, &bytes);
                }
            }
        }
    }

    /// Retires the instance when it no longer answers at all.
    pub(super) async fn retire_if_dead(&self, permit: Arc<Permit>, prompt_id: &str) {
        if self.stop_prompt(&permit, prompt_id).await {
            return; // alive: told to drop the prompt, its slot is free for the next one
        }
        if let Ok(permit) = Arc::try_unwrap(permit) {
            self.inner.invoker.activator().retire_unreachable(permit);
        }
    }

    /// Tells the instance to stop the prompt (before its slot goes to another); false
    /// when the instance does not answer.
    pub(super) async fn stop_prompt(&self, permit: &Permit, prompt_id: &str) -> bool {
        let req = json_request("/interrupt", &serde_json::json!({"prompt_id": prompt_id}));
        let proxy = self.inner.invoker.proxy();
        proxy
            .fetch(permit, req, Duration::from_secs(2), 1 << 20)
            .await
            .is_ok()
    }
}

/// Where the gateway keeps a prompt's output: under a folder named after the prompt, since
/// every fresh ComfyUI numbers its files from `ComfyUI_00001_.png` again and two
/// instances' outputs would otherwise take one name.
pub(super) fn kept_subfolder(prompt_id: &str, subfolder: &str) -> String {
    if subfolder.is_empty() {
        prompt_id.to_string()
    } else {
        format!("{prompt_id}/{subfolder}")
    }
}

/// Rewrites the `subfolder` of every file an output (an `executed` message's `output`, or a
/// history entry's `outputs` node) names to where the gateway keeps it.
pub(super) fn rename_outputs(output: &mut Value, prompt_id: &str) {
    let Some(fields) = output.as_object_mut() else {
        return;
    };
    for item in fields
        .values_mut()
        .filter_map(Value::as_array_mut)
        .flatten()
    {
        if item.get("filename").and_then(Value::as_str).is_none() {
            continue;
        }
        let subfolder = item.get("subfolder").and_then(Value::as_str).unwrap_or("");
        item["subfolder"] = Value::String(kept_subfolder(prompt_id, subfolder));
    }
}

/// Every `{filename, subfolder, type}` the entry's outputs name.
fn output_files(entry: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let Some(outputs) = entry.get("outputs").and_then(Value::as_object) else {
        return out;
    };
    for node in outputs.values().filter_map(Value::as_object) {
        for item in node.values().filter_map(Value::as_array).flatten() {
            let Some(filename) = item.get("filename").and_then(Value::as_str) else {
                continue;
            };
            let subfolder = item.get("subfolder").and_then(Value::as_str).unwrap_or("");
            let kind = item.get("type").and_then(Value::as_str).unwrap_or("output");
            if super::files::check_name(subfolder, filename).is_ok() {
                out.push((
                    filename.to_string(),
                    subfolder.to_string(),
                    kind.to_string(),
                ));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

pub(super) fn get(path: &str) -> Request<Body> {
    Request::get(path)
        .body(Body::empty())
        .expect("a path makes a request")
}

pub(super) fn json_request(path: &str, body: &Value) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("a path makes a request")
}

/// Percent-encodes a query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A `multipart/form-data` body for `/upload/image`: the file, its subfolder, `type`, and
/// `overwrite=true` (the gateway's copy is the truth).
fn multipart(file: &FileRecord, bytes: Bytes) -> (String, Vec<u8>) {
    let boundary = format!("ember-{}", uuid::Uuid::new_v4().simple());
    let quoted = file.filename.replace('"', "%22");
    let mut body = Vec::with_capacity(bytes.len() + 512);
    for (field, value) in [
        ("subfolder", file.subfolder.as_str()),
        ("type", "input"),
        ("overwrite", "true"),
    ] {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"\r\n\r\n{value}\r\n").as_bytes());
    }
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{quoted}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
    );
    body.extend_from_slice(&bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_file_an_entry_names_is_found_once_and_escapes_are_skipped() {
        let entry = json!({"outputs": {
            "9": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}, {"filename": "a.png", "subfolder": "", "type": "output"}]},
            "10": {"images": [{"filename": "p.png", "type": "temp"}], "text": ["hi"]},
            "11": {"gifs": [{"filename": "../x", "subfolder": "", "type": "output"}]},
        }});
        assert_eq!(
            output_files(&entry),
            [
                ("a.png".into(), "".into(), "output".into()),
                ("p.png".into(), "".into(), "temp".into())
            ]
        );
        assert_eq!(encode("a b/ü"), "a%20b%2F%C3%BC");
    }

    #[test]
    fn outputs_are_renamed_into_their_prompts_folder() {
        let mut output = json!({"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"},
                                           {"filename": "p.png", "subfolder": "a/b", "type": "temp"}],
                                "text": ["kept"]});
        rename_outputs(&mut output, "p1");
        assert_eq!(output["images"][0]["subfolder"], "p1");
        assert_eq!(output["images"][1]["subfolder"], "p1/a/b");
        assert_eq!(output["text"], json!(["kept"]));
        assert_eq!(kept_subfolder("p1", ""), "p1");
    }
}
