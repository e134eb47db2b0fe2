//! Reading an OpenAI request's body without changing it: where its `model` is (a JSON
//! body's top-level `model`, or a multipart form's `model` field), how to rename it in
//! place (every other byte kept), whether it asks for a stream, and the start of its
//! prompt, which picks the instance under prefix routing.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;

use serde::Deserialize;
use serde_json::value::RawValue;

/// A request body with its model found.
#[derive(Debug)]
pub struct Body {
    /// The bytes as received.
    pub bytes: Vec<u8>,
    /// The model id asked for.
    pub model: String,
    /// Where the model's value lies in `bytes` (a JSON string, or a form field's text).
    span: Range<usize>,
    /// Whether the model sits in a JSON body (rename writes a JSON string).
    json: bool,
    /// Whether a JSON body asks for a stream (`"stream": true`).
    streams: bool,
    /// Where the top-level fields the prompt prefix is read from lie in `bytes`
    /// (`messages`, `instructions`, `prompt`, `input`), found in the one parse of the body.
    prompt_fields: Vec<(&'static str, Range<usize>)>,
}

/// The top-level fields a prompt prefix is read from.
const PROMPT_FIELDS: [&str; 4] = ["messages", "instructions", "prompt", "input"];

/// Why a body's model could not be read; the message says what was expected.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum BodyError {
    /// The body is not JSON, or not a JSON object.
    #[error("the body is not a JSON object: {0}")]
    NotJson(String),
    /// No `model`.
    #[error("the request names no model: send `model` with one of the ids `GET /v1/models` lists")]
    NoModel,
    /// `model` is not a string.
    #[error("`model` must be a string, one of the ids `GET /v1/models` lists")]
    ModelNotString,
    /// A multipart body without a usable boundary or structure.
    #[error("the multipart body is malformed: {0}")]
    BadMultipart(&'static str),
}

impl Body {
    /// A JSON body's top-level `model`; the body is parsed once, here.
    pub fn json(bytes: Vec<u8>) -> Result<Body, BodyError> {
        let text = std::str::from_utf8(&bytes).map_err(|e| BodyError::NotJson(e.to_string()))?;
        let fields: HashMap<Cow<'_, str>, &RawValue> =
            serde_json::from_str(text).map_err(|e| BodyError::NotJson(e.to_string()))?;
        let span = |raw: &RawValue| {
            let start = raw.get().as_ptr() as usize - text.as_ptr() as usize;
            start..start + raw.get().len()
        };
        let raw = fields.get("model").ok_or(BodyError::NoModel)?;
        let model: String =
            serde_json::from_str(raw.get()).map_err(|_| BodyError::ModelNotString)?;
        let streams = fields
            .get("stream")
            .is_some_and(|v| serde_json::from_str::<bool>(v.get()).unwrap_or(false));
        let prompt_fields = PROMPT_FIELDS
            .into_iter()
            .filter_map(|name| fields.get(name).map(|raw| (name, span(raw))))
            .collect();
        Ok(Body {
            model,
            span: span(raw),
            json: true,
            streams,
            prompt_fields,
            bytes,
        })
    }

    /// A `multipart/form-data` body's `model` field; `boundary` is the content type's.
    pub fn multipart(bytes: Vec<u8>, boundary: &str) -> Result<Body, BodyError> {
        let span = multipart_field(&bytes, boundary, "model")?.ok_or(BodyError::NoModel)?;
        let model = std::str::from_utf8(&bytes[span.clone()])
            .map_err(|_| BodyError::ModelNotString)?
            .trim()
            .to_string();
        Ok(Body {
            model,
            span,
            json: false,
            streams: false,
            prompt_fields: Vec::new(),
            bytes,
        })
    }

    /// Renames the model to `name` in place; nothing else changes.
    pub fn rename(&mut self, name: &str) {
        if name == self.model {
            return;
        }
        let value = if self.json {
            serde_json::to_string(name).expect("a string serializes")
        } else {
            name.to_string()
        };
        let old_len = self.span.len();
        self.bytes.splice(self.span.clone(), value.bytes());
        let start = self.span.start;
        self.span = start..start + value.len();
        // Fields after the model moved with the splice.
        for (_, field) in &mut self.prompt_fields {
            if field.start > start {
                *field = field.start + value.len() - old_len..field.end + value.len() - old_len;
            }
        }
    }

    /// Whether the body asks for a stream (`"stream": true`).
    pub fn streams(&self) -> bool {
        self.streams
    }

