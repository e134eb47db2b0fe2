//! The stub's routes: models, chat completions, completions and embeddings, in OpenAI's
//! shapes, with the simulated costs of `main.rs`.

use std::io::{self, Write};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

use crate::json::{self, quote, Json};
use crate::{now_secs, send, Config, Request};

/// The words the stub "generates".
const WORDS: &[&str] = &[
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima",
    "mike", "november", "oscar", "papa",
];
const MAX_TOKENS: u64 = 4096;
const DEFAULT_TOKENS: u64 = 16;
const EMBEDDING_DIMS: usize = 8;

/// Answers one request; whether the connection may carry another.
pub fn handle<W: Write>(req: &Request, config: &Config, w: &mut W, keep: bool) -> io::Result<bool> {
    let path = req.target.split('?').next().unwrap_or_default();
    let post = req.method == "POST";
    match (req.method.as_str(), path) {
        ("GET", "/healthz") => send(w, 200, &[("content-type", "text/plain")], b"ok", keep)?,
        ("GET", "/v1/models") => {
            let data: Vec<String> = config
                .models
                .iter()
                .map(|m| format!(r#"{{"id":{},"object":"model","created":0,"owned_by":"llm-stub"}}"#, quote(m)))
                .collect();
            let body = format!(r#"{{"object":"list","data":[{}]}}"#, data.join(","));
            send_json(w, 200, &body, keep)?;
        }
        (_, "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings") if !post => {
            send_error(w, 405, "method_not_allowed", &format!("{path} takes POST"), keep)?
        }
        (_, "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings") => {
            let body = match json::parse(&req.body) {
                Ok(v @ Json::Obj(_)) => v,
                Ok(_) => return send_error(w, 400, "invalid_json", "the body must be a JSON object", keep).map(|_| keep),
                Err(e) => return send_error(w, 400, "invalid_json", &format!("the body is not JSON: {e}"), keep).map(|_| keep),
            };
            let model = match body.get("model").and_then(Json::as_str) {
                Some(m) if config.models.iter().any(|s| s == m) => m.to_string(),
                Some(m) => {
                    let message = format!(
                        "the model `{m}` does not exist; this server serves: {}",
                        config.models.join(", ")
                    );
                    return send_error(w, 404, "model_not_found", &message, keep).map(|_| keep);
                }
                None => return send_error(w, 400, "invalid_request", "`model` (a string) is required", keep).map(|_| keep),
            };
            if path == "/v1/embeddings" {
                return embeddings(&body, &model, w, keep).map(|_| keep);
            }
            return generate(path == "/v1/chat/completions", &body, &model, config, w, keep);
        }
        _ => send_error(w, 404, "not_found", &format!("no route {} {path}", req.method), keep)?,
    }
    Ok(keep)
}

/// An error in OpenAI's shape.
pub fn send_error<W: Write>(w: &mut W, status: u16, code: &str, message: &str, keep: bool) -> io::Result<()> {
    let kind = if status >= 500 { "server_error" } else { "invalid_request_error" };
    let param = if code == "model_not_found" { r#""model""# } else { "null" };
    let body = format!(
        r#"{{"error":{{"message":{},"type":"{kind}","param":{param},"code":{}}}}}"#,
        quote(message),
        quote(code)
    );
    send_json(w, status, &body, keep)
}

fn send_json<W: Write>(w: &mut W, status: u16, body: &str, keep: bool) -> io::Result<()> {
    send(w, status, &[("content-type", "application/json")], body.as_bytes(), keep)
}

/// The text of a message's content: a string, or the text parts of an array.
fn content_text(v: Option<&Json>) -> String {
    match v {
        Some(Json::Str(s)) => s.clone(),
        Some(Json::Arr(parts)) => parts.iter().filter_map(|p| p.get("text").and_then(Json::as_str)).collect(),
        _ => String::new(),
    }
}

/// The prompt: each message as `role: content\n`, or `prompt` (its first string).
fn prompt_of(chat: bool, body: &Json) -> Option<String> {
    if chat {
        let messages = body.get("messages")?.as_array()?;
        Some(
            messages
                .iter()
                .map(|m| {
                    let role = m.get("role").and_then(Json::as_str).unwrap_or("user");
                    format!("{role}: {}\n", content_text(m.get("content")))
                })
                .collect(),
        )
    } else {
        match body.get("prompt")? {
            Json::Str(s) => Some(s.clone()),
            Json::Arr(items) => items.first().and_then(Json::as_str).map(str::to_string),
            _ => None,
        }
    }
}

fn fnv(data: &[u8], salt: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Chat completions and completions, whole or streamed.
fn generate<W: Write>(chat: bool, body: &Json, model: &str, config: &Config, w: &mut W, keep: bool) -> io::Result<bool> {
    let Some(prompt) = prompt_of(chat, body) else {
        let what = if chat { "`messages` (an array)" } else { "`prompt` (a string)" };
        send_error(w, 400, "invalid_request", &format!("{what} is required"), keep)?;
        return Ok(keep);
    };
    let tokens = body
        .get("max_tokens")
        .or_else(|| body.get("max_completion_tokens"))
        .and_then(Json::as_u64)
        .unwrap_or(DEFAULT_TOKENS)
        .clamp(1, MAX_TOKENS);
    let stream = body.get("stream").and_then(Json::as_bool).unwrap_or(false);
    let include_usage = body
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Json::as_bool)
        .unwrap_or(false);
    let cached = config.cache.lock().unwrap_or_else(|e| e.into_inner()).lookup_and_insert(&prompt);
    let prefill_us = (prompt.len() - cached) as u64 * config.prefill_us_per_byte;
    let ttft_us = prefill_us + config.decode_us_per_token;
    let prompt_tokens = (prompt.len() as u64).div_ceil(4);
    let usage = format!(
        r#"{{"prompt_tokens":{prompt_tokens},"completion_tokens":{tokens},"total_tokens":{},"prompt_tokens_details":{{"cached_tokens":{}}},"stub":{{"prompt_bytes":{},"cached_bytes":{cached},"ttft_us":{ttft_us},"instance":{}}}}}"#,
        prompt_tokens + tokens,
        cached / 4,
        prompt.len(),
        quote(&config.hostname)
    );
    let words: Vec<String> = (0..tokens)
        .map(|i| format!("{} ", WORDS[(fnv(prompt.as_bytes(), i) % WORDS.len() as u64) as usize]))
        .collect();
    let n = config.ids.fetch_add(1, Ordering::Relaxed);
    let (id, object) = if chat { (format!("chatcmpl-{n}"), "chat.completion") } else { (format!("cmpl-{n}"), "text_completion") };
    let created = now_secs();
    let head = format!(r#""id":"{id}","created":{created},"model":{}"#, quote(model));
    thread::sleep(Duration::from_micros(prefill_us));
    if !stream {
        thread::sleep(Duration::from_micros(config.decode_us_per_token * tokens));
        let text = quote(&words.concat());
        let choice = if chat {
            format!(r#"{{"index":0,"message":{{"role":"assistant","content":{text}}},"finish_reason":"length"}}"#)
        } else {
            format!(r#"{{"index":0,"text":{text},"finish_reason":"length"}}"#)
        };
        let body = format!(r#"{{{head},"object":"{object}","choices":[{choice}],"usage":{usage}}}"#);
        let headers = [("content-type", "application/json"), ("x-stub-instance", config.hostname.as_str())];
        send(w, 200, &headers, body.as_bytes(), keep)?;
        return Ok(keep);
    }
    let chunk_object = if chat { "chat.completion.chunk" } else { "text_completion" };
    write!(
        w,
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\nx-stub-instance: {}\r\n{}\r\n",
        config.hostname,
        if keep { "" } else { "connection: close\r\n" }
    )?;
    let mut event = |data: &str| -> io::Result<()> {
        let e = format!("data: {data}\n\n");
        write!(w, "{:x}\r\n{e}\r\n", e.len())?;
        w.flush()
    };
    let chunk = |delta: &str, finish: &str| {
        if chat {
            format!(r#"{{{head},"object":"{chunk_object}","choices":[{{"index":0,"delta":{delta},"finish_reason":{finish}}}]}}"#)
        } else {
            format!(r#"{{{head},"object":"{chunk_object}","choices":[{{"index":0,"text":{delta},"finish_reason":{finish}}}]}}"#)
        }
    };
    if chat {
        event(&chunk(r#"{"role":"assistant","content":""}"#, "null"))?;
    }
    for word in &words {
        thread::sleep(Duration::from_micros(config.decode_us_per_token));
        let delta = if chat { format!(r#"{{"content":{}}}"#, quote(word)) } else { quote(word) };
        event(&chunk(&delta, "null"))?;
    }
    event(&chunk(if chat { "{}" } else { r#""""# }, r#""length""#))?;
    if include_usage {
        event(&format!(r#"{{{head},"object":"{chunk_object}","choices":[],"usage":{usage}}}"#))?;
    }
    event("[DONE]")?;
    w.write_all(b"0\r\n\r\n")?;
    w.flush()?;
    Ok(keep)
}

/// Embeddings: a deterministic vector per input, as floats or base64 of little-endian f32.
fn embeddings<W: Write>(body: &Json, model: &str, w: &mut W, keep: bool) -> io::Result<()> {
    let inputs: Vec<String> = match body.get("input") {
        Some(Json::Str(s)) => vec![s.clone()],
        Some(Json::Arr(items)) if !items.is_empty() && items.iter().all(|i| i.as_str().is_some()) => {
            items.iter().filter_map(Json::as_str).map(str::to_string).collect()
        }
        _ => return send_error(w, 400, "invalid_request", "`input` (a string or strings) is required", keep),
    };
    let base64 = match body.get("encoding_format").and_then(Json::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return send_error(w, 400, "invalid_request", &format!("encoding_format `{other}` is not float or base64"), keep)
        }
    };
    let mut data = Vec::new();
    let mut tokens = 0;
    for (i, input) in inputs.iter().enumerate() {
        tokens += (input.len() as u64).div_ceil(4);
        let v: Vec<f32> = (0..EMBEDDING_DIMS)
            .map(|j| (fnv(input.as_bytes(), j as u64) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let embedding = if base64 {
            let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
            quote(&encode_base64(&bytes))
        } else {
            format!("[{}]", v.iter().map(|f| f.to_string()).collect::<Vec<_>>().join(","))
        };
        data.push(format!(r#"{{"object":"embedding","index":{i},"embedding":{embedding}}}"#));
    }
    let body = format!(
        r#"{{"object":"list","data":[{}],"model":{},"usage":{{"prompt_tokens":{tokens},"total_tokens":{tokens}}}}}"#,
        data.join(","),
        quote(model)
    );
    send_json(w, 200, &body, keep)
}

fn encode_base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for k in 0..4 {
            if k <= c.len() {
                out.push(A[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
