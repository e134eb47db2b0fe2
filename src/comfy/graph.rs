//! Reading a `POST /prompt` body the way ComfyUI does, and its error shapes: the
//! gateway checks what it can without a backend (the body, the graph's shape, and,
//! once a backend's `/object_info` is cached, that every node class exists), so a bad
//! prompt is refused at once even when every instance is scaled to zero.

use serde_json::{json, Map, Value};

/// A prompt as a client submitted it.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    /// The graph: `{node_id: {class_type, inputs}}`.
    pub prompt: Map<String, Value>,
    /// `client_id`, when sent.
    pub client_id: Option<String>,
    /// `prompt_id`, when the client chose one.
    pub prompt_id: Option<String>,
    /// `extra_data` (an object).
    pub extra_data: Map<String, Value>,
    /// `number`: an explicit place in the queue (lower first).
    pub number: Option<f64>,
    /// `front`: to the head of the queue.
    pub front: bool,
    /// Fields passed on as they are (`partial_execution_targets`).
    pub extra: Map<String, Value>,
}

/// ComfyUI's error body: `{"error":{type,message,details,extra_info},"node_errors":{}}`.
pub fn error_body(kind: &str, message: &str, details: &str) -> Value {
    json!({
        "error": {"type": kind, "message": message, "details": details, "extra_info": {}},
        "node_errors": {},
    })
}

/// Parses a `POST /prompt` body; the error is the 400 body ComfyUI would send.
pub fn parse(body: &[u8]) -> Result<Submission, Value> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        error_body(
            "invalid_prompt",
            "the request body is not JSON",
            &format!("{e}: send {{\"prompt\": {{...}}, \"client_id\": \"...\"}}"),
        )
    })?;
    let Value::Object(mut fields) = value else {
        return Err(error_body(
            "invalid_prompt",
            "the request body must be a JSON object",
            "send {\"prompt\": {...}, \"client_id\": \"...\"}",
        ));
    };
    let prompt = match fields.remove("prompt") {
        Some(Value::Object(p)) => p,
        Some(_) => {
            return Err(error_body(
                "invalid_prompt",
                "`prompt` must be an object of nodes in API format",
                "export the workflow with \"Save (API)\"",
            ))
        }
        None => return Err(error_body("no_prompt", "No prompt provided", "")),
    };
    let string = |v: Option<Value>| match v {
        Some(Value::String(s)) if !s.is_empty() => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let client_id = string(fields.remove("client_id"));
    let prompt_id = string(fields.remove("prompt_id"));
    if let Some(id) = &prompt_id {
        if id.len() > 128 || id.contains('/') || id.chars().any(char::is_control) {
            return Err(error_body(
                "invalid_prompt",
                "`prompt_id` must be at most 128 characters, without `/`",
                id,
            ));
        }
    }
    if client_id.as_ref().is_some_and(|c| c.len() > 256) {
        return Err(error_body(
            "invalid_prompt",
            "`client_id` must be at most 256 characters",
            "",
        ));
    }
    let extra_data = match fields.remove("extra_data") {
        Some(Value::Object(e)) => e,
        _ => Map::new(),
    };
    let number = fields.remove("number").and_then(|n| n.as_f64());
    let front = fields.remove("front").and_then(|f| f.as_bool()) == Some(true);
    Ok(Submission {
        prompt,
        client_id,
        prompt_id,
        extra_data,
        number,
        front,
        extra: fields,
    })
}

/// Checks every node's `class_type`, against `object_info` when one is cached; returns
/// the output nodes (those whose class is an `output_node`; unknown without a cache).
pub fn check(
    prompt: &Map<String, Value>,
    object_info: Option<&Value>,
) -> Result<Vec<String>, Value> {
    let mut outputs = Vec::new();
    for (id, node) in prompt {
        let class = node.get("class_type").and_then(Value::as_str);
        let Some(class) = class else {
            return Err(error_body(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                &format!("Node ID '#{id}'"),
            ));
        };
        if let Some(info) = object_info {
            let Some(spec) = info.get(class) else {
                return Err(error_body(
                    "invalid_prompt",
                    &format!("Cannot execute because node {class} does not exist."),
                    &format!("Node ID '#{id}'"),
                ));
            };
            if spec.get("output_node").and_then(Value::as_bool) == Some(true) {
                outputs.push(id.clone());
            }
        }
    }
    if object_info.is_some() && outputs.is_empty() {
        return Err(error_body("prompt_no_outputs", "Prompt has no outputs", ""));
    }
    Ok(outputs)
}

/// Every string given as a node input (not a link): where file names appear
/// (`LoadImage`'s `image`, `"sub/name.png"` or `"name.png [input]"`).
pub fn input_strings(prompt: &Map<String, Value>) -> Vec<&str> {
    prompt
        .values()
        .filter_map(|node| node.get("inputs").and_then(Value::as_object))
        .flat_map(|inputs| inputs.values())
        .filter_map(Value::as_str)
        .collect()
}

/// Splits an input's file reference into subfolder and name: `a/b/c.png` → (`a/b`,
/// `c.png`); a ` [input]` suffix (ComfyUI's annotated names) is dropped.
pub fn split_reference(reference: &str) -> (&str, &str) {
    let reference = reference.strip_suffix(" [input]").unwrap_or(reference);
    match reference.rsplit_once('/') {
        Some((sub, name)) => (sub, name),
        None => ("", reference),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_read_and_refused_in_comfyuis_shapes() {
        let s = parse(br#"{"prompt":{"1":{"class_type":"A","inputs":{"image":"sub/x.png","n":["2",0]}}},"client_id":"c","extra_data":{"k":1},"front":true,"partial_execution_targets":["1"]}"#).unwrap();
        assert_eq!(s.client_id.as_deref(), Some("c"));
        assert!(s.front && s.prompt_id.is_none());
        assert!(s.extra.contains_key("partial_execution_targets"));
        assert_eq!(input_strings(&s.prompt), ["sub/x.png"]);
        assert_eq!(split_reference("sub/x.png [input]"), ("sub", "x.png"));

        let e = parse(b"{}").unwrap_err();
        assert_eq!(e["error"]["type"], "no_prompt");
        assert_eq!(e["node_errors"], json!({}));
        assert_eq!(
            parse(b"nope").unwrap_err()["error"]["type"],
            "invalid_prompt"
        );
        assert!(parse(br#"{"prompt":{},"prompt_id":"a/b"}"#).is_err());

        let info = json!({"A": {"output_node": false}, "Save": {"output_node": true}});
        let e = check(&s.prompt, Some(&info)).unwrap_err();
        assert_eq!(e["error"]["type"], "prompt_no_outputs");
        let bad = parse(br#"{"prompt":{"7":{"class_type":"Nope","inputs":{}}}}"#).unwrap();
        let e = check(&bad.prompt, Some(&info)).unwrap_err();
        assert_eq!(
            e["error"]["message"],
            "Cannot execute because node Nope does not exist."
        );
        assert_eq!(e["error"]["details"], "Node ID '#7'");
        // Without a cached object_info, only the shape is checked.
        assert_eq!(check(&bad.prompt, None).unwrap(), Vec::<String>::new());
    }
}