    /// A prompt field, parsed from its place in the body; `None` when absent or unusable.
    fn field<T: serde::de::DeserializeOwned>(&self, name: &str) -> Option<T> {
        let (_, span) = self.prompt_fields.iter().find(|(n, _)| *n == name)?;
        serde_json::from_slice(&self.bytes[span.clone()]).ok()
    }

    /// The start of the prompt, at most `max` bytes: the first system message (or the
    /// Responses API's `instructions`) then the first user message, or `prompt` (its
    /// first string), or `input`; `None` when the body has none.
    pub fn prompt_prefix(&self, max: usize) -> Option<Vec<u8>> {
        let view = PromptView {
            messages: self.field("messages"),
            instructions: self.field("instructions"),
            prompt: self.field("prompt"),
            input: self.field("input"),
        };
        let mut out = Vec::new();
        let mut push = |s: &str| {
            let room = max.saturating_sub(out.len());
            out.extend_from_slice(&s.as_bytes()[..s.len().min(room)]);
        };
        if let Some(messages) = &view.messages {
            let first = |role: &str| messages.iter().find(|m| m.role.as_deref() == Some(role));
            if let Some(system) = first("system").or_else(|| first("developer")) {
                push(&text_of(&system.content));
            }
            if let Some(user) = first("user") {
                push(&text_of(&user.content));
            }
        } else {
            if let Some(instructions) = &view.instructions {
                push(instructions);
            }
            for v in [&view.prompt, &view.input].into_iter().flatten() {
                push(&text_of(v));
            }
        }
        (!out.is_empty()).then_some(out)
    }
}

/// The fields of a body the prompt prefix is read from, each parsed on its own.
struct PromptView {
    messages: Option<Vec<Message>>,
    instructions: Option<String>,
    prompt: Option<serde_json::Value>,
    input: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    content: serde_json::Value,
}

/// The text of a content value: a string, the text parts of an array of parts, the
/// first string of an array of strings, or the content of the first message.
fn text_of(v: &serde_json::Value) -> Cow<'_, str> {
    use serde_json::Value as V;
    match v {
        V::String(s) => Cow::Borrowed(s),
        V::Array(items) => match items.first() {
            Some(V::String(s)) => Cow::Borrowed(s),
            Some(V::Object(o)) if o.contains_key("role") => {
                o.get("content").map_or(Cow::Borrowed(""), text_of)
            }
            _ => Cow::Owned(
                items
                    .iter()
                    .filter_map(|p| p.get("text").and_then(V::as_str))
                    .collect::<String>(),
            ),
        },
        _ => Cow::Borrowed(""),
    }
}

/// The boundary of a `multipart/form-data` content type.
pub fn boundary(content_type: &str) -> Option<&str> {
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"'))
            .filter(|b| !b.is_empty())
    })
}

/// Where the value of the form field `name` lies in a multipart body, if it has one.
fn multipart_field(
    body: &[u8],
    boundary: &str,
    name: &str,
) -> Result<Option<Range<usize>>, BodyError> {
    let delimiter = format!("--{boundary}");
    let d = delimiter.as_bytes();
    let mut at = find(body, d, 0).ok_or(BodyError::BadMultipart("no boundary in the body"))?;
    loop {
        let part = at + d.len();
        if body[part..].starts_with(b"--") {
            return Ok(None);
        }
        let head_start = part + 2; // past CRLF
        let head_end = find(body, b"\r\n\r\n", head_start)
            .ok_or(BodyError::BadMultipart("a part's headers do not end"))?;
        let next = find(body, &[b"\r\n", d].concat(), head_end).ok_or(BodyError::BadMultipart(
            "a part does not end with the boundary",
        ))?;
        let head = String::from_utf8_lossy(&body[head_start..head_end]);
        if head.lines().any(|l| names_field(l, name)) {
            return Ok(Some(head_end + 4..next));
        }
        at = next + 2;
    }
}

/// Whether a part header line is `Content-Disposition: form-data; name="NAME"`.
fn names_field(line: &str, name: &str) -> bool {
    let Some((key, value)) = line.split_once(':') else {
        return false;
    };
    key.trim().eq_ignore_ascii_case("content-disposition")
        && value.split(';').skip(1).any(|p| {
            p.split_once('=')
                .is_some_and(|(k, v)| k.trim() == "name" && v.trim().trim_matches('"') == name)
        })
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_model_is_renamed_in_place_and_every_other_byte_kept() {
        let text = r#"{"messages":[{"role":"user","content":"hi é"}], "model" : "llama-8b","temperature":0.70}"#;
        let mut b = Body::json(text.as_bytes().to_vec()).unwrap();
        assert_eq!(b.model, "llama-8b");
        b.rename("meta-llama/Llama \"3\"");
        let renamed = String::from_utf8(b.bytes.clone()).unwrap();
        assert_eq!(
            renamed,
            text.replace("\"llama-8b\"", r#""meta-llama/Llama \"3\"""#)
        );
        let v: serde_json::Value = serde_json::from_str(&renamed).unwrap();
        assert_eq!(v["model"], "meta-llama/Llama \"3\"");
        // Fields after the model are still found once it is renamed.
        assert_eq!(b.prompt_prefix(100).unwrap(), b"hi \xc3\xa9");
        let mut b = Body::json(br#"{"model":"long-model-id","stream":true,"prompt":"p"}"#.to_vec())
            .unwrap();
        b.rename("m");
        assert!(b.streams());
        assert_eq!(b.prompt_prefix(100).unwrap(), b"p");
    }

    #[test]
    fn bodies_without_a_usable_model_say_what_was_expected() {
        let err = |t: &str| Body::json(t.as_bytes().to_vec()).unwrap_err();
        assert_eq!(err(r#"{"messages":[]}"#), BodyError::NoModel);
        assert_eq!(err(r#"{"model":3}"#), BodyError::ModelNotString);
        assert!(matches!(err("[1]"), BodyError::NotJson(_)));
        assert!(matches!(err("{\"model\":"), BodyError::NotJson(_)));
        assert!(matches!(
            Body::json(vec![0xff, 0xfe]).unwrap_err(),
            BodyError::NotJson(_)
        ));
    }

    #[test]
    fn the_prompt_prefix_is_the_system_then_the_first_user_message_cut_to_size() {
        let b = |t: &str| Body::json(t.as_bytes().to_vec()).unwrap();
        let chat = b(
            r#"{"model":"m","messages":[{"role":"user","content":"question"},{"role":"system","content":"You are terse. "}]}"#,
        );
        assert_eq!(chat.prompt_prefix(100).unwrap(), b"You are terse. question");
        assert_eq!(chat.prompt_prefix(7).unwrap(), b"You are");
        let parts = b(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url"},{"type":"text","text":"b"}]}]}"#,
        );
        assert_eq!(parts.prompt_prefix(100).unwrap(), b"ab");
        let completion = b(r#"{"model":"m","prompt":["first","second"]}"#);
        assert_eq!(completion.prompt_prefix(100).unwrap(), b"first");
        let responses = b(r#"{"model":"m","instructions":"Be brief. ","input":"hello"}"#);
        assert_eq!(responses.prompt_prefix(100).unwrap(), b"Be brief. hello");
        assert_eq!(b(r#"{"model":"m","input":[]}"#).prompt_prefix(100), None);
        assert!(b(r#"{"model":"m","stream":true}"#).streams());
        assert!(!b(r#"{"model":"m"}"#).streams());
    }

    #[test]
    fn a_multipart_model_field_is_found_and_renamed() {
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\r\n--\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--XyZ--\r\n";
        assert_eq!(boundary("multipart/form-data; boundary=XyZ"), Some("XyZ"));
        assert_eq!(
            boundary("multipart/form-data; boundary=\"XyZ\""),
            Some("XyZ")
        );
        assert_eq!(boundary("application/json"), None);
        let mut b = Body::multipart(body.to_vec(), "XyZ").unwrap();
        assert_eq!(b.model, "whisper");
        assert!(!b.streams());
        b.rename("openai/whisper-large-v3");
        let text = String::from_utf8(b.bytes).unwrap();
        assert!(text.contains("name=\"model\"\r\n\r\nopenai/whisper-large-v3\r\n--XyZ--"));
        assert!(text.starts_with("--XyZ\r\nContent-Disposition: form-data; name=\"file\""));
        let none =
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nx\r\n--XyZ--\r\n";
        assert_eq!(
            Body::multipart(none.to_vec(), "XyZ").unwrap_err(),
            BodyError::NoModel
        );
        for broken in [&b"junk"[..], b"--XyZ\r\nno end", b"--XyZ\r\n\r\n\r\nvalue"] {
            assert!(matches!(
                Body::multipart(broken.to_vec(), "XyZ").unwrap_err(),
                BodyError::BadMultipart(_)
            ));
        }
    }
}
